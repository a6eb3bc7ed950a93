"""The model-predicted pass-KV vs pass-Q map over (new tokens T, cached tokens P); no devices.

For every context-parallel size N (nodes of ``tp`` GPUs) and hardware preset,
``cpjax.perfmodel.prefill_time`` predicts the TTFT of a prefill of T new tokens after P cached
ones with each ring, on a log grid of T and of P (plus P = 0). Each cell records the faster ring
and the heuristic's choice (``cpjax.parallel.heuristic``: Algorithm 1, and Algorithm 5 with
``refined=True``); the JSON reports how often the heuristic picks the model's faster ring, and
the same for the 14 measured rows of the paper's Table 4 (CP4, RDMA), which the figure overlays.
Run: ``python -m experiments.run experiments/configs/strategy_map.gin``.
"""

from __future__ import annotations

import math
import os

from cpjax.names import HEURISTIC_CHOICES as STRATEGIES
from experiments.paper_model import TABLE_4

HERE = os.path.dirname(os.path.abspath(__file__))

# Where the paper measured Table 4: Llama3-405B on CP4 x TP8 over RDMA.
TABLE_4_MODEL, TABLE_4_CP, TABLE_4_TP, TABLE_4_HARDWARE = "llama3-405b", 4, 8, "h100-rdma"


def log_grid(token_range, per_octave: int, name: str = "token_range") -> list[int]:
    """Token counts ``round(low * 2 ** (k / per_octave))`` from ``low`` up to ``high`` for
    ``token_range = (low, high)``; ``name`` is the argument errors name."""
    from cpjax.errors import require

    require(
        len(token_range) == 2
        and all(isinstance(n, int) for n in token_range)
        and 1 <= token_range[0] <= token_range[1],
        f"{name}={list(token_range)!r}: must be [low, high], ints with 1 <= low <= high",
    )
    require(
        isinstance(per_octave, int) and per_octave >= 1,
        f"points_per_octave={per_octave!r}: must be an int >= 1",
    )
    low, high = token_range
    steps = math.floor(per_octave * math.log2(high / low) + 1e-9)
    return [round(low * 2 ** (k / per_octave)) for k in range(steps + 1)]


def token_label(tokens: int) -> str:
    """``131072`` -> ``"128K"``, ``1048576`` -> ``"1M"``, ``100`` -> ``"100"``."""
    for size, unit in ((1 << 20, "M"), (1 << 10, "K")):
        if tokens >= size and tokens % size == 0:
            return f"{tokens // size}{unit}"
    return str(tokens)


def measured_winner(pass_kv_ms: float, pass_q_ms: float) -> str:
    """The faster ring of a Table 4 row."""
    return "pass_kv" if pass_kv_ms < pass_q_ms else "pass_q"


def predict_cell(config, new_tokens: int, cached_tokens: int, deployment, hardware) -> dict:
    """One (T, P) cell: each ring's predicted TTFT (s), the faster one, and the heuristic's
    choice by Algorithm 1 (``heuristic``) and Algorithm 5 (``heuristic_refined``)."""
    from cpjax.parallel.heuristic import choose_strategy
    from cpjax.perfmodel import prefill_time

    seconds = {
        s: prefill_time(config, new_tokens, deployment, hardware, cached_tokens, s)["ttft_s"]
        for s in STRATEGIES
    }
    choice = {
        f"heuristic{suffix}": choose_strategy(
            new_tokens,
            cached_tokens,
            config,
            deployment.cp,
            hardware,
            bytes_per_element=deployment.bytes_per_element,
            refined=refined,
        )
        for suffix, refined in (("", False), ("_refined", True))
    }
    return {
        "new_tokens": new_tokens,
        "cached_tokens": cached_tokens,
        "seconds": seconds,
        "faster": min(seconds, key=seconds.get),
        **choice,
    }


def choice_summary(rows: list[dict]) -> dict:
    """For each heuristic (``heuristic``, ``heuristic_refined``): the fraction of ``rows`` where
    it picks the model's faster ring (``agreement``), and the largest predicted TTFT ratio of its
    ring to the faster one (``worst_slowdown``, 1.0 when it always agrees)."""
    return {
        key: {
            "agreement": sum(r[key] == r["faster"] for r in rows) / len(rows),
            "worst_slowdown": max(r["seconds"][r[key]] / r["seconds"][r["faster"]] for r in rows),
        }
        for key in ("heuristic", "heuristic_refined")
    }


def table4_rows() -> list[dict]:
    """The paper's Table 4 rows (ms) next to the model's prediction for them."""
    from cpjax.config import get_preset
    from cpjax.hardware import PRESETS as HARDWARE
    from cpjax.perfmodel import Deployment

    config, hardware = get_preset(TABLE_4_MODEL), HARDWARE[TABLE_4_HARDWARE]
    deployment = Deployment(cp=TABLE_4_CP, tp=TABLE_4_TP)
    return [
        {
            **predict_cell(config, t, p, deployment, hardware),
            "measured_ms": {"pass_kv": kv_ms, "pass_q": q_ms},
            "measured_winner": measured_winner(kv_ms, q_ms),
        }
        for p, t, kv_ms, q_ms in TABLE_4
    ]


def table4_summary(rows: list[dict]) -> dict:
    """How many Table 4 rows each predictor gets right (measured winner) out of ``rows``."""
    count = {
        key: sum(r[key] == r["measured_winner"] for r in rows)
        for key in ("faster", "heuristic", "heuristic_refined")
    }
    return {
        "rows": len(rows),
        "model_matches_measured": count["faster"],
        "heuristic_matches_measured": count["heuristic"],
        "refined_matches_measured": count["heuristic_refined"],
        "heuristic_matches_model": sum(r["heuristic"] == r["faster"] for r in rows),
    }


def _boundary(labels) -> list:
    """Cell edges between neighbours of different label in a 2-D grid (cell (i, j) centred at
    x = j, y = i), as ``[((x0, y0), (x1, y1)), ...]`` for a ``LineCollection``."""
    rows, cols = len(labels), len(labels[0])
    edges = []
    for i in range(rows):
        for j in range(cols):
            if j + 1 < cols and labels[i][j] != labels[i][j + 1]:
                edges.append(((j + 0.5, i - 0.5), (j + 0.5, i + 0.5)))
            if i + 1 < rows and labels[i][j] != labels[i + 1][j]:
                edges.append(((j - 0.5, i + 0.5), (j + 0.5, i + 0.5)))
    return edges


def _grid_index(tokens: int, low: int, per_octave: int) -> float:
    """Fractional grid position of ``tokens`` on :func:`log_grid` (``low``, ``per_octave``)."""
    return per_octave * math.log2(tokens / low)


def _speedup_label(log2_ratio: float) -> str:
    """A colorbar tick: log2(TTFT pass-KV / TTFT pass-Q) as "pass-Q 4x faster" etc."""
    if log2_ratio == 0:
        return "equal"
    faster = "pass-Q" if log2_ratio > 0 else "pass-KV"
    return f"{faster} {2 ** abs(log2_ratio):.3g}x faster"


def _mark_table4(ax, table4: list[dict], new_low: int, cached_low: int, per_octave: int) -> None:
    """Table 4's rows at their (T, P) on a panel whose grids start at ``new_low`` and (above the
    P = 0 row) ``cached_low``; marker = measured winner (triangle pass-KV, circle pass-Q)."""
    for winner, marker in (("pass_kv", "^"), ("pass_q", "o")):
        pts = [r for r in table4 if r["measured_winner"] == winner]
        ax.scatter(
            [_grid_index(r["new_tokens"], new_low, per_octave) for r in pts],
            [
                1 + _grid_index(r["cached_tokens"], cached_low, per_octave)
                if r["cached_tokens"]
                else 0
                for r in pts
            ],
            marker=marker,
            s=42,
            facecolor="gold",
            edgecolor="black",
            zorder=3,
        )


def _speedup_colorbar(fig, image, axes, norm) -> None:
    """One colorbar for all panels, its ticks labelled "pass-Q 4x faster" etc."""
    from matplotlib.ticker import MaxNLocator

    ticks = [
        v
        for v in [
            *MaxNLocator(4).tick_values(norm.vmin, 0),
            *MaxNLocator(6).tick_values(0, norm.vmax)[1:],
        ]
        if norm.vmin <= v <= norm.vmax
    ]
    bar = fig.colorbar(
        image,
        ax=axes,
        shrink=0.9,
        ticks=ticks,
        label="predicted TTFT pass-KV / TTFT pass-Q (log scale)",
    )
    bar.ax.set_yticklabels([_speedup_label(v) for v in ticks])


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.collections import LineCollection
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.lines import Line2D

    from cpjax.io import save_figure

    news, cached = results["new_tokens"], results["cached_tokens"]  # cached[0] == 0
    per_octave = results["points_per_octave"]
    panels = [(hw, cp) for hw in results["hardware"] for cp in results["cp"]]
    table4_panel = (
        (TABLE_4_HARDWARE, TABLE_4_CP)
        if (results["model"], results["tp"]) == (TABLE_4_MODEL, TABLE_4_TP)
        else None
    )
    grids = {}
    for hw, cp in panels:
        cells = {
            (r["cached_tokens"], r["new_tokens"]): r
            for r in results["rows"]
            if r["hardware"] == hw and r["cp"] == cp
        }
        grids[hw, cp] = [[cells[p, t] for t in news] for p in cached]
    log_ratio = {
        key: np.array(
            [
                [math.log2(c["seconds"]["pass_kv"] / c["seconds"]["pass_q"]) for c in row]
                for row in grid
            ]
        )
        for key, grid in grids.items()
    }
    low = min(float(z.min()) for z in log_ratio.values())
    high = max(float(z.max()) for z in log_ratio.values())
    norm = TwoSlopeNorm(0.0, vmin=min(low, -1e-3), vmax=max(high, 1e-3))
    n_rows, n_cols = len(results["hardware"]), len(results["cp"])
    fig, axes = plt.subplots(
        n_rows,
        n_cols,
        figsize=(4.6 * n_cols + 1.2, 4.4 * n_rows),
        squeeze=False,
        sharex=True,
        sharey=True,
        layout="constrained",
    )
    every = 2 * per_octave  # a tick label every second octave
    styles = {
        "faster": ("limegreen", "-", "model: equal TTFT"),
        "heuristic": ("black", "-", "heuristic, Algorithm 1"),
        "heuristic_refined": ("black", ":", "heuristic, Algorithm 5 (refined)"),
    }
    for ax, (hw, cp) in zip(axes.flat, panels):
        image = ax.imshow(
            log_ratio[hw, cp],
            cmap="RdBu_r",
            norm=norm,
            origin="lower",
            aspect="auto",
            interpolation="nearest",
        )
        for key, (color, style, _) in styles.items():
            labels = [[c[key] for c in row] for row in grids[hw, cp]]
            ax.add_collection(
                LineCollection(_boundary(labels), colors=color, linestyles=style, linewidths=1.6)
            )
        ax.axhline(0.5, color="white", lw=2)  # P = 0 below, the log grid of P above
        if (hw, cp) == table4_panel:
            _mark_table4(ax, results["table4"], news[0], cached[1], per_octave)
        basic, refined = (
            results["agreement"][f"{hw}/cp{cp}"][key] for key in ("heuristic", "heuristic_refined")
        )
        ax.set_title(
            f"CP{cp} x TP{results['tp']}, {hw}: Algorithm 1 picks the faster ring\n"
            f"in {basic['agreement']:.0%} of cells (Algorithm 5: "
            f"{refined['agreement']:.0%})",
            fontsize=9,
        )
    for ax in axes[-1]:
        ticks = range(0, len(news), every)
        ax.set_xticks(list(ticks), [token_label(news[k]) for k in ticks])
        ax.set_xlabel("new tokens T")
    for ax in axes[:, 0]:
        ticks = [0, *range(1, len(cached), every)]
        ax.set_yticks(ticks, [token_label(cached[k]) for k in ticks])
        ax.set_ylabel("cached tokens P")
    _speedup_colorbar(fig, image, axes, norm)
    table4 = results["table4_summary"]
    handles = [Line2D([], [], color=c, ls=s, label=label) for c, s, label in styles.values()]
    if table4_panel in panels:
        handles += [
            Line2D(
                [],
                [],
                ls="",
                marker=m,
                markerfacecolor="gold",
                markeredgecolor="black",
                label=f"Table 4 (measured): {w} won",
            )
            for w, m in (("pass-KV", "^"), ("pass-Q", "o"))
        ]
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=8)
    fig.suptitle(
        f"{results['model']}: which ring does cpjax.perfmodel predict faster?\n"
        f"On Table 4 the model's faster ring matches the measured winner in "
        f"{table4['model_matches_measured']}/{table4['rows']} rows, Algorithm 1 in "
        f"{table4['heuristic_matches_measured']}/{table4['rows']}, Algorithm 5 in "
        f"{table4['refined_matches_measured']}/{table4['rows']}",
        fontsize=10,
    )
    save_figure(path, fig)


def run_strategy_map(
    cp=(4,),
    hardware=("h100-rdma",),
    tp=8,
    model="llama3-405b",
    new_tokens_range=(128, 131072),
    cached_tokens_range=(1024, 1048576),
    points_per_octave=2,
    out=os.path.join(HERE, "results", "strategy_map.json"),
    figure=os.path.join(HERE, "figures", "strategy_map.png"),
) -> dict:
    """Predict both rings over the (T, P) grid for every (hardware, cp); write JSON and a plot.

    ``new_tokens_range`` / ``cached_tokens_range``: ``(low, high)`` token counts of the log
    grids (``points_per_octave`` per doubling); P = 0 is always added.
    """
    from cpjax.config import get_preset
    from cpjax.errors import require
    from cpjax.hardware import PRESETS as HARDWARE
    from cpjax.perfmodel import Deployment
    from experiments.provenance import write_results

    cp, hardware = list(cp), list(hardware)
    require(
        cp and all(isinstance(n, int) and n >= 2 for n in cp),
        f"cp={cp}: every size must be an int >= 2 (at N = 1 there is no ring to choose)",
    )
    unknown = [h for h in hardware if h not in HARDWARE]
    require(hardware and not unknown, f"hardware={hardware}: choose among {', '.join(HARDWARE)}")
    config = get_preset(model)
    news = log_grid(new_tokens_range, points_per_octave, "new_tokens_range")
    cached = [0, *log_grid(cached_tokens_range, points_per_octave, "cached_tokens_range")]
    rows, panels = [], {}
    for hw in hardware:
        for n in cp:
            deployment = Deployment(cp=n, tp=tp)
            cells = [
                {"hardware": hw, "cp": n, **predict_cell(config, t, p, deployment, HARDWARE[hw])}
                for p in cached
                for t in news
            ]
            panels[f"{hw}/cp{n}"] = choice_summary(cells)
            rows += cells
    table4 = table4_rows()
    results = {
        "experiment": "strategy_map",
        "model": model,
        "tp": tp,
        "cp": cp,
        "hardware": hardware,
        "hardware_figures": {h: HARDWARE[h].__dict__ for h in hardware},
        "points_per_octave": points_per_octave,
        "new_tokens": news,
        "cached_tokens": cached,
        "agreement": {"all": choice_summary(rows), **panels},
        "table4_summary": table4_summary(table4),
        "table4": table4,
        "rows": rows,
        "out": out,
        "figure": figure,
    }
    results = write_results(out, results)
    plot(results, figure)
    return results
