"""Choosing pass-KV or pass-Q for a (partial) prefill (paper §3.5, Algorithms 1 and 5).

For ``T`` new tokens against ``P`` cached ones on ``N`` context-parallel ranks, with per-device
compute ``C`` (FLOP/s), link bandwidth ``BW`` (bytes/s), ``e`` bytes per element:

* Eq. 2 — pass-KV's ring hides behind attention when ``T >= N C Hkv e / (2 Hq BW)``;
* Eq. 1 — the query block is smaller than the KV block when ``T / (T+P) < 2 Hkv / Hq``;
* Eq. 5 (Appendix C) — counting pass-Q's final all-to-all lowers that miss-rate threshold to
  ``2 Hkv / Hq - 4 T BW / (N C e)``.

pass-KV is chosen if the Eq. 2 test or the miss-rate test holds, pass-Q otherwise. The default
is Algorithm 1 (Eq. 1): with the paper's peak figures it matches 12 of the 14 measured winners
of its Table 4 (the two misses are within 1.5 %), while Algorithm 5 (``refined=True``) matches
11 (it also flips T = 3200, where pass-Q won by 6 %); the paper notes both need tuning with
achieved rather than peak figures.
The model dimension cancels, and tensor parallelism divides compute and bytes alike, so the
per-device figures of :class:`cpjax.hardware.Hardware` are the right ones.
"""

from __future__ import annotations

import dataclasses

from cpjax.config import ModelConfig
from cpjax.errors import require
from cpjax.hardware import Hardware


@dataclasses.dataclass(frozen=True)
class StrategyChoice:
    """The decision and the numbers behind it."""

    strategy: str  # "pass_kv" or "pass_q"
    miss_rate: float  # T / (T + P)
    hidden_kv_tokens: float  # Eq. 2 threshold on T
    miss_rate_threshold: float  # Eq. 1 (basic) or Eq. 5 (refined) threshold
    reason: str


def explain_strategy(
    new_tokens: int,
    cached_tokens: int,
    config: ModelConfig,
    n_context: int,
    hardware: Hardware,
    *,
    bytes_per_element: int = 2,
    refined: bool = False,
) -> StrategyChoice:
    """The heuristic's choice with its thresholds (see the module docstring)."""
    require(new_tokens >= 1, f"new_tokens={new_tokens}: must be >= 1")
    require(cached_tokens >= 0, f"cached_tokens={cached_tokens}: must be >= 0")
    require(n_context >= 1, f"n_context={n_context}: must be >= 1")
    t, p, n = new_tokens, cached_tokens, n_context
    c, bw, e = hardware.peak_flops, hardware.link_bandwidth, bytes_per_element
    kv_fraction = config.n_kv_heads / config.n_heads
    hidden_kv_tokens = n * c * kv_fraction * e / (2 * bw)
    threshold = 2 * kv_fraction - (4 * t * bw / (n * c * e) if refined else 0.0)
    miss = t / (t + p)
    if t >= hidden_kv_tokens:
        return StrategyChoice(
            "pass_kv",
            miss,
            hidden_kv_tokens,
            threshold,
            f"T={t} >= {hidden_kv_tokens:.0f}: pass-KV's ring hides behind attention (Eq. 2)",
        )
    if miss >= threshold:
        return StrategyChoice(
            "pass_kv",
            miss,
            hidden_kv_tokens,
            threshold,
            f"miss rate {miss:.4f} >= {threshold:.4f}: the KV block is not "
            f"larger than the query block (Eq. {5 if refined else 1})",
        )
    return StrategyChoice(
        "pass_q",
        miss,
        hidden_kv_tokens,
        threshold,
        f"T={t} < {hidden_kv_tokens:.0f} and miss rate {miss:.4f} < "
        f"{threshold:.4f}: moving queries is cheaper",
    )


def choose_strategy(
    new_tokens: int,
    cached_tokens: int,
    config: ModelConfig,
    n_context: int,
    hardware: Hardware,
    *,
    bytes_per_element: int = 2,
    refined: bool = False,
) -> str:
    """``"pass_kv"`` or ``"pass_q"`` for a prefill of ``new_tokens`` after ``cached_tokens``."""
    if n_context == 1:
        return "pass_kv"  # no ring: both are the same local attention
    return explain_strategy(
        new_tokens,
        cached_tokens,
        config,
        n_context,
        hardware,
        bytes_per_element=bytes_per_element,
        refined=refined,
    ).strategy
