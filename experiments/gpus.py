"""Where experiments.run puts each stage: the GPUs of this machine, shared out to runs.

- ``visible_gpus``: the GPUs this process may use, as the ids a child gets in
  CUDA_VISIBLE_DEVICES (those of $CUDA_VISIBLE_DEVICES when it is set); none on a CPU machine.
- ``gpus_for``: how many GPUs a training run gets: 1, or the registry's GPUS_PER_RUN
  (CelebA-HQ at the paper profile), or --gpus-per-run K; never more than the machine has,
  and a number the global batch (and each share's microbatches) divides.
- ``GpuPool``: hands out free GPUs first come, first served (a run that waits for 4 GPUs is
  not overtaken by later 1-GPU stages, so it cannot starve); a GPU is never given to two
  stages at once. A stage holds its GPUs only while it runs (no stage waits while holding).
- ``launch``: the command and environment of a stage on its GPUs: CUDA_VISIBLE_DEVICES
  pinned, and ``torchrun --standalone --nproc_per_node=K`` (as ``python -m
  torch.distributed.run``, the same interpreter) for a training over K > 1 GPUs.
- ``simulate``: the schedule the pool produces for given stage durations: which stage on
  which GPUs, from when to when (``--plan``).
- ``time_train_step`` / ``time_forward``: a few steps timed on one GPU, for the plan's GPU-hours.
"""

from __future__ import annotations

import contextlib
import heapq
import os
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, replace
from typing import Dict, Iterator, List, Optional, Sequence, Tuple


def visible_gpus(env: Optional[Dict[str, str]] = None) -> List[str]:
    """The CUDA devices this process may use, named as CUDA_VISIBLE_DEVICES names them for a
    child (the entries of $CUDA_VISIBLE_DEVICES when set, else 0..n-1); [] without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return []
    n = torch.cuda.device_count()
    env = os.environ if env is None else env
    if env.get("CUDA_VISIBLE_DEVICES") is not None:
        return [x.strip() for x in env["CUDA_VISIBLE_DEVICES"].split(",") if x.strip()][:n]
    return [str(i) for i in range(n)]


def gpus_for(cfg, want: int, n_gpus: int) -> int:
    """GPUs for a training of ``cfg`` that wants ``want`` of them on a machine with ``n_gpus``:
    at most both, and the largest such count that splits the global batch evenly into
    per-process shares that train.microbatch divides (0 on a CPU machine)."""
    if n_gpus <= 0:
        return 0
    from ddpm.train import check_batch_split
    from ddpm.config import ConfigError

    for k in range(max(1, min(want, n_gpus)), 0, -1):
        try:
            check_batch_split(cfg.train, k)
            return k
        except ConfigError:
            continue
    return 1  # not reached: one process always splits evenly (the config was validated)


class GpuPool:
    """Free GPUs, handed out in the order they are asked for."""

    def __init__(self, ids: Sequence[str]):
        self.ids = list(ids)
        self.free = list(ids)
        self._cond = threading.Condition()
        self._queue: deque = deque()

    @contextlib.contextmanager
    def take(self, k: int) -> Iterator[List[str]]:
        """``k`` GPUs for the duration of the with-block (lowest ids first); waits for them."""
        if not 1 <= k <= len(self.ids):
            raise ValueError(f"{k} GPUs asked for, {len(self.ids)} in the pool")
        ticket = object()
        with self._cond:
            self._queue.append(ticket)
            self._cond.wait_for(lambda: self._queue[0] is ticket and len(self.free) >= k)
            self._queue.popleft()
            got, self.free = self.free[:k], self.free[k:]
            self._cond.notify_all()  # the next in line may fit too
        try:
            yield got
        finally:
            with self._cond:
                self.free = sorted(self.free + got, key=self.ids.index)
                self._cond.notify_all()


def launch(argv: List[str], gpus: List[str], env: Optional[Dict[str, str]] = None
           ) -> Tuple[List[str], Optional[Dict[str, str]]]:
    """(command, environment) for ``python -m ddpm ARGV...`` on ``gpus``: unchanged without GPUs,
    pinned with CUDA_VISIBLE_DEVICES, over torchrun when more than one."""
    if not gpus:
        return [sys.executable, "-m", "ddpm", *argv], env
    child = {**(os.environ if env is None else env), "CUDA_VISIBLE_DEVICES": ",".join(gpus)}
    if len(gpus) == 1:
        return [sys.executable, "-m", "ddpm", *argv], child
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={len(gpus)}",
            "-m", "ddpm", *argv], child


# ----------------------------------------------------------------------------- the plan


@dataclass
class Stage:
    label: str
    gpus: int  # how many
    seconds: float


@dataclass
class Slot:
    run: str
    label: str
    gpus: List[str]
    start: float
    end: float


def simulate(ids: Sequence[str], runs: List[Tuple[str, List[Stage]]], jobs: int) -> List[Slot]:
    """The schedule that experiments.run's workers and a GpuPool of ``ids`` produce when each
    stage takes its ``seconds``: ``jobs`` runs in progress at a time, taken in order; a run's
    stages one after another, each asking the pool for its GPUs first come, first served."""
    free = list(ids)
    todo = deque((name, deque(stages)) for name, stages in runs)
    asks: deque = deque()  # (run, its remaining stages), waiting for GPUs, in order of asking
    running: List[Tuple[float, int, str, deque, List[str]]] = []  # heap by end time
    out: List[Slot] = []
    now, active, seq = 0.0, 0, 0

    def next_stage(name, stages):
        nonlocal active
        if stages:
            asks.append((name, stages))
        else:
            active -= 1

    while todo or asks or running:
        while active < jobs and todo:  # a free worker takes the next run
            active += 1
            next_stage(*todo.popleft())
        while asks and asks[0][1][0].gpus <= len(free):  # grants, in order: the first waits, all wait
            name, stages = asks.popleft()
            st = stages.popleft()
            got, free = free[:st.gpus], free[st.gpus:]
            out.append(Slot(name, st.label, got, now, now + st.seconds))
            heapq.heappush(running, (now + st.seconds, seq, name, stages, got))
            seq += 1
        if not running:
            if asks:
                raise ValueError(f"{asks[0][0]}: {asks[0][1][0].gpus} GPUs asked for, {len(ids)} in the pool")
            continue
        now, _, name, stages, got = heapq.heappop(running)
        free = sorted(free + got, key=list(ids).index)
        next_stage(name, stages)
    return out


def _sync(dev) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def time_train_step(cfg, processes: int, device: str = "cuda", steps: int = 3) -> float:
    """Seconds of one optimisation step of ``cfg`` on one GPU (or ``device``) with its share of the global batch
    over ``processes`` (random data; the step's own microbatches; 2 steps of warm-up first)."""
    import torch

    from ddpm.config import build_diffusion
    from ddpm.train import TrainState, optimisation_step

    dev = torch.device(device)
    local = cfg.train.batch_size // processes
    C, R = cfg.data.channels, cfg.data.resolution
    state = TrainState.create(cfg, dev)
    diffusion = build_diffusion(cfg)
    tc = replace(cfg.train, warmup=0)
    g = torch.Generator(device=dev).manual_seed(0)
    x0 = torch.rand((local, C, R, R), generator=g, device=dev) * 2 - 1
    t = torch.randint(0, diffusion.T, (local,), generator=g, device=dev)
    noise = torch.randn(x0.shape, generator=g, device=dev)
    state.model.train()
    try:
        for i in range(2 + steps):
            if i == 2:
                _sync(dev)
                t0 = time.perf_counter()
            optimisation_step(state, state.model, diffusion, x0, t, noise, tc)
        _sync(dev)
        return (time.perf_counter() - t0) / steps
    finally:
        del state
        if dev.type == "cuda":
            torch.cuda.empty_cache()


def time_forward(cfg, batch: Optional[int] = None, device: str = "cuda", calls: int = 3) -> float:
    """Seconds per image of one network call in evaluation (no gradients) at ``batch`` (default:
    the evaluation's 256 up to 64x64 images, 16 above)."""
    import torch

    from ddpm.config import build_model

    batch = batch or (256 if cfg.data.resolution <= 64 else 16)
    dev = torch.device(device)
    C, R = cfg.data.channels, cfg.data.resolution
    model = build_model(cfg).to(dev).eval()
    x = torch.randn(batch, C, R, R, device=dev)
    t = torch.randint(0, cfg.diffusion.T, (batch,), device=dev)
    try:
        with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cfg.train.bf16):
            for i in range(1 + calls):
                if i == 1:
                    _sync(dev)
                    t0 = time.perf_counter()
                model(x, t)
        _sync(dev)
        return (time.perf_counter() - t0) / calls / batch
    finally:
        del model
        if dev.type == "cuda":
            torch.cuda.empty_cache()

