"""Each failure-injection mode, as a client sees it."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.sim.conftest import FAST_ARGS, MODEL
from tests.support.sim import SimProcess, run_sims, start_sim

MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]


def _chat(client: openai.OpenAI, fail: str | None = None, **kwargs: Any) -> Any:
    """A small chat request, optionally with `x-sim-fail: <fail>`."""
    kwargs.setdefault("max_tokens", 3)
    headers = {"x-sim-fail": fail} if fail else None
    return client.chat.completions.create(
        model="sim-llama", messages=MESSAGES, extra_headers=headers, **kwargs
    )


def test_header_forces_500(client: openai.OpenAI) -> None:
    with pytest.raises(openai.InternalServerError) as err:
        _chat(client, "500")
    assert err.value.status_code == 500
    assert err.value.body == {
        "message": "Simulated failure: 500 Internal Server Error",
        "type": "Internal Server Error",
        "param": None,
        "code": 500,
    }


def test_header_forces_429_with_retry_after(client: openai.OpenAI) -> None:
    with pytest.raises(openai.RateLimitError) as err:
        _chat(client, "429")
    assert err.value.status_code == 429
    assert err.value.response.headers["retry-after"] == "1"


def test_header_forces_any_error_status(client: openai.OpenAI) -> None:
    with pytest.raises(openai.APIStatusError) as err:
        _chat(client, "503")
    assert err.value.status_code == 503


def test_header_hang_never_answers(sim: SimProcess) -> None:
    client = openai.OpenAI(base_url=sim.openai_url, api_key="x", max_retries=0, timeout=0.5)
    start = time.monotonic()
    with pytest.raises(openai.APITimeoutError):
        _chat(client, "hang")
    assert time.monotonic() - start >= 0.5
    # The hung request held a running slot until the client gave up, then was aborted.
    _wait_for(lambda: sim.metric("vllm:num_requests_running") == 0)
    assert sim.metric("vllm:request_success_total", {"finished_reason": "abort"}) >= 1


def test_header_disconnect_drops_the_connection_before_any_answer(client: openai.OpenAI) -> None:
    with pytest.raises(openai.APIConnectionError):
        _chat(client, "disconnect")


@pytest.mark.parametrize("events", [1, 3])
def test_header_disconnect_after_n_stream_events(client: openai.OpenAI, events: int) -> None:
    stream = _chat(client, f"disconnect-after:{events}", stream=True, max_tokens=20)
    got = []
    with pytest.raises((httpx.RemoteProtocolError, openai.APIError)):
        for chunk in stream:
            got.append(chunk)
    # The role chunk counts as the first event.
    assert len(got) == events
    assert got[0].choices[0].delta.role == "assistant"


def test_header_disconnect_after_0_sends_headers_only(sim: SimProcess) -> None:
    with (
        httpx.Client(timeout=5) as http,
        http.stream(
            "POST",
            f"{sim.openai_url}/chat/completions",
            json={"model": "sim-llama", "messages": MESSAGES, "stream": True},
            headers={"x-sim-fail": "disconnect-after:0"},
        ) as resp,
    ):
        assert resp.status_code == 200
        with pytest.raises(httpx.RemoteProtocolError):
            resp.read()


def test_header_disconnect_after_n_tokens_without_streaming(client: openai.OpenAI) -> None:
    with pytest.raises(openai.APIConnectionError):
        _chat(client, "disconnect-after:2", max_tokens=10)


def test_bad_fail_header_is_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="x-sim-fail"):
        _chat(client, "explode")


def test_error_rates_change_at_run_time(fresh_sim: SimProcess, client: openai.OpenAI) -> None:
    state = fresh_sim.admin(error_rate_500=1.0)
    assert state["error_rate_500"] == 1.0
    for _ in range(3):
        with pytest.raises(openai.InternalServerError):
            _chat(client)
    fresh_sim.admin(error_rate_500=0, error_rate_429=1.0, retry_after=7)
    with pytest.raises(openai.RateLimitError) as err:
        _chat(client)
    assert err.value.response.headers["retry-after"] == "7"
    fresh_sim.admin(error_rate_429=0)
    _chat(client)  # healthy again


def test_partial_error_rate_fails_about_that_share(
    fresh_sim: SimProcess, client: openai.OpenAI
) -> None:
    fresh_sim.admin(error_rate_500=0.5)
    failures = 0
    for _ in range(200):
        try:
            _chat(client, max_tokens=1)
        except openai.InternalServerError:
            failures += 1
    # Binomial(200, 0.5): 60..140 holds with probability 1 - 1e-8.
    assert 60 <= failures <= 140


def test_hang_mode_keeps_health_up_and_produces_nothing(
    fresh_sim: SimProcess, client: openai.OpenAI
) -> None:
    fresh_sim.admin(hang=True)
    slow = openai.OpenAI(base_url=fresh_sim.openai_url, api_key="x", max_retries=0, timeout=0.4)
    with pytest.raises(openai.APITimeoutError):
        _chat(slow)
    assert fresh_sim.health() == 200
    # Resume: a request waiting during the hang now completes.
    stream = _chat(client, stream=True, max_tokens=2)
    time.sleep(0.2)
    assert fresh_sim.metric("vllm:num_requests_waiting") >= 1
    fresh_sim.admin(hang=False)
    chunks = list(stream)
    assert chunks[-1].choices[0].finish_reason == "length"


def test_health_can_be_forced_down(fresh_sim: SimProcess) -> None:
    fresh_sim.admin(health_status=503)
    assert fresh_sim.health() == 503
    fresh_sim.admin(health_status=None)
    assert fresh_sim.health() == 200


def test_admin_refuses_unknown_fields_and_bad_values(fresh_sim: SimProcess) -> None:
    for payload in ({"error_rate_501": 1}, {"error_rate_500": 2}, {"health_status": "bad"}):
        status, body = _admin_raw(fresh_sim, payload)
        assert status == 400, payload
        assert json.loads(body)["error"]["code"] == 400
    assert fresh_sim.admin()["error_rate_500"] == 0  # nothing half-applied


def test_startup_delay_answers_503_until_loaded() -> None:
    sim = start_sim(MODEL, served_name="m", args=[*FAST_ARGS, "--sim-startup-delay", "1.0"],
                    wait_ready=False)  # fmt: skip
    try:
        assert sim.health() == 503
        client = openai.OpenAI(base_url=sim.openai_url, api_key="x", max_retries=0)
        with pytest.raises(openai.APIStatusError) as err:
            client.completions.create(model="m", prompt="x", max_tokens=1)
        assert err.value.status_code == 503
        t0 = time.monotonic()
        sim.wait_healthy(timeout=5)
        assert time.monotonic() - t0 < 2.5  # ready on its own, about when configured
        assert client.completions.create(model="m", prompt="x", max_tokens=1).choices
    finally:
        sim.stop()


def test_failures_configured_by_environment() -> None:
    env = {"LLMOP_SIM_ERROR_RATE_429": "1", "LLMOP_SIM_RETRY_AFTER": "3"}
    with run_sims(1, MODEL, served_name="m", args=FAST_ARGS, env=env) as (sim,):
        client = openai.OpenAI(base_url=sim.openai_url, api_key="x", max_retries=0)
        with pytest.raises(openai.RateLimitError) as err:
            client.completions.create(model="m", prompt="x", max_tokens=1)
        assert err.value.response.headers["retry-after"] == "3"
        assert sim.admin()["error_rate_429"] == 1.0


def _stream_events(sim: SimProcess, path: str, body: dict[str, Any]) -> tuple[list[Any], bool]:
    """The data events of a stream, and whether it ended properly."""
    got: list[Any] = []
    with (
        httpx.Client(timeout=5) as http,
        http.stream("POST", sim.openai_url + path, json=body) as resp,
    ):
        assert resp.status_code == 200
        try:
            for line in resp.iter_lines():
                if line.startswith("data: "):
                    data = line[6:]
                    got.append(data if data == "[DONE]" else json.loads(data))
        except httpx.RemoteProtocolError:
            return got, False
    return got, True


def test_disconnect_after_by_admin_and_environment(fresh_sim: SimProcess) -> None:
    body = {"model": "sim-llama", "messages": MESSAGES, "stream": True, "max_tokens": 20}
    assert fresh_sim.admin(disconnect_after=3)["disconnect_after"] == 3
    try:
        got, ended = _stream_events(fresh_sim, "/chat/completions", body)
        assert (len(got), ended) == (3, False)
    finally:
        assert fresh_sim.admin(disconnect_after=None)["disconnect_after"] is None
    got, ended = _stream_events(fresh_sim, "/chat/completions", body)
    assert ended and got[-1] == "[DONE]"
    assert _admin_raw(fresh_sim, {"disconnect_after": -1})[0] == 400
    env = {"LLMOP_SIM_DISCONNECT_AFTER": "2"}
    with run_sims(1, MODEL, served_name="m", args=FAST_ARGS, env=env) as (sim,):
        prompt = {"model": "m", "prompt": "x", "stream": True, "max_tokens": 9}
        got, ended = _stream_events(sim, "/completions", prompt)
        assert (len(got), ended) == (2, False)


def test_a_seeded_answer_continues_where_it_was_cut(sim: SimProcess) -> None:
    # Long answers; the same seed gives the same answer, and a continuation of its first
    # k tokens (max_tokens lowered by k, as the gateway does) is the rest of it.
    sim.admin(output_tokens=30)
    try:
        for seed in (1, 2, 3):
            whole = {"model": "sim-llama", "messages": MESSAGES, "stream": True, "seed": seed}
            ref, _ = _stream_events(sim, "/chat/completions", whole)
            tokens = [c["choices"][0]["delta"].get("content", "") for c in ref if c != "[DONE]"]
            finish = ref[-2]["choices"][0]["finish_reason"]
            assert finish == "stop" and len(tokens) > 10
            k = 6  # the role chunk and 5 tokens went out
            text = "".join(tokens[:k])
            rest = {
                **whole,
                "messages": [*MESSAGES, {"role": "assistant", "content": text}],
                "continue_final_message": True,
                "add_generation_prompt": False,
            }
            got, _ = _stream_events(sim, "/chat/completions", rest)
            more = [c["choices"][0]["delta"].get("content", "") for c in got[1:] if c != "[DONE]"]
            assert more == tokens[k:]
            assert got[-2]["choices"][0]["finish_reason"] == "stop"
        prompt = {"model": "sim-llama", "prompt": "Go", "stream": True, "seed": 4, "max_tokens": 12}
        ref, _ = _stream_events(sim, "/completions", prompt)
        pieces = [c["choices"][0]["text"] for c in ref if c != "[DONE]"]
        cont = {**prompt, "prompt": "Go" + "".join(pieces[:5]), "max_tokens": 7}
        got, _ = _stream_events(sim, "/completions", cont)
        assert [c["choices"][0]["text"] for c in got if c != "[DONE]"] == pieces[5:]
        assert got[-2]["choices"][0]["finish_reason"] == ref[-2]["choices"][0]["finish_reason"]
    finally:
        sim.admin(output_tokens=8)


def test_continuous_usage_stats_count_every_chunk(sim: SimProcess) -> None:
    options = {"include_usage": True, "continuous_usage_stats": True}
    body = {
        "model": "sim-llama",
        "prompt": "hello",
        "stream": True,
        "max_tokens": 4,
        "stream_options": options,
    }
    got, _ = _stream_events(sim, "/completions", body)
    counts = [c["usage"]["completion_tokens"] for c in got if c != "[DONE]"]
    assert counts == [1, 2, 3, 4, 4]  # each token, then the final usage block
    chat = {**body, "messages": MESSAGES}
    del chat["prompt"]
    got, _ = _stream_events(sim, "/chat/completions", chat)
    counts = [c["usage"]["completion_tokens"] for c in got if c != "[DONE]"]
    assert counts == [0, 1, 2, 3, 4, 4]  # the role chunk says 0


def test_continue_final_message_needs_a_final_assistant_message(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="final assistant"):
        _chat(client, extra_body={"continue_final_message": True})
    with pytest.raises(openai.BadRequestError, match="Cannot set both"):
        client.chat.completions.create(
            model="sim-llama",
            messages=[*MESSAGES, {"role": "assistant", "content": "x"}],
            extra_body={"continue_final_message": True, "add_generation_prompt": True},
        )


def _admin_raw(sim: SimProcess, payload: object) -> tuple[int, bytes]:
    with httpx.Client(timeout=5) as http:
        resp = http.post(f"{sim.base_url}/sim/admin", json=payload)
        return resp.status_code, resp.content


def _wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError("condition not met in time")


def test_sigterm_lets_running_streams_finish_and_refuses_new_connections() -> None:
    sim = start_sim(MODEL, served_name="m", args=[*FAST_ARGS, "--sim-itl", "0.01"])
    try:
        client = openai.OpenAI(base_url=sim.openai_url, api_key="x", max_retries=0, timeout=10)
        stream = client.completions.create(
            model="m", prompt="x", max_tokens=40, stream=True, extra_body={"ignore_eos": True}
        )
        sim.proc.send_signal(signal.SIGTERM)  # ~0.4 s of tokens still to come
        texts = [chunk.choices[0].text for chunk in stream]
        assert len(texts) == 40
        with pytest.raises(openai.APIConnectionError):
            client.completions.create(model="m", prompt="x", max_tokens=1)
        assert sim.proc.wait(5) == 0
    finally:
        sim.stop()


def test_sigterm_does_not_wait_for_hung_requests() -> None:
    sim = start_sim(MODEL, served_name="m", args=FAST_ARGS)
    try:
        client = openai.OpenAI(base_url=sim.openai_url, api_key="x", max_retries=0, timeout=10)
        stream = client.completions.create(
            model="m", prompt="x", max_tokens=5, stream=True, extra_headers={"x-sim-fail": "hang"}
        )
        sim.admin(hang=True)
        start = time.monotonic()
        sim.proc.send_signal(signal.SIGTERM)
        assert sim.proc.wait(5) == 0
        assert time.monotonic() - start < 2  # not the 10 s drain timeout
        with pytest.raises((httpx.RemoteProtocolError, openai.APIError)):
            list(stream)
    finally:
        sim.stop()
