"""A multi-process job for tests/test_distributed.py; run it under ``python -m cpjax.launch``.

Scores ``--ids`` with pass-KV and pass-Q on a context mesh over every device of every process,
generates ``--new-tokens`` greedy tokens from the first 40 ids, and has process 0 save
``{pass_kv, pass_q, tokens}`` to ``--out`` (.npz). ``--die`` instead makes process 1 kill itself
(SIGKILL) after its first score while process 0 keeps scoring: the run must not hang.
"""

import argparse
import os
import signal

import numpy as np

from cpjax.parallel import distributed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--ids", required=True)
    parser.add_argument("--out", default=None)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--die", action="store_true")
    args = parser.parse_args()
    distributed.initialize(distributed.process_group_from_env())

    import jax

    from cpjax.engine import ContextParallel, Engine
    from cpjax.loaders import load_model

    config, params, _ = load_model(args.model)
    mesh = distributed.global_mesh(jax.device_count())
    ids = np.load(args.ids)
    results = {}
    for strategy in ("pass_kv", "pass_q"):
        engine = Engine(config, params, ContextParallel(mesh=mesh, strategy=strategy))
        results[strategy] = engine.score(ids)
        if args.die:
            if jax.process_index() == 1:
                os.kill(os.getpid(), signal.SIGKILL)
            for _ in range(10_000):
                engine.score(ids)
    results["tokens"] = np.asarray(engine.generate(ids[:40], args.new_tokens), np.int32)
    if distributed.is_main_process():
        from cpjax.io import atomic_path

        with atomic_path(args.out, ".npz") as tmp:
            np.savez(tmp, **results)


if __name__ == "__main__":
    main()
