"""The LLMDeployment CRD, as a real API server sees it.

- it is accepted and Established, with the agreed names;
- every sample in ``manifests/samples/`` is accepted, and stored without losing a field (a field
  the schema does not know would be silently pruned);
- every invalid spec of ``tests/api/invalid_cases.yaml`` that the CEL rules cover (``cel: true``)
  is rejected with that rule's message;
- ``kubectl explain`` shows the field descriptions the models carry.

Until the CRD exists in ``crds/``, these tests skip and say so.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, cast

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from harness import kube
from harness.providers import Cluster

REPO = Path(__file__).resolve().parents[1]
CRD_PATH = REPO / "crds" / "llmdeployments.llmoperator.io.yaml"
SAMPLES = sorted((REPO / "manifests" / "samples").glob("*.yaml"))
CASES_PATH = REPO / "tests" / "api" / "invalid_cases.yaml"

pytestmark = pytest.mark.skipif(not CRD_PATH.exists(), reason=f"{CRD_PATH} does not exist yet")


def _crd() -> dict[str, Any]:
    return yaml.safe_load(CRD_PATH.read_text())  # type: ignore[no-any-return]


def _group_version_plural() -> tuple[str, str, str]:
    crd = _crd()
    version = next(v["name"] for v in crd["spec"]["versions"] if v.get("storage"))
    return crd["spec"]["group"], version, crd["spec"]["names"]["plural"]


def merge(base: Any, override: Any) -> Any:
    """The table's merge: mappings merge key by key, anything else (lists too) replaces."""
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for key, value in override.items():
            out[key] = merge(base.get(key), value) if key in base else copy.deepcopy(value)
        return out
    return copy.deepcopy(override)


def _invalid_cases() -> list[Any]:
    if not CASES_PATH.exists():
        return [pytest.param(None, id="no-table", marks=pytest.mark.skip(f"{CASES_PATH} absent"))]
    table = yaml.safe_load(CASES_PATH.read_text())
    # CEL cases carry the rule's own message; the schema's (bounds, patterns, enums, unknown
    # fields) come back in the API server's words, given as serverMessage.
    params = [
        pytest.param(
            merge(table["base"], {"spec": case["spec"]}),
            case["message"] if case.get("cel") else case["serverMessage"],
            id=case["name"],
        )
        for case in table["cases"]
        if case.get("cel") or case.get("serverMessage")
    ]
    return params or [pytest.param(None, None, id="none", marks=pytest.mark.skip("no cel cases"))]


def _leaves(node: Any, path: str = "") -> list[str]:
    """Every leaf path of a spec (``a.b[0].c``), to compare what was sent with what is stored."""
    if isinstance(node, dict):
        return [leaf for k, v in node.items() for leaf in _leaves(v, f"{path}.{k}")] or [path]
    if isinstance(node, list):
        return [leaf for i, v in enumerate(node) for leaf in _leaves(v, f"{path}[{i}]")] or [path]
    return [path]


def test_the_crd_is_established_with_the_agreed_names(
    api_client: client.ApiClient, crd_names: list[str]
) -> None:
    name = _crd()["metadata"]["name"]
    assert name in crd_names
    read = client.ApiextensionsV1Api(api_client).read_custom_resource_definition(name)
    crd = kube.as_dict(api_client, read)
    assert kube.crd_established(api_client, name)
    names = crd["spec"]["names"]
    assert crd["spec"]["group"] == "llmoperator.io"
    assert (names["kind"], names["plural"]) == ("LLMDeployment", "llmdeployments")
    assert "llmd" in names.get("shortNames", [])
    assert "llm" in names.get("categories", [])
    assert [v["name"] for v in crd["spec"]["versions"] if v["served"]] == ["v1alpha1"]
    assert crd["status"]["acceptedNames"]["kind"] == "LLMDeployment"


@pytest.mark.parametrize("sample", SAMPLES, ids=[p.stem for p in SAMPLES])
def test_every_sample_is_accepted_and_stored_whole(
    api_client: client.ApiClient, crd_names: list[str], namespace: str, sample: Path
) -> None:
    group, version, plural = _group_version_plural()
    for doc in kube.load_yaml_documents(sample):
        if doc.get("kind") != "LLMDeployment":
            continue
        doc = copy.deepcopy(doc)
        doc["metadata"].pop("namespace", None)
        created = cast(
            dict[str, Any],
            client.CustomObjectsApi(api_client).create_namespaced_custom_object(
                group, version, namespace, plural, doc
            ),
        )
        # Pruning drops unknown fields without an error: compare what came back.
        missing = sorted(set(_leaves(doc["spec"])) - set(_leaves(created["spec"])))
        assert not missing, f"{sample.name}: the API server pruned {missing}"


@pytest.mark.parametrize(("body", "message"), _invalid_cases())
def test_cel_rules_reject_invalid_specs_with_their_message(
    api_client: client.ApiClient, crd_names: list[str], body: dict[str, Any], message: str
) -> None:
    group, version, plural = _group_version_plural()
    # A server-side dry run validates everything (schema, CEL) and stores nothing, so these
    # cases need no namespace of their own.
    with pytest.raises(ApiException) as rejected:
        client.CustomObjectsApi(api_client).create_namespaced_custom_object(
            group, version, "default", plural, body, dry_run="All", field_validation="Strict"
        )
    body_text = str(rejected.value.body)
    assert rejected.value.status in (400, 422), body_text
    assert message in body_text, body_text


def test_the_valid_base_of_the_table_is_accepted(
    api_client: client.ApiClient, crd_names: list[str]
) -> None:
    """Guards the table itself: if its base were invalid, every rejection would prove nothing."""
    if not CASES_PATH.exists():
        pytest.skip(f"{CASES_PATH} absent")
    group, version, plural = _group_version_plural()
    body = yaml.safe_load(CASES_PATH.read_text())["base"]
    client.CustomObjectsApi(api_client).create_namespaced_custom_object(
        group, version, "default", plural, body, dry_run="All"
    )


def test_kubectl_explain_shows_the_field_descriptions(
    cluster: Cluster, crd_names: list[str]
) -> None:
    kubectl = cluster.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not available for this cluster")
    spec = _crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    fields = {name: prop.get("description", "") for name, prop in spec["properties"].items()}
    assert fields, "the CRD's spec has no properties"

    def explained() -> str | None:
        # The published OpenAPI of a new CRD can lag its Established condition by a moment.
        result = kube.run([kubectl, "explain", "llmdeployment.spec"], cluster.env())
        return result.stdout if result.returncode == 0 and "FIELDS" in result.stdout else None

    text = " ".join(kube.wait_until("kubectl explain llmdeployment.spec", explained).split())
    assert "KIND: LLMDeployment" in text
    for name, description in fields.items():
        assert f" {name} " in f" {text} ", f"explain does not list spec.{name}"
        # kubectl wraps descriptions; compare the first words, whitespace-normalised.
        first_words = " ".join(description.split()[:6])
        assert first_words in text, f"explain does not show the description of spec.{name}"
