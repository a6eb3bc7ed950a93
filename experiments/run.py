"""Run one gin-configured experiment: ``python -m experiments.run experiments/configs/NAME.gin``.

Each config names its experiment with the macro ``EXPERIMENT = 'module'``; the module
``experiments.<module>`` provides the gin-configurable function ``run_<module>`` that writes
``experiments/results/<config stem>.json`` and ``experiments/figures/<config stem>.png`` (or the
``out`` / ``figure`` paths bound in the config). Extra bindings: ``--gin "run_x.repeats = 1"``.
Before jax starts, the platform is chosen from the binding ``run_<name>.platform``: ``'gpu'``
sets ``JAX_PLATFORMS=cuda,cpu`` (CUDA first); otherwise ``JAX_PLATFORMS=cpu`` with fake CPU
devices (8 by default, ``--fake-devices``).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
_CONFIGURED = {}  # experiment name -> its gin-configurable run function
# run_<name>.platform -> JAX_PLATFORMS; for 'gpu', CUDA first, and CPU only so that a machine
# without a GPU gets the experiment's "no GPU is visible" error rather than jax's bare assert.
JAX_PLATFORMS = {"cpu": "cpu", "gpu": "cuda,cpu"}


def _last_value(lines, key: str):
    """The value (quotes and a trailing ``# comment`` stripped) of the last ``key = value``
    line, or None."""
    value = None
    for line in lines:
        left, equals, right = line.partition("=")
        if equals and left.strip() == key:
            value = right.partition("#")[0].strip().strip("'\"")
    return value


def _config_lines(config_path: str) -> list[str]:
    if not os.path.isfile(config_path):
        raise SystemExit(f"error: config {config_path!r}: no such file")
    with open(config_path, encoding="utf-8") as f:
        return f.read().splitlines()


def experiment_name(config_path: str) -> str:
    """The ``EXPERIMENT = '...'`` macro of a gin file (read before gin parses it)."""
    name = _last_value(_config_lines(config_path), "EXPERIMENT")
    if name is None:
        raise SystemExit(f"error: {config_path}: no `EXPERIMENT = 'name'` line")
    return name


def bound_platform(config_path: str, bindings=()) -> str:
    """The ``run_<name>.platform`` a config (then ``bindings``) binds, read before jax starts;
    ``'cpu'`` when unbound."""
    key = f"run_{experiment_name(config_path)}.platform"
    platform = _last_value([*_config_lines(config_path), *bindings], key) or "cpu"
    if platform not in JAX_PLATFORMS:
        raise SystemExit(
            f"error: {config_path}: {key} = {platform!r}: choose one of "
            f"{', '.join(map(repr, JAX_PLATFORMS))}"
        )
    return platform


def configurable(name: str):
    """The gin-configurable ``run_<name>`` of ``experiments.<name>`` (registered once)."""
    import gin

    if name not in _CONFIGURED:
        function = getattr(importlib.import_module(f"experiments.{name}"), f"run_{name}")
        with gin.unlock_config():
            _CONFIGURED[name] = gin.external_configurable(function, f"run_{name}")
    return _CONFIGURED[name]


def run(config_path: str, bindings=(), fake_devices: int = 8) -> dict:
    """Parse ``config_path`` (+ ``bindings``) and run its experiment; returns the results."""
    name = experiment_name(config_path)
    platform = bound_platform(config_path, bindings)
    if "jax" not in sys.modules:
        os.environ["JAX_PLATFORMS"] = JAX_PLATFORMS[platform]
        if platform == "cpu":
            from cpjax.parallel.mesh import use_fake_cpu_devices  # imports jax: set env first

            use_fake_cpu_devices(fake_devices)
    import gin

    configured = configurable(name)
    gin.clear_config()
    stem = os.path.splitext(os.path.basename(config_path))[0]
    gin.parse_config_files_and_bindings(
        [config_path],
        [
            f"run_{name}.out = '{os.path.join(HERE, 'results', stem + '.json')}'",
            f"run_{name}.figure = '{os.path.join(HERE, 'figures', stem + '.png')}'",
            *bindings,
        ],
    )
    return configured()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="gin file in experiments/configs/")
    parser.add_argument("--gin", action="append", default=[], help="extra gin binding")
    parser.add_argument("--fake-devices", type=int, default=8)
    args = parser.parse_args(argv)
    from cpjax.errors import CpjaxError

    try:
        results = run(args.config, args.gin, args.fake_devices)
    except CpjaxError as error:
        parser.exit(2, f"error: {error}\n")
    print(f"wrote {results.get('out')} and {results.get('figure')}")


if __name__ == "__main__":
    main()
