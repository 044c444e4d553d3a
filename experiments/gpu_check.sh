#!/usr/bin/env bash
# The GPU check, for one lent GPU: under 10 minutes on one H100/H200 (the steps' time limits add
# up to 9.5 minutes; the most informative steps come first). Prepare and test on the CPU first
# (`--cpu`: every step, at toy sizes), then run it once as one command:
#   1. experiments/benchmark_speed.py on CUDA for the CIFAR10 model at batch 128: ours against
#      diffusers' UNet2DModel (same weights, same precision, alternated), training steps/s in
#      fp32, bf16, bf16 + channels_last and bf16 + torch.compile, 1000-step sampling images/s at
#      batch 1024 (10 steps timed, extrapolated), peak memory, fraction of the matmul peak, and
#      our bf16 sampling images/s at batches 1024..16384, up to the largest that fits;
#   2. experiments/precision_check.py: the paper's CIFAR10 config trained 200 steps in fp32 and
#      in bf16 from the same seed (same data, timesteps and noise): the two loss curves;
#   3. the parity tests of tests/test_official.py on CUDA (our UNet vs diffusers' UNet2DModel in
#      the released configurations, and our UNet on CUDA vs on the CPU);
#   4. experiments/activation_memory.py --device cuda: activation memory per training image of
#      the CIFAR10 and CelebA-HQ 256 UNets (fp32, bf16) and the train.microbatch that fits;
#   5. `python -m experiments.run --all --profile paper --plan`: the schedule over this
#      machine's GPUs, GPU-hours from a few timed steps of each configuration.
# Not here: the two-process `torchrun ... -m ddpm eval` (NCCL gives each process its own GPU,
# and a lent machine has one); tests/test_eval_distributed.py checks it with 2 CPU processes.
# The paper's reference: 21 training steps/s at batch 128 on a TPU v3-8.
#
# Needs torch and this repository; diffusers and pytest where installed (without diffusers
# the benchmark measures our UNet only and the parity tests against it skip). Step 2 trains on
# CIFAR10 from a data dir (see ddpm/data.py); on a machine without one, copy the 4,000-image
# subset beside the code first (ignored by git, never committed), e.g. for the `device` tool:
#   cp -r ../shared/data/cifar10-partial data/    # then run with carry=["data"]
#
#   bash experiments/gpu_check.sh            # JSON and logs go to $OUT, else results/gpu
#   bash experiments/gpu_check.sh --cpu      # the same steps at toy sizes on the CPU -> $OUT or /tmp/gpu_check_cpu
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1  # nothing is downloaded
CPU=0
[ "${1:-}" = "--cpu" ] && CPU=1
if [ "$CPU" = 1 ]; then OUT_DIR="${OUT:-/tmp/gpu_check_cpu}"; else OUT_DIR="${OUT:-results/gpu}"; fi
mkdir -p "$OUT_DIR"
failed=()
step() {  # step NAME TIMEOUT_S COMMAND...: run it, its output on the screen and in OUT_DIR/NAME.txt
    local name=$1 limit=$2
    shift 2
    echo
    echo "== $name ($(date -u +%H:%M:%S), at most ${limit} s)"
    timeout "$limit" "$@" 2>&1 | tee "$OUT_DIR/$name.txt"
    local rc=${PIPESTATUS[0]}
    [ "$rc" = 0 ] || { echo "-- $name: exit code $rc (124: time limit)"; failed+=("$name ($rc)"); }
}

python - "$CPU" <<'EOF' | tee "$OUT_DIR/machine.txt"
import subprocess, sys, torch
cpu = sys.argv[1] == "1"
if not cpu:
    assert torch.cuda.is_available(), "no GPU visible to torch: this check is for a CUDA machine (--cpu to try it here)"
print(f"torch {torch.__version__}, " + (f"{torch.cuda.get_device_name()}, CUDA {torch.version.cuda}" if not cpu
                                         else "CPU (--cpu: toy sizes, to try the script)"))
try:
    print("commit " + subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip())
except OSError:
    pass
for mod in ("diffusers", "pytest"):
    try:
        print(f"{mod} {__import__(mod).__version__}")
    except ImportError:
        print(f"{mod}: not installed (its parts are skipped)")
EOF
[ "${PIPESTATUS[0]}" = 0 ] || exit 1

if [ "$CPU" = 1 ]; then
    step benchmark 300 python experiments/benchmark_speed.py --device cpu --model small --batch 4 \
        --sample-batch 4 --steps 2 --repeats 1 --variants fp32,bf16 --diffusers-variants fp32 --sweep 4,8 \
        --out "$OUT_DIR/benchmark.json"
    step precision 300 python -m experiments.precision_check --device cpu --preset quick-grid --steps 10 \
        --log-every 5 --set data.num_workers=0 --out "$OUT_DIR/precision_train.json"
    echo; echo "== parity: skipped at --cpu (the CPU test suite runs tests/test_official.py)"
    step activation_memory 120 python -m experiments.activation_memory --device cpu --preset smoke-cifar10 \
        --bf16 off --out "$OUT_DIR/activation_memory.json"
    step plan 120 python -m experiments.run --all --profile smoke --plan
else
    # torch.compile is measured for our UNet only (compiling diffusers' too would double the
    # compile time); fp32 keeps PyTorch's defaults (TF32 in cuDNN convolutions, not in matmul).
    step benchmark 240 python experiments/benchmark_speed.py --device cuda --model cifar10 \
        --batch 128 --sample-batch 1024 --steps 10 --repeats 3 --train-chunk 10 \
        --variants fp32,bf16,bf16+cl,bf16+compile --diffusers-variants fp32,bf16,bf16+cl \
        --sweep 1024,2048,4096,8192,16384 --out "$OUT_DIR/benchmark.json"
    step precision 150 python -m experiments.precision_check --device cuda --steps 200 --log-every 10 \
        --out "$OUT_DIR/precision_train.json"
    if python -c "import pytest" 2>/dev/null; then
        step parity 60 env DDPM_TEST_DEVICE=cuda python -m pytest -q -rs tests/test_official.py \
            -k "parity or device or pipeline_folder"
    else
        echo; echo "== parity: pytest is not installed; see the benchmark's same-function line"
    fi
    step activation_memory 60 python -m experiments.activation_memory --device cuda --bf16 both \
        --out "$OUT_DIR/activation_memory.json"
    step plan 60 python -m experiments.run --all --profile paper --plan
fi

echo
if [ "${#failed[@]}" != 0 ]; then
    echo "FAILED: ${failed[*]}; outputs in $OUT_DIR" >&2
    exit 1
fi
echo "every step finished; outputs in $OUT_DIR"
