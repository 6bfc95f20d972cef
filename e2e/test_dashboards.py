"""Every panel query of the generated Grafana dashboards returns data from the e2e Prometheus
while the chart serves a model under load on the local cluster.

The queries are the dashboards' own text (charts/llm-operator/files/dashboards/*.json) with the
template variables substituted as Grafana would: the namespace and LLMDeployment of this test,
`model` from the dashboard's own variable query, `$__rate_interval` and `$__range` as fixed
windows. Two queries end in `or on () vector(0)` and so always answer: fallback steps (the
gateway has no such series until a first fallback, so zero is the truth) and FallbackActive
(the condition exists only with spec.routing.fallbacks; this model has none, so it is not
active). Everything else answers only from real series.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import urllib3
from kubernetes import client

from harness import kube
from harness.providers import Cluster
from harness.serving import (
    GATEWAY_PORT,
    Load,
    Serving,
    host_prometheus_url,
    installed,
    llmd,
    pod_prometheus_url,
    reach,
)
from llm_operator_dev import dashboards

REPO = Path(__file__).resolve().parents[1]
FILES = sorted((REPO / dashboards.DASHBOARD_DIR).glob("*.json"))
# Grafana's $__rate_interval is at least four scrape intervals; the local Prometheus scrapes
# every 2 s, and a minute leaves room for a slow machine.
RATE_INTERVAL = "1m"
RANGE = "10m"
NAME = "dash"


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url
        self.http = urllib3.PoolManager()

    def query(self, expr: str) -> list[dict[str, Any]]:
        reply = self.http.request("GET", f"{self.url}/api/v1/query", fields={"query": expr})
        body = json.loads(reply.data)
        assert body["status"] == "success", (expr, body)
        result: list[dict[str, Any]] = body["data"]["result"]
        return result


@pytest.fixture(scope="module")
def prometheus(cluster: Cluster) -> Prometheus:
    url = host_prometheus_url(cluster)
    if url is None:
        pytest.skip("no Prometheus: set LLMOP_PROMETHEUS_URL (the local cluster runs its own)")
    return Prometheus(url)


@pytest.fixture(scope="module")
def serving(
    cluster: Cluster, api_client: client.ApiClient, crd_names: list[str], tmp_path_factory: Any
) -> Iterator[Serving]:
    url = pod_prometheus_url(cluster)
    values = [f"operator.prometheusUrl={url}"] if url else []
    home = tmp_path_factory.mktemp("helm-home")
    with installed(cluster, api_client, home, "dashboards", *values) as s:
        yield s


def label_values(prometheus: Prometheus, query: str) -> list[str]:
    """Grafana's `label_values(selector, label)` variable query, through the query API."""
    match = re.fullmatch(r"label_values\((.+), (\w+)\)", query)
    assert match, query
    selector, label = match.groups()
    return sorted({r["metric"][label] for r in prometheus.query(selector) if label in r["metric"]})


def substitute(text: str, variables: dict[str, str]) -> str:
    text = text.replace("$__rate_interval", RATE_INTERVAL).replace("$__range", RANGE)
    for name, value in sorted(variables.items(), key=lambda kv: -len(kv[0])):
        text = text.replace(f"${name}", value)
    return text


def resolve(
    prometheus: Prometheus, data: dict[str, Any], fixed: dict[str, str]
) -> dict[str, str] | None:
    """The dashboard's query variables in order, each from its own query (as Grafana does);
    `fixed` picks the value among the options for the ones a person chooses; None until every
    one has its value among the options."""
    values: dict[str, str] = {}
    for variable in data["templating"]["list"]:
        if variable["type"] != "query":
            continue
        options = label_values(prometheus, substitute(variable["query"]["query"], values))
        name = variable["name"]
        value = fixed.get(name, options[0] if options else "")
        if value not in options:
            return None
        values[name] = value
    return values


def panel_queries(data: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        (f"{panel['title']} [{target['refId']}]", target["expr"])
        for panel in data["panels"]
        if panel["type"] != "row"
        for target in panel["targets"]
    ]


def test_every_panel_query_returns_data(serving: Serving, prometheus: Prometheus) -> None:
    serving.apply(llmd(NAME, replicas=2))
    serving.wait_ready(NAME, timeout=180)
    fixed = {"namespace": serving.namespace, "llmdeployment": NAME}
    with reach(serving.cluster, serving.gateway_pod(), GATEWAY_PORT) as base:
        serving.wait_routed(base, NAME)
        with Load(base, NAME, clients=4) as load:
            load.wait_for_requests(100, timeout=120)
            # One variable resolution per dashboard, as a person opening it gets.
            answered: dict[str, int] = {}
            empty: list[str] = []
            for path in FILES:
                data = json.loads(path.read_text())
                variables = kube.wait_until(
                    f"the variables of {path.name}",
                    lambda data=data: resolve(prometheus, data, fixed),
                    timeout=60,
                    interval=2,
                )
                if "model" in variables:
                    assert variables["model"] == NAME  # the served name, from the info gauge
                for title, expr in panel_queries(data):
                    query = substitute(expr, variables)
                    assert "$" not in query.replace("$1", ""), query
                    try:
                        result = kube.wait_until(
                            f"{path.name}: {title}",
                            lambda query=query: prometheus.query(query) or None,
                            timeout=60,
                            interval=2,
                        )
                    except kube.Timeout:
                        empty.append(f"{path.name}: {title}: {query}")
                    else:
                        answered[f"{path.name}: {title}"] = len(result)
            assert not load.failures, load.failures[:3]
    assert not empty, "panel queries with no data:\n" + "\n".join(empty)
    assert len(answered) == sum(len(panel_queries(json.loads(p.read_text()))) for p in FILES)
