"""Test set-up: 8 fake CPU devices (before jax starts), shared fixtures."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

import pytest  # noqa: E402


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
