"""Model families against HF transformers: tiny random checkpoints written by ``transformers``
(``save_pretrained``), loaded by cpjax, compared in fp32 single-device, then every
context-parallel path against cpjax's single-device result (windows smaller than a layout
chunk, spanning several chunks, and longer than the sequence)."""

import numpy as np
import pytest

from cpjax.engine import ContextParallel, Engine
from cpjax.loaders import load_model
from cpjax.parallel.mesh import make_mesh

pytestmark = pytest.mark.oracle
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

LENGTH = 151  # odd: every mesh pads it
COMMON = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=1024,
    rms_norm_eps=1e-6,
    attn_implementation="eager",
)


def _llama3():
    rope = dict(
        rope_type="llama3",
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=64,
        rope_theta=500000.0,
    )
    return transformers.LlamaConfig(num_hidden_layers=2, rope_parameters=rope, **COMMON)


def _mistral(window):
    return lambda: transformers.MistralConfig(
        num_hidden_layers=2, sliding_window=window, rope_theta=10000.0, **COMMON
    )


def _qwen2():
    return transformers.Qwen2Config(
        num_hidden_layers=3,
        use_sliding_window=True,
        sliding_window=16,
        max_window_layers=1,  # layers 1 and 2 slide, layer 0 is global
        tie_word_embeddings=True,
        rope_theta=1_000_000.0,
        **COMMON,
    )


def _gemma3():
    common = dict(COMMON, head_dim=32)
    return transformers.Gemma3TextConfig(
        num_hidden_layers=3,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        sliding_window=37,
        query_pre_attn_scalar=24,  # not head_dim: the score scale must come from it
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
        },
        **common,
    )


FAMILIES = {
    "llama3": _llama3,
    "mistral-w5": _mistral(5),  # smaller than a layout chunk at N = 8
    "mistral-w400": _mistral(400),  # longer than the sequence
    "qwen2": _qwen2,
    "gemma3": _gemma3,
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    """(name, HF model, cpjax config, params) of a tiny random checkpoint on disk."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(FAMILIES[request.param]())
    with torch.no_grad():  # larger weights than HF's init, random norms: every term matters
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * (0.3 if p.ndim == 1 else 0.12))
    model = model.float().eval()
    directory = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(directory)
    config, params, _ = load_model(str(directory))
    return request.param, model, config, params


def _ids(n=LENGTH, seed=0):
    return np.random.default_rng(seed).integers(0, 256, n).astype(np.int32)


def _hf_logprobs(model, ids):
    with torch.inference_mode():
        logits = model(torch.from_numpy(ids).long()[None]).logits[0].double()
    lp = torch.log_softmax(logits, -1)[:-1]
    return lp.gather(-1, torch.from_numpy(ids[1:]).long()[:, None])[:, 0].numpy()


@pytest.fixture(scope="module")
def single(family):
    """The family's single-device engine, shared by its tests (one trace of each program)."""
    _, _, config, params = family
    return Engine(config, params)


def test_config_and_logprobs_equal_hf(family, single):
    name, model, config, _ = family
    expected_family = {"qwen2": "qwen2", "gemma3": "gemma3"}.get(name, "llama")
    assert config.family == expected_family
    ids = _ids()
    got = single.score(ids)
    assert np.abs(got - _hf_logprobs(model, ids)).max() < 1e-4


WINDOWED = ["gemma3", "mistral-w5", "qwen2"]  # the families whose rings must respect windows
CP_CASES = [
    ((8, 1), "pass_kv"),
    ((4, 1), "pass_q"),
    ((4, 2), "all_gather"),
    pytest.param((4, 2), "pass_kv", marks=pytest.mark.slow),
    pytest.param((8, 1), "pass_q", marks=pytest.mark.slow),
    pytest.param((4, 2), "pass_q", marks=pytest.mark.slow),
    pytest.param((8, 1), "all_gather", marks=pytest.mark.slow),
]


def _score_checks(config, params, single, mesh, strategy, seed):
    engine = Engine(config, params, ContextParallel(make_mesh(*mesh), strategy=strategy))
    ids = _ids(seed=seed)
    want = single.score(ids)
    assert np.abs(engine.score(ids) - want).max() < 1e-5
    if strategy != "all_gather":  # partial prefill on the persistent cache, three turns
        assert np.abs(engine.score(ids, split_at=[40, 97]) - want).max() < 1e-5


@pytest.mark.parametrize("family", WINDOWED, indirect=True)
@pytest.mark.parametrize("mesh, strategy", CP_CASES)
def test_context_parallel_score_equals_single_device(family, single, mesh, strategy):
    _, _, config, params = family
    _score_checks(config, params, single, mesh, strategy, seed=1)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama3", "mistral-w400"], indirect=True)
def test_context_parallel_score_without_windows(family, single):
    _, _, config, params = family
    _score_checks(config, params, single, (8, 1), "pass_kv", seed=1)


@pytest.mark.slow
@pytest.mark.parametrize("family", WINDOWED, indirect=True)
@pytest.mark.parametrize("strategy", ["pass_kv", "pass_q", "all_gather"])
@pytest.mark.parametrize("n", [1, 2, 4])
def test_context_parallel_score_on_small_meshes(family, single, n, strategy):
    _, _, config, params = family
    engine = Engine(config, params, ContextParallel(make_mesh(n), strategy=strategy))
    ids = _ids(seed=2)
    assert np.abs(engine.score(ids) - single.score(ids)).max() < 1e-5


@pytest.mark.parametrize("family", ["gemma3", "mistral-w5"], indirect=True)
@pytest.mark.parametrize("decode", ["allreduce", "ring_pass_q"])
def test_greedy_decode_identical_to_single_device(family, single, decode):
    _, _, config, params = family
    placement = ContextParallel(make_mesh(4), strategy="pass_q", decode_strategy=decode)
    prompt = _ids(61, seed=3)
    assert Engine(config, params, placement).generate(prompt, 12) == single.generate(prompt, 12)
