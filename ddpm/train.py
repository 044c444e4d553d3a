"""Training: the paper's recipe (Sec. 4 and Appendix B), resumable bit for bit.

- Adam (eps from config, 1e-8), learning rate warmed up linearly, gradient-norm
  clipping, EMA of the weights, t ~ Uniform{0..T-1} per example (Algorithm 1). One
  update is ``optimisation_step``, which experiments/benchmark_speed.py times as well.
- Optional bf16 autocast (train.bf16), channels_last memory format for the network and its
  batches (train.channels_last; checkpoints stay contiguous) and torch.compile (train.compile).
  On CUDA, cudnn.benchmark is on while ``train`` runs (every batch has the same shape, so the
  fastest convolution algorithms are picked once); a process setting, not part of the config.
- No device read per step (on a GPU each one stalls the queue of launched kernels): the loop
  reads the device, once, only at check points: every train.log_every steps, before each
  checkpoint and sample grid, and at the last step. In between the non-finite guard lives on
  the device (``NonFiniteGuard``), and the progress bar shows the loss read at the last one.
  data.on_device keeps an in-memory training set (CIFAR10) on the GPU, batches gathered there.
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
  continue); a second Ctrl-C stops at once. (Under DDP the ranks agree on it at the next
  check point.) A non-finite loss or gradient norm is found at the next check point: the run
  stops there (TrainingDiverged, on every rank) naming the FIRST non-finite step; the updates
  from that step on were applied in memory but nothing after it is saved (no checkpoint, no
  sample grid, no stats.jsonl line of a window holding it), so last.pt is the last good state.
  The run may then be resumed with a lower train.lr (the one config change allowed after a
  divergence; recorded in run.json).
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
from .runtime import Dist, cudnn_benchmark, derive_seed, device_description, pick_device, setup_distributed
from .sampling import sample
from .unet import num_params


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient norm; nothing after it was saved: last.pt is the last good state."""


# The exit code of `python -m ddpm train` after TrainingDiverged. experiments.run records only
# this code as "diverged" (a result: the paper's "unstable"); any other failure (out of memory,
# an NCCL error, a killed process) is "failed" and retried, never read as instability.
# (2: a wrong request, ddpm.cli; 130: Ctrl-C.)
EXIT_DIVERGED = 3


class NonFinite(NamedTuple):
    """The first step whose global loss or gradient norm was not finite, as the guard recorded it."""
    step: int
    loss: float
    grad_norm: float


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
        self.notice: Optional[str] = None  # said at the first Ctrl-C, if set

    def _handle(self, signum, frame):
        if self.requested or not self.armed:
            raise KeyboardInterrupt
        self.requested = True
        if self.notice:  # where the stop may take a while (several processes: the next check point)
            print(self.notice, file=sys.stderr, flush=True)

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
        return {"config": cfg.to_dict(), "step": self.step, "model": contiguous(self.model.state_dict()),
                "ema": contiguous(self.ema.state_dict()), "optimizer": contiguous(self.opt.state_dict()),
                "rng": {"world_size": len(ranks), "device": device_type, "ranks": ranks},
                "data": {"seed": tc.seed, "global_batch": tc.batch_size, "dataset_size": dataset_size,
                         "next_position": self.step * tc.batch_size,
                         "epoch": self.step * tc.batch_size // dataset_size}}


def contiguous(obj: Any) -> Any:
    """``obj`` (a state dict, nested) with every tensor in the ordinary memory format, so that
    a train.channels_last run's checkpoint is like any other. Tensors already contiguous are
    returned as they are (no copy): other runs' checkpoints are unchanged."""
    if isinstance(obj, torch.Tensor):
        return obj.contiguous()
    if isinstance(obj, (dict, list)):
        keys = obj.keys() if isinstance(obj, dict) else range(len(obj))
        new = {k: contiguous(obj[k]) for k in keys}
        if all(new[k] is obj[k] for k in keys):
            return obj
        obj = copy.copy(obj)  # the same type and attributes (a state dict's _metadata); never the live state
        for k, v in new.items():
            obj[k] = v
    return obj


def to_channels_last(state: TrainState) -> None:
    """train.channels_last: the network, its EMA and Adam's moments in channels_last format, in
    place (the parameters stay the same objects, so the optimizer keeps them)."""
    state.model.to(memory_format=torch.channels_last)
    state.ema.to(memory_format=torch.channels_last)
    for per_param in state.opt.state.values():  # moments loaded from a (contiguous) checkpoint
        for k, v in per_param.items():
            if isinstance(v, torch.Tensor) and v.dim() == 4:
                per_param[k] = v.contiguous(memory_format=torch.channels_last)


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

    def add(self, losses: torch.Tensor, grad_norm: torch.Tensor, t: torch.Tensor, images: int) -> None:
        """One step's numbers (on the device; no read). Its time is added at check points (``seconds``):
        only a read of the device tells when the GPU has done the work launched."""
        q = torch.bucketize(t, self.quarter_edges, right=True)  # t in [T//4, T//2) -> quarter 1, ...
        self.loss.add_(losses.mean().double())
        self.grad_norm.add_(grad_norm.double())
        self.count.add_(1)
        self.quarter_loss.index_add_(0, q, losses.double())
        self.quarter_count.index_add_(0, q, torch.ones_like(losses, dtype=torch.float64))
        self.images += images

    @property
    def images_per_s(self) -> float:
        return self.images / max(self.seconds, 1e-9)

    def line(self, d: Dist, step: int, lr: float, epoch: float, sums: Optional[List[float]] = None
             ) -> Dict[str, Any]:
        """The stats.jsonl record of the window, summed over every rank; then an empty window.
        ``sums``: self.sums summed over the ranks and already read (by the loop's check point,
        together with what else it reads: one device read)."""
        loss, grad_norm, k, *q = d.sum_(self.sums).tolist() if sums is None else sums
        rec = {"step": step, "loss": loss / k, "grad_norm": grad_norm / k, "lr": lr,
               "loss_by_t_quarter": [s / c if c else None for s, c in zip(q[:4], q[4:])],
               "images_per_s": self.images_per_s, "epoch": epoch, "time": time.time()}
        self.sums.zero_()
        self.seconds, self.images = 0.0, 0
        return rec


class NonFiniteGuard:
    """The first non-finite step, recorded on the device; the loop reads it at check points only.

    Each step adds its global mean loss and gradient norm, both the same on every rank (the loss
    is summed over the ranks, the norm is that of the averaged gradients), so every rank finds
    the same first bad step and raises at the same check point. Reading them every step instead
    would stall a GPU's queue of launched kernels every step. One float64 tensor (exact for step
    numbers): [steps done, the last step's loss, the first non-finite step (0: none), its loss,
    its grad norm]."""

    def __init__(self, step: int, device: torch.device):
        self.rec = torch.tensor([step, math.nan, 0, math.nan, math.nan], dtype=torch.float64, device=device)

    def add(self, loss: torch.Tensor, grad_norm: torch.Tensor, finite: torch.Tensor) -> None:
        r = self.rec
        r[0].add_(1)
        r[1].copy_(loss)
        first = ~finite & (r[2] == 0)
        r[2:].copy_(torch.where(first, torch.stack([r[0], r[1], grad_norm.double()]), r[2:]))

    @staticmethod
    def first(rec: List[float]) -> Optional[NonFinite]:
        """The first non-finite step in ``rec`` (the record, read), or None."""
        return NonFinite(int(rec[2]), rec[3], rec[4]) if rec[2] else None


# ------------------------------------------------------------------------------ one update


class StepOutput(NamedTuple):
    losses: torch.Tensor  # per-example loss of this rank's batch (detached)
    grad_norm: torch.Tensor  # the gradient norm before clipping
    loss: torch.Tensor  # the mean loss over the global batch (on the device: no read)
    finite: torch.Tensor  # whether loss and grad_norm are finite (bool, on the device; the same on every rank)
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
    torch.compile, another library's call convention). The update is applied whatever the loss:
    nothing here reads the device (a read would stall a GPU every step); ``finite`` says, on the
    device and alike on every rank, whether the global loss and the gradient norm were finite,
    and the training loop's NonFiniteGuard acts on it.

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
    # rank seen by every rank (the gradient norm is alike on every rank already). No read.
    global_loss = d.sum_(loss.clone()) / d.world_size
    grad_norm = grad_norm.detach()
    finite = torch.isfinite(global_loss) & torch.isfinite(grad_norm)
    lr = warmup_lr(tc.lr, tc.warmup, state.step)
    for group in state.opt.param_groups:
        group["lr"] = lr
    state.opt.step()
    ema_update(state.ema, state.model, tc.ema_decay)
    state.step += 1
    return StepOutput(losses, grad_norm, global_loss, finite, lr)


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
    together = False  # every rank ended alike: finished, interrupted or diverged at the same check point
    try:
        check_batch_split(tc=cfg.train, world_size=d.world_size)
        # Every batch has the same shape: cuDNN times its convolution algorithms once and keeps
        # the fastest (on CUDA; a process setting, put back afterwards; not in the config).
        with cudnn_benchmark(dev), _CtrlC() as ctrl_c:
            res = _train(cfg, out, d, dev, resume, data_dir, download, progress, command, ctrl_c)
        together = True
        return res
    except TrainingDiverged:
        together = True
        raise
    finally:
        # Rank 0 may still be writing the last checkpoint when the others are done: they wait for it
        # (a rank leaving the process group early has been seen to abort in gloo's teardown).
        d.close(wait=together)


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
        if tc.channels_last:  # the same values, another layout
            x0, noise = (v.contiguous(memory_format=torch.channels_last) for v in (x0, noise))
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

    def diverged(self, bad: NonFinite, step: int) -> TrainingDiverged:
        """The error for the first non-finite step, ``bad``, found at the check point of ``step``;
        recorded in stats.jsonl at ``bad.step`` (where a resume reads it: ddpm.rundir)."""
        out = self.out
        last = (f"{out / LAST} (step {read_checkpoint(out / LAST)['step']})"
                if (out / LAST).exists() else "none: no checkpoint was written yet")
        if self.d.main:
            append_stats(out, {"step": bad.step, "event": "nonfinite", "loss": str(bad.loss),
                               "grad_norm": str(bad.grad_norm)})
        applied = (f"the update of step {bad.step} was" if bad.step == step
                   else f"the updates of steps {bad.step}..{step} were")
        return TrainingDiverged(
            f"non-finite loss at step {bad.step}: loss={bad.loss}, grad norm={bad.grad_norm}; found at the check "
            f"of step {step}: {applied} applied in memory but never saved. Last good checkpoint: {last}. "
            f"Continue with a lower learning rate (allowed after a non-finite loss, recorded in {RUN}): "
            f"python -m ddpm train --out {out} --resume --set train.lr={self.cfg.train.lr / 4:g}; or check the data.")


def _train(cfg, out, d: Dist, dev, resume, data_dir, download, progress, command, ctrl_c):
    tc = cfg.train
    log = print if d.main else (lambda *a, **k: None)
    prior = check_run_dir(out, cfg, resume)  # before anything is built: a bad --out fails fast
    if prior.config_changes:
        changes = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in sorted(prior.config_changes.items()))
        log((f"resuming after the non-finite loss at step {prior.diverged_at} with " if prior.after_divergence
             else "resuming with ") + changes)
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
    if tc.channels_last:
        to_channels_last(state)  # before DDP, whose gradient buckets follow the parameters' layout
    net = state.model
    if d.world_size > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            state.model, device_ids=[dev.index] if dev.type == "cuda" else None)
    if tc.compile:
        net = torch.compile(net)

    run.dataset, data_dir = _open_data(run, data_dir, resume, download, progress)
    batches = batch_stream(run.dataset, tc.seed, state.step, tc.batch_size, d.rank, d.world_size,
                           cfg.data.num_workers, device=dev if cfg.data.on_device else None)
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
    """Train from state.step to train.steps; log, sample and save on schedule. The device is read
    at check points only (``_check_point``): the steps that log, sample or save, and a Ctrl-C."""
    tc, out, d = run.cfg.train, run.out, run.d
    guard = NonFiniteGuard(state.step, run.dev)
    shown = None  # the loss the progress bar shows: the one read at the last check point
    state.model.train()
    ctrl_c.armed = True  # from here on, Ctrl-C means: finish this step, save, stop
    if d.world_size > 1 and d.main:
        ctrl_c.notice = (f"\nCtrl-C: the processes stop together at the next check point (within "
                         f"train.log_every={tc.log_every} steps), with a checkpoint; Ctrl-C again stops at "
                         "once, unsaved")
    # images/s: the steps' time from one check point's read of the device to the next (the GPU
    # has then done the work), leaving out the stats line, grids and checkpoints in between
    clock, speed = time.perf_counter(), None
    while state.step < tc.steps:
        x0, t, noise = run.batch(next(batches), state.gen)
        upd = optimisation_step(state, net, run.diffusion, x0, t, noise, tc, d)
        guard.add(upd.loss, upd.grad_norm, upd.finite)
        step = state.step
        window.add(upd.losses, upd.grad_norm, t, tc.batch_size)

        # On schedule, and at the last step whatever the schedule (the run's final record).
        last = step == tc.steps
        log, grid = last or step % tc.log_every == 0, last or step % tc.sample_every == 0
        save = last or step % tc.ckpt_every == 0
        # Ctrl-C: one process reads its own flag every step (no device read); under DDP the
        # ranks agree on it at the next check point (an all_reduce there, with the rest).
        stop = d.world_size == 1 and ctrl_c.requested
        checked = log or grid or save or stop
        if checked:
            read = _check_point(run, guard, window, ctrl_c, log)
            window.seconds += time.perf_counter() - clock
            assert read.step == step, (read.step, step)
            if read.bad is not None:  # nothing from that step on is logged, sampled or saved
                raise run.diverged(read.bad, step)
            shown, stop, speed = read.loss, read.stop, window.images_per_s
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss="-" if shown is None else f"{shown:.4f}",
                            img_s="-" if speed is None else f"{speed:.1f}", refresh=False)
        if log:
            rec = window.line(d, step, upd.lr, epoch=step * tc.batch_size / len(run.dataset), sums=read.sums)
            if d.main:
                append_stats(out, rec)
        if grid:
            run.sample_grid(state)
        if last:
            run.save(state, window, [LAST, FINAL])
        elif save:
            run.save(state, window, [LAST])
        # Ctrl-C: stop after a whole step, with a checkpoint of it (every rank agrees on when).
        if stop and not last:
            if not save:  # else last.pt of this very step was just written
                run.save(state, window, [LAST])
            return {"step": step, "out": str(out), "finished": False, "interrupted": True,
                    "num_params": run.n_params}
        if checked:
            clock = time.perf_counter()
    ctrl_c.armed = False
    return {"step": state.step, "out": str(out), "finished": True, "num_params": run.n_params}


class _Read(NamedTuple):
    """What a check point read from the device."""
    step: int  # the steps the guard counted (= state.step)
    loss: float  # the global loss of the last step
    bad: Optional[NonFinite]  # the first non-finite step since the start, or None
    sums: Optional[List[float]]  # the loss window summed over the ranks (when a line is due)
    stop: bool  # Ctrl-C, on any rank


def _check_point(run: _Run, guard: NonFiniteGuard, window: LossWindow, ctrl_c: _CtrlC, log: bool) -> _Read:
    """Everything the loop needs from the device at a check point, in one read (one host sync):
    the guard's record, the loss window summed over the ranks when a stats line is due and,
    under DDP, whether any rank saw Ctrl-C (summed in the window's all_reduce)."""
    d = run.d
    shared = [window.sums] if log else []
    if d.world_size > 1:
        shared.append(torch.full((1,), float(ctrl_c.requested), dtype=torch.float64, device=run.dev))
    summed = d.sum_(torch.cat(shared)) if shared else guard.rec[:0]
    values = torch.cat([guard.rec, summed]).tolist()
    rec, rest = values[:guard.rec.numel()], values[guard.rec.numel():]
    stop = rest[-1] > 0 if d.world_size > 1 else ctrl_c.requested
    return _Read(int(rec[0]), rec[1], NonFiniteGuard.first(rec), rest[:window.sums.numel()] if log else None, stop)


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
        # the dir the data was read from (the first of the search that held it), so that --resume finds it
        "data_dir": str(getattr(run.dataset, "data_root", None) or resolve_data_dir(data_dir)),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        # on CUDA cuDNN picks the fastest convolution algorithms per process: a resumed run matches an
        # uninterrupted one up to float rounding there, not bit for bit
        "cudnn_benchmark": dev.type == "cuda",
        "command": command or " ".join(sys.argv), "resumed_from_step": step or None,
    }
    if prior.config_changes:
        record["config_changes"] = prior.config_changes
    if prior.after_divergence:
        record["reason"] = f"non-finite loss at step {prior.diverged_at}"
    return record
