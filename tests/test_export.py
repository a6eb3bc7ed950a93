"""``python -m cpjax export``: an HF directory that transformers loads with cpjax's logits and
token ids (tiny random Llama, Mistral, Qwen2 and Gemma 3 models, the embedded SmolLM2), and
one-line errors for user mistakes."""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest

from cpjax.cli import main
from cpjax.config import PRESETS
from cpjax.engine import Engine
from cpjax.errors import CpjaxError
from cpjax.loaders import embedded_gguf_path, export_hf, load_model
from cpjax.loaders.hf_config import config_from_hf
from cpjax.loaders.source import cached_gguf_tokenizer
from cpjax.model.decoder import init_params
from tests.conftest import REAL_MODELS

LENGTH = 48  # longer than every window below


def _hf():
    """(torch, transformers), or skip."""
    return pytest.importorskip("torch"), pytest.importorskip("transformers")


def _export_cli(out, model, capsys) -> dict:
    main(["export", "--model", model, "--out", str(out)])
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def _hf_logits(out, ids) -> np.ndarray:
    torch, transformers = _hf()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(out), dtype=torch.float32, attn_implementation="eager"
    ).eval()
    with torch.inference_mode():
        return model(torch.from_numpy(np.asarray(ids)).long()[None]).logits[0].numpy()


def _ids(n=LENGTH, vocab=256, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, n).astype(np.int32)


def _assert_one_line_error(status, stderr, message):
    assert status == 2, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], stderr


# ------------------------------------------------------------------ user mistakes
def test_export_refuses_a_used_out_and_an_unknown_model(tmp_path, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    (tmp_path / "file").write_text("x")
    cases = [
        (["--out", str(tmp_path / "full")], "exists and is not an empty folder"),
        (["--out", str(tmp_path / "file")], "exists and is not an empty folder"),
        (["--model", "nosuch", "--out", str(tmp_path / "new")], "unknown model preset 'nosuch'"),
        (
            ["--model", "llama3-8b", "--out", str(tmp_path / "new")],
            "'llama3-8b' has no embedded weights",
        ),
    ]
    for args, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(["export", *args])
        _assert_one_line_error(exit_info.value.code, capsys.readouterr().err, message)
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    assert sorted(os.listdir(tmp_path)) == ["file", "full"]


def test_a_failed_export_leaves_nothing_behind(tmp_path):
    config = dataclasses.replace(
        PRESETS["tiny"], sliding_window=8, layer_types=("full", "sliding")
    )  # a Llama-family mix of layer types has no HF config.json
    with pytest.raises(CpjaxError, match="has no HF config.json form"):
        export_hf(tmp_path / "out", config, init_params(config, 0))
    assert os.listdir(tmp_path) == []


def test_a_bfloat16_checkpoint_exports_as_float32(tmp_path, capsys, tiny_params):
    """``--model`` a cpjax checkpoint (params in bf16): the export holds the same values in
    float32 and reads back into cpjax with the tokenizer."""
    import jax.numpy as jnp

    from cpjax.loaders.byte_tokenizer import ByteTokenizer
    from cpjax.loaders.checkpoint import save_checkpoint

    bf16 = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), tiny_params)
    save_checkpoint(tmp_path / "ckpt", PRESETS["tiny"], bf16, ByteTokenizer())
    report = _export_cli(tmp_path / "hf", str(tmp_path / "ckpt"), capsys)
    assert report["model"] == "tiny" and report["tokenizer"] is True
    _, params, tokenizer = load_model(str(tmp_path / "hf"))
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(bf16)):
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, np.asarray(want, np.float32))
    assert tokenizer.encode("hé") == list("hé".encode("utf-8"))


# ------------------------------------------------------------------ tiny models vs transformers
@pytest.mark.oracle
def test_tiny_exported_by_the_cli_loads_in_transformers_with_equal_logits(
    tmp_path, capsys, tiny_params
):
    _, transformers = _hf()
    out = tmp_path / "tiny-hf"
    out.mkdir()  # an empty folder is replaced
    report = _export_cli(out, "tiny", capsys)
    assert report["files"] == [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    ids = _ids()
    want = Engine(PRESETS["tiny"], tiny_params).logits(ids)
    assert np.abs(_hf_logits(out, ids) - want).max() < 1e-5
    text = "héllo, 東京 🚀\n"
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))
    assert hf_tokenizer.encode(text) == list(text.encode("utf-8"))  # the byte tokenizer's ids
    assert hf_tokenizer.decode(list(text.encode("utf-8"))) == text
    config, params, tokenizer = load_model(str(out))  # and back into cpjax
    assert dataclasses.replace(config, name="tiny") == PRESETS["tiny"]
    for got, expected in zip(jax.tree.leaves(params), jax.tree.leaves(tiny_params)):
        np.testing.assert_array_equal(got, expected)
    assert tokenizer.encode(text) == list(text.encode("utf-8"))


_COMMON = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=1024,
    rms_norm_eps=1e-6,
)

#: HF config.json dicts of tiny models: every switch of each family that export must carry.
FAMILIES = {
    "llama3-rope-tied": dict(
        _COMMON,
        model_type="llama",
        num_hidden_layers=2,
        tie_word_embeddings=True,
        rope_theta=500000.0,
        rope_scaling=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=16,
        ),
    ),
    "mistral-window": dict(
        _COMMON, model_type="mistral", num_hidden_layers=2, sliding_window=5, rope_theta=2e4
    ),
    "qwen2-windows-tied": dict(
        _COMMON,
        model_type="qwen2",
        num_hidden_layers=3,
        use_sliding_window=True,
        sliding_window=16,
        max_window_layers=1,
        tie_word_embeddings=True,
        rope_theta=1e6,
    ),
    "gemma3": dict(
        _COMMON,
        model_type="gemma3_text",
        head_dim=32,
        num_hidden_layers=3,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        sliding_window=37,
        query_pre_attn_scalar=24,
        rope_scaling={"rope_type": "linear", "factor": 2.0},
        rope_theta=5e5,  # HF's defaults are 1e6 and 1e4
        rope_local_base_freq=2e4,
        hidden_activation="gelu_pytorch_tanh",
    ),
}


def _random_params(config, seed=0):
    """``init_params`` plus noise on every leaf (norm weights and biases too), so that every
    term of the forward pass shows in the logits."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda x: (np.asarray(x) + 0.1 * rng.standard_normal(x.shape)).astype(np.float32),
        init_params(config, seed),
    )


@pytest.mark.oracle
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_tiny_families_export_with_equal_logits(tmp_path, family):
    config = config_from_hf(FAMILIES[family], family, "test")
    params = _random_params(config)
    export_hf(tmp_path / family, config, params)
    ids = _ids()
    want = Engine(config, params).logits(ids)
    assert np.abs(want).max() > 1.0  # the weights matter
    assert np.abs(_hf_logits(tmp_path / family, ids) - want).max() < 1e-4
    again, _, _ = load_model(str(tmp_path / family))
    assert dataclasses.replace(again, name=family) == config


@pytest.mark.oracle
def test_a_bos_prepending_tokenizer_exports_its_bos(tmp_path):
    """A model whose text starts with BOS (``add_bos_token``, like Gemma): HF's default
    ``encode`` prepends it, cpjax's ``encode(add_bos=True)`` equally."""
    _, transformers = _hf()
    from cpjax.loaders.tokenizer import Tokenizer
    from cpjax.loaders.vocab import byte_vocabulary

    backend = byte_vocabulary()
    backend.add_special_tokens(["<bos>"])  # id 256
    tokenizer = Tokenizer(
        backend,
        bos_id=256,
        eos_ids=(),
        chat_template=None,
        special_tokens={"bos_token": "<bos>"},
        add_bos_token=True,
    )
    config = dataclasses.replace(PRESETS["tiny"], vocab_size=257, bos_id=256)
    export_hf(tmp_path / "out", config, init_params(config, 0), tokenizer)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    assert hf.encode("hi") == [256, 104, 105] == tokenizer.encode("hi", add_bos=True)
    assert hf.encode("hi", add_special_tokens=False) == [104, 105]
    _, _, again = load_model(str(tmp_path / "out"))
    assert again.add_bos_token and again.encode("hi", add_bos=True) == [256, 104, 105]


# ------------------------------------------------------------------ the embedded SmolLM2
@pytest.fixture(scope="module")
def smollm2_export(tmp_path_factory):
    """The embedded SmolLM2 exported through the CLI, and cpjax's (config, params, tokenizer)
    read back from it."""
    out = tmp_path_factory.mktemp("smollm2") / "hf"
    main(["export", "--model", "smollm2-135m", "--out", str(out)])
    return out, load_model(str(out))


TEXTS = [
    "Hello world!",
    "  leading spaces and\nnew lines\n\n",
    "def f(x):\n    return x**2",
    "naïve café — 東京 🚀 The year 1984.",
    "<|im_start|>user\nhi<|im_end|>\n",
]


@pytest.mark.oracle
@REAL_MODELS
@pytest.mark.slow  # with the export (20 s) over 30 s on 2 cores
def test_smollm2_export_loads_in_transformers_with_equal_logits(smollm2_export):
    out, (config, params, tokenizer) = smollm2_export
    assert config.tie_embeddings and "lm_head" not in params
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = np.asarray(tokenizer.encode(tokenizer.apply_chat_template(messages)), np.int32)[:16]
    want = Engine(config, params).logits(ids)
    got = _hf_logits(out, ids)
    # fp32 rounding through 30 layers: 1.8e-4 measured, with logits up to ~30
    assert np.abs(got - want).max() < 5e-4 and (got.argmax(-1) == want.argmax(-1)).all()


@pytest.mark.oracle
@REAL_MODELS
@pytest.mark.slow  # with the export (20 s) over 30 s on 2 cores
def test_smollm2_export_tokenizer_equals_cpjax(smollm2_export):
    _, transformers = _hf()
    out, (_, _, tokenizer) = smollm2_export
    hf = transformers.AutoTokenizer.from_pretrained(str(out))
    original = cached_gguf_tokenizer(embedded_gguf_path())
    for text in TEXTS:
        assert hf.encode(text) == original.encode(text) == tokenizer.encode(text), text
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    assert hf.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    ) == original.apply_chat_template(messages)
    assert (hf.bos_token, hf.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert tokenizer.eos_ids == original.eos_ids and tokenizer.bos_id == original.bos_id
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation == {"bos_token_id": 1, "eos_token_id": 2}
