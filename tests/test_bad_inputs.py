"""Bad input at the public entry points raises :class:`CpjaxError` naming the problem.

Every case below must raise with a message holding its ``expect`` fragment. The README's table
"What bad input produces" is generated from these cases with their real messages:
``python -m tests.test_bad_inputs`` rewrites it, and a test fails when it is out of date.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import tempfile
from typing import Callable

import numpy as np
import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
BEGIN, END = "<!-- bad-inputs:begin -->", "<!-- bad-inputs:end -->"


class Context:
    """What the cases need, built on first use: the tiny model, engines, a scratch folder."""

    def __init__(self, tmp: str):
        self.tmp = tmp
        self._cache = {}

    def _once(self, key, build):
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    @property
    def config(self):
        from cpjax.config import PRESETS

        return PRESETS["tiny"]

    @property
    def params(self):
        from cpjax.model.decoder import init_params

        return self._once("params", lambda: init_params(self.config, 0))

    @property
    def engine(self):
        from cpjax.engine import Engine

        return self._once("engine", lambda: Engine(self.config, self.params))

    @property
    def cp_engine(self):
        from cpjax.engine import ContextParallel, Engine
        from cpjax.parallel.mesh import make_mesh

        return self._once(
            "cp", lambda: Engine(self.config, self.params, ContextParallel(mesh=make_mesh(2)))
        )

    def path(self, name: str) -> str:
        return os.path.join(self.tmp, name)


@dataclasses.dataclass(frozen=True)
class Case:
    entry: str  # the entry point, as the table shows it
    problem: str  # the bad input, in words
    expect: str  # a fragment the message must contain
    call: Callable[[Context], object]


def _nan_weight_engine(c: Context):
    from cpjax.engine import Engine

    params = {**c.params, "layers": {**c.params["layers"]}}
    params["layers"]["wq"] = np.asarray(params["layers"]["wq"]).copy()
    params["layers"]["wq"][1, 0, 0, 0] = np.nan
    return Engine(c.config, params, check_finite=True)


def _other_config_params(c: Context):
    from cpjax.model.decoder import init_params

    return init_params(dataclasses.replace(c.config, n_layers=1), 0)


def _float32_engine_with_the_hopper_kernel(c: Context):
    from cpjax.engine import Engine
    from cpjax.model.decoder import init_params

    config = dataclasses.replace(c.config, head_dim=64)  # a head_dim the kernel takes
    return Engine(config, init_params(config, 0), attention="pallas_mgpu")


def _truncated_gguf(c: Context) -> str:
    from cpjax.loaders.embedded import embedded_gguf_path

    with open(embedded_gguf_path(), "rb") as f:
        head = f.read(5000)
    with open(c.path("truncated.gguf"), "wb") as f:
        f.write(head)
    return c.path("truncated.gguf")


def _load_other_config_checkpoint(c: Context):
    from cpjax.loaders.checkpoint import load_checkpoint, save_checkpoint

    save_checkpoint(c.path("ckpt"), c.config, c.params)
    return load_checkpoint(
        c.path("ckpt"), expected_config=dataclasses.replace(c.config, n_heads=8, rope_theta=5e5)
    )


def _load_incomplete_checkpoint(c: Context):
    from cpjax.loaders.checkpoint import load_checkpoint

    os.makedirs(c.path("half/params"), exist_ok=True)
    return load_checkpoint(c.path("half"))


def _export_into_a_used_folder(c: Context):
    from cpjax.loaders import export_hf

    os.makedirs(c.path("used"), exist_ok=True)
    with open(c.path("used/notes.txt"), "w") as f:
        f.write("mine")
    return export_hf(c.path("used"), c.config, c.params)


def _export_mixed_llama(c: Context):
    from cpjax.loaders import export_hf

    config = dataclasses.replace(c.config, sliding_window=8, layer_types=("full", "sliding"))
    return export_hf(c.path("mixed"), config, c.params)


def _cases():
    import jax

    from cpjax.engine import ContextParallel, Engine, SingleDevice
    from cpjax.engine.sampling import Sampling
    from cpjax.engine.session import Session
    from cpjax.loaders import load_model
    from cpjax.loaders.checkpoint import load_checkpoint  # noqa: F401  (import errors surface here)
    from cpjax.parallel import distributed
    from cpjax.parallel.mesh import make_mesh

    ids = np.array([1, 2, 3], np.int32)
    return [
        Case(
            "Engine.score",
            "ids of shape (2, 3)",
            "expected a 1-D sequence",
            lambda c: c.engine.score(np.zeros((2, 3), np.int32)),
        ),
        Case(
            "Engine.score",
            "float ids",
            "must be integers",
            lambda c: c.engine.score(np.array([1.0, 2.5])),
        ),
        Case(
            "Engine.score",
            "an id outside the vocabulary",
            "is outside [0, 256)",
            lambda c: c.engine.score([1, 256]),
        ),
        Case(
            "Engine.score",
            "more tokens than the model's window",
            "context window of 16384",
            lambda c: c.engine.score(np.zeros(16385, np.int32)),
        ),
        Case(
            "Engine.logits",
            "positions of another length than the ids",
            "positions: expected shape (3,)",
            lambda c: c.engine.logits(ids, positions=[0, 1]),
        ),
        Case(
            "Engine.logits",
            "float positions",
            "positions: must be integers",
            lambda c: c.engine.logits(ids, positions=[0.0, 1.0, 2.0]),
        ),
        Case(
            "Engine.logits",
            "a position beyond the model's window",
            "outside [0, 16384)",
            lambda c: c.engine.logits(ids, positions=[0, 1, 16384]),
        ),
        Case(
            "Engine(ContextParallel).logits",
            "a negative segment id",
            "segments: value -1",
            lambda c: c.cp_engine.logits(ids, segments=[0, -1, 0]),
        ),
        Case(
            "Engine.decode",
            "positions shorter than the tokens",
            "decode positions: expected shape (2,)",
            lambda c: c.engine.decode([1, 2], [3], [0, 0], 0, c.engine.new_cache(64)),
        ),
        Case(
            "Engine.decode",
            "a negative step",
            "step=-1: must be an integer >= 0",
            lambda c: c.engine.decode([1], [3], [0], -1, c.engine.new_cache(64)),
        ),
        Case(
            "Session.turn",
            "float token ids",
            "turn token ids: must be integers",
            lambda c: list(Session(c.engine, 64).turn(np.array([1.5, 2.0]), 1)),
        ),
        Case(
            "Engine.new_cache",
            "capacity 0",
            "capacity=0: a KV cache needs",
            lambda c: c.engine.new_cache(0),
        ),
        Case(
            "Engine.prefill",
            "more tokens than the cache holds",
            "KV cache overflow",
            lambda c: c.engine.prefill(np.arange(100), c.engine.new_cache(64)),
        ),
        Case(
            "Engine(ContextParallel).prefill",
            "more tokens than the cache holds",
            "KV cache overflow",
            lambda c: c.cp_engine.prefill(np.arange(300) % 256, c.cp_engine.new_cache(64)),
        ),
        Case(
            "Engine.prefill",
            "a turn that skips positions of its segment",
            "starts at position 5, but the cache holds that segment up to position -1",
            lambda c: c.engine.prefill(ids, c.engine.new_cache(64), start_position=5),
        ),
        Case(
            "Engine.prefill_batch",
            "float segment ids",
            "segments: must be integers",
            lambda c: c.engine.prefill_batch(
                [ids, ids], c.engine.new_cache(256), segments=[0.0, 1.5]
            ),
        ),
        Case(
            "Engine",
            "params of another model config",
            "params do not match model config 'tiny'",
            lambda c: Engine(c.config, _other_config_params(c)),
        ),
        Case(
            "Engine",
            "dtype float16",
            "choose float32 or bfloat16",
            lambda c: Engine(c.config, c.params, dtype=np.float16),
        ),
        Case(
            "Engine(attention='pallas_mgpu')",
            "a float32 model (the Hopper kernel is bf16/fp16)",
            "takes bf16 or fp16 q/k/v",
            lambda c: _float32_engine_with_the_hopper_kernel(c).score(ids),
        ),
        Case(
            "Engine(check_finite=True)",
            "a NaN weight in layer 1",
            "it first appears in layer 1 (attention)",
            lambda c: _nan_weight_engine(c).score(ids),
        ),
        Case(
            "make_mesh",
            "context 3 on 8 devices",
            "does not divide the 8 available devices",
            lambda c: make_mesh(3),
        ),
        Case("make_mesh", "context 16 on 8 devices", "needs 16 devices", lambda c: make_mesh(16)),
        Case(
            "Engine(ContextParallel)",
            "tensor 4 for a model with 2 KV heads",
            "does not divide n_kv_heads=2",
            lambda c: Engine(c.config, c.params, ContextParallel(mesh=make_mesh(2, 4))),
        ),
        Case(
            "ContextParallel",
            "an unknown strategy",
            "unknown context-parallel strategy 'ring'",
            lambda c: Engine(
                c.config, c.params, ContextParallel(mesh=make_mesh(2), strategy="ring")
            ),
        ),
        Case(
            "ContextParallel",
            "a device list instead of a mesh",
            "mesh: expected a jax Mesh",
            lambda c: ContextParallel(mesh=jax.devices()),
        ),
        Case(
            "SingleDevice",
            "prefill_chunk 0",
            "prefill_chunk=0: must be an int >= 1",
            lambda c: SingleDevice(prefill_chunk=0),
        ),
        Case(
            "Engine",
            "a mesh where a placement belongs",
            "placement: expected SingleDevice() or ContextParallel(mesh, ...)",
            lambda c: Engine(c.config, c.params, make_mesh(2)),
        ),
        Case(
            "distributed.global_mesh",
            "a mesh that leaves devices out",
            "must use all 8 devices",
            lambda c: distributed.global_mesh(2, 2),
        ),
        Case(
            "distributed.process_group_from_env",
            "CPJAX_PROCESS_ID=2 of 2 processes",
            "process_id=2: must be in [0, num_processes=2)",
            lambda c: distributed.process_group_from_env(
                {
                    "CPJAX_COORDINATOR": "10.0.0.1:1234",
                    "CPJAX_NUM_PROCESSES": "2",
                    "CPJAX_PROCESS_ID": "2",
                }
            ),
        ),
        Case(
            "load_model",
            "a missing model file",
            "does not exist",
            lambda c: load_model(c.path("missing.gguf")),
        ),
        Case(
            "load_model",
            "a truncated GGUF file",
            "is not a readable GGUF file",
            lambda c: load_model(_truncated_gguf(c)),
        ),
        Case(
            "load_checkpoint",
            "a checkpoint of another model config",
            "n_heads",
            _load_other_config_checkpoint,
        ),
        Case(
            "load_checkpoint",
            "an incomplete checkpoint (no marker)",
            "incomplete",
            _load_incomplete_checkpoint,
        ),
        Case(
            "export_hf",
            "a folder that already holds files",
            "exists and is not an empty folder",
            _export_into_a_used_folder,
        ),
        Case(
            "export_hf",
            "a Llama model mixing full and sliding layers",
            "has no HF config.json form",
            _export_mixed_llama,
        ),
        Case(
            "Sampling", "top_p=1.5", "top_p=1.5: must be in (0, 1]", lambda c: Sampling(top_p=1.5)
        ),
    ]


def message_of(case: Case, context: Context) -> str:
    """The message ``case`` raises (a test failure if it raises nothing or something else)."""
    from cpjax.errors import CpjaxError

    try:
        case.call(context)
    except CpjaxError as error:
        return str(error)
    pytest.fail(f"{case.entry} with {case.problem}: no CpjaxError raised")


def _display(message: str, tmp: str) -> str:
    text = message.replace(tmp, "<tmp>").replace("|", "\\|")
    return re.sub(r"\s+", " ", text)


def table(context: Context) -> str:
    """The README table: entry point, bad input, the message it produces."""
    rows = [
        "| Entry point | Bad input | Message (`CpjaxError`; the CLI prints `error: ...`, "
        "exit status 2) |",
        "|---|---|---|",
    ]
    for case in _cases():
        rows.append(
            f"| `{case.entry}` | {case.problem} | "
            f"{_display(message_of(case, context), context.tmp)} |"
        )
    return "\n".join(rows)


def _readme_section() -> str:
    with open(README, encoding="utf-8") as f:
        text = f.read()
    assert BEGIN in text and END in text, f"README.md lacks the {BEGIN} ... {END} markers"
    return text.split(BEGIN, 1)[1].split(END, 1)[0].strip()


@pytest.fixture(scope="module")
def context(tmp_path_factory):
    return Context(str(tmp_path_factory.mktemp("bad-inputs")))


@pytest.mark.parametrize("case", _cases(), ids=lambda c: f"{c.entry}: {c.problem}")
def test_bad_input_raises_a_message_that_names_the_problem(case, context):
    message = message_of(case, context)
    assert case.expect in message, message


def test_readme_table_is_generated_from_these_cases(context):
    assert _readme_section() == table(context), (
        "README.md's bad-input table is out of date: run `python -m tests.test_bad_inputs`"
    )


def main() -> None:
    """Rewrite the README table from the cases (run as ``python -m tests.test_bad_inputs``)."""
    if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
        ).strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from cpjax.io import atomic_path

    with tempfile.TemporaryDirectory() as tmp:
        new = table(Context(tmp))
    with open(README, encoding="utf-8") as f:
        text = f.read()
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    with atomic_path(README, ".md") as out:
        with open(out, "w", encoding="utf-8") as f:
            f.write(f"{head}{BEGIN}\n{new}\n{END}{tail}")
    print(f"wrote {len(_cases())} rows into {README}", file=sys.stderr)


if __name__ == "__main__":
    main()
