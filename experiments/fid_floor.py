"""The FID/KID that real images get at a profile's evaluation size: the floor a model's
numbers are read against.

FID is biased upwards at small N, so the quick profile's FID of 48 samples is not
comparable with the paper's FID of 50,000; what a small-N number means is shown by
what real data gets under exactly the same protocol. For each dataset family of a
profile this takes N real training images that are *not* in the FID reference subset
(the profile's reference split: at the quick profile N test images, so training images
never overlap it), and measures them against that reference (the same spec, subset, seed
and Inception as `python -m ddpm eval`, so the cached reference features are shared),
with the same standard errors as the evaluation (FID: bootstrap; KID: jackknife):

    python -m experiments.fid_floor --profile quick      # -> results/quick/fid_floor.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from .registry import EVAL_SIZE, PROFILES, RUNS, run_config_args

# a run that shows each family's config (at the CPU profiles the cifar10 family is MNIST)
FAMILIES = {"cifar10": "eps_simple", "mnist": "mnist_seed", "cifar10-subset": "cifar10_subset"}


def floor(profile: str, family: str, data_dir=None, weights=None, seed: int = 1) -> dict:
    from ddpm.config import get_preset
    from ddpm.evaluate import dataset_spec
    from ddpm.fidelity import compute_metrics
    from ddpm.provenance import git_commit
    from ddpm.runtime import device_description
    from ddpm.sources import load_images, subset_indices

    size = EVAL_SIZE[profile]
    preset, overrides = run_config_args(RUNS[FAMILIES[family]], profile)
    cfg = get_preset(preset, overrides)
    spec, ref_spec = dataset_spec(cfg, "train", data_dir), dataset_spec(cfg, size["ref_split"], data_dir)
    fit = (cfg.data.channels, cfg.data.resolution)
    t0 = time.time()
    ref, ref_desc, ref_key = load_images(ref_spec, data_dir, size["ref_n"], seed=2020, resize_to=fit)
    everything, _, _ = load_images(spec, data_dir, None, resize_to=fit)
    N = everything.shape[0]
    in_ref = np.zeros(N, bool)
    if ref_spec == spec:  # the reference is a subset of the training split: leave it out
        ref_idx = subset_indices(N, size["ref_n"], seed=2020)  # the reference subset load_images took
        in_ref[slice(None) if ref_idx is None else ref_idx] = True  # whole split: none is outside it
    pool = np.flatnonzero(~in_ref) if (~in_ref).any() else np.arange(N)
    pick = np.random.RandomState(seed).choice(pool, size["n"], replace=False)
    real = everything[pick]
    m = compute_metrics(real, ref, ("fid", "kid"), weights=weights, reference_key=ref_key,
                        reference_desc=ref_desc, progress=False, uncertainty=True)
    return {"family": family, "profile": profile, "dataset": cfg.data.dataset + (f"-{cfg.data.subset}" if
                                                                                 cfg.data.subset else ""),
            "fid": m["fid"], "fid_se": m.get("fid_se"), "kid": m["kid"], "kid_std": m["kid_std"],
            "kid_se": m.get("kid_se"), "kid_unbiased": m.get("kid_unbiased"),
            "n": int(real.shape[0]), "n_reference": m["n_reference"], "reference": m["reference"],
            "real_images": f"{spec}: {len(pick)} images outside the reference subset, numpy "
                           f"RandomState({seed}).choice" + ("" if (~in_ref).any() else
                                                           " (from the reference itself: none outside it)"),
            "disjoint_from_reference": bool((~in_ref).any()), "inception": m["inception"],
            "git_commit": git_commit(), "device": device_description("cpu"),
            "elapsed_s": round(time.time() - t0, 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.fid_floor", description=__doc__.split("\n\n")[0])
    p.add_argument("--profile", choices=PROFILES, required=True)
    p.add_argument("--families", default=None,
                   help="comma list of cifar10, mnist (default: those with runs under results/PROFILE/)")
    p.add_argument("--results-dir", default="results")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--inception-weights", default=None)
    p.add_argument("--again", action="store_true",
                   help="measure again a family that fid_floor.json holds at this profile's N (default: keep it)")
    args = p.parse_args(argv)
    path = Path(args.results_dir) / args.profile / "fid_floor.json"
    if args.families:
        families = args.families.split(",")
    else:
        trained = {json.loads(t.read_text()).get("family") for t in path.parent.glob("*/train.json")}
        families = [f for f in FAMILIES if f in trained]
    if not families:
        print(f"no cifar10 or mnist runs under {path.parent}/: nothing to do")
        return 0
    from ddpm.data import DataError
    from ddpm.config import get_preset
    from ddpm.inception import FidelityError

    earlier = json.loads(path.read_text()) if path.is_file() else {}
    size = EVAL_SIZE[args.profile]
    try:
        # families on the same data (the CPU profiles' cifar10 grid is MNIST) share one measurement
        out, by_data = dict(earlier), {}
        for f in families:
            cfg = get_preset(*run_config_args(RUNS[FAMILIES[f]], args.profile))
            prev = earlier.get(f) or {}
            if (not args.again and prev.get("n") == size["n"] and prev.get("n_reference") == size["ref_n"]
                    and prev.get("dataset") == cfg.data.dataset + (f"-{cfg.data.subset}" if cfg.data.subset else "")):
                print(f"skip  fid floor of {f}: measured earlier ({path}; --again to measure it again)")
                continue
            data = json.dumps(cfg.to_dict()["data"])
            if data not in by_data:
                by_data[data] = floor(args.profile, f, args.data_dir, args.inception_weights)
            out[f] = {**by_data[data], "family": f}
    except (FidelityError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if out == earlier:
        return 0
    path.parent.mkdir(parents=True, exist_ok=True)
    from ddpm.provenance import atomic_write_text, portable

    atomic_write_text(path, json.dumps(portable(out), indent=2) + "\n")
    print(json.dumps({f: {k: v[k] for k in ("fid", "kid", "n", "n_reference")} for f, v in out.items()}))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
