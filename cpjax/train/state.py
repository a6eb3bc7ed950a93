"""Resumable training state: params, optimizer state, step and data position, saved with orbax.

A run directory ``OUT`` holds::

    state/<step>/     orbax CheckpointManager steps (the newest two kept): ``train`` (params
                      and optimizer state) and ``meta`` (JSON: the step, data position, model
                      config, optimizer config and data settings)
    model/            the latest parameters as a cpjax model checkpoint
                      (``cpjax.loaders.checkpoint``): ``--model OUT/model`` for inference or
                      ``python -m cpjax export``

Orbax writes each step into a temporary folder and renames it when complete, so a run killed
mid-save leaves the previous step intact; :func:`restore` reads the newest complete one. A
resume must train the same model with the same optimizer and data settings: anything else is
refused with the setting that differs.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

import jax

from cpjax.config import config_from_dict, config_to_dict
from cpjax.errors import require
from cpjax.loaders.checkpoint import config_differences, save_checkpoint
from cpjax.train.trainer import Trainer, TrainState

STATE_DIR = "state"
MODEL_DIR = "model"
KEEP = 2


def _manager(out: str, create: bool):
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(max_to_keep=KEEP, create=create)
    return ocp.CheckpointManager(os.path.abspath(os.path.join(out, STATE_DIR)), options=options)


def run_settings(trainer: Trainer, data: dict) -> dict:
    """What a resumed run must share with the saved one (JSON-able)."""
    return {
        "model": config_to_dict(trainer.config),
        "optimizer": dataclasses.asdict(trainer.optimizer),
        "data": data,
    }


def save(out: str, state: TrainState, trainer: Trainer, data: dict, tokenizer=None) -> None:
    """Save ``state`` as step ``state.step`` of the run in ``out`` and the parameters as
    ``out/model`` (both replaced atomically)."""
    import orbax.checkpoint as ocp

    meta = {"step": state.step, "data_position": state.data_position}
    meta.update(run_settings(trainer, data))
    with _manager(out, create=True) as manager:
        manager.save(
            state.step,
            args=ocp.args.Composite(
                train=ocp.args.StandardSave({"params": state.params, "opt": state.opt_state}),
                meta=ocp.args.JsonSave(meta),
            ),
        )
        manager.wait_until_finished()
    save_checkpoint(os.path.join(out, MODEL_DIR), trainer.config, state.params, tokenizer)


def latest_step(out: str) -> Optional[int]:
    """The newest complete saved step of the run in ``out`` (None if there is none)."""
    if not os.path.isdir(os.path.join(out, STATE_DIR)):
        return None
    with _manager(out, create=False) as manager:
        return manager.latest_step()


def _differences(saved: dict, current: dict, what: str) -> list[str]:
    return [
        f"{what}.{key}: saved {saved.get(key)!r}, now {current.get(key)!r}"
        for key in sorted(set(saved) | set(current))
        if saved.get(key) != current.get(key)
    ]


def restore(out: str, trainer: Trainer, template: TrainState, data: dict) -> TrainState:
    """The newest saved state of the run in ``out``, placed like ``template`` (a fresh
    ``trainer.init_state``). Raises a :class:`CpjaxError` naming every setting that differs
    from the saved run's."""
    import orbax.checkpoint as ocp

    step = latest_step(out)
    require(step is not None, f"--resume: {out!r} holds no saved training state")
    with _manager(out, create=False) as manager:
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        saved_config = config_from_dict(meta["model"])
        problems = [f"model: {d}" for d in config_differences(trainer.config, saved_config)]
        problems += _differences(
            meta["optimizer"], dataclasses.asdict(trainer.optimizer), "optimizer"
        )
        problems += _differences(meta["data"], data, "data")
        require(
            not problems,
            f"--resume: the run in {out!r} was saved with other settings: " + "; ".join(problems),
        )
        abstract = jax.tree.map(
            ocp.utils.to_shape_dtype_struct,
            {"params": template.params, "opt": template.opt_state},
        )
        restored = manager.restore(
            step, args=ocp.args.Composite(train=ocp.args.StandardRestore(abstract))
        )["train"]
    return TrainState(
        step=int(meta["step"]),
        params=restored["params"],
        opt_state=restored["opt"],
        data_position=int(meta["data_position"]),
    )


__all__ = ["MODEL_DIR", "STATE_DIR", "latest_step", "restore", "run_settings", "save"]
