#!/usr/bin/env bash
# The GPU check of the Pallas kernels: one prepared script for a session that has a GPU machine.
#
#   bash experiments/gpu_check.sh          (from the repository root; the device tool's `run`)
#
# 1. prints the GPU and JAX's view of it;
# 2. runs the compiled-kernel tests: Triton (tests/test_pallas_kernels.py, *_on_gpu) and the
#    Hopper Mosaic GPU kernel (tests/test_pallas_mgpu.py, *_on_hopper), 180 s at most;
# 3. runs the kernel benchmark (experiments/bench_kernels.py --platform gpu), 270 s at most; an
#    implementation whose call takes over 15 s is skipped at the larger sizes, and the JSON is
#    rewritten after every row, so a run cut off by the timeout keeps what it measured.
# The benchmark runs even if the tests fail, so one run reports both; the exit status is the
# first failure's. If $OUT is set, the pytest log, the benchmark log and
# experiments/results/bench_kernels_gpu.json are copied there.
#
# Budget: the device tool allows 600 s a command. The tests and the benchmark take 180 + 270 s at
# most (each killed 10 s after its timeout if it ignores it); the import checks and the install
# fallback are guarded by 30 s each but take seconds, so the script ends within about 480 s and
# even in the worst case (30 + 30 + 30 + 190 + 280 = 560 s) before the tool's limit.
#
# Nothing is downloaded (the machine is offline). The tests and the benchmark import cpjax from
# the repository root; only if that fails is the repository installed, without dependencies.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"
LOGS="$(mktemp -d)"
export PYTHONUNBUFFERED=1

touch "$LOGS/start"
save() {   # copy the logs and a benchmark result written by this run to $OUT, if set
    if [[ -n "${OUT:-}" ]]; then
        for f in "$LOGS/pytest.log" "$LOGS/bench.log"; do
            if [[ -f "$f" ]]; then cp "$f" "$OUT/"; fi
        done
        local json=experiments/results/bench_kernels_gpu.json
        if [[ -f "$json" && "$json" -nt "$LOGS/start" ]]; then cp "$json" "$OUT/"; fi
    fi
}
trap save EXIT

echo "== GPU"
nvidia-smi -L
timeout 30 "$PY" -c 'import jax; print("jax", jax.__version__, jax.default_backend(), jax.devices())'

if ! timeout 30 "$PY" -c "import cpjax" 2>/dev/null; then
    echo "== cpjax not importable: pip install --no-deps --no-build-isolation -e ."
    timeout 30 "$PY" -m pip install --quiet --no-deps --no-build-isolation -e .
fi

status=0

echo "== tests (timeout 180 s)"
# Only the compiled tests: the interpret-mode and lowering tests run in CI on CPU already
# (the Mosaic GPU interpreter is not meant for a CUDA backend). The *_on_gpu / *_on_hopper tests
# fix their own matmul precision. --maxfail=10, not -x: one failing Triton test must not hide
# the Mosaic GPU ones; --durations sizes the next run's budget.
JAX_PLATFORMS=cuda \
    timeout --kill-after=10 180 "$PY" -m pytest -q --maxfail=10 --durations=15 -p no:cacheprovider \
    tests/test_pallas_kernels.py tests/test_pallas_mgpu.py -k "on_gpu or on_hopper" \
    2>&1 | tee "$LOGS/pytest.log" || status=$?
echo "== tests: exit status $status"

echo "== benchmark (timeout 270 s)"
bench_status=0
JAX_PLATFORMS=cuda timeout --kill-after=10 270 "$PY" -m experiments.bench_kernels --platform gpu \
    --repeats 5 --max-seconds-per-call 15 \
    2>&1 | tee "$LOGS/bench.log" || bench_status=$?
echo "== benchmark: exit status $bench_status"
if [[ $status -eq 0 ]]; then status=$bench_status; fi

exit "$status"
