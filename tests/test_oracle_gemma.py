"""Gemma 3 270M (the second embedded model) against HF transformers on the same GGUF (fp32):
a document of over 3 000 tokens, six times the 512-token window of its local layers, whose one
fact sits at the start, so only the global layers can carry it to the question at the end."""

import numpy as np
import pytest

from cpjax.engine import ContextParallel, Engine
from cpjax.loaders import load_model
from cpjax.loaders.embedded import gemma_gguf_path
from cpjax.parallel.mesh import make_mesh

pytestmark = [pytest.mark.oracle, pytest.mark.slow]
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
def hf_model(ours):
    path = gemma_gguf_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32, attn_implementation="eager"
    )
    return model.eval()


@pytest.fixture(scope="module")
def ids(ours):
    _, _, tokenizer = ours
    ids = np.asarray(tokenizer.encode(_document(), add_bos=True), np.int32)
    assert ids.size >= 3000 and ids[0] == 2
    return ids


def test_tokenizer_ids_equal_hf(ours):
    _, _, tokenizer = ours
    path = gemma_gguf_path()
    hf = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    texts = ["Hello world!", "  two\n\nlines  ", "naïve café — 東京 🚀 ²½", "\t\x01", _document()]
    for text in texts:
        assert tokenizer.encode(text) == hf.encode(text, add_special_tokens=False)
    assert tokenizer.encode("Hi", add_bos=True) == hf.encode("Hi")


def test_document_logprobs_equal_hf_single_device_and_both_rings(ours, hf_model, ids):
    config, params, _ = ours
    with torch.inference_mode():
        logits = hf_model(torch.from_numpy(ids).long()[None]).logits[0].double()
    want = torch.log_softmax(logits, -1)[:-1].gather(-1, torch.from_numpy(ids[1:]).long()[:, None])
    want = want[:, 0].numpy()
    assert np.abs(Engine(config, params).score(ids) - want).max() <= 2e-3
    for strategy in ("pass_kv", "pass_q"):
        engine = Engine(config, params, ContextParallel(make_mesh(8), strategy=strategy))
        assert np.abs(engine.score(ids) - want).max() <= 2e-3, strategy


def test_fact_beyond_the_window_answered_like_hf(ours, hf_model, ids):
    config, params, tokenizer = ours
    fact_end = len(tokenizer.encode(FACT, add_bos=True))
    assert ids.size - fact_end > 5 * config.sliding_window  # only global layers reach it
    with torch.inference_mode():
        out = hf_model.generate(
            torch.from_numpy(ids).long()[None], max_new_tokens=6, do_sample=False
        )
    want = out[0, ids.size :].tolist()
    got = Engine(config, params).generate(ids, 6)
    cp = Engine(config, params, ContextParallel(make_mesh(8), strategy="pass_kv"))
    assert got == want == cp.generate(ids, 6)
    assert "Theodora Quill" in tokenizer.decode(got)
