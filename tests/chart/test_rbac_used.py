"""Security check (issue 17): every RBAC rule the chart grants the operator is one it uses.

The dev cluster's API server runs without an audit log (no --audit-log-path in
llm_operator_dev's devcluster), and it is not restarted for this, so the calls are derived
from the code instead: the operator's own client (kube/client.py: each method is one HTTP
verb on one path shape), the kinds it owns and watches (kube/resources.py, the informers),
and what kopf does with the resource it handles (list, watch, patch of its finalizer and
annotations, core/v1 Events posted). `USED` is that list, each entry with where it comes from;
the tests check the code still has each of those calls, that the chart grants every one, and
that the chart grants nothing else except the rules in `NOT_SEEN` — granted today though no
code path makes them. That list is a finding for the chart's owner, not a waiver: a new rule
that nothing uses fails here, and a rule taken off NOT_SEEN must leave the chart too.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import kopf._cogs.clients.events as kopf_events
import kopf._cogs.structs.references as kopf_references

from llm_operator.kube import client as kube_client
from llm_operator.kube import resources
from tests.chart.test_chart import OPERATOR_NAMESPACED, Rule

OPERATOR = Path(kube_client.__file__).resolve().parents[1]

#: (group, resource) -> verb -> where the call is made.
_children = {
    (k.group, k.plural): {
        "create": "KubeClient.apply (server-side apply creates what is missing)",
        "patch": "KubeClient.apply / KubeClient.replace_pod_template",
        "delete": "KubeClient.delete (prune, UID precondition)",
        "list": "informer list_page (controller/watches.py, every CHILD_KINDS)",
        "watch": "informer watch=true (controller/informer.py)",
    }
    for k in resources.CHILD_KINDS
    if k.kind not in resources.OPTIONAL_KINDS
}
USED: dict[tuple[str, str], dict[str, str]] = {
    **_children,
    ("llmoperator.io", "llmdeployments"): {
        "get": "KubeClient.get_llmdeployment",
        "list": "kopf and controller/watches.py list_page(LLMDEPLOYMENT)",
        "watch": "kopf's watch of the handled resource",
        "patch": "kopf (finalizer, progress annotations); KubeClient.annotate",
    },
    ("llmoperator.io", "llmdeployments/status"): {"patch": "KubeClient.patch_status"},
    ("", "pods"): {"list": "KubeClient.list_pods", "delete": "KubeClient.delete_pod (stalls)"},
    ("", "secrets"): {"get": "KubeClient.get_secret (fallback apiKeySecretRef, by name)"},
    ("", "events"): {"create": "KubeClient.post_event and kopf's post_event (POST core/v1)"},
}
USED[("", "configmaps")]["get"] = "KubeClient.get_configmap (the routing table)"

#: Granted by the chart's operatorRules, with no call in the operator or in kopf that needs it.
#: Empty: the eight found here (get on the children and on status, patch on Events, the
#: events.k8s.io API) were taken out of the chart, and the whole suite passes without them.
NOT_SEEN: set[Rule] = set()

_VERB_OF_METHOD = {"GET": "get", "POST": "create", "PATCH": "patch", "DELETE": "delete"}


def used_rules() -> set[Rule]:
    return {(g, r, verb, "") for (g, r), verbs in USED.items() for verb in verbs}


def test_the_operator_client_still_makes_each_call() -> None:
    source = inspect.getsource(kube_client)
    for method, verb in (
        ("apply", "PATCH"),
        ("replace_pod_template", "PATCH"),
        ("delete", "DELETE"),
        ("list_page", "GET"),
        ("list_pods", "GET"),
        ("delete_pod", "DELETE"),
        ("patch_status", "PATCH"),
        ("get_llmdeployment", "GET"),
        ("post_event", "POST"),
        ("get_secret", "GET"),
        ("get_configmap", "GET"),
    ):
        body = inspect.getsource(getattr(kube_client.KubeClient, method))
        assert f'"{verb}"' in body or f"'{verb}'" in body, f"KubeClient.{method} no longer {verb}s"
    # Every HTTP verb the client uses is one of those accounted for above.
    assert set(re.findall(r'"(GET|POST|PUT|PATCH|DELETE)"', source)) <= set(_VERB_OF_METHOD)
    watches = (OPERATOR / "controller" / "watches.py").read_text()
    assert "for kind in CHILD_KINDS" in watches and "list_page(LLMDEPLOYMENT" in watches
    assert '("watch", "true")' in (OPERATOR / "controller" / "informer.py").read_text()
    # kopf posts its Events to core/v1 only.
    assert kopf_references.EVENTS.group == "" and kopf_references.EVENTS.any_name == "events"
    assert "api.post(" in inspect.getsource(kopf_events)
    assert "api.patch(" not in inspect.getsource(kopf_events)


def test_the_chart_grants_every_call_the_operator_makes() -> None:
    missing = used_rules() - OPERATOR_NAMESPACED
    assert not missing, f"calls the chart does not grant: {sorted(missing)}"


def test_the_chart_grants_nothing_the_operator_does_not_use() -> None:
    unused = OPERATOR_NAMESPACED - used_rules()
    assert unused == NOT_SEEN, (
        f"granted, no call needs it: {sorted(unused - NOT_SEEN)}; "
        f"listed as unused but no longer granted (drop from NOT_SEEN): {sorted(NOT_SEEN - unused)}"
    )
