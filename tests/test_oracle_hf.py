"""Parity with HF transformers (CPU torch, fp32) on the embedded SmolLM2 GGUF: the oracle."""

import numpy as np
import pytest

from cpjax.engine import Engine
from cpjax.loaders import embedded_gguf_path, load_model
from tests.conftest import REAL_MODELS

pytestmark = [pytest.mark.oracle, REAL_MODELS]
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

STORY = (
    "The lighthouse keeper kept a logbook of every ship that passed the rocky point. "
    "Some nights the fog was so thick that he rang the bell until dawn, and in the morning "
    "he wrote down the names of the sailors who waved to him from their decks. "
)


@pytest.fixture(scope="module")
def ours():
    config, params, tokenizer = load_model("smollm2-135m")
    return Engine(config, params), tokenizer


@pytest.fixture(scope="module")
def hf_model():
    path = embedded_gguf_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(scope="module")
def hf_tokenizer():
    path = embedded_gguf_path()
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.fixture(scope="module")
def chat_ids(ours):
    _, tokenizer = ours
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": STORY * 5 + "Summarise the story in one sentence."}]
    )
    ids = np.asarray(tokenizer.encode(prompt), np.int32)
    assert 250 <= ids.size <= 400
    return ids


def test_dequantized_weights_equal_hf_after_unpermuting_qk(ours, hf_model):
    engine, _ = ours
    layer = hf_model.model.layers[0].self_attn
    for ours_key, hf_weight in (
        ("wq", layer.q_proj.weight),
        ("wk", layer.k_proj.weight),
        ("wv", layer.v_proj.weight),
    ):
        mine = np.asarray(engine.params["layers"][ours_key][0]).reshape(576, -1).T
        np.testing.assert_allclose(mine, hf_weight.detach().numpy(), atol=1e-6)


def test_logits_of_a_chat_prompt_match_hf(ours, hf_model, chat_ids):
    engine, _ = ours
    with torch.inference_mode():
        want = hf_model(torch.from_numpy(chat_ids).long()[None]).logits[0].numpy()
    got = engine.logits(chat_ids)
    assert np.abs(got - want).max() < 1e-3


def test_twenty_greedy_tokens_match_hf(ours, hf_model, chat_ids):
    engine, _ = ours
    with torch.inference_mode():
        out = hf_model.generate(
            torch.from_numpy(chat_ids).long()[None],
            max_new_tokens=20,
            min_new_tokens=20,
            do_sample=False,
            pad_token_id=0,
        )
    want = out[0, chat_ids.size :].tolist()
    assert engine.generate(chat_ids, 20) == want


def test_chat_template_and_token_ids_match_hf(ours, hf_tokenizer):
    _, tokenizer = ours
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    assert tokenizer.apply_chat_template(messages) == hf_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    # HF's GGUF converter ignores SmolLM's digit splitting, so compare digit-free texts only.
    for text in [
        "Hello world!",
        "  leading spaces and\nnew lines\n\n",
        "def f(x):\n    return x**2",
        "naïve café — 東京 🚀",
        "<|im_start|>user\nhi<|im_end|>\n",
        STORY,
    ]:
        assert tokenizer.encode(text) == hf_tokenizer.encode(text, add_special_tokens=False)
