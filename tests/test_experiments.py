"""Every gin-configured experiment runs end to end with a tiny setting and writes JSON + PNG."""

import json
import os

import pytest

from experiments import run as runner

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "experiments", "configs")

TINY = {
    "cp_overhead": ["lengths = [64]", "contexts = [1, 2]", "strategies = ['pass_kv']",
                    "repeats = 1"],
    "strategy_sweep": ["new_tokens = [16]", "cached_tokens = [0, 40]", "context = 2",
                       "repeats = 1"],
    "decode": ["cached_tokens = [100]", "contexts = [1, 2]", "steps = 2"],
    "paper_model": ["model = 'llama3-405b'", "contexts = [8192, 131072]", "cp_sizes = [1, 4]"],
}


@pytest.mark.parametrize("name", sorted(TINY))
def test_experiment_config_runs_with_a_tiny_setting(name, tmp_path):
    out, figure = tmp_path / f"{name}.json", tmp_path / f"{name}.png"
    model = [] if name == "paper_model" else [f"run_{name}.model = 'tiny'"]
    bindings = [*model, f"run_{name}.out = '{out}'",
                f"run_{name}.figure = '{figure}'", *(f"run_{name}.{b}" for b in TINY[name])]
    results = runner.run(os.path.join(CONFIGS, f"{name}.gin"), bindings)
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(results["rows"]))
    assert figure.stat().st_size > 10_000
    assert results["rows"]


def test_every_config_is_covered():
    names = {os.path.splitext(f)[0] for f in os.listdir(CONFIGS) if f.endswith(".gin")}
    assert names == set(TINY)


def test_missing_config_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="no such file"):
        runner.run(str(tmp_path / "nope.gin"))
