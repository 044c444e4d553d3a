"""Training: the paper's recipe (Sec. 4 and Appendix B), resumable bit for bit.

- Adam (eps from config, 1e-8), learning rate warmed up linearly, gradient-norm
  clipping, EMA of the weights, t ~ Uniform{0..T-1} per example (Algorithm 1).
- Optional bf16 autocast (train.bf16) and torch.compile (train.compile).
- DDP under torchrun: train.batch_size is the GLOBAL batch, split over the ranks;
  backend nccl on CUDA, gloo on CPU; only rank 0 writes. Timesteps, noise and flips
  for the whole global batch come from one generator that every rank advances
  identically (each rank keeps its slice), so a run's result does not depend on the
  number of ranks (up to float summation order); dropout uses per-rank seeds.
- The run directory::

    OUT/config.json    resolved config, written before training starts
    OUT/run.json       parameter count, world size, device, versions, data dir, command;
                       each --resume appends its own record to "resumes" (nothing is lost)
    OUT/stats.jsonl    every train.log_every steps: loss, loss per quarter of t,
                       grad norm, lr, images/s
    OUT/samples/step_0001000.png   sample grids from the EMA model (fixed noise)
    OUT/last.pt        checkpoint every train.ckpt_every steps and at the end
    OUT/final.pt       the checkpoint at train.steps

  A checkpoint holds model, EMA, optimizer, step, RNG states (torch, CUDA, numpy,
  python, the batch generator; per rank) and the data position, plus the resolved
  config, so ``--resume`` continues with the identical data order and randomness:
  on CPU the final weights equal those of an uninterrupted run exactly. ``--resume``
  reads the data dir from run.json unless --data-dir is given.
- Ctrl-C finishes the current step, saves last.pt and stops (one line says how to
  continue); a second Ctrl-C stops at once. A non-finite loss stops the run before the
  update, keeping the last good checkpoint; it may then be resumed with a lower
  train.lr (the one config change allowed after a divergence; recorded in run.json).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import random
import shlex
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch
import torch.distributed as dist

from .checkpoint import (atomic_write_text, git_commit, read_checkpoint, rng_from_plain, rng_to_plain,
                         save_checkpoint, state_mismatch)
from .config import Config, build_diffusion, build_model
from .data import batch_stream, load_dataset, to_model_range
from .unet import num_params

LAST, FINAL, CONFIG, STATS, RUN = "last.pt", "final.pt", "config.json", "stats.jsonl", "run.json"
# Fields that may differ between a run's saved config and the one given on --resume:
# they change how long the run goes and what it writes, not what it computes.
RESUMABLE_CHANGES = {"train.steps", "train.log_every", "train.sample_every", "train.ckpt_every",
                     "data.num_workers"}
# ... and, when the checkpoint resumed from precedes a recorded non-finite loss, these too
# (the advice the divergence message gives must be possible to follow).
AFTER_DIVERGENCE_CHANGES = {"train.lr"}


class RunDirError(RuntimeError):
    """The output folder cannot be used as asked (existing run, nothing to resume, ...)."""


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient norm; the last good checkpoint is kept."""


class DeviceError(ValueError):
    """--device names no device that torch can use here."""


# ------------------------------------------------------------------------------ helpers


def derive_seed(*keys: int) -> int:
    """A 63-bit seed from integer keys (numpy SeedSequence hashing: unrelated streams for
    nearby keys, e.g. per-rank seeds)."""
    a, b = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, dtype=np.uint32)
    return ((int(a) << 31) ^ int(b)) & ((1 << 63) - 1)


def warmup_lr(base_lr: float, warmup: int, step: int) -> float:
    """Learning rate for the update taken after ``step`` completed steps: base * min(step/warmup, 1),
    as the official get_warmed_up_lr (diffusion_tf/utils.py), whose first update has lr 0."""
    return base_lr if warmup <= 0 else base_lr * min(step / warmup, 1.0)


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, every step from step 1 on, no bias correction
    (tf.train.ExponentialMovingAverage without num_updates, as the official code)."""
    # One multi-tensor kernel instead of one launch per parameter (matters on GPUs).
    torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in model.parameters()], 1.0 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    created: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self):
        if self.world_size > 1:
            dist.barrier()


def setup_distributed(device: torch.device) -> Dist:
    """Join the process group that torchrun (or a test) describes in the environment
    (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT); a single process otherwise."""
    ws = int(os.environ.get("WORLD_SIZE", "1"))
    if ws <= 1:
        return Dist()
    created = False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        created = True
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), created)


def pick_device(name: Optional[str]) -> torch.device:
    """The device for ``name`` ('auto' or None: cuda if available, else cpu); DeviceError if
    torch does not know the name or the device is not there."""
    if name in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise DeviceError(f"--device {name!r} is not a device torch knows; use auto, cpu, cuda, cuda:N "
                          "or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {name}: no CUDA GPU is available here (torch.cuda.is_available() "
                              "is False); use --device cpu or auto")
        if dev.index is None:
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        if dev.index >= torch.cuda.device_count():
            raise DeviceError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA "
                              f"device(s), numbered from 0")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise DeviceError(f"--device {name}: MPS is not available here; use --device cpu or auto")
    elif dev.type != "cpu":
        try:
            torch.empty(0, device=dev)
        except Exception as e:  # noqa: BLE001 - any failure means: not usable here
            raise DeviceError(f"--device {name} is not usable here ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}); use --device cpu or auto") from None
    return dev


# ----------------------------------------------------------------------------- run dir


def inspect_run_dir(out: Path) -> Dict[str, Any]:
    """What ``out`` holds: {'kind': 'new'|'run'|'foreign', 'step': int|None, 'finished_step': ...}."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return {"kind": "new"}
    if not out.is_dir():
        return {"kind": "foreign"}
    if not any((out / f).exists() for f in (CONFIG, LAST, FINAL)):
        return {"kind": "foreign"}
    return {"kind": "run", "has_last": (out / LAST).exists(), "has_final": (out / FINAL).exists()}


def _config_diff(a: Dict[str, Any], b: Dict[str, Any]) -> Dict[str, Any]:
    a, b = json.loads(json.dumps(a)), json.loads(json.dumps(b))
    return {f"{s}.{k}": (a[s].get(k), b[s].get(k)) for s in a for k in set(a[s]) | set(b.get(s, {}))
            if a[s].get(k) != b.get(s, {}).get(k)}


def saved_config(out: Path) -> Config:
    """The resolved config of the run in ``out`` (from last.pt if present, else config.json)."""
    from .config import ConfigError

    src = out / LAST if (out / LAST).exists() else out / CONFIG
    if not src.exists():
        raise RunDirError(f"{out} holds no run to resume (no {LAST} or {CONFIG})")
    try:
        d = read_checkpoint(src)["config"] if src.name == LAST else json.loads(src.read_text())
        return Config.from_dict(d)
    except (ConfigError, ValueError) as e:  # json.JSONDecodeError is a ValueError
        raise RunDirError(f"--resume: {src} is not the config of a ddpm run ({e}); {out} is not a run "
                          "this code can continue: choose another --out") from None


def _read_run_json(out: Path) -> Optional[Dict[str, Any]]:
    try:
        rec = json.loads((out / RUN).read_text())
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) else None


def recorded_data_dir(out: Path) -> Optional[str]:
    """The data dir the run in ``out`` used (run.json, its latest call), if it still exists."""
    rec = _read_run_json(Path(out)) or {}
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


class _CtrlC:
    """Ctrl-C (SIGINT) in the training loop (once ``armed``): finish the step, then save and
    stop. A second Ctrl-C, or one before the loop, raises KeyboardInterrupt at once. Only the
    main thread can install a handler; elsewhere Ctrl-C keeps its default behaviour."""

    def __init__(self):
        self.requested, self.armed, self._old = False, False, None

    def _handle(self, signum, frame):
        if self.requested or not self.armed:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
        return False


# ------------------------------------------------------------------------------- RNG


def _rng_state(gen: torch.Generator) -> Dict[str, Any]:
    # Plain data (tensors, lists, numbers), so that the checkpoint loads with weights_only=True.
    return rng_to_plain({"torch": torch.get_rng_state(),
                         "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                         "numpy": np.random.get_state(), "python": random.getstate(),
                         "batch_gen": gen.get_state()})


def _set_rng_state(s: Dict[str, Any], gen: torch.Generator) -> None:
    s = rng_from_plain(s)
    torch.set_rng_state(s["torch"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    gen.set_state(s["batch_gen"])


def _gather(obj, d: Dist):
    if d.world_size == 1:
        return [obj]
    out = [None] * d.world_size
    dist.all_gather_object(out, obj)
    return out


# ------------------------------------------------------------------------------ training


def train(cfg: Config, out_dir, *, resume: bool = False, data_dir=None, download: bool = False,
          device: Optional[str] = None, progress: bool = True, command: Optional[str] = None
          ) -> Dict[str, Any]:
    """Train ``cfg`` into ``out_dir``; returns a summary dict {step, out, finished, ...}.

    ``resume``: continue the run in ``out_dir`` from its last.pt (or start it, if it
    never reached a checkpoint). Without it, a folder that already holds a run is an
    error, never overwritten.
    """
    cfg.validate()
    out = Path(out_dir)
    dev = pick_device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    d = setup_distributed(dev)
    try:
        with _CtrlC() as ctrl_c:
            return _train(cfg, out, d, dev, resume, data_dir, download, progress, command, ctrl_c)
    finally:
        if d.created:
            dist.destroy_process_group()


def _train(cfg, out, d: Dist, dev, resume, data_dir, download, progress, command, ctrl_c):
    tc = cfg.train
    log = print if d.main else (lambda *a, **k: None)

    # --- the run directory: never overwrite a run silently -------------------------------
    state = None
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
    config_changes, diverged = {}, None
    if resume and info["kind"] == "run":
        old = saved_config(out)
        if info["has_last"]:
            state = read_checkpoint(out / LAST)
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
        config_changes = {k: list(v) for k, v in changes.items() if k in AFTER_DIVERGENCE_CHANGES}
        if config_changes:
            log(f"resuming after the non-finite loss at step {diverged} with "
                + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in sorted(config_changes.items())))
        if state is not None:
            if state["step"] >= tc.steps:
                log(f"the run in {out} is already finished: step {state['step']} of "
                    f"train.steps={tc.steps}; nothing to do (to train longer: --resume --set "
                    f"train.steps=MORE)")
                return {"step": state["step"], "out": str(out), "finished": True, "already_finished": True}
    d.barrier()  # every rank has inspected the folder before rank 0 writes into it

    # --- model, EMA, optimizer: the initial weights depend on the seed only (not the rank) ---
    torch.manual_seed(derive_seed(tc.seed, 0))
    diffusion = build_diffusion(cfg)
    model = build_model(cfg).to(dev)
    ema = copy.deepcopy(model).eval().requires_grad_(False)

    # --- seeds: the batch generator is shared by all ranks; dropout etc. per rank -----
    torch.manual_seed(derive_seed(tc.seed, 1, d.rank))
    np.random.seed(derive_seed(tc.seed, 2, d.rank) % 2 ** 32)
    random.seed(derive_seed(tc.seed, 3, d.rank))
    gen = torch.Generator(device=dev)
    gen.manual_seed(derive_seed(tc.seed, 4))
    # fused Adam on CUDA: one kernel per step (CPU keeps the default, reference implementation)
    opt = torch.optim.Adam(model.parameters(), lr=tc.lr, eps=tc.adam_eps,
                           fused=True if dev.type == "cuda" else None)
    step, resumed_rng = 0, None
    if state is not None:
        bad = state_mismatch(model, state["model"])
        if bad:
            raise RunDirError(f"--resume: the weights in {out / LAST} do not fit its config ({bad}); "
                              "the checkpoint was not written by this code for this config")
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        step = int(state["step"])
        rng = state["rng"]
        if rng["world_size"] == d.world_size and rng["device"] == dev.type:
            resumed_rng = rng["ranks"][d.rank]
            _set_rng_state(resumed_rng, gen)
        else:
            log(f"warning: the checkpoint was written by {rng['world_size']} process(es) on "
                f"{rng['device']}, this run has {d.world_size} on {dev.type}: random streams are "
                "reseeded from (seed, step), so the data order is identical but timesteps, noise "
                "and dropout differ from an uninterrupted run")
            torch.manual_seed(derive_seed(tc.seed, 1, d.rank, step))
            gen.manual_seed(derive_seed(tc.seed, 4, step))
        log(f"resuming {out} from step {step} of {tc.steps}")
    n_params = num_params(model)

    net = model
    if d.world_size > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dev.index] if dev.type == "cuda" else None)
    if tc.compile:
        net = torch.compile(net)

    # --- data (after the run dir checks: a bad --out fails fast) -------------------------
    if data_dir is None and resume:  # the run's own data dir, so --resume needs no --data-dir
        data_dir = recorded_data_dir(out)
        if data_dir:
            log(f"data dir {data_dir} (from {out / RUN})")
    # With --download only rank 0 downloads; the others wait for it, then read the files.
    # (Multi-node: the data dir must be shared, or filled on every node beforehand.)
    if download and not d.main:
        d.barrier()
    dataset = load_dataset(cfg.data, data_dir, download=download and d.main, progress=d.main and progress)
    if download and d.main:
        d.barrier()
    batches = batch_stream(dataset, tc.seed, step, tc.batch_size, d.rank, d.world_size,
                           cfg.data.num_workers)
    local = tc.batch_size // d.world_size
    C, R = cfg.data.channels, cfg.data.resolution
    lo, hi = d.rank * local, (d.rank + 1) * local

    # --- write the run's description before training starts ------------------------------
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        for tmp in out.glob("*.tmp"):  # left by a kill during an atomic write
            tmp.unlink()
        atomic_write_text(out / CONFIG, cfg.to_json() + "\n")
        from .data import resolve_data_dir

        record = {
            "num_params": n_params, "world_size": d.world_size, "device": str(dev),
            "device_name": (torch.cuda.get_device_name(dev) if dev.type == "cuda"
                            else f"{platform.machine()} CPU, {os.cpu_count()} cores, {torch.get_num_threads()} threads"),
            "torch": torch.__version__, "python": platform.python_version(), "git_commit": git_commit(),
            "dataset": getattr(dataset, "name", cfg.data.dataset), "dataset_size": len(dataset),
            "data_dir": str(resolve_data_dir(data_dir)), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": command or " ".join(sys.argv), "resumed_from_step": step or None,
        }
        if config_changes:
            record.update(config_changes=config_changes, reason=f"non-finite loss at step {diverged}")
        # The first call's record stays on top; each resume appends its own (nothing is lost).
        first = _read_run_json(out) if resume else None
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
        log(f"training {cfg.data.dataset} ({len(dataset):,} images), {n_params:,} params, "
            f"global batch {tc.batch_size} over {d.world_size} process(es) on {dev}, "
            f"steps {step}..{tc.steps} -> {out}")
    d.barrier()

    def checkpoint(path_names):
        # Per rank: RNG states and the partial log window, so stats.jsonl continues exactly too.
        rng = _gather({**_rng_state(gen), "log_acc": acc.cpu()}, d)
        if not d.main:
            return
        st = {"config": cfg.to_dict(), "step": step, "model": model.state_dict(),
              "ema": ema.state_dict(), "optimizer": opt.state_dict(),
              "rng": {"world_size": d.world_size, "device": dev.type, "ranks": rng},
              "data": {"seed": tc.seed, "global_batch": tc.batch_size, "dataset_size": len(dataset),
                       "next_position": step * tc.batch_size,
                       "epoch": step * tc.batch_size // len(dataset)}}
        for name in path_names:
            save_checkpoint(out / name, st)

    def sample_grid():
        if not d.main:
            return
        from .generate import save_grid, to_uint8
        from .sampling import sample

        n = 16 if R <= 64 else 8
        g = torch.Generator(device=dev)
        g.manual_seed(derive_seed(tc.seed, 5))  # the same noise at every step: grids are comparable
        x, _ = sample(diffusion, ema, (n, C, R, R), generator=g, device=dev)
        save_grid(to_uint8(x), out / "samples" / f"step_{step:07d}.png", nrow=4)

    # --- the loop ------------------------------------------------------------------------
    bar = None
    if d.main and progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=tc.steps, initial=step, unit="step", dynamic_ncols=True, desc="train")
    acc = torch.zeros(11, device=dev, dtype=torch.float64)  # loss, gnorm, n, q_sum[4], q_cnt[4]
    if resumed_rng is not None and "log_acc" in resumed_rng:
        acc.copy_(resumed_rng["log_acc"])
    t_window, n_window, window_steps = 0.0, 0, 0
    model.train()
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=tc.bf16)
    T = diffusion.T
    with torch.no_grad():
        quarter_edges = torch.tensor([T // 4, T // 2, 3 * T // 4], device=dev)
    ctrl_c.armed = True  # from here on, Ctrl-C means: finish this step, save, stop
    while step < tc.steps:
        t0 = time.perf_counter()
        x0 = next(batches).to(dev, non_blocking=True)
        assert x0.shape == (local, C, R, R) and x0.dtype == torch.uint8, x0.shape
        x0 = to_model_range(x0)
        # One draw for the whole global batch, in a fixed order; this rank keeps [lo, hi).
        flip = torch.rand(tc.batch_size, device=dev, generator=gen)[lo:hi] < 0.5
        t = torch.randint(0, T, (tc.batch_size,), device=dev, generator=gen)[lo:hi]
        noise = torch.randn((tc.batch_size, C, R, R), device=dev, generator=gen)[lo:hi]
        if cfg.data.hflip:
            x0 = torch.where(flip.view(-1, 1, 1, 1), x0.flip(3), x0)
        with autocast:
            losses = diffusion.training_losses(net, x0, t, noise)
        loss_b = losses["loss"].float()
        assert loss_b.shape == (local,), loss_b.shape
        loss = loss_b.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        # grad_clip 0: no clipping (the norm is still computed, for the log and the NaN guard)
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip if tc.grad_clip > 0 else math.inf)
        # Global mean loss (also makes a non-finite loss on any rank stop every rank).
        g_loss = loss.detach().clone()
        if d.world_size > 1:
            dist.all_reduce(g_loss)
            g_loss /= d.world_size
        loss_val, gnorm_val = torch.stack([g_loss, gnorm.detach().float()]).tolist()
        if not (math.isfinite(loss_val) and math.isfinite(gnorm_val)):
            if bar is not None:
                bar.close()
            last = (f"{out / LAST} (step {read_checkpoint(out / LAST)['step']})"
                    if (out / LAST).exists() else "none: no checkpoint was written yet")
            msg = (f"non-finite loss at step {step + 1}: loss={loss_val}, grad norm={gnorm_val}; "
                   f"training stopped without applying this update. Last good checkpoint: {last}. "
                   f"Continue with a lower learning rate (allowed after a non-finite loss, recorded in "
                   f"{RUN}): python -m ddpm train --out {out} --resume --set train.lr={tc.lr / 4:g}; "
                   f"or check the data.")
            if d.main:
                with open(out / STATS, "a") as f:
                    f.write(json.dumps({"step": step + 1, "event": "nonfinite", "loss": str(loss_val),
                                        "grad_norm": str(gnorm_val)}) + "\n")
            raise TrainingDiverged(msg)
        lr = warmup_lr(tc.lr, tc.warmup, step)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
        ema_update(ema, model, tc.ema_decay)
        step += 1

        q = torch.bucketize(t, quarter_edges, right=True)
        acc[0] += loss.detach().double()
        acc[1] += gnorm.detach().double()
        acc[2] += 1
        acc[3:7].index_add_(0, q, loss_b.detach().double())
        acc[7:11].index_add_(0, q, torch.ones_like(loss_b, dtype=torch.float64))
        t_window += time.perf_counter() - t0
        n_window += tc.batch_size
        window_steps += 1
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss_val:.4f}", img_s=f"{n_window / max(t_window, 1e-9):.1f}",
                            refresh=False)

        if step % tc.log_every == 0 or step == tc.steps:
            if d.world_size > 1:
                dist.all_reduce(acc)
            a = acc.tolist()
            k = a[2]  # steps x ranks
            rec = {"step": step, "loss": a[0] / k, "grad_norm": a[1] / k, "lr": lr,
                   "loss_by_t_quarter": [s / c if c else None for s, c in zip(a[3:7], a[7:11])],
                   "images_per_s": n_window / max(t_window, 1e-9),
                   "epoch": step * tc.batch_size / len(dataset), "time": time.time()}
            if d.main:
                with open(out / STATS, "a") as f:
                    f.write(json.dumps(rec) + "\n")
            acc.zero_()
            t_window, n_window, window_steps = 0.0, 0, 0
        if step % tc.sample_every == 0 or step == tc.steps:
            sample_grid()
        if step == tc.steps:
            checkpoint([LAST, FINAL])
        elif step % tc.ckpt_every == 0:
            checkpoint([LAST])
        # Ctrl-C: stop after a whole step, with a checkpoint of it (every rank agrees on when).
        stop = ctrl_c.requested
        if d.world_size > 1:
            flag = torch.tensor([float(stop)], device=dev)
            dist.all_reduce(flag)
            stop = flag.item() > 0
        if stop and step < tc.steps:
            if step % tc.ckpt_every:
                checkpoint([LAST])
            if bar is not None:
                bar.close()
            return {"step": step, "out": str(out), "finished": False, "interrupted": True,
                    "num_params": n_params}
    ctrl_c.armed = False
    if bar is not None:
        bar.close()
    log(f"done: {out / FINAL} (step {step})")
    return {"step": step, "out": str(out), "finished": True, "num_params": n_params}


# ---------------------------------------------------------------------------- command line


def add_subcommand(subparsers) -> None:
    from .cli import add_config_args, add_device_arg, add_threads_arg

    p = subparsers.add_parser(
        "train", help="train a model (single process, or DDP under torchrun)",
        description="Train a preset (plus --set overrides) into a run directory. Multi-GPU / "
                    "multi-node: torchrun --nproc_per_node=N -m ddpm train ... (train.batch_size is "
                    "the global batch).")
    add_config_args(p, preset_required=False)
    p.add_argument("--out", help="run directory (required unless --dry-run)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last.pt (config and data dir from the run "
                        "unless --preset / --data-dir are given; --set may extend train.steps, and "
                        "lower train.lr after a non-finite loss)")
    p.add_argument("--data-dir", help="folder holding the data in torchvision's layout, or the "
                                      "parent of data.path (default: $DDPM_DATA_DIR, else ./data; "
                                      "on --resume: the run's)")
    p.add_argument("--download", action="store_true",
                   help="allow torchvision to download MNIST/CIFAR10 into the data dir")
    add_device_arg(p)
    p.add_argument("--dry-run", action="store_true",
                   help="check the config as training would and print it (with num_params) as one JSON "
                        "object; nothing is written")
    add_threads_arg(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")
    p.set_defaults(func=_cmd_train)


def _cmd_train(args: argparse.Namespace) -> int:
    from .cli import UsageError, resolve_config

    if args.resume and not args.preset:
        if not args.out:
            raise UsageError("--resume needs --out (the run directory to continue)")
        try:
            base = saved_config(Path(args.out))
        except RunDirError as e:
            raise UsageError(str(e)) from None
        try:
            from .config import apply_overrides
            cfg = apply_overrides(base, args.overrides)
        except (KeyError, ValueError, TypeError) as e:
            raise UsageError(e.args[0] if e.args else str(e)) from None
    elif not args.preset:
        raise UsageError("train needs --preset NAME (see `python -m ddpm presets`), or --resume --out DIR")
    else:
        cfg = resolve_config(args.preset, args.overrides)
    if args.dry_run:
        print(json.dumps({**cfg.to_dict(), "num_params": num_params(build_model(cfg))}, allow_nan=False))
        return 0
    if not args.out:
        raise UsageError("train needs --out DIR (the run directory)")
    try:
        res = train(cfg, args.out, resume=args.resume, data_dir=args.data_dir, download=args.download,
                    device=args.device, progress=not args.no_progress,
                    command="python -m ddpm " + shlex.join(getattr(args, "argv", sys.argv[1:])))
    except RunDirError as e:
        raise UsageError(str(e)) from None
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if res.get("interrupted"):
        print(f"interrupted (Ctrl-C) at step {res['step']} of {cfg.train.steps}: saved "
              f"{Path(args.out) / LAST}; continue with: python -m ddpm train --out {args.out} --resume",
              file=sys.stderr)
        return 130
    return 0 if res.get("finished") else 1
