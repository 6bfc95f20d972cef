"""The planner against cases computed by hand here, step by step.

Shared numbers (docs/sizing.md): an 80 GiB GPU at gpuMemoryUtilization 0.90 gives vLLM
72 GiB; 2 GiB of it is runtime overhead; one maxModelLen sequence plus 25% must fit in the
KV cache, and `tensor: auto` also wants 32768 tokens of it. vLLM allocates 16-token blocks.
"""

from __future__ import annotations

from typing import Any

import pytest

from llm_operator.api import LLMDeploymentSpec
from llm_operator.api.v1alpha1 import SizingPlan
from llm_operator.planner import GIB, PlanError, plan

KIB = 1024
BUDGET = 80 * GIB * 0.9  # 72 GiB per GPU
OVERHEAD = 2 * GIB

# Llama 3 70B (config.json): 80 layers, 64 heads, 8 KV heads, head_dim 128, hidden 8192,
# vocabulary 128256 with separate embedding and LM head; 70,553,706,496 parameters.
LLAMA_70B_PARAMS = 70_553_706_496
LLAMA_70B_EMBEDDINGS = 2 * 128256 * 8192  # 2,101,346,304, kept in 16 bits when quantized


def spec(**fields: Any) -> LLMDeploymentSpec:
    return LLMDeploymentSpec.model_validate(fields)


def blocks(tokens: float) -> int:
    return int(tokens) // 16 * 16


def test_llama_3_70b_in_bfloat16_takes_tensor_4() -> None:
    weights = LLAMA_70B_PARAMS * 2  # 141.1 GB = 131.4 GiB
    assert weights / GIB == pytest.approx(131.41, abs=0.01)
    # tensor 1: 131.4 GiB of weights on a 72 GiB budget: impossible.
    # tensor 2: 65.7 GiB of weights each, 72 - 65.7 - 2 = 4.3 GiB of KV cache. A token takes
    # 2 (K, V) x 80 layers x 4 KV heads per rank x 128 x 2 bytes = 160 KiB on each GPU:
    kv_tp2 = BUDGET - weights / 2 - OVERHEAD
    per_token_tp2 = 2 * 80 * 4 * 128 * 2
    assert per_token_tp2 == 160 * KIB
    tokens_tp2 = blocks(kv_tp2 / per_token_tp2)
    assert tokens_tp2 == 28112  # one 8192-token sequence fits, 32768 tokens do not
    # tensor 4: 32.9 GiB each, 37.2 GiB of KV cache at 80 KiB a token.
    kv_tp4 = BUDGET - weights / 4 - OVERHEAD
    tokens_tp4 = blocks(kv_tp4 / (80 * KIB))

    result = plan(spec(model={"name": "meta-llama/Meta-Llama-3-70B-Instruct"}))

    assert result.tensor_parallel_size == 4
    assert result.gpus_per_replica == 4
    assert result.max_model_len == 8192  # the model's own context
    assert result.kv_bytes_per_token_per_gpu == 80 * KIB
    assert result.kv_cache_tokens == tokens_tp4 == 486864
    assert result.weight_bytes_per_gpu == pytest.approx(weights / 4)
    assert result.notes == ()


def test_llama_3_70b_in_fp8_takes_tensor_2() -> None:
    # fp8 stores the linear layers in one byte; embedding and LM head stay bfloat16.
    weights = (LLAMA_70B_PARAMS - LLAMA_70B_EMBEDDINGS) * 1 + LLAMA_70B_EMBEDDINGS * 2
    assert weights / GIB == pytest.approx(67.67, abs=0.01)
    # tensor 1: 72 - 67.7 - 2 = 2.3 GiB at 320 KiB a token: 7.7K tokens < 8192 x 1.25.
    assert blocks((BUDGET - weights - OVERHEAD) / (320 * KIB)) < 10240
    # tensor 2: 33.8 GiB of weights, 36.2 GiB of KV at 160 KiB a token.
    expected_tokens = blocks((BUDGET - weights / 2 - OVERHEAD) / (160 * KIB))

    result = plan(
        spec(
            model={"name": "meta-llama/Llama-3.1-70B-Instruct"},
            engine={"quantization": "fp8", "maxModelLen": 8192},
        )
    )

    assert result.tensor_parallel_size == 2
    assert result.kv_cache_tokens == expected_tokens == 237024
    sizing = result.sizing_plan()
    assert sizing == SizingPlan(
        tensor_parallel_size=2,
        pipeline_parallel_size=1,
        gpus_per_replica=2,
        weight_gi_b_per_gpu=33.83,
        kv_cache_gi_b_per_gpu=36.17,
        kv_cache_tokens=237024,
        max_model_len=8192,
    )


def test_llama_3_70b_in_4_bit_awq_takes_tensor_1() -> None:
    # 4 bits a weight plus a 16-bit scale and a 4-bit zero per group of 128 weights.
    per_weight = 0.5 + 2.5 / 128
    weights = (LLAMA_70B_PARAMS - LLAMA_70B_EMBEDDINGS) * per_weight + LLAMA_70B_EMBEDDINGS * 2
    assert weights / GIB == pytest.approx(37.03, abs=0.01)  # the published checkpoint: 39.8 GB
    expected_tokens = blocks((BUDGET - weights - OVERHEAD) / (320 * KIB))
    assert expected_tokens > 32768

    result = plan(
        spec(
            model={"name": "hugging-quants/Meta-Llama-3.1-70B-Instruct-AWQ-INT4"},
            engine={"quantization": "awq", "maxModelLen": 8192},
        )
    )

    assert result.tensor_parallel_size == 1
    assert result.kv_cache_tokens == expected_tokens


def test_a_pre_quantized_checkpoint_is_sized_quantized_even_when_the_spec_says_none() -> None:
    # vLLM reads the quantization from the checkpoint's config.json.
    result = plan(
        spec(
            model={"name": "hugging-quants/Meta-Llama-3.1-70B-Instruct-AWQ-INT4"},
            engine={"maxModelLen": 8192},
        )
    )
    assert result.quantization == "awq"
    assert result.tensor_parallel_size == 1


def test_llama_3_8b_takes_tensor_1_even_at_its_full_128k_context() -> None:
    weights = 8_030_261_248 * 2  # 15.0 GiB
    per_token = 2 * 32 * 8 * 128 * 2  # 128 KiB
    expected_tokens = blocks((BUDGET - weights - OVERHEAD) / per_token)
    assert expected_tokens >= 131072 * 1.25

    result = plan(spec(model={"name": "meta-llama/Llama-3.1-8B-Instruct"}))

    assert result.tensor_parallel_size == 1
    assert result.max_model_len == 131072
    assert result.kv_cache_tokens == expected_tokens


def test_a_tensor_size_that_does_not_divide_the_heads_is_refused_with_the_valid_ones() -> None:
    # Qwen2.5-7B has 28 attention heads: 8 does not divide them; 1, 2 and 4 do.
    with pytest.raises(PlanError) as refused:
        plan(spec(model={"name": "Qwen/Qwen2.5-7B-Instruct"}, parallelism={"tensor": 8}))
    message = str(refused.value)
    assert "parallelism.tensor 8" in message
    assert "does not divide the model's 28 attention heads" in message
    assert message.endswith("use tensor: 1, 2 or 4")


def test_auto_skips_sizes_that_break_the_head_rule() -> None:
    # Qwen2.5-7B at its 32K context fits on one GPU; with perNode 8 auto never offers 8.
    result = plan(spec(model={"name": "Qwen/Qwen2.5-7B-Instruct"}))
    assert result.tensor_parallel_size == 1


def test_kv_heads_and_tensor_size_must_divide_one_another() -> None:
    architecture = {
        "parameters": 20e9,
        "numLayers": 48,
        "numAttentionHeads": 48,
        "numKeyValueHeads": 12,
        "headDim": 128,
    }
    with pytest.raises(PlanError, match="tensor 8 and the model's 12 key/value heads"):
        plan(
            spec(
                model={"name": "example/model-20b", "architecture": architecture},
                parallelism={"tensor": 8},
            )
        )
    # tensor 4 divides 12 and 48.
    fine = plan(
        spec(
            model={"name": "example/model-20b", "architecture": architecture},
            parallelism={"tensor": 4},
            engine={"maxModelLen": 4096},
        )
    )
    assert fine.kv_bytes_per_token_per_gpu == 2 * 48 * (12 // 4) * 128 * 2


def test_more_ranks_than_kv_heads_replicate_a_head_on_each_rank() -> None:
    # Qwen2.5-1.5B: 2 KV heads; at tensor 4 each rank still holds one whole head.
    result = plan(spec(model={"name": "Qwen/Qwen2.5-1.5B-Instruct"}, parallelism={"tensor": 4}))
    assert result.kv_bytes_per_token_per_gpu == 2 * 28 * 1 * 128 * 2


def test_group_quantized_mlp_must_split_into_whole_groups() -> None:
    # Qwen2.5-72B's MLP is 29568 wide: 14784 per rank at tensor 2, not a multiple of 128.
    with pytest.raises(PlanError) as refused:
        plan(
            spec(
                model={"name": "Qwen/Qwen2.5-72B-Instruct"},
                engine={"quantization": "awq"},
                parallelism={"tensor": 2},
            )
        )
    assert "MLP width 29568 over tensor 2 is 14784 per rank" in str(refused.value)
    # Qwen's own AWQ export pads it to 29696 = 2 x 14848 = 2 x 116 x 128.
    padded = plan(
        spec(
            model={"name": "Qwen/Qwen2.5-72B-Instruct-AWQ"},
            engine={"maxModelLen": 16384},
            parallelism={"tensor": 2},
        )
    )
    assert padded.tensor_parallel_size == 2


def test_an_unfit_spec_gets_the_numbers_and_a_way_out() -> None:
    # tensor 2 at 32K: 28112 tokens of KV cache, one 32768-token sequence plus 25% needs 40960.
    with pytest.raises(PlanError) as refused:
        plan(
            spec(
                model={"name": "meta-llama/Llama-3.1-70B-Instruct"},
                engine={"maxModelLen": 32768},
                parallelism={"tensor": 2},
            )
        )
    message = str(refused.value)
    assert message.startswith("70.6B parameters in bfloat16 need 131.4 GiB of weights; ")
    assert "2 GPUs of 80 GiB at 0.90 (72.0 GiB each)" in message
    assert "leave 4.3 GiB each for the KV cache after 65.7 GiB of weights" in message
    assert "28112 tokens, less than one 32768-token sequence with headroom (40960 tokens" in message
    # Every suggested fix was checked: tensor 4 fits; so do fp8 weights or an fp8 KV cache;
    # so does a context of at most 28112 / 1.25 = 22489 tokens, rounded down to 21504.
    assert message.endswith(
        "use tensor: 4, quantization: fp8, kvCacheDtype: fp8 or maxModelLen: 21504 or less"
    )
    for fix in (
        {"parallelism": {"tensor": 4}},
        {"engine": {"maxModelLen": 32768, "quantization": "fp8"}, "parallelism": {"tensor": 2}},
        {"engine": {"maxModelLen": 32768, "kvCacheDtype": "fp8"}, "parallelism": {"tensor": 2}},
        {"engine": {"maxModelLen": 21504}, "parallelism": {"tensor": 2}},
    ):
        fields = {"model": {"name": "meta-llama/Llama-3.1-70B-Instruct"}, **fix}
        fields.setdefault("engine", {"maxModelLen": 32768})
        assert plan(spec(**fields)).kv_cache_tokens


def test_weights_that_cannot_fit_say_so() -> None:
    with pytest.raises(PlanError) as refused:
        plan(spec(model={"name": "meta-llama/Llama-3.1-70B-Instruct"}, parallelism={"tensor": 1}))
    message = str(refused.value)
    assert "1 GPU of 80 GiB at 0.90 (72.0 GiB) cannot hold 131.4 GiB of weights" in message
    assert message.endswith("use tensor: 4")


def test_auto_that_cannot_fit_on_a_node_suggests_quantization() -> None:
    # 405B in bfloat16 is 756 GiB: 94.5 GiB per GPU even at tensor 8.
    with pytest.raises(PlanError) as refused:
        plan(spec(model={"name": "meta-llama/Llama-3.1-405B-Instruct"}))
    message = str(refused.value)
    assert "does not fit at tensor 8, the most resources.gpu.perNode 8 allows" in message
    assert "405.9B parameters in bfloat16 need 756.0 GiB of weights" in message
    assert message.endswith("use quantization: fp8")
    fp8 = plan(
        spec(
            model={"name": "meta-llama/Llama-3.1-405B-Instruct"},
            engine={"quantization": "fp8", "maxModelLen": 16384},
        )
    )
    assert fp8.tensor_parallel_size == 8


def test_explicit_tensor_is_held_only_to_the_hard_limit_and_says_when_batching_is_tight() -> None:
    result = plan(
        spec(
            model={"name": "meta-llama/Meta-Llama-3-70B-Instruct"},
            parallelism={"tensor": 2},
        )
    )
    assert result.tensor_parallel_size == 2
    assert result.kv_cache_tokens == 28112
    assert any("little room to batch" in note for note in result.notes)


def test_auto_falls_back_to_the_hard_limit_when_a_node_is_too_small_for_more() -> None:
    result = plan(
        spec(
            model={"name": "meta-llama/Meta-Llama-3-70B-Instruct"},
            resources={"gpu": {"perNode": 2}},
        )
    )
    assert result.tensor_parallel_size == 2
    assert any("no tensor-parallel size up to 2 gives 32768 tokens" in n for n in result.notes)


def test_fp8_kv_cache_halves_the_bytes_per_token() -> None:
    base = {"model": {"name": "meta-llama/Llama-3.1-8B-Instruct"}, "parallelism": {"tensor": 1}}
    auto = plan(spec(**base))
    fp8 = plan(spec(**base, engine={"kvCacheDtype": "fp8"}))
    assert auto.kv_bytes_per_token_per_gpu == 2 * fp8.kv_bytes_per_token_per_gpu  # type: ignore[operator]


def test_pipeline_stages_split_the_layers_and_weights() -> None:
    result = plan(
        spec(
            model={"name": "meta-llama/Llama-3.1-70B-Instruct"},
            engine={"maxModelLen": 8192},
            parallelism={"tensor": 2, "pipeline": 2},
        )
    )
    assert result.gpus_per_replica == 4
    assert result.kv_bytes_per_token_per_gpu == 2 * 40 * 4 * 128 * 2
    assert result.weight_bytes_per_gpu == pytest.approx(LLAMA_70B_PARAMS * 2 / 4)


def test_a_replica_larger_than_a_node_is_refused() -> None:
    with pytest.raises(PlanError, match="tensor 8 x pipeline 2 = 16 GPUs per replica"):
        plan(
            spec(
                model={"name": "meta-llama/Llama-3.1-70B-Instruct"},
                parallelism={"tensor": 8, "pipeline": 2},
            )
        )


def test_max_model_len_beyond_the_model_context_is_refused() -> None:
    with pytest.raises(PlanError, match="exceeds the 8192-token context"):
        plan(spec(model={"name": "google/gemma-2-9b-it"}, engine={"maxModelLen": 16384}))


def test_unknown_model_with_auto_asks_for_the_numbers() -> None:
    with pytest.raises(PlanError) as refused:
        plan(spec(model={"name": "acme/secret-model"}))
    message = str(refused.value)
    assert "acme/secret-model" in message
    assert "not in the built-in catalog" in message
    for wanted in (
        "model.architecture.parameters",
        "model.architecture.numLayers",
        "model.architecture.numAttentionHeads",
        "model.architecture.numKeyValueHeads",
        "engine.maxModelLen",
    ):
        assert wanted in message
    assert message.endswith("or set parallelism.tensor to a number")


def test_unknown_model_with_explicit_tensor_plans_what_is_known() -> None:
    result = plan(spec(model={"name": "acme/secret-model"}, parallelism={"tensor": 2}))
    assert result.tensor_parallel_size == 2
    assert result.kv_cache_tokens is None
    partial_status = result.sizing_plan()
    assert (partial_status.tensor_parallel_size, partial_status.gpus_per_replica) == (2, 2)
    assert partial_status.kv_cache_tokens is None and partial_status.weight_gi_b_per_gpu is None
    assert any("not in the built-in catalog" in note for note in result.notes)
    # Known numbers are still checked.
    partial = {"name": "acme/secret-model", "architecture": {"numAttentionHeads": 6}}
    with pytest.raises(PlanError, match="6 attention heads"):
        plan(spec(model=partial, parallelism={"tensor": 4}))


def test_unknown_model_with_architecture_is_sized_like_a_catalog_one() -> None:
    # A 13B model without GQA on 24 GiB GPUs at 4096 tokens: 26 GB of weights.
    architecture = {
        "parameters": 13e9,
        "numLayers": 40,
        "numAttentionHeads": 40,
        "numKeyValueHeads": 40,
        "hiddenSize": 5120,  # head_dim 128
    }
    budget = 24 * GIB * 0.9
    # tensor 2: 12.1 GiB each, 7.5 GiB of KV at 2 x 40 x 20 x 128 x 2 = 400 KiB: 19.6K tokens,
    # enough for one sequence but under auto's 32768; tensor 4: 71K tokens.
    tp2 = blocks((budget - 13e9 * 2 / 2 - OVERHEAD) / (400 * KIB))
    assert 5120 <= tp2 < 32768
    result = plan(
        spec(
            model={"name": "acme/model-13b", "architecture": architecture},
            engine={"maxModelLen": 4096},
            resources={"gpu": {"memoryGiB": 24}},
        )
    )
    assert result.tensor_parallel_size == 4
    assert result.kv_cache_tokens == blocks((budget - 13e9 * 2 / 4 - OVERHEAD) / (200 * KIB))


def test_architecture_overrides_the_catalog() -> None:
    base = plan(spec(model={"name": "meta-llama/Llama-3.1-8B-Instruct"}))
    overridden = plan(
        spec(
            model={
                "name": "meta-llama/Llama-3.1-8B-Instruct",
                "architecture": {"numKeyValueHeads": 32, "maxPositionEmbeddings": 8192},
            }
        )
    )
    assert overridden.kv_bytes_per_token_per_gpu == 4 * base.kv_bytes_per_token_per_gpu  # type: ignore[operator]
    assert overridden.max_model_len == 8192
    assert "overrides from spec.model.architecture" in overridden.model.source


def test_a_model_on_a_volume_is_sized_from_the_catalog_by_its_directory_name() -> None:
    result = plan(spec(model={"name": "pvc://weights/meta/Llama-3.1-8B-Instruct"}))
    assert result.in_catalog
    assert result.model.name == "meta-llama/Llama-3.1-8B-Instruct"


def test_plan_error_is_a_value_error() -> None:
    assert issubclass(PlanError, ValueError)
