"""Where and how this process computes: the device, the seeds, the process group.

- ``pick_device`` (``DeviceError``): what ``--device`` names, checked, for every command
  and library entry point that computes.
- ``derive_seed``: every seed derived from a user's seed, e.g. the training streams
  (seed, 0..5 [, rank, step]), sample shard k and the bound's batch k (seed, k), the
  figures (seed, 10000). Pinned samples and checkpoints depend on its exact values.
- ``Dist`` / ``setup_distributed``: this process's place in a DDP process group.
- ``Bf16Network``: a network run under bf16 autocast, for sampling on CPUs (2x there, samples
  unchanged by FID/KID: results/quick/recipe_search.md); never for the bound, which it shifts.
- ``device_description``: the one-line description of a device that run.json,
  metrics.json and the speed benchmark record.
- ``cudnn_benchmark``: cudnn.benchmark on while sampling or evaluating on CUDA (fixed shapes).
"""

from __future__ import annotations

import os
import platform
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, List, Optional

import numpy as np
import torch
import torch.distributed as dist


class Bf16Network(torch.nn.Module):
    """``model`` run under bf16 autocast (outputs float32). For sampling only: bf16 roughly
    doubles CPU sampling speed and leaves FID/KID unchanged (134.94 against 134.81 on the same
    seeds), but it raises the NLL bound by about 0.04 bits/dim (both measured in
    results/quick/recipe_search.md), so the bound always runs in float32."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16):
            return self.model(x, t).float()


PRECISIONS = {False: "float32", True: "bf16 autocast (output head float32)"}


@contextmanager
def cudnn_benchmark(device):
    """cudnn.benchmark on inside the block when ``device`` is CUDA (restored after it). Sampling
    and the bound call the network thousands of times on the same shapes, so cuDNN times its
    convolution algorithms once per shape and keeps the fastest. A process setting, not a
    recorded choice: each process times for itself and may pick another algorithm, so values
    made in two processes agree up to float rounding, not always bit for bit."""
    if torch.device(device).type != "cuda":
        yield
        return
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


class DeviceError(ValueError):
    """--device names no device that torch can use here."""


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


def _cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_description(device) -> str:
    """One line naming ``device`` as records state it: the GPU's name, or the CPU's with its
    cores and torch's thread count (which set its speed on a shared machine)."""
    d = torch.device(device)
    if d.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(d)}"
    if d.type == "cpu":
        return f"cpu: {_cpu_name()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"
    return f"{d.type}: {platform.machine()}"


def derive_seed(*keys: int) -> int:
    """A 63-bit seed from integer keys (numpy SeedSequence hashing: unrelated streams for
    nearby keys, e.g. per-rank or per-shard seeds)."""
    a, b = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, dtype=np.uint32)
    return ((int(a) << 31) ^ int(b)) & ((1 << 63) - 1)


@dataclass
class Dist:
    """This process's place in the process group (a single process: rank 0 of 1)."""
    rank: int = 0
    world_size: int = 1
    created: bool = False  # by setup_distributed, so its caller destroys it at the end

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self):
        if self.world_size > 1:
            dist.barrier()

    def sum_(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` summed over the ranks, in place."""
        if self.world_size > 1:
            dist.all_reduce(x)
        return x

    def gather(self, obj) -> List[Any]:
        """Every rank's ``obj``, in rank order."""
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def close(self, wait: bool = False) -> None:
        """Leave the process group if setup_distributed created it; ``wait``: after a barrier, so
        that no rank tears its connections down while another still works (only where every rank
        gets here alike: a rank that failed alone must not wait for the others)."""
        if self.created:
            if wait:
                dist.barrier()
            dist.destroy_process_group()


def setup_distributed(device: torch.device, backend: Optional[str] = None,
                      timeout: Optional[timedelta] = None) -> Dist:
    """Join the process group that torchrun (or a test) describes in the environment
    (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT); a single process otherwise.
    ``backend``: None for NCCL on CUDA and gloo elsewhere (training all-reduces gradients);
    evaluation passes gloo, as its processes exchange only waits and short lists. ``timeout``:
    how long a rank waits for the others in a collective (None: torch's default)."""
    ws = int(os.environ.get("WORLD_SIZE", "1"))
    if ws <= 1:
        return Dist()
    created = False
    if not dist.is_initialized():
        kw = {} if timeout is None else {"timeout": timeout}
        dist.init_process_group(backend or ("nccl" if device.type == "cuda" else "gloo"), **kw)
        created = True
    return Dist(dist.get_rank(), dist.get_world_size(), created)
