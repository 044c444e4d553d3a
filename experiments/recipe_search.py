"""Recipe search for the quick profile (issue 10, phase 1): measurements only.

Instruments, each printing one JSON line per measurement (append them to a
.jsonl file; results/quick/recipe_search.{md,json} are written by hand from them):

    # network evaluations per second (eval mode, one forward pass of a batch = B image-evals)
    python -m experiments.recipe_search evals --model mnist-cpu --batch 250 --threads 1 \
        --variants fp32,bf16,fp32+im,bf16+im,bf16+im+cl
    # training throughput (one full training step as ddpm/train.py takes it, minus data loading)
    python -m experiments.recipe_search train-speed --model mnist-cpu --batch 128 --threads 1
    # FID/KID of N ancestral samples (all T steps, EMA) of a checkpoint against N test images
    python -m experiments.recipe_search judge runs/recipe/NAME/final.pt --n 500 --ref mnist:test
    # the real-data floor: N training images against the same N test images
    python -m experiments.recipe_search floor --dataset mnist --n 500
    # re-score images saved by `judge --save`; the full bound in fp32 vs bf16 on the same images and noise
    python -m experiments.recipe_search score runs/recipe/judge/NAME.npz --ref mnist:test
    python -m experiments.recipe_search nll-check CKPT --n 8 --batch 8 --variants fp32,bf16+im

Variants: fp32 | bf16 (autocast) joined with +im (torch.inference_mode instead of
torch.no_grad), +cl (channels_last), +compile (torch.compile; compile time reported).
Models: named overrides on a preset (MODELS below); 'ch16' needs GroupNorm groups < 32,
which ddpm.unet does not allow: it is measured with ddpm.unet.GROUPS patched to 16, for
speed only (such a model cannot be trained with the project's config today).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time

import torch

# name -> (preset, overrides)
MODELS = {
    "mnist-cpu": ("quick-mnist", []),  # ch 32, (1,2,2), 1 res block, attn at 7: 1.1M
    "mnist-ch32-noattn": ("quick-mnist", ["model.attn_resolutions="]),
    "mnist-ch32-rb2": ("quick-mnist", ["model.num_res_blocks=2"]),
    "mnist-ch64": ("quick-mnist", ["model.ch=64"]),
    "mnist-ch16": ("quick-mnist", ["model.ch=32"]),  # rebuilt at ch 16 below (speed only)
    "cifar-cpu": ("quick-cifar10", []),  # ch 32, (1,2,2,2), 1 res block, attn at 16: 1.5M
    "cifar-ch32-122": ("quick-cifar10", ["model.ch_mult=1,2,2", "model.attn_resolutions=8"]),
    "cifar-ch64": ("quick-cifar10", ["model.ch=64"]),
}


def commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True).strip()
    except Exception:  # noqa: BLE001
        return "unknown"


def load_avg() -> float:
    return os.getloadavg()[0]


def build(name: str, learned: bool = False):
    from ddpm import unet
    from ddpm.config import build_diffusion, build_model, get_preset

    preset, over = MODELS[name]
    cfg = get_preset(preset, over + (["diffusion.var_type=learned", "diffusion.loss_type=vlb"] if learned else []))
    if name == "mnist-ch16":
        old = unet.GROUPS
        unet.GROUPS = 16
        try:
            m = unet.UNet(in_ch=1, out_ch=1, ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(7,),
                          dropout=0.1, resolution=28)
        finally:
            unet.GROUPS = old
        return cfg, m, build_diffusion(cfg)
    return cfg, build_model(cfg), build_diffusion(cfg)


def _modes(variant: str):
    parts = set(variant.split("+"))
    grad_ctx = torch.inference_mode if "im" in parts else torch.no_grad
    return parts, grad_ctx


def bench_evals(name, batch, variant, seconds=6.0, reps_min=3):
    """image-evals/s of eval-mode forward passes at batch ``batch`` (median of timed calls)."""
    cfg, model, _ = build(name)
    model.eval()
    parts, grad_ctx = _modes(variant)
    R, C = cfg.data.resolution, cfg.data.channels
    x = torch.randn(batch, C, R, R)
    t = torch.randint(0, 1000, (batch,))
    if "cl" in parts:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    net = model
    compile_s = None
    if "compile" in parts:
        net = torch.compile(model)
    ac = torch.autocast("cpu", dtype=torch.bfloat16, enabled="bf16" in parts)
    times = []
    with grad_ctx(), ac:
        t0 = time.perf_counter()
        net(x, t)
        first = time.perf_counter() - t0
        if "compile" in parts:
            compile_s = first
        net(x, t)
        start = time.perf_counter()
        while len(times) < reps_min or time.perf_counter() - start < seconds:
            t0 = time.perf_counter()
            net(x, t)
            times.append(time.perf_counter() - t0)
    times.sort()
    med = times[len(times) // 2]
    return {"kind": "evals", "model": name, "batch": batch, "variant": variant,
            "threads": torch.get_num_threads(), "image_evals_per_s": batch / med, "median_call_s": med,
            "best_call_s": times[0], "calls": len(times), "compile_s": compile_s,
            "load_avg_1min": load_avg(), "res": R}


def bench_train(name, batch, variant, steps=12, learned=False):
    """images/s of full training steps (loss, backward, clip, Adam, EMA) on random data."""
    import copy
    import math

    from ddpm.train import ema_update

    cfg, model, diffusion = build(name, learned)
    parts, _ = _modes(variant)
    model.train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=2e-4, eps=1e-8)
    R, C = cfg.data.resolution, cfg.data.channels
    ac = torch.autocast("cpu", dtype=torch.bfloat16, enabled="bf16" in parts)
    times = []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        x0 = torch.rand(batch, C, R, R) * 2 - 1
        t = torch.randint(0, 1000, (batch,))
        with ac:
            loss = diffusion.training_losses(model, x0, t)["loss"].float().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), math.inf)
        opt.step()
        ema_update(ema, model, 0.999)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    times.sort()
    med = times[len(times) // 2]
    return {"kind": "train", "model": name, "batch": batch, "variant": variant, "learned_var": learned,
            "threads": torch.get_num_threads(), "images_per_s": batch / med, "median_step_s": med,
            "steps_timed": len(times), "load_avg_1min": load_avg()}


# ------------------------------------------------------------------------------- judging


def respaced(diffusion, model, K):
    """A K-step ancestral sampler (ranking instrument only): timesteps t_k = round(linspace(0, T-1, K)),
    betas'_k = 1 - abar(t_k) / abar(t_{k-1}) (Nichol & Dhariwal's respacing); the network sees t_k."""
    import numpy as np

    from ddpm.diffusion import GaussianDiffusion

    T = diffusion.T
    ts = np.unique(np.round(np.linspace(0, T - 1, K)).astype(int))
    abar = np.cumprod(1.0 - np.asarray(diffusion.betas if hasattr(diffusion, "betas") else diffusion.np_betas,
                                       dtype=np.float64))[ts]
    betas = 1.0 - abar / np.concatenate([[1.0], abar[:-1]])
    d2 = GaussianDiffusion(betas, diffusion.mean_type.value, diffusion.var_type.value, diffusion.loss_type.value)
    tmap = torch.as_tensor(ts, dtype=torch.long)
    return d2, (lambda x, t: model(x, tmap[t]))


def sample_images(ckpt, n, batch, variant="fp32", seed=0, var=None, ema=True, steps=None):
    """n ancestral samples (ddpm.generate's shards and seeds) as uint8 [n, H, W, C]; all T steps
    unless ``steps`` (then respaced, see respaced()); the variant sets grad mode / autocast."""
    from ddpm.generate import generate
    from ddpm.loading import load_model

    cfg, model, diffusion, state = load_model(ckpt, ema=ema)
    if steps and steps < diffusion.T:
        diffusion, model = respaced(diffusion, model.eval(), steps)
    parts, grad_ctx = _modes(variant)
    ac = torch.autocast("cpu", dtype=torch.bfloat16, enabled="bf16" in parts)
    shape = (cfg.data.channels, cfg.data.resolution, cfg.data.resolution)
    t0 = time.time()
    with grad_ctx(), ac:
        imgs = generate(model.eval() if hasattr(model, "eval") else model, diffusion, n, shape, batch_size=batch, seed=seed, var_type=var,
                        progress=False)
    return imgs, time.time() - t0, cfg, int(state["step"])


def metrics(images, ref_spec, ref_n, data_dir, save_feats=None):
    from ddpm.fidelity import fid_bootstrap_se, fid_from_features, kid_from_features, kid_unbiased
    from ddpm.inception import Inception
    from ddpm.sources import load_images

    ref, desc, key = load_images(ref_spec, data_dir, ref_n, seed=2020)
    inc = Inception()
    t0 = time.time()
    f1 = inc.features(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous())["2048"]
    inc_s = time.time() - t0
    f2 = inc.features_cached(lambda: ref, key)["2048"]
    if save_feats:
        torch.save(f1, save_feats)
    kid, kid_se = kid_unbiased(f1, f2)
    kid_tf, kid_tf_std, size = kid_from_features(f1, f2, subsets=100, subset_size=min(1000, len(f1), len(f2)))
    return {"fid": fid_from_features(f1, f2), "fid_boot_se": fid_bootstrap_se(f1, f2, seed=0), "kid": kid,
            "kid_se": kid_se, "kid_torch_fidelity": kid_tf, "kid_torch_fidelity_subset_size": size,
            "n_reference": int(len(f2)), "reference": desc, "inception_s": round(inc_s, 1)}


def judge(args):
    imgs, secs, cfg, step = sample_images(args.checkpoint, args.n, args.batch, args.variant, args.seed, args.var,
                                          not args.no_ema, args.steps)
    if args.save:
        import numpy as np
        np.savez_compressed(args.save, images=imgs)
    m = metrics(imgs, args.ref, args.ref_n or args.n, args.data_dir, args.save and args.save + ".feats.pt")
    return {"kind": "judge", "checkpoint": args.checkpoint, "step": step, "n": args.n, "sampling_steps": args.steps or cfg.diffusion.T,
            "sampler": "ancestral, " + (f"respaced to {args.steps} steps (ranking only)" if args.steps else "all T steps")
                       + (", raw weights" if args.no_ema else ", EMA"), "variant": args.variant, "var": args.var or cfg.diffusion.var_type,
            "seed": args.seed, "batch": args.batch, "sampling_s": round(secs, 1), "threads": torch.get_num_threads(),
            **m, "load_avg_1min": load_avg()}


def score(args):
    """FID/KID of images saved by ``judge --save`` (re-scoring without sampling again)."""
    import numpy as np

    imgs = np.load(args.images)["images"]
    return {"kind": "score", "images": args.images, "n": len(imgs),
            **metrics(imgs, args.ref, args.ref_n or len(imgs), args.data_dir)}


def floor(args):
    """N real training images against the reference (default: N test images); when the reference is
    the training split itself, the N images are drawn from outside the reference subset."""
    import numpy as np

    from ddpm.sources import load_images, subset_indices

    ref_spec = args.ref or f"{args.dataset}:test"
    ref_n = args.ref_n or args.n
    everything, _, _ = load_images(f"{args.dataset}:train", args.data_dir, None)
    pool = np.arange(len(everything))
    if ref_spec == f"{args.dataset}:train":
        pool = np.setdiff1d(pool, subset_indices(len(everything), ref_n, 2020))
    pick = np.random.RandomState(args.seed).choice(pool, args.n, replace=False)
    m = metrics(everything[torch.from_numpy(pick)].permute(0, 2, 3, 1).numpy(), ref_spec, ref_n, args.data_dir)
    return {"kind": "floor", "images": f"{args.dataset}:train: {args.n} chosen by RandomState({args.seed}) from "
                                      f"{len(pool)} (outside the reference)", **m, "n": args.n}


def nll_check(args):
    """The full bound (ddpm.bound.bound_terms: all T terms) of the same test images, same noise,
    under each variant: its cost (image-evals/s) and how far bf16 moves the bound."""
    import numpy as np

    from ddpm.bound import bound_terms, summarize_nll
    from ddpm.loading import load_model
    from ddpm.sources import load_images

    cfg, model, diffusion, state = load_model(args.checkpoint)
    spec = {"mnist": "mnist:test"}.get(cfg.data.dataset, "cifar10-partial:test")
    images = load_images(spec, args.data_dir, args.n, seed=2020)[0]
    out, per = {}, {}
    for v in args.variants.split(","):
        parts, grad_ctx = _modes(v)
        t0 = time.time()
        with grad_ctx(), torch.autocast("cpu", dtype=torch.bfloat16, enabled="bf16" in parts):
            terms = bound_terms(model.eval(), diffusion, images, batch_size=args.batch, seed=0)
        secs = time.time() - t0
        per[v] = terms["total_bpd_b"]
        sm = summarize_nll(terms)
        out[v] = {"bpd": sm["bpd"], "se": sm["bpd_se"], "seconds": round(secs, 1),
                  "image_evals_per_s": len(images) * diffusion.T / secs}
    base = per[args.variants.split(",")[0]]
    for v in per:
        out[v]["max_abs_diff_per_image_vs_first"] = float(np.abs(per[v] - base).max())
    return {"kind": "nll_check", "checkpoint": args.checkpoint, "step": int(state["step"]), "n": len(images),
            "data": spec, "batch_images": args.batch, "threads": torch.get_num_threads(), "results": out,
            "load_avg_1min": load_avg()}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m experiments.recipe_search", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("evals")
    e.add_argument("--model", default="mnist-cpu")
    e.add_argument("--batch", default="250")
    e.add_argument("--variants", default="fp32")
    e.add_argument("--seconds", type=float, default=6.0)
    tr = sub.add_parser("train-speed")
    tr.add_argument("--model", default="mnist-cpu")
    tr.add_argument("--batch", default="128")
    tr.add_argument("--variants", default="fp32,bf16")
    tr.add_argument("--steps", type=int, default=12)
    tr.add_argument("--learned", action="store_true")
    j = sub.add_parser("judge")
    j.add_argument("checkpoint")
    j.add_argument("--n", type=int, default=500)
    j.add_argument("--batch", type=int, default=250)
    j.add_argument("--variant", default="bf16+im")
    j.add_argument("--seed", type=int, default=0)
    j.add_argument("--var", default=None)
    j.add_argument("--save", default=None)
    j.add_argument("--steps", type=int, default=None, help="respaced sampler with this many steps (ranking only)")
    j.add_argument("--no-ema", action="store_true")
    f = sub.add_parser("floor")
    f.add_argument("--dataset", default="mnist")
    f.add_argument("--seed", type=int, default=1)
    f.add_argument("--n", type=int, default=500)
    sc = sub.add_parser("score")
    sc.add_argument("images")
    nl = sub.add_parser("nll-check")
    nl.add_argument("checkpoint")
    nl.add_argument("--n", type=int, default=16)
    nl.add_argument("--batch", type=int, default=16)
    nl.add_argument("--variants", default="fp32,fp32+im,bf16+im")
    nl.add_argument("--data-dir", default="../shared/data")
    for q in (j, f, sc):
        q.add_argument("--ref", default=None if q is f else "mnist:test")
        q.add_argument("--ref-n", type=int, default=None)
        q.add_argument("--data-dir", default="../shared/data")
    for q in (e, tr, j, f, nl, sc):
        q.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    common = {"commit": commit(), "torch": torch.__version__, "cpu": "AMD EPYC (2 cores, shared)",
              "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if args.cmd == "evals":
        for model in args.model.split(","):
            for b in args.batch.split(","):
                for v in args.variants.split(","):
                    print(json.dumps({**bench_evals(model, int(b), v, args.seconds), **common}), flush=True)
    elif args.cmd == "train-speed":
        for model in args.model.split(","):
            for b in args.batch.split(","):
                for v in args.variants.split(","):
                    print(json.dumps({**bench_train(model, int(b), v, args.steps, args.learned), **common}),
                          flush=True)
    elif args.cmd == "judge":
        print(json.dumps({**judge(args), **common}), flush=True)
    elif args.cmd == "score":
        print(json.dumps({**score(args), **common}), flush=True)
    elif args.cmd == "nll-check":
        print(json.dumps({**nll_check(args), **common}), flush=True)
    else:
        print(json.dumps({**floor(args), **common}), flush=True)


if __name__ == "__main__":
    main()
