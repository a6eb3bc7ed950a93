"""Run one gin-configured experiment: ``python -m experiments.run experiments/configs/NAME.gin``.

Each config names its experiment with the macro ``EXPERIMENT = 'module'``; the module
``experiments.<module>`` provides the gin-configurable function ``run_<module>`` that writes
``experiments/results/<config stem>.json`` and ``experiments/figures/<config stem>.png`` (or the
``out`` / ``figure`` paths bound in the config). Extra bindings: ``--gin "run_x.repeats = 1"``.
Fake CPU devices (8 by default, ``--fake-devices``) are set up before jax starts.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
_CONFIGURED = {}   # experiment name -> its gin-configurable run function


def _experiment_name(config_path: str) -> str:
    """The ``EXPERIMENT = '...'`` macro of a gin file (read before gin parses it)."""
    with open(config_path, encoding="utf-8") as f:
        for line in f:
            key, _, value = line.partition("=")
            if key.strip() == "EXPERIMENT":
                return value.strip().strip("'\"")
    raise SystemExit(f"error: {config_path}: no `EXPERIMENT = 'name'` line")


def run(config_path: str, bindings=(), fake_devices: int = 8) -> dict:
    """Parse ``config_path`` (+ ``bindings``) and run its experiment; returns the results."""
    if not os.path.isfile(config_path):
        raise SystemExit(f"error: config {config_path!r}: no such file")
    name = _experiment_name(config_path)
    if "jax" not in sys.modules:
        flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
                 if not f.startswith("--xla_force_host_platform_device_count")]
        os.environ["XLA_FLAGS"] = " ".join(
            [*flags, f"--xla_force_host_platform_device_count={fake_devices}"])
    import gin
    if name not in _CONFIGURED:
        function = getattr(importlib.import_module(f"experiments.{name}"), f"run_{name}")
        with gin.unlock_config():
            _CONFIGURED[name] = gin.external_configurable(function, f"run_{name}")
    configured = _CONFIGURED[name]
    gin.clear_config()
    stem = os.path.splitext(os.path.basename(config_path))[0]
    gin.parse_config_files_and_bindings(
        [config_path], [f"run_{name}.out = '{os.path.join(HERE, 'results', stem + '.json')}'",
                        f"run_{name}.figure = '{os.path.join(HERE, 'figures', stem + '.png')}'",
                        *bindings])
    return configured()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="gin file in experiments/configs/")
    parser.add_argument("--gin", action="append", default=[], help="extra gin binding")
    parser.add_argument("--fake-devices", type=int, default=8)
    args = parser.parse_args(argv)
    results = run(args.config, args.gin, args.fake_devices)
    print(f"wrote {results.get('out')} and {results.get('figure')}")


if __name__ == "__main__":
    main()
