"""HF-layout Llama safetensors checkpoints (``config.json`` + ``*.safetensors``) <-> params."""

from __future__ import annotations

import glob
import json
import os

import numpy as np

from cpjax.config import ModelConfig, RopeScaling
from cpjax.errors import require
from cpjax.io import atomic_path

# cpjax layer key -> (HF module path, transform from HF [out, in] to cpjax layout)
_LAYER_KEYS = {
    "attn_norm": "input_layernorm",
    "wq": "self_attn.q_proj",
    "wk": "self_attn.k_proj",
    "wv": "self_attn.v_proj",
    "wo": "self_attn.o_proj",
    "mlp_norm": "post_attention_layernorm",
    "w_gate": "mlp.gate_proj",
    "w_up": "mlp.up_proj",
    "w_down": "mlp.down_proj",
}


def config_from_hf(hf: dict, name: str) -> ModelConfig:
    """``ModelConfig`` from an HF ``LlamaForCausalLM`` ``config.json`` dict."""
    require(hf.get("model_type") == "llama",
            f"model {name!r}: config.json has model_type {hf.get('model_type')!r}; cpjax "
            f"supports 'llama'")
    scaling = hf.get("rope_scaling") or None
    rope = None
    if scaling and scaling.get("rope_type", scaling.get("type")) == "llama3":
        rope = RopeScaling(factor=float(scaling["factor"]),
                           low_freq_factor=float(scaling["low_freq_factor"]),
                           high_freq_factor=float(scaling["high_freq_factor"]),
                           original_max_position_embeddings=int(
                               scaling["original_max_position_embeddings"]))
    eos = hf.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
    heads = int(hf["num_attention_heads"])
    return ModelConfig(
        name=name, vocab_size=int(hf["vocab_size"]), dim=int(hf["hidden_size"]),
        n_layers=int(hf["num_hidden_layers"]), n_heads=heads,
        n_kv_heads=int(hf.get("num_key_value_heads", heads)),
        head_dim=int(hf.get("head_dim") or hf["hidden_size"] // heads),
        ffn_dim=int(hf["intermediate_size"]), norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
        rope_theta=float(hf.get("rope_theta", 10000.0)), rope_scaling=rope,
        max_seq_len=int(hf.get("max_position_embeddings", 8192)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bos_id=hf.get("bos_token_id"), eos_ids=eos_ids)


def config_to_hf(config: ModelConfig) -> dict:
    """The inverse of :func:`config_from_hf`."""
    hf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
          "vocab_size": config.vocab_size, "hidden_size": config.dim,
          "num_hidden_layers": config.n_layers, "num_attention_heads": config.n_heads,
          "num_key_value_heads": config.n_kv_heads, "head_dim": config.head_dim,
          "intermediate_size": config.ffn_dim, "rms_norm_eps": config.norm_eps,
          "rope_theta": config.rope_theta, "max_position_embeddings": config.max_seq_len,
          "tie_word_embeddings": config.tie_embeddings, "bos_token_id": config.bos_id,
          "eos_token_id": list(config.eos_ids) or None, "hidden_act": "silu"}
    if config.rope_scaling is not None:
        s = config.rope_scaling
        hf["rope_scaling"] = {"rope_type": "llama3", "factor": s.factor,
                              "low_freq_factor": s.low_freq_factor,
                              "high_freq_factor": s.high_freq_factor,
                              "original_max_position_embeddings":
                                  s.original_max_position_embeddings}
    return hf


def _read_tensors(directory: str, name: str) -> dict:
    from safetensors import safe_open

    files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    require(files, f"model {name!r}: no *.safetensors files in {directory!r}")
    tensors = {}
    for path in files:
        with safe_open(path, framework="flax") as f:   # jax arrays: bf16 supported
            for key in f.keys():
                tensors[key] = np.asarray(f.get_tensor(key), np.float32)
    return tensors


def load_safetensors(directory, dtype=np.float32):
    """Read an HF-layout Llama checkpoint directory; returns ``(ModelConfig, params)``."""
    from cpjax.loaders.gguf import check_param_shapes

    directory = os.fspath(directory)
    require(os.path.isdir(directory), f"model directory {directory!r} does not exist")
    config_path = os.path.join(directory, "config.json")
    require(os.path.isfile(config_path), f"model directory {directory!r} has no config.json")
    with open(config_path, encoding="utf-8") as f:
        config = config_from_hf(json.load(f), os.path.basename(os.path.normpath(directory)))
    tensors = _read_tensors(directory, config.name)

    def get(key):
        require(key in tensors, f"model {config.name!r}: checkpoint has no tensor {key!r}")
        return tensors[key]

    c = config
    reshape = {"wq": (c.dim, c.n_heads, c.head_dim), "wk": (c.dim, c.n_kv_heads, c.head_dim),
               "wv": (c.dim, c.n_kv_heads, c.head_dim), "wo": (c.n_heads, c.head_dim, c.dim)}
    layers = {}
    for key, module in _LAYER_KEYS.items():
        per_layer = []
        for i in range(c.n_layers):
            w = get(f"model.layers.{i}.{module}.weight")
            w = w if w.ndim == 1 else w.T
            per_layer.append(w.reshape(reshape[key]) if key in reshape else w)
        layers[key] = np.stack(per_layer)
    params = {"embed": get("model.embed_tokens.weight"), "final_norm": get("model.norm.weight"),
              "layers": layers}
    if not c.tie_embeddings:
        params["lm_head"] = get("lm_head.weight").T
    check_param_shapes(config, params)
    return config, _cast(params, dtype)


def _cast(params, dtype):
    if isinstance(params, dict):
        return {k: _cast(v, dtype) for k, v in params.items()}
    return np.ascontiguousarray(params, dtype=dtype)


def save_safetensors(directory, config: ModelConfig, params) -> None:
    """Write ``config.json`` and ``model.safetensors`` (fp32, HF layout), each atomically."""
    from safetensors.numpy import save_file

    from cpjax.io import write_json

    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    c = config
    tensors = {"model.embed_tokens.weight": np.asarray(params["embed"], np.float32),
               "model.norm.weight": np.asarray(params["final_norm"], np.float32)}
    if not c.tie_embeddings:
        tensors["lm_head.weight"] = np.ascontiguousarray(np.asarray(params["lm_head"],
                                                                    np.float32).T)
    for key, module in _LAYER_KEYS.items():
        stacked = np.asarray(params["layers"][key], np.float32)
        for i in range(c.n_layers):
            w = stacked[i]
            if w.ndim > 1:
                w = w.reshape(-1, w.shape[-1]) if key == "wo" else w.reshape(w.shape[0], -1)
                w = w.T
            tensors[f"model.layers.{i}.{module}.weight"] = np.ascontiguousarray(w)
    with atomic_path(os.path.join(directory, "model.safetensors"), ".safetensors") as tmp:
        save_file(tensors, tmp)
    write_json(os.path.join(directory, "config.json"), config_to_hf(config))
