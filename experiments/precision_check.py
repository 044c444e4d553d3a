"""bf16 against fp32 in training: the same run twice, once per precision, and its loss curves.

The same config and seed give the same data order, timesteps and noise whatever the
precision (the random streams do not depend on it), so the two curves differ by the
arithmetic only. Each arm is a real `python -m ddpm train` (the trainer as a user runs
it); the losses come from its stats.jsonl, one line per --log-every steps.

    # on a GPU, the paper's CIFAR10 config (35.7M params, batch 128, its warm-up) for 200 steps
    python -m experiments.precision_check --device cuda --out results/gpu/precision_train.json
    # on the CPU, to try the script: a small MNIST config for 20 steps
    python -m experiments.precision_check --device cpu --preset quick-grid --steps 20 --log-every 5

On the real CIFAR10 training set when a data dir holds it; else on the CIFAR10 subset
'partial' (4,000 real training images: ../shared/data/cifar10-partial), said on the screen
and in the JSON. Without either, it stops and says what to fetch.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ddpm.config import get_preset
from ddpm.data import DataError, load_dataset
from ddpm.provenance import git_commit, portable

ROOT = Path(__file__).resolve().parents[1]
ARMS = {"fp32": "false", "bf16": "true"}


def data_overrides(preset: str, data_dir) -> tuple:
    """(--set overrides, what the data is): the full CIFAR10 if found, else the subset."""
    cfg = get_preset(preset)
    if cfg.data.dataset != "cifar10" or cfg.data.subset:
        return [], cfg.data.dataset + (f" subset {cfg.data.subset!r}" if cfg.data.subset else "")
    try:
        load_dataset(cfg.data, data_dir, progress=False)
        return [], "cifar10 (all 50,000 training images)"
    except DataError:
        sub = get_preset(preset, ["data.subset=partial"])
        load_dataset(sub.data, data_dir, progress=False)  # DataError: says what to fetch
        print("the full CIFAR10 training set is not here: training on the subset 'partial' (4,000 real "
              "CIFAR10 training images)", flush=True)
        return ["data.subset=partial"], "cifar10 subset 'partial' (4,000 real training images)"


def run_arm(name: str, args, extra, out: Path) -> list:
    """Train one arm into ``out``; its stats.jsonl rows."""
    cmd = [sys.executable, "-m", "ddpm", "train", "--preset", args.preset, "--out", str(out), "--no-progress",
           "--device", args.device, "--set", f"train.bf16={ARMS[name]}", "--set", f"train.steps={args.steps}",
           "--set", f"train.log_every={args.log_every}", "--set", f"train.ckpt_every={args.steps}",
           "--set", f"train.sample_every={args.steps}"]
    cmd += [a for kv in [*extra, *args.set] for a in ("--set", kv)]
    if args.data_dir:
        cmd += ["--data-dir", str(args.data_dir)]
    print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True)
    print(f"   {name} took {time.perf_counter() - t0:.0f} s", flush=True)
    return [json.loads(line) for line in (out / "stats.jsonl").read_text().splitlines()
            if line.strip() and "loss" in json.loads(line) and "event" not in json.loads(line)]


def compare(rows: dict) -> dict:
    """The curves side by side, and their differences."""
    steps = [r["step"] for r in rows["fp32"]]
    assert steps == [r["step"] for r in rows["bf16"]], "the two arms logged different steps"
    loss = {k: [r["loss"] for r in v] for k, v in rows.items()}
    diff = [b - f for f, b in zip(loss["fp32"], loss["bf16"])]
    rel = [abs(d) / abs(f) for d, f in zip(diff, loss["fp32"])]
    # images/s of each window after the first (the first holds start-up and kernel selection)
    speed = {k: statistics.median(r["images_per_s"] for r in v[1:]) if len(v) > 1 else None
             for k, v in rows.items()}
    return {"logged_steps": steps, "loss": loss, "grad_norm": {k: [r["grad_norm"] for r in v] for k, v in rows.items()},
            "loss_bf16_minus_fp32": diff, "max_abs_diff": max(map(abs, diff)), "max_rel_diff": max(rel),
            "median_rel_diff": statistics.median(rel), "images_per_s_median_after_first_window": speed,
            "bf16_speedup": speed["bf16"] / speed["fp32"] if speed["fp32"] and speed["bf16"] else None}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cifar10")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--device", default="cuda")
    p.add_argument("--data-dir", type=Path, default=None)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more config overrides")
    p.add_argument("--out", type=Path, default=None, help="write the JSON here")
    p.add_argument("--keep", type=Path, default=None, help="keep the two run dirs here (default: a temp dir)")
    args = p.parse_args(argv)
    if args.steps % args.log_every:
        p.error("--steps must be a multiple of --log-every (the curves are compared window by window)")
    try:
        extra, data = data_overrides(args.preset, args.data_dir)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        base = args.keep or Path(tmp)
        rows = {name: run_arm(name, args, extra, base / name) for name in ARMS}
        run = json.loads((base / "fp32" / "run.json").read_text())
    res = compare(rows)
    print(f"\n{'step':>6} {'loss fp32':>11} {'loss bf16':>11} {'bf16 - fp32':>12}")
    for s, f, b, d in zip(res["logged_steps"], res["loss"]["fp32"], res["loss"]["bf16"], res["loss_bf16_minus_fp32"]):
        print(f"{s:>6} {f:>11.5f} {b:>11.5f} {d:>+12.2e}")
    sp = res["images_per_s_median_after_first_window"]
    print(f"max |bf16 - fp32| {res['max_abs_diff']:.2e} (relative {res['max_rel_diff']:.2%}, median "
          f"{res['median_rel_diff']:.2%}); training images/s (median window after the first) fp32 "
          f"{sp['fp32'] or float('nan'):.4g}, bf16 {sp['bf16'] or float('nan'):.4g}")
    if args.out:
        record = {"what": f"the same training run in fp32 and in bf16 autocast ({args.steps} steps of preset "
                          f"{args.preset!r}, losses per {args.log_every}-step window, same seed)",
                  "preset": args.preset, "overrides": [*extra, *args.set], "train_steps": args.steps,
                  "log_every": args.log_every, "data": data, "device": run.get("device_name"),
                  "torch": run.get("torch"), "git_commit": git_commit(),
                  "command": "python -m experiments.precision_check " + " ".join(argv if argv is not None
                                                                                 else sys.argv[1:]),
                  "date": time.strftime("%Y-%m-%d"), **res}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(portable(record), indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
