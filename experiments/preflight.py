"""Preflight: what a long reproduction needs, checked in minutes before it starts.

    python -m experiments.preflight --profile paper [EXPERIMENT ...]   (none named: all of the profile)

experiments.run runs it before any paper-profile run (``--no-preflight`` skips it; ``--preflight``
runs it at the quick and smoke profiles, where it is off by default). Each check gives
(name, ok, message); the list is printed, a message saying what to do where a check fails,
and if any fails the exit status is 2 (EXIT_BLOCKED) and nothing starts. The outcome is written
to results/<profile>/preflight.json, with whether --allow-no-is was given. The checks:

- cuda: CUDA usable (a tensor op on every visible GPU), the GPUs' count, names and memory. At
  the paper profile no CUDA blocks (the runs would otherwise train on the CPU for months).
- data: every dataset the runs still to do need, complete, read by ddpm.data as training and
  evaluation read it (the data dir search order there): MNIST 60,000 + 10,000 and CIFAR10
  50,000 + 10,000 images (a named CIFAR10 subset: its own sizes), an image folder's count
  (CelebA-HQ: 30,000). From experiments.run a missing MNIST / CIFAR10 is downloaded now, as
  the trainings would (--download here).
- inception: the FID/KID/IS network loads (ddpm.inception.Inception, online or offline).
  Offline converted weights have no logits, so no Inception Score: blocking at the paper
  profile unless --allow-no-is; a note at the others.
- disk: the checkpoints of each training still to do (last.pt and final.pt, 16 bytes a
  parameter each: weights, EMA, Adam's two moments) and each evaluation's samples (N x H x W
  x C bytes), against the free space of the runs dir (shutil.disk_usage).
- train step: one optimisation step of each distinct configuration still to train, at its
  per-GPU share of the batch and its microbatch, on the first GPU (experiments.gpus.
  time_train_step): out of memory is found in minutes, not after days; skipped, with a note,
  where there is no GPU.

Under ``--launcher slurm`` the two GPU checks run in a one-GPU Slurm job (where the stages will
run), the others on this machine (the data and runs dirs are shared with the nodes).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Tuple

from ddpm.config import Config, get_preset
from ddpm.rundir import FINAL

from . import gpus as G
from .registry import EVAL_SIZE, EXPERIMENTS, PROFILES, RUNS, experiments_for, run_config_args
from .run import ROOT, SPLIT_SIZES, _eval_done, _finished, _rel, _write_json, training_gpus

EXIT_BLOCKED = 2
# Image folders of known size, by data.path: CelebA-HQ (Karras et al. 2018), the paper's 256x256 set.
FOLDER_IMAGES = {"celebahq256": 30_000}
CKPT_BYTES_PER_PARAM = 16  # fp32 weights, EMA weights, Adam's m and v
CKPT_FILES = 2  # last.pt and final.pt
SAMPLED = {"fid", "is", "kid"}


class Check(NamedTuple):
    name: str
    ok: bool  # False: blocks
    message: str


class Step(NamedTuple):
    """A distinct training configuration to try for one step: the runs that share it."""
    runs: Tuple[str, ...]
    preset: str
    cfg: Config
    gpus: int  # the training's GPUs (its per-GPU share: batch / gpus)


class Work(NamedTuple):
    """What is left to do: trainings (run -> config), evaluations (run, eval, config), data."""
    trainings: Dict[str, Tuple[str, Config]]
    evaluations: List[tuple]
    data: list


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:300]


# ----------------------------------------------------------------------------- what is to do


def work_left(names: List[str], profile: str, runs_dir: Path, results_dir: Path) -> Work:
    """The trainings and evaluations experiments.run would still do for ``names`` (a run whose
    config equals another's at this profile counts once, as there), and the data they read."""
    by_config: Dict[tuple, str] = {}
    same_as = {}
    for r in RUNS:
        preset, overrides = run_config_args(RUNS[r], profile)
        same_as[r] = by_config.setdefault((preset, tuple(overrides), RUNS[r].released), r)
    evals: Dict[str, dict] = {}  # run -> {name: Eval}; a run that reuses another is evaluated as it
    for e in names:
        for r in EXPERIMENTS[e].runs:
            for ev in EXPERIMENTS[e].evals:
                evals.setdefault(same_as[r], {}).setdefault(ev.name, ev)
    trainings, evaluations, data = {}, [], []
    for r in evals:
        preset, overrides = run_config_args(RUNS[r], profile)
        cfg = get_preset(preset, overrides)
        # fewer-step evaluations with more steps than T do not apply (as in experiments.run)
        todo = [(r, ev, cfg) for n, ev in evals[r].items()
                if not (ev.steps and ev.steps > cfg.diffusion.T) and not _eval_done(results_dir, profile, r, n)]
        train = not RUNS[r].released and (not _finished(results_dir / profile / r / "train.json")
                                          or (bool(todo) and not (runs_dir / profile / r / FINAL).exists()))
        if train:
            trainings[r] = (preset, cfg)
        evaluations += todo
        if (train or todo) and cfg.data not in data:
            data.append(cfg.data)
    return Work(trainings, evaluations, data)


def distinct_steps(work: Work, profile: str, n_gpus: int, gpus_per_run: Optional[int]) -> List[Step]:
    """One Step per distinct (network, data shape, diffusion, batch, microbatch, precision, GPUs)."""
    steps: Dict[str, Step] = {}
    for r, (preset, cfg) in work.trainings.items():
        k = training_gpus(r, profile, n_gpus, gpus_per_run)
        d = cfg.to_dict()
        key = json.dumps([d["model"], d["data"]["resolution"], d["data"]["channels"], d["diffusion"],
                          d["train"]["batch_size"], d["train"]["microbatch"], d["train"]["bf16"], k], sort_keys=True)
        s = steps.get(key)
        steps[key] = Step(s.runs + (r,), s.preset, s.cfg, s.gpus) if s else Step((r,), preset, cfg, k)
    return list(steps.values())


# ----------------------------------------------------------------------------- the checks


def check_cuda(profile: str) -> Check:
    """CUDA usable on every visible GPU; their count, names and memory."""
    import torch

    if not torch.cuda.is_available():
        why = (f"torch {torch.__version__} built for CUDA {torch.version.cuda}, but no usable GPU or driver"
               if torch.version.cuda else f"torch {torch.__version__} built without CUDA")
        if profile == "paper":
            return Check("cuda", False, f"no CUDA GPU ({why}): the paper profile does not train on the CPU; run on "
                                        "a GPU machine (nvidia-smi must list the GPUs, torch must be a CUDA build), "
                                        "or choose --profile quick")
        return Check("cuda", True, f"no CUDA GPU ({why}): the {profile} profile runs on the CPU")
    names = []
    for i in range(torch.cuda.device_count()):
        try:
            torch.ones(1, device=f"cuda:{i}").add_(1).item()
        except RuntimeError as e:
            return Check("cuda", False, f"GPU {i} is visible but not usable ({_first_line(e)}): fix its driver, "
                                        f"or leave it out with CUDA_VISIBLE_DEVICES")
        p = torch.cuda.get_device_properties(i)
        names.append(f"{p.name} ({p.total_memory / 2**30:.0f} GiB)")
    return Check("cuda", True, f"{len(names)} GPU(s): " + ", ".join(f"{n} x {g}" for g, n in Counter(names).items()))


def _gpu_memory() -> Tuple[str, float, float]:
    """(name, total GiB, peak allocated GiB since the last reset) of GPU 0."""
    import torch

    p = torch.cuda.get_device_properties(0)
    return p.name, p.total_memory / 2**30, torch.cuda.max_memory_allocated(0) / 2**30


def check_train_steps(steps: List[Step]) -> List[Check]:
    """One optimisation step of each configuration on GPU 0, at its per-GPU share and microbatch."""
    import torch

    out = []
    for st in steps:
        local = st.cfg.train.batch_size // max(st.gpus, 1)
        mb = st.cfg.train.microbatch if 0 < st.cfg.train.microbatch < local else local
        shape = (f"{local} images per GPU" + (f" over {st.gpus} GPUs" if st.gpus > 1 else "")
                 + (f" in microbatches of {mb}" if mb < local else ""))
        name = f"train step {st.runs[0]}" + (f" (+{len(st.runs) - 1} alike)" if len(st.runs) > 1 else "")
        torch.cuda.reset_peak_memory_stats(0)
        try:
            seconds = G.time_train_step(st.cfg, max(st.gpus, 1), steps=1)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            gpu, total, _ = _gpu_memory()
            out.append(Check(name, False, f"out of memory on {gpu} ({total:.0f} GiB) at {shape}: lower "
                                          f"train.microbatch in preset '{st.preset}' (ddpm/config.py; README, "
                                          f"'On GPUs' gives what fits 40 and 80 GB)"))
            continue
        except Exception as e:  # noqa: BLE001 - a CUDA error, a kernel missing for this GPU: the run would fail too
            out.append(Check(name, False, f"one training step failed at {shape} ({_first_line(e)}): fix this "
                                          f"before the runs start"))
            continue
        gpu, total, peak = _gpu_memory()
        out.append(Check(name, True, f"{shape}: {seconds:.2f} s a step, peak {peak:.1f} of {total:.0f} GiB on {gpu}"))
    return out


def gpu_checks(profile: str, steps: List[Step]) -> List[Check]:
    """The checks that need the GPUs the stages run on (here, or in a Slurm job)."""
    import torch

    cuda = check_cuda(profile)
    if not steps:
        return [cuda]
    if not torch.cuda.is_available():
        return [cuda, Check("train step", True, "skipped: no GPU here, so no training step was tried")]
    if not cuda.ok:
        return [cuda]
    return [cuda] + check_train_steps(steps)


def _split_sizes(d) -> Dict[str, int]:
    """The images each split of MNIST / CIFAR10 (or its named subset) holds when complete."""
    from ddpm.data import CIFAR10_SUBSETS, CIFAR10_TEST_PER_CLASS

    if d.subset:
        sub = CIFAR10_SUBSETS[d.subset]
        return {"train": len(sub.train), "test": CIFAR10_TEST_PER_CLASS * len(sub.test_classes)}
    return {s: SPLIT_SIZES[d.dataset][s] for s in ("train", "test")}


def check_data(data: list, data_dir: Optional[str], download: bool = False) -> List[Check]:
    """Each dataset complete, read by ddpm.data from the first data dir that holds it."""
    from ddpm.data import DataError, load_dataset, split_images

    out = []
    for d in data:
        if d.dataset in ("mnist", "cifar10"):
            name = f"data {d.dataset}" + (f" (subset {d.subset})" if d.subset else "")
            want = _split_sizes(d)
            try:
                have = {s: split_images(d.dataset, s, data_dir, d.subset, download).shape[0] for s in want}
            except DataError as e:
                out.append(Check(name, False, str(e)))
                continue
            short = [f"{s} has {have[s]:,} images, {n:,} expected" for s, n in want.items() if have[s] < n]
            out.append(Check(name, not short, "; ".join(short) + ": incomplete; replace it with a complete copy"
                             if short else " + ".join(f"{have[s]:,} {s}" for s in want) + " images"))
            continue
        for path in (d.path, d.test_path):  # CelebA-HQ and other image folders
            if not path:
                continue
            name = f"data folder {path}"
            try:
                ds = load_dataset(replace(d, path=path), data_dir)
            except DataError as e:
                out.append(Check(name, False, str(e)))
                break
            where = ds.name.split(":", 1)[-1]
            want = FOLDER_IMAGES.get(path, 1)
            out.append(Check(name, len(ds) >= want,
                             f"{where} holds {len(ds):,} images" + (f", fewer than the {want:,} of the full set: put "
                                                                     f"all of them there (any layout, searched "
                                                                     f"recursively)" if len(ds) < want else "")))
    return out


def check_inception(profile: str, needs_is: bool, allow_no_is: bool) -> Check:
    """The Inception network loads, and has logits for IS where IS is asked for."""
    from ddpm.inception import ENV_WEIGHTS, FidelityError, Inception

    try:
        net = Inception(None, device="cpu", with_logits=needs_is)
    except (FidelityError, OSError, RuntimeError) as e:
        return Check("inception", False, f"the Inception network of FID/KID/IS does not load ({_first_line(e)}): "
                                         f"run where torch-fidelity can download its weights once, or set "
                                         f"{ENV_WEIGHTS} (README, 'Offline FID')")
    if not net.offline:
        return Check("inception", True, "torch-fidelity's weights: FID, KID" + (" and IS" if needs_is else ""))
    where = f"offline weights {net.path} ({net.source})"
    if not needs_is:
        return Check("inception", True, f"{where}: FID and KID")
    if profile == "paper" and not allow_no_is:
        return Check("inception", False, f"{where} have no logits, so no Inception Score (Table 1, Table 2): run "
                                         f"where torch-fidelity can download its weights (unset {ENV_WEIGHTS}), or "
                                         f"pass --allow-no-is to run without IS (recorded)")
    return Check("inception", True, f"{where}: FID and KID; no logits, so IS will be reported unavailable"
                                    + (" (--allow-no-is)" if allow_no_is else ""))


def _params(cfg: Config) -> int:
    """The network's parameter count, built without memory (the meta device)."""
    import torch

    from ddpm.config import build_model

    with torch.device("meta"):
        return sum(p.numel() for p in build_model(cfg).parameters())


def _size(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def check_disk(work: Work, profile: str, runs_dir: Path) -> Check:
    """Room under the runs dir for the checkpoints and samples still to be written."""
    ckpt = sum(CKPT_FILES * CKPT_BYTES_PER_PARAM * _params(cfg) for _, cfg in work.trainings.values())
    n = EVAL_SIZE[profile]["n"]
    sampled = [cfg for _, ev, cfg in work.evaluations if SAMPLED & set(ev.metrics)]
    samples = sum(n * cfg.data.channels * cfg.data.resolution ** 2 for cfg in sampled)
    where = Path(runs_dir).absolute()
    while not where.exists():  # the runs dir is made when the first run starts
        where = where.parent
    free = shutil.disk_usage(where).free
    need = ckpt + samples
    what = (f"about {_size(need)} to write under {_rel(runs_dir)} ({len(work.trainings)} trainings' checkpoints "
            f"{_size(ckpt)}, {len(sampled)} evaluations' {n:,} samples {_size(samples)}), {_size(free)} free there")
    return Check("disk", need <= free, what + ("" if need <= free else ": free some space, or pass --runs-dir on a "
                                                                       "larger disk"))


# ----------------------------------------------------------------------------- all of them


def preflight(names: List[str], profile: str, runs_dir: Path, results_dir: Path, data_dir: Optional[str] = None,
              n_gpus: Optional[int] = None, gpus_per_run: Optional[int] = None, allow_no_is: bool = False,
              launcher=None, download: bool = False) -> List[Check]:
    """Every check for what ``names`` still need at ``profile``. ``n_gpus``: the GPUs a training
    may get (default: this machine's); ``launcher``: an experiments.slurm.SlurmLauncher, to run
    the GPU checks in a Slurm job."""
    work = work_left(names, profile, Path(runs_dir), Path(results_dir))
    if n_gpus is None:
        n_gpus = len(G.visible_gpus())
    steps = distinct_steps(work, profile, n_gpus, gpus_per_run)
    if launcher is None:
        checks = gpu_checks(profile, steps)
    else:
        from .slurm import SlurmError

        try:
            checks = launcher.call(gpu_checks, min(1, launcher.gpus_per_node), "ddpm preflight", profile, steps)
        except SlurmError as e:
            checks = [Check("cuda", False, f"the preflight's Slurm job failed: {e}")]
    checks += check_data(work.data, data_dir, download)
    metrics = {m for _, ev, _ in work.evaluations for m in ev.metrics}
    if metrics & SAMPLED:
        checks.append(check_inception(profile, "is" in metrics, allow_no_is))
    checks.append(check_disk(work, profile, Path(runs_dir)))
    return checks


def report(checks: List[Check], profile: str) -> bool:
    """Prints the list; True if something blocks."""
    blocking = [c for c in checks if not c.ok]
    print(f"preflight ({profile} profile):", flush=True)
    for c in checks:
        print(f"  {'ok' if c.ok else 'BLOCKS':<6} {c.name:<30} {c.message}", flush=True)
    if blocking:
        print(f"preflight: {len(blocking)} of {len(checks)} checks block the {profile} profile "
              f"({', '.join(c.name for c in blocking)}); nothing was started. Fix them, or skip the preflight "
              f"with --no-preflight", flush=True)
    else:
        print(f"preflight: all {len(checks)} checks passed", flush=True)
    return bool(blocking)


def run_preflight(names: List[str], profile: str, runs_dir: Path, results_dir: Path, data_dir: Optional[str] = None,
                  n_gpus: Optional[int] = None, gpus_per_run: Optional[int] = None, allow_no_is: bool = False,
                  launcher=None, download: bool = False) -> int:
    """Checks, prints, records (results/<profile>/preflight.json); EXIT_BLOCKED if something blocks, else 0."""
    checks = preflight(names, profile, runs_dir, results_dir, data_dir, n_gpus, gpus_per_run, allow_no_is,
                       launcher, download)
    blocked = report(checks, profile)
    _write_json(Path(results_dir) / profile / "preflight.json",
                {"profile": profile, "experiments": list(names), "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                 "allow_no_is": allow_no_is, "launcher": "slurm" if launcher is not None else "local",
                 "blocked": blocked, "checks": [c._asdict() for c in checks]})
    return EXIT_BLOCKED if blocked else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.preflight", description=__doc__.split("\n\n")[0])
    p.add_argument("experiments", nargs="*", help=f"any of: {', '.join(EXPERIMENTS)} (default: all of the profile)")
    p.add_argument("--profile", choices=PROFILES, default="paper", help="paper (default) | quick | smoke")
    p.add_argument("--runs-dir", default=str(ROOT / "runs"), help="where checkpoints and samples will go")
    p.add_argument("--results-dir", default=str(ROOT / "results"), help="what is done already; preflight.json")
    p.add_argument("--data-dir", default=None, help="searched first (then $DDPM_DATA_DIR, ./data, ../shared/data)")
    p.add_argument("--gpus-per-run", type=int, default=None, metavar="K", help="as for experiments.run")
    p.add_argument("--allow-no-is", action="store_true",
                   help="accept Inception weights without logits (no IS) at the paper profile (recorded)")
    p.add_argument("--download", action="store_true",
                   help="fetch a missing MNIST / CIFAR10 now (torchvision), as the trainings would")
    args = p.parse_args(argv)
    names = args.experiments or experiments_for(args.profile)
    unknown = [n for n in names if n not in EXPERIMENTS]
    if unknown:
        p.error(f"unknown experiments: {', '.join(unknown)}; any of: {', '.join(EXPERIMENTS)}")
    return run_preflight(names, args.profile, Path(args.runs_dir), Path(args.results_dir), args.data_dir,
                         gpus_per_run=args.gpus_per_run, allow_no_is=args.allow_no_is, download=args.download)


if __name__ == "__main__":
    sys.exit(main())
