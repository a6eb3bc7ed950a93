"""The names a user chooses from, each defined once.

Every module that accepts or lists one of these names imports it from here (the CLI's choices,
the engine's checks, the performance model, the experiments), so adding a strategy or an
attention implementation is one edit. It imports no jax (the CLI builds its flags from it
before jax may start). The padding segment id is defined once with the masks it drives
(``cpjax.attention.masks.PAD_SEGMENT``, a leaf the kernels import).
"""

from __future__ import annotations

from cpjax.errors import CpjaxError

#: The two rings of the paper (§3) its heuristic chooses between: K/V travel or queries travel.
HEURISTIC_CHOICES = ("pass_kv", "pass_q")
#: Context-parallel prefill rings: the paper's two, and gathering all K/V (the baseline).
STRATEGIES = (*HEURISTIC_CHOICES, "all_gather")
#: Let the paper's heuristic (``cpjax.parallel.heuristic``) pick a ring per (partial) prefill.
AUTO = "auto"
PREFILL_STRATEGIES = (*STRATEGIES, AUTO)
#: Context-parallel decode: replicated queries merged by one all-reduce, or the paper's ring.
DECODE_STRATEGIES = ("allreduce", "ring_pass_q")
#: Attention implementations of the ``attend`` contract (``cpjax.dispatch``).
ATTENTION_IMPLEMENTATIONS = ("auto", "reference", "blockwise", "pallas", "pallas_mgpu", "cudnn")
#: Hardware figures for the heuristic and the performance model (``cpjax.hardware``);
#: ``cpu`` is a measurement of this machine.
HARDWARE_PRESETS = ("h100-nvlink", "h100-rdma", "h100-tcp", "cpu")
#: Activation / parameter dtypes the engine runs in.
DTYPES = ("float32", "bfloat16")
#: Optimizers of fine-tuning (``cpjax.train.optimizer``).
OPTIMIZERS = ("sgd", "adamw")
#: Learning-rate schedules after the linear warm-up: constant, or cosine decay to zero.
SCHEDULES = ("constant", "cosine")
#: What each layer keeps for the backward pass (``cpjax.model.decoder.REMAT_POLICIES``).
REMAT = ("full", "dots")

__all__ = [
    "ATTENTION_IMPLEMENTATIONS",
    "AUTO",
    "DECODE_STRATEGIES",
    "DTYPES",
    "HARDWARE_PRESETS",
    "HEURISTIC_CHOICES",
    "OPTIMIZERS",
    "REMAT",
    "SCHEDULES",
    "PREFILL_STRATEGIES",
    "STRATEGIES",
    "check_choice",
]


def check_choice(what: str, value, choices) -> str:
    """``value`` if it is one of ``choices``; otherwise a :class:`CpjaxError` such as
    ``unknown decode strategy 'x': choose one of allreduce, ring_pass_q``."""
    if value not in choices:
        raise CpjaxError(f"unknown {what} {value!r}: choose one of {', '.join(choices)}")
    return value
