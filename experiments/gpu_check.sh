#!/usr/bin/env bash
# The GPU check, for one lent GPU (about 7 minutes on one H100/H200; prepare and test on the CPU
# first, run it once as one command):
#   1. the parity tests of tests/test_official.py on CUDA (our UNet vs diffusers'
#      UNet2DModel in the released configurations, and our UNet on CUDA vs on the CPU);
#   2. experiments/benchmark_speed.py on CUDA for the CIFAR10 model at batch 128:
#      training steps/s in fp32, bf16, bf16 + channels_last and bf16 + torch.compile,
#      and 1000-step sampling images/s at batch 1024 (10 steps timed, extrapolated);
#   3. experiments/activation_memory.py --device cuda: measured activation memory per image of the
#      CIFAR10 and CelebA-HQ 256 UNets (fp32, bf16) and the train.microbatch that fits 40/80 GB;
#   4. `python -m experiments.run --all --profile paper --plan`: the schedule over this machine's
#      GPUs with GPU-hours from a few timed steps of each configuration.
# The paper's reference: 21 training steps/s at batch 128 on a TPU v3-8.
#
# Needs only torch and this repository. diffusers (and pytest) are used where they are
# installed: without diffusers the parity tests against it skip and the benchmark measures
# our UNet only; without pytest step 1 is the benchmark's own same-function check
# (ours vs diffusers, ours on CUDA vs on CPU), which step 2 prints anyway.
#
#   bash experiments/gpu_check.sh            # results (JSON) go to $OUT or results/gpu_check
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1  # nothing is downloaded
OUT_DIR="${OUT:-results/gpu_check}"
mkdir -p "$OUT_DIR"

python - <<'EOF'
import torch
assert torch.cuda.is_available(), "no GPU visible to torch: this check is for a CUDA machine"
print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, CUDA {torch.version.cuda}")
for mod in ("diffusers", "pytest"):
    try:
        print(f"{mod} {__import__(mod).__version__}")
    except ImportError:
        print(f"{mod}: not installed (its parts are skipped)")
EOF

echo
echo "== 1. parity on CUDA"
parity_rc=0
if python -c "import pytest" 2>/dev/null; then
    # A failure is reported at the end; the speed table is still worth having.
    DDPM_TEST_DEVICE=cuda timeout 90 python -m pytest -q -rs tests/test_official.py \
        -k "parity or device or pipeline_folder" 2>&1 | tee "$OUT_DIR/parity.txt" || parity_rc=$?
else
    echo "pytest is not installed: see the same-function line of step 2"
fi

echo
echo "== 2. speed, CIFAR10 model (35.7M), training batch 128, sampling batch 1024"
# torch.compile is measured for our UNet only (compiling diffusers' too would double the
# compile time); fp32 keeps PyTorch's defaults (TF32 in cuDNN convolutions, not in matmul).
timeout 270 python experiments/benchmark_speed.py --device cuda --model cifar10 \
    --batch 128 --sample-batch 1024 --steps 10 --repeats 3 --train-chunk 10 \
    --variants fp32,bf16,bf16+cl,bf16+compile --diffusers-variants fp32,bf16,bf16+cl \
    --out "$OUT_DIR/benchmark_cifar10_b128.json" 2>&1 | tee "$OUT_DIR/benchmark.txt"

echo
echo "== 3. activation memory per training image, measured (peak of whole steps), and the microbatch that fits"
timeout 90 python -m experiments.activation_memory --device cuda --bf16 both \
    --out "$OUT_DIR/activation_memory.json" 2>&1 | tee "$OUT_DIR/activation_memory.txt" || true

echo
echo "== 4. the paper profile's plan on this GPU (times a few steps of each configuration; starts nothing)"
timeout 120 python -m experiments.run --all --profile paper --plan 2>&1 | tee "$OUT_DIR/plan.txt" || true

if [ "$parity_rc" != 0 ]; then
    echo "PARITY TESTS FAILED (pytest exit code $parity_rc): see $OUT_DIR/parity.txt" >&2
    exit "$parity_rc"
fi
