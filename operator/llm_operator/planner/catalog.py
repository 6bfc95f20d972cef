"""Built-in catalog of common open models: the numbers that size GPU memory.

Every entry copies its shape from the model's `config.json` on Hugging Face
(num_hidden_layers, num_attention_heads, num_key_value_heads, head_dim, hidden_size,
intermediate_size, max_position_embeddings, vocab_size, tie_word_embeddings) and its parameter
count from the safetensors metadata shown on the model page. `source` names the file, so a
reviewer can check a number without trusting this module.

Lookup is by Hugging Face id, case-insensitively. A `pvc://claim/path` or `s3://bucket/path`
model matches when its last path component equals the repository name of an entry
(`pvc://models/Llama-3.1-8B-Instruct` -> `meta-llama/Llama-3.1-8B-Instruct`): weights copied
out of the Hub usually keep their directory name. Anything else is unknown, and the spec's
`model.architecture` has to say what the planner needs.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

# Quantization method of a pre-quantized checkpoint; vLLM reads it from the checkpoint's
# config.json, so it applies even when the spec leaves engine.quantization at none.
CheckpointQuantization = str


@dataclass(frozen=True)
class ModelInfo:
    """The numbers of one model that the planner uses. Any may be unknown (None) when they
    come from a partial `model.architecture` in the spec."""

    name: str
    """Hugging Face id, or the spec's model name for a model outside the catalog."""
    parameters: float | None = None
    """Total parameters, all experts included (all are resident in GPU memory)."""
    num_layers: int | None = None
    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_size: int | None = None
    intermediate_size: int | None = None
    max_position_embeddings: int | None = None
    vocab_size: int | None = None
    """With hidden_size, sizes the embedding and LM head, which stay 16-bit when quantized."""
    tie_word_embeddings: bool = False
    """One matrix serves as both embedding and LM head."""
    quantization: CheckpointQuantization | None = None
    """Quantization baked into the checkpoint (awq, gptq, fp8), None for 16-bit weights."""
    quantization_group_size: int | None = None
    """Weights per scale in a group-quantized (awq/gptq) checkpoint."""
    source: str = ""
    """Where the numbers come from."""

    @property
    def effective_head_dim(self) -> int | None:
        """head_dim as vLLM derives it: config's head_dim, else hidden_size / heads."""
        if self.head_dim is not None:
            return self.head_dim
        if self.hidden_size is not None and self.num_attention_heads:
            return self.hidden_size // self.num_attention_heads
        return None

    @property
    def effective_kv_heads(self) -> int | None:
        """Key/value heads; a model without grouped-query attention has one per query head."""
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def embedding_parameters(self) -> float | None:
        """Parameters in the embedding and LM head (kept in 16 bits by quantized kernels)."""
        if self.vocab_size is None or self.hidden_size is None:
            return None
        return float(self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2))


def _hf(repo: str) -> str:
    return f"https://huggingface.co/{repo}/blob/main/config.json (parameters: model card)"


# Shapes shared by several checkpoints (base, instruct, distills, quantized copies).
_LLAMA_31_8B = ModelInfo(
    name="meta-llama/Llama-3.1-8B-Instruct",
    parameters=8_030_261_248,
    num_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    hidden_size=4096,
    intermediate_size=14336,
    max_position_embeddings=131072,
    vocab_size=128256,
    source=_hf("meta-llama/Llama-3.1-8B-Instruct"),
)
_LLAMA_31_70B = ModelInfo(
    name="meta-llama/Llama-3.1-70B-Instruct",
    parameters=70_553_706_496,
    num_layers=80,
    num_attention_heads=64,
    num_key_value_heads=8,
    head_dim=128,
    hidden_size=8192,
    intermediate_size=28672,
    max_position_embeddings=131072,
    vocab_size=128256,
    source=_hf("meta-llama/Llama-3.1-70B-Instruct"),
)
_LLAMA_31_405B = ModelInfo(
    name="meta-llama/Llama-3.1-405B-Instruct",
    parameters=405_853_388_800,
    num_layers=126,
    num_attention_heads=128,
    num_key_value_heads=8,
    head_dim=128,
    hidden_size=16384,
    intermediate_size=53248,
    max_position_embeddings=131072,
    vocab_size=128256,
    source=_hf("meta-llama/Llama-3.1-405B-Instruct"),
)
_QWEN25_7B = ModelInfo(
    name="Qwen/Qwen2.5-7B-Instruct",
    parameters=7_615_616_512,
    num_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    head_dim=128,
    hidden_size=3584,
    intermediate_size=18944,
    max_position_embeddings=32768,
    vocab_size=152064,
    source=_hf("Qwen/Qwen2.5-7B-Instruct"),
)
_QWEN25_14B = ModelInfo(
    name="Qwen/Qwen2.5-14B-Instruct",
    parameters=14_770_033_664,
    num_layers=48,
    num_attention_heads=40,
    num_key_value_heads=8,
    head_dim=128,
    hidden_size=5120,
    intermediate_size=13824,
    max_position_embeddings=32768,
    vocab_size=152064,
    source=_hf("Qwen/Qwen2.5-14B-Instruct"),
)
_QWEN25_32B = ModelInfo(
    name="Qwen/Qwen2.5-32B-Instruct",
    parameters=32_763_876_352,
    num_layers=64,
    num_attention_heads=40,
    num_key_value_heads=8,
    head_dim=128,
    hidden_size=5120,
    intermediate_size=27648,
    max_position_embeddings=32768,
    vocab_size=152064,
    source=_hf("Qwen/Qwen2.5-32B-Instruct"),
)
_QWEN25_72B = ModelInfo(
    name="Qwen/Qwen2.5-72B-Instruct",
    parameters=72_706_203_648,
    num_layers=80,
    num_attention_heads=64,
    num_key_value_heads=8,
    head_dim=128,
    hidden_size=8192,
    intermediate_size=29568,
    max_position_embeddings=32768,
    vocab_size=152064,
    source=_hf("Qwen/Qwen2.5-72B-Instruct"),
)


def _same_shape(base: ModelInfo, name: str, **changes: object) -> ModelInfo:
    """Another checkpoint with `base`'s architecture (an instruct/base pair, a distill)."""
    return replace(base, name=name, source=_hf(name), **changes)  # type: ignore[arg-type]


_ENTRIES: tuple[ModelInfo, ...] = (
    # Llama 3 (8K context), 3.1 and 3.3 (128K context).
    _same_shape(_LLAMA_31_8B, "meta-llama/Meta-Llama-3-8B", max_position_embeddings=8192),
    _same_shape(_LLAMA_31_8B, "meta-llama/Meta-Llama-3-8B-Instruct", max_position_embeddings=8192),
    _same_shape(_LLAMA_31_70B, "meta-llama/Meta-Llama-3-70B", max_position_embeddings=8192),
    _same_shape(
        _LLAMA_31_70B, "meta-llama/Meta-Llama-3-70B-Instruct", max_position_embeddings=8192
    ),
    _same_shape(_LLAMA_31_8B, "meta-llama/Llama-3.1-8B"),
    _LLAMA_31_8B,
    _same_shape(_LLAMA_31_70B, "meta-llama/Llama-3.1-70B"),
    _LLAMA_31_70B,
    _same_shape(_LLAMA_31_405B, "meta-llama/Llama-3.1-405B"),
    _LLAMA_31_405B,
    _same_shape(_LLAMA_31_405B, "meta-llama/Llama-3.1-405B-Instruct-FP8", quantization="fp8"),
    _same_shape(_LLAMA_31_70B, "meta-llama/Llama-3.3-70B-Instruct"),
    ModelInfo(
        name="meta-llama/Llama-3.2-1B-Instruct",
        parameters=1_235_814_400,
        num_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        hidden_size=2048,
        intermediate_size=8192,
        max_position_embeddings=131072,
        vocab_size=128256,
        tie_word_embeddings=True,
        source=_hf("meta-llama/Llama-3.2-1B-Instruct"),
    ),
    ModelInfo(
        name="meta-llama/Llama-3.2-3B-Instruct",
        parameters=3_212_749_824,
        num_layers=28,
        num_attention_heads=24,
        num_key_value_heads=8,
        head_dim=128,
        hidden_size=3072,
        intermediate_size=8192,
        max_position_embeddings=131072,
        vocab_size=128256,
        tie_word_embeddings=True,
        source=_hf("meta-llama/Llama-3.2-3B-Instruct"),
    ),
    # Pre-quantized Llama checkpoints that are commonly served.
    _same_shape(
        _LLAMA_31_70B,
        "hugging-quants/Meta-Llama-3.1-70B-Instruct-AWQ-INT4",
        quantization="awq",
        quantization_group_size=128,
    ),
    _same_shape(
        _LLAMA_31_8B,
        "hugging-quants/Meta-Llama-3.1-8B-Instruct-AWQ-INT4",
        quantization="awq",
        quantization_group_size=128,
    ),
    _same_shape(_LLAMA_31_70B, "RedHatAI/Meta-Llama-3.1-70B-Instruct-FP8", quantization="fp8"),
    _same_shape(_LLAMA_31_8B, "RedHatAI/Meta-Llama-3.1-8B-Instruct-FP8", quantization="fp8"),
    # Mistral and Mixtral.
    ModelInfo(
        name="mistralai/Mistral-7B-Instruct-v0.3",
        parameters=7_248_023_552,
        num_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        hidden_size=4096,
        intermediate_size=14336,
        max_position_embeddings=32768,
        vocab_size=32768,
        source=_hf("mistralai/Mistral-7B-Instruct-v0.3"),
    ),
    ModelInfo(
        name="mistralai/Mistral-7B-Instruct-v0.2",
        parameters=7_241_732_096,
        num_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        hidden_size=4096,
        intermediate_size=14336,
        max_position_embeddings=32768,
        vocab_size=32000,
        source=_hf("mistralai/Mistral-7B-Instruct-v0.2"),
    ),
    ModelInfo(
        name="mistralai/Mixtral-8x7B-Instruct-v0.1",
        # All eight experts are resident: 46.7B parameters, about 12.9B active per token.
        parameters=46_702_792_704,
        num_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        hidden_size=4096,
        intermediate_size=14336,
        max_position_embeddings=32768,
        vocab_size=32000,
        source=_hf("mistralai/Mixtral-8x7B-Instruct-v0.1"),
    ),
    # Qwen 2.5.
    ModelInfo(
        name="Qwen/Qwen2.5-1.5B-Instruct",
        parameters=1_543_714_304,
        num_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        head_dim=128,
        hidden_size=1536,
        intermediate_size=8960,
        max_position_embeddings=32768,
        vocab_size=151936,
        tie_word_embeddings=True,
        source=_hf("Qwen/Qwen2.5-1.5B-Instruct"),
    ),
    _QWEN25_7B,
    _QWEN25_14B,
    _QWEN25_32B,
    _QWEN25_72B,
    # Qwen's own AWQ export pads the MLP to 29696 (= 232 x 128) so that it splits evenly
    # over 2, 4 and 8 tensor-parallel ranks; 29568 does not (14784 is not a multiple of 128).
    _same_shape(
        _QWEN25_72B,
        "Qwen/Qwen2.5-72B-Instruct-AWQ",
        parameters=72_957_861_888,
        intermediate_size=29696,
        quantization="awq",
        quantization_group_size=128,
    ),
    # Gemma 2: tied embeddings over a 256K vocabulary, head_dim set explicitly.
    ModelInfo(
        name="google/gemma-2-2b-it",
        parameters=2_614_341_888,
        num_layers=26,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=256,
        hidden_size=2304,
        intermediate_size=9216,
        max_position_embeddings=8192,
        vocab_size=256000,
        tie_word_embeddings=True,
        source=_hf("google/gemma-2-2b-it"),
    ),
    ModelInfo(
        name="google/gemma-2-9b-it",
        parameters=9_241_705_984,
        num_layers=42,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=256,
        hidden_size=3584,
        intermediate_size=14336,
        max_position_embeddings=8192,
        vocab_size=256000,
        tie_word_embeddings=True,
        source=_hf("google/gemma-2-9b-it"),
    ),
    ModelInfo(
        name="google/gemma-2-27b-it",
        parameters=27_227_128_320,
        num_layers=46,
        num_attention_heads=32,
        num_key_value_heads=16,
        head_dim=128,
        hidden_size=4608,
        intermediate_size=36864,
        max_position_embeddings=8192,
        vocab_size=256000,
        tie_word_embeddings=True,
        source=_hf("google/gemma-2-27b-it"),
    ),
    # DeepSeek-R1 distills: Llama 3.1/3.3 and Qwen 2.5 shapes with a 128K context.
    _same_shape(_LLAMA_31_8B, "deepseek-ai/DeepSeek-R1-Distill-Llama-8B"),
    _same_shape(_LLAMA_31_70B, "deepseek-ai/DeepSeek-R1-Distill-Llama-70B"),
    ModelInfo(
        name="deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B",
        parameters=1_777_088_000,
        num_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        head_dim=128,
        hidden_size=1536,
        intermediate_size=8960,
        max_position_embeddings=131072,
        vocab_size=151936,
        source=_hf("deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"),
    ),
    _same_shape(
        _QWEN25_7B, "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", max_position_embeddings=131072
    ),
    _same_shape(
        _QWEN25_14B, "deepseek-ai/DeepSeek-R1-Distill-Qwen-14B", max_position_embeddings=131072
    ),
    _same_shape(
        _QWEN25_32B, "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B", max_position_embeddings=131072
    ),
)

CATALOG: dict[str, ModelInfo] = {entry.name.lower(): entry for entry in _ENTRIES}
"""Catalog entries by lower-cased Hugging Face id."""

_BY_REPOSITORY_NAME: dict[str, ModelInfo] = {
    entry.name.lower().rsplit("/", 1)[-1]: entry for entry in _ENTRIES
}

_PATH_SCHEMES = ("pvc://", "s3://", "gs://")


def lookup_model(name: str) -> ModelInfo | None:
    """The catalog entry for a model name from the spec, or None when it is not known."""
    lowered = name.strip().lower()
    if lowered in CATALOG:
        return CATALOG[lowered]
    if lowered.startswith(_PATH_SCHEMES):
        last = lowered.split("://", 1)[1].rstrip("/").rsplit("/", 1)[-1]
        return _BY_REPOSITORY_NAME.get(last)
    return None
