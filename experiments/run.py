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
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional

from ddpm.config import get_preset
from ddpm.provenance import atomic_write_text, portable
from ddpm.rundir import CONFIG, FINAL, RUN, SAMPLES, STATS

from .registry import DATA_NOTES, EST_SECONDS, EVAL_SIZE, EXPERIMENTS, experiments_for, PROFILES, RUNS, Eval, run_config_args, runs_for

ROOT = Path(__file__).resolve().parents[1]


def default_profile() -> str:
    import torch

    return "paper" if torch.cuda.is_available() else "quick"


# Set by run_experiments: the environment of the ddpm processes (their CPU threads).
_CHILD_ENV: Optional[dict] = None
_PRINT_LOCK = threading.Lock()
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


def _call(cmd: List[str], log: Path, label: str) -> int:
    """Run a ddpm command with its whole output in ``log`` (progress bars: their last state
    only) and its progress on the board; on failure the log's last lines go to the screen."""
    log.parent.mkdir(parents=True, exist_ok=True)
    _BOARD.start(label)
    _say(f"start {label}  (log: {_rel(log)})")
    tail: List[str] = []
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(shlex.quote(c) for c in cmd)}\n")
        f.flush()
        # text mode reads tqdm's carriage-return refreshes as lines of their own
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT, text=True,
                                bufsize=1, env=_CHILD_ENV)
        bar, last = None, None
        for line in proc.stdout:
            line = _ANSI.sub("", line.rstrip("\n")).rstrip()
            m = _TQDM.search(line)
            if m:
                _BOARD.update(label, _progress(m, label))
                bar = line.strip()
                if m["n"] != m["total"]:
                    continue
            elif not line.strip():
                continue
            if bar and bar != last:  # a bar's last state (tqdm repeats it when it closes)
                f.write(bar + "\n")
                last = bar
            bar = None
            if not m:
                f.write(line + "\n")
                tail = (tail + [line])[-15:]
            f.flush()
        rc = proc.wait()
        if bar and bar != last:
            f.write(bar + "\n")
    took = _BOARD.end(label)
    if rc == 0:
        _say(f"done  {label} in {_duration(took)}")
    else:
        _say(f"FAILED {label} (exit {rc}) after {_duration(took)}; last lines of {_rel(log)}:\n"
             + "\n".join("    " + t for t in tail))
    return rc


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
    """The run's last training sample grid (EMA, fixed noise) -> results/.../samples.png."""
    grids = sorted((out / SAMPLES).glob("step_*.png"))
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
        _say(f"skip  {name} train: {previous['status']} earlier")
        _copy_samples(out, record_path.parent)
        return previous
    preset, overrides = run_config_args(run, profile)
    # --download: a dataset that no data dir holds is fetched (online) into the first one
    cmd = [sys.executable, "-m", "ddpm", "train", "--preset", preset, "--out", str(out), "--download"]
    for o in overrides:
        cmd += ["--set", o]
    if data_dir:
        cmd += ["--data-dir", data_dir]
    if out.exists():
        cmd.append("--resume")
    t0 = time.time()
    rc = _call(cmd, runs_dir / profile / f"{name}.train.log", f"{name} train")
    elapsed = time.time() - t0
    status = "finished" if rc == 0 and (out / FINAL).exists() else ("diverged" if rc == 1 else "failed")
    record = {
        "run": name, "profile": profile, "family": run.family, "note": run.note,
        "preset": preset, "overrides": overrides,
        "data_note": DATA_NOTES.get((profile, run.family), ""),
        "status": status, "exit_code": rc, "elapsed_s_this_call": round(elapsed, 1),
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
        raise SystemExit(f"[{profile}/{name}] training failed (exit {rc}); see {runs_dir / profile / (name + '.train.log')}")
    return record


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
    if (out / "metrics.json").exists():
        _say(f"skip  {name} eval {ev.name}: done earlier")
        return
    size = EVAL_SIZE[profile]
    ckpt = checkpoint or runs_dir / profile / name / FINAL
    cmd = [sys.executable, "-m", "ddpm", "eval", "--checkpoint", str(ckpt), "--metrics", ",".join(ev.metrics) or "none",
           "--n", str(size["n"]), "--out", str(work), "--seed", "0"]
    for flag, key in (("--nll-n", "nll_n"), ("--reference-n", "ref_n")):
        if size[key] is not None:
            cmd += [flag, str(size[key])]
    if ev.var:
        cmd += ["--var", ev.var]
    if ev.sampler != "ancestral":
        cmd += ["--sampler", ev.sampler, "--steps", str(ev.steps)] + (["--eta", str(ev.eta)] if ev.eta else [])
    if not ev.figures:
        cmd.append("--no-figures")
    if data_dir:
        cmd += ["--data-dir", data_dir]
    rc = _call(cmd, runs_dir / profile / f"{name}.eval_{ev.name}.log", f"{name} eval {ev.name}")
    if rc != 0:
        raise SystemExit(f"[{profile}/{name}] evaluation {ev.name} failed (exit {rc})")
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
    better as separate single-threaded processes than as threads of one), one on a GPU."""
    import torch

    return 1 if torch.cuda.is_available() else (os.cpu_count() or 1)


def run_experiments(names: List[str], profile: str, runs_dir: Path, results_dir: Path,
                    data_dir: Optional[str], jobs: int = 1, progress_every: float = 60.0,
                    released_dir: Optional[Path] = None) -> None:
    global _CHILD_ENV, _BOARD
    released_dir = Path(released_dir or ROOT / "released")
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
            record = (released_run(r, profile, results_dir, released_dir) if released
                      else train_run(src, profile, runs_dir, results_dir, data_dir))
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

    # the runs with the most evaluations first, so parallel workers finish close together
    # (reusing runs last: they wait for the run they reuse)
    runs = sorted(runs, key=lambda r: (same_as[r] != r, -len(evals[r])))
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


def _print_plan(profile, runs, evals, same_as, jobs, runs_dir, results_dir) -> None:
    """What will run, where its output goes, and how long it should take."""
    todo_train = [r for r in runs if same_as[r] == r and not RUNS[r].released
                  and not _finished(results_dir / profile / r / "train.json")]
    todo_eval = [(r, e) for r in runs if same_as[r] == r for e in evals[r]
                 if not (results_dir / profile / r / e / "metrics.json").exists()]
    threads = (_CHILD_ENV or os.environ).get("OMP_NUM_THREADS", "default")
    print(f"plan ({profile} profile): {len(runs)} runs ({len(todo_train)} to train), "
          f"{sum(len(v) for v in evals.values())} evaluations ({len(todo_eval)} to do), "
          f"{jobs} at a time, OMP_NUM_THREADS={threads}", flush=True)
    for r in runs:
        note = f"same config as {same_as[r]}: reused" if same_as[r] != r else (
            "released weights, not trained" if RUNS[r].released else
            "trained earlier" if r not in todo_train else "to train")
        print(f"  {r:<20} {note}; evaluations: {', '.join(evals[r])}", flush=True)
    est = EST_SECONDS.get(profile)
    if est and (todo_train or todo_eval):
        total = (len(todo_train) * est["train"] + len(todo_eval) * est["eval"]) / jobs
        print(f"estimated time: about {_duration(total)} (from the last measured run of this profile on a "
              f"2-core CPU; more on a busier or smaller machine)", flush=True)
    elif todo_train or todo_eval:
        print("estimated time: not measured for this profile (GPU days for the paper's grid)", flush=True)
    print(f"progress: one line per stage and a status line every so often; complete logs in "
          f"{_rel(runs_dir / profile)}/<run>.*.log; results in {_rel(results_dir / profile)}/", flush=True)


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
                        "1 with a GPU); each gets OMP_NUM_THREADS = cores / jobs unless it is set")
    p.add_argument("--released-dir", default=str(ROOT / "released"),
                   help="where released models' diffusers folders are (e.g. released/ddpm-cifar10-32)")
    p.add_argument("--progress-every", type=float, default=60.0,
                   help="seconds between status lines of the running stages (0: none)")
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
    run_experiments(names, profile, Path(args.runs_dir), Path(args.results_dir), args.data_dir,
                    jobs=args.jobs or default_jobs(), progress_every=args.progress_every,
                    released_dir=Path(args.released_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
