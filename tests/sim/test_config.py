"""The simulator accepts the `vllm serve` command line the operator renders."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from llm_operator.api import LLMDeployment
from llm_operator.render import render_all
from llm_operator.sim.config import ConfigError, env_var, parse_args

RENDERED = [
    "vllm", "serve", "meta-llama/Llama-3.1-70B-Instruct",
    "--served-model-name", "llama-70b",
    "--port", "8000",
    "--host", "0.0.0.0",
    "--tensor-parallel-size", "4",
    "--pipeline-parallel-size", "1",
    "--max-model-len", "8192",
    "--gpu-memory-utilization", "0.9",
    "--dtype", "bfloat16",
    "--quantization", "fp8",
    "--kv-cache-dtype", "auto",
    "--max-num-seqs", "256",
    "--revision", "main",
    "--enable-prefix-caching",
    "--some-future-flag", "value",
]  # fmt: skip


def test_rendered_vllm_command_line_is_accepted() -> None:
    cfg = parse_args(RENDERED, {})
    assert cfg.model == "meta-llama/Llama-3.1-70B-Instruct"
    assert cfg.served_names == ["llama-70b"]
    assert (cfg.host, cfg.port) == ("0.0.0.0", 8000)
    assert (cfg.max_model_len, cfg.max_num_seqs) == (8192, 256)
    assert "--tensor-parallel-size=4" in cfg.ignored
    assert "--enable-prefix-caching" in cfg.ignored
    assert cfg.unknown == ["--some-future-flag=value"]


@pytest.mark.parametrize(
    "argv",
    [
        ["serve", "m", "--port", "9"],
        ["m", "--port", "9"],
        ["--model", "m", "--port", "9"],
        ["--port=9", "--model=m"],
    ],
)
def test_model_positional_or_flag_with_or_without_serve(argv: list[str]) -> None:
    cfg = parse_args(argv, {})
    assert (cfg.model, cfg.port, cfg.served_names) == ("m", 9, ["m"])


def test_served_model_name_takes_several_names() -> None:
    cfg = parse_args(["m", "--served-model-name", "a", "b", "--port", "1"], {})
    assert cfg.served_names == ["a", "b"]


def test_unknown_switch_before_a_flag_takes_no_value() -> None:
    cfg = parse_args(["m", "--brand-new-switch", "--max-num-seqs", "3"], {})
    assert cfg.unknown == ["--brand-new-switch"]
    assert cfg.max_num_seqs == 3


def test_sim_flags_come_from_env_and_command_line_wins() -> None:
    env = {"LLMOP_SIM_ITL": "0.5", "LLMOP_SIM_ERROR_RATE_429": "0.25", "LLMOP_SIM_HANG": "1"}
    cfg = parse_args(["m", "--sim-itl", "0.125"], env)
    assert cfg.itl == 0.125
    assert cfg.error_rate_429 == 0.25
    assert cfg.hang is True


def test_env_var_names() -> None:
    assert env_var("--sim-error-rate-500") == "LLMOP_SIM_ERROR_RATE_500"
    assert env_var("--sim-startup-delay") == "LLMOP_SIM_STARTUP_DELAY"


def test_sim_seed_wins_over_vllm_seed() -> None:
    assert parse_args(["m", "--seed", "3"], {}).seed == 3
    assert parse_args(["m", "--seed", "3", "--sim-seed", "4"], {}).seed == 4
    assert parse_args(["m", "--seed", "3"], {"LLMOP_SIM_SEED": "5"}).seed == 5


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["m", "--max-num-seqs", "0"], {}, "--max-num-seqs"),
        (["m", "--sim-error-rate-500", "1.5"], {}, "between 0 and 1"),
        (["m", "--sim-nonsense", "1"], {}, "unknown simulator flag"),
        (["m"], {"LLMOP_SIM_ITL": "fast"}, "LLMOP_SIM_ITL"),
        (["m", "--port"], {}, "needs a value"),
        (["a", "b"], {}, "one positional model"),
    ],
)
def test_bad_values_are_refused_with_the_culprit_named(
    argv: list[str], env: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_args(argv, env)


def test_kv_capacity_holds_at_least_one_full_request() -> None:
    cfg = parse_args(["m", "--max-model-len", "100000", "--max-num-seqs", "1"], {})
    assert cfg.kv_capacity == 100000
    cfg = parse_args(["m", "--sim-kv-cache-tokens", "777"], {})
    assert cfg.kv_capacity == 777


SAMPLES = sorted((Path(__file__).resolve().parents[2] / "manifests" / "samples").glob("*.yaml"))


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda p: p.stem)
def test_the_args_the_renderer_writes_for_each_sample_are_accepted(sample: Path) -> None:
    llmd = LLMDeployment.model_validate(yaml.safe_load(sample.read_text()))
    [deployment] = [o for o in render_all(llmd) if o["kind"] == "Deployment"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    cfg = parse_args(container["args"], {})
    assert cfg.model == llmd.spec.model.name
    assert cfg.served_names == [llmd.spec.model.effective_served_name]
    assert cfg.port == container["ports"][0]["containerPort"]
    assert cfg.max_model_len == llmd.spec.engine.max_model_len
    assert cfg.unknown == []
