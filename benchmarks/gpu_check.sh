#!/usr/bin/env bash
# GPU checks of the probe's cost (issue 12), for a fresh machine with torch + CUDA installed.
# Run from the repository root:  OUT=/some/dir bash benchmarks/gpu_check.sh
# Writes every log to "$OUT/" (default ./gpu-out); at most 8.5 minutes (the sum of the limits;
# about 5.5 minutes on an H100).
# Each part has its own time limit, so one failure or hang does not hide the others.
set -u
OUT="${OUT:-gpu-out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1  # partial output survives a time limit
PY="${PYTHON:-python}"
summary="$OUT/summary.txt"
: > "$summary"

step() {  # step NAME SECONDS CMD...: run with a time limit, log to $OUT/NAME.log
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "$name: rc=$rc ($((SECONDS - t0)) s)" | tee -a "$summary"
}

{
    date -u
    nvidia-smi || true
    "$PY" -c "import sys, torch; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
    "$PY" -c "import numpy, scipy; print('numpy', numpy.__version__, 'scipy', scipy.__version__)"
    "$PY" -c "import pytest; print('pytest', pytest.__version__)"
    git log --oneline -1 2>/dev/null || true
} > "$OUT/env.log" 2>&1

# 1. CUDA tests: the no-sync contract (sync debug mode "error"), CPU/CUDA agreement, underflow.
if "$PY" -c "import pytest" 2>/dev/null; then
    step tests_cuda 60 "$PY" -m pytest -q -p no:cacheprovider -rA tests/probe/test_probe_cuda.py \
        tests/probe/test_probe_cost.py tests/probe/test_probe.py tests/test_stats.py
else
    step tests_cuda 60 "$PY" tests/probe/test_probe_cuda.py
fi

# 2. Probe overhead: plain vs probed (every step, every 10th), interleaved, medians; memory.
step probe_mlp 45 "$PY" benchmarks/probe_overhead.py --device cuda --model mlp --repeats 7
step probe_transformer_fp32 60 "$PY" benchmarks/probe_overhead.py --device cuda \
    --model transformer --repeats 5
step probe_transformer_bf16 60 "$PY" benchmarks/probe_overhead.py --device cuda \
    --model transformer --dtype bf16 --repeats 5
# ... and the floor of any hook-based probe on this card (the cheapest recording, rung by rung;
#     the transformer: GPT-2 small, 8 rungs x 8 runs x 10 steps, ~40 s on an H100)
step probe_floor 30 "$PY" benchmarks/probe_floor.py --device cuda --repeats 7
step probe_floor_transformer 90 "$PY" benchmarks/probe_floor.py --device cuda \
    --model transformer --repeats 5
# ... and a compiled recorded step (prototype: samples and gradient norms inside the graph)
step probe_compiled 120 "$PY" benchmarks/probe_compiled.py --device cuda --repeats 7

# 3. The batched engine on the GPU (short: K 32, 50 steps, one repeat; the per-config loop of
#    32 models is the slow part).
step sweep_engine 45 "$PY" benchmarks/sweep_engine.py --device cuda \
    --repeats 1 --skip-vmap --steps 50

echo "done; logs in $OUT/" | tee -a "$summary"
