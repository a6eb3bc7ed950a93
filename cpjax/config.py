"""Model configuration: one frozen dataclass and the published presets.

A :class:`ModelConfig` fully determines the shapes of the parameter pytree (see the parameter
table ``cpjax.model.llama.PARAMS``, which also gives the parameter count) and the numerics of
the forward pass. Presets use the exact published shapes; ``tiny`` is a small random model for
fast tests.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from cpjax.errors import CpjaxError, require


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3.1 RoPE frequency scaling (``rope_type == "llama3"`` in HF configs)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shapes and numerics of a Llama-architecture decoder.

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
    fields["eos_ids"] = tuple(fields.get("eos_ids", ()))
    return ModelConfig(**fields)
