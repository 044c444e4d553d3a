"""Run experiments: train each run they need, evaluate it, write results/.

    python -m experiments.run table2 --profile quick
    python -m experiments.run --all --profile smoke
    python -m experiments.run --list

Finished work is skipped, so an interrupted reproduction resumes where it stopped:
a run whose final checkpoint exists is not retrained (an unfinished one resumes from
its last checkpoint), an evaluation whose metrics.json exists is not redone.

A training's outcome (train.json "status"): "finished"; "diverged", only when `ddpm train`
exits with EXIT_DIVERGED (a non-finite loss: a result, the paper's "unstable"); else
"failed", with "reason", the last error line of its log (out of memory, an NCCL error, a
bad batch size, a kill): a failed run is retried by the next call of the same command and
the tables show it as failed, never as unstable.

Where stages run (experiments/gpus.py): on a CPU machine, --jobs runs at once, each process
with OMP_NUM_THREADS = cores / jobs. On a GPU machine, every visible GPU
($CUDA_VISIBLE_DEVICES, else all): one stage per GPU, pinned with CUDA_VISIBLE_DEVICES; a
training that gets K > 1 GPUs (registry.GPUS_PER_RUN: CelebA-HQ at the paper profile; or
--gpus-per-run K) runs under torchrun over K GPUs; stages queue for free GPUs, first come,
first served. --plan prints the schedule, GPU-hours from a few timed steps on this machine's
GPU, and the expected end, and starts nothing. With --launcher slurm each stage is one Slurm job
instead, through submitit, the same command on the job's GPUs (experiments/slurm.py).

Before a paper-profile run (--preflight at the others, --no-preflight to skip it),
experiments/preflight.py checks CUDA and the GPUs, the data, the Inception weights, free disk
and one training step of each configuration, and exits 2 with what is missing.

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
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Tuple

from ddpm.config import get_preset
from ddpm.provenance import atomic_write_text, portable
from ddpm.rundir import CONFIG, FINAL, RUN, SAMPLES, STATS
from ddpm.train import EXIT_DIVERGED

from .gpus import GpuPool, Stage, gpus_for, launch, simulate, visible_gpus
from .registry import (DATA_NOTES, EST_SECONDS, EVAL_SIZE, EXPERIMENTS, GPUS_PER_RUN, PROFILES, RUNS, Eval,
                       eval_size,
                       experiments_for, run_config_args, runs_for)

ROOT = Path(__file__).resolve().parents[1]


def default_profile() -> str:
    import torch

    return "paper" if torch.cuda.is_available() else "quick"


# Set by run_experiments: the environment of the ddpm processes (their CPU threads), the
# machine's GPUs (None: a CPU machine), and --gpus-per-run (None: the registry's GPUS_PER_RUN).
_CHILD_ENV: Optional[dict] = None
_POOL: Optional[GpuPool] = None
_GPUS_PER_RUN: Optional[int] = None
# --launcher slurm: the experiments.slurm.SlurmLauncher that runs each stage as a job (None: here)
_SLURM = None
_PRINT_LOCK = threading.Lock()
# the ddpm processes running now (a Slurm job stops them when preempted: experiments.slurm); no
# lock: that happens in a signal handler, and one set operation is atomic under the GIL
_RUNNING: set = set()
# A tqdm progress line of a child ("sample:  45%|####  | 225/500 [01:02<01:15, 3.6it/s]").
_TQDM = re.compile(r"(?:(?P<desc>[^|]*?):\s*)?(?P<pct>\d+)%\|[^|]*\|\s*(?P<n>[\d.]+[kMG]?)/(?P<total>[\d.]+[kMG]?)"
                   r"\s*\[(?P<elapsed>[^<\]]*)<(?P<eta>[^,\]]*)")
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _say(msg: str) -> None:
    with _PRINT_LOCK:
        sys.stdout.write(time.strftime("[%H:%M:%S] ") + msg + "\n")
        sys.stdout.flush()


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Board:
    """The stages running now (label -> start time, last progress). A ticker prints one line
    with all of them every ``every`` seconds, so parallel runs never interleave raw output."""

    def __init__(self, every: float):
        self.every, self.stages, self.lock = every, {}, threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._tick, daemon=True)

    def __enter__(self):
        if self.every > 0:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()

    def start(self, label: str) -> None:
        with self.lock:
            self.stages[label] = [time.time(), ""]

    def update(self, label: str, progress: str) -> None:
        with self.lock:
            if label in self.stages:
                self.stages[label][1] = progress

    def end(self, label: str) -> float:
        with self.lock:
            t0, _ = self.stages.pop(label, (time.time(), ""))
        return time.time() - t0

    def line(self) -> str:
        with self.lock:
            return " | ".join(f"{label} {prog or 'starting'} ({_duration(time.time() - t0)})"
                              for label, (t0, prog) in self.stages.items())

    def _tick(self) -> None:
        while not self._stop.wait(self.every):
            line = self.line()
            if line:
                _say("  " + line)


_BOARD = Board(0)


def _progress(m: "re.Match", label: str) -> str:
    desc = (m["desc"] or "").strip()
    desc = "" if label.endswith(desc) else desc
    return f"{desc + ' ' if desc else ''}{m['pct']}% ({m['n']}/{m['total']}, ETA {m['eta'].strip()})"


class Ran(NamedTuple):
    rc: int  # the exit code (under torchrun: its root cause's)
    tail: List[str]  # the last lines of its output (progress bars left out)
    gpus: List[str]  # the GPUs it ran on ([]: the CPU)


def _stage(argv: List[str], log: Path, label: str, gpus: int = 1) -> Ran:
    """``python -m ddpm ARGV``: on this machine (``run_here``), or with --launcher slurm the same
    in a Slurm job of its own, on ``gpus`` GPUs (at most --slurm-gpus-per-node)."""
    if _SLURM is None:
        return run_here(argv, log, label, gpus)
    from .slurm import SlurmError, StageJob

    k = min(gpus, _SLURM.gpus_per_node)
    _BOARD.start(label)
    job = _SLURM.submit(StageJob(argv, str(log), label, k), k, label)
    _BOARD.update(label, f"Slurm job {job.job_id}")
    _say(f"submit {label} as Slurm job {job.job_id} ({k} GPU{'s' if k != 1 else ''}; log: {_rel(log)})")
    try:
        ran = _SLURM.result(job)
    except SlurmError as e:  # cancelled, killed, its node lost: a failure, retried by the next call
        ran = Ran(1, [f"error: {e}"], [])
    _ended(label, ran.rc, ran.tail, log)
    return ran


def running() -> List[subprocess.Popen]:
    """The ddpm processes this process is running now."""
    return list(_RUNNING)


def run_here(argv: List[str], log: Path, label: str, gpus: int = 1) -> Ran:
    """``python -m ddpm ARGV`` on this machine: on the CPU, or once ``gpus`` GPUs are free,
    pinned to them (over torchrun when more than one)."""
    if _POOL is None:
        cmd, env = launch(argv, [], _CHILD_ENV)
        return Ran(*_call(cmd, log, label, env), [])
    with _POOL.take(gpus) as ids:
        cmd, env = launch(argv, ids, _CHILD_ENV)
        rc, tail = _call(cmd, log, label, env, where=f" on GPU {','.join(ids)}")
    if rc != 0 and len(ids) > 1:
        rc = torchrun_exit_code(tail, rc)
    return Ran(rc, tail, ids)


def torchrun_exit_code(lines: List[str], rc: int) -> int:
    """The exit code of the worker torchrun names as the root cause of its failure (torchrun
    itself exits 1 whatever its workers' codes); ``rc`` if its report is not there."""
    for i, line in enumerate(lines):
        if line.startswith("Root Cause"):
            for later in lines[i + 1:]:
                m = re.match(r"\s*exitcode\s*:\s*(-?\d+)", later)
                if m:
                    return int(m[1])
    return rc


# The line that says why a process failed: our one-line errors, an exception's last line
# (torch.OutOfMemoryError: CUDA out of memory ..., RuntimeError: NCCL error ...), Ctrl-C.
_ERROR_LINE = re.compile(r"^(error: |interrupted |([\w.]*\.)?\w*(Error|Exception|Interrupt)\b)")


def failure_reason(rc: int, lines: List[str]) -> str:
    """The last error line of a failed process's output (not torchrun's own wrapper), else its exit code."""
    for line in reversed(lines):
        line = re.sub(r"^\[(rank|default)\d+\]:\s*", "", line.strip())  # torchrun's per-worker prefix
        if _ERROR_LINE.match(line) and "ChildFailedError" not in line:
            return line if len(line) <= 300 else line[:297] + "..."
    return f"killed by signal {-rc}" if rc < 0 else f"exit code {rc}, no error line in the log"


def _call(cmd: List[str], log: Path, label: str, env: Optional[dict] = None, where: str = ""
          ) -> Tuple[int, List[str]]:
    """Run a command with its whole output in ``log`` (progress bars: their last state
    only) and its progress on the board; on failure the log's last lines go to the screen.
    Returns its exit code and the last lines of its output."""
    log.parent.mkdir(parents=True, exist_ok=True)
    _BOARD.start(label)
    _say(f"start {label}{where}  (log: {_rel(log)})")
    tail: List[str] = []
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(shlex.quote(c) for c in cmd)}\n")
        f.flush()
        # text mode reads tqdm's carriage-return refreshes as lines of their own
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT, text=True,
                                bufsize=1, env=env)
        _RUNNING.add(proc)
        bar, done = None, None  # an unfinished bar's last line; the bar (desc, total) last written at 100%
        for line in proc.stdout:
            line = _ANSI.sub("", line.rstrip("\n")).rstrip()
            m = _TQDM.search(line)
            if m:
                _BOARD.update(label, _progress(m, label))
                if m["n"] != m["total"]:
                    bar, done = line.strip(), None
                    continue
                # a bar's final state, once: tqdm repeats it when it closes, with a fresh rate
                if (m["desc"], m["total"]) != done:
                    f.write(line.strip() + "\n")
                    done = (m["desc"], m["total"])
                bar = None
            elif line.strip():
                if bar:  # a bar left unfinished (a failure, or output in the middle of it)
                    f.write(bar + "\n")
                    bar = None
                f.write(line + "\n")
                tail = (tail + [line])[-200:]
            f.flush()
        rc = proc.wait()
        _RUNNING.discard(proc)
        if bar:
            f.write(bar + "\n")
    _ended(label, rc, tail, log)
    return rc, tail


def _ended(label: str, rc: int, tail: List[str], log: Path) -> None:
    """Says that a stage ended: its time, or on failure its log's last lines."""
    took = _BOARD.end(label)
    if rc == 0:
        _say(f"done  {label} in {_duration(took)}")
    else:
        _say(f"FAILED {label} (exit {rc}) after {_duration(took)}; last lines of {_rel(log)}:\n"
             + "\n".join("    " + t for t in tail[-15:]))


def _rel(path: Path) -> str:
    """``path`` relative to the repository when inside it (screen and records stay portable)."""
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def _stats_summary(run_dir: Path) -> dict:
    rows = []
    stats = run_dir / STATS
    if stats.exists():
        rows = [json.loads(line) for line in stats.read_text().splitlines() if line.strip()]
    return {"last": rows[-1] if rows else None, "n_logged": len(rows)}


def _copy_samples(out: Path, dest: Path) -> None:
    """The run's last training sample grid (EMA, fixed noise) -> results/.../samples.png, and its
    training curves (loss, gradient norm, lr per logging window) -> results/.../stats.jsonl."""
    grids = sorted((out / SAMPLES).glob("step_*.png"))
    if grids:
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy2(grids[-1], dest / "samples.png")
    if (out / STATS).exists():
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy2(out / STATS, dest / "stats.jsonl")


def train_run(name: str, profile: str, runs_dir: Path, results_dir: Path, data_dir: Optional[str],
              need_checkpoint: bool = False) -> dict:
    """Train (or resume, or skip) one run; returns its train.json record. ``need_checkpoint``:
    evaluations remain, so a run that results/ records as finished is trained again when its
    checkpoint is not on this machine (runs/ is not in git; training is deterministic)."""
    run = RUNS[name]
    out = runs_dir / profile / name
    record_path = results_dir / profile / name / "train.json"
    previous = json.loads(record_path.read_text()) if record_path.exists() else None
    if (previous and previous["status"] == "finished" and need_checkpoint and not (out / FINAL).exists()):
        _say(f"retrain {name}: results/ record it as finished, but its checkpoint {_rel(out / FINAL)} is not "
             f"on this machine and evaluations remain")
        previous = None
    if previous and previous["status"] in ("finished", "diverged"):
        _say(f"skip  {name} train: {previous['status']} earlier")
        _copy_samples(out, record_path.parent)
        return previous
    if previous and previous["status"] == "failed":
        why = previous.get("reason") or f"exit {previous.get('exit_code')}"
        _say(f"retry {name} train: failed earlier ({why})")
    preset, overrides = run_config_args(run, profile)
    # --download: a dataset that no data dir holds is fetched (online) into the first one
    argv = ["train", "--preset", preset, "--out", str(out), "--download"]
    for o in overrides:
        argv += ["--set", o]
    if data_dir:
        argv += ["--data-dir", data_dir]
    if out.exists():
        argv.append("--resume")
    t0 = time.time()
    ran = _stage(argv, runs_dir / profile / f"{name}.train.log", f"{name} train", gpus_wanted(name, profile))
    rc, elapsed = ran.rc, time.time() - t0
    # diverged: only ddpm's own verdict (a non-finite loss); any other exit is a failure to retry
    status = ("finished" if rc == 0 and (out / FINAL).exists() else
              "diverged" if rc == EXIT_DIVERGED else "failed")
    record = {
        "run": name, "profile": profile, "family": run.family, "note": run.note,
        "preset": preset, "overrides": overrides,
        "data_note": DATA_NOTES.get((profile, run.family), ""),
        "status": status, "exit_code": rc,
        "reason": failure_reason(rc, ran.tail) if status == "failed" else None,
        "gpus": ran.gpus or None, "elapsed_s_this_call": round(elapsed, 1),
        # over every call that got a record (a killed call records nothing: its time is lost here)
        "elapsed_s_total": round(elapsed + ((previous or {}).get("elapsed_s_total") or 0.0), 1),
        "omp_num_threads": (_CHILD_ENV or os.environ).get("OMP_NUM_THREADS"),
        "config": json.loads((out / CONFIG).read_text()) if (out / CONFIG).exists() else None,
        "run_info": json.loads((out / RUN).read_text()) if (out / RUN).exists() else None,
        "stats": _stats_summary(out),
    }
    _write_json(record_path, record)
    _copy_samples(out, record_path.parent)
    if status == "failed":
        raise SystemExit(f"[{profile}/{name}] training failed (exit {rc}: {record['reason']}); it is retried by the "
                         f"next call; see {_rel(runs_dir / profile / (name + '.train.log'))}")
    return record


def gpus_wanted(name: str, profile: str) -> int:
    """GPUs for training run ``name`` at ``profile`` on this machine (0 on a CPU machine), or in
    a Slurm job (--launcher slurm: at most --slurm-gpus-per-node)."""
    n = len(_POOL.ids) if _POOL is not None else _SLURM.gpus_per_node if _SLURM is not None else 0
    return training_gpus(name, profile, n, _GPUS_PER_RUN)


def training_gpus(name: str, profile: str, n_gpus: int, gpus_per_run: Optional[int] = None) -> int:
    """GPUs for training run ``name`` at ``profile`` where ``n_gpus`` are to be had (0: none):
    --gpus-per-run, else the registry's GPUS_PER_RUN, else 1, fitted by gpus_for."""
    if n_gpus <= 0:
        return 0
    run = RUNS[name]
    want = gpus_per_run or GPUS_PER_RUN.get((profile, run.family), 1)
    return gpus_for(get_preset(*run_config_args(run, profile)), want, n_gpus)


# What is copied from an evaluation's folder (under runs/) into results/: small files only,
# never the sample shards or the per-image bound terms.
RESULT_FILES = ("metrics.json", "*.png", "rate_distortion.npz")


def released_run(name: str, profile: str, results_dir: Path, released_dir: Path) -> dict:
    """A released model has nothing to train: its train.json says where its weights are, or
    that they are missing here and how to get them (then its evaluations are skipped)."""
    run = RUNS[name]
    folder = released_dir / run.released
    found = folder.is_dir()
    record = {"run": name, "profile": profile, "family": run.family, "note": run.note, "released": run.released,
              "status": "finished" if found else "missing", "checkpoint": str(folder), "config": None,
              "data_note": "" if found else f"not found at {folder}: where there is internet, "
                                            f"`hf download google/{run.released} --local-dir {folder}`"}
    _say(f"{'found' if found else 'MISSING'} {name}: released weights {'at' if found else 'not at'} {_rel(folder)}")
    _write_json(results_dir / profile / name / "train.json", record)
    return record


def eval_run(name: str, ev: Eval, profile: str, runs_dir: Path, results_dir: Path,
             data_dir: Optional[str], checkpoint: Optional[Path] = None) -> None:
    out = results_dir / profile / name / ev.name
    work = runs_dir / profile / name / f"eval_{ev.name}"
    if _eval_done(results_dir, profile, name, ev.name):
        _say(f"skip  {name} eval {ev.name}: done earlier")
        return
    size = EVAL_SIZE[profile]
    n, metrics, nll_n = eval_size(name, ev, profile)
    ckpt = checkpoint or runs_dir / profile / name / FINAL
    cmd = ["eval", "--checkpoint", str(ckpt), "--metrics", ",".join(metrics) or "none",
           "--n", str(n), "--out", str(work), "--seed", "0", "--reference-split", size["ref_split"],
           "--nll-splits", ",".join(ev.nll_splits(name, profile)), "--batch-size", str(size["batch"])]
    for flag, value in (("--nll-n", nll_n), ("--reference-n", size["ref_n"])):
        if value is not None:
            cmd += [flag, str(value)]
    if size["bf16"]:
        cmd.append("--bf16")
    if ev.var:
        cmd += ["--var", ev.var]
    if ev.sampler != "ancestral":
        cmd += ["--sampler", ev.sampler, "--steps", str(ev.steps)] + (["--eta", str(ev.eta)] if ev.eta else [])
    if not ev.figures:
        cmd.append("--no-figures")
    if data_dir:
        cmd += ["--data-dir", data_dir]
    # one GPU each (sampling and the bound are one process's work)
    ran = _stage(cmd, runs_dir / profile / f"{name}.eval_{ev.name}.log", f"{name} eval {ev.name}", 1)
    if ran.rc != 0:
        raise SystemExit(f"[{profile}/{name}] evaluation {ev.name} failed (exit {ran.rc}: "
                         f"{failure_reason(ran.rc, ran.tail)}); it is retried by the next call")
    _copy_results(work, out)


def _copy_results(src: Path, dst: Path) -> None:
    """An evaluation's RESULT_FILES from ``src`` to ``dst``, metrics.json last: its presence
    marks the evaluation as done. JSON is copied with portable paths (ddpm.provenance)."""
    dst.mkdir(parents=True, exist_ok=True)
    for pattern in RESULT_FILES[::-1]:
        for f in sorted(src.glob(pattern)):
            if f.suffix == ".json":
                _write_json(dst / f.name, json.loads(f.read_text()))
            else:
                shutil.copy2(f, dst / f.name)


def _write_json(path: Path, obj) -> None:
    """A results file: paths made portable, written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(portable(obj), indent=2))


def _reuse(src: str, dst: str, record: dict, profile: str, results_dir: Path) -> None:
    """train.json of a run that reuses ``src``'s training (identical config at this profile)."""
    run = RUNS[dst]
    out = results_dir / profile / dst
    out.mkdir(parents=True, exist_ok=True)
    mine = {**record, "run": dst, "family": run.family, "note": run.note, "same_as": src,
            "data_note": DATA_NOTES.get((profile, run.family), ""), "elapsed_s_this_call": 0.0,
            "elapsed_s_total": 0.0}
    _write_json(out / "train.json", mine)
    if (results_dir / profile / src / "samples.png").exists():
        shutil.copy2(results_dir / profile / src / "samples.png", out / "samples.png")


def default_jobs() -> int:
    """Runs in parallel: one per CPU core on a CPU-only machine (small models use cores
    better as separate single-threaded processes than as threads of one), one per GPU on a
    GPU machine."""
    return len(visible_gpus()) or os.cpu_count() or 1


def run_experiments(names: List[str], profile: str, runs_dir: Path, results_dir: Path,
                    data_dir: Optional[str], jobs: int = 1, progress_every: float = 60.0,
                    released_dir: Optional[Path] = None, gpus: Optional[List[str]] = None,
                    gpus_per_run: Optional[int] = None, plan: bool = False, launcher=None,
                    preflight: bool = False, allow_no_is: bool = False) -> None:
    """Train and evaluate what ``names`` need. ``gpus``: the GPUs to share out (default: every
    visible one; [] runs on the CPU); ``gpus_per_run``: GPUs per training (default: 1, or the
    registry's GPUS_PER_RUN); ``plan``: print the schedule and its GPU-hours, start nothing;
    ``launcher``: an experiments.slurm.SlurmLauncher (each stage a Slurm job; this machine's GPUs
    unused), None: here; ``preflight``: first check what the runs need (experiments.preflight;
    exit 2 if something blocks), ``allow_no_is``: accepting Inception weights without IS."""
    global _CHILD_ENV, _BOARD, _POOL, _GPUS_PER_RUN, _SLURM
    released_dir = Path(released_dir or ROOT / "released")
    gpus = [] if launcher is not None else visible_gpus() if gpus is None else list(gpus)
    _POOL, _GPUS_PER_RUN, _SLURM = (GpuPool(gpus) if gpus else None), gpus_per_run, launcher
    if preflight:
        from .preflight import run_preflight

        # --download, as the trainings get it: a missing MNIST / CIFAR10 is fetched now, not in a day
        rc = run_preflight(names, profile, runs_dir, results_dir, data_dir,
                           n_gpus=launcher.gpus_per_node if launcher is not None else len(gpus),
                           gpus_per_run=gpus_per_run, allow_no_is=allow_no_is, launcher=launcher, download=True)
        if rc:
            raise SystemExit(rc)
    runs = runs_for(names)
    evals = {}  # run -> {eval name: Eval}, shared across experiments
    for e in names:
        for r in EXPERIMENTS[e].runs:
            for ev in EXPERIMENTS[e].evals:
                prev = evals.setdefault(r, {}).setdefault(ev.name, ev)
                assert prev == ev, f"two different evaluations named {ev.name}"
    # fewer-step evaluations with more steps than the profile's T do not apply (smoke: T = 40)
    not_applicable = []
    for r in runs:
        T = get_preset(*run_config_args(RUNS[r], profile)).diffusion.T
        for name, ev in list(evals[r].items()):
            if ev.steps is not None and ev.steps > T:
                not_applicable.append(f"{r} {name}")
                del evals[r][name]
    if not_applicable:
        print(f"not applicable at the {profile} profile (more sampling steps than T): "
              f"{', '.join(not_applicable)}", flush=True)
    # a run whose config at this profile equals an earlier run's is not trained again: it
    # reuses that run's checkpoint and evaluations (e.g. the CelebA-HQ stand-in of small profiles)
    same_as: Dict[str, str] = {}
    by_config: Dict[tuple, str] = {}
    for r in RUNS:  # every run, so that one named alone still finds the run it equals
        preset, overrides = run_config_args(RUNS[r], profile)
        same_as[r] = by_config.setdefault((preset, tuple(overrides), RUNS[r].released), r)
    jobs = max(1, min(jobs, len(runs)))
    if jobs > 1 and "OMP_NUM_THREADS" not in os.environ:
        # share the cores between the parallel runs instead of oversubscribing them
        _CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // jobs))}
    _print_plan(profile, runs, evals, same_as, jobs, runs_dir, results_dir)
    # the costliest runs first (network calls of training and evaluations), so parallel workers
    # finish close together (reusing runs last: they wait for the run they reuse)
    runs = sorted(runs, key=lambda r: (same_as[r] != r, -run_forwards(r, evals[r], profile)))
    if plan:
        _print_schedule(profile, runs, evals, same_as, jobs, runs_dir, results_dir)
        return
    outcome: Dict[str, List[str]] = {r: [] for r in runs}
    t_start = time.time()

    def one_run(r: str) -> None:
        src = same_as[r]
        runs_dir.joinpath(profile).mkdir(parents=True, exist_ok=True)
        # one process at a time per run, also across separate invocations
        with open(runs_dir / profile / f"{src}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if src != r:
                _say(f"reuse {r}: same config as {src} at this profile")
            released = RUNS[r].released and released_dir / RUNS[r].released
            todo = [n for n in evals[r] if not _eval_done(results_dir, profile, src, n)]
            record = (released_run(r, profile, results_dir, released_dir) if released
                      else train_run(src, profile, runs_dir, results_dir, data_dir, need_checkpoint=bool(todo)))
            outcome[r].append(f"train {record['status']}")
            if src != r:
                _reuse(src, r, record, profile, results_dir)
            for ev in evals[r].values():
                if record["status"] != "finished":
                    outcome[r].append(f"{ev.name} skipped")
                    continue
                eval_run(src, ev, profile, runs_dir, results_dir, data_dir, checkpoint=released or None)
                if src != r:
                    _copy_results(results_dir / profile / src / ev.name, results_dir / profile / r / ev.name)
                outcome[r].append(f"{ev.name} done")

    failed = []
    _BOARD = Board(progress_every)
    with _BOARD, ThreadPoolExecutor(jobs) as pool:
        futures = [pool.submit(one_run, r) for r in runs]
        for r, fut in zip(runs, futures):
            try:
                fut.result()
            except SystemExit as e:  # one failed run does not stop the others
                failed.append(f"{r}: {e}")
                outcome[r].append("FAILED")
    print(f"\nsummary ({profile} profile, {_duration(time.time() - t_start)}):", flush=True)
    for r in sorted(outcome):
        print(f"  {r:<20} {', '.join(outcome[r])}", flush=True)
    if failed:
        raise SystemExit("failed:\n  " + "\n  ".join(failed))
    print(f"all {len(names)} experiments done; results in {_rel(results_dir / profile)}/, "
          f"logs in {_rel(runs_dir / profile)}/", flush=True)


def _eval_done(results_dir: Path, profile: str, run: str, name: str) -> bool:
    """An evaluation is done when its metrics.json is in results/ (copied last, see _copy_results)."""
    return (results_dir / profile / run / name / "metrics.json").exists()


def _print_plan(profile, runs, evals, same_as, jobs, runs_dir, results_dir) -> None:
    """What will run, where its output goes, and how long it should take."""
    todo_eval = [(r, e) for r in runs if same_as[r] == r for e in evals[r]
                 if not _eval_done(results_dir, profile, r, e)]
    # to train: not finished, or finished elsewhere (results/ in git) without its checkpoint here
    # while evaluations of it remain (train_run's need_checkpoint)
    todo_train = [r for r in runs if same_as[r] == r and not RUNS[r].released
                  and (not _finished(results_dir / profile / r / "train.json")
                       or (not (runs_dir / profile / r / FINAL).exists() and any(t[0] == r for t in todo_eval)))]
    threads = (_CHILD_ENV or os.environ).get("OMP_NUM_THREADS", "default")
    print(f"plan ({profile} profile): {len(runs)} runs ({len(todo_train)} to train), "
          f"{sum(len(v) for v in evals.values())} evaluations ({len(todo_eval)} to do), "
          f"{jobs} at a time, OMP_NUM_THREADS={threads}", flush=True)
    if _POOL is not None:
        wide = {r: k for r in todo_train if (k := gpus_wanted(r, profile)) > 1}
        print(f"GPUs: {len(_POOL.ids)} ({','.join(_POOL.ids)}); each stage pinned to its own "
              f"(CUDA_VISIBLE_DEVICES), waiting for free ones; one GPU per run"
              + (", except over torchrun: " + ", ".join(f"{r} on {k}" for r, k in wide.items()) if wide else ""),
              flush=True)
    for r in runs:
        note = f"same config as {same_as[r]}: reused" if same_as[r] != r else (
            "released weights, not trained" if RUNS[r].released else
            "trained earlier" if r not in todo_train else
            "to train (again: its checkpoint is not on this machine)" if _finished(results_dir / profile / r / "train.json")
            else "to train")
        print(f"  {r:<20} {note}; evaluations: {', '.join(evals[r])}", flush=True)
    est = EST_SECONDS.get(profile)
    if est and (todo_train or todo_eval):
        # network calls (a training image counts 3: forward and backward) at the measured seconds per
        # call, and a fixed cost per stage (start-up, data, the Inception network)
        cfgs = {r: get_preset(*run_config_args(RUNS[r], profile)) for r in runs if not RUNS[r].released}
        calls = sum(3 * cfgs[r].train.steps * cfgs[r].train.batch_size for r in todo_train)
        calls += sum(eval_forwards(evals[r][e], cfgs[r], profile, r) for r, e in todo_eval if r in cfgs)
        total = (calls * est["per_call"] + (len(todo_train) + len(todo_eval)) * est["per_stage"]) / jobs
        print(f"estimated time: about {_duration(total)} (from the last measured run of this profile on a "
              f"2-core CPU; more on a busier or smaller machine)", flush=True)
    elif todo_train or todo_eval:
        print("estimated time: not measured for this profile (GPU days for the paper's grid; --plan times a "
              "few steps on this machine's GPUs)", flush=True)
    print(f"progress: one line per stage and a status line every so often; complete logs in "
          f"{_rel(runs_dir / profile)}/<run>.*.log; results in {_rel(results_dir / profile)}/", flush=True)


# Evaluation cost in network calls per image: samples x sampler steps, images x T for the bound.
FIGURE_CHAINS = 40  # about: Figs. 6-8 draw this many chains of T steps (ddpm.evaluate.step_figures)
SPLIT_SIZES = {"cifar10": {"test": 10_000, "train": 50_000}, "mnist": {"test": 10_000, "train": 60_000}}


def eval_forwards(ev: Eval, cfg, profile: str, run: str) -> int:
    """Network calls (one image each) of evaluation ``ev`` of run ``run`` (of config ``cfg``) at
    ``profile``."""
    T = cfg.diffusion.T
    samples, metrics, nll_n = eval_size(run, ev, profile)
    n = samples * (ev.steps or T) if set(metrics) & {"fid", "is", "kid"} else 0
    for split in ev.nll_splits(run, profile) if "nll" in metrics else ("test",) if "rd" in metrics else ():
        n += (nll_n or SPLIT_SIZES.get(cfg.data.dataset, {}).get(split, 10_000)) * T
    return n + (FIGURE_CHAINS * T if ev.figures else 0)


def run_forwards(name: str, evals: Dict[str, Eval], profile: str) -> int:
    """About the network calls of run ``name`` at ``profile`` (one image each; a training step of
    an image counts as 3: forward and backward): the order in which runs are started."""
    if RUNS[name].released:
        return sum(eval_forwards(ev, get_preset("cifar10"), profile, name) for ev in evals.values())
    cfg = get_preset(*run_config_args(RUNS[name], profile))
    return 3 * cfg.train.steps * cfg.train.batch_size + sum(eval_forwards(ev, cfg, profile, name)
                                                            for ev in evals.values())


class _Timer:
    """Seconds per training step / per network call, timed once per distinct setting on the
    first GPU (experiments.gpus); None where it ran out of memory."""

    def __init__(self):
        self.cache: Dict[str, Optional[float]] = {}

    def _timed(self, what: str, cfg, k: int, fn) -> Optional[float]:
        d = cfg.to_dict()
        key = json.dumps([what, d["model"], d["data"]["resolution"], d["data"]["channels"], d["diffusion"],
                          d["train"]["batch_size"], d["train"]["microbatch"], d["train"]["bf16"], k], sort_keys=True)
        if key not in self.cache:
            import torch

            try:
                self.cache[key] = fn()
            except torch.cuda.OutOfMemoryError:
                self.cache[key] = None
                torch.cuda.empty_cache()
        return self.cache[key]

    def train(self, cfg, k: int) -> Optional[float]:
        """GPU-seconds per training step over ``k`` GPUs: k x one GPU's step on its share."""
        from .gpus import time_train_step

        s = self._timed("train", cfg, k, lambda: time_train_step(cfg, k))
        return None if s is None else s * k

    def forward(self, cfg) -> Optional[float]:
        from .gpus import time_forward

        return self._timed("forward", cfg, 1, lambda: time_forward(cfg))


def _print_schedule(profile, runs, evals, same_as, jobs, runs_dir, results_dir) -> None:
    """--plan: every stage to do, its GPUs and GPU-hours from steps timed on this machine's first
    GPU, and the schedule the GPU pool gives them, with the expected end; or, without a GPU,
    the step counts. Starts nothing and writes nothing."""
    timer = _Timer() if _POOL is not None else None
    todo: List[Tuple[str, List[Stage]]] = []
    notes: Dict[Tuple[str, str], str] = {}
    print(f"\nthe stages to do ({'timed on this machine: ' + _gpu_name() if timer else 'no GPU here: nothing timed'}):",
          flush=True)
    for r in runs:
        if same_as[r] != r:
            continue
        cfg = get_preset(*run_config_args(RUNS[r], profile))
        stages = []
        if not RUNS[r].released and not _finished(results_dir / profile / r / "train.json"):
            done = (_stats_summary(runs_dir / profile / r)["last"] or {}).get("step", 0)
            steps, k = cfg.train.steps - done, gpus_wanted(r, profile)
            per_step = timer.train(cfg, k) if timer else None
            local = cfg.train.batch_size // max(k, 1)
            mb = cfg.train.microbatch if 0 < cfg.train.microbatch < local else local
            notes[(r, "train")] = (f"{steps:,} steps to go at batch {cfg.train.batch_size}"
                                   + (f" = {k} GPUs x {local}" if k > 1 else "")
                                   + (f" in microbatches of {mb}" if mb < local else "")
                                   + (f", {per_step / k:.3f} s/step" if per_step else
                                      ", OUT OF MEMORY: lower train.microbatch (README, 'On GPUs')" if timer else ""))
            stages.append(Stage("train", max(k, 1), steps * per_step / max(k, 1) if per_step else 0.0))  # wall s
        for name, ev in evals[r].items():
            if _eval_done(results_dir, profile, r, name):
                continue
            calls = eval_forwards(ev, cfg, profile, r)
            per_call = timer.forward(cfg) if timer else None
            notes[(r, f"eval {name}")] = f"{calls:,} network calls" + (
                f", {per_call * 1e3:.3f} ms each" if per_call else ", OUT OF MEMORY" if timer else "")
            stages.append(Stage(f"eval {name}", 1, calls * per_call if per_call else 0.0))
        if stages:
            todo.append((r, stages))
    if timer is None:
        for (r, label), note in notes.items():
            print(f"  {r:<20} {label:<22} {note}", flush=True)
        print(f"--plan: nothing started (no GPU here: the runs would go {jobs} at a time on the CPU)", flush=True)
        return
    slots = simulate(_POOL.ids, todo, jobs)
    for sl in slots:
        gpu_h = (sl.end - sl.start) * len(sl.gpus) / 3600
        print(f"  {sl.run:<20} {sl.label:<22} GPU {','.join(sl.gpus):<16} +{_duration(sl.start)} .. "
              f"+{_duration(sl.end)}  {gpu_h:8.1f} GPU-h  ({notes[(sl.run, sl.label)]})", flush=True)
    total = sum((sl.end - sl.start) * len(sl.gpus) for sl in slots) / 3600
    end = max((sl.end for sl in slots), default=0.0)
    unknown = [f"{r} {label}" for (r, label), note in notes.items() if "OUT OF MEMORY" in note]
    print(f"total: {total:.1f} GPU-hours on {len(_POOL.ids)} GPU(s); expected end if started now: "
          f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(time.time() + end))} (in {_duration(end)})"
          + (f"; not counted (out of memory when timed): {', '.join(unknown)}" if unknown else ""), flush=True)
    print("(GPU-hours: steps x a few steps timed on one GPU x the run's GPUs; the all-reduce between GPUs, "
          "data loading and checkpoints are not timed)", flush=True)
    print("--plan: nothing started", flush=True)


def _gpu_name() -> str:
    import torch

    return f"{torch.cuda.get_device_name(0)} ({torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB)"


def _finished(record: Path) -> bool:
    return record.exists() and json.loads(record.read_text()).get("status") in ("finished", "diverged")


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
                        "one per GPU with GPUs); each gets OMP_NUM_THREADS = cores / jobs unless it is set")
    p.add_argument("--gpus-per-run", type=int, default=None, metavar="K",
                   help="GPUs per training run, over torchrun when K > 1 (default: 1; CelebA-HQ at the paper "
                        "profile: 8); at most the visible GPUs, and a count the batch divides evenly")
    p.add_argument("--plan", action="store_true",
                   help="print the schedule (which stage on which GPUs), GPU-hours from a few steps timed on "
                        "this machine's GPU and the expected end; start nothing")
    p.add_argument("--released-dir", default=str(ROOT / "released"),
                   help="where released models' diffusers folders are (e.g. released/ddpm-cifar10-32)")
    p.add_argument("--progress-every", type=float, default=60.0,
                   help="seconds between status lines of the running stages (0: none)")
    p.add_argument("--preflight", action=argparse.BooleanOptionalAction, default=None,
                   help="check first what the runs need: CUDA and the GPUs, the data, the Inception weights, "
                        "free disk, one training step of each configuration (experiments/preflight.py); exit 2 "
                        "if something blocks (default: at the paper profile, not with --plan)")
    p.add_argument("--allow-no-is", action="store_true",
                   help="preflight: accept Inception weights without logits (no Inception Score) at the paper "
                        "profile; recorded in results/<profile>/preflight.json")
    p.add_argument("--launcher", choices=("local", "slurm"), default="local",
                   help="where each training and evaluation runs: on this machine (default), or as one Slurm "
                        "job each, through submitit (pip install -e '.[slurm]'; experiments/slurm.py)")
    p.add_argument("--slurm-partition", default=None, help="--launcher slurm: the partition (default: the cluster's)")
    p.add_argument("--slurm-account", default=None, help="--launcher slurm: the account to charge")
    p.add_argument("--slurm-time", type=float, default=None, metavar="HOURS",
                   help="--launcher slurm: a job's time limit (default 24); a training at its limit saves, is "
                        "requeued and resumes")
    p.add_argument("--slurm-gpus-per-node", type=int, default=None, metavar="N",
                   help="--launcher slurm: the most GPUs a job asks for (default 8: one node); 0: CPU jobs")
    p.add_argument("--slurm-cpus-per-gpu", type=int, default=None, metavar="N",
                   help="--launcher slurm: CPUs a job asks for per GPU (default 4)")
    args = p.parse_args(argv)
    if args.list:
        for e in EXPERIMENTS.values():
            print(f"{e.name:<16} {e.paper}\n{'':<16} runs: {', '.join(e.runs)}")
        return 0
    profile = args.profile or default_profile()
    names = experiments_for(profile) if args.all else args.experiments
    unknown = [n for n in names if n not in EXPERIMENTS]
    if unknown or not names:
        p.error(f"name experiments ({', '.join(EXPERIMENTS)}) or pass --all" +
                (f"; unknown: {', '.join(unknown)}" if unknown else ""))
    elsewhere = [n for n in names if profile not in EXPERIMENTS[n].profiles]
    if elsewhere:
        p.error(f"{', '.join(elsewhere)}: not an experiment of the {profile} profile (only "
                + "; ".join(f"{n}: {', '.join(EXPERIMENTS[n].profiles)}" for n in elsewhere) + ")")
    if args.gpus_per_run is not None and args.gpus_per_run < 1:
        p.error(f"--gpus-per-run {args.gpus_per_run}: must be at least 1")
    slurm = {k: v for k, v in vars(args).items() if k.startswith("slurm_") and v is not None}
    launcher = None
    if args.launcher == "slurm":
        from .slurm import SlurmError, SlurmLauncher

        if args.profile is None:
            p.error("--launcher slurm: name the profile (--profile paper | quick | smoke); this machine's GPUs "
                    "do not decide it")
        if args.plan:
            p.error("--plan times steps on this machine's GPUs: run it on a GPU node without --launcher slurm")
        try:
            launcher = SlurmLauncher(Path(args.runs_dir) / profile / "slurm",
                                     gpus_per_node=slurm.get("slurm_gpus_per_node", 8),
                                     cpus_per_gpu=slurm.get("slurm_cpus_per_gpu", 4),
                                     hours=slurm.get("slurm_time", 24.0), partition=args.slurm_partition,
                                     account=args.slurm_account)
        except SlurmError as e:
            p.error(str(e))
        launcher.cancel_on_interrupt()  # Ctrl-C cancels the jobs in flight
    elif slurm:
        p.error(f"{', '.join('--' + k.replace('_', '-') for k in slurm)}: only with --launcher slurm")
    preflight = args.preflight if args.preflight is not None else profile == "paper" and not args.plan
    # Slurm queues the jobs: every run is submitted at once
    jobs = args.jobs or (len(RUNS) if launcher is not None else default_jobs())
    run_experiments(names, profile, Path(args.runs_dir), Path(args.results_dir), args.data_dir,
                    jobs=jobs, progress_every=args.progress_every,
                    released_dir=Path(args.released_dir), gpus_per_run=args.gpus_per_run, plan=args.plan,
                    launcher=launcher, preflight=preflight, allow_no_is=args.allow_no_is)
    return 0


if __name__ == "__main__":
    sys.exit(main())
