"""The performance model (``cpjax.perfmodel``) next to the paper's TTFT numbers.

Left: predicted vs published TTFT for every quoted point (Tables 6-7, Fig. 6a, Fig. 8).
Right: predicted scaling curves (TTFT vs context for CP1..CP16 over TP8), the paper's points
overlaid. Also the pass-KV/pass-Q choice on the paper's Table 4. No devices are used.
Run: ``python -m experiments.run experiments/configs/paper_model.gin``.
"""

from __future__ import annotations

import os

HERE = os.path.dirname(os.path.abspath(__file__))

#: (new tokens, CP nodes, TTFT in s, source) quoted in the paper (TP8 per node, Llama3-405B).
PAPER_TTFT = [
    (8192, 1, 1.740, "Table 6"),
    (32768, 1, 7.658, "Table 6"),
    (131072, 1, 42.010, "Table 6"),
    (8192, 2, 0.999, "Table 6"),
    (32768, 2, 4.015, "Table 6"),
    (131072, 2, 21.042, "Table 6"),
    (131072, 4, 10.950, "Table 7"),
    (131072, 8, 5.85, "Fig. 6a"),
    (131072, 16, 3.8, "Fig. 8"),
    (1_000_000, 16, 77.0, "Fig. 8"),
]

#: Paper Table 4 (CP4, RDMA, P + T = 128000): (P, T, pass-KV ms, pass-Q ms).
TABLE_4 = [
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
]


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cpjax.io import save_figure

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6))
    rows = results["paper_points"]
    labels = [
        (f"{r['tokens'] / 1e6:g}M" if r["tokens"] % 1024 else f"{r['tokens'] // 1024}K")
        + f" CP{r['cp']}"
        for r in rows
    ]
    x = range(len(rows))
    left.bar([i - 0.2 for i in x], [r["paper_s"] for r in rows], 0.4, label="paper")
    left.bar([i + 0.2 for i in x], [r["predicted_s"] for r in rows], 0.4, label="model")
    for i, r in enumerate(rows):
        left.text(
            i + 0.2, r["predicted_s"] * 1.1, f"{100 * r['error']:+.0f}%", ha="center", fontsize=7
        )
    left.set_yscale("log")
    left.set_xticks(list(x), labels, rotation=45, ha="right", fontsize=8)
    left.set_ylabel("TTFT (s, log)")
    left.set_title("Llama3-405B prefill, TP8 per node, RDMA: model vs paper")
    left.legend()
    for cp, curve in results["curves"].items():
        (line,) = right.plot(
            [p["tokens"] for p in curve], [p["ttft_s"] for p in curve], label=f"CP{cp}"
        )
        pts = [r for r in rows if r["cp"] == int(cp)]
        right.scatter(
            [r["tokens"] for r in pts],
            [r["paper_s"] for r in pts],
            color=line.get_color(),
            marker="x",
            zorder=3,
        )
    right.set_xscale("log", base=2)
    right.set_yscale("log")
    right.set_xlabel("context tokens")
    right.set_ylabel("TTFT (s)")
    right.set_title("predicted scaling (lines) and paper points (x)")
    right.legend(fontsize=8)
    fig.suptitle(
        f"efficiency constant {results['efficiency']:.3f} (fitted on Table 6, 128K TP8);"
        f" Table 4 strategy agreement {results['table4_agreement']}/14",
        fontsize=9,
    )
    save_figure(path, fig)


def run_paper_model(
    hardware="h100-rdma",
    contexts=(8192, 32768, 131072, 524288, 1048576),
    cp_sizes=(1, 2, 4, 8, 16),
    tp=8,
    model="llama3-405b",
    out=os.path.join(HERE, "results", "paper_model.json"),
    figure=os.path.join(HERE, "figures", "paper_model.png"),
) -> dict:
    from cpjax.config import PRESETS
    from cpjax.hardware import PRESETS as HARDWARE
    from cpjax.perfmodel import Deployment, prefill_time
    from experiments.provenance import write_results

    config, hw = PRESETS[model], HARDWARE[hardware]
    points = []
    for tokens, cp, paper_s, source in PAPER_TTFT:
        predicted = prefill_time(config, tokens, Deployment(cp=cp, tp=tp), hw)["ttft_s"]
        points.append(
            {
                "tokens": tokens,
                "cp": cp,
                "paper_s": paper_s,
                "source": source,
                "predicted_s": predicted,
                "error": predicted / paper_s - 1,
            }
        )
    curves = {
        str(cp): [
            {"tokens": t, "ttft_s": prefill_time(config, t, Deployment(cp, tp), hw)["ttft_s"]}
            for t in contexts
        ]
        for cp in cp_sizes
    }
    table4 = []
    for p, t, kv_ms, q_ms in TABLE_4:
        chosen = prefill_time(config, t, Deployment(cp=4, tp=tp), hw, cached_tokens=p)
        table4.append(
            {
                "cached": p,
                "new": t,
                "measured_winner": "pass_kv" if kv_ms < q_ms else "pass_q",
                "chosen": chosen["strategy"],
            }
        )
    agreement = sum(r["measured_winner"] == r["chosen"] for r in table4)
    results = {
        "experiment": "paper_model",
        "model": model,
        "hardware": hw.__dict__,
        "efficiency": hw.efficiency,
        "paper_points": points,
        "curves": curves,
        "table4": table4,
        "table4_agreement": agreement,
        "out": out,
        "figure": figure,
        "rows": points,
    }
    results = write_results(out, results)
    plot(results, figure)
    return results
