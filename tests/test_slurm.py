"""experiments.run --launcher slurm, through submitit's local executor (no cluster here).

Each stage is a submitit job that runs the real ``python -m ddpm train`` of a smoke run on the
CPU; the tests check that its output appears (log, submitit's files), that its exit code comes
back and is classified as locally (3: diverged; anything else: failed with the log's last
error line), that a job at its time limit stops the training (which saves), is requeued and
resumes with --resume, and what a job asks Slurm for.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import time

import pytest

from conftest import REPO, require_module
from ddpm.rundir import CONFIG
from experiments import run as R
from experiments import slurm as S


@pytest.fixture
def local_slurm(tmp_path, monkeypatch):
    """experiments.run with --launcher slurm, its jobs on this machine (CPU jobs: 0 GPUs)."""
    require_module("submitit", "--launcher slurm needs submitit (pip install -e '.[slurm]')")

    def make(**kw):
        launcher = S.SlurmLauncher(tmp_path / "slurm", gpus_per_node=0, cluster="local", **kw)
        monkeypatch.setattr(R, "_SLURM", launcher)
        monkeypatch.setattr(R, "_POOL", None)
        return launcher

    return make


def _with(monkeypatch, *extra):
    """The smoke runs' configs with ``extra`` overrides (built here, sent to the job)."""
    real = R.run_config_args
    monkeypatch.setattr(R, "run_config_args", lambda run, profile: (real(run, profile)[0],
                                                                      real(run, profile)[1] + list(extra)))


def _train(tmp_path, shared_data):
    return R.train_run("mu_simple", "smoke", tmp_path / "runs", tmp_path / "results", str(shared_data))


def _log(tmp_path):
    return (tmp_path / "runs" / "smoke" / "mu_simple.train.log").read_text()


def test_a_stage_runs_as_a_job_and_its_output_appears(tmp_path, local_slurm, shared_data):
    launcher = local_slurm()
    rec = _train(tmp_path, shared_data)
    assert rec["status"] == "finished" and rec["exit_code"] == 0 and rec["gpus"] is None
    assert (tmp_path / "runs" / "smoke" / "mu_simple" / "final.pt").exists()
    log = _log(tmp_path)
    assert "$ " in log and " -m ddpm train --preset smoke-mnist" in log and "done:" in log
    job_out, = launcher.folder.glob("*_0_log.out")  # submitit's stdout of the job: the stage's own lines
    assert "start mu_simple train" in job_out.read_text() and "done  mu_simple train" in job_out.read_text()


def test_exit_3_in_a_job_is_diverged(tmp_path, local_slurm, shared_data, monkeypatch):
    local_slurm()
    _with(monkeypatch, "train.lr=1e30")  # a non-finite loss within 4 steps
    rec = _train(tmp_path, shared_data)
    assert rec["status"] == "diverged" and rec["exit_code"] == 3 and rec["reason"] is None
    assert "error: non-finite loss at step" in _log(tmp_path)


def test_any_other_failure_in_a_job_is_failed_with_the_logs_last_error(tmp_path, local_slurm, shared_data,
                                                                       monkeypatch):
    local_slurm()
    _with(monkeypatch, "train.microbatch=3")  # does not divide the batch of 8
    with pytest.raises(SystemExit, match="training failed .*it is retried by the next call"):
        _train(tmp_path, shared_data)
    rec = json.loads((tmp_path / "results" / "smoke" / "mu_simple" / "train.json").read_text())
    assert rec["status"] == "failed" and rec["exit_code"] not in (0, 3)
    assert rec["reason"].startswith("error: train.microbatch=3")


def test_a_job_that_ends_without_a_result_is_a_failure_with_its_reason(local_slurm):
    launcher = local_slurm()
    job = launcher.submit(time.sleep, 0, "sleeper", 120)
    time.sleep(3)
    before = signal.getsignal(signal.SIGINT)
    launcher.cancel_on_interrupt()
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C on the login node: the jobs in flight are cancelled
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)
    assert signal.getsignal(signal.SIGINT) is before
    with pytest.raises(S.SlurmError, match=f"Slurm job {job.job_id} ended without a result") as e:
        launcher.result(job)
    assert "\n" not in str(e.value) and launcher.cancel_all() == []
    # as experiments.run records it: failed, with that line as the reason
    assert R.failure_reason(1, [f"error: {e.value}"]).startswith(f"error: Slurm job {job.job_id} ended without")


@pytest.mark.slow
def test_a_job_at_its_time_limit_saves_is_requeued_and_resumes(tmp_path, local_slurm, shared_data, monkeypatch):
    """The local executor's time limit: 60 s, its signal 30 s before. The training is stopped with
    Ctrl-C (it saves last.pt), the job requeued once and the training resumed with --resume; at
    the second time limit there is no requeue left: a failure, retried by the next call."""
    local_slurm(hours=1 / 60, max_requeues=1)
    _with(monkeypatch, "train.steps=1000000")
    with pytest.raises(SystemExit, match="training failed"):
        _train(tmp_path, shared_data)
    log = _log(tmp_path)
    commands = [ln for ln in log.splitlines() if ln.startswith("$ ")]
    assert len(commands) == 2 and "--resume" not in commands[0] and commands[1].endswith(" --resume")
    assert log.count("Slurm time limit or preemption: the ddpm process was stopped with Ctrl-C (exit 130)") == 2
    # each time the training finished its step and saved last.pt; the requeued one went on from there
    stops = [int(s) for s in re.findall(r"interrupted \(Ctrl-C\) at step (\d+) of 1000000: saved ", log)]
    second = log.split(commands[1])[1]
    assert len(stops) == 2 and 0 < stops[0] < stops[1] and f"from step {stops[0]} of 1000000" in second
    rec = json.loads((tmp_path / "results" / "smoke" / "mu_simple" / "train.json").read_text())
    assert rec["status"] == "failed" and "timed-out too many times" in rec["reason"]


def test_a_requeued_training_resumes_once_its_run_dir_holds_a_run(tmp_path):
    out = tmp_path / "run"
    argv = ["train", "--preset", "smoke-mnist", "--out", str(out), "--download"]
    assert S.resumable(argv) == argv  # nothing there yet: start it
    out.mkdir()
    (out / CONFIG).write_text("{}")
    assert S.resumable(argv) == argv + ["--resume"]
    assert S.resumable(argv + ["--resume"]) == argv + ["--resume"]
    evaluation = ["eval", "--checkpoint", str(out / "final.pt"), "--out", str(out / "eval")]
    assert S.resumable(evaluation) == evaluation


def test_what_a_job_asks_for_and_the_gpus_a_training_gets(tmp_path, monkeypatch):
    require_module("submitit", "--launcher slurm needs submitit (pip install -e '.[slurm]')")
    launcher = S.SlurmLauncher(tmp_path, gpus_per_node=8, cpus_per_gpu=6, hours=36, partition="gpu",
                               account="lab", cluster="local")
    par = launcher.parameters(8, "celebahq train")
    assert {k: par[k] for k in ("nodes", "gpus_per_node", "cpus_per_task", "timeout_min", "slurm_partition",
                                "slurm_account")} == {"nodes": 1, "gpus_per_node": 8, "cpus_per_task": 48,
                                                      "timeout_min": 36 * 60, "slurm_partition": "gpu",
                                                      "slurm_account": "lab"}
    assert launcher.parameters(0, "x")["cpus_per_task"] == 6
    monkeypatch.setattr(R, "_POOL", None)
    monkeypatch.setattr(R, "_SLURM", launcher)
    assert R.gpus_wanted("celebahq", "paper") == 8 and R.gpus_wanted("eps_simple", "paper") == 1
    launcher.gpus_per_node = 4  # a node of 4: CelebA-HQ over 4, accumulating
    assert R.gpus_wanted("celebahq", "paper") == 4
    launcher.gpus_per_node = 0
    assert R.gpus_wanted("celebahq", "paper") == 0
    with pytest.raises(S.SlurmError, match="need at least 0 GPUs"):
        S.SlurmLauncher(tmp_path, gpus_per_node=-1, cluster="local")


def test_run_all_passes_launcher_slurm_through_and_it_says_what_is_missing(tmp_path):
    """run_all.sh hands --launcher slurm and its options to experiments.run; on a machine
    without Slurm (this one) that is a one-line error, exit 2, and nothing else runs."""
    if shutil.which("srun"):
        pytest.skip("a Slurm machine: this test expects none")
    env = {**os.environ, "DDPM_SKIP_INSTALL": "1", "OMP_NUM_THREADS": "1"}
    dirs = ["--runs-dir", str(tmp_path / "runs"), "--results-dir", str(tmp_path / "results")]
    res = subprocess.run(["bash", "run_all.sh", "--profile", "smoke", "--launcher", "slurm", "--slurm-partition",
                          "gpu", "--slurm-time", "2", *dirs], cwd=REPO, env=env, capture_output=True, text=True)
    assert res.returncode == 2
    error = res.stderr.strip().splitlines()[-1]
    assert error.startswith("python -m experiments.run: error: --launcher slurm")
    assert "no Slurm on this machine" in error or "needs submitit" in error
    assert not (tmp_path / "results").exists()
    with pytest.raises(SystemExit) as e:  # a Slurm option without the launcher: said, not ignored
        R.main(["table1", "--profile", "smoke", "--slurm-partition", "gpu"])
    assert e.value.code == 2


def test_the_preflights_gpu_checks_run_in_a_job(tmp_path, local_slurm, shared_data, monkeypatch):
    """Where the stages will run: the login node's GPUs (often none) say nothing of the nodes'.
    Here this process is made to see a GPU; the job (a fresh process) sees the real CPU machine."""
    import torch

    import ddpm.inception
    from experiments import preflight as P

    class Offline:
        def __init__(self, *a, **k):
            self.offline, self.path, self.source = True, "/cache/converted.pth", "DDPM_INCEPTION_WEIGHTS"

    launcher = local_slurm()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(ddpm.inception, "Inception", Offline)
    checks = P.preflight(["mnist"], "smoke", tmp_path / "runs", tmp_path / "results", str(shared_data),
                         n_gpus=0, launcher=launcher)
    assert [c.name for c in checks] == ["cuda", "train step", "data mnist", "inception", "disk"]
    assert all(c.ok for c in checks) and "the smoke profile runs on the CPU" in checks[0].message
    assert len(list(launcher.folder.glob("*_0_log.out"))) == 1


def test_every_stage_of_an_experiment_is_a_job(tmp_path, local_slurm, shared_data, capsys):
    """experiments.run end to end with the launcher: the training and the evaluation of the
    smoke profile's progressive experiment, one job each, their results where they always are."""
    launcher = local_slurm()
    R.run_experiments(["progressive"], "smoke", tmp_path / "runs", tmp_path / "results", str(shared_data),
                      jobs=4, progress_every=0, launcher=launcher)
    out = capsys.readouterr().out
    assert len(list(launcher.folder.glob("*_0_log.out"))) == 2
    assert "submit eps_simple train as Slurm job" in out and "submit eps_simple eval figures as Slurm job" in out
    rec = json.loads((tmp_path / "results" / "smoke" / "eps_simple" / "train.json").read_text())
    assert rec["status"] == "finished"
    assert (tmp_path / "results" / "smoke" / "eps_simple" / "figures" / "metrics.json").exists()
