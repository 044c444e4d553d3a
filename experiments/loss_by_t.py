"""A checkpoint's training loss at chosen timesteps, its network in fp32 and in bf16 as
training and sampling run it (autocast, output head and the loss math in float32; the same
test images, t and noise): where a model is far from fitting, and how
much of its loss at each t is bf16 arithmetic.

    python -m experiments.loss_by_t runs/quick/mu_vlb/final.pt --n 64

The loss is the checkpoint's own objective (for loss_type vlb: the bound's term L_{t-1} in
bits/dim, L_0 at t = 0), on the first --n test images of its dataset, EMA weights.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from ddpm.data import split_images, to_model_range
from ddpm.loading import load_model
from ddpm.provenance import git_commit
from ddpm.runtime import Bf16Network, device_description

TIMESTEPS = (0, 1, 3, 10, 30, 100, 300, 999)


def loss_by_t(model, diffusion, x0, timesteps, seed: int = 0):
    """{t: (loss in fp32, loss with the network in bf16)}, each the mean over the images."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for ti in timesteps:
        t = torch.full((x0.shape[0],), ti, dtype=torch.long)
        noise = torch.randn(x0.shape, generator=g)
        with torch.no_grad():
            fp32 = diffusion.training_losses(model, x0, t, noise)["loss"].mean().item()
            bf16 = diffusion.training_losses(Bf16Network(model), x0, t, noise)["loss"].mean().item()
        out[ti] = (fp32, bf16)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--n", type=int, default=64, help="test images (default 64)")
    p.add_argument("--t", default=",".join(map(str, TIMESTEPS)), help="comma-separated 0-based timesteps")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg, model, diffusion, ckpt = load_model(args.checkpoint, ema=True)
    model.eval()
    x0 = to_model_range(split_images(cfg.data.dataset, "test", subset=cfg.data.subset)[:args.n])
    timesteps = [int(s) for s in args.t.split(",")]
    if not all(0 <= t < diffusion.T for t in timesteps):
        p.error(f"timesteps must be in [0, {diffusion.T - 1}]")
    res = loss_by_t(model, diffusion, x0, timesteps)
    if args.json:
        print(json.dumps({
            "what": "the checkpoint's training loss at single timesteps (loss_type vlb: the bound term in "
                    "bits/dim), network in fp32 and in bf16 (autocast, float32 head), EMA weights",
            "n": x0.shape[0], "data": f"the first {x0.shape[0]} {cfg.data.dataset} test images",
            "checkpoint_step": ckpt.get("step"), "diffusion": cfg.to_dict()["diffusion"],
            "noise_seed": 0, "git_commit": git_commit(), "device": device_description(torch.device("cpu")),
            "command": "python -m experiments.loss_by_t CHECKPOINT " + " ".join(a for a in (argv or sys.argv[1:])
                                                                            if a != args.checkpoint),
            "loss_by_t": {t: {"fp32": a, "bf16": b} for t, (a, b) in res.items()}}, indent=2))
        return 0
    print(f"{cfg.diffusion.mean_type} prediction, loss {cfg.diffusion.loss_type}, {x0.shape[0]} test images")
    print(f"{'t':>5} {'loss fp32':>10} {'loss bf16':>10} {'bf16/fp32':>9}")
    for t, (a, b) in res.items():
        print(f"{t:>5} {a:>10.4g} {b:>10.4g} {b / a:>9.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
