"""Training: the paper's recipe (Sec. 4 and Appendix B), resumable bit for bit.

- Adam (eps from config, 1e-8), learning rate warmed up linearly, gradient-norm
  clipping, EMA of the weights, t ~ Uniform{0..T-1} per example (Algorithm 1). One
  update is ``optimisation_step``, which experiments/benchmark_speed.py times as well.
- Optional bf16 autocast (train.bf16) and torch.compile (train.compile).
- DDP under torchrun: train.batch_size is the GLOBAL batch, split over the ranks;
  backend nccl on CUDA, gloo on CPU; only rank 0 writes. Timesteps, noise and flips
  for the whole global batch come from one generator that every rank advances
  identically (each rank keeps its slice), so a run's result does not depend on the
  number of ranks (up to float summation order); dropout uses per-rank seeds. The
  device, the seeds and the process group: ddpm.runtime.
- Gradient accumulation (train.microbatch): each rank runs its share of the global batch
  in pieces of train.microbatch images and steps once, so a batch too large for a GPU's
  memory (CelebA-HQ 256: batch 64) keeps the paper's global batch; the update is the
  same up to float summation order.
- Exit codes of ``python -m ddpm train``: 0 done, 2 a wrong request (ddpm.cli), 3
  diverged (EXIT_DIVERGED: a non-finite loss), 130 Ctrl-C; anything else is a crash.
- The run directory (its file names, the checks before a run starts or resumes in it,
  and its records: ddpm/rundir.py)::

    OUT/config.json    resolved config, written before training starts
    OUT/run.json       parameter count, world size, device, versions, data dir, command;
                       each --resume appends its own record to "resumes" (nothing is lost)
    OUT/stats.jsonl    every train.log_every steps: loss, loss per quarter of t,
                       grad norm, lr, images/s
    OUT/samples/step_0001000.png   sample grids from the EMA model (fixed noise)
    OUT/last.pt        checkpoint every train.ckpt_every steps and at the end
    OUT/final.pt       the checkpoint at train.steps

  A checkpoint holds the ``TrainState`` (model, EMA, optimizer, step, RNG states: torch,
  CUDA, numpy, python, the batch generator; per rank), each rank's partial ``LossWindow``
  and the data position, plus the resolved config, so ``--resume`` continues with the
  identical data order and randomness: on CPU the final weights equal those of an
  uninterrupted run exactly. ``--resume`` reads the data dir from run.json unless
  --data-dir is given.
- Ctrl-C finishes the current step, saves last.pt and stops (one line says how to
  continue); a second Ctrl-C stops at once. A non-finite loss stops the run before the
  update, keeping the last good checkpoint; it may then be resumed with a lower
  train.lr (the one config change allowed after a divergence; recorded in run.json).
"""

from __future__ import annotations

import contextlib
import copy
import math
import platform
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

import numpy as np
import torch

from .checkpoint import read_checkpoint, rng_from_plain, rng_to_plain, save_checkpoint, state_mismatch
from .config import Config, ConfigError, TrainConfig, build_diffusion, build_model
from .data import batch_stream, load_dataset, resolve_data_dir, to_model_range
from .diffusion import GaussianDiffusion
from .generate import save_grid, to_uint8
from .provenance import git_commit
from .rundir import (FINAL, LAST, RUN, Resume, RunDirError, append_stats, check_run_dir, grid_path,
                     recorded_data_dir, start_run)
from .runtime import Dist, derive_seed, device_description, pick_device, setup_distributed
from .sampling import sample
from .unet import num_params


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient norm; the last good checkpoint is kept."""


# The exit code of `python -m ddpm train` after TrainingDiverged. experiments.run records only
# this code as "diverged" (a result: the paper's "unstable"); any other failure (out of memory,
# an NCCL error, a killed process) is "failed" and retried, never read as instability.
# (2: a wrong request, ddpm.cli; 130: Ctrl-C.)
EXIT_DIVERGED = 3


class NonFiniteLoss(ArithmeticError):
    """optimisation_step found a non-finite loss or gradient norm and applied no update."""

    def __init__(self, loss: float, grad_norm: float):
        super().__init__(f"loss={loss}, grad norm={grad_norm}")
        self.loss, self.grad_norm = loss, grad_norm


# ------------------------------------------------------------------------------ helpers


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


# ------------------------------------------------------------------------ training state


def make_optimizer(model: torch.nn.Module, tc: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    # fused Adam on CUDA: one kernel per step (CPU keeps the default, reference implementation)
    return torch.optim.Adam(model.parameters(), lr=tc.lr, eps=tc.adam_eps,
                            fused=True if device.type == "cuda" else None)


@dataclass
class TrainState:
    """What training changes, hence what a checkpoint holds for a resume to be bit-exact."""
    model: torch.nn.Module
    ema: torch.nn.Module  # the EMA of model's weights: what samples and evaluations use
    opt: torch.optim.Optimizer
    gen: torch.Generator  # t, noise and flips of the global batch: one stream, every rank
    step: int = 0  # updates applied

    @classmethod
    def create(cls, cfg: Config, device: torch.device, rank: int = 0) -> "TrainState":
        """Step 0. The initial weights depend on the seed only (not the rank); the batch
        generator is shared by all ranks; dropout and the rest are seeded per rank."""
        seed = cfg.train.seed
        torch.manual_seed(derive_seed(seed, 0))
        model = build_model(cfg).to(device)
        ema = copy.deepcopy(model).eval().requires_grad_(False)
        torch.manual_seed(derive_seed(seed, 1, rank))
        np.random.seed(derive_seed(seed, 2, rank) % 2 ** 32)
        random.seed(derive_seed(seed, 3, rank))
        gen = torch.Generator(device=device)
        gen.manual_seed(derive_seed(seed, 4))
        return cls(model, ema, make_optimizer(model, cfg.train, device), gen)

    def rng_state(self) -> Dict[str, Any]:
        # Plain data (tensors, lists, numbers), so that the checkpoint loads with weights_only=True.
        return rng_to_plain({"torch": torch.get_rng_state(),
                             "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                             "numpy": np.random.get_state(), "python": random.getstate(),
                             "batch_gen": self.gen.get_state()})

    def set_rng_state(self, s: Dict[str, Any]) -> None:
        s = rng_from_plain(s)
        torch.set_rng_state(s["torch"])
        if s.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(s["cuda"])
        np.random.set_state(s["numpy"])
        random.setstate(s["python"])
        self.gen.set_state(s["batch_gen"])

    def reseed(self, seed: int, rank: int) -> None:
        """Fresh torch and batch streams from (seed, step), for a checkpoint whose saved
        states do not fit this run (another number of processes or device type)."""
        torch.manual_seed(derive_seed(seed, 1, rank, self.step))
        self.gen.manual_seed(derive_seed(seed, 4, self.step))

    def load(self, ckpt: Dict[str, Any]) -> None:
        """Weights, EMA, optimizer and step from a checkpoint (the RNG: set_rng_state or reseed)."""
        self.model.load_state_dict(ckpt["model"])
        self.ema.load_state_dict(ckpt["ema"])
        self.opt.load_state_dict(ckpt["optimizer"])
        self.step = int(ckpt["step"])

    def checkpoint(self, cfg: Config, ranks: List[Dict[str, Any]], device_type: str,
                   dataset_size: int) -> Dict[str, Any]:
        """The checkpoint of this state; ``ranks``: every rank's RNG states (and loss window)."""
        tc = cfg.train
        return {"config": cfg.to_dict(), "step": self.step, "model": self.model.state_dict(),
                "ema": self.ema.state_dict(), "optimizer": self.opt.state_dict(),
                "rng": {"world_size": len(ranks), "device": device_type, "ranks": ranks},
                "data": {"seed": tc.seed, "global_batch": tc.batch_size, "dataset_size": dataset_size,
                         "next_position": self.step * tc.batch_size,
                         "epoch": self.step * tc.batch_size // dataset_size}}


class LossWindow:
    """The sums behind the next stats.jsonl line, on this rank: loss, gradient norm, and the
    per-example loss and example count per quarter of t, over the steps since the last line.
    One float64 tensor, so that DDP adds the ranks' windows in one all_reduce and a checkpoint
    carries it (a resumed run then logs what an uninterrupted one logs); the wall-clock time
    and image count behind images/s are not carried."""

    def __init__(self, T: int, device: torch.device):
        self.sums = torch.zeros(11, device=device, dtype=torch.float64)
        # Named views into self.sums; count = steps x ranks (every rank adds 1 per step).
        self.loss, self.grad_norm, self.count = self.sums[0], self.sums[1], self.sums[2]
        self.quarter_loss, self.quarter_count = self.sums[3:7], self.sums[7:11]
        self.quarter_edges = torch.tensor([T // 4, T // 2, 3 * T // 4], device=device)
        self.seconds, self.images = 0.0, 0

    def add(self, losses: torch.Tensor, grad_norm: torch.Tensor, t: torch.Tensor, seconds: float,
            images: int) -> None:
        q = torch.bucketize(t, self.quarter_edges, right=True)  # t in [T//4, T//2) -> quarter 1, ...
        self.loss.add_(losses.mean().double())
        self.grad_norm.add_(grad_norm.double())
        self.count.add_(1)
        self.quarter_loss.index_add_(0, q, losses.double())
        self.quarter_count.index_add_(0, q, torch.ones_like(losses, dtype=torch.float64))
        self.seconds += seconds
        self.images += images

    @property
    def images_per_s(self) -> float:
        return self.images / max(self.seconds, 1e-9)

    def line(self, d: Dist, step: int, lr: float, epoch: float) -> Dict[str, Any]:
        """The stats.jsonl record of the window, summed over every rank; then an empty window."""
        loss, grad_norm, k, *q = d.sum_(self.sums).tolist()
        rec = {"step": step, "loss": loss / k, "grad_norm": grad_norm / k, "lr": lr,
               "loss_by_t_quarter": [s / c if c else None for s, c in zip(q[:4], q[4:])],
               "images_per_s": self.images_per_s, "epoch": epoch, "time": time.time()}
        self.sums.zero_()
        self.seconds, self.images = 0.0, 0
        return rec


# ------------------------------------------------------------------------------ one update


class StepOutput(NamedTuple):
    losses: torch.Tensor  # per-example loss of this rank's batch (detached)
    grad_norm: torch.Tensor  # the gradient norm before clipping
    loss: float  # the mean loss over the global batch
    lr: float  # the learning rate the update used


def microbatches(batch: int, microbatch: int) -> List[slice]:
    """This rank's batch of ``batch`` examples as the slices train.microbatch cuts it into
    (one slice: the whole batch, when microbatch is 0 or at least ``batch``)."""
    mb = microbatch if 0 < microbatch < batch else batch
    assert batch % mb == 0, (batch, mb)  # checked with a ConfigError before training starts
    return [slice(lo, lo + mb) for lo in range(0, batch, mb)]


def optimisation_step(state: TrainState, net: Callable, diffusion: GaussianDiffusion, x0: torch.Tensor,
                      t: torch.Tensor, noise: torch.Tensor, tc: TrainConfig, d: Optional[Dist] = None
                      ) -> StepOutput:
    """One update of Algorithm 1 on a drawn batch: the loss under bf16 autocast if
    train.bf16, its gradient clipped to norm train.grad_clip, Adam at the warmed-up learning
    rate, then the EMA. ``net`` runs the forward: state.model or a wrapper of it (DDP,
    torch.compile, another library's call convention). A non-finite loss or gradient norm
    on any rank raises NonFiniteLoss on every rank before the optimizer or EMA change.

    Gradient accumulation (train.microbatch): the batch's x0, t and noise were drawn whole,
    then each slice's loss sum / B is backpropagated into the same .grad, so the gradient is
    that of the whole batch's mean loss up to float summation order; one clip, one Adam step.
    (Dropout masks are drawn per slice, so with dropout the update matches only in distribution.)
    Under DDP the ranks' gradients are averaged once, with the last slice (no_sync before)."""
    d = d or Dist()
    B = x0.shape[0]
    state.opt.zero_grad(set_to_none=True)
    parts = microbatches(B, tc.microbatch)
    no_sync = getattr(net, "no_sync", None)  # DDP (also through torch.compile's wrapper)
    losses = []
    for i, sl in enumerate(parts):
        sync = i == len(parts) - 1 or no_sync is None
        with contextlib.nullcontext() if sync else no_sync():
            with torch.autocast(x0.device.type, dtype=torch.bfloat16, enabled=tc.bf16):
                part = diffusion.training_losses(net, x0[sl], t[sl], noise[sl])["loss"].float()
            assert part.shape == (x0[sl].shape[0],), part.shape
            # the whole batch's mean: each of the equal slices adds its mean / number of slices
            # (one slice: exactly losses.mean(), so that runs without microbatches are unchanged bit for bit)
            (part.mean() / len(parts)).backward()
        losses.append(part.detach())
    losses = torch.cat(losses) if len(losses) > 1 else losses[0]
    loss = losses.mean()
    # grad_clip 0: no clipping (the norm is still computed, for the log and the NaN guard)
    grad_norm = torch.nn.utils.clip_grad_norm_(state.model.parameters(),
                                               tc.grad_clip if tc.grad_clip > 0 else math.inf)
    # The global mean loss; summing it over the ranks also makes a non-finite loss on any
    # rank stop every rank. One .tolist(): one device sync per step.
    global_loss = d.sum_(loss.clone()) / d.world_size
    loss_val, norm_val = torch.stack([global_loss, grad_norm.detach().float()]).tolist()
    if not (math.isfinite(loss_val) and math.isfinite(norm_val)):
        raise NonFiniteLoss(loss_val, norm_val)
    lr = warmup_lr(tc.lr, tc.warmup, state.step)
    for group in state.opt.param_groups:
        group["lr"] = lr
    state.opt.step()
    ema_update(state.ema, state.model, tc.ema_decay)
    state.step += 1
    return StepOutput(losses, grad_norm.detach(), loss_val, lr)


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
        check_batch_split(tc=cfg.train, world_size=d.world_size)
        with _CtrlC() as ctrl_c:
            return _train(cfg, out, d, dev, resume, data_dir, download, progress, command, ctrl_c)
    finally:
        d.close()


def check_batch_split(tc: TrainConfig, world_size: int) -> None:
    """ConfigError unless the global batch splits evenly over the processes and each
    process's share into train.microbatch pieces (known only once the processes are)."""
    if tc.batch_size % world_size:
        raise ConfigError(f"train.batch_size={tc.batch_size} (the global batch) must be divisible by the "
                          f"number of processes ({world_size})")
    local = tc.batch_size // world_size
    if 0 < tc.microbatch < local and local % tc.microbatch:
        raise ConfigError(f"train.microbatch={tc.microbatch} must divide the per-process batch "
                          f"(train.batch_size {tc.batch_size} / {world_size} processes = {local})")


@dataclass
class _Run:
    """One call of train(): what the loop needs besides the TrainState."""
    cfg: Config
    out: Path
    d: Dist
    dev: torch.device
    diffusion: GaussianDiffusion
    log: Callable[..., None]
    dataset: Any = None
    n_params: int = 0

    def batch(self, images: torch.Tensor, gen: torch.Generator) -> Tuple[torch.Tensor, ...]:
        """(x0, t, noise) for this rank from its uint8 images: [-1, 1], flipped or not."""
        tc, C, R = self.cfg.train, self.cfg.data.channels, self.cfg.data.resolution
        local = tc.batch_size // self.d.world_size
        lo, hi = self.d.rank * local, (self.d.rank + 1) * local
        x0 = images.to(self.dev, non_blocking=True)
        assert x0.shape == (local, C, R, R) and x0.dtype == torch.uint8, x0.shape
        x0 = to_model_range(x0)
        # One draw for the whole global batch, in a fixed order; this rank keeps [lo, hi),
        # so that the run does not depend on the number of ranks.
        flip = torch.rand(tc.batch_size, device=self.dev, generator=gen)[lo:hi] < 0.5
        t = torch.randint(0, self.diffusion.T, (tc.batch_size,), device=self.dev, generator=gen)[lo:hi]
        noise = torch.randn((tc.batch_size, C, R, R), device=self.dev, generator=gen)[lo:hi]
        if self.cfg.data.hflip:
            x0 = torch.where(flip.view(-1, 1, 1, 1), x0.flip(3), x0)
        return x0, t, noise

    def save(self, state: TrainState, window: LossWindow, names: List[str]) -> None:
        # Every rank's RNG states and partial loss window, so that stats.jsonl continues exactly too.
        ranks = self.d.gather({**state.rng_state(), "log_acc": window.sums.cpu()})
        if self.d.main:
            ckpt = state.checkpoint(self.cfg, ranks, self.dev.type, len(self.dataset))
            for name in names:
                save_checkpoint(self.out / name, ckpt)

    def sample_grid(self, state: TrainState) -> None:
        if not self.d.main:
            return
        C, R = self.cfg.data.channels, self.cfg.data.resolution
        n = 16 if R <= 64 else 8
        g = torch.Generator(device=self.dev)
        g.manual_seed(derive_seed(self.cfg.train.seed, 5))  # the same noise at every step: grids are comparable
        x, _ = sample(self.diffusion, state.ema, (n, C, R, R), generator=g, device=self.dev)
        save_grid(to_uint8(x), grid_path(self.out, state.step), nrow=4)

    def diverged(self, e: NonFiniteLoss, step: int) -> TrainingDiverged:
        """The error for a non-finite loss at ``step``, recorded in stats.jsonl."""
        out = self.out
        last = (f"{out / LAST} (step {read_checkpoint(out / LAST)['step']})"
                if (out / LAST).exists() else "none: no checkpoint was written yet")
        if self.d.main:
            append_stats(out, {"step": step, "event": "nonfinite", "loss": str(e.loss),
                               "grad_norm": str(e.grad_norm)})
        return TrainingDiverged(
            f"non-finite loss at step {step}: loss={e.loss}, grad norm={e.grad_norm}; training stopped "
            f"without applying this update. Last good checkpoint: {last}. Continue with a lower learning "
            f"rate (allowed after a non-finite loss, recorded in {RUN}): python -m ddpm train --out {out} "
            f"--resume --set train.lr={self.cfg.train.lr / 4:g}; or check the data.")


def _train(cfg, out, d: Dist, dev, resume, data_dir, download, progress, command, ctrl_c):
    tc = cfg.train
    log = print if d.main else (lambda *a, **k: None)
    prior = check_run_dir(out, cfg, resume)  # before anything is built: a bad --out fails fast
    if prior.config_changes:
        log(f"resuming after the non-finite loss at step {prior.diverged_at} with "
            + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in sorted(prior.config_changes.items())))
    if prior.checkpoint is not None and prior.checkpoint["step"] >= tc.steps:
        log(f"the run in {out} is already finished: step {prior.checkpoint['step']} of train.steps={tc.steps}; "
            f"nothing to do (to train longer: --resume --set train.steps=MORE)")
        return {"step": prior.checkpoint["step"], "out": str(out), "finished": True, "already_finished": True}
    d.barrier()  # every rank has inspected the folder before rank 0 writes into it

    run = _Run(cfg, out, d, dev, build_diffusion(cfg), log)
    state = TrainState.create(cfg, dev, d.rank)
    window = LossWindow(run.diffusion.T, dev)
    if prior.checkpoint is not None:
        _resume(run, state, window, prior.checkpoint)
    run.n_params = num_params(state.model)
    net = state.model
    if d.world_size > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            state.model, device_ids=[dev.index] if dev.type == "cuda" else None)
    if tc.compile:
        net = torch.compile(net)

    run.dataset, data_dir = _open_data(run, data_dir, resume, download, progress)
    batches = batch_stream(run.dataset, tc.seed, state.step, tc.batch_size, d.rank, d.world_size,
                           cfg.data.num_workers)
    if d.main:  # the run's description, before training starts
        start_run(out, cfg, _run_record(run, data_dir, command, state.step, prior), resume, state.step)
        log(f"training {cfg.data.dataset} ({len(run.dataset):,} images), {run.n_params:,} params, "
            f"global batch {tc.batch_size} over {d.world_size} process(es) on {dev}"
            + (f" in microbatches of {tc.microbatch}" if 0 < tc.microbatch < tc.batch_size // d.world_size else "")
            + ", "
            f"steps {state.step}..{tc.steps} -> {out}")
    d.barrier()

    bar = None
    if d.main and progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=tc.steps, initial=state.step, unit="step", dynamic_ncols=True, desc="train")
    try:
        res = _loop(run, state, net, batches, window, ctrl_c, bar)
    finally:
        if bar is not None:
            bar.close()
    if res["finished"]:
        log(f"done: {out / FINAL} (step {state.step})")
    return res


def _loop(run: _Run, state: TrainState, net, batches, window: LossWindow, ctrl_c: _CtrlC, bar) -> Dict[str, Any]:
    """Train from state.step to train.steps; log, sample and save on schedule."""
    tc, out = run.cfg.train, run.out
    state.model.train()
    ctrl_c.armed = True  # from here on, Ctrl-C means: finish this step, save, stop
    while state.step < tc.steps:
        t0 = time.perf_counter()
        x0, t, noise = run.batch(next(batches), state.gen)
        try:
            upd = optimisation_step(state, net, run.diffusion, x0, t, noise, tc, run.d)
        except NonFiniteLoss as e:  # nothing was updated: the last checkpoint is the last good state
            raise run.diverged(e, state.step + 1) from None
        step = state.step
        window.add(upd.losses, upd.grad_norm, t, time.perf_counter() - t0, tc.batch_size)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{upd.loss:.4f}", img_s=f"{window.images_per_s:.1f}", refresh=False)

        # On schedule, and at the last step whatever the schedule (the run's final record).
        if step % tc.log_every == 0 or step == tc.steps:
            rec = window.line(run.d, step, upd.lr, epoch=step * tc.batch_size / len(run.dataset))
            if run.d.main:
                append_stats(out, rec)
        if step % tc.sample_every == 0 or step == tc.steps:
            run.sample_grid(state)
        if step == tc.steps:
            run.save(state, window, [LAST, FINAL])
        elif step % tc.ckpt_every == 0:
            run.save(state, window, [LAST])
        # Ctrl-C: stop after a whole step, with a checkpoint of it (every rank agrees on when).
        if run.d.any(ctrl_c.requested, run.dev) and step < tc.steps:
            if step % tc.ckpt_every:  # else last.pt of this very step was just written
                run.save(state, window, [LAST])
            return {"step": step, "out": str(out), "finished": False, "interrupted": True,
                    "num_params": run.n_params}
    ctrl_c.armed = False
    return {"step": state.step, "out": str(out), "finished": True, "num_params": run.n_params}


def _resume(run: _Run, state: TrainState, window: LossWindow, ckpt: Dict[str, Any]) -> None:
    """Continue from last.pt: weights, optimizer and step; and, when the checkpoint was
    written by as many processes on the same kind of device, every random stream and the
    partial loss window exactly where they were."""
    tc, d = run.cfg.train, run.d
    bad = state_mismatch(state.model, ckpt["model"])
    if bad:
        raise RunDirError(f"--resume: the weights in {run.out / LAST} do not fit its config ({bad}); "
                          "the checkpoint was not written by this code for this config")
    state.load(ckpt)
    rng = ckpt["rng"]
    if rng["world_size"] == d.world_size and rng["device"] == run.dev.type:
        mine = rng["ranks"][d.rank]
        state.set_rng_state(mine)
        if "log_acc" in mine:
            window.sums.copy_(mine["log_acc"])
    else:
        run.log(f"warning: the checkpoint was written by {rng['world_size']} process(es) on "
                f"{rng['device']}, this run has {d.world_size} on {run.dev.type}: random streams are "
                "reseeded from (seed, step), so the data order is identical but timesteps, noise "
                "and dropout differ from an uninterrupted run")
        state.reseed(tc.seed, d.rank)
    run.log(f"resuming {run.out} from step {state.step} of {tc.steps}")


def _open_data(run: _Run, data_dir, resume: bool, download: bool, progress: bool):
    """(the dataset, the data dir it came from); after the run dir checks: a bad --out fails fast."""
    d = run.d
    if data_dir is None and resume:  # the run's own data dir, so --resume needs no --data-dir
        data_dir = recorded_data_dir(run.out)
        if data_dir:
            run.log(f"data dir {data_dir} (from {run.out / RUN})")
    # With --download only rank 0 downloads; the others wait for it, then read the files.
    # (Multi-node: the data dir must be shared, or filled on every node beforehand.)
    if download and not d.main:
        d.barrier()
    dataset = load_dataset(run.cfg.data, data_dir, download=download and d.main, progress=d.main and progress)
    if download and d.main:
        d.barrier()
    return dataset, data_dir


def _run_record(run: _Run, data_dir, command: Optional[str], step: int, prior: Resume) -> Dict[str, Any]:
    """This call's record in run.json: what ran, on what, from which data and step."""
    dev = run.dev
    record = {
        "num_params": run.n_params, "world_size": run.d.world_size, "device": str(dev),
        "device_name": device_description(dev),
        "torch": torch.__version__, "python": platform.python_version(), "git_commit": git_commit(),
        "dataset": getattr(run.dataset, "name", run.cfg.data.dataset), "dataset_size": len(run.dataset),
        "data_dir": str(resolve_data_dir(data_dir)), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": command or " ".join(sys.argv), "resumed_from_step": step or None,
    }
    if prior.config_changes:
        record.update(config_changes=prior.config_changes, reason=f"non-finite loss at step {prior.diverged_at}")
    return record
