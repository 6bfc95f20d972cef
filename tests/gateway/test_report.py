"""`report` passes the access log's fields by position: each lands in its own field."""

from __future__ import annotations

import io
import json

from llm_operator.api.gateway_config import GatewayConfig
from llm_operator.gateway.accesslog import AccessLog
from llm_operator.gateway.bodyscan import scan
from llm_operator.gateway.metrics import Histogram, Metrics
from llm_operator.gateway.report import report
from llm_operator.gateway.request import Call, Request
from llm_operator.gateway.routing import BackendRegistry, build_table


def test_report_fields_by_position() -> None:
    cfg = GatewayConfig.model_validate(
        {
            "models": [
                {
                    "name": "m",
                    "tracks": [{"name": "stable", "weight": 100, "addresses": ["127.0.0.1:1"]}],
                }
            ]
        }
    )
    table = build_table(cfg, BackendRegistry(), lambda f: None, clock=lambda: 0.0)
    model = table.models["m"]
    req = Request(b"POST", b"/v1/chat/completions?x=1", b"", None, b"{}", True, 0.0, "10.0.0.9")
    sc = scan(b'{"model":"m","stream":true}')
    call = Call(req, sc, model, "team-a", attempts=3, step_label="fb1", path=("fb1",))
    call.tokens_in, call.tokens_out = 11, 22
    out = io.StringIO()
    log = AccessLog(out)
    series = Metrics().target("m", "127.0.0.1:1", "stable")
    report(log, call, series, 201, "success", "127.0.0.1:1", "canary", "5xx", 1234, 0.5, 0.6, 0.1)
    log.flush()
    line = json.loads(out.getvalue())
    assert line["path"] == "/v1/chat/completions"
    assert line["model"] == "m"
    assert line["status"] == 201
    assert line["outcome"] == "success"
    assert line["backend"] == "127.0.0.1:1"
    assert line["track"] == "canary"
    assert line["attempts"] == 3
    assert line["failure"] == "5xx"
    assert line["fallback"] == "fb1"
    assert line["stream"] is True
    assert line["ttfb_ms"] == 500.0
    assert line["bytes"] == 1234
    assert line["tokens_in"] == 11
    assert line["tokens_out"] == 22
    assert line["fallback_path"] == ["fb1"]
    assert line["client"] == "team-a"
    assert line["peer"] == "10.0.0.9"
    assert line["duration_ms"] > 0
    assert series.outcomes["success"] == 1
    # The histograms `report` fills inline, as `Histogram.observe` would.
    expected = {"ttfb": 0.5, "ttft": 0.6, "tpot": 0.1}
    for name, v in expected.items():
        h = getattr(series, name)
        ref = Histogram(h.buckets)
        ref.observe(v)
        assert (h.counts, h.sum, h.count) == (ref.counts, ref.sum, ref.count), name
    assert series.total.count == 1
    assert abs(series.total.sum - line["duration_ms"] / 1000) < 1e-3
    assert sum(series.total.counts) == 1
