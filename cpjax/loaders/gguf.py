"""GGUF (llama.cpp) Llama checkpoints to cpjax's parameter pytree.

Tensors are dequantized with the ``gguf`` package (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_x,
K-quants, IQ-quants ...) into the natural row-major ``[out, in]`` layout (``GGUFReader`` lists
shapes fastest-dimension first; the dequantized array is the reverse). They are then mapped onto
HF tensor names and converted by :func:`cpjax.loaders.safetensors.params_from_hf`.

llama.cpp's converter permutes the rows of the Q and K projections for its interleaved RoPE
(pairs ``2i, 2i+1``); :func:`unpermute_rope_rows` restores HF's ``rotate_half`` order (pairs
``i, i + Dh/2``) that cpjax uses. Llama-3.1-style frequency scaling, which llama.cpp stores as
the per-frequency ``rope_freqs.weight`` tensor, is turned back into a :class:`RopeScaling`.
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
from cpjax.loaders.safetensors import (LAYER_TENSORS, TOP_TENSORS, Params, check_tensor_names,
                                       hf_tensor_names, params_from_hf, require_shape)

#: HF name -> llama.cpp name, for the top-level tensors and those inside ``model.layers.{i}``.
_GGUF_TOP = dict(zip(TOP_TENSORS.values(), ("token_embd.weight", "output_norm.weight",
                                             "output.weight")))
_GGUF_LAYER = dict(zip(LAYER_TENSORS.values(), (
    "attn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight",
    "ffn_norm.weight", "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight")))
ROPE_FREQS = "rope_freqs.weight"


def gguf_tensor_name(hf_name: str) -> str:
    """llama.cpp's name for an HF tensor name (``model.layers.3.mlp.up_proj.weight`` ->
    ``blk.3.ffn_up.weight``)."""
    if hf_name in _GGUF_TOP:
        return _GGUF_TOP[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    return f"blk.{layer}.{_GGUF_LAYER[rest]}"


def unpermute_rope_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation of an ``[out, in]`` projection (``out = H * Dh``).

    llama.cpp's converter applies ``w.reshape(H, 2, Dh/2, in).swapaxes(1, 2).reshape(out, in)``
    (rotate_half pairs -> adjacent pairs); this is its inverse.
    """
    rows, cols = weight.shape
    return (weight.reshape(n_heads, rows // n_heads // 2, 2, cols).swapaxes(1, 2)
            .reshape(rows, cols))


def llama3_rope_factors(scaling: RopeScaling, head_dim: int, theta: float) -> np.ndarray:
    """``[Dh/2]`` divisors of the RoPE frequencies under Llama-3 scaling (llama.cpp's
    ``rope_freqs``; HF's ``_compute_llama3_parameters`` divides by the same numbers)."""
    s = scaling
    inv_freq = theta ** -(np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * np.pi / inv_freq
    smooth = ((s.original_max_position_embeddings / wavelen - s.low_freq_factor)
              / (s.high_freq_factor - s.low_freq_factor))
    with np.errstate(divide="ignore"):
        medium = 1 / ((1 - smooth) / s.factor + smooth)
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    return np.where(wavelen < high_wavelen, 1.0,
                    np.where(wavelen > low_wavelen, s.factor, medium))


def fit_llama3_scaling(factors: np.ndarray, head_dim: int, theta: float,
                       where: str) -> RopeScaling | None:
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
    scaling = RopeScaling(factor=factor, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192)
    if medium.sum() >= 2:
        # smooth = (original / wavelen - 1) / (high - 1) is linear in 1 / wavelen.
        smooth = (1 / factors[medium] - 1 / factor) / (1 - 1 / factor)
        slope, intercept = np.polyfit(1 / wavelen[medium], smooth, 1)
        high = 1 - 1 / intercept
        scaling = RopeScaling(factor=factor, low_freq_factor=1.0,
                              high_freq_factor=round(float(high), 4),
                              original_max_position_embeddings=int(round(slope * (high - 1))))
    require(np.allclose(llama3_rope_factors(scaling, head_dim, theta), factors, rtol=1e-3),
            f"{where}: tensor {ROPE_FREQS!r} does not follow Llama-3 RoPE frequency scaling "
            f"(the only RoPE scaling cpjax supports)")
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
        raise CpjaxError(f"{where}: tensor {tensor.name!r} has quantization type "
                         f"{tensor.tensor_type.name}, which cpjax (the gguf package) cannot "
                         f"dequantize") from None
    require_shape(data, tuple(int(d) for d in reversed(tensor.shape)),
                  f"{where}: dequantized tensor {tensor.name!r}")
    return np.asarray(data, np.float32)


def _rope_scaling(reader: gguf.GGUFReader, tensors: dict, head_dim: int, theta: float,
                  where: str) -> RopeScaling | None:
    kind = field(reader, "llama.rope.scaling.type", "none")
    factor = field(reader, "llama.rope.scaling.factor", 1.0)
    require(kind == "none" or factor == 1.0,
            f"{where}: rope scaling type {kind!r} (factor {factor}) is not supported (cpjax "
            f"supports plain RoPE and Llama-3 frequency scaling)")
    if ROPE_FREQS not in tensors:
        return None
    factors = _dequantize(tensors[ROPE_FREQS], where)
    require_shape(factors, (head_dim // 2,), f"{where}: tensor {ROPE_FREQS!r}")
    return fit_llama3_scaling(factors, head_dim, theta, where)


def _config(reader: gguf.GGUFReader, path: str) -> ModelConfig:
    """``ModelConfig`` from the ``llama.*`` and ``tokenizer.ggml.*`` metadata of an open file."""
    where = f"model file {path!r}"
    arch = field(reader, "general.architecture")
    require(arch == "llama", f"{where}: GGUF architecture is {arch!r}; cpjax supports 'llama' "
                             f"(Llama-architecture models)")
    tensors = {t.name: t for t in reader.tensors}
    embed = _GGUF_TOP[TOP_TENSORS["embed"]]
    require(embed in tensors, f"{where}: tensor {embed!r} is missing")
    n_heads = int(_required(reader, "llama.attention.head_count", where))
    dim = int(_required(reader, "llama.embedding_length", where))
    head_dim = int(field(reader, "llama.attention.key_length", dim // n_heads))
    theta = _float32(field(reader, "llama.rope.freq_base", 10000.0))
    bos = field(reader, "tokenizer.ggml.bos_token_id")
    ends = (field(reader, "tokenizer.ggml.eos_token_id"),
            field(reader, "tokenizer.ggml.eot_token_id"))
    try:
        return ModelConfig(
            name=pathlib.Path(path).stem,
            vocab_size=int(tensors[embed].shape[1]),   # ggml order: [D, V]
            dim=dim,
            n_layers=int(_required(reader, "llama.block_count", where)),
            n_heads=n_heads,
            n_kv_heads=int(field(reader, "llama.attention.head_count_kv", n_heads)),
            head_dim=head_dim,
            ffn_dim=int(_required(reader, "llama.feed_forward_length", where)),
            norm_eps=_float32(field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=theta,
            rope_scaling=_rope_scaling(reader, tensors, head_dim, theta, where),
            max_seq_len=int(_required(reader, "llama.context_length", where)),
            tie_embeddings=_GGUF_TOP[TOP_TENSORS["lm_head"]] not in tensors,
            bos_id=None if bos is None else int(bos),
            eos_ids=tuple(dict.fromkeys(int(t) for t in ends if t is not None)),
        )
    except CpjaxError as exc:
        raise CpjaxError(f"{where}: {exc}") from None


def read_gguf_config(path) -> ModelConfig:
    """The ``ModelConfig`` of a Llama GGUF file (named after the file's stem), without
    dequantizing its weights."""
    return _config(open_gguf(path), os.fspath(path))


def load_gguf(path, dtype=np.float32) -> tuple[ModelConfig, Params]:
    """Read a Llama GGUF file: ``(ModelConfig, params)``, params as documented in
    :mod:`cpjax.loaders.safetensors` (numpy arrays of ``dtype``), Q/K rows in HF order.

    The model is tied iff the file has no ``output.weight``. A progress bar over the tensors is
    shown on a terminal.
    """
    path = os.fspath(path)
    where = f"model file {path!r}"
    reader = open_gguf(path)
    config = _config(reader, path)
    tensors = {t.name: t for t in reader.tensors}
    check_tensor_names(tensors, [gguf_tensor_name(n) for n in hf_tensor_names(config)],
                       lambda name: name == ROPE_FREQS, where)
    heads = {LAYER_TENSORS["wq"]: config.n_heads, LAYER_TENSORS["wk"]: config.n_kv_heads}

    with tqdm(total=len(hf_tensor_names(config)), desc=f"dequantizing {config.name}",
              unit="tensor", leave=False, disable=None) as bar:
        def read(hf_name: str, shape: tuple[int, ...]) -> np.ndarray:
            name = gguf_tensor_name(hf_name)
            weight = _dequantize(tensors[name], where)
            require_shape(weight, shape, f"{where}: tensor {name!r}")
            n_heads = heads.get(hf_name.split(".", 3)[-1])
            bar.update()
            return weight if n_heads is None else unpermute_rope_rows(weight, n_heads)

        params = params_from_hf(config, read, dtype)
    return config, params
