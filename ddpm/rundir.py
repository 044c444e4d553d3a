"""A training run's directory: its file names, the checks before a run starts or resumes
in it, and the records written into it (training, experiments and analysis read them)::

    OUT/config.json    resolved config, written before training starts
    OUT/run.json       parameter count, world size, device, versions, data dir, command;
                       each --resume appends its own record to "resumes" (nothing is lost)
    OUT/stats.jsonl    one line every train.log_every steps (and events: a non-finite loss)
    OUT/samples/step_0001000.png   sample grids from the EMA model (fixed noise)
    OUT/last.pt        checkpoint every train.ckpt_every steps and at the end
    OUT/final.pt       the checkpoint at train.steps

A folder that holds a run is never overwritten: starting a run needs a new or empty
folder, continuing one needs --resume and a config that differs from the run's only in
RESUMABLE_CHANGES (plus train.lr, when the checkpoint resumed from precedes a recorded
non-finite loss).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from .checkpoint import read_checkpoint
from .config import Config, ConfigError
from .provenance import atomic_write_text

LAST, FINAL, CONFIG, STATS, RUN, SAMPLES = "last.pt", "final.pt", "config.json", "stats.jsonl", "run.json", "samples"
# Fields that may differ between a run's saved config and the one given on --resume:
# they change how long the run goes and what it writes, not what it computes (train.microbatch:
# only the float summation order, so that a run may move to a GPU with less memory).
# (How long and how often, and how the same update is computed: microbatches, memory layout
# and data placement change float rounding, and with dropout microbatches and channels_last
# also draw other dropout masks; the run continues in distribution, the change recorded.)
RESUMABLE_CHANGES = {"train.steps", "train.log_every", "train.sample_every", "train.ckpt_every",
                     "data.num_workers", "train.microbatch", "train.channels_last", "data.on_device"}
# ... and, when the checkpoint resumed from precedes a recorded non-finite loss, these too
# (the advice the divergence message gives must be possible to follow).
AFTER_DIVERGENCE_CHANGES = {"train.lr"}


class RunDirError(RuntimeError):
    """The output folder cannot be used as asked (existing run, nothing to resume, ...)."""


def grid_path(out: Path, step: int) -> Path:
    return out / SAMPLES / f"step_{step:07d}.png"


# --------------------------------------------------------------------------- reading


def inspect_run_dir(out: Path) -> Dict[str, Any]:
    """What ``out`` holds: {'kind': 'new'|'run'|'foreign', 'has_last': bool, 'has_final': bool}."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return {"kind": "new"}
    if not out.is_dir():
        return {"kind": "foreign"}
    if not any((out / f).exists() for f in (CONFIG, LAST, FINAL)):
        return {"kind": "foreign"}
    return {"kind": "run", "has_last": (out / LAST).exists(), "has_final": (out / FINAL).exists()}


def saved_config(out: Path, checkpoint: Optional[Dict[str, Any]] = None) -> Config:
    """The resolved config of the run in ``out``: from ``checkpoint`` (its last.pt, already
    read) if given, else from last.pt if present, else from config.json."""
    src = out / LAST if checkpoint is not None or (out / LAST).exists() else out / CONFIG
    if not src.exists():
        raise RunDirError(f"{out} holds no run to resume (no {LAST} or {CONFIG})")
    try:
        if src.name == LAST:
            d = (checkpoint if checkpoint is not None else read_checkpoint(src))["config"]
        else:
            d = json.loads(src.read_text())
        return Config.from_dict(d)
    except (ConfigError, ValueError) as e:  # json.JSONDecodeError is a ValueError
        raise RunDirError(f"--resume: {src} is not the config of a ddpm run ({e}); {out} is not a run "
                          "this code can continue: choose another --out") from None


def read_run_json(out: Path) -> Optional[Dict[str, Any]]:
    try:
        rec = json.loads((out / RUN).read_text())
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) else None


def recorded_data_dir(out: Path) -> Optional[str]:
    """The data dir the run in ``out`` used (run.json, its latest call), if it still exists."""
    rec = read_run_json(Path(out)) or {}
    calls = [rec, *[r for r in rec.get("resumes", []) if isinstance(r, dict)]]
    dirs = [c.get("data_dir") for c in calls if c.get("data_dir")]
    return dirs[-1] if dirs and Path(dirs[-1]).is_dir() else None


def diverged_after(out: Path, step: int) -> Optional[int]:
    """The step of a non-finite loss recorded in stats.jsonl after checkpoint step ``step``
    (the divergence a --resume from that checkpoint retries), else None."""
    try:
        lines = (out / STATS).read_text().splitlines()
    except OSError:
        return None
    hits = [rec.get("step", 0) for rec in (json.loads(ln) for ln in lines if ln.strip())
            if rec.get("event") == "nonfinite" and rec.get("step", 0) > step]
    return hits[-1] if hits else None


def _config_diff(a: Dict[str, Any], b: Dict[str, Any]) -> Dict[str, Any]:
    a, b = json.loads(json.dumps(a)), json.loads(json.dumps(b))
    return {f"{s}.{k}": (a[s].get(k), b[s].get(k)) for s in a for k in set(a[s]) | set(b.get(s, {}))
            if a[s].get(k) != b.get(s, {}).get(k)}


# ------------------------------------------------------------------ before a run starts


@dataclass
class Resume:
    """What the run directory gives the run about to start in it."""
    checkpoint: Optional[Dict[str, Any]] = None  # last.pt, read; None: start from step 0
    diverged_at: Optional[int] = None  # a non-finite loss recorded after that checkpoint
    config_changes: Dict[str, List[Any]] = field(default_factory=dict)  # key -> [run's, now]

    @property
    def after_divergence(self) -> bool:
        """Whether this resume changes what a non-finite loss allowed to change (train.lr)."""
        return self.diverged_at is not None and bool(AFTER_DIVERGENCE_CHANGES & set(self.config_changes))


def check_run_dir(out: Path, cfg: Config, resume: bool) -> Resume:
    """May ``cfg`` start (``resume`` False) or continue (True) a run in ``out``? RunDirError
    if not, saying why; nothing in ``out`` is changed either way."""
    info = inspect_run_dir(out)
    if info["kind"] == "foreign":
        raise RunDirError(f"--out {out} exists and holds files that are not a ddpm run; "
                          "choose another --out (nothing is overwritten)")
    if info["kind"] == "run" and not resume:
        what = "a finished run" if info["has_final"] else "a run"
        raise RunDirError(f"--out {out} already holds {what}; pass --resume to continue it, or choose "
                          "another --out (nothing is overwritten)")
    if resume and info["kind"] == "new":
        raise RunDirError(f"--resume: {out} holds no run to resume; drop --resume to start one")
    if info["kind"] == "new":
        return Resume()
    # A run that died before its first checkpoint restarts from step 0 under its own config.
    state = read_checkpoint(out / LAST) if info["has_last"] else None
    old = saved_config(out, state)
    diverged = diverged_after(out, int(state["step"]) if state is not None else 0)
    allowed = RESUMABLE_CHANGES | (AFTER_DIVERGENCE_CHANGES if diverged else set())
    changes = _config_diff(old.to_dict(), cfg.to_dict())
    diff = {k: v for k, v in changes.items() if k not in allowed}
    if diff:
        raise RunDirError(
            f"--resume: the config differs from the run's in {out} in "
            + ", ".join(f"{k} (run: {a!r}, now: {b!r})" for k, (a, b) in sorted(diff.items()))
            + f"; only {', '.join(sorted(RESUMABLE_CHANGES))} may change on resume (and "
            + f"{', '.join(sorted(AFTER_DIVERGENCE_CHANGES))} after a non-finite loss)")
    return Resume(state, diverged, {k: list(v) for k, v in changes.items()})


# --------------------------------------------------------------------------- writing


def start_run(out: Path, cfg: Config, record: Dict[str, Any], resume: bool, step: int) -> None:
    """Describe the run before it trains: config.json, this call's record in run.json, and
    stats.jsonl cut back to ``step`` (the checkpoint the run continues from)."""
    out.mkdir(parents=True, exist_ok=True)
    for tmp in out.glob("*.tmp"):  # left by a kill during an atomic write
        tmp.unlink()
    atomic_write_text(out / CONFIG, cfg.to_json() + "\n")
    # The first call's record stays on top; each resume appends its own (nothing is lost).
    first = read_run_json(out) if resume else None
    if first is not None:
        record = {**first, "resumes": [*first.get("resumes", []), record]}
    atomic_write_text(out / RUN, json.dumps(record, indent=2) + "\n")
    # A resumed run may have logged past its last checkpoint before it died: drop those
    # (events such as a non-finite loss stay: they are the run's history).
    stats_path = out / STATS
    if stats_path.exists():
        keep = [ln for ln in stats_path.read_text().splitlines()
                if ln.strip() and (json.loads(ln).get("step", 0) <= step or "event" in json.loads(ln))]
        atomic_write_text(stats_path, "".join(ln + "\n" for ln in keep))


def append_stats(out: Path, record: Dict[str, Any]) -> None:
    with open(out / STATS, "a") as f:
        f.write(json.dumps(record) + "\n")
