"""Real SmolLM2 weights on 8 fake CPU devices: context-parallel equals single-device."""

import numpy as np
import pytest

from cpjax.engine import ContextParallel, Engine
from cpjax.loaders import load_model
from cpjax.parallel.mesh import make_mesh
from tests.conftest import REAL_MODELS

pytestmark = [pytest.mark.slow, REAL_MODELS]

TEXT = (
    "Context parallelism splits one long prompt over many devices. Each device holds two "
    "chunks of the sequence, one from the front and one from the back, so that the causal "
    "attention work is the same everywhere. Keys and values travel around a ring. "
)


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2-135m")


@pytest.fixture(scope="module")
def long_ids(smollm2):
    ids = np.asarray(smollm2[2].encode(TEXT * 70), np.int32)[:3001]
    assert ids.size == 3001
    return ids


@pytest.fixture(scope="module")
def single(smollm2):
    return Engine(smollm2[0], smollm2[1])


@pytest.fixture(scope="module")
def single_scores(single, long_ids):
    return single.score(long_ids)


@pytest.mark.parametrize("strategy", ["pass_kv", "pass_q"])
def test_scores_of_a_3000_token_prompt_match_single_device(
    smollm2, long_ids, single_scores, strategy
):
    engine = Engine(smollm2[0], smollm2[1], ContextParallel(mesh=make_mesh(8), strategy=strategy))
    assert np.abs(engine.score(long_ids) - single_scores).max() < 1e-4
    # Partial prefill against the persistent cache: K not a multiple of 2N = 16, then 3 turns.
    assert np.abs(engine.score(long_ids, split_at=1203) - single_scores).max() < 1e-4
    assert np.abs(engine.score(long_ids, split_at=[1600, 2400]) - single_scores).max() < 1e-4


@pytest.mark.parametrize("decode", ["allreduce", "ring_pass_q"])
def test_greedy_generation_matches_single_device(smollm2, single, decode):
    tokenizer = smollm2[2]
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}]
    )
    ids = tokenizer.encode(prompt)
    engine = Engine(
        smollm2[0],
        smollm2[1],
        ContextParallel(mesh=make_mesh(8), strategy="pass_q", decode_strategy=decode),
    )
    want = single.generate(ids, 24, tokenizer.eos_ids)
    assert engine.generate(ids, 24, tokenizer.eos_ids) == want
    assert "Paris" in tokenizer.decode(want)
