"""The OpenAI wire format as vLLM (0.10/0.11) writes it: request checks, bodies, SSE chunks.

Shapes follow vLLM's `vllm/entrypoints/openai` serving code:

- errors are `{"error": {"message", "type", "param", "code"}}` (the nested shape vLLM
  adopted in 0.10.2; before that it was flat with `"object": "error"`): 400
  `BadRequestError` for a prompt over max-model-len, 404 `NotFoundError` for an
  unknown model, 400 `"Bad Request"` for a body that is not valid JSON or fails
  validation (vLLM turns FastAPI's 422 into 400);
- a chat stream opens with a `{"role": "assistant", "content": ""}` delta, each token
  is one chunk, the last token's chunk carries `finish_reason` and `stop_reason`, an
  optional usage chunk has `"choices": []`, and `data: [DONE]` closes it;
- completion chunks are dumped in full (`"logprobs": null`, `"usage": null`, ...).

Token counts are estimates (about four characters per token, plus a few tokens of
chat template per message), which is all the scheduler and the metrics need.

Chunks are built from pre-encoded byte pieces (a per-request prefix and suffix around
a pre-escaped token) because formatting JSON per token would dominate the CPU cost
of 500 concurrent streams.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Any


def dumps(obj: Any) -> str:
    # Compact, as pydantic's model_dump_json (what vLLM uses) writes it.
    return json.dumps(obj, separators=(",", ":"))


CHARS_PER_TOKEN = 4
CHAT_TOKENS_PER_MESSAGE = 4  # role markers of a typical chat template
CHAT_TOKENS_PER_REPLY = 3  # the assistant header the template appends

_ANSWER = (
    "This is a simulated answer from the vLLM simulator. It has no GPU, so every token"
    " comes from a latency model that knows the prompt length, the batch size and a"
    " little jitter. The words mean nothing; the timing is the point."
)


def _split_tokens(text: str) -> tuple[str, ...]:
    """Words with their leading space, long ones cut in four-character pieces."""
    out: list[str] = []
    for word in text.split(" "):
        piece = " " + word
        while len(piece) > 6:
            out.append(piece[:4])
            piece = piece[4:]
        out.append(piece)
    return tuple(out)


# The simulated answer, cycled: tokens of about four characters, none needing JSON
# escaping, each pre-encoded once.
VOCAB: tuple[str, ...] = _split_tokens(_ANSWER)
VOCAB_JSON: tuple[bytes, ...] = tuple(dumps(t).encode() for t in VOCAB)
_CYCLE = "".join(VOCAB)
_BOUNDARY = {len("".join(VOCAB[:i])): i for i in range(len(VOCAB))}
"""Length of the answer's first i tokens (within one cycle) -> i."""


class RequestError(Exception):
    """A request vLLM would refuse: status code and OpenAI-style error fields."""

    def __init__(self, status: int, message: str, err_type: str, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.err_type = err_type
        self.param = param


def error_body(status: int, message: str, err_type: str, param: str | None = None) -> bytes:
    return dumps(
        {"error": {"message": message, "type": err_type, "param": param, "code": status}}
    ).encode()


def estimate_tokens(text: str) -> int:
    if not text:
        return 0
    return (len(text) + CHARS_PER_TOKEN - 1) // CHARS_PER_TOKEN


@dataclass
class GenRequest:
    """What the simulator needs from a chat or completion request."""

    chat: bool
    model: str | None
    prompt_tokens: int
    max_tokens: int | None
    min_tokens: int
    ignore_eos: bool
    stream: bool
    include_usage: bool
    continuous_usage: bool = False
    """`stream_options.continuous_usage_stats`: every chunk carries the usage so far."""
    offset: int = 0
    """Tokens of the answer already written (a continued answer): the prefix of a chat's
    final assistant message with `continue_final_message`, or the end of a completion's
    prompt. Generation goes on from there."""
    seed: int | None = None
    """The request's `seed`: the answer's length then depends only on it and the prompt."""
    length_key: str = ""
    """The prompt without the continued answer: with `seed`, what the length is drawn from."""


def _bad(message: str, param: str | None = None) -> RequestError:
    # vLLM answers pydantic validation failures with type "Bad Request".
    return RequestError(400, message, "Bad Request", param)


def parse_body(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as err:
        raise _bad(f"JSON decode error: {err}") from None
    if not isinstance(body, dict):
        raise _bad("Input should be a valid dictionary or object to extract fields from")
    return body


def _opt_int(body: dict[str, Any], key: str, minimum: int) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(f"{key}: Input should be a valid integer", key)
    if value < minimum:
        raise _bad(f"{key} must be at least {minimum}, got {value}.", key)
    result: int = value
    return result


def _opt_bool(body: dict[str, Any], key: str) -> bool:
    value = body.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _bad(f"{key}: Input should be a valid boolean", key)
    return value


def _common(
    body: dict[str, Any], chat: bool, prompt_tokens: int, offset: int = 0, length_key: str = ""
) -> GenRequest:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _bad("model: Input should be a valid string", "model")
    n = _opt_int(body, "n", 1)
    if n is not None and n != 1:
        raise _bad("the simulator supports n=1 only", "n")
    if chat:
        # max_completion_tokens replaces the deprecated max_tokens in chat.
        max_tokens = _opt_int(body, "max_completion_tokens", 1) or _opt_int(body, "max_tokens", 1)
    else:
        # vLLM's CompletionRequest defaults max_tokens to 16, as OpenAI's API did.
        max_tokens = _opt_int(body, "max_tokens", 1) if "max_tokens" in body else 16
    stream = _opt_bool(body, "stream")
    options = body.get("stream_options")
    include_usage = continuous = False
    if options is not None:
        if not isinstance(options, dict):
            raise _bad("stream_options: Input should be a valid dictionary", "stream_options")
        if not stream:
            raise _bad("Stream options can only be defined when `stream=True`.", "stream_options")
        include_usage = bool(options.get("include_usage", True))
        continuous = bool(options.get("continuous_usage_stats", False))
    return GenRequest(
        chat=chat,
        model=model,
        prompt_tokens=prompt_tokens,
        max_tokens=max_tokens,
        min_tokens=_opt_int(body, "min_tokens", 0) or 0,
        ignore_eos=_opt_bool(body, "ignore_eos"),
        stream=stream,
        include_usage=include_usage,
        continuous_usage=continuous,
        offset=offset,
        seed=_opt_int(body, "seed", -(1 << 63)),
        length_key=length_key,
    )


def parse_chat(body: dict[str, Any]) -> GenRequest:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages: Field required (a non-empty list)", "messages")
    tokens = 0
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise _bad(f"messages.{i}: each message needs a string role", "messages")
        tokens += CHAT_TOKENS_PER_MESSAGE + _content_tokens(message.get("content"), i)
    continue_final = _opt_bool(body, "continue_final_message")
    add_generation_prompt = body.get("add_generation_prompt")
    if add_generation_prompt is not None and not isinstance(add_generation_prompt, bool):
        raise _bad("add_generation_prompt: Input should be a valid boolean", "messages")
    offset = 0
    asked = messages
    if continue_final:
        if add_generation_prompt:
            raise _bad(
                "Cannot set both `continue_final_message` and `add_generation_prompt` to True."
            )
        last = messages[-1]
        if last.get("role") != "assistant":
            raise _bad("continue_final_message needs a final assistant message", "messages")
        offset = answer_offset(_content_text(last.get("content")))
        asked = messages[:-1]
    elif add_generation_prompt is not False:
        tokens += CHAT_TOKENS_PER_REPLY
    return _common(body, True, tokens, offset, dumps(asked))


def _content_text(content: Any) -> str:
    if isinstance(content, list):
        return "".join(p["text"] for p in content if isinstance(p.get("text"), str))
    return content if isinstance(content, str) else ""


def answer_offset(prefix: str) -> int:
    """How many tokens of the simulated answer `prefix` holds: exact when it is the
    answer's start (what an interrupted stream wrote), else estimated from its length."""
    if not prefix:
        return 0
    k = _answer_tokens(prefix)
    return k if k is not None else estimate_tokens(prefix)


def answer_suffix(prompt: str) -> int:
    """Tokens of the simulated answer that `prompt` ends with (a completion continued
    from its own text): the longest start of the answer the prompt ends with, or 0."""
    first = VOCAB[0]
    at = prompt.find(first)
    while at >= 0:
        k = _answer_tokens(prompt[at:])
        if k is not None:
            return k
        at = prompt.find(first, at + 1)
    return 0


def _answer_tokens(text: str) -> int | None:
    """k when `text` is exactly the answer's first k tokens, else None."""
    period = len(_CYCLE)
    if not text.startswith(_CYCLE[: min(len(text), period)]):
        return None
    laps, rest = divmod(len(text), period)
    if rest not in _BOUNDARY or text != _CYCLE * laps + _CYCLE[:rest]:
        return None
    return laps * len(VOCAB) + _BOUNDARY[rest]


def _content_tokens(content: Any, index: int) -> int:
    if content is None:
        return 0
    if isinstance(content, str):
        return estimate_tokens(content)
    if isinstance(content, list):
        total = 0
        for part in content:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                total += estimate_tokens(part["text"])
            elif not isinstance(part, dict):
                raise _bad(f"messages.{index}.content: invalid content part", "messages")
        return total
    raise _bad(f"messages.{index}.content: Input should be a string or a list", "messages")


def parse_completion(body: dict[str, Any]) -> GenRequest:
    prompt = body.get("prompt")
    text: str | None = None
    if isinstance(prompt, str):
        text = prompt
        tokens = estimate_tokens(prompt)
    elif isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        text = prompt[0]
        tokens = estimate_tokens(prompt[0])
    elif (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
    ):
        tokens = len(prompt)  # token ids
    elif (
        isinstance(prompt, list)
        and len(prompt) == 1
        and isinstance(prompt[0], list)
        and all(isinstance(t, int) for t in prompt[0])
    ):
        tokens = len(prompt[0])
    elif isinstance(prompt, list) and len(prompt) > 1:
        raise _bad("the simulator serves one prompt per request", "prompt")
    else:
        raise _bad("prompt: Field required (a string or a list of token ids)", "prompt")
    if tokens == 0:
        raise _bad("Prompt cannot be empty", "prompt")
    if text is None:
        return _common(body, False, tokens, 0, dumps(prompt))
    offset = answer_suffix(text)
    asked = text[: len(text) - len(answer_text(offset))] if offset else text
    return _common(body, False, tokens, offset, asked)


def check_length(req: GenRequest, max_model_len: int) -> int:
    """vLLM's context-length checks; returns the effective max_tokens."""
    if req.prompt_tokens >= max_model_len:
        raise RequestError(
            400,
            f"This model's maximum context length is {max_model_len} tokens. However, "
            f"your request has {req.prompt_tokens} input tokens. Please reduce the length "
            "of the input messages.",
            "BadRequestError",
        )
    if req.max_tokens is None:
        return max_model_len - req.prompt_tokens
    if req.prompt_tokens + req.max_tokens > max_model_len:
        raise RequestError(
            400,
            f"'max_tokens' or 'max_completion_tokens' is too large: {req.max_tokens}. "
            f"This model's maximum context length is {max_model_len} tokens and your "
            f"request has {req.prompt_tokens} input tokens ({req.max_tokens} > "
            f"{max_model_len} - {req.prompt_tokens}).",
            "BadRequestError",
            "max_tokens",
        )
    return req.max_tokens


def new_request_id(chat: bool, base: str | None = None) -> str:
    """vLLM's ids: a prefix plus the client's X-Request-Id, or a random hex id."""
    return ("chatcmpl-" if chat else "cmpl-") + (base or os.urandom(16).hex())


def answer_text(tokens: int, start: int = 0) -> str:
    """The answer's tokens `start` to `start + tokens`."""
    return "".join(VOCAB[i % len(VOCAB)] for i in range(start, start + tokens))


def _usage(prompt: int, completion: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt,
        "total_tokens": prompt + completion,
        "completion_tokens": completion,
        "prompt_tokens_details": None,
    }


def chat_response(
    request_id: str,
    model: str,
    created: int,
    prompt: int,
    completion: int,
    finish: str,
    start: int = 0,
) -> bytes:
    # A "stop" answer ends with EOS, which counts as a token but decodes to nothing.
    text_tokens = completion - 1 if finish == "stop" else completion
    return dumps(
        {
            "id": request_id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {
                        "role": "assistant",
                        "content": answer_text(text_tokens, start),
                        "refusal": None,
                        "annotations": None,
                        "audio": None,
                        "function_call": None,
                        "tool_calls": [],
                        "reasoning_content": None,
                    },
                    "logprobs": None,
                    "finish_reason": finish,
                    "stop_reason": None,
                }
            ],
            "service_tier": None,
            "system_fingerprint": None,
            "usage": _usage(prompt, completion),
            "prompt_logprobs": None,
            "kv_transfer_params": None,
        }
    ).encode()


def completion_response(
    request_id: str,
    model: str,
    created: int,
    prompt: int,
    completion: int,
    finish: str,
    start: int = 0,
) -> bytes:
    text_tokens = completion - 1 if finish == "stop" else completion
    return dumps(
        {
            "id": request_id,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "text": answer_text(text_tokens, start),
                    "logprobs": None,
                    "finish_reason": finish,
                    "stop_reason": None,
                    "prompt_logprobs": None,
                }
            ],
            "usage": _usage(prompt, completion),
            "kv_transfer_params": None,
        }
    ).encode()


class ChunkFormat:
    """Pre-encoded SSE pieces for one streaming request."""

    __slots__ = ("chat", "final_prefix", "head", "prefix", "suffix", "usage_prefix")

    def __init__(self, chat: bool, request_id: str, model_json: str, created: int) -> None:
        """`model_json` is the model name already JSON-encoded (it never changes)."""
        self.chat = chat
        # Formatted by hand: json.dumps with compact separators builds a new encoder
        # per call, which was a fifth of the cost of a request; plain json.dumps of a
        # string reuses the module's cached encoder.
        obj = "chat.completion.chunk" if chat else "text_completion"
        envelope = (
            f'{{"id":{json.dumps(request_id)},"object":"{obj}","created":{created},'
            f'"model":{model_json}'
        ).encode()
        self.usage_prefix = b"data: " + envelope + b',"choices":[],"usage":'
        if chat:
            self.head = (
                b"data: "
                + envelope
                + b',"choices":[{"index":0,"delta":{"role":"assistant","content":""},'
                b'"logprobs":null,"finish_reason":null}]}\n\n'
            )
            self.prefix = b"data: " + envelope + b',"choices":[{"index":0,"delta":{"content":'
            self.suffix = b'},"logprobs":null,"finish_reason":null}]}\n\n'
            self.final_prefix = self.prefix
        else:
            self.head = b""
            self.prefix = b"data: " + envelope + b',"choices":[{"index":0,"text":'
            self.suffix = (
                b',"logprobs":null,"finish_reason":null,"stop_reason":null}],"usage":null}\n\n'
            )
            self.final_prefix = self.prefix

    def token(self, index: int) -> bytes:
        return self.prefix + VOCAB_JSON[index % len(VOCAB_JSON)] + self.suffix

    def final(self, index: int, finish: str) -> bytes:
        text = b'""' if finish == "stop" else VOCAB_JSON[index % len(VOCAB_JSON)]
        if self.chat:
            tail = b'},"logprobs":null,"finish_reason":"%s","stop_reason":null}]}\n\n'
        else:
            tail = b',"logprobs":null,"finish_reason":"%s","stop_reason":null}],"usage":null}\n\n'
        return self.final_prefix + text + tail % finish.encode()

    def usage(self, prompt: int, completion: int) -> bytes:
        return self.usage_prefix + _usage_json(prompt, completion) + b"}\n\n"

    def with_usage(self, event: bytes, prompt: int, completion: int) -> bytes:
        """`event` with the usage so far (`continuous_usage_stats`), as vLLM writes it."""
        usage = _usage_json(prompt, completion)
        if self.chat:  # ...}]}\n\n -> ...}],"usage":{...}}\n\n
            return event[:-3] + b',"usage":' + usage + b"}\n\n"
        return event[: -len(b"null}\n\n")] + usage + b"}\n\n"  # "usage":null}


def _usage_json(prompt: int, completion: int) -> bytes:
    return dumps(
        {
            "prompt_tokens": prompt,
            "total_tokens": prompt + completion,
            "completion_tokens": completion,
        }
    ).encode()


DONE = b"data: [DONE]\n\n"


def models_response(served: list[str], root: str, max_model_len: int) -> bytes:
    created = int(time.time())
    return dumps(
        {
            "object": "list",
            "data": [
                {
                    "id": name,
                    "object": "model",
                    "created": created,
                    "owned_by": "vllm",
                    "root": root,
                    "parent": None,
                    "max_model_len": max_model_len,
                    "permission": [
                        {
                            "id": "modelperm-" + os.urandom(16).hex(),
                            "object": "model_permission",
                            "created": created,
                            "allow_create_engine": False,
                            "allow_sampling": True,
                            "allow_logprobs": True,
                            "allow_search_indices": False,
                            "allow_view": True,
                            "allow_fine_tuning": False,
                            "organization": "*",
                            "group": None,
                            "is_blocking": False,
                        }
                    ],
                }
                for name in served
            ],
        }
    ).encode()
