"""The single-device attention plan of the model, built from an ``attend`` function."""

from __future__ import annotations

from typing import Callable

from cpjax.attention.merge import merge


def with_past(attend: Callable) -> Callable:
    """The single-device attention plan of the model built from ``attend``.

    ``plan(q, k, v, positions, segments, past) -> (out, lse)``: the queries attend to the new
    keys/values and, when ``past = (k, v, pos, seg)`` is given, to those too; the two partial
    results merge by log-sum-exp.
    """

    def plan(q, k, v, positions, segments, past):
        out, lse = attend(q, k, v, positions, positions, segments, segments)
        if past is None:
            return out, lse
        past_out, past_lse = attend(q, *past[:2], positions, past[2], segments, past[3])
        out, lse = merge(out, lse, past_out, past_lse)
        return out.astype(q.dtype), lse

    return plan
