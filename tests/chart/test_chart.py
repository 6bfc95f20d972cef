"""The Helm chart: lint, every scenario rendered and validated against the Kubernetes schemas,
pod security, RBAC that grants exactly what the operator calls, values and their schema."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from llm_operator.api import v1alpha1 as api
from llm_operator_dev import chartgen
from tests.chart.render import (
    CHART,
    CI_VALUES,
    CUSTOM_GROUPS,
    NAMESPACE,
    REPO,
    group_of,
    helm,
    of_kind,
    one,
    render,
    scenario_id,
)

SCENARIOS: list[Path | None] = [None, *CI_VALUES]
#: The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest schemas.
K8S_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
VALUES = yaml.safe_load((CHART / "values.yaml").read_text())
SCHEMA = json.loads((CHART / "values.schema.json").read_text())

Rule = tuple[str, str, str, str]  # (apiGroup, resource, verb, resourceName or "")

CHILD_VERBS = ("get", "list", "watch", "create", "patch", "delete")
#: Every call the operator makes in a namespace it watches (the lead's contract in issue 7).
OPERATOR_NAMESPACED: set[Rule] = (
    {("llmoperator.io", "llmdeployments", v, "") for v in ("get", "list", "watch", "patch")}
    | {("llmoperator.io", "llmdeployments/status", "patch", "")}
    # Children are applied, watched and pruned, never read by name (no get), except the
    # routing table's ConfigMap.
    | {("apps", "deployments", v, "") for v in CHILD_VERBS if v != "get"}
    | {("", "services", v, "") for v in CHILD_VERBS if v != "get"}
    | {("", "configmaps", v, "") for v in CHILD_VERBS}
    | {("autoscaling", "horizontalpodautoscalers", v, "") for v in CHILD_VERBS if v != "get"}
    | {("policy", "poddisruptionbudgets", v, "") for v in CHILD_VERBS if v != "get"}
    # Engine NetworkPolicies: applied, watched and pruned, never read by name (no get); granted
    # with networkPolicy.enabled off too, so the ones made while it was on can be deleted.
    | {("networking.k8s.io", "networkpolicies", v, "") for v in CHILD_VERBS if v != "get"}
    | {("", "events", "create", "")}
    # The engine pods, listed while replicas are not ready to say why and for stalls and
    # cost, deleted when stalled (progress-based liveness); no watch.
    | {("", "pods", "list", ""), ("", "pods", "delete", "")}
    # The Secrets external fallbacks name, read one by one: get, never list or watch.
    | {("", "secrets", "get", "")}
)
#: The gateway's keys Secret beside the gateway: the operator creates it, then only it.
KEYS_SECRET: set[Rule] = {
    ("", "secrets", "create", ""),
    ("", "secrets", "get", "llm-operator-routes-keys"),
    ("", "secrets", "patch", "llm-operator-routes-keys"),
}
KEDA: set[Rule] = {("keda.sh", "scaledobjects", v, "") for v in CHILD_VERBS}
#: kopf's own cluster-wide reads: CRDs to discover resources, namespaces to match its list.
KOPF_CRDS: set[Rule] = {
    ("apiextensions.k8s.io", "customresourcedefinitions", v, "") for v in ("list", "watch")
}
KOPF_NAMESPACES: set[Rule] = {("", "namespaces", v, "") for v in ("list", "watch")}
#: operator.preflightNodes (on by default): one labelled list of nodes before a new revision
#: replaces pods that serve, to see that some node could run it.
PREFLIGHT_NODES: set[Rule] = {("", "nodes", "list", "")}


def rules_of(role: dict[str, Any]) -> set[Rule]:
    """A Role's rules flattened to (group, resource, verb, resourceName) tuples."""
    out: set[Rule] = set()
    for rule in role.get("rules") or []:
        names = rule.get("resourceNames") or [""]
        for group in rule.get("apiGroups") or [""]:
            for resource in rule.get("resources") or []:
                for verb in rule["verbs"]:
                    out |= {(group, resource, verb, name) for name in names}
    return out


def granted(
    objs: list[dict[str, Any]], sa: str, sa_namespace: str = NAMESPACE
) -> dict[str | None, set[Rule]]:
    """What a ServiceAccount may do, by namespace (None: cluster-wide), from the rendered RBAC."""
    roles = {
        (o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]): o
        for o in objs
        if o["kind"] in {"Role", "ClusterRole"}
    }
    out: dict[str | None, set[Rule]] = {}
    for binding in objs:
        if binding["kind"] not in {"RoleBinding", "ClusterRoleBinding"}:
            continue
        subjects = binding.get("subjects") or []
        if not any(
            s["kind"] == "ServiceAccount" and s["name"] == sa and s["namespace"] == sa_namespace
            for s in subjects
        ):
            continue
        where = binding["metadata"].get("namespace")
        ref = binding["roleRef"]
        role_ns = where if ref["kind"] == "Role" else None
        role = roles[(ref["kind"], role_ns, ref["name"])]
        out.setdefault(where, set()).update(rules_of(role))
    return out


def deployments(objs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {
        d["metadata"]["labels"]["app.kubernetes.io/component"]: d
        for d in of_kind(objs, "Deployment")
    }


def args_of(deployment: dict[str, Any]) -> list[str]:
    args: list[str] = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    return args


# -- lint and schemas ------------------------------------------------------------------------


def test_there_are_scenarios_for_namespaced_ha_and_minimal_installs() -> None:
    assert len(CI_VALUES) >= 3
    loaded = [yaml.safe_load(p.read_text()) for p in CI_VALUES]
    assert any(v.get("watchNamespaces") for v in loaded)
    assert any(v.get("ha", {}).get("enabled") for v in loaded)
    assert any(
        v.get("crds", {}).get("enabled") is False
        and v.get("keda", {}).get("enabled") is False
        and v.get("metrics", {}).get("serviceMonitor", {}).get("enabled") is False
        for v in loaded
    )


@pytest.mark.parametrize("values", SCENARIOS, ids=scenario_id)
def test_helm_lint_is_clean(values: Path | None) -> None:
    cmd = ["lint", "--strict", str(CHART)] + (["--values", str(values)] if values else [])
    out = chartgen.run_helm(cmd, helm())
    assert "1 chart(s) linted, 0 chart(s) failed" in out
    assert "[WARNING]" not in out and "[ERROR]" not in out, out


@pytest.mark.parametrize("values", SCENARIOS, ids=scenario_id)
def test_every_rendered_object_passes_the_kubernetes_schemas(values: Path | None) -> None:
    objs = render(values)
    assert objs
    checked = 0
    for obj in objs:
        if group_of(obj) in CUSTOM_GROUPS:
            continue  # asserted by test_custom_resources_have_the_right_shape
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as err:
                raise AssertionError(
                    f"{obj['kind']} {obj['metadata']['name']} fails the {version} schema: {err}"
                ) from None
        checked += 1
    assert checked >= 4


@pytest.mark.parametrize("values", SCENARIOS, ids=scenario_id)
def test_custom_resources_have_the_right_shape(values: Path | None) -> None:
    objs = render(values)
    services = of_kind(objs, "Service")
    crds = {c["metadata"]["name"]: c for c in of_kind(objs, "CustomResourceDefinition")}
    for monitor in of_kind(objs, "ServiceMonitor"):
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        assert monitor["metadata"]["namespace"] == NAMESPACE
        spec = monitor["spec"]
        assert spec["namespaceSelector"] == {"matchNames": [NAMESPACE]}
        selector = spec["selector"]["matchLabels"]
        targets = [s for s in services if selector.items() <= s["metadata"]["labels"].items()]
        assert len(targets) == 1, f"{monitor['metadata']['name']} must select exactly one Service"
        port_names = {p["name"] for p in targets[0]["spec"]["ports"]}
        for endpoint in spec["endpoints"]:
            assert endpoint["port"] in port_names
            assert endpoint["path"] == "/metrics"
            assert re.fullmatch(r"[0-9]+s", endpoint["interval"])
    for peering in [o for o in objs if group_of(o) == "kopf.dev"]:
        assert peering["apiVersion"] == "kopf.dev/v1"
        assert peering["kind"] in {"ClusterKopfPeering", "KopfPeering"}
        assert peering["metadata"]["name"] == "llm-operator"
        assert ("namespace" in peering["metadata"]) == (peering["kind"] == "KopfPeering")
        # A hook: created after the release's CRDs exist, re-created on upgrade.
        annotations = peering["metadata"]["annotations"]
        assert annotations["helm.sh/hook"] == "post-install,post-upgrade"
        plural = (
            "clusterkopfpeerings" if peering["kind"] == "ClusterKopfPeering" else "kopfpeerings"
        )
        crd = crds[f"{plural}.kopf.dev"]
        assert crd["spec"]["scope"] == ("Cluster" if plural.startswith("cluster") else "Namespaced")
        assert crd["spec"]["names"]["kind"] == peering["kind"]


# -- pod security ------------------------------------------------------------------------------


@pytest.mark.parametrize("values", SCENARIOS, ids=scenario_id)
def test_every_pod_meets_pod_security_restricted(values: Path | None) -> None:
    for deployment in of_kind(render(values), "Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert not any(pod.get(k) for k in ("hostNetwork", "hostPID", "hostIPC"))
        assert not any("hostPath" in v for v in pod.get("volumes", []))
        for container in pod["containers"] + pod.get("initContainers", []):
            sc = container["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["readOnlyRootFilesystem"] is True
            assert sc["capabilities"] == {"drop": ["ALL"]}
            assert not sc.get("privileged")
            # The gateway's /healthz turns 503 while it drains: liveness must not restart it then.
            gateway = "gateway" in deployment["metadata"]["name"]
            liveness = "/health" if gateway else "/healthz"
            assert container["livenessProbe"]["httpGet"]["path"] == liveness
            assert container["readinessProbe"]["httpGet"]["path"] == "/healthz"
            assert {"cpu", "memory"} <= container["resources"]["requests"].keys()
            assert "memory" in container["resources"]["limits"]
            # A read-only root needs a writable /tmp for Python.
            assert any(m["mountPath"] == "/tmp" for m in container["volumeMounts"])


# -- RBAC --------------------------------------------------------------------------------------


@pytest.mark.parametrize("values", SCENARIOS, ids=scenario_id)
def test_rbac_has_no_wildcards_no_secrets_and_no_escalation(values: Path | None) -> None:
    roles = [o for o in render(values) if o["kind"] in {"Role", "ClusterRole"}]
    assert roles
    for role in roles:
        assert "aggregationRule" not in role  # the controller would fill rules: a GitOps diff
        for rule in role["rules"]:
            for key in ("apiGroups", "resources", "verbs", "resourceNames"):
                assert "*" not in rule.get(key, []), f"{role['metadata']['name']}: {rule}"
            assert "nonResourceURLs" not in rule
            assert not {"pods/exec", "serviceaccounts/token"} & set(rule["resources"])
            assert not {"escalate", "bind", "impersonate"} & set(rule["verbs"])
            if "secrets" in rule["resources"]:
                # Only the operator's named reads and its one keys Secret: never a list or
                # watch of Secrets, never a Secret write beyond that one.
                assert set(rule["verbs"]) <= {"get", "create", "patch"}, rule
                assert set(rule["verbs"]) == {"get"} or "keys" in role["metadata"]["name"], rule


def test_cluster_wide_operator_rbac_is_exactly_what_it_calls() -> None:
    objs = render()
    cluster_wide = OPERATOR_NAMESPACED | KOPF_CRDS | PREFLIGHT_NODES
    assert granted(objs, "llm-operator") == {None: cluster_wide, NAMESPACE: KEYS_SECRET}
    keda = render(None, "keda.enabled=true")
    assert granted(keda, "llm-operator") == {None: cluster_wide | KEDA, NAMESPACE: KEYS_SECRET}
    assert "--keda" in args_of(deployments(keda)["operator"])
    assert "--keda" not in args_of(deployments(objs)["operator"])


def test_namespaced_operator_rbac_is_per_namespace_with_read_only_discovery() -> None:
    values = CHART / "ci" / "namespaced-values.yaml"
    watched = yaml.safe_load(values.read_text())["watchNamespaces"]
    objs = render(values)
    rights = granted(objs, "llm-operator")
    # Nothing else cluster-wide.
    assert rights.pop(None) == KOPF_CRDS | KOPF_NAMESPACES | PREFLIGHT_NODES
    routes = rights.pop(NAMESPACE)  # the gateway's routing table beside the gateway
    assert (
        routes
        == {
            ("", "configmaps", "create", ""),
            ("", "configmaps", "get", "llm-operator-routes"),
            ("", "configmaps", "patch", "llm-operator-routes"),
        }
        | KEYS_SECRET
    )
    assert rights == {ns: OPERATOR_NAMESPACED for ns in watched}
    args = args_of(deployments(objs)["operator"])
    assert [a for a in args if a.startswith("--namespace")] == [f"--namespace={n}" for n in watched]
    assert "--all-namespaces" not in args


def test_preflight_nodes_off_takes_the_node_rule_away_and_tells_the_operator() -> None:
    for values in (None, CHART / "ci" / "namespaced-values.yaml"):
        on = render(values)
        off = render(values, "operator.preflightNodes=false")
        assert granted(on, "llm-operator")[None] >= PREFLIGHT_NODES
        assert not PREFLIGHT_NODES & granted(off, "llm-operator")[None]
        env = {
            e["name"]: e.get("value")
            for e in deployments(off)["operator"]["spec"]["template"]["spec"]["containers"][0][
                "env"
            ]
        }
        assert env["LLMOP_PREFLIGHT_NODES"] == "false"


def test_ha_rbac_adds_only_the_peering() -> None:
    cluster_wide = granted(render(CHART / "ci" / "ha-values.yaml"), "llm-operator")[None]
    assert cluster_wide - OPERATOR_NAMESPACED - KOPF_CRDS - KEDA - PREFLIGHT_NODES == {
        ("kopf.dev", "clusterkopfpeerings", "list", ""),
        ("kopf.dev", "clusterkopfpeerings", "watch", ""),
        ("kopf.dev", "clusterkopfpeerings", "get", "llm-operator"),
        ("kopf.dev", "clusterkopfpeerings", "patch", "llm-operator"),
    }
    namespaced = granted(
        render(CHART / "ci" / "ha-namespaced-values.yaml"), "llm-operator-existing"
    )
    for ns in ("llm-operator", "ml"):
        # The release namespace also holds the gateway and so its keys Secret.
        keys = KEYS_SECRET if ns == NAMESPACE else set()
        assert namespaced[ns] - OPERATOR_NAMESPACED - keys == {
            ("kopf.dev", "kopfpeerings", "list", ""),
            ("kopf.dev", "kopfpeerings", "watch", ""),
            ("kopf.dev", "kopfpeerings", "get", "llm-operator"),
            ("kopf.dev", "kopfpeerings", "patch", "llm-operator"),
        }


def test_gateway_reads_pods_and_only_its_routing_configmap() -> None:
    read = {"get", "list", "watch"}
    objs = render()
    assert granted(objs, "llm-operator-gateway") == {
        None: {("", "pods", v, "") for v in read},
        NAMESPACE: {("", "configmaps", v, "llm-operator-routes") for v in read},
    }
    namespaced = granted(render(CHART / "ci" / "namespaced-values.yaml"), "llm-operator-gateway")
    assert None not in namespaced
    assert namespaced["team-a"] == {("", "pods", v, "") for v in read}
    assert not any(
        g for g in granted(render(CHART / "ci" / "minimal-values.yaml"), "llm-operator-gateway")
    )


def test_aggregated_roles_let_namespace_users_view_and_edit_llmdeployments() -> None:
    objs = render()
    view = one(objs, "ClusterRole", "llm-operator-view")
    edit = one(objs, "ClusterRole", "llm-operator-edit")
    assert view["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-view"] == "true"
    assert rules_of(view) == {
        ("llmoperator.io", r, v, "")
        for r in ("llmdeployments", "llmdeployments/status")
        for v in ("get", "list", "watch")
    }
    labels = edit["metadata"]["labels"]
    assert labels["rbac.authorization.k8s.io/aggregate-to-edit"] == "true"
    assert labels["rbac.authorization.k8s.io/aggregate-to-admin"] == "true"
    assert "rbac.authorization.k8s.io/aggregate-to-view" not in labels
    assert rules_of(edit) == {
        ("llmoperator.io", "llmdeployments", v, "")
        for v in ("create", "update", "patch", "delete", "deletecollection")
    }  # never the status: that is the operator's
    off = render(None, "rbac.aggregateToDefaultRoles=false")
    assert not [
        r for r in of_kind(off, "ClusterRole") if r["metadata"]["name"].endswith(("-view", "-edit"))
    ]


def test_cluster_scoped_names_carry_the_release_namespace_outside_the_default() -> None:
    objs = render(namespace="platform")
    names = {o["metadata"]["name"] for o in objs if o["kind"].startswith("Cluster")}
    assert names == {
        "platform-llm-operator",
        "platform-llm-operator-gateway",
        "platform-llm-operator-view",
        "platform-llm-operator-edit",
    }


# -- the operator Deployment ---------------------------------------------------------------------


def test_one_replica_recreate_by_default_and_two_with_peering_in_ha() -> None:
    single = deployments(render())["operator"]
    assert single["spec"]["replicas"] == 1
    assert single["spec"]["strategy"] == {"type": "Recreate"}
    assert not [a for a in args_of(single) if a.startswith("--peering")]
    assert "--all-namespaces" in args_of(single)

    objs = render(CHART / "ci" / "ha-values.yaml")
    ha = deployments(objs)["operator"]
    assert ha["spec"]["replicas"] == 2
    assert ha["spec"]["strategy"]["type"] == "RollingUpdate"
    assert "--peering=llm-operator" in args_of(ha)
    env = {e["name"]: e for e in ha["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["POD_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert one(objs, "PodDisruptionBudget", "llm-operator")["spec"]["maxUnavailable"] == 1
    anti = ha["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
    assert anti["preferredDuringSchedulingIgnoredDuringExecution"]
    one(objs, "ClusterKopfPeering", "llm-operator")
    one(objs, "CustomResourceDefinition", "clusterkopfpeerings.kopf.dev")


def test_flags_match_the_operator_and_gateway_command_lines() -> None:
    from llm_operator.gateway.cli import parse_args as gateway_args

    objs = render(CHART / "ci" / "ha-values.yaml")
    operator_args = args_of(deployments(objs)["operator"])
    assert operator_args[0] == "run"
    assert "--metrics-port=9090" in operator_args and "--liveness-port=8080" in operator_args
    try:
        from llm_operator.controller.main import parse_args as operator_parse
    except ImportError as err:  # the operator lands separately; the chart must not wait
        pytest.skip(f"llm_operator.controller is not importable yet: {err}")
    parsed = operator_parse(operator_args[1:])
    assert parsed.peering == "llm-operator" and parsed.metrics_port == 9090
    gateway = args_of(deployments(objs)["gateway"])
    assert gateway[0] == "gateway"
    parsed_gw = gateway_args(gateway[1:])
    assert parsed_gw.config == "/etc/llm-gateway/routes.yaml" and parsed_gw.port == 8080


def test_image_tag_defaults_to_the_app_version_and_a_digest_wins() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    images = {
        c["image"]
        for d in of_kind(render(), "Deployment")
        for c in d["spec"]["template"]["spec"]["containers"]
    }
    assert images == {f"ghcr.io/llm-operator/llm-operator:{chart['appVersion']}"}
    digest = "sha256:" + "ab" * 32
    pinned = render(None, f"image.digest={digest}", "image.tag=ignored")
    assert {
        c["image"]
        for d in of_kind(pinned, "Deployment")
        for c in d["spec"]["template"]["spec"]["containers"]
    } == {f"ghcr.io/llm-operator/llm-operator@{digest}"}


def test_metrics_service_and_optional_service_monitor() -> None:
    objs = render()
    service = one(objs, "Service", "llm-operator-metrics", NAMESPACE)
    assert service["spec"]["ports"] == [
        {"name": "metrics", "port": 9090, "targetPort": "metrics", "protocol": "TCP"}
    ]
    assert service["spec"]["selector"]["app.kubernetes.io/component"] == "operator"
    assert not of_kind(objs, "ServiceMonitor")
    monitors = of_kind(render(None, "metrics.serviceMonitor.enabled=true"), "ServiceMonitor")
    assert {m["metadata"]["name"] for m in monitors} == {"llm-operator", "llm-operator-gateway"}


def test_gateway_is_optional_and_mounts_its_routing_table() -> None:
    gateway = deployments(render())["gateway"]
    pod = gateway["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "llm-operator-gateway"
    routes = next(v for v in pod["volumes"] if v["name"] == "routes")
    assert routes["configMap"] == {"name": "llm-operator-routes", "optional": True}
    assert not [
        o for o in render(None, "gateway.enabled=false") if "gateway" in o["metadata"]["name"]
    ]


# -- CRDs ------------------------------------------------------------------------------------------


def test_the_chart_crd_is_the_generated_crd_with_helm_metadata() -> None:
    committed = yaml.safe_load((REPO / "crds" / f"{api.PLURAL}.{api.GROUP}.yaml").read_text())
    rendered = one(render(), "CustomResourceDefinition", f"{api.PLURAL}.{api.GROUP}")
    assert rendered["spec"] == committed["spec"]
    assert rendered["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
    assert committed["metadata"]["labels"].items() <= rendered["metadata"]["labels"].items()


def test_crds_keep_and_enabled_switches() -> None:
    not_kept = one(
        render(None, "crds.keep=false"), "CustomResourceDefinition", "llmdeployments.llmoperator.io"
    )
    assert "helm.sh/resource-policy" not in (not_kept["metadata"].get("annotations") or {})
    annotated = one(
        render(None, "crds.annotations.example\\.com/team=ml"),
        "CustomResourceDefinition",
        "llmdeployments.llmoperator.io",
    )
    assert annotated["metadata"]["annotations"] == {
        "helm.sh/resource-policy": "keep",
        "example.com/team": "ml",
    }
    assert not of_kind(render(None, "crds.enabled=false"), "CustomResourceDefinition")
    assert not of_kind(
        render(None, "crds.enabled=false", "ha.enabled=true"), "CustomResourceDefinition"
    )


# -- values and their schema -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "complaint"),
    [
        ("operatr.logLevel=DEBUG", "operatr"),  # a typo at the top
        ("gateway.servce.port=81", "servce"),  # a typo deeper down
        ("ha.enabled=yes", "ha.enabled"),  # a string for a boolean
        ("gateway.replicas=two", "gateway.replicas"),
        ("operator.logFormat=xml", "operator.logFormat"),
        ("watchNamespaces[0]=Not_A_Namespace", "watchNamespaces"),
        ("metrics.service.port=70000", "metrics.service.port"),
    ],
)
def test_values_schema_rejects_typos_and_wrong_types(setting: str, complaint: str) -> None:
    with pytest.raises(chartgen.ChartgenError) as failure:
        render(None, setting)
    message = str(failure.value)
    assert "values don't meet the specifications of the schema" in message
    assert complaint in message


def test_values_schema_rejects_a_typo_in_a_values_file(tmp_path: Path) -> None:
    values = tmp_path / "typo.yaml"
    values.write_text("watchNamespace: [team-a]\n")
    with pytest.raises(chartgen.ChartgenError, match="watchNamespace"):
        render(values)


@pytest.mark.parametrize("values", SCENARIOS, ids=scenario_id)
def test_the_defaults_and_every_scenario_satisfy_the_schema(values: Path | None) -> None:
    data = yaml.safe_load(values.read_text()) if values else VALUES
    jsonschema.Draft7Validator(SCHEMA).validate(data)


def _leaves(node: dict[str, Any], schema: dict[str, Any], path: str = "") -> list[str]:
    """Dotted paths of values.yaml, descending where the schema describes each key."""
    out = []
    for key, value in node.items():
        here = f"{path}{key}"
        out.append(here)
        sub = schema.get("properties", {}).get(key)
        assert sub is not None, f"values.schema.json does not describe {here}"
        if isinstance(value, dict) and sub.get("additionalProperties") is False:
            out += _leaves(value, sub, here + ".")
    return out


def test_the_schema_describes_every_value_and_nothing_else() -> None:
    paths = set(_leaves(VALUES, SCHEMA))

    def schema_paths(schema: dict[str, Any], path: str = "") -> set[str]:
        found = set()
        for key, sub in schema.get("properties", {}).items():
            found.add(f"{path}{key}")
            if sub.get("additionalProperties") is False and f"{path}{key}" in paths:
                found |= schema_paths(sub, f"{path}{key}.")
        return found

    # Kubernetes objects (security contexts, resources) may list fields the defaults leave out.
    described = {
        p
        for p in schema_paths(SCHEMA)
        if p != "global" and not set(p.split(".")[:-1]) & KUBERNETES_OBJECTS
    }
    assert described - paths == set(), "schema entries with no default in values.yaml"
    for obj in _objects_with_closed_schema(SCHEMA):
        assert obj.get("additionalProperties") is False


def _objects_with_closed_schema(schema: dict[str, Any]) -> list[dict[str, Any]]:
    out = [schema]
    for sub in schema.get("properties", {}).values():
        if sub.get("type") == "object" and "properties" in sub:
            out += _objects_with_closed_schema(sub)
    return out


#: Values whose contents are Kubernetes API objects, documented upstream, not here.
KUBERNETES_OBJECTS = {"resources", "podSecurityContext", "securityContext"}


def test_every_key_in_values_yaml_has_a_comment() -> None:
    lines = (CHART / "values.yaml").read_text().splitlines()
    root = yaml.compose("\n".join(lines))
    assert isinstance(root, yaml.MappingNode)
    missing: list[str] = []

    def walk(node: yaml.MappingNode, path: str) -> None:
        for key, value in node.value:
            line = key.start_mark.line
            above = lines[line - 1].strip() if line else ""
            if not above.startswith("#"):
                missing.append(f"{path}{key.value} (line {line + 1})")
            if isinstance(value, yaml.MappingNode) and key.value not in KUBERNETES_OBJECTS:
                walk(value, f"{path}{key.value}.")

    walk(root, "")
    assert not missing, f"values without a comment: {missing}"


def notes(tmp_path: Path, *sets: str) -> str:
    """NOTES.txt as `helm install` prints it (rendered with `tpl` inside a probe template, as
    `helm template` leaves NOTES out and `helm install --dry-run` needs a cluster)."""
    copy = tmp_path / "chart"
    shutil.copytree(CHART, copy)
    # .Files sees the chart's files but not templates/: give it a copy of NOTES.txt.
    shutil.copy(CHART / "templates" / "NOTES.txt", copy / "notes-probe.txt")
    (copy / "templates" / "notes-probe.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: notes-probe\ndata:\n"
        '  notes: {{ tpl (.Files.Get "notes-probe.txt") . | toJson }}\n'
    )
    args = ["template", "llm-operator", str(copy), "--namespace", NAMESPACE]
    args += ["--kube-version", chartgen.TEMPLATE_KUBE_VERSION]
    args += ["--show-only", "templates/notes-probe.yaml"]
    for item in sets:
        args += ["--set", item]
    text: str = yaml.safe_load(chartgen.run_helm(args, helm()))["data"]["notes"]
    return text


def test_notes_tell_the_next_steps(tmp_path: Path) -> None:
    text = notes(tmp_path)
    assert "kubectl -n llm-operator get deployments" in text
    assert "kind: LLMDeployment" in text
    assert "port-forward service/llm-operator-gateway" in text
    assert "keeps the CRDs" in text
    assert "every namespace" in text
    scoped = notes(tmp_path / "scoped", "watchNamespaces={ml,research}", "crds.enabled=false")
    assert "It watches LLMDeployments in: ml, research." in scoped
    assert "kubectl apply -n ml -f -" in scoped
    assert "did not install the LLMDeployment CRD" in scoped


def test_helm_is_the_pinned_version() -> None:
    from llm_operator_dev.devcluster.layout import Layout

    out = subprocess.run(
        [str(helm()), "version", "--short"], capture_output=True, text=True, check=True
    )
    assert out.stdout.startswith(Layout.discover().versions.helm)


def test_cluster_scoped_names_of_releases_in_similar_namespaces_do_not_collide() -> None:
    prefix = "e2e-test-install-runs-restricted-and-its-service"  # long and shared
    first = render(None, namespace=f"{prefix}-aaaaaa")
    second = render(None, namespace=f"{prefix}-bbbbbb")

    def names(objs: list[dict[str, Any]]) -> set[str]:
        return {o["metadata"]["name"] for o in objs if o["kind"].startswith("Cluster")}

    assert names(first) and not names(first) & names(second)


# -- operator settings: each chart value reaches `llm-operator run` ---------------------------


def operator_command(objs: list[dict[str, Any]]) -> tuple[list[str], dict[str, str]]:
    """The operator container's arguments after `run`, and its plain environment variables."""
    [container] = deployments(objs)["operator"]["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    assert container["args"][0] == "run"
    return container["args"][1:], env


def _settings() -> list[Any]:
    from llm_operator.controller.main import SETTINGS

    return list(SETTINGS)


@pytest.mark.parametrize(
    "setting", [s for s in _settings() if s.field != "gateway_namespace"], ids=lambda s: s.field
)
def test_each_operator_setting_value_reaches_the_operator(setting: Any) -> None:
    from llm_operator.controller.main import parse_args
    from tests.controller.test_settings import EXAMPLES

    text, value = EXAMPLES[setting.field]
    objs = render(None, f"{setting.value}={text}")
    args, env = operator_command(objs)
    if setting.field == "keda_enabled":  # a flag: it also switches RBAC and the watch
        assert "--keda" in args
    else:
        assert env[setting.env] == text
    parsed = parse_args(args, env)
    model = parsed.config if setting.target == "render" else parsed.controller
    assert getattr(model, setting.field) == (text if value is None else value)


def test_the_chart_defaults_are_the_documented_operator_settings() -> None:
    from llm_operator.controller.main import ControllerSettings, parse_args
    from llm_operator.render import RenderConfig

    args, env = operator_command(render())
    parsed = parse_args(args, env)
    assert parsed.config == RenderConfig(
        keda_enabled=False,
        gateway_namespace=NAMESPACE,
        gateway_queue_metric="llm_gateway_requests_held",
        run_as_user=10001,  # the chart runs engines as non-root; the bare operator does not
    )
    assert parsed.controller == ControllerSettings()
    # Null and empty values are left out: the operator's own default applies.
    assert "LLMOP_PROMETHEUS_URL" not in env
    assert "LLMOP_STARTUP_TIMEOUT_SECONDS" not in env
    assert "LLMOP_DEFAULT_ENGINE_IMAGE" not in env


def test_the_gateway_queue_metric_and_namespace_only_with_the_gateway() -> None:
    from llm_operator.controller.main import parse_args

    args, env = operator_command(render(None, "gateway.enabled=false"))
    parsed = parse_args(args, env)
    assert parsed.config.gateway_queue_metric is None and parsed.config.gateway_namespace is None
    args, env = operator_command(render(None, "operator.gatewayQueueMetric="))
    assert parse_args(args, env).config.gateway_queue_metric is None


def test_every_operator_variable_the_chart_sets_is_a_setting() -> None:
    from tests.controller.test_settings import EXAMPLES

    operator_values = [s for s in _settings() if s.value.startswith("operator.")]
    sets = [f"{s.value}={EXAMPLES[s.field][0]}" for s in operator_values]
    _, env = operator_command(render(None, *sets, "keda.enabled=true"))
    known = {s.env for s in _settings()} | {"LLMOP_ROUTES_CONFIGMAP"}
    assert {n for n in env if n.startswith("LLMOP_")} <= known
    assert {s.env for s in operator_values} <= set(env)
    for s in operator_values:
        key = s.value.removeprefix("operator.")
        assert key in SCHEMA["properties"]["operator"]["properties"] and key in VALUES["operator"]


def test_large_integer_settings_are_not_written_in_exponent_form(tmp_path: Path) -> None:
    values = tmp_path / "uid.yaml"
    values.write_text("operator:\n  runAsUser: 1000680000\n  startupTimeoutSeconds: 86400\n")
    _, env = operator_command(render(values))
    assert env["LLMOP_RUN_AS_USER"] == "1000680000"
    assert env["LLMOP_STARTUP_TIMEOUT_SECONDS"] == "86400"


@pytest.mark.parametrize(
    ("setting", "complaint"),
    [
        ("operator.runAsUser=0", "operator.runAsUser"),
        ("operator.runAsUser=root", "operator.runAsUser"),
        ("operator.startupTimeoutSeconds=30", "operator.startupTimeoutSeconds"),
        ("operator.hpaEnabled=maybe", "operator.hpaEnabled"),
        ("operator.kedaPrometheusAddress=prometheus:9090", "operator.kedaPrometheusAddress"),
        ("operator.prometheusUrl=prometheus:9090", "operator.prometheusUrl"),
        ("operator.modelCacheMountPath=models", "operator.modelCacheMountPath"),
    ],
)
def test_values_schema_rejects_bad_operator_settings(setting: str, complaint: str) -> None:
    with pytest.raises(chartgen.ChartgenError) as failure:
        render(None, setting)
    assert complaint in str(failure.value)


def test_the_gateway_mounts_the_operators_copy_of_the_fallback_keys() -> None:
    from llm_operator.render.routes import API_KEY_DIR, KEYS_SECRET_SUFFIX

    gateway = deployments(render())["gateway"]["spec"]["template"]["spec"]
    [volume] = [v for v in gateway["volumes"] if v["name"] == "fallback-keys"]
    assert volume["secret"] == {
        "secretName": "llm-operator-routes" + KEYS_SECRET_SUFFIX,
        "optional": True,  # the gateway starts before any key is referenced
    }
    [container] = gateway["containers"]
    [mount] = [m for m in container["volumeMounts"] if m["name"] == "fallback-keys"]
    assert (mount["mountPath"], mount["readOnly"]) == (API_KEY_DIR, True)


# -- networkPolicy: the engines' policies admit this release's gateway pods ----------------------


def test_network_policies_admit_exactly_this_releases_gateway_pods() -> None:
    from llm_operator.controller.main import parse_args
    from llm_operator.render.label_selector import parse_label_selector

    objs = render(None, "networkPolicy.enabled=true")
    args, env = operator_command(objs)
    config = parse_args(args, env).config
    assert config.network_policy_enabled and config.gateway_namespace == NAMESPACE
    gateway = deployments(objs)["gateway"]
    wanted = parse_label_selector(config.network_policy_gateway_pod_selector)
    assert wanted == {"matchLabels": gateway["spec"]["selector"]["matchLabels"]}
    pod_labels = gateway["spec"]["template"]["metadata"]["labels"]
    assert wanted["matchLabels"].items() <= pod_labels.items()
    # Another release's gateway in the same namespace is not admitted.
    assert wanted["matchLabels"]["app.kubernetes.io/instance"] == "llm-operator"
    # A selector given in values wins; without the chart's gateway no gateway namespace is set.
    args, env = operator_command(
        render(None, "networkPolicy.enabled=true", "networkPolicy.gatewayPodSelector=app=gw")
    )
    assert parse_args(args, env).config.network_policy_gateway_pod_selector == "app=gw"
    args, env = operator_command(
        render(None, "networkPolicy.enabled=true", "gateway.enabled=false")
    )
    off = parse_args(args, env).config
    assert off.network_policy_enabled and off.gateway_namespace is None
    assert "LLMOP_NETWORK_POLICY_GATEWAY_POD_SELECTOR" not in env


def test_network_policies_are_off_by_default_and_the_rbac_is_there_either_way() -> None:
    from llm_operator.controller.main import parse_args

    args, env = operator_command(render())
    assert parse_args(args, env).config.network_policy_enabled is False
    assert "LLMOP_NETWORK_POLICY_ENABLED" not in env
    for objs in (render(), render(None, "networkPolicy.enabled=true")):
        role = one(objs, "ClusterRole", "llm-operator")
        verbs = {r[2] for r in rules_of(role) if r[1] == "networkpolicies"}
        assert verbs == {"list", "watch", "create", "patch", "delete"}


@pytest.mark.parametrize(
    "setting",
    [
        "networkPolicy.prometheus.podSelector=",
        "networkPolicy.prometheus.namespaceSelector=a b",
        "networkPolicy.gatewayPodSelector=a=1 b=2",
        "networkPolicy.enabled=yes",
    ],
)
def test_values_schema_rejects_bad_network_policy_values(setting: str) -> None:
    with pytest.raises(chartgen.ChartgenError) as failure:
        render(None, setting)
    assert "networkPolicy" in str(failure.value)


@pytest.mark.parametrize(
    "text",
    ["app.kubernetes.io/name=prometheus", "a==1,b=2", "a!=1,b,!c", "app=prom,!canary,tier!=x"],
)
def test_the_chart_reads_prometheus_selectors_as_the_operator_does(text: str) -> None:
    from llm_operator.render.label_selector import parse_label_selector

    sets = ["networkPolicy.chartPods.enabled=true", f"networkPolicy.prometheus.podSelector={text}"]
    objs = render(None, *[s.replace(",", "\\,") for s in sets])
    policy = one(objs, "NetworkPolicy", "llm-operator")
    [rule] = policy["spec"]["ingress"]
    [peer] = rule["from"]
    assert peer["podSelector"] == parse_label_selector(text)
    _, env = operator_command(objs)
    assert env["LLMOP_NETWORK_POLICY_PROMETHEUS_POD_SELECTOR"] == text


def test_the_chart_pods_policies_open_the_gateway_and_fence_the_operator() -> None:
    assert not of_kind(render(None, "networkPolicy.enabled=true"), "NetworkPolicy")
    objs = render(None, "networkPolicy.chartPods.enabled=true")
    workloads = deployments(objs)
    for component, name in (("operator", "llm-operator"), ("gateway", "llm-operator-gateway")):
        policy = one(objs, "NetworkPolicy", name)
        template = workloads[component]["spec"]["template"]
        assert policy["spec"]["podSelector"] == workloads[component]["spec"]["selector"]
        assert policy["spec"]["policyTypes"] == ["Ingress"]
        [rule] = policy["spec"]["ingress"]
        [container] = template["spec"]["containers"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        if component == "gateway":
            assert rule == {"ports": [{"protocol": "TCP", "port": ports["http"]}]}  # anyone
        else:
            assert rule["ports"] == [{"protocol": "TCP", "port": ports["metrics"]}]
            assert rule["from"] == [
                {
                    "namespaceSelector": {
                        "matchLabels": {"kubernetes.io/metadata.name": "monitoring"}
                    },
                    "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
                }
            ]
    no_gateway = render(None, "networkPolicy.chartPods.enabled=true", "gateway.enabled=false")
    assert [p["metadata"]["name"] for p in of_kind(no_gateway, "NetworkPolicy")] == ["llm-operator"]
