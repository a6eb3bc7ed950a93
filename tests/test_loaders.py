"""Loaders: GGUF (written here and the embedded SmolLM2), safetensors, tokenizer, errors."""

import os
import shutil

import numpy as np
import pytest

from cpjax.config import PRESETS
from cpjax.errors import CpjaxError
from cpjax.loaders import (
    embedded_gguf_path,
    load_gguf,
    load_model,
    load_safetensors,
    save_safetensors,
)
from cpjax.loaders.tokenizer import Tokenizer
from cpjax.model.families import unpermute_rope_rows

CFG = PRESETS["tiny"]


def _permute_like_llama_cpp(w, n_heads):
    rows, cols = w.shape
    return w.reshape(n_heads, 2, rows // n_heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _write_tiny_gguf(path, params, arch="llama", quantize_ffn=True):
    """A GGUF file in llama.cpp's conventions (Q/K rows permuted, [out, in] weights)."""
    import gguf

    c = CFG
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(c.n_layers)
    writer.add_context_length(c.max_seq_len)
    writer.add_embedding_length(c.dim)
    writer.add_feed_forward_length(c.ffn_dim)
    writer.add_head_count(c.n_heads)
    writer.add_head_count_kv(c.n_kv_heads)
    writer.add_rope_freq_base(c.rope_theta)
    writer.add_layer_norm_rms_eps(c.norm_eps)
    f32 = lambda x: np.ascontiguousarray(np.asarray(x, np.float32))  # noqa: E731
    writer.add_tensor("token_embd.weight", f32(params["embed"]))
    writer.add_tensor("output_norm.weight", f32(params["final_norm"]))
    writer.add_tensor("output.weight", f32(np.asarray(params["lm_head"]).T))
    lay = params["layers"]
    for i in range(c.n_layers):
        p = f"blk.{i}."
        wq = np.asarray(lay["wq"][i]).reshape(c.dim, -1).T
        wk = np.asarray(lay["wk"][i]).reshape(c.dim, -1).T
        writer.add_tensor(p + "attn_q.weight", f32(_permute_like_llama_cpp(wq, c.n_heads)))
        writer.add_tensor(p + "attn_k.weight", f32(_permute_like_llama_cpp(wk, c.n_kv_heads)))
        writer.add_tensor(p + "attn_v.weight", f32(np.asarray(lay["wv"][i]).reshape(c.dim, -1).T))
        writer.add_tensor(
            p + "attn_output.weight", f32(np.asarray(lay["wo"][i]).reshape(-1, c.dim).T)
        )
        writer.add_tensor(p + "attn_norm.weight", f32(lay["attn_norm"][i]))
        writer.add_tensor(p + "ffn_norm.weight", f32(lay["mlp_norm"][i]))
        for name, key in (("ffn_gate", "w_gate"), ("ffn_up", "w_up"), ("ffn_down", "w_down")):
            w = f32(np.asarray(lay[key][i]).T)
            if quantize_ffn:
                q = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0)
                writer.add_tensor(p + name + ".weight", q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            else:
                writer.add_tensor(p + name + ".weight", w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_unpermute_inverts_llama_cpp_permutation():
    w = np.random.default_rng(0).standard_normal((4 * 16, 8))
    np.testing.assert_array_equal(unpermute_rope_rows(_permute_like_llama_cpp(w, 4), 4), w)


def test_tiny_gguf_round_trip(tmp_path, tiny_params):
    path = tmp_path / "tiny.gguf"
    _write_tiny_gguf(path, tiny_params)
    config, params = load_gguf(path)
    assert (
        config.dim,
        config.n_layers,
        config.n_heads,
        config.n_kv_heads,
        config.ffn_dim,
        config.vocab_size,
        config.tie_embeddings,
    ) == (64, 2, 4, 2, 128, 256, False)
    exact = ["wq", "wk", "wv", "wo", "attn_norm", "mlp_norm"]
    for key in exact:
        np.testing.assert_array_equal(params["layers"][key], tiny_params["layers"][key])
    for key in ("w_gate", "w_up", "w_down"):  # Q8_0: 8-bit blocks of 32
        want = np.asarray(tiny_params["layers"][key])
        assert np.abs(params["layers"][key] - want).max() < 0.01 * np.abs(want).max()
    np.testing.assert_array_equal(params["lm_head"], tiny_params["lm_head"])


def test_gguf_errors(tmp_path, tiny_params):
    with pytest.raises(CpjaxError, match="does not exist"):
        load_gguf(tmp_path / "missing.gguf")
    good = tmp_path / "tiny.gguf"
    _write_tiny_gguf(good, tiny_params, quantize_ffn=False)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CpjaxError, match="truncated"):
        load_gguf(truncated)
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(CpjaxError, match="not a readable GGUF file"):
        load_gguf(garbage)
    other = tmp_path / "gpt2.gguf"
    _write_tiny_gguf(other, tiny_params, arch="gpt2", quantize_ffn=False)
    with pytest.raises(CpjaxError, match="architecture is 'gpt2'"):
        load_gguf(other)


def test_safetensors_round_trip_and_errors(tmp_path, tiny_params):
    save_safetensors(tmp_path / "ckpt", CFG, tiny_params)
    config, params = load_safetensors(tmp_path / "ckpt")
    assert config.dim == CFG.dim and config.tie_embeddings is False
    import jax

    jax.tree.map(np.testing.assert_array_equal, params, jax.tree.map(np.asarray, tiny_params))
    with pytest.raises(CpjaxError, match="does not exist"):
        load_safetensors(tmp_path / "nope")
    bert = tmp_path / "bert"
    shutil.copytree(tmp_path / "ckpt", bert)
    (bert / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(CpjaxError, match="model_type 'bert'"):
        load_safetensors(bert)


@pytest.mark.parametrize("tied", [False, True])
def test_the_table_round_trips_through_safetensors_export_and_load(tmp_path, tied):
    """Export writes exactly the table's HF names and ``[out, in]`` shapes; loading them back
    gives the params bit for bit (tied models have no ``lm_head``)."""
    import dataclasses

    import jax
    from safetensors.numpy import load_file

    from cpjax.model import params as table
    from cpjax.model.decoder import init_params
    from cpjax.model.families import LLAMA as PARAMS

    config = dataclasses.replace(CFG, tie_embeddings=tied)
    params = jax.tree.map(np.asarray, init_params(config, seed=1))
    save_safetensors(tmp_path / "ckpt", config, params)
    tensors = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    assert sorted(tensors) == sorted(table.tensor_names(PARAMS, config, "hf"))
    assert ("lm_head.weight" in tensors) == (not tied)
    q = tensors["model.layers.1.self_attn.q_proj.weight"]
    assert q.shape == (CFG.n_heads * CFG.head_dim, CFG.dim)
    np.testing.assert_array_equal(
        q.T.reshape(CFG.dim, CFG.n_heads, CFG.head_dim), params["layers"]["wq"][1]
    )
    loaded_config, loaded = load_safetensors(tmp_path / "ckpt")
    assert loaded_config.tie_embeddings is tied
    assert jax.tree.structure(loaded) == jax.tree.structure(params)
    for got, want in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
        assert got.dtype == want.dtype and got.tobytes() == want.tobytes()


def test_safetensors_bf16_checkpoint_loads(tmp_path, tiny_params):
    import jax.numpy as jnp
    from safetensors.flax import load_file, save_file

    save_safetensors(tmp_path / "ckpt", CFG, tiny_params)
    path = tmp_path / "ckpt" / "model.safetensors"
    tensors = {k: v.astype(jnp.bfloat16) for k, v in load_file(str(path)).items()}
    save_file(tensors, str(path))
    _, params = load_safetensors(tmp_path / "ckpt")
    want = np.asarray(tiny_params["layers"]["wq"])
    assert np.abs(params["layers"]["wq"] - want).max() < 0.01 * np.abs(want).max()


def test_unknown_model_and_shape_only_presets():
    with pytest.raises(CpjaxError, match="unknown model preset 'llama9'"):
        load_model("llama9")
    with pytest.raises(CpjaxError, match="'llama3-8b' has no embedded weights"):
        load_model("llama3-8b")


# ------------------------------------------------------------------ the embedded SmolLM2
@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2-135m")


def test_embedded_smollm2_config_and_params(smollm2):
    config, params, _ = smollm2
    preset = PRESETS["smollm2-135m"]
    for field in (
        "vocab_size",
        "dim",
        "n_layers",
        "n_heads",
        "n_kv_heads",
        "head_dim",
        "ffn_dim",
        "rope_theta",
        "max_seq_len",
        "tie_embeddings",
        "bos_id",
        "eos_ids",
    ):
        assert getattr(config, field) == getattr(preset, field), field
    assert config.norm_eps == pytest.approx(preset.norm_eps)
    assert "lm_head" not in params
    assert params["layers"]["wq"].shape == (30, 576, 9, 64)
    assert all(np.isfinite(x).all() for x in (params["embed"], params["layers"]["wk"]))
    assert os.path.basename(embedded_gguf_path()) == "SmolLM2-135M-Instruct.Q4_1.gguf"


TEXTS = [
    "Hello world!",
    "  leading spaces and\nnew lines\n\n",
    "def f(x):\n    return x**2",
    "naïve café — 東京 🚀",
    "<|im_start|>user\nhi<|im_end|>\n",
    "The year 1984.",
]


def test_tokenizer_round_trip_and_special_tokens(smollm2):
    tok = smollm2[2]
    for text in TEXTS:
        assert tok.decode(tok.encode(text), skip_special=False) == text
    assert tok.encode("<|im_start|>") == [1] and tok.eos_ids == (2,)
    assert tok.encode("12345") == [tok.encode(d)[0] for d in "12345"]  # SmolLM splits digits
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}])
    assert prompt.endswith("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")


def test_tokenizer_without_template_and_from_file(tmp_path, smollm2):
    tok = smollm2[2]
    tok.backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text('{"eos_token": "<|im_end|>"}')
    again = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert again.encode(TEXTS[3]) == tok.encode(TEXTS[3]) and again.eos_ids == (2,)
    with pytest.raises(CpjaxError, match="no chat template"):
        again.apply_chat_template([{"role": "user", "content": "x"}])
