"""Model configuration: one frozen dataclass and the published presets.

A :class:`ModelConfig` fully determines the shapes of the parameter pytree (see its family's
parameter table in ``cpjax.model.families``, which also gives the parameter count) and the
numerics of the forward pass. Presets use the exact published shapes; ``tiny`` is a small
random model for fast tests.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from cpjax.errors import CpjaxError, require


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling: ``rope_type`` ``"llama3"`` (Llama-3.1's smoothed band; every
    field used) or ``"linear"`` (all frequencies divided by ``factor``; Gemma 3's global
    layers)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    rope_type: str = "llama3"

    def __post_init__(self):
        require(
            self.rope_type in ROPE_TYPES,
            f"RopeScaling.rope_type={self.rope_type!r}: must be one of {', '.join(ROPE_TYPES)}",
        )
        require(self.factor > 0, f"RopeScaling.factor={self.factor!r}: must be > 0")


ROPE_TYPES = ("llama3", "linear")
#: Parameter tables (``cpjax.model.families``): checkpoint names and which weights exist.
FAMILIES = ("llama", "qwen2", "gemma3")
LAYER_TYPES = ("full", "sliding")
ACTIVATIONS = ("silu", "gelu_tanh")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shapes and numerics of a decoder of one of the supported families.

    The defaults are plain Llama; the other families switch on their differences
    (``cpjax.loaders.hf_config`` maps each HF ``model_type`` to these fields).

    Attributes:
      name: preset or file name, for messages and result files.
      vocab_size: V, rows of the embedding table.
      dim: D, the residual width.
      n_layers: L, transformer blocks.
      n_heads: Hq, query heads.
      n_kv_heads: Hkv, key/value heads (GQA: ``Hq % Hkv == 0``).
      head_dim: Dh, width of one head (usually ``D // Hq``).
      ffn_dim: F, hidden width of the SwiGLU MLP.
      norm_eps: RMSNorm epsilon.
      rope_theta: RoPE base frequency.
      rope_scaling: Llama-3.1 frequency scaling, or None for plain RoPE.
      max_seq_len: the model's context window (positions must stay below it).
      tie_embeddings: the output head reuses the embedding table.
      bos_id, eos_ids: special tokens used by the engine (overridden by a tokenizer's metadata).
      family: parameter table (checkpoint names, which weights exist): one of FAMILIES
        (Mistral uses ``"llama"``'s).
      sliding_window: W of the sliding layers: a query sees keys less than W positions back.
      layer_types: ``"full"``/``"sliding"`` per layer; ``()`` means every layer is sliding when
        ``sliding_window`` is set (Mistral), full otherwise.
      rope_local_theta: RoPE base of the sliding layers (Gemma 3), None: ``rope_theta``; the
        sliding layers never use ``rope_scaling``.
      qkv_bias: the q/k/v projections have biases (Qwen2).
      qk_norm: RMSNorm over each query and key head before RoPE (Gemma 3).
      sandwich_norms: RMSNorm also after attention and after the MLP, before each residual add
        (Gemma 3).
      activation: MLP gate activation, ``"silu"`` (SwiGLU) or ``"gelu_tanh"`` (GeGLU).
      scale_embeddings: multiply the embeddings by ``sqrt(dim)`` (Gemma).
      norm_offset: RMSNorm computes ``x * (norm_offset + w)`` (Gemma stores ``w - 1``: 1.0).
      query_pre_attn_scalar: attention scores scaled by ``query_pre_attn_scalar ** -0.5``
        instead of ``head_dim ** -0.5`` (Gemma 3).
    """

    name: str
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Optional[RopeScaling] = None
    max_seq_len: int = 8192
    tie_embeddings: bool = False
    bos_id: Optional[int] = None
    eos_ids: tuple[int, ...] = ()
    family: str = "llama"
    sliding_window: Optional[int] = None
    layer_types: tuple[str, ...] = ()
    rope_local_theta: Optional[float] = None
    qkv_bias: bool = False
    qk_norm: bool = False
    sandwich_norms: bool = False
    activation: str = "silu"
    scale_embeddings: bool = False
    norm_offset: float = 0.0
    query_pre_attn_scalar: Optional[float] = None

    def __post_init__(self):
        for field in (
            "vocab_size",
            "dim",
            "n_layers",
            "n_heads",
            "n_kv_heads",
            "head_dim",
            "ffn_dim",
            "max_seq_len",
        ):
            value = getattr(self, field)
            require(
                isinstance(value, int) and value > 0,
                f"ModelConfig.{field}={value!r}: must be a positive integer",
            )
        require(
            self.n_heads % self.n_kv_heads == 0,
            f"ModelConfig: n_heads={self.n_heads} must be a multiple of "
            f"n_kv_heads={self.n_kv_heads} (grouped-query attention)",
        )
        for field, choices in (("family", FAMILIES), ("activation", ACTIVATIONS)):
            value = getattr(self, field)
            require(
                value in choices,
                f"ModelConfig.{field}={value!r}: must be one of {', '.join(choices)}",
            )
        require(
            self.sliding_window is None
            or (isinstance(self.sliding_window, int) and self.sliding_window > 0),
            f"ModelConfig.sliding_window={self.sliding_window!r}: must be None or a positive "
            f"integer",
        )
        require(
            not self.layer_types or len(self.layer_types) == self.n_layers,
            f"ModelConfig.layer_types has {len(self.layer_types)} entries for "
            f"n_layers={self.n_layers}: give one per layer or none",
        )
        bad = sorted(set(self.layer_types) - set(LAYER_TYPES))
        require(
            not bad, f"ModelConfig.layer_types: unknown {bad}; each must be one of {LAYER_TYPES}"
        )
        require(
            self.sliding_window is not None or "sliding" not in self.layer_types,
            "ModelConfig.layer_types has sliding layers but sliding_window is None",
        )
        require(
            self.query_pre_attn_scalar is None or self.query_pre_attn_scalar > 0,
            f"ModelConfig.query_pre_attn_scalar={self.query_pre_attn_scalar!r}: must be > 0",
        )

    @property
    def kinds(self) -> tuple[str, ...]:
        """The type of each layer (``"full"`` or ``"sliding"``), ``n_layers`` entries."""
        if self.layer_types:
            return tuple(self.layer_types)
        return ("sliding" if self.sliding_window else "full",) * self.n_layers

    @property
    def attention_kinds(self) -> tuple[str, ...]:
        """The distinct layer types of this model, in :data:`LAYER_TYPES` order: one attention
        plan (and one compiled attention) per entry."""
        return tuple(kind for kind in LAYER_TYPES if kind in self.kinds)

    def window(self, kind: str) -> Optional[int]:
        """Sliding window of the layers of type ``kind`` (None: full attention)."""
        return self.sliding_window if kind == "sliding" else None


_LLAMA31_SCALING = RopeScaling(
    factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192
)

PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(
        name="tiny",
        vocab_size=256,
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        head_dim=16,
        ffn_dim=128,
        rope_theta=10000.0,
        max_seq_len=16384,
        tie_embeddings=False,
    ),
    "smollm2-135m": ModelConfig(
        name="smollm2-135m",
        vocab_size=49152,
        dim=576,
        n_layers=30,
        n_heads=9,
        n_kv_heads=3,
        head_dim=64,
        ffn_dim=1536,
        norm_eps=1e-5,
        rope_theta=100000.0,
        max_seq_len=8192,
        tie_embeddings=True,
        bos_id=1,
        eos_ids=(2,),
    ),
    "llama3-8b": ModelConfig(
        name="llama3-8b",
        vocab_size=128256,
        dim=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        head_dim=128,
        ffn_dim=14336,
        rope_theta=500000.0,
        rope_scaling=_LLAMA31_SCALING,
        max_seq_len=131072,
        bos_id=128000,
        eos_ids=(128001, 128008, 128009),
    ),
    "llama3-70b": ModelConfig(
        name="llama3-70b",
        vocab_size=128256,
        dim=8192,
        n_layers=80,
        n_heads=64,
        n_kv_heads=8,
        head_dim=128,
        ffn_dim=28672,
        rope_theta=500000.0,
        rope_scaling=_LLAMA31_SCALING,
        max_seq_len=131072,
        bos_id=128000,
        eos_ids=(128001, 128008, 128009),
    ),
    "llama3-405b": ModelConfig(
        name="llama3-405b",
        vocab_size=128256,
        dim=16384,
        n_layers=126,
        n_heads=128,
        n_kv_heads=8,
        head_dim=128,
        ffn_dim=53248,
        rope_theta=500000.0,
        rope_scaling=_LLAMA31_SCALING,
        max_seq_len=131072,
        bos_id=128000,
        eos_ids=(128001, 128008, 128009),
    ),
    "mistral-7b": ModelConfig(
        name="mistral-7b",  # Mistral-7B-v0.1
        vocab_size=32000,
        dim=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        head_dim=128,
        ffn_dim=14336,
        rope_theta=10000.0,
        max_seq_len=32768,
        sliding_window=4096,
        bos_id=1,
        eos_ids=(2,),
    ),
    **{
        name: ModelConfig(
            name=name,
            vocab_size=vocab,
            dim=dim,
            n_layers=layers,
            n_heads=heads,
            n_kv_heads=kv,
            head_dim=dim // heads,
            ffn_dim=ffn,
            norm_eps=1e-6,
            rope_theta=1_000_000.0,
            max_seq_len=max_len,
            tie_embeddings=tied,
            bos_id=151643,
            eos_ids=(151643, 151645),
            family="qwen2",
            qkv_bias=True,
        )
        for name, vocab, dim, layers, heads, kv, ffn, max_len, tied in (
            ("qwen2.5-0.5b", 151936, 896, 24, 14, 2, 4864, 32768, True),
            ("qwen2.5-7b", 152064, 3584, 28, 28, 4, 18944, 131072, False),
            ("qwen2.5-72b", 152064, 8192, 80, 64, 8, 29568, 131072, False),
        )
    },
    **{
        name: ModelConfig(
            name=name,
            vocab_size=vocab,
            dim=dim,
            n_layers=layers,
            n_heads=heads,
            n_kv_heads=kv,
            head_dim=head_dim,
            ffn_dim=ffn,
            norm_eps=1e-6,
            rope_theta=1_000_000.0,
            rope_scaling=scaling,
            max_seq_len=ctx,
            tie_embeddings=True,
            bos_id=2,
            eos_ids=(1, 106),
            family="gemma3",
            sliding_window=window,
            layer_types=tuple("full" if (i + 1) % 6 == 0 else "sliding" for i in range(layers)),
            rope_local_theta=10000.0,
            qk_norm=True,
            sandwich_norms=True,
            activation="gelu_tanh",
            scale_embeddings=True,
            norm_offset=1.0,
            query_pre_attn_scalar=scalar,
        )
        for name, vocab, dim, layers, heads, kv, head_dim, ffn, window, scalar, scaling, ctx in (
            ("gemma3-270m", 262144, 640, 18, 4, 1, 256, 2048, 512, 256.0, None, 32768),
            (
                "gemma3-27b",
                262208,
                5376,
                62,
                32,
                16,
                128,
                21504,
                1024,
                168.0,
                RopeScaling(factor=8.0, rope_type="linear"),
                131072,
            ),
        )
    },
}


def get_preset(name: str) -> ModelConfig:
    """The preset called ``name``; a :class:`CpjaxError` listing the known names otherwise."""
    if name not in PRESETS:
        raise CpjaxError(
            f"unknown model preset {name!r}: known presets are "
            f"{', '.join(sorted(PRESETS))} (or pass a .gguf file or a "
            f"safetensors directory)"
        )
    return PRESETS[name]


def config_to_dict(config: ModelConfig) -> dict:
    """``config`` as a JSON-ready dict; :func:`config_from_dict` inverts it exactly."""
    out = dataclasses.asdict(config)
    out["eos_ids"] = list(config.eos_ids)
    out["layer_types"] = list(config.layer_types)
    return out


def _fields_of(cls, data: dict, where: str) -> dict:
    """``data`` checked against the fields of dataclass ``cls``: no unknown or missing keys."""
    require(isinstance(data, dict), f"{where}: expected a JSON object, got {data!r}")
    fields = dataclasses.fields(cls)
    unknown = sorted(set(data) - {f.name for f in fields})
    missing = [
        f.name
        for f in fields
        if f.name not in data
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    require(not unknown, f"{where}: unknown field(s) {', '.join(unknown)}")
    require(not missing, f"{where}: missing field(s) {', '.join(missing)}")
    return dict(data)


def config_from_dict(data: dict) -> ModelConfig:
    """The :class:`ModelConfig` written by :func:`config_to_dict`; a :class:`CpjaxError` naming
    any unknown or missing field."""
    fields = _fields_of(ModelConfig, data, "model config")
    rope = fields.get("rope_scaling")
    if rope is not None:
        fields["rope_scaling"] = RopeScaling(
            **_fields_of(RopeScaling, rope, "model config rope_scaling")
        )
    for key in ("eos_ids", "layer_types"):  # JSON lists back to tuples
        fields[key] = tuple(fields.get(key, ()))
    return ModelConfig(**fields)
