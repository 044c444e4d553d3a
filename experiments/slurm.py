"""``experiments.run --launcher slurm``: each stage as one Slurm job, through submitit.

experiments.run builds a stage's command as always (``python -m ddpm train|eval ...``); the
launcher decides only where it runs. With ``--launcher slurm`` each training and evaluation
is one submitit job (``StageJob``) that runs the stage as experiments.run runs it on a machine
of its own (``run.run_here``): on the GPUs Slurm gives the job (its CUDA_VISIBLE_DEVICES), over
torchrun when there are several, with its whole output in runs/<profile>/<run>.*.log. The job
returns the stage's exit code and last lines, and experiments.run classifies them as it does
locally (3: diverged; anything else: failed, with the log's last error line). A job that ends
without a result (cancelled, killed by Slurm, a node lost) is a failure with its reason. The
repository, the runs dir and the data dirs must be on a file system the nodes share.

What a job asks for (``SlurmLauncher.parameters``): one node; the stage's GPUs (a training: 1,
CelebA-HQ at the paper profile up to 8, or --gpus-per-run K, never more than
--slurm-gpus-per-node; an evaluation: 1; 0 with --slurm-gpus-per-node 0, CPU jobs);
--slurm-cpus-per-gpu CPUs a GPU; --slurm-time hours; --slurm-partition; --slurm-account.

Time limits and preemption: submitit's signal (USR2, sent by Slurm before the time limit, and
on preemption where the cluster sends it) makes the job stop its ddpm process with Ctrl-C (a
training finishes its step and saves last.pt) and requeue itself, at most MAX_REQUEUES times.
A stage that starts again, requeued by submitit or by Slurm itself, continues a training whose
run dir holds a run with --resume (``resumable``). submitit's own files (the pickled job, the
job's stdout and stderr) are in runs/<profile>/slurm/.
"""

from __future__ import annotations

import os
import re
import select
import shlex
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from ddpm.rundir import inspect_run_dir

ROOT = Path(__file__).resolve().parents[1]
MAX_REQUEUES = 20  # a paper training is days long: many of a cluster's time limits
STOP_S = 60  # a stopped ddpm process's time to save (within submitit's 90 s before the time limit)


class SlurmError(RuntimeError):
    """The launcher cannot be used, or a job ended without a result; the message says what to do."""


def resumable(argv: List[str]) -> List[str]:
    """``argv`` of a stage that starts (again): a training whose --out already holds a run
    continues it (--resume), as experiments.run asks for a run dir that exists."""
    if not argv or argv[0] != "train" or "--resume" in argv or "--out" not in argv:
        return list(argv)
    out = Path(argv[argv.index("--out") + 1])
    return list(argv) + (["--resume"] if inspect_run_dir(out)["kind"] == "run" else [])


def stop(proc: subprocess.Popen, timeout: float = STOP_S) -> Tuple[int, List[str]]:
    """Ctrl-C to ``proc`` (ddpm train saves last.pt and exits; torchrun passes it to its
    workers), killed if it has not exited after ``timeout`` s: its exit code and its last
    output lines. The output is read from the pipe's file descriptor, not from the file object
    that experiments.run's reader was reading when the signal came (that would be re-entrant);
    reading it also keeps a full pipe from blocking the process."""
    fd = proc.stdout.fileno() if proc.stdout is not None else None
    out = b""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    deadline = time.monotonic() + timeout
    while fd is not None and time.monotonic() < deadline:
        if select.select([fd], [], [], 0.2)[0]:
            chunk = os.read(fd, 1 << 16)
            if not chunk:  # the end: the process (and torchrun's workers) closed its output
                break
            out += chunk
    try:
        rc = proc.wait(max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        proc.kill()
        rc = proc.wait()
    lines = [ln.strip() for ln in re.split(r"[\r\n]+", out.decode(errors="replace"))]
    return rc, [ln for ln in lines if ln and not re.search(r"\d+%\|", ln)]  # not progress bars


class StageJob:
    """One stage, run in a submitit job as experiments.run runs it on its own machine."""

    def __init__(self, argv: List[str], log: str, label: str, gpus: int):
        self.argv, self.log, self.label, self.gpus = list(argv), str(log), label, gpus

    def __call__(self):
        from . import run as R
        from .gpus import GpuPool, visible_gpus

        ids = visible_gpus()[:self.gpus] if self.gpus else []
        if len(ids) < self.gpus:
            return R.Ran(1, [f"error: this Slurm job sees {len(ids)} GPU(s) (CUDA_VISIBLE_DEVICES="
                             f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r}), {self.gpus} asked for: choose a GPU "
                             f"partition (--slurm-partition)"], ids)
        R._POOL = GpuPool(ids) if ids else None
        return R.run_here(resumable(self.argv), Path(self.log), self.label, len(ids))

    def checkpoint(self):
        """submitit's signal (time limit, preemption): stop the ddpm process, so that a training
        saves last.pt, and hand submitit the same stage to requeue (it resumes: ``resumable``)."""
        from submitit.helpers import DelayedSubmission

        from . import run as R

        stopped = [stop(p) for p in R.running()]
        with open(self.log, "a") as f:
            for _, lines in stopped:
                f.writelines(ln + "\n" for ln in lines)
            f.write(f"Slurm time limit or preemption: the ddpm process was stopped with Ctrl-C (exit "
                    f"{', '.join(str(rc) for rc, _ in stopped) or 'none running'}); submitit requeues the job while "
                    f"it has requeues left\n")
        return DelayedSubmission(StageJob(self.argv, self.log, self.label, self.gpus))


class SlurmLauncher:
    """Submits stages (and the preflight's GPU checks) as jobs and waits for their results.
    ``cluster``: "slurm"; "local" runs the jobs on this machine (submitit's local executor, for
    the tests)."""

    def __init__(self, folder: Path, gpus_per_node: int = 8, cpus_per_gpu: int = 4, hours: float = 24.0,
                 partition: Optional[str] = None, account: Optional[str] = None, cluster: str = "slurm",
                 max_requeues: int = MAX_REQUEUES):
        try:
            import submitit
        except ImportError:
            raise SlurmError("--launcher slurm needs submitit: pip install -e '.[slurm]'") from None
        if gpus_per_node < 0 or cpus_per_gpu < 1 or hours <= 0:
            raise SlurmError(f"--slurm-gpus-per-node {gpus_per_node}, --slurm-cpus-per-gpu {cpus_per_gpu}, "
                             f"--slurm-time {hours}: need at least 0 GPUs, 1 CPU and some hours")
        self.folder = Path(folder)
        self.gpus_per_node, self.cpus_per_gpu, self.hours = gpus_per_node, cpus_per_gpu, hours
        self.partition, self.account = partition, account
        try:
            self.executor = submitit.AutoExecutor(self.folder, cluster=cluster,
                                                  slurm_max_num_timeout=max_requeues,
                                                  local_max_num_timeout=max_requeues)
        except RuntimeError as e:  # submitit's SlurmExecutor: no srun on this machine
            raise SlurmError(f"--launcher slurm: no Slurm on this machine ({e}); run on the cluster's login "
                             f"node, or drop --launcher slurm to run here") from None
        self._lock = threading.Lock()
        self._jobs: Dict[str, Any] = {}  # submitted, not yet waited for

    def parameters(self, gpus: int, name: str) -> Dict[str, Any]:
        """What a job of ``gpus`` GPUs asks for (submitit's AutoExecutor names)."""
        # the job imports experiments from the repository (a local job: from the submitter's directory,
        # as `python -m experiments.run` does)
        return {"name": name, "nodes": 1, "tasks_per_node": 1, "gpus_per_node": gpus,
                "cpus_per_task": self.cpus_per_gpu * max(gpus, 1), "timeout_min": max(1, round(self.hours * 60)),
                "slurm_partition": self.partition, "slurm_account": self.account,
                "slurm_setup": [f"cd {shlex.quote(str(ROOT))}"]}

    def submit(self, fn: Callable, gpus: int, name: str, *args):
        """``fn(*args)`` as a job of ``gpus`` GPUs; the submitit job."""
        with self._lock:  # the executor's parameters are shared by the submitting threads
            self.executor.update_parameters(**self.parameters(gpus, name))
            job = self.executor.submit(fn, *args)
            self._jobs[job.job_id] = job
        return job

    def result(self, job):
        """Waits for ``job``; its result, or SlurmError (one line) if it ended without one."""
        from submitit.core.utils import UncompletedJobError

        try:
            return job.result()
        except UncompletedJobError as e:
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
            # the job's own last error line (a traceback's), else submitit's first line
            last = next((ln for ln in reversed(lines) if ln.split(":")[0].endswith(("Error", "Exception"))),
                        lines[0] if lines else "no output")
            raise SlurmError(f"Slurm job {job.job_id} ended without a result ({last}); its output: "
                             f"{job.paths.stdout}") from None
        finally:
            with self._lock:
                self._jobs.pop(job.job_id, None)

    def call(self, fn: Callable, gpus: int, name: str, *args):
        """``fn(*args)`` in a job of ``gpus`` GPUs, waited for: its result (SlurmError if none)."""
        return self.result(self.submit(fn, gpus, name, *args))

    def cancel_all(self) -> List[str]:
        """Cancels the jobs submitted and not yet waited for (Ctrl-C); their ids."""
        with self._lock:
            jobs = list(self._jobs.values())
        for job in jobs:
            job.cancel(check=False)
        return [job.job_id for job in jobs]

    def cancel_on_interrupt(self) -> None:
        """Ctrl-C (SIGINT, in the main thread) cancels the jobs in flight first, so that the
        threads waiting for them end, then interrupts as usual."""
        previous = signal.getsignal(signal.SIGINT)

        def handler(signum, frame):
            ids = self.cancel_all()
            if ids:
                print(f"interrupted: cancelled Slurm job(s) {', '.join(ids)}", flush=True)
            signal.signal(signal.SIGINT, previous)
            raise KeyboardInterrupt

        signal.signal(signal.SIGINT, handler)
