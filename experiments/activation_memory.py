"""Activation memory per training image, and the train.microbatch that fits a GPU.

    python -m experiments.activation_memory                        # cifar10, celebahq256; fp32, bf16
    python -m experiments.activation_memory --preset cifar10 --bf16 on
    python -m experiments.activation_memory --device cuda          # measured on a GPU instead

What it computes (on any device, here the CPU): one training forward of the preset's UNet
(L_simple, train mode, dropout as configured) at batch 1 and at batch 2, with a
torch.autograd.graph.saved_tensors_hooks that adds up the bytes of every distinct tensor
storage autograd keeps for the backward pass, parameters excluded. The difference between
the two batches is the activation memory per image (what is kept for the backward; the
weights' bf16 copies under autocast are per forward, not per image, and cancel). Under bf16
the CPU's autocast op lists decide which activations are bf16 (convolutions and matmuls;
CUDA's lists differ in detail).

With --device cuda it measures instead: the peak of torch.cuda.max_memory_allocated over one
whole optimisation step (ddpm.train.optimisation_step: forward, backward, clipping, Adam, EMA)
at batch 2 minus that at batch 1, after a step of warm-up (Adam's moments allocated).

A microbatch fits a GPU of G GiB when
    state + microbatch x per_image x HEADROOM <= G - RESERVED_GIB
with state = weights, gradients, Adam's two moments and the EMA (5 x 4 bytes per
parameter), HEADROOM for the transient gradients of activations during the backward and the
allocator's fragmentation, RESERVED_GIB for the CUDA context and cuDNN's workspaces. Both are
assumptions, not measurements: check a new GPU with one step at the chosen microbatch
(torch.cuda.max_memory_allocated) before a long run.
"""

from __future__ import annotations

import argparse
import json
from typing import Dict, List, Optional

import torch

from ddpm.config import build_diffusion, build_model, get_preset
from ddpm.unet import num_params

GIB = 2 ** 30
HEADROOM = 1.25  # peak during the backward over the saved activations (assumed)
RESERVED_GIB = 2.0  # CUDA context, cuDNN workspaces, allocator slack (assumed)


def saved_bytes(model: torch.nn.Module, cfg, batch: int, bf16: bool) -> int:
    """Bytes of the distinct storages autograd saves in one training forward at ``batch``."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: Dict[int, int] = {}

    def pack(t: torch.Tensor):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    C, R = cfg.data.channels, cfg.data.resolution
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(batch, C, R, R, generator=g) * 2 - 1
    t = torch.randint(0, cfg.diffusion.T, (batch,), generator=g)
    noise = torch.randn(batch, C, R, R, generator=g)
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = build_diffusion(cfg).training_losses(model, x0, t, noise)["loss"].float().mean()
    del loss
    return sum(seen.values())


def per_image_bytes(preset: str, bf16: bool) -> Dict[str, float]:
    cfg = get_preset(preset)
    torch.manual_seed(0)
    model = build_model(cfg)
    one, two = saved_bytes(model, cfg, 1, bf16), saved_bytes(model, cfg, 2, bf16)
    return {"preset": preset, "bf16": bf16, "resolution": cfg.data.resolution, "num_params": num_params(model),
            "batch_size": cfg.train.batch_size, "per_image_bytes": two - one, "batch1_bytes": one}


def measured_per_image_bytes(preset: str, bf16: bool, device: str = "cuda") -> Dict[str, float]:
    """Like per_image_bytes, from the peak memory of whole training steps on a CUDA device."""
    from dataclasses import replace

    from ddpm.train import TrainState, optimisation_step

    cfg = get_preset(preset, [f"train.bf16={bf16}"])
    dev = torch.device(device)
    state, diffusion = TrainState.create(cfg, dev), build_diffusion(cfg)
    tc = replace(cfg.train, microbatch=0, warmup=0)
    C, R = cfg.data.channels, cfg.data.resolution
    peaks = []
    for batch in (1, 1, 2):  # the first: warm-up
        x0 = torch.rand(batch, C, R, R, device=dev) * 2 - 1
        t = torch.randint(0, cfg.diffusion.T, (batch,), device=dev)
        noise = torch.randn_like(x0)
        torch.cuda.synchronize(dev)
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        optimisation_step(state, state.model, diffusion, x0, t, noise, tc)
        torch.cuda.synchronize(dev)
        peaks.append(torch.cuda.max_memory_allocated(dev) - base)
    return {"preset": preset, "bf16": bf16, "resolution": R, "num_params": num_params(state.model),
            "batch_size": cfg.train.batch_size, "per_image_bytes": peaks[2] - peaks[1], "batch1_bytes": peaks[1],
            "device": torch.cuda.get_device_name(dev)}


def fitting_microbatch(per_image: float, n_params: int, per_rank_batch: int, gpu_gib: float) -> Optional[int]:
    """The largest divisor of ``per_rank_batch`` whose activations fit ``gpu_gib`` (None: not even 1)."""
    budget = (gpu_gib - RESERVED_GIB) * GIB - 5 * 4 * n_params
    fits = [m for m in range(1, per_rank_batch + 1) if per_rank_batch % m == 0 and m * per_image * HEADROOM <= budget]
    return max(fits) if fits else None


def table(rows: List[Dict[str, float]], gpus=(40, 80)) -> str:
    head = ["preset", "precision", "activations per image", "whole batch on 1 GPU",
            *[f"microbatch on {g} GB" for g in gpus]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        mbs = [fitting_microbatch(r["per_image_bytes"], r["num_params"], r["batch_size"], g * 1e9 / GIB) for g in gpus]
        total = r["per_image_bytes"] * r["batch_size"] / GIB
        lines.append(f"| {r['preset']} ({r['resolution']}x{r['resolution']}, {r['num_params'] / 1e6:.1f}M params) | "
                     f"{'bf16 autocast' if r['bf16'] else 'fp32'} | {r['per_image_bytes'] / GIB:.3f} GiB | "
                     f"{r['batch_size']}: {total:.1f} GiB | "
                     + " | ".join("does not fit" if m is None else
                                  (f"{m} (no accumulation)" if m == r["batch_size"] else str(m)) for m in mbs) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.activation_memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", action="append", help="default: cifar10 and celebahq256")
    p.add_argument("--bf16", choices=("off", "on", "both"), default="both")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cpu: the saved activations' bytes; cuda: the measured peak of whole training steps")
    p.add_argument("--out", help="also write the rows as JSON")
    args = p.parse_args(argv)
    torch.set_grad_enabled(True)
    measure = per_image_bytes if args.device == "cpu" else measured_per_image_bytes
    rows = [measure(preset, bf16) for preset in (args.preset or ["cifar10", "celebahq256"])
            for bf16 in {"off": [False], "on": [True], "both": [False, True]}[args.bf16]]
    print(table(rows))
    how = ("saved activations computed on the CPU" if args.device == "cpu" else
           f"peak of whole training steps measured on {rows[0]['device']}")
    print(f"({how}; microbatch: largest divisor of the 1-GPU batch with state + microbatch x per image x "
          f"{HEADROOM} <= GPU memory - {RESERVED_GIB:g} GiB; GB = 1e9 bytes)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
