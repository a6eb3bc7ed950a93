"""Gemma 3 270M (the second embedded model) against HF transformers on the same GGUF (fp32):
a document of over 3 000 tokens, six times the 512-token window of its local layers, whose one
fact sits at the start, so only the global layers can carry it to the question at the end.

HF's results are computed once per module and its model is then freed: its full logits of the
document (3 447 x 262 144 fp32, 3.6 GB) never exist, the head is applied in chunks that keep only
the log-probability of each next token."""

import gc

import numpy as np
import pytest

from cpjax.engine import ContextParallel, Engine
from cpjax.loaders import load_model
from cpjax.loaders.embedded import gemma_gguf_path
from cpjax.parallel.mesh import make_mesh
from tests.conftest import REAL_MODELS

pytestmark = [pytest.mark.oracle, pytest.mark.slow, REAL_MODELS]
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

FACT = "Remember this: the keeper of the lighthouse on Gull Island is named Theodora Quill. "
QUESTION = (
    "\n\nQuestion: What is the name of the keeper of the lighthouse on Gull Island?\n"
    "Answer: The keeper of the lighthouse on Gull Island is named"
)


def _document() -> str:
    rng = np.random.default_rng(0)
    words = (
        ["The harbour master", "A fisherman", "The baker", "An old sailor", "The mayor"],
        ["walked along", "painted", "visited", "talked about", "repaired", "sketched"],
        ["the north pier", "the red boats", "the market square", "the stone bridge"],
        ["in the morning", "after the storm", "before lunch", "at dusk", "at low tide"],
    )
    filler = " ".join(" ".join(rng.choice(w) for w in words) + "." for _ in range(330))
    return FACT + filler + QUESTION


@pytest.fixture(scope="module")
def ours():
    try:
        return load_model("gemma3-270m")
    except Exception as exc:  # the gemma extra is not installed
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def ids(ours):
    _, _, tokenizer = ours
    ids = np.asarray(tokenizer.encode(_document(), add_bos=True), np.int32)
    assert ids.size >= 3000 and ids[0] == 2
    return ids


HEAD_CHUNK = 256  # rows of logits (x 262 144 vocab) that exist at once on the HF side
NEW_TOKENS = 6


def _hf_token_logprobs(model, ids: np.ndarray) -> np.ndarray:
    """float64 log-probabilities of ``ids[1:]`` by HF, each given its prefix: the decoder's
    final hidden states once, then its ``lm_head`` and a float64 log-softmax chunk by chunk
    (Gemma3ForCausalLM's forward; cpjax rejects the final soft-capping it would also apply)."""
    assert model.config.final_logit_softcapping is None
    with torch.inference_mode():
        hidden = model.model(torch.from_numpy(ids).long()[None]).last_hidden_state[0, :-1]
        targets = torch.from_numpy(ids[1:]).long()[:, None]
        pieces = []
        for start in range(0, hidden.shape[0], HEAD_CHUNK):
            rows = slice(start, start + HEAD_CHUNK)
            logprobs = torch.log_softmax(model.lm_head(hidden[rows]).double(), -1)
            pieces.append(logprobs.gather(-1, targets[rows])[:, 0].numpy())
    return np.concatenate(pieces)


def _hf_greedy(model, ids: np.ndarray) -> list:
    """HF's greedy continuation of ``ids`` (generate computes only the last row's logits)."""
    with torch.inference_mode():
        out = model.generate(
            torch.from_numpy(ids).long()[None], max_new_tokens=NEW_TOKENS, do_sample=False
        )
    return out[0, ids.size :].tolist()


@pytest.fixture(scope="module")
def hf(ours, ids):
    """HF's document log-probabilities and greedy continuation; its model is freed before any
    cpjax engine runs."""
    path = gemma_gguf_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    result = {"logprobs": _hf_token_logprobs(model, ids), "greedy": _hf_greedy(model, ids)}
    del model
    gc.collect()
    return result


def test_tokenizer_ids_equal_hf(ours):
    _, _, tokenizer = ours
    path = gemma_gguf_path()
    hf = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    texts = ["Hello world!", "  two\n\nlines  ", "naïve café — 東京 🚀 ²½", "\t\x01", _document()]
    for text in texts:
        assert tokenizer.encode(text) == hf.encode(text, add_special_tokens=False)
    assert tokenizer.encode("Hi", add_bos=True) == hf.encode("Hi")


def test_document_logprobs_equal_hf_single_device_and_both_rings(ours, hf, ids):
    config, params, _ = ours
    want = hf["logprobs"]
    assert np.abs(Engine(config, params).score(ids) - want).max() <= 2e-3
    for strategy in ("pass_kv", "pass_q"):
        engine = Engine(config, params, ContextParallel(make_mesh(8), strategy=strategy))
        assert np.abs(engine.score(ids) - want).max() <= 2e-3, strategy


def test_fact_beyond_the_window_answered_like_hf(ours, hf, ids):
    config, params, tokenizer = ours
    fact_end = len(tokenizer.encode(FACT, add_bos=True))
    assert ids.size - fact_end > 5 * config.sliding_window  # only global layers reach it
    got = Engine(config, params).generate(ids, NEW_TOKENS)
    cp = Engine(config, params, ContextParallel(make_mesh(8), strategy="pass_kv"))
    assert got == hf["greedy"] == cp.generate(ids, NEW_TOKENS)
    assert "Theodora Quill" in tokenizer.decode(got)
