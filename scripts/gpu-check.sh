#!/usr/bin/env bash
# One-shot check of the CUDA code paths on a GPU machine (issue 16).
#
#   OUT=/some/empty/folder bash scripts/gpu-check.sh      # from the repository root
#
# Uses the machine's own python3 and torch: nothing is installed (`pip install -e .`
# would replace torch with the pinned 2.13.0); the package is found through
# PYTHONPATH=$PWD/src. Runs tests/test_cuda.py and the CUDA benchmarks, each step bounded
# by `timeout` and carried on after a failure, and writes to $OUT (7 files):
#
#   env.txt          nvidia-smi, python, torch/CUDA/cuDNN versions, TF32 defaults, CPU, disk
#   test_cuda.log    pytest output;   test_cuda.xml   its JUnit XML
#   throughput.json  bench_throughput: c1, resnet20, resnet18 (CIFAR), resnet50 (224 px);
#                    fp32, bf16, fp16, each contiguous and channels-last
#   hessian.json     bench_hessian --products-only: product/gradient cost, TF32 on and off
#   pipeline.json    bench_pipeline: input pipeline against the training step
#   gpu-check.log    everything the steps printed, then the summary of exit statuses
#
# Budget: at most about 7.5 minutes in all (steps of 170 + 120 + 120 + 80 s at most, each
# cut to what is left of GPU_CHECK_BUDGET, default 440 s); about 4-5 minutes expected.
#
# Dry run on a machine without a GPU (tests on the CPU, benchmarks at toy sizes; the tests
# alone take about 20 minutes on 2 cores, so GPU_CHECK_PYTEST_ARGS can pick a few):
#   GPU_CHECK_DEVICE=cpu PYTHON=.venv/bin/python OUT=/tmp/gpucheck-out \
#       GPU_CHECK_PYTEST_ARGS="-k 'fp32 or folder'" bash scripts/gpu-check.sh
set -u

OUT=${OUT:-}
if [ -z "$OUT" ]; then
    echo "gpu-check: set OUT to the folder for the results" >&2
    exit 2
fi
mkdir -p "$OUT"
PYTHON=${PYTHON:-python3}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
if [ "$DEVICE" = cpu ]; then BUDGET=${GPU_CHECK_BUDGET:-3600}; else BUDGET=${GPU_CHECK_BUDGET:-440}; fi
TEST_LIMIT=170
[ "$DEVICE" = cpu ] && TEST_LIMIT=2700
export PYTHON OUT GPU_CHECK_PYTEST_ARGS=${GPU_CHECK_PYTEST_ARGS:-}
case "$DEVICE" in cuda | cpu) ;; *)
    echo "gpu-check: GPU_CHECK_DEVICE must be cuda or cpu, not $DEVICE" >&2
    exit 2
    ;;
esac

export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export PYTHONDONTWRITEBYTECODE=1
export LARGEBATCH_TEST_DEVICE="$DEVICE"
export MPLBACKEND=Agg
LOG="$OUT/gpu-check.log"
: >"$LOG"
START=$SECONDS
SUMMARY=()
FAILED=0

say() { echo "[gpu-check $(date +%H:%M:%S) +$((SECONDS - START))s] $*" | tee -a "$LOG"; }

# step NAME SECONDS COMMAND...: run with a time limit (cut to what is left of the budget),
# output to the log; record the exit status (124: timed out) and go on whatever happens.
# STEP_SIGNAL (default TERM) is what the time limit sends first; KILL follows 10 s later.
step() {
    local name=$1 limit=$2 sig=${STEP_SIGNAL:-TERM}
    shift 2
    local left=$((BUDGET - (SECONDS - START) - 15))
    if [ "$limit" -gt "$left" ]; then limit=$left; fi
    if [ "$limit" -lt 15 ]; then
        say "$name: SKIPPED (only ${left}s of the budget left)"
        SUMMARY+=("$name: skipped (budget)")
        FAILED=1
        return
    fi
    say "$name: start (limit ${limit}s): $*"
    local began=$SECONDS rc
    timeout -s "$sig" -k 10 "$limit" "$@" >>"$LOG" 2>&1
    rc=$?
    local took=$((SECONDS - began))
    case $rc in
        0) SUMMARY+=("$name: ok (${took}s)") ;;
        124 | 137) SUMMARY+=("$name: TIMED OUT after ${took}s (rc $rc)") ;;
        2) SUMMARY+=("$name: FAILED rc 2, interrupted or usage error (${took}s)") ;;
        *) SUMMARY+=("$name: FAILED rc $rc (${took}s)") ;;
    esac
    [ "$rc" -eq 0 ] || FAILED=1
    say "$name: exit status $rc after ${took}s"
}

# ------------------------------------------------------------------ environment
{
    echo "# gpu-check $(date -u +%Y-%m-%dT%H:%M:%SZ), device $DEVICE, budget ${BUDGET}s"
    echo "# cwd $PWD"
    if command -v git >/dev/null 2>&1 && git rev-parse HEAD >/dev/null 2>&1; then
        echo "# git $(git rev-parse HEAD)"
        git status --short | head -40
    fi
    echo "# nvidia-smi"
    if command -v nvidia-smi >/dev/null 2>&1; then
        timeout 30 nvidia-smi
        timeout 30 nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.max.sm,power.limit,mig.mode.current --format=csv
    else
        echo "(no nvidia-smi)"
    fi
    echo "# python"
    timeout 120 "$PYTHON" - <<'EOF'
import os, platform, sys
print("python", sys.version.replace("\n", " "), sys.executable)
print("platform", platform.platform())
try:
    import torch
    print("torch", torch.__version__, "from", os.path.dirname(torch.__file__))
    print("torch.version.cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
    print("cuda available", torch.cuda.is_available(), "devices", torch.cuda.device_count())
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        print("device 0", p.name, "capability", f"{p.major}.{p.minor}",
              "memory GiB", round(p.total_memory / 2**30, 1), "SMs", p.multi_processor_count)
        print("bf16 supported", torch.cuda.is_bf16_supported())
        print("TF32 defaults: cudnn.allow_tf32", torch.backends.cudnn.allow_tf32,
              "matmul.allow_tf32", torch.backends.cuda.matmul.allow_tf32,
              "float32_matmul_precision", torch.get_float32_matmul_precision())
        print("cudnn.benchmark", torch.backends.cudnn.benchmark,
              "cudnn.deterministic", torch.backends.cudnn.deterministic)
    print("torch threads", torch.get_num_threads())
except Exception as exc:
    print("torch import failed:", type(exc).__name__, exc)
for name in ("numpy", "yaml", "tqdm", "scipy", "sklearn", "matplotlib", "PIL", "pytest",
             "hypothesis", "requests", "mnist1d"):
    try:
        module = __import__(name)
        print(name, getattr(module, "__version__", "?"))
    except Exception as exc:
        print(name, "MISSING", type(exc).__name__)
try:
    import largebatch, largebatch.cli, largebatch.train, largebatch.hessian
    print("largebatch", largebatch.__version__, "from", os.path.dirname(largebatch.__file__))
except Exception as exc:
    print("largebatch import FAILED:", type(exc).__name__, exc)
EOF
    echo "# CPU and memory"
    nproc
    grep -m1 "model name" /proc/cpuinfo
    free -g 2>/dev/null
    df -h . /tmp 2>/dev/null
    echo "# pip (torch-related)"
    timeout 60 "$PYTHON" -m pip list 2>/dev/null | grep -iE "^(torch|nvidia|triton|numpy|pillow|pytest) " | head -40
} >"$OUT/env.txt" 2>&1
say "environment written to env.txt ($(wc -l <"$OUT/env.txt") lines)"

step "import" 60 "$PYTHON" -c "import largebatch.cli, largebatch.train, largebatch.hessian, largebatch.feed; print('largebatch imports ok')"

# ------------------------------------------------------------------ the tests
# Their own log and JUnit XML; the gpu-check log gets the tail. At the time limit pytest
# gets SIGINT first (it writes the XML of the tests it finished unless a training run
# catches the signal), then SIGKILL; a test running longer than 100 s has its stack dumped
# to the log (faulthandler).
run_tests() {
    local extra=()
    eval "extra=($GPU_CHECK_PYTEST_ARGS)"
    "$PYTHON" -m pytest -v -rA -p no:cacheprovider --durations=15 -o faulthandler_timeout=100 \
        --junitxml="$OUT/test_cuda.xml" tests/test_cuda.py "${extra[@]}" >"$OUT/test_cuda.log" 2>&1
    local rc=$?
    tail -n 30 "$OUT/test_cuda.log"
    return $rc
}
export -f run_tests
# Tests not started 40 s before the step's limit are skipped (LARGEBATCH_TEST_DEADLINE),
# so that pytest normally ends by itself and writes its XML.
left=$((BUDGET - (SECONDS - START) - 15))
[ "$TEST_LIMIT" -gt "$left" ] && TEST_LIMIT=$left
export LARGEBATCH_TEST_DEADLINE=$(($(date +%s) + TEST_LIMIT - 40))
say "tests: LARGEBATCH_TEST_DEVICE=$DEVICE ${GPU_CHECK_PYTEST_ARGS}"
STEP_SIGNAL=INT step "tests/test_cuda.py" "$TEST_LIMIT" bash -c run_tests

# ------------------------------------------------------------------ benchmarks
if [ "$DEVICE" = cuda ]; then
    # 66 configurations in one process (per-case peak memory via reset_peak_memory_stats),
    # 2 warm-up and 5 timed steps each; stops starting new ones after 100 s.
    step "bench_throughput" 120 "$PYTHON" benchmarks/bench_throughput.py --device cuda \
        --same-process --precisions fp32 bf16 fp16 --channels-last --warmup 2 --repeats 5 \
        --time-budget 100 --json "$OUT/throughput.json" \
        --cases cifar:c1:128,1024,4096 cifar:resnet20:128,1024,4096 imagenet:resnet50:64,256 \
        cifar:resnet18:128,512,2048
    step "bench_hessian" 120 "$PYTHON" benchmarks/bench_hessian.py --products-only --device cuda \
        --models c1 resnet20 --samples-list 256 1024 --product-repeats 5 \
        --json "$OUT/hessian.json"
    step "bench_pipeline" 80 "$PYTHON" benchmarks/bench_pipeline.py --device cuda \
        --precision bf16 --channels-last --batches 128 4096 --folder-batches 128 512 \
        --repeats 5 --json "$OUT/pipeline.json"
else
    # dry run: the same code paths at toy sizes
    step "bench_throughput" 130 "$PYTHON" benchmarks/bench_throughput.py --device cpu \
        --same-process --precisions fp32 bf16 --channels-last --warmup 1 --repeats 1 \
        --time-budget 60 --json "$OUT/throughput.json" \
        --cases cifar:c1:16 cifar:resnet20:16 imagenet:resnet50:2
    step "bench_hessian" 240 "$PYTHON" benchmarks/bench_hessian.py --products-only --device cpu \
        --models c1 resnet20 --samples-list 16 --product-repeats 1 --json "$OUT/hessian.json"
    step "bench_pipeline" 120 "$PYTHON" benchmarks/bench_pipeline.py --device cpu \
        --batches 32 --micro 32 --folder-batches 16 --repeats 1 --workers 2 --threads 1 \
        --json "$OUT/pipeline.json"
fi

# ------------------------------------------------------------------ summary
say "summary (device $DEVICE, $((SECONDS - START))s in all):"
for line in "${SUMMARY[@]}"; do
    say "  $line"
done
if [ -f "$OUT/test_cuda.log" ]; then
    say "  tests: $(grep -E '^(=+ )?[0-9]+ (passed|failed)|(passed|failed|skipped|error).* in [0-9.]+s' "$OUT/test_cuda.log" | tail -n 1)"
fi
say "files in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
exit $FAILED
