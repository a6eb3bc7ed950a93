"""GGUF (llama.cpp) checkpoints of architectures llama, qwen2 and gemma3 to cpjax's pytree.

Tensors are dequantized with the ``gguf`` package (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_x,
K-quants, IQ-quants ...) into the natural row-major ``[out, in]`` layout (``GGUFReader`` lists
shapes fastest-dimension first; the dequantized array is the reverse), which is HF's layout up to
the row order of some tensors; names, shapes and conversion come from the model's parameter table
(:mod:`cpjax.model.families`).

For the llama architecture, llama.cpp's converter permutes the rows of the Q and K projections
for its interleaved RoPE (pairs ``2i, 2i+1``); the table's ``from_gguf``
(:func:`cpjax.model.families.unpermute_rope_rows`) restores HF's ``rotate_half`` order (pairs
``i, i + Dh/2``) that cpjax uses. Llama-3.1-style frequency scaling, which llama.cpp stores as
the per-frequency ``rope_freqs.weight`` tensor, is turned back into a :class:`RopeScaling`.
Gemma's norm weights are stored as ``w + 1`` (the table subtracts 1).
"""

from __future__ import annotations

import os
import pathlib

import gguf
import numpy as np
from tqdm.auto import tqdm

from cpjax.config import ModelConfig, RopeScaling
from cpjax.errors import CpjaxError, require
from cpjax.loaders.gguf_reader import field, open_gguf
from cpjax.loaders.safetensors import Params, check_tensor_names, require_shape
from cpjax.model import params as table
from cpjax.model.families import param_table

ROPE_FREQS = "rope_freqs.weight"


def llama3_rope_factors(scaling: RopeScaling, head_dim: int, theta: float) -> np.ndarray:
    """``[Dh/2]`` divisors of the RoPE frequencies under Llama-3 scaling (llama.cpp's
    ``rope_freqs``; HF's ``_compute_llama3_parameters`` divides by the same numbers)."""
    s = scaling
    inv_freq = theta ** -(np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * np.pi / inv_freq
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    with np.errstate(divide="ignore"):
        medium = 1 / ((1 - smooth) / s.factor + smooth)
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    return np.where(wavelen < high_wavelen, 1.0, np.where(wavelen > low_wavelen, s.factor, medium))


def fit_llama3_scaling(
    factors: np.ndarray, head_dim: int, theta: float, where: str
) -> RopeScaling | None:
    """The :class:`RopeScaling` whose :func:`llama3_rope_factors` are ``factors [Dh/2]``.

    Only the two wavelength thresholds ``original / low_freq_factor`` and ``original /
    high_freq_factor`` are observable, so ``low_freq_factor`` is taken as 1 (Llama 3.x's value)
    and the rest is fitted to the smoothly interpolated frequencies; with fewer than two of
    those, Llama 3.1's ``high_freq_factor=4, original=8192`` are assumed. The fit is checked.
    """
    factors = np.asarray(factors, np.float64)
    if np.allclose(factors, 1.0):
        return None
    factor = float(factors.max())
    wavelen = 2 * np.pi * theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    medium = (factors > 1 + 1e-4) & (factors < factor * (1 - 1e-4))
    scaling = RopeScaling(
        factor=factor,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=8192,
    )
    if medium.sum() >= 2:
        # smooth = (original / wavelen - 1) / (high - 1) is linear in 1 / wavelen.
        smooth = (1 / factors[medium] - 1 / factor) / (1 - 1 / factor)
        slope, intercept = np.polyfit(1 / wavelen[medium], smooth, 1)
        high = 1 - 1 / intercept
        scaling = RopeScaling(
            factor=factor,
            low_freq_factor=1.0,
            high_freq_factor=round(float(high), 4),
            original_max_position_embeddings=int(round(slope * (high - 1))),
        )
    require(
        np.allclose(llama3_rope_factors(scaling, head_dim, theta), factors, rtol=1e-3),
        f"{where}: tensor {ROPE_FREQS!r} does not follow Llama-3 RoPE frequency scaling "
        f"(the only RoPE scaling cpjax supports)",
    )
    return scaling


def _float32(value) -> float:
    """A float32 metadata value as the shortest decimal that rounds to it (1e-05, not
    9.999999747378752e-06); identical once cast back to float32."""
    return float(np.format_float_positional(np.float32(value), unique=True, trim="0"))


def _required(reader: gguf.GGUFReader, key: str, where: str):
    value = field(reader, key)
    require(value is not None, f"{where}: GGUF metadata key {key!r} is missing")
    return value


def _dequantize(tensor, where: str) -> np.ndarray:
    """A GGUF tensor as a float32 array of its natural (row-major, ``[out, in]``) shape."""
    try:
        data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError:
        raise CpjaxError(
            f"{where}: tensor {tensor.name!r} has quantization type "
            f"{tensor.tensor_type.name}, which cpjax (the gguf package) cannot "
            f"dequantize"
        ) from None
    require_shape(
        data,
        tuple(int(d) for d in reversed(tensor.shape)),
        f"{where}: dequantized tensor {tensor.name!r}",
    )
    return np.asarray(data, np.float32)


GGUF_ARCHITECTURES = ("llama", "qwen2", "gemma3")
_GEMMA_PATTERN = 6  # llama.cpp and HF: every 6th Gemma 3 layer is global


def _rope_scaling(
    reader: gguf.GGUFReader, arch: str, tensors: dict, head_dim: int, theta: float, where: str
) -> RopeScaling | None:
    kind = field(reader, f"{arch}.rope.scaling.type", "none")
    factor = field(reader, f"{arch}.rope.scaling.factor", 1.0)
    if kind == "linear" and arch == "gemma3":
        return RopeScaling(factor=float(factor), rope_type="linear")
    require(
        kind == "none" or factor == 1.0,
        f"{where}: rope scaling type {kind!r} (factor {factor}) is not supported for "
        f"architecture {arch!r} (cpjax supports plain RoPE, Llama-3 frequency scaling and "
        f"Gemma 3's linear scaling)",
    )
    if ROPE_FREQS not in tensors:
        return None
    factors = _dequantize(tensors[ROPE_FREQS], where)
    require_shape(factors, (head_dim // 2,), f"{where}: tensor {ROPE_FREQS!r}")
    return fit_llama3_scaling(factors, head_dim, theta, where)


def _family_fields(reader: gguf.GGUFReader, arch: str, n_layers: int, dims: dict) -> dict:
    """The :class:`ModelConfig` fields that differ between the GGUF architectures."""
    window = field(reader, f"{arch}.attention.sliding_window")
    if arch == "qwen2":
        return dict(family="qwen2", qkv_bias=True)
    if arch == "llama":  # Mistral files are 'llama' (llama.cpp drops their window)
        return dict(sliding_window=None if window is None else int(window))
    # Gemma 3: llama.cpp scales the 27B model's queries by (dim / heads) ** -0.5, the other
    # sizes by head_dim ** -0.5 (HF's query_pre_attn_scalar: 168 vs 256).
    scalar = dims["dim"] // dims["n_heads"] if n_layers == 62 else dims["head_dim"]
    return dict(
        family="gemma3",
        sliding_window=int(window),
        layer_types=tuple(
            "full" if (i + 1) % _GEMMA_PATTERN == 0 else "sliding" for i in range(n_layers)
        ),
        rope_local_theta=10000.0,
        qk_norm=True,
        sandwich_norms=True,
        activation="gelu_tanh",
        scale_embeddings=True,
        norm_offset=1.0,
        query_pre_attn_scalar=float(scalar),
    )


def _config(reader: gguf.GGUFReader, path: str) -> ModelConfig:
    """``ModelConfig`` from the ``{arch}.*`` and ``tokenizer.ggml.*`` metadata of an open file."""
    where = f"model file {path!r}"
    arch = field(reader, "general.architecture")
    require(
        arch in GGUF_ARCHITECTURES,
        f"{where}: GGUF architecture is {arch!r}; cpjax supports {', '.join(GGUF_ARCHITECTURES)}",
    )
    key = lambda name: f"{arch}.{name}"  # noqa: E731
    tensors = {t.name: t for t in reader.tensors}
    embed = "token_embd.weight"
    require(embed in tensors, f"{where}: tensor {embed!r} is missing")
    n_heads = int(_required(reader, key("attention.head_count"), where))
    dim = int(_required(reader, key("embedding_length"), where))
    head_dim = int(field(reader, key("attention.key_length"), dim // n_heads))
    n_layers = int(_required(reader, key("block_count"), where))
    theta = _float32(field(reader, key("rope.freq_base"), 10000.0))
    bos = field(reader, "tokenizer.ggml.bos_token_id")
    ends = (
        field(reader, "tokenizer.ggml.eos_token_id"),
        field(reader, "tokenizer.ggml.eot_token_id"),
    )
    dims = dict(dim=dim, n_heads=n_heads, head_dim=head_dim)
    try:
        return ModelConfig(
            name=pathlib.Path(path).stem,
            vocab_size=int(tensors[embed].shape[1]),  # ggml order: [D, V]
            n_layers=n_layers,
            n_kv_heads=int(field(reader, key("attention.head_count_kv"), n_heads)),
            ffn_dim=int(_required(reader, key("feed_forward_length"), where)),
            norm_eps=_float32(field(reader, key("attention.layer_norm_rms_epsilon"), 1e-5)),
            rope_theta=theta,
            rope_scaling=_rope_scaling(reader, arch, tensors, head_dim, theta, where),
            max_seq_len=int(_required(reader, key("context_length"), where)),
            tie_embeddings="output.weight" not in tensors,
            bos_id=None if bos is None else int(bos),
            eos_ids=tuple(dict.fromkeys(int(t) for t in ends if t is not None)),
            **dims,
            **_family_fields(reader, arch, n_layers, dims),
        )
    except CpjaxError as exc:
        raise CpjaxError(f"{where}: {exc}") from None


def load_gguf(path, dtype=np.float32) -> tuple[ModelConfig, Params]:
    """Read a GGUF file: ``(ModelConfig, params)``, params as the family's parameter table
    describes them (numpy arrays of ``dtype``), in HF order and values.

    The model is tied iff the file has no ``output.weight``. A progress bar over the tensors is
    shown on a terminal.
    """
    path = os.fspath(path)
    where = f"model file {path!r}"
    reader = open_gguf(path)
    config = _config(reader, path)
    tensors = {t.name: t for t in reader.tensors}
    params_table = param_table(config)
    names = table.tensor_names(params_table, config, "gguf")
    check_tensor_names(tensors, names, lambda name: name == ROPE_FREQS, where)

    with tqdm(
        total=len(names),
        desc=f"dequantizing {config.name}",
        unit="tensor",
        leave=False,
        disable=None,
    ) as bar:

        def read(param: table.Param, name: str, shape: tuple[int, ...]) -> np.ndarray:
            weight = _dequantize(tensors[name], where)
            require_shape(weight, shape, f"{where}: tensor {name!r}")
            bar.update()
            return weight if param.from_gguf is None else param.from_gguf(weight, config)

        params = table.params_from_checkpoint(params_table, config, read, "gguf", dtype)
    return config, params
