"""Test set-up: 8 fake CPU devices (before jax starts), a persistent compilation cache, shared
fixtures.

Many tests build engines whose programs are the same computation (another closure, the same
HLO). JAX's persistent compilation cache keeps each program that takes over 0.5 s to compile, so a
repeat (within one run or across runs) is read from disk. It lives outside the repository:
``$CPJAX_TEST_COMPILE_CACHE``, else ``$XDG_CACHE_HOME`` or ``~/.cache`` + ``cpjax/jax-compile``
(set ``CPJAX_TEST_COMPILE_CACHE=off`` to compile everything afresh). Command-line subprocesses
get it through :func:`compile_cache_env`.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "")
        + " --xla_force_host_platform_device_count=8"
        # keep in sync with cpjax.parallel.mesh.CPU_COLLECTIVES_FLAG (importing it starts jax)
        + " --xla_cpu_enable_concurrency_optimized_scheduler=false"
    ).strip()

import pytest  # noqa: E402

# The tests that hold a real model (SmolLM2, Gemma 3) on 8 fake devices or next to HF's copy:
# pytest-xdist (``--dist loadgroup``) runs them on one worker, one at a time, so two of them
# never add up in memory (the Gemma oracle alone peaks at ~12 GB).
REAL_MODELS = pytest.mark.xdist_group("real_models")


def _compile_cache_dir():
    """Where the persistent compilation cache of the tests lives (None: disabled)."""
    chosen = os.environ.get("CPJAX_TEST_COMPILE_CACHE")
    if chosen == "off":
        return None
    if chosen:
        return chosen
    home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(home, "cpjax", "jax-compile")


CACHE_MIN_COMPILE_SECS = 0.5


def compile_cache_env() -> dict:
    """Environment variables that give a ``python -m cpjax`` subprocess the tests' persistent
    compilation cache (jax reads them at import; empty when the cache is off)."""
    cache_dir = _compile_cache_dir()
    if cache_dir is None:
        return {}
    return {
        "JAX_COMPILATION_CACHE_DIR": cache_dir,
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": str(CACHE_MIN_COMPILE_SECS),
    }


def _check_loadgroup_groups(config) -> None:
    """pytest-xdist (3.8) marks a test's group by rewriting its node id, which pytest 9.2 ignores
    (pytest-dev/pytest-xdist#1386): the real-model tests would then run side by side."""
    version = tuple(int(p) for p in pytest.__version__.split(".")[:2] if p.isdigit())
    if getattr(config.option, "dist", None) == "loadgroup" and version >= (9, 2):
        raise pytest.UsageError(
            f"--dist loadgroup does not group tests on pytest {pytest.__version__} "
            "(pytest-dev/pytest-xdist#1386): install pytest<9.2 (the 'test' extra pins it)"
        )


def pytest_configure(config):
    _check_loadgroup_groups(config)
    import jax

    cache_dir = _compile_cache_dir()
    if cache_dir is not None:
        jax.config.update("jax_compilation_cache_dir", cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", CACHE_MIN_COMPILE_SECS)


@pytest.fixture(scope="session")
def tiny_params():
    from cpjax.config import PRESETS
    from cpjax.model.decoder import init_params

    return init_params(PRESETS["tiny"], seed=0)


@pytest.fixture(scope="session")
def single(tiny_params):
    """The single-device engine of the tiny model: the reference of every parallel path."""
    from cpjax.config import PRESETS
    from cpjax.engine import Engine

    return Engine(PRESETS["tiny"], tiny_params)
