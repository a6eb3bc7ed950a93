"""A fine-tuning run: steps over a token stream, progress, periodic saves, exact resume.

``finetune(trainer, params, stream, steps=S, out=OUT, ...)`` is what ``python -m cpjax
finetune`` runs (and what a notebook calls): step ``s`` trains on the ``batch_size *
grad_accum`` sequences after the data position, as ``grad_accum`` micro-batches of
``batch_size`` rows whose targets are averaged together. Every ``save_every`` steps and at the
end it saves the state (:mod:`cpjax.train.state`); with ``resume=True`` it continues from the
newest save of ``out`` and reaches the same parameters, bit for bit, as a run that was never
interrupted (the same batches in the same order, the same optimizer state).
"""

from __future__ import annotations

import os
from typing import Callable, Optional

from tqdm.auto import tqdm

from cpjax.errors import require
from cpjax.train import state as state_lib
from cpjax.train.batch import pack_batch
from cpjax.train.data import TokenStream
from cpjax.train.trainer import StepMetrics, Trainer, TrainState


def micro_batches(stream: TokenStream, position: int, batch_size: int, grad_accum: int, vocab):
    """The ``grad_accum`` packed micro-batches of ``batch_size`` rows read at ``position``."""
    rows = stream.sequences(position, batch_size * grad_accum)
    return [
        pack_batch(rows[i * batch_size : (i + 1) * batch_size], vocab_size=vocab)
        for i in range(grad_accum)
    ]


def check_run(trainer: Trainer, seq_len: int, steps, batch_size, grad_accum, save_every):
    """Raise a one-line error for a run that cannot work, before anything compiles."""
    for name, value, low in (
        ("steps", steps, 1),
        ("batch_size", batch_size, 1),
        ("grad_accum", grad_accum, 1),
        ("save_every", save_every, 0),
    ):
        require(
            isinstance(value, int) and value >= low, f"{name}={value!r}: must be an int >= {low}"
        )
    require(
        seq_len <= trainer.config.max_seq_len,
        f"seq_len={seq_len} exceeds the model's window of {trainer.config.max_seq_len} "
        f"tokens (max_seq_len of {trainer.config.name!r})",
    )


def finetune(
    trainer: Trainer,
    params,
    stream: TokenStream,
    *,
    steps: int,
    out: Optional[str] = None,
    batch_size: int = 1,
    grad_accum: int = 1,
    save_every: int = 0,
    resume: bool = False,
    tokenizer=None,
    on_step: Optional[Callable[[StepMetrics], None]] = None,
    progress: bool = True,
) -> tuple[TrainState, list[StepMetrics]]:
    """Train until ``steps`` optimizer steps; returns the final state and this call's metrics.

    ``out``: run directory (None: nothing saved). ``save_every``: save every K steps (0: only
    at the end). ``resume``: continue from ``out``'s newest save (refused if its model,
    optimizer or data settings differ); without it, ``out`` must not hold a run yet.
    """
    check_run(trainer, stream.seq_len, steps, batch_size, grad_accum, save_every)
    data = {**stream.fingerprint(), "batch_size": batch_size, "grad_accum": grad_accum}
    state = trainer.init_state(params)
    saved = state_lib.latest_step(out) if out is not None else None
    if resume:
        require(out is not None, "resume=True needs the run directory (--out)")
        state = state_lib.restore(out, trainer, state, data)
    else:
        require(
            saved is None,
            f"--out {out!r} already holds a run (saved at step {saved}); pass --resume to "
            f"continue it or choose another --out",
        )
    history = []
    per_step = batch_size * grad_accum
    bar = tqdm(total=steps, initial=state.step, desc="finetune", unit="step", disable=not progress)
    while state.step < steps:
        batches = micro_batches(
            stream, state.data_position, batch_size, grad_accum, trainer.config.vocab_size
        )
        state, metrics = trainer.step(state, batches, consumed=per_step)
        history.append(metrics)
        bar.update(1)
        bar.set_postfix(loss=f"{metrics.loss:.4f}")
        if on_step is not None:
            on_step(metrics)
        if out is not None and save_every and state.step % save_every == 0:
            state_lib.save(out, state, trainer, data, tokenizer)
    bar.close()
    if out is not None and state_lib.latest_step(out) != state.step:
        state_lib.save(out, state, trainer, data, tokenizer)
    return state, history


def model_path(out: str) -> str:
    """Where a run directory keeps its latest parameters as a cpjax model checkpoint."""
    return os.path.join(out, state_lib.MODEL_DIR)
