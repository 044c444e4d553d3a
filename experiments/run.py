"""Run experiments: train each run they need, evaluate it, write results/.

    python -m experiments.run table2 --profile quick
    python -m experiments.run --all --profile smoke
    python -m experiments.run --list

Finished work is skipped, so an interrupted reproduction resumes where it stopped:
a run whose final checkpoint exists is not retrained (an unfinished one resumes from
its last checkpoint), an evaluation whose metrics.json exists is not redone.
Checkpoints, samples and logs go under --runs-dir (default runs/, not in git); small
machine-readable results go under --results-dir (default results/):

    results/<profile>/<run>/train.json            config, steps, time, final loss, status
    results/<profile>/<run>/<eval>/metrics.json   what `python -m ddpm eval` measured,
                                                  with its figures (PNG) beside it
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional

from .registry import DATA_NOTES, EVAL_SIZE, EXPERIMENTS, PROFILES, RUNS, Eval, run_config_args, runs_for

ROOT = Path(__file__).resolve().parents[1]


def default_profile() -> str:
    try:
        import torch
        return "paper" if torch.cuda.is_available() else "quick"
    except ImportError:
        return "quick"


# Set by run_experiments: the prefix of screen lines (the run's name when runs go in
# parallel) and the environment of the ddpm processes (their CPU threads).
_PREFIX = threading.local()
_CHILD_ENV: Optional[dict] = None
_PRINT_LOCK = threading.Lock()


def _say(msg: str) -> None:
    prefix = getattr(_PREFIX, "value", "")
    with _PRINT_LOCK:
        sys.stdout.write("".join(prefix + line + "\n" for line in msg.split("\n")))
        sys.stdout.flush()


def _call(cmd: List[str], log: Path) -> int:
    """Run a ddpm command, its output both on screen and in a log file."""
    log.parent.mkdir(parents=True, exist_ok=True)
    _say("+ " + " ".join(shlex.quote(c) for c in cmd))
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(shlex.quote(c) for c in cmd)}\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT, text=True,
                                bufsize=1, env=_CHILD_ENV)
        for line in proc.stdout:
            _say(line.rstrip("\n"))
            f.write(line)
        return proc.wait()


def _stats_summary(run_dir: Path) -> dict:
    rows = []
    stats = run_dir / "stats.jsonl"
    if stats.exists():
        rows = [json.loads(line) for line in stats.read_text().splitlines() if line.strip()]
    return {"last": rows[-1] if rows else None, "n_logged": len(rows)}


def _copy_samples(out: Path, dest: Path) -> None:
    """The run's last training sample grid (EMA, fixed noise) -> results/.../samples.png."""
    grids = sorted((out / "samples").glob("step_*.png"))
    if grids:
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy2(grids[-1], dest / "samples.png")


def train_run(name: str, profile: str, runs_dir: Path, results_dir: Path, data_dir: Optional[str]) -> dict:
    """Train (or resume, or skip) one run; returns its train.json record."""
    run = RUNS[name]
    out = runs_dir / profile / name
    record_path = results_dir / profile / name / "train.json"
    previous = json.loads(record_path.read_text()) if record_path.exists() else None
    if previous and previous["status"] in ("finished", "diverged"):
        _say(f"[{profile}/{name}] training: {previous['status']} earlier, skipped")
        _copy_samples(out, record_path.parent)
        return previous
    preset, overrides = run_config_args(run, profile)
    cmd = [sys.executable, "-m", "ddpm", "train", "--preset", preset, "--out", str(out)]
    for o in overrides:
        cmd += ["--set", o]
    if data_dir:
        cmd += ["--data-dir", data_dir]
    if out.exists():
        cmd.append("--resume")
    t0 = time.time()
    rc = _call(cmd, runs_dir / profile / f"{name}.train.log")
    elapsed = time.time() - t0
    status = "finished" if rc == 0 and (out / "final.pt").exists() else ("diverged" if rc == 1 else "failed")
    record = {
        "run": name, "profile": profile, "family": run.family, "note": run.note,
        "preset": preset, "overrides": overrides,
        "data_note": DATA_NOTES.get((profile, run.family), ""),
        "status": status, "exit_code": rc, "elapsed_s_this_call": round(elapsed, 1),
        # over every call that got a record (a killed call records nothing: its time is lost here)
        "elapsed_s_total": round(elapsed + ((previous or {}).get("elapsed_s_total") or 0.0), 1),
        "omp_num_threads": (_CHILD_ENV or os.environ).get("OMP_NUM_THREADS"),
        "config": json.loads((out / "config.json").read_text()) if (out / "config.json").exists() else None,
        "run_info": json.loads((out / "run.json").read_text()) if (out / "run.json").exists() else None,
        "stats": _stats_summary(out),
    }
    record_path.parent.mkdir(parents=True, exist_ok=True)
    record_path.write_text(json.dumps(record, indent=2))
    _copy_samples(out, record_path.parent)
    if status == "failed":
        raise SystemExit(f"[{profile}/{name}] training failed (exit {rc}); see {runs_dir / profile / (name + '.train.log')}")
    return record


# What is copied from an evaluation's folder (under runs/) into results/: small files only,
# never the sample shards or the per-image bound terms.
RESULT_FILES = ("metrics.json", "*.png", "rate_distortion.npz")


def eval_run(name: str, ev: Eval, profile: str, runs_dir: Path, results_dir: Path,
             data_dir: Optional[str]) -> None:
    out = results_dir / profile / name / ev.name
    work = runs_dir / profile / name / f"eval_{ev.name}"
    if (out / "metrics.json").exists():
        _say(f"[{profile}/{name}] {ev.name}: done earlier, skipped")
        return
    size = EVAL_SIZE[profile]
    ckpt = runs_dir / profile / name / "final.pt"
    cmd = [sys.executable, "-m", "ddpm", "eval", "--checkpoint", str(ckpt), "--metrics", ev.metrics,
           "--n", str(size["n"]), "--out", str(work), "--seed", "0"]
    for flag, key in (("--nll-n", "nll_n"), ("--reference-n", "ref_n")):
        if size[key] is not None:
            cmd += [flag, str(size[key])]
    if ev.var:
        cmd += ["--var", ev.var]
    if not ev.figures:
        cmd.append("--no-figures")
    if data_dir:
        cmd += ["--data-dir", data_dir]
    rc = _call(cmd, runs_dir / profile / name / f"eval_{ev.name}.log")
    if rc != 0:
        raise SystemExit(f"[{profile}/{name}] evaluation {ev.name} failed (exit {rc})")
    _copy_results(work, out)


def _copy_results(src: Path, dst: Path) -> None:
    """An evaluation's RESULT_FILES from ``src`` to ``dst``, metrics.json last: its presence
    marks the evaluation as done."""
    dst.mkdir(parents=True, exist_ok=True)
    for pattern in RESULT_FILES[::-1]:
        for f in sorted(src.glob(pattern)):
            shutil.copy2(f, dst / f.name)


def _reuse(src: str, dst: str, record: dict, profile: str, results_dir: Path) -> None:
    """train.json of a run that reuses ``src``'s training (identical config at this profile)."""
    run = RUNS[dst]
    out = results_dir / profile / dst
    out.mkdir(parents=True, exist_ok=True)
    mine = {**record, "run": dst, "family": run.family, "note": run.note, "same_as": src,
            "data_note": DATA_NOTES.get((profile, run.family), ""), "elapsed_s_this_call": 0.0,
            "elapsed_s_total": 0.0}
    (out / "train.json").write_text(json.dumps(mine, indent=2))
    if (results_dir / profile / src / "samples.png").exists():
        shutil.copy2(results_dir / profile / src / "samples.png", out / "samples.png")


def default_jobs() -> int:
    """Runs in parallel: one per CPU core on a CPU-only machine (small models use cores
    better as separate single-threaded processes than as threads of one), one on a GPU."""
    try:
        import torch
        if torch.cuda.is_available():
            return 1
    except ImportError:
        pass
    return os.cpu_count() or 1


def run_experiments(names: List[str], profile: str, runs_dir: Path, results_dir: Path,
                    data_dir: Optional[str], jobs: int = 1) -> None:
    global _CHILD_ENV
    runs = runs_for(names)
    evals = {}  # run -> {eval name: Eval}, shared across experiments
    for e in names:
        for r in EXPERIMENTS[e].runs:
            for ev in EXPERIMENTS[e].evals:
                prev = evals.setdefault(r, {}).setdefault(ev.name, ev)
                assert prev == ev, f"two different evaluations named {ev.name}"
    # a run whose config at this profile equals an earlier run's is not trained again: it
    # reuses that run's checkpoint and evaluations (e.g. the CelebA-HQ stand-in of small profiles)
    same_as: Dict[str, str] = {}
    by_config: Dict[tuple, str] = {}
    for r in RUNS:  # every run, so that one named alone still finds the run it equals
        preset, overrides = run_config_args(RUNS[r], profile)
        same_as[r] = by_config.setdefault((preset, tuple(overrides)), r)
    total = len(runs) + sum(len(v) for v in evals.values())
    jobs = max(1, min(jobs, len(runs)))
    if jobs > 1 and "OMP_NUM_THREADS" not in os.environ:
        # share the cores between the parallel runs instead of oversubscribing them
        _CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // jobs))}
    counter = {"done": 0}
    t_start = time.time()

    def step(what: str) -> None:
        with _PRINT_LOCK:
            counter["done"] += 1
            n = counter["done"]
        _say(f"\n=== [{n}/{total}] {profile}: {what} ({time.time() - t_start:.0f} s so far)")

    def one_run(r: str) -> None:
        _PREFIX.value = f"{r}| " if jobs > 1 else ""
        src = same_as[r]
        runs_dir.joinpath(profile).mkdir(parents=True, exist_ok=True)
        # one process at a time per run, also across separate invocations
        with open(runs_dir / profile / f"{src}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            step(f"train {r}" + (f" (same config as {src}: reused)" if src != r else ""))
            record = train_run(src, profile, runs_dir, results_dir, data_dir)
            if src != r:
                _reuse(src, r, record, profile, results_dir)
            for ev in evals[r].values():
                if record["status"] != "finished":
                    step(f"{r} {ev.name} skipped: training {record['status']}")
                    continue
                step(f"evaluate {r} {ev.name}")
                t0 = time.time()
                eval_run(src, ev, profile, runs_dir, results_dir, data_dir)
                if src != r:
                    _copy_results(results_dir / profile / src / ev.name, results_dir / profile / r / ev.name)
                _say(f"[{profile}/{r}] {ev.name}: {time.time() - t0:.0f} s")

    # the runs with the most evaluations first, so parallel workers finish close together
    # (reusing runs last: they wait for the run they reuse)
    runs = sorted(runs, key=lambda r: (same_as[r] != r, -len(evals[r])))
    if jobs == 1:
        for r in runs:
            one_run(r)
    else:
        print(f"{len(runs)} runs, {jobs} at a time, each with OMP_NUM_THREADS="
              f"{(_CHILD_ENV or os.environ).get('OMP_NUM_THREADS')}; screen lines are prefixed with the run, "
              f"full logs in {runs_dir / profile}/", flush=True)
        with ThreadPoolExecutor(jobs) as pool:
            futures = [pool.submit(one_run, r) for r in runs]
            failed = []
            for r, fut in zip(runs, futures):
                try:
                    fut.result()
                except SystemExit as e:  # one failed run does not stop the others
                    failed.append(f"{r}: {e}")
        if failed:
            raise SystemExit("failed:\n  " + "\n  ".join(failed))
    print(f"\nall {len(names)} experiments done for profile {profile} in {time.time() - t_start:.0f} s", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.run", description=__doc__.split("\n\n")[0])
    p.add_argument("experiments", nargs="*", help=f"any of: {', '.join(EXPERIMENTS)}")
    p.add_argument("--all", action="store_true", help="every experiment")
    p.add_argument("--list", action="store_true", help="list experiments and runs, then exit")
    p.add_argument("--profile", choices=PROFILES, default=None,
                   help="paper | quick | smoke (default: paper on a CUDA machine, else quick)")
    p.add_argument("--runs-dir", default=str(ROOT / "runs"), help="checkpoints and samples (not in git)")
    p.add_argument("--results-dir", default=str(ROOT / "results"), help="small results files")
    p.add_argument("--data-dir", default=None, help="passed to ddpm (default: $DDPM_DATA_DIR, else ./data)")
    p.add_argument("--jobs", type=int, default=None,
                   help="runs trained/evaluated in parallel (default: one per CPU core without a GPU, "
                        "1 with a GPU); each gets OMP_NUM_THREADS = cores / jobs unless it is set")
    args = p.parse_args(argv)
    if args.list:
        for e in EXPERIMENTS.values():
            print(f"{e.name:<16} {e.paper}\n{'':<16} runs: {', '.join(e.runs)}")
        return 0
    names = list(EXPERIMENTS) if args.all else args.experiments
    unknown = [n for n in names if n not in EXPERIMENTS]
    if unknown or not names:
        p.error(f"name experiments ({', '.join(EXPERIMENTS)}) or pass --all" +
                (f"; unknown: {', '.join(unknown)}" if unknown else ""))
    profile = args.profile or default_profile()
    run_experiments(names, profile, Path(args.runs_dir), Path(args.results_dir), args.data_dir,
                    jobs=args.jobs or default_jobs())
    return 0


if __name__ == "__main__":
    sys.exit(main())
