"""Writes the notebooks of this folder from their cell sources (run it after editing them).

The notebooks are stored without outputs; ``tests/test_notebooks.py`` executes each one.
Usage: ``python notebooks/build_notebooks.py``.
"""

import os

import nbformat

HERE = os.path.dirname(os.path.abspath(__file__))

SETUP = """import os
# 8 fake CPU devices; must be set before jax starts.
os.environ.setdefault(
    "XLA_FLAGS",
    "--xla_force_host_platform_device_count=8 "
    "--xla_cpu_enable_concurrency_optimized_scheduler=false",
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
import jax, numpy as np
print(jax.devices())"""

NOTEBOOKS = {
    "01_quickstart.ipynb": [
        (
            "md",
            "# cpjax quickstart\n\nLoad the embedded SmolLM2-135M-Instruct, build an 8-device "
            "fake CPU mesh, prefill a long document with a hidden fact **context-parallel**, "
            "ask about it, and check that every ring strategy gives the same answer.",
        ),
        ("code", SETUP),
        (
            "code",
            """from cpjax.loaders import load_model
from cpjax.engine import ContextParallel, Engine
from cpjax.engine.session import Session
from cpjax.parallel.mesh import make_mesh

config, params, tokenizer = load_model("smollm2-135m")
mesh = make_mesh(context=8)
print(config.name, config.n_layers, "layers;", mesh)""",
        ),
        ("md", "A long document (about 1,000 tokens) with one fact buried in the middle."),
        (
            "code",
            """filler = ("The committee met again to review the quarterly figures. Nothing unusual "
          "was reported, and the minutes were approved without comment. ")
fact = "Important: the lighthouse password is BLUE HERON. "
document = filler * 20 + fact + filler * 20
question = ("According to the notes above, what is the lighthouse password? "
            "Answer with the password only.")
prompt = tokenizer.apply_chat_template(
    [{"role": "user", "content": document + "\\n\\n" + question}])
ids = tokenizer.encode(prompt)
print(len(ids), "prompt tokens")""",
        ),
        (
            "code",
            """import time
answers = {}
for strategy in ("pass_kv", "pass_q", "all_gather"):
    engine = Engine(config, params, ContextParallel(mesh=mesh, strategy=strategy))
    start = time.perf_counter()
    out = engine.generate(ids, 16, tokenizer.eos_ids)
    answers[strategy] = tokenizer.decode(out)
    print(f"{strategy:10s} {time.perf_counter() - start:5.1f} s (incl. compilation): "
          f"{answers[strategy]!r}")
assert len(set(answers.values())) == 1, "every strategy gives the same greedy answer"
assert "HERON" in answers["pass_kv"].upper()""",
        ),
        (
            "md",
            "Each rank holds its share of the KV cache; a follow-up question is a *partial "
            "prefill* against it (persistent KV), decoded with the all-reduce decode.",
        ),
        (
            "code",
            """engine = Engine(config, params, ContextParallel(mesh=mesh, strategy="auto"))
session = Session(engine, capacity=4096)
reply = tokenizer.decode(list(session.turn(ids, 16, tokenizer.eos_ids)))
print("turn 1:", reply, "| per-rank cache fill:", engine.rank_fill(session.cache))
follow_up = tokenizer.encode("\\n<|im_start|>user\\nRepeat the password in lowercase."
                             "<|im_end|>\\n<|im_start|>assistant\\n")
reply = tokenizer.decode(list(session.turn(follow_up, 16, tokenizer.eos_ids)))
print("turn 2:", reply, "| per-rank cache fill:", engine.rank_fill(session.cache))""",
        ),
    ],
    "02_ring_attention_explained.ipynb": [
        (
            "md",
            "# Ring attention, explained\n\nThe load-balanced layout, which (query, key) "
            "blocks each rank computes at each ring step, the masks that come from positions, "
            "and an exactness check against single-device attention.",
        ),
        (
            "code",
            SETUP
            + """
import matplotlib.pyplot as plt
from cpjax.parallel.layout import balanced_layout, causal_work_per_rank""",
        ),
        (
            "md",
            "## The layout\nA sequence of T tokens is cut into 2N chunks; rank r holds chunks "
            "r and 2N-1-r, so every rank has the same share of the causal triangle.",
        ),
        (
            "code",
            """N, T = 4, 64
layout = balanced_layout([T], N)
owner = np.empty(T, int)
owner[layout.source] = np.repeat(np.arange(N), layout.local_len)
fig, ax = plt.subplots(figsize=(9, 1.2))
ax.imshow(owner[None], cmap="tab10", aspect="auto", vmin=0, vmax=9)
ax.set_yticks([]); ax.set_xlabel("token position"); ax.set_title("rank that holds each token")
plt.show()
print("visible (query, key) pairs per rank:", causal_work_per_rank(layout))""",
        ),
        (
            "md",
            "## Which blocks each rank computes\nIn pass-KV, at step j rank r attends its "
            "queries to the keys of rank (r - j) mod N. Masks come from the positions, so a "
            "chunk pair that lies entirely in the future is skipped.",
        ),
        (
            "code",
            """pos = layout.positions.reshape(N, -1)
fig, axes = plt.subplots(N, N, figsize=(8, 8), sharex=True, sharey=True)
for r in range(N):
    for j in range(N):
        s = (r - j) % N
        visible = pos[s][None, :] <= pos[r][:, None]
        axes[r, j].imshow(visible, cmap="Greens", vmin=0, vmax=1)
        axes[r, j].set_title(f"rank {r}, step {j}: keys of {s}", fontsize=7)
        axes[r, j].set_xticks([]); axes[r, j].set_yticks([])
fig.suptitle("pass-KV: visible (query, key) pairs per rank and ring step (green)")
plt.show()""",
        ),
        (
            "md",
            "## Exactness\nThe tiny random model on meshes of 1, 2, 4 and 8 fake devices, "
            "every strategy, against the single-device forward (fp32).",
        ),
        (
            "code",
            """from cpjax.config import PRESETS
from cpjax.engine import Engine
from cpjax.engine import ContextParallel, Engine
from cpjax.model.decoder import init_params
from cpjax.parallel.mesh import make_mesh

cfg = PRESETS["tiny"]
params = init_params(cfg, seed=0)
ids = np.random.default_rng(0).integers(0, cfg.vocab_size, 101).astype(np.int32)
want = Engine(cfg, params).logits(ids)
for n in (1, 2, 4, 8):
    for strategy in ("pass_kv", "pass_q", "all_gather"):
        got = Engine(cfg, params, ContextParallel(mesh=make_mesh(n), strategy=strategy)).logits(ids)
        err = float(np.abs(got - want).max())
        print(f"N={n} {strategy:10s} max |logit error| = {err:.1e}")
        assert err < 1e-5""",
        ),
    ],
    "03_scaling_model.ipynb": [
        (
            "md",
            "# The scaling model against the paper\n\n`cpjax.perfmodel` predicts prefill (TTFT) "
            "and decode (TTIT) of Llama3-405B under context parallelism: latency + bandwidth per "
            "collective, attention in tile waves, `max(compute, comm)` per ring step. Each fitted "
            "constant is fitted on exactly one published number; every other number is held out.",
        ),
        (
            "code",
            """from cpjax.perfmodel.calibration import PAPER_H100_RDMA
from cpjax.perfmodel.fits import FITS
for fit in FITS:
    print(f"{fit.constant:28s} {getattr(PAPER_H100_RDMA, fit.constant):.4g}  <- {fit.source}"
          f" = {fit.published:g} {fit.unit}")""",
        ),
        (
            "code",
            """from cpjax.perfmodel.validation import comparison
from experiments.paper_model import TOLERANCE, tolerance_group
for r in comparison():
    tol = TOLERANCE[tolerance_group(r._asdict())]
    mark = "fitted" if r.fitted else ("" if abs(r.error) <= tol else "MISS")
    print(f"{r.table:12s} {r.label:38s} {r.published:>9.4g} {r.predicted:>9.4g} {r.unit:2s}"
          f" {100 * r.error:+6.1f}% {mark}")""",
        ),
        (
            "md",
            "## Why Table 4's small-T cells miss\nAt T = 1280 each GPU runs 320 token rows. "
            "A small-GEMM efficiency `M / (M + gemm_half_rows)` fitted on the T = 1280 pass-Q "
            "cell closes it, but breaks Table 6's 8K TTFT and decode (whose GEMMs have M = 1); "
            "the model keeps `gemm_half_rows = 0` (README).",
        ),
        (
            "code",
            """from cpjax.config import PRESETS
from cpjax.hardware import PRESETS as HARDWARE
from cpjax.perfmodel import Deployment, decode_time, fit_constants, prefill_time
from cpjax.perfmodel.calibration import PAPER_H100_RDMA, Fit
from cpjax.perfmodel.validation import table4_rows, ttft_rows
model, rdma = PRESETS["llama3-405b"], HARDWARE["h100-rdma"]
t1280 = Fit("gemm_half_rows", 898.71, "ms", "Table 4: T=1280 pass-Q",
            lambda c: 1e3 * prefill_time(model, 1280, Deployment(cp=4), rdma, 126720,
                                         "pass_q", c)["ttft_s"], (0.0, 2e4))
curve = fit_constants((t1280,), PAPER_H100_RDMA)
ttft = {r.label: r.error for r in ttft_rows(curve)}
print(f"gemm_half_rows = {curve.gemm_half_rows:.0f} rows")
print("Table 4 within 20 %:", sum(abs(r.error) <= 0.2 for r in table4_rows(curve)), "of 28")
print(f"TTFT 8K CP2+TP8: {100 * ttft['TTFT 8K CP2+TP8']:+.1f} % (tolerance 15 %)")
ttit = decode_time(model, 131072, Deployment(), rdma, constants=curve)["ttit_ms"]
print(f"TTIT 128K TP8: {ttit:.0f} ms (published 46.26)")""",
        ),
        (
            "md",
            "## TTFT vs nodes, RDMA and TCP\nPredicted pass-KV TTFT for 128K and 1M tokens; "
            "the paper's points as crosses.",
        ),
        (
            "code",
            """import matplotlib.pyplot as plt
from experiments.paper_model import PAPER_TTFT, scaling_curves
curves = scaling_curves("llama3-405b", (131072, 1048576), (1, 2, 4, 8, 16, 32))
for hw, style in (("h100-rdma", "-"), ("h100-tcp", "--")):
    for tokens, curve in curves[hw].items():
        plt.plot([p["nodes"] for p in curve], [p["ttft_s"] for p in curve], style,
                 label=f"{tokens} tokens {hw}")
for p in PAPER_TTFT:
    if p.tp == 8 and p.tokens >= 131072:
        plt.scatter(p.cp, p.seconds, marker="x", color="k")
plt.xscale("log", base=2); plt.yscale("log"); plt.xlabel("nodes"); plt.ylabel("TTFT (s)")
plt.legend(); plt.show()""",
        ),
        (
            "md",
            "## Sizing a million-token job\nThe planner's smallest mesh for a 60 s TTFT target "
            "(96 GB per GPU, RDMA).",
        ),
        (
            "code",
            """from cpjax.config import PRESETS
from cpjax.hardware import PRESETS as HARDWARE
from cpjax.perfmodel import plan
result = plan(PRESETS["llama3-405b"], 1 << 20, HARDWARE["h100-rdma"], target_ttft_s=60,
              gpu_memory_gb=96)
print(result["chosen"])""",
        ),
    ],
    "04_long_context_finetune.ipynb": [
        (
            "md",
            "# Long-context fine-tuning under context parallelism\n\nFine-tune the embedded "
            "SmolLM2-135M-Instruct on one long document split over **8 fake CPU devices**: the "
            "sequence is laid out over the ranks like a prefill, the forward runs the pass-KV "
            "ring, and the gradient flows back through the ring's exact backward (each rank "
            "only ever holds its share of the activations). The loss goes down, and the model "
            "becomes surer of a fact that appears once in the document.",
        ),
        ("code", SETUP),
        (
            "code",
            """from cpjax.loaders import load_model
from cpjax.engine import ContextParallel, Engine
from cpjax.parallel.mesh import make_mesh
from cpjax.train import OptimizerConfig, Trainer, pack_batch
from cpjax.train.trainer import local_params

config, params, tokenizer = load_model("smollm2-135m")
filler = ("The committee met again to review the quarterly figures. Nothing unusual "
          "was reported, and the minutes were approved without comment. ")
fact = "Important: the lighthouse password is BLUE HERON. "
document = tokenizer.encode(filler * 12 + fact + filler * 12, add_bos=True)
print(len(document), "tokens in the document")""",
        ),
        (
            "md",
            "How sure is the model of the fact? The log-probability of the password after its "
            "cue, scored by the inference engine (one device; a short probe).",
        ),
        (
            "code",
            """cue = tokenizer.encode("Important: the lighthouse password is", add_bos=True)
answer = tokenizer.encode(" BLUE HERON.")

def fact_logprob(params):
    engine = Engine(config, params)
    ids = np.array(cue + answer, np.int32)
    logprobs = engine.score(ids)  # logprobs[t] = log p(ids[t + 1] | ids[:t + 1])
    return float(logprobs[len(cue) - 1 : len(ids) - 1].sum())

before = fact_logprob(params)
print(f"log p(' BLUE HERON.' | cue) before: {before:.2f}")""",
        ),
        (
            "md",
            "Fine-tune: plain SGD, the whole document as one sequence, 8 context ranks "
            "(pass-KV). Each step is one optimizer update on the mean next-token loss of the "
            "document. (The weights are replicated on every rank, so on 8 fake devices in one "
            "process SGD keeps memory to 8 x (weights + gradients); AdamW would add 8 x its "
            "two moments: `OptimizerConfig('adamw', ...)` on real devices.)",
        ),
        (
            "code",
            """trainer = Trainer(
    config,
    ContextParallel(make_mesh(context=8), strategy="pass_kv"),
    OptimizerConfig("sgd", learning_rate=0.03),
)
state = trainer.init_state(params)
batch = pack_batch(np.array([document]))
losses = []
for _ in range(4):
    state, metrics = trainer.step(state, [batch])
    losses.append(metrics.loss)
    print(f"step {metrics.step}: loss {metrics.loss:.3f}, grad norm {metrics.grad_norm:.2f}")
assert losses[-1] < losses[0]""",
        ),
        (
            "code",
            """after = fact_logprob(local_params(state))
print(f"log p(' BLUE HERON.' | cue): {before:.2f} -> {after:.2f}")
assert after > before""",
        ),
        (
            "md",
            "The same step on one device gives the same loss and gradient up to float rounding "
            "(`tests/test_train.py` checks every ring on meshes of 1, 2, 4, 8 and 4x2 against "
            "single-device autodiff; `tests/test_train_oracle.py` checks an SGD step against "
            "PyTorch). Save a run with `python -m cpjax finetune ... --out RUN` and export it "
            "with `python -m cpjax export --model RUN/model --out HF_DIR`.",
        ),
    ],
}


def main() -> None:
    for name, cells in NOTEBOOKS.items():
        nb = nbformat.v4.new_notebook()
        nb.metadata["kernelspec"] = {
            "name": "python3",
            "display_name": "Python 3",
            "language": "python",
        }
        nb.cells = [
            nbformat.v4.new_markdown_cell(src) if kind == "md" else nbformat.v4.new_code_cell(src)
            for kind, src in cells
        ]
        nbformat.write(nb, os.path.join(HERE, name))
        print("wrote", name)


if __name__ == "__main__":
    main()
