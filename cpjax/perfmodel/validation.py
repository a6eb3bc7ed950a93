"""Every published number of :mod:`cpjax.perfmodel.paper` next to the model's prediction.

:func:`comparison` returns one row per number: the table, a label, the published and
predicted values (same unit), the signed relative error and whether the number is one a
constant was fitted on (:data:`cpjax.perfmodel.fits.FITS`) or held out.
"""

from __future__ import annotations

from typing import NamedTuple

from cpjax.config import PRESETS as MODELS
from cpjax.hardware import PRESETS as HARDWARE
from cpjax.perfmodel.calibration import Constants
from cpjax.perfmodel.decode import attention_path, decode_time
from cpjax.perfmodel.fits import FITS
from cpjax.perfmodel.paper import (
    PAPER_TTFT,
    PAPER_TTIT,
    TABLE_4,
    TABLE_5,
    TABLE_5_CP,
    TABLE_5_TOTAL,
    TABLE_8,
)
from cpjax.perfmodel.prefill import Deployment, prefill_time, ring_step_times

MODEL = MODELS["llama3-405b"]
HARDWARE_PRESET = "h100-rdma"


class Row(NamedTuple):
    """One published number and its prediction."""

    table: str
    label: str
    published: float
    predicted: float
    unit: str
    fitted: bool

    @property
    def error(self) -> float:
        """Signed relative error, predicted / published - 1."""
        return self.predicted / self.published - 1


def _label_tokens(tokens: int) -> str:
    if tokens % 1024 == 0:
        return f"{tokens // 1024}K"
    return f"{tokens / 1e6:g}M" if tokens >= 1_000_000 else str(tokens)


def _mesh(cp: int, tp: int) -> str:
    return f"CP{cp}+TP{tp}" if cp > 1 else f"TP{tp}"


def _is_fitted(source: str, published: float) -> bool:
    return any(f.source == source and f.published == published for f in FITS)


def ttft_rows(constants: Constants | None = None) -> list[Row]:
    """Tables 6-7 and the CP8/CP16 TTFTs (s), pass-KV full prefills."""
    hw = HARDWARE[HARDWARE_PRESET]
    rows = []
    for p in PAPER_TTFT:
        predicted = prefill_time(
            MODEL, p.tokens, Deployment(cp=p.cp, tp=p.tp), hw, strategy="pass_kv",
            constants=constants,
        )["ttft_s"]  # fmt: skip
        label = f"TTFT {_label_tokens(p.tokens)} {_mesh(p.cp, p.tp)}"
        fitted = any(f.published == p.seconds and f.unit == "s" for f in FITS)
        rows.append(Row(p.source, label, p.seconds, predicted, "s", fitted))
    return rows


def ttit_rows(constants: Constants | None = None) -> list[Row]:
    """Tables 6-7 TTIT (ms), batch 1, ring pass-Q decode."""
    hw = HARDWARE[HARDWARE_PRESET]
    rows = []
    for p in PAPER_TTIT:
        predicted = decode_time(
            MODEL, p.context, Deployment(cp=p.cp, tp=p.tp), hw, p.batch, constants=constants
        )["ttit_ms"]
        label = f"TTIT {_label_tokens(p.context)} {_mesh(p.cp, p.tp)}"
        fitted = any(f.published == p.ms and f.unit == "ms" for f in FITS)
        rows.append(Row(p.source, label, p.ms, predicted, "ms", fitted))
    return rows


def table4_rows(constants: Constants | None = None) -> list[Row]:
    """Table 4: TTFT (ms) of each ring for 14 miss rates, CP4, P + T = 128000."""
    hw = HARDWARE[HARDWARE_PRESET]
    rows = []
    for p, t, kv_ms, q_ms in TABLE_4:
        for strategy, ms in (("pass_kv", kv_ms), ("pass_q", q_ms)):
            predicted = prefill_time(MODEL, t, Deployment(cp=4), hw, p, strategy, constants)[
                "ttft_s"
            ]
            label = f"T={t} ({100 * t / (t + p):g}% miss) {strategy}"
            rows.append(Row("Table 4", label, ms, 1e3 * predicted, "ms", False))
    return rows


def table5_rows(constants: Constants | None = None) -> list[Row]:
    """Table 5: µs per ring iteration (SendRecv, ATTN, All2All), CP4, P + T = 128000."""
    hw = HARDWARE[HARDWARE_PRESET]
    rows = []
    for t, strategy, component, us in TABLE_5:
        step = ring_step_times(
            MODEL, t, TABLE_5_TOTAL - t, Deployment(cp=TABLE_5_CP), hw, strategy, constants
        )
        label = f"{100 * t / TABLE_5_TOTAL:g}% miss {strategy} {component}"
        fitted = _is_fitted_table("Table 5", us)
        rows.append(Row("Table 5", label, us, 1e6 * step[component], "µs", fitted))
    return rows


def table8_rows(constants: Constants | None = None) -> list[Row]:
    """Table 8: µs per layer of the decode attention path (zeros, CP1's SendRecv and
    All2All, are left out: the model's are exactly 0)."""
    hw = HARDWARE[HARDWARE_PRESET]
    rows = []
    for context, batch, cp, component, us in TABLE_8:
        if us == 0:
            continue
        path = attention_path(
            MODEL, context, Deployment(cp=cp), hw, batch, "ring_pass_q", constants
        )
        label = f"{_label_tokens(context)} B={batch} {_mesh(cp, 8)} {component}"
        fitted = _is_fitted_table("Table 8", us)
        rows.append(Row("Table 8", label, us, 1e6 * path[component], "µs", fitted))
    return rows


def _is_fitted_table(table: str, published: float) -> bool:
    return any(f.source.startswith(table) and f.published == published for f in FITS)


def comparison(constants: Constants | None = None) -> list[Row]:
    """Every published number with its prediction (fitted ones flagged)."""
    return [
        *ttft_rows(constants),
        *ttit_rows(constants),
        *table4_rows(constants),
        *table5_rows(constants),
        *table8_rows(constants),
    ]
