"""The built-in catalog: lookups, and numbers that agree with one another.

The parameter count of each entry comes from the model card; the shape from config.json. A
dense transformer's parameters follow from its shape, so recomputing them catches a mistyped
layer count, width or vocabulary.
"""

from __future__ import annotations

import pytest

from llm_operator.planner import CATALOG, ModelInfo, lookup_model


def parameters_from_shape(model: ModelInfo, *, experts: int = 1, qkv_bias: bool = False) -> float:
    assert model.hidden_size and model.num_layers and model.num_attention_heads
    assert model.vocab_size and model.intermediate_size
    hidden, head_dim = model.hidden_size, model.effective_head_dim
    assert head_dim is not None
    kv_heads = model.effective_kv_heads or model.num_attention_heads
    attention = hidden * head_dim * (2 * model.num_attention_heads + 2 * kv_heads)
    if qkv_bias:
        attention += head_dim * (model.num_attention_heads + 2 * kv_heads)
    mlp = experts * 3 * hidden * model.intermediate_size + (hidden * experts if experts > 1 else 0)
    embeddings = model.vocab_size * hidden * (1 if model.tie_word_embeddings else 2)
    return model.num_layers * (attention + mlp) + embeddings


def _family(name: str) -> dict[str, object]:
    lowered = name.lower()
    if "mixtral" in lowered:
        return {"experts": 8}
    if "qwen" in lowered:
        return {"qkv_bias": True}
    return {}


@pytest.mark.parametrize("name", sorted(CATALOG), ids=str)
def test_parameter_count_matches_the_shape(name: str) -> None:
    model = CATALOG[name]
    assert model.parameters is not None
    computed = parameters_from_shape(model, **_family(name))  # type: ignore[arg-type]
    # Norms and the like are below 0.1%; 1% leaves room for nothing else.
    assert computed == pytest.approx(model.parameters, rel=0.01)


@pytest.mark.parametrize("name", sorted(CATALOG), ids=str)
def test_every_entry_is_complete_and_names_its_source(name: str) -> None:
    model = CATALOG[name]
    assert model.source.startswith(f"https://huggingface.co/{model.name}/")
    for field in (
        "parameters",
        "num_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "hidden_size",
        "intermediate_size",
        "max_position_embeddings",
        "vocab_size",
    ):
        assert getattr(model, field) is not None, field
    assert model.num_attention_heads % model.num_key_value_heads == 0  # type: ignore[operator]


def test_the_issue_asks_for_these_families() -> None:
    wanted = [
        "meta-llama/Llama-3.1-8B-Instruct",
        "meta-llama/Llama-3.1-70B-Instruct",
        "meta-llama/Llama-3.1-405B-Instruct",
        "mistralai/Mistral-7B-Instruct-v0.3",
        "mistralai/Mixtral-8x7B-Instruct-v0.1",
        "Qwen/Qwen2.5-7B-Instruct",
        "Qwen/Qwen2.5-32B-Instruct",
        "Qwen/Qwen2.5-72B-Instruct",
        "google/gemma-2-9b-it",
        "google/gemma-2-27b-it",
        "deepseek-ai/DeepSeek-R1-Distill-Llama-70B",
        "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B",
    ]
    assert [lookup_model(name) is not None for name in wanted] == [True] * len(wanted)


def test_lookup_ignores_case() -> None:
    model = lookup_model("META-LLAMA/llama-3.1-8b-instruct")
    assert model is not None and model.name == "meta-llama/Llama-3.1-8B-Instruct"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("pvc://models/Llama-3.1-70B-Instruct", "meta-llama/Llama-3.1-70B-Instruct"),
        ("pvc://models/weights/qwen2.5-7b-instruct/", "Qwen/Qwen2.5-7B-Instruct"),
        ("s3://bucket/prefix/gemma-2-9b-it", "google/gemma-2-9b-it"),
        ("pvc://models/unknown-model", None),
        ("someone/Llama-3.1-8B-Instruct", None),  # a Hub id must match exactly: a fine-tune
        ("pvc://models", None),
    ],
)
def test_lookup_of_paths_matches_the_last_component(name: str, expected: str | None) -> None:
    model = lookup_model(name)
    assert (model.name if model else None) == expected


def test_repository_names_are_unique_so_path_lookup_is_unambiguous() -> None:
    names = [model.name.rsplit("/", 1)[1].lower() for model in CATALOG.values()]
    assert len(names) == len(set(names))


def test_head_dim_defaults_to_hidden_over_heads() -> None:
    model = ModelInfo(name="x", hidden_size=4096, num_attention_heads=32)
    assert model.effective_head_dim == 128
    assert model.effective_kv_heads == 32
