"""The devices a measured experiment runs on: checked before it starts, recorded in its JSON.

``python -m experiments.run`` picks jax's platform before jax starts (fake CPU devices, or
``JAX_PLATFORMS=cuda,cpu`` when the config binds ``run_<name>.platform = 'gpu'``);
:func:`check_devices` then checks that jax did land there, with enough devices.
"""

from __future__ import annotations

import os

from cpjax.errors import CpjaxError, require

PLATFORMS = ("cpu", "gpu")


def check_devices(platform: str, contexts) -> dict:
    """Check that jax runs on ``platform`` (``"cpu"`` or ``"gpu"``) with at least
    ``max(contexts)`` devices; return ``{"platform", "device_kind", "device_count",
    "cpu_count"}`` for the results JSON. Raises :class:`CpjaxError` naming what is missing."""
    import jax

    require(platform in PLATFORMS, f"platform={platform!r}: choose one of {', '.join(PLATFORMS)}")
    try:
        devices = jax.devices()
    except RuntimeError as error:  # e.g. a CUDA plugin that fails to start
        raise CpjaxError(f"platform={platform!r}: jax found no devices ({error})") from error
    if devices[0].platform != platform:
        raise CpjaxError(
            f"platform={platform!r}: no {platform.upper()} is visible to jax (it runs on "
            f"{devices[0].platform}: {devices[0].device_kind}); it needs a machine with one and "
            f"jax built for it, and the config run through `python -m experiments.run`, which "
            f"chooses the platform before jax starts"
        )
    contexts = list(contexts)
    require(
        max(contexts) <= len(devices),
        f"contexts={contexts}: a context-parallel size may not exceed the {len(devices)} "
        f"{platform} device(s) visible"
        + (" (simulate more with --fake-devices)" if platform == "cpu" else ""),
    )
    return {
        "platform": platform,
        "device_kind": devices[0].device_kind,
        "device_count": len(devices),
        "cpu_count": os.cpu_count(),
    }


def device_label(results: dict) -> str:
    """Where the results were measured, for a figure title: "8 fake CPU devices on 2 cores",
    "1 x NVIDIA H200"."""
    if results["platform"] == "cpu":
        return f"{results['device_count']} fake CPU devices on {results['cpu_count']} cores"
    return f"{results['device_count']} x {results['device_kind']}"


def placement_on(context: int, **context_parallel):
    """``SingleDevice()`` for ``context == 1``, else ``ContextParallel`` on a ``context`` x 1
    mesh with the given settings (``strategy=``, ``decode_strategy=`` ...)."""
    from cpjax.engine import ContextParallel, SingleDevice
    from cpjax.parallel.mesh import make_mesh

    if context == 1:
        return SingleDevice()
    return ContextParallel(make_mesh(context), **context_parallel)
