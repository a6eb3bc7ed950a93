"""GGUF (llama.cpp) Llama checkpoints to cpjax's parameter pytree.

Tensors are dequantized with the ``gguf`` package (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K,
Q6_K and the other types it supports). llama.cpp stores the Q and K projections with rows
permuted for its interleaved RoPE; they are permuted back to the HF "rotate_half" convention
that ``cpjax.model.llama.apply_rope`` uses.
"""

from __future__ import annotations

import os

import numpy as np
from tqdm.auto import tqdm

from cpjax.config import ModelConfig, RopeScaling
from cpjax.errors import CpjaxError, require
from cpjax.loaders.gguf_reader import field, open_gguf


def unpermute_rope_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation of an ``[out, in]`` projection (``out = H * Dh``).

    llama.cpp's converter applies ``w.reshape(H, 2, Dh/2, in).swapaxes(1, 2)``; this is its
    inverse.
    """
    rows, cols = weight.shape
    return (weight.reshape(n_heads, rows // n_heads // 2, 2, cols).swapaxes(1, 2)
            .reshape(rows, cols))


def read_gguf_config(reader, name: str) -> ModelConfig:
    """``ModelConfig`` from the metadata of an open GGUF reader."""
    arch = field(reader, "general.architecture")
    require(arch == "llama", f"model {name!r}: GGUF architecture is {arch!r}; cpjax supports "
                             f"'llama' (Llama-architecture models)")
    get = lambda key, default=None: field(reader, f"llama.{key}", default)  # noqa: E731
    tensor_names = {t.name for t in reader.tensors}
    require("token_embd.weight" in tensor_names,
            f"model {name!r}: GGUF file has no tensor 'token_embd.weight'")
    embed = next(t for t in reader.tensors if t.name == "token_embd.weight")
    n_heads = int(get("attention.head_count"))
    dim = int(get("embedding_length"))
    scaling = None
    if get("rope.scaling.type") == "llama3" or get("rope.scaling.factor") is not None:
        scaling = RopeScaling(
            factor=float(get("rope.scaling.factor", 8.0)),
            low_freq_factor=float(get("rope.scaling.low_freq_factor", 1.0)),
            high_freq_factor=float(get("rope.scaling.high_freq_factor", 4.0)),
            original_max_position_embeddings=int(
                get("rope.scaling.original_context_length", 8192)))
    eos = field(reader, "tokenizer.ggml.eos_token_id")
    eot = field(reader, "tokenizer.ggml.eot_token_id")
    bos = field(reader, "tokenizer.ggml.bos_token_id")
    return ModelConfig(
        name=name,
        vocab_size=int(embed.shape[1]),
        dim=dim,
        n_layers=int(get("block_count")),
        n_heads=n_heads,
        n_kv_heads=int(get("attention.head_count_kv", n_heads)),
        head_dim=int(get("attention.key_length", dim // n_heads)),
        ffn_dim=int(get("feed_forward_length")),
        norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        max_seq_len=int(get("context_length", 8192)),
        tie_embeddings="output.weight" not in tensor_names,
        bos_id=None if bos is None else int(bos),
        eos_ids=tuple(int(t) for t in (eos, eot) if t is not None),
    )


def _dequantize(tensor, name: str) -> np.ndarray:
    from gguf import GGMLQuantizationType, quants

    qtype = GGMLQuantizationType(tensor.tensor_type)
    try:
        data = quants.dequantize(tensor.data, qtype)
    except NotImplementedError:
        raise CpjaxError(f"model {name!r}: tensor {tensor.name!r} uses quantization "
                         f"{qtype.name}, which the gguf package cannot dequantize") from None
    shape = tuple(int(d) for d in reversed(tensor.shape))   # ggml lists dims fastest-first
    return np.asarray(data, np.float32).reshape(shape)


def load_gguf(path, dtype=np.float32):
    """Read a Llama GGUF file.

    Returns ``(ModelConfig, params)`` with params in the layout of ``cpjax.model.llama``
    (numpy arrays of ``dtype``).
    """
    reader = open_gguf(path)
    name = os.path.splitext(os.path.basename(os.fspath(path)))[0]
    config = read_gguf_config(reader, name)
    tensors = {t.name: t for t in reader.tensors}

    def get(tensor_name: str) -> np.ndarray:
        require(tensor_name in tensors,
                f"model {name!r}: GGUF file has no tensor {tensor_name!r}")
        return _dequantize(tensors[tensor_name], name)

    c = config
    layers = {k: [] for k in ("attn_norm", "wq", "wk", "wv", "wo", "mlp_norm", "w_gate", "w_up",
                              "w_down")}
    for i in tqdm(range(c.n_layers), desc=f"loading {name}", unit="layer", leave=False):
        p = f"blk.{i}."
        wq = unpermute_rope_rows(get(p + "attn_q.weight"), c.n_heads)
        wk = unpermute_rope_rows(get(p + "attn_k.weight"), c.n_kv_heads)
        layers["attn_norm"].append(get(p + "attn_norm.weight"))
        layers["wq"].append(wq.T.reshape(c.dim, c.n_heads, c.head_dim))
        layers["wk"].append(wk.T.reshape(c.dim, c.n_kv_heads, c.head_dim))
        layers["wv"].append(get(p + "attn_v.weight").T.reshape(c.dim, c.n_kv_heads, c.head_dim))
        layers["wo"].append(get(p + "attn_output.weight").T.reshape(c.n_heads, c.head_dim,
                                                                     c.dim))
        layers["mlp_norm"].append(get(p + "ffn_norm.weight"))
        layers["w_gate"].append(get(p + "ffn_gate.weight").T)
        layers["w_up"].append(get(p + "ffn_up.weight").T)
        layers["w_down"].append(get(p + "ffn_down.weight").T)
    params = {
        "embed": get("token_embd.weight"),
        "final_norm": get("output_norm.weight"),
        "layers": {k: np.stack(v) for k, v in layers.items()},
    }
    if not c.tie_embeddings:
        params["lm_head"] = get("output.weight").T
    check_param_shapes(config, params)
    cast = lambda x: np.ascontiguousarray(x, dtype=dtype)  # noqa: E731
    return config, {k: ({kk: cast(vv) for kk, vv in v.items()} if isinstance(v, dict)
                        else cast(v)) for k, v in params.items()}


def check_param_shapes(config: ModelConfig, params) -> None:
    """Raise :class:`CpjaxError` naming the first parameter whose shape does not fit ``config``."""
    import jax

    from cpjax.model.llama import param_shapes

    expected = param_shapes(config)
    got_paths = {jax.tree_util.keystr(p): x.shape
                 for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    for path, want in jax.tree_util.tree_flatten_with_path(expected)[0]:
        key = jax.tree_util.keystr(path)
        require(key in got_paths, f"model {config.name!r}: parameter {key} is missing")
        require(tuple(got_paths[key]) == tuple(want.shape),
                f"model {config.name!r}: parameter {key} has shape {tuple(got_paths[key])}, "
                f"expected {tuple(want.shape)} for this config")
