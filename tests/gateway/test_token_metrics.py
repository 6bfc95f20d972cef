"""Per-track token metrics for canary analysis, against the real simulator on loopback:
time to first token and time per output token follow the simulator's --sim-ttft-base and
--sim-itl, per track, as Prometheus's histogram_quantile would read them."""

from __future__ import annotations

import asyncio
import math
import re

import httpx
import pytest

from tests.gateway.conftest import GatewayProc, Sdk, addr
from tests.support.sim import run_sims

pytestmark = pytest.mark.timeout(90)

MSG = [{"role": "user", "content": "Hi"}]
TOKENS = 24


def _sim_args(ttft: float, itl: float) -> list[str]:
    return [
        "--sim-ttft-base",
        str(ttft),
        "--sim-itl",
        str(itl),
        "--sim-prefill-per-token",
        "0",
        "--sim-jitter",
        "0",
        "--sim-load-slowdown",
        "0",
        "--sim-output-tokens",
        str(TOKENS),
        "--max-num-seqs",
        "64",
    ]


def buckets(text: str, name: str, **labels: str) -> list[tuple[float, float]]:
    """(le, cumulative count) of one histogram series, sorted by le."""
    out = []
    for m in re.finditer(rf"^{name}_bucket\{{(.*)\}} (\S+)$", text, re.M):
        got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        if all(got.get(k) == v for k, v in labels.items()):
            out.append((float(got["le"]), float(m.group(2))))
    return sorted(out)


def quantile(q: float, bs: list[tuple[float, float]]) -> float:
    """Prometheus's histogram_quantile: linear within the bucket the rank falls in."""
    total = bs[-1][1]
    rank = q * total
    prev_le, prev_c = 0.0, 0.0
    for le, c in bs:
        if c >= rank:
            if math.isinf(le):
                return prev_le
            return prev_le + (le - prev_le) * (rank - prev_c) / max(c - prev_c, 1e-9)
        prev_le, prev_c = le, c
    return prev_le


async def _stream(h: httpx.AsyncClient, url: str) -> int:
    body = {
        "model": "llama",
        "messages": MSG,
        "stream": True,
        "max_tokens": TOKENS,
        "ignore_eos": True,
    }
    async with h.stream("POST", url + "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        raw = b"".join([c async for c in r.aiter_raw()])
    return raw.count(b"data: ")


async def test_ttft_and_tpot_follow_the_simulator_per_track(gateway: GatewayProc, sdk: Sdk) -> None:
    with (
        run_sims(1, served_name="llama", args=_sim_args(0.2, 0.01)) as fast,
        run_sims(1, served_name="llama", args=_sim_args(0.4, 0.02)) as slow,
    ):
        gateway.start(
            {
                "models": [
                    {
                        "name": "llama",
                        "tracks": [
                            {"name": "stable", "weight": 50, "addresses": [addr(fast[0])]},
                            {"name": "canary", "weight": 50, "addresses": [addr(slow[0])]},
                        ],
                    }
                ]
            }
        )
        async with httpx.AsyncClient(timeout=20) as h:
            counts = await asyncio.gather(*(_stream(h, gateway.url) for _ in range(40)))
        # role chunk + 24 tokens + [DONE]
        assert set(counts) == {TOKENS + 2}
        text = gateway.metrics()
        p = "llm_gateway_"
        for track, ttft, itl in (("stable", 0.2, 0.01), ("canary", 0.4, 0.02)):
            n = buckets(text, p + "time_to_first_token_seconds", model="llama", track=track)
            assert n[-1][1] == 20, (track, n)
            ttft_p95 = quantile(0.95, n)
            # The engine's TTFT, not the whole answer (24 tokens at the ITL would add 0.24 s
            # or 0.48 s). How little the gateway adds is a speed figure: bench/, not here,
            # where a busy machine stretches every latency.
            assert ttft < ttft_p95 < ttft + TOKENS * itl, (track, ttft_p95)
            t = buckets(text, p + "time_per_output_token_seconds", model="llama", track=track)
            assert t[-1][1] == 20
            # sum/count: the mean TPOT. The role chunk comes with the first token, so 24
            # tokens make 24 gaps over 25 data events: 23/24 of the engine's ITL.
            mean = float(
                re.search(
                    rf'^{p}time_per_output_token_seconds_sum\{{model="llama",backend="[^"]+",'
                    rf'track="{track}"\}} (\S+)$',
                    text,
                    re.M,
                ).group(1)  # type: ignore[union-attr]
            )
            mean /= 20
            assert itl * 0.85 < mean < itl * 1.15, (track, mean)
        ttft_name = p + "time_to_first_token_seconds"
        stable_p95 = quantile(0.95, buckets(text, ttft_name, track="stable"))
        canary_p95 = quantile(0.95, buckets(text, ttft_name, track="canary"))
        assert 1.7 < canary_p95 / stable_p95 < 2.3, (stable_p95, canary_p95)

        # Non-streamed 2xx: the first token a client can use is the whole answer.
        c = sdk(gateway, "x")
        for _ in range(4):
            await c.chat.completions.create(
                model="llama", messages=MSG, max_tokens=4, extra_body={"ignore_eos": True}
            )
        text = gateway.metrics()
        for track, ttft, itl in (("stable", 0.2, 0.01), ("canary", 0.4, 0.02)):
            n = buckets(text, p + "time_to_first_token_seconds", track=track)
            assert n[-1][1] == 22
            s = float(
                re.search(
                    rf'^{p}time_to_first_token_seconds_sum\{{model="llama",backend="[^"]+",'
                    rf'track="{track}"\}} (\S+)$',
                    text,
                    re.M,
                ).group(1)  # type: ignore[union-attr]
            )
            # 20 streams from their first event, 2 whole answers of 4 tokens (3 gaps).
            assert 20 * ttft + 2 * (ttft + 3 * itl) < s < 1.2 * (22 * ttft + 6 * itl)
            # No TPOT for a non-streamed answer.
            assert buckets(text, p + "time_per_output_token_seconds", track=track)[-1][1] == 20


async def test_no_token_metrics_for_errors(gateway: GatewayProc) -> None:
    with run_sims(1, served_name="llama", args=_sim_args(0.01, 0.001)) as sims:
        gateway.start(
            {
                "models": [
                    {
                        "name": "llama",
                        "tracks": [{"name": "stable", "weight": 1, "addresses": [addr(sims[0])]}],
                        "fallbackOn": [],
                    }
                ]
            }
        )
        sims[0].admin(error_rate_500=1.0)
        async with httpx.AsyncClient(timeout=10) as h:
            for stream in (False, True):
                r = await h.post(
                    gateway.url + "/v1/chat/completions",
                    json={"model": "llama", "messages": MSG, "stream": stream},
                )
                assert r.status_code == 500
        text = gateway.metrics()
        assert gateway.metric("llm_gateway_requests_total", outcome="server_error") == 2
        assert "llm_gateway_time_to_first_token_seconds_bucket" not in text
        assert "llm_gateway_time_per_output_token_seconds_bucket" not in text
