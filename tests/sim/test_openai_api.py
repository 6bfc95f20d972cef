"""The official OpenAI SDK works against the simulator unchanged; shapes match vLLM's."""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.sim.conftest import FAST_ARGS, MODEL, SERVED
from tests.sim.test_config import RENDERED
from tests.support.sim import SimProcess, start_sim

MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Say something."}]


def test_chat_completion(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(model="sim-llama", messages=MESSAGES, max_tokens=5)
    assert resp.object == "chat.completion"
    assert resp.id.startswith("chatcmpl-")
    assert resp.model == "sim-llama"
    choice = resp.choices[0]
    assert choice.finish_reason == "length"
    assert choice.message.role == "assistant"
    assert choice.message.content == " This is a simulated"  # 5 tokens
    assert resp.usage is not None
    assert resp.usage.completion_tokens == 5
    # "Say something." is 14 chars -> 4 tokens, plus the chat template's 4 + 3.
    assert resp.usage.prompt_tokens == 11
    assert resp.usage.total_tokens == 16


def test_alias_answers_with_the_first_served_name(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(model="llama-alias", messages=MESSAGES, max_tokens=1)
    assert resp.model == "sim-llama"


def test_answer_stops_on_its_own_below_max_tokens(client: openai.OpenAI) -> None:
    # --sim-output-tokens 8: natural answers are 4..12 tokens, ending in EOS.
    resp = client.chat.completions.create(model="sim-llama", messages=MESSAGES, max_tokens=100)
    assert resp.choices[0].finish_reason == "stop"
    assert resp.usage is not None
    assert 4 <= resp.usage.completion_tokens <= 12


def test_ignore_eos_runs_to_max_tokens(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(
        model="sim-llama", messages=MESSAGES, max_tokens=40, extra_body={"ignore_eos": True}
    )
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage is not None and resp.usage.completion_tokens == 40


def test_completion(client: openai.OpenAI) -> None:
    resp = client.completions.create(model="sim-llama", prompt="Once upon a time", max_tokens=3)
    assert resp.object == "text_completion"
    assert resp.id.startswith("cmpl-")
    assert resp.choices[0].text == " This is a"
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage is not None
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (4, 3)


def test_completion_defaults_to_16_tokens_like_vllm(client: openai.OpenAI) -> None:
    resp = client.completions.create(
        model="sim-llama", prompt=[1, 2, 3], extra_body={"ignore_eos": True}
    )
    assert resp.usage is not None
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (3, 16)


def test_chat_stream_with_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="sim-llama",
        messages=MESSAGES,
        max_tokens=4,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    # role chunk, 4 token chunks (the last with finish_reason), usage chunk
    assert len(chunks) == 6
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].choices[0].delta.content == ""
    text = "".join(c.choices[0].delta.content or "" for c in chunks[1:5])
    assert text == " This is a sim"
    assert [c.choices[0].finish_reason for c in chunks[1:5]] == [None, None, None, "length"]
    assert chunks[5].choices == []
    assert chunks[5].usage is not None
    assert chunks[5].usage.completion_tokens == 4
    assert chunks[5].usage.prompt_tokens == 11


def test_chat_stream_that_stops_ends_with_an_empty_eos_chunk(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model="sim-llama", messages=MESSAGES, max_tokens=100, stream=True
        )
    )
    last = chunks[-1].choices[0]
    assert last.finish_reason == "stop"
    assert last.delta.content == ""
    assert all(c.usage is None for c in chunks)


def test_completion_stream(client: openai.OpenAI) -> None:
    chunks = list(
        client.completions.create(model="sim-llama", prompt="Hello", max_tokens=3, stream=True)
    )
    assert [c.choices[0].text for c in chunks] == [" This", " is", " a"]
    assert [c.choices[0].finish_reason for c in chunks] == [None, None, "length"]


def test_raw_stream_is_vllm_shaped_sse(sim: SimProcess) -> None:
    status, headers, body = _post(
        sim,
        "/v1/chat/completions",
        {"model": "sim-llama", "messages": MESSAGES, "max_tokens": 2, "stream": True},
    )
    assert status == 200
    assert headers["content-type"].startswith("text/event-stream")
    assert headers["transfer-encoding"] == "chunked"
    events = body.decode().split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    first = json.loads(events[0].removeprefix("data: "))
    assert first["choices"] == [
        {
            "index": 0,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }
    ]
    last = json.loads(events[-3].removeprefix("data: "))
    assert last["choices"][0]["finish_reason"] == "length"
    assert last["choices"][0]["stop_reason"] is None


def test_unknown_model_is_404_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-nope", messages=MESSAGES)
    assert err.value.status_code == 404
    # The SDK unwraps vLLM's {"error": {...}} body.
    assert err.value.body == {
        "message": "The model `gpt-nope` does not exist.",
        "type": "NotFoundError",
        "param": "model",
        "code": 404,
    }


def test_prompt_over_max_model_len_is_400(client: openai.OpenAI) -> None:
    long_prompt = "word " * 500  # 2500 chars -> 625 tokens > 512
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="sim-llama", prompt=long_prompt)
    assert err.value.status_code == 400
    assert err.value.type == "BadRequestError"
    assert "maximum context length is 512 tokens" in err.value.message
    assert "your request has 625 input tokens" in err.value.message


def test_max_tokens_beyond_context_is_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="'max_tokens' or 'max_completion_tokens'"):
        client.chat.completions.create(model="sim-llama", messages=MESSAGES, max_tokens=600)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b'{"model": "sim-llama", "messages": [', "JSON decode error"),
        (b"[1, 2]", "valid dictionary"),
        (b'{"model": "sim-llama"}', "messages"),
        (b'{"model": "sim-llama", "messages": [{"role": "user"}], "max_tokens": "x"}', "integer"),
    ],
)
def test_malformed_or_invalid_json_is_400_with_vllm_error_body(
    sim: SimProcess, raw: bytes, message: str
) -> None:
    status, _, body = _post_raw(sim, "/v1/chat/completions", raw)
    assert status == 400
    error = json.loads(body)["error"]
    assert error["code"] == 400
    assert error["type"] == "Bad Request"
    assert set(error) == {"message", "type", "param", "code"}
    assert message in error["message"]


def test_non_json_content_type_is_refused(sim: SimProcess) -> None:
    status, _, body = _post_raw(sim, "/v1/completions", b"prompt=hi", "text/plain")
    assert status == 400
    assert "application/json" in json.loads(body)["error"]["message"]


def test_models_lists_the_served_names(client: openai.OpenAI) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == SERVED
    assert all(m.owned_by == "vllm" for m in models.data)
    assert models.data[0].model_extra is not None
    assert models.data[0].model_extra["root"] == MODEL
    assert models.data[0].model_extra["max_model_len"] == 512


def test_health_version_and_unknown_path(sim: SimProcess) -> None:
    assert sim.get("/health") == (200, b"")
    status, body = sim.get("/version")
    assert status == 200 and json.loads(body)["version"] == "0.11.0"
    status, body = sim.get("/v2/nothing")
    assert (status, json.loads(body)) == (404, {"detail": "Not Found"})
    status, _ = _post_raw(sim, "/v1/models", b"{}")[:2]
    assert status == 405


def test_keep_alive_serves_many_requests_on_one_connection(sim: SimProcess) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", sim.port, timeout=5)
    try:
        for _ in range(3):
            conn.request("GET", "/health")
            resp = conn.getresponse()
            resp.read()
            assert resp.status == 200
        body = json.dumps({"model": "sim-llama", "prompt": "x", "max_tokens": 1})
        conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200 and json.loads(resp.read())["usage"]["completion_tokens"] == 1
    finally:
        conn.close()


def test_http_requests_total_counts_by_handler_and_status_class(
    sim: SimProcess, client: openai.OpenAI
) -> None:
    labels = {"handler": "/v1/completions", "method": "POST"}
    before_ok = sim.metric("http_requests_total", {**labels, "status": "2xx"})
    before_bad = sim.metric("http_requests_total", {**labels, "status": "4xx"})
    client.completions.create(model="sim-llama", prompt="x", max_tokens=1)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x", max_tokens=1)
    assert sim.metric("http_requests_total", {**labels, "status": "2xx"}) == before_ok + 1
    assert sim.metric("http_requests_total", {**labels, "status": "4xx"}) == before_bad + 1
    # vLLM's instrumentator leaves /health and /metrics out.
    assert sim.metric("http_requests_total", {"handler": "/health"}) == 0


def test_api_key_is_enforced_when_given() -> None:
    sim = start_sim(MODEL, served_name="m", args=[*FAST_ARGS, "--api-key", "s3cret"])
    try:
        bad = openai.OpenAI(base_url=sim.openai_url, api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        good = openai.OpenAI(base_url=sim.openai_url, api_key="s3cret", max_retries=0)
        assert [m.id for m in good.models.list().data] == ["m"]
        assert sim.health() == 200  # /health needs no key, as in vLLM
    finally:
        sim.stop()


def test_rendered_vllm_args_start_it_through_the_llm_operator_cli(tmp_path: Path) -> None:
    """The operator's rendered `vllm serve` args, unchanged, via `llm-operator sim`."""
    port_file = tmp_path / "port"
    args = list(RENDERED[2:])  # drop "vllm serve": the CLI takes the rest
    args[args.index("--port") + 1] = "0"
    args[args.index("--host") + 1] = "127.0.0.1"
    cmd = [sys.executable, "-m", "llm_operator.cli", "sim", "serve", *args]
    proc = subprocess.Popen(
        [*cmd, "--sim-port-file", str(port_file)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 15
        while not port_file.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert port_file.exists(), proc.stdout.read().decode() if proc.stdout else ""
        port = int(port_file.read_text())
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["llama-70b"]
    finally:
        proc.terminate()
        output = proc.communicate(timeout=10)[0].decode()
    assert proc.returncode == 0
    assert "ignoring unknown flags: --some-future-flag=value" in output


def _post(sim: SimProcess, path: str, payload: object) -> tuple[int, dict[str, str], bytes]:
    return _post_raw(sim, path, json.dumps(payload).encode())


def _post_raw(
    sim: SimProcess, path: str, raw: bytes, content_type: str = "application/json"
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", sim.port, timeout=10)
    try:
        conn.request("POST", path, raw, {"Content-Type": content_type})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()
