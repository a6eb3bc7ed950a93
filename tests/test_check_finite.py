"""Check mode (``check_finite=True``): NaN/Inf in an output is an error naming the first layer
where it appears, on one device and on a mesh; without the mode nothing changes."""

import numpy as np
import pytest

from cpjax.config import PRESETS
from cpjax.engine import ContextParallel, Engine
from cpjax.errors import NonFiniteError
from cpjax.parallel.mesh import make_mesh

CONFIG = PRESETS["tiny"]
IDS = np.random.default_rng(0).integers(0, 256, 37).astype(np.int32)


def poisoned(params, name, layer, value):
    """A copy of ``params`` with one element of ``layers/name`` of ``layer`` set to ``value``."""
    layers = {**params["layers"], name: np.asarray(params["layers"][name]).copy()}
    layers[name][(layer,) + (0,) * (layers[name].ndim - 1)] = value
    return {**params, "layers": layers}


def engines(params, **kwargs):
    yield Engine(CONFIG, params, **kwargs)
    yield Engine(CONFIG, params, ContextParallel(mesh=make_mesh(4), strategy="pass_q"), **kwargs)


@pytest.mark.parametrize(
    "name, layer, value, where",
    [
        ("wq", 1, np.nan, "layer 1 (attention), whose parameters layers/wq hold NaN/Inf"),
        ("w_down", 0, np.inf, "layer 0 (MLP), whose parameters layers/w_down hold NaN/Inf"),
    ],
)
def test_score_names_the_first_layer_with_a_non_finite_value(
    tiny_params, name, layer, value, where
):
    for engine in engines(poisoned(tiny_params, name, layer, value), check_finite=True):
        with pytest.raises(
            NonFiniteError,
            match=r"score: the output holds NaN/Inf; it first "
            r"appears in " + where.replace("(", r"\(").replace(")", r"\)"),
        ):
            engine.score(IDS)


def test_without_check_mode_the_nan_flows_through_instead(tiny_params):
    """The kernels do not hide a NaN (a NaN row is not mistaken for one that saw no key)."""
    for engine in engines(poisoned(tiny_params, "wq", 1, np.nan)):
        assert np.isnan(engine.score(IDS)).all()


def test_a_nan_in_the_cache_is_found_at_decode_by_replaying_the_cache(tiny_params):
    for engine in engines(tiny_params, check_finite=True):
        logits, cache = engine.prefill(IDS, engine.new_cache(128))
        cache = cache._replace(k=cache.k.at[0, 3].set(np.nan))  # a cached key of layer 0
        with pytest.raises(
            NonFiniteError,
            match=r"decode: .* it first appears in layer 0 "
            r"\(attention\)$",
        ):
            engine.decode([int(np.argmax(logits))], [IDS.size], [0], 0, cache)


def test_check_mode_leaves_finite_outputs_unchanged(tiny_params, single):
    checked = Engine(CONFIG, tiny_params, check_finite=True)
    np.testing.assert_array_equal(checked.score(IDS), single.score(IDS))
    assert checked.generate(IDS, 5) == single.generate(IDS, 5)
