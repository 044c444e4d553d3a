"""Read results/ (written by experiments.run): the only input of the tables, plots and checks."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional


@dataclass
class RunResult:
    name: str
    profile: str
    train: Dict[str, Any]  # train.json
    evals: Dict[str, Dict[str, Any]]  # eval name -> metrics.json

    @property
    def status(self) -> str:
        return self.train.get("status", "unknown")

    @property
    def outcome(self) -> str:
        """The status, and for a failed training why: 'failed: <its log's last error>'."""
        if self.status == "failed":
            why = self.train.get("reason") or f"exit code {self.train.get('exit_code', '?')}"
            return f"failed: {why}".replace("|", "/")  # a cell of a markdown table
        return self.status

    def metric(self, key: str, eval_name: Optional[str] = None) -> Optional[Dict[str, Any]]:
        """The result dict of ``key`` (fid, is, kid, nll_test, nll_train, rd), from ``eval_name``
        or else from the "main" evaluation, or else the first (by name) that has it."""
        # "main" (the run's own variance) first: other evaluations are ablations of it
        names = [eval_name] if eval_name else sorted(self.evals, key=lambda n: (n != "main", n))
        for n in names:
            r = self.evals.get(n, {}).get("results", {}).get(key)
            if r is not None:
                return r
        return None

    def value(self, key: str, eval_name: Optional[str] = None) -> Optional[float]:
        r = self.metric(key, eval_name)
        return None if r is None else r.get("value")

    def scale(self) -> str:
        """One line that says at what scale this result was obtained."""
        cfg = self.train.get("config") or {}
        info = self.train.get("run_info") or {}
        steps = (self.train.get("stats", {}).get("last") or {}).get("step", cfg.get("train", {}).get("steps"))
        hw = info.get("device_name", "?")
        n_params = info.get("num_params")
        params = f"{n_params / 1e6:.2f}M params" if n_params else "? params"
        return (f"{self.profile} profile: {steps} steps at batch {cfg.get('train', {}).get('batch_size')}, "
                f"{params}, T={cfg.get('diffusion', {}).get('T')}, data {info.get('dataset', '?')} "
                f"({info.get('dataset_size', '?')} images), {hw}")


def load_profile(results_dir, profile: str) -> Dict[str, RunResult]:
    base = Path(results_dir) / profile
    out: Dict[str, RunResult] = {}
    if not base.is_dir():
        return out
    for run_dir in sorted(p for p in base.iterdir() if p.is_dir()):
        tj = run_dir / "train.json"
        if not tj.exists():
            continue
        evals = {}
        for m in sorted(run_dir.glob("*/metrics.json")):
            evals[m.parent.name] = json.loads(m.read_text())
        out[run_dir.name] = RunResult(run_dir.name, profile, json.loads(tj.read_text()), evals)
    return out


def profiles_present(results_dir):
    base = Path(results_dir)
    return [p.name for p in sorted(base.iterdir()) if p.is_dir() and any(p.glob("*/train.json"))] \
        if base.is_dir() else []
