"""The paper's published measurements (Llama3-405B, FP8 FFN, bf16 attention, TP8 per node,
power-limited H100s; arXiv 2411.01783 v3), as the performance model's targets.

Each fitted constant of :mod:`cpjax.perfmodel.calibration` is fitted on exactly one of these
numbers (``FITTED`` names them); every other number is held out and compared.
"""

from __future__ import annotations

from typing import NamedTuple


class TTFT(NamedTuple):
    """A prefill: ``tokens`` new tokens on ``cp`` nodes of ``tp`` GPUs (multi-node TP when
    ``tp > 8``), time to first token in seconds."""

    tokens: int
    cp: int
    tp: int
    seconds: float
    source: str


class TTIT(NamedTuple):
    """Decode at ``context`` cached tokens with ``batch`` sequences: ms per decoded token."""

    context: int
    cp: int
    tp: int
    batch: int
    ms: float
    source: str


#: Tables 6-7 and the text about Fig. 6a (CP8) and Fig. 8 (CP16).
PAPER_TTFT = (
    TTFT(8192, 1, 8, 1.740, "Table 6"),
    TTFT(32768, 1, 8, 7.658, "Table 6"),
    TTFT(131072, 1, 8, 42.010, "Table 6"),
    TTFT(8192, 2, 8, 0.999, "Table 6"),
    TTFT(32768, 2, 8, 4.015, "Table 6"),
    TTFT(131072, 2, 8, 21.042, "Table 6"),
    TTFT(131072, 4, 8, 10.950, "Table 7"),
    TTFT(131072, 1, 16, 29.917, "Table 7"),
    TTFT(131072, 1, 32, 19.841, "Table 7"),
    TTFT(131072, 8, 8, 5.85, "Fig. 6a text"),
    TTFT(131072, 16, 8, 3.8, "Fig. 8 text"),
    TTFT(1_000_000, 16, 8, 77.0, "Fig. 8 text"),
)

#: Tables 6-7 (batch 1). Table 6 and Table 7 disagree on CP2 at 128K (66.63 vs 60.23 ms).
PAPER_TTIT = (
    TTIT(8192, 1, 8, 1, 44.51, "Table 6"),
    TTIT(32768, 1, 8, 1, 44.64, "Table 6"),
    TTIT(131072, 1, 8, 1, 46.26, "Table 6"),
    TTIT(8192, 2, 8, 1, 65.61, "Table 6"),
    TTIT(32768, 2, 8, 1, 65.66, "Table 6"),
    TTIT(131072, 2, 8, 1, 66.63, "Table 6"),
    TTIT(131072, 2, 8, 1, 60.23, "Table 7"),
    TTIT(131072, 1, 16, 1, 39.52, "Table 7"),
    TTIT(131072, 4, 8, 1, 71.31, "Table 7"),
    TTIT(131072, 1, 32, 1, 47.3, "Table 7"),
)

#: Table 4 (CP4 on RDMA, P + T = 128000): (P cached, T new, pass-KV ms, pass-Q ms).
TABLE_4 = (
    (126720, 1280, 1023.39, 898.71),
    (124800, 3200, 1110.18, 1046.43),
    (123840, 4160, 1298.92, 1280.10),
    (121600, 6400, 1305.56, 1302.01),
    (115200, 12800, 2080.67, 2205.27),
    (102400, 25600, 3353.02, 3617.02),
    (89600, 38400, 4629.23, 4922.52),
    (76800, 51200, 5745.08, 6217.83),
    (64000, 64000, 6845.21, 7367.99),
    (51200, 76800, 7890.35, 8468.66),
    (38400, 89600, 8697.27, 9666.62),
    (25600, 102400, 10105.78, 10652.39),
    (12800, 115200, 11136.40, 11571.62),
    (0, 128000, 11462.15, 12360.57),
)

#: Table 5 (CP4 on RDMA, P + T = 128000), µs per ring iteration:
#: (new tokens T, strategy, component, µs); component is sendrecv, attention or all_to_all.
TABLE_5 = (
    (3200, "pass_kv", "sendrecv", 627.0),
    (3200, "pass_kv", "attention", 414.0),
    (3200, "pass_q", "sendrecv", 166.0),
    (3200, "pass_q", "all_to_all", 424.0),
    (12800, "pass_kv", "sendrecv", 631.0),
    (12800, "pass_kv", "attention", 1608.0),
    (12800, "pass_q", "sendrecv", 544.0),
    (12800, "pass_q", "all_to_all", 1023.0),
)
TABLE_5_TOTAL = 128000
TABLE_5_CP = 4

#: Table 8 (ring pass-Q decode, µs per layer): (context, batch, CP nodes, component, µs).
#: Components: ``attention_op`` (one attention call), ``ring_loop`` (all N calls),
#: ``sendrecv`` (all N-1 query transfers), ``all_to_all``, ``total`` (the whole pass-Q).
#: TP8 (CP1) has no SendRecv or All2All (published as 0).
# fmt: off
TABLE_8 = tuple(
    (context, batch, cp, component, us)
    for context, batch, columns in (
        (131072, 1, {"attention_op": (38.9, 22.0, 14.7), "ring_loop": (38.9, 43.2, 60.8),
                     "sendrecv": (0, 32.3, 105.7), "all_to_all": (0, 81.1, 79.9),
                     "total": (38.9, 157.7, 238.6)}),
        (32768, 4, {"attention_op": (60.1, 13.9, 9.6), "ring_loop": (60.1, 24.5, 41.3),
                    "sendrecv": (0, 33.3, 104.9), "all_to_all": (0, 66.8, 72.2),
                    "total": (60.1, 136.6, 180.6)}),
    )
    for component, values in columns.items()
    for cp, us in zip((1, 2, 4), values)
)
# fmt: on
