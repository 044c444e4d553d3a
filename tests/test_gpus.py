"""experiments.run on GPU machines, tested on the CPU: the GPU pool and schedule over simulated
devices, the torchrun launch, the classification of failures, and --plan.

No GPU is needed: the pool hands out device names ("0".."7"), and the ddpm processes are
replaced by a fake that records its command and environment and sleeps a little.
"""

import json
import os
import random
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import REPO
from ddpm.config import get_preset
from ddpm.train import EXIT_DIVERGED
from experiments import gpus as G
from experiments import run as R

# the report torchrun (torch 2.x) prints when a worker fails: it exits 1 whatever the worker's code
TORCHRUN_FAILURE = """\
error: non-finite loss at step 7: loss=nan, grad norm=nan; training stopped
E1130 20:23:48.1 site-packages/torch/distributed/elastic/multiprocessing/api.py:1002] failed (exitcode: 3) local_rank: 0
Traceback (most recent call last):
  File "torch/distributed/run.py", line 1142, in <module>
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
ddpm FAILED
------------------------------------------------------------
Failures:
[1]:
  rank      : 1 (local_rank: 1)
  exitcode  : 3 (pid: 17601)
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  rank      : 0 (local_rank: 0)
  exitcode  : 3 (pid: 17600)
============================================================""".splitlines()


def _check_intervals(intervals, n_gpus):
    """No GPU in two stages at once, never more than n_gpus busy."""
    events = sorted([(t0, 1, tuple(g)) for t0, t1, g in intervals] + [(t1, 0, tuple(g)) for t0, t1, g in intervals])
    busy = set()
    for _, start, gs in events:  # ends before starts at equal times
        if start:
            assert not busy & set(gs), (busy, gs)
            busy |= set(gs)
            assert len(busy) <= n_gpus
        else:
            busy -= set(gs)


# ------------------------------------------------------------------------------ the pool


def test_the_pool_never_gives_a_gpu_twice_and_runs_every_stage():
    ids = [str(i) for i in range(8)]
    pool, lock, intervals, done = G.GpuPool(ids), threading.Lock(), [], []
    needs = {f"run{i}": (4 if i == 3 else 1) for i in range(10)}
    rng = random.Random(0)
    pauses = {r: [rng.uniform(0.01, 0.05) for _ in range(3)] for r in needs}

    def one_run(r):
        for stage, pause in enumerate(pauses[r]):  # a training (its K GPUs), then 1-GPU evaluations
            with pool.take(needs[r] if stage == 0 else 1) as got:
                t0 = time.perf_counter()
                assert len(set(got)) == (needs[r] if stage == 0 else 1)
                time.sleep(pause)
                with lock:
                    intervals.append((t0, time.perf_counter(), got))
        done.append(r)

    with ThreadPoolExecutor(len(ids)) as ex:
        list(ex.map(one_run, needs))
    assert sorted(done) == sorted(needs) and len(intervals) == 30
    _check_intervals(intervals, 8)
    assert sorted(pool.free) == sorted(ids)  # all given back
    with pytest.raises(ValueError, match="9 GPUs asked for, 8 in the pool"):
        with pool.take(9):
            pass


def test_the_simulated_schedule_keeps_the_same_rules_and_serves_in_order():
    ids = [str(i) for i in range(8)]
    runs = [(f"run{i}", [G.Stage("train", 4 if i == 3 else 1, 10.0), G.Stage("eval", 1, 2.0)]) for i in range(10)]
    slots = G.simulate(ids, runs, jobs=8)
    assert len(slots) == 20 and {s.run for s in slots} == {r for r, _ in runs}
    _check_intervals([(s.start, s.end, s.gpus) for s in slots], 8)
    big = next(s for s in slots if s.run == "run3" and s.label == "train")
    assert len(big.gpus) == 4 and big.start == 0.0  # asked fourth, 4 of 8 GPUs free: not overtaken
    for r, stages in runs:  # a run's stages one after another
        mine = [s for s in slots if s.run == r]
        assert [s.label for s in mine] == ["train", "eval"] and mine[1].start >= mine[0].end
    # one GPU, two runs of two stages each: everything in a row
    one = G.simulate(["0"], [("a", [G.Stage("t", 1, 3.0), G.Stage("e", 1, 1.0)]), ("b", [G.Stage("t", 1, 2.0)])], 1)
    assert [(s.run, s.label, s.start, s.end) for s in one] == [("a", "t", 0, 3), ("a", "e", 3, 4), ("b", "t", 4, 6)]
    with pytest.raises(ValueError, match="2 GPUs asked for, 1 in the pool"):
        G.simulate(["0"], [("a", [G.Stage("t", 2, 1.0)])], 1)


def test_gpus_per_run_fit_the_machine_and_split_the_batch():
    cfg = get_preset("celebahq256")  # global batch 64
    assert G.gpus_for(cfg, 8, 8) == 8 and G.gpus_for(cfg, 8, 6) == 4 and G.gpus_for(cfg, 8, 3) == 2
    assert G.gpus_for(cfg, 1, 8) == 1 and G.gpus_for(cfg, 8, 0) == 0  # no GPU: 0
    odd = get_preset("celebahq256", ["train.batch_size=48", "train.microbatch=4"])
    assert G.gpus_for(odd, 8, 8) == 6 and G.gpus_for(odd, 5, 8) == 4  # 48/8 = 6 and 48/5: not in pieces of 4
    big = get_preset("celebahq256", ["train.batch_size=48", "train.microbatch=16"])
    assert G.gpus_for(big, 8, 8) == 8  # 6 per GPU: below the microbatch, so no accumulation
    assert G.gpus_for(big, 2, 8) == 1  # 24 per GPU does not split into 16s; 48 does


def test_each_stage_is_pinned_to_its_gpus_and_several_go_over_torchrun():
    argv = ["train", "--preset", "cifar10", "--out", "runs/x"]
    assert G.launch(argv, []) == ([sys.executable, "-m", "ddpm", *argv], None)  # the CPU: as before
    cmd, env = G.launch(argv, ["3"], {"PATH": "/bin"})
    assert cmd == [sys.executable, "-m", "ddpm", *argv] and env == {"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "3"}
    cmd, env = G.launch(argv, ["4", "5", "6", "7"], {})
    assert cmd[:5] == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4"]
    assert cmd[5:] == ["-m", "ddpm", *argv] and env["CUDA_VISIBLE_DEVICES"] == "4,5,6,7"


def test_visible_gpus_follow_cuda_visible_devices(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert G.visible_gpus({"CUDA_VISIBLE_DEVICES": "0,1"}) == []  # a CPU machine
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert G.visible_gpus({}) == ["0", "1", "2", "3"]
    # children get the names this process was given (torch counts only those: device_count 2 here)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert G.visible_gpus({"CUDA_VISIBLE_DEVICES": "6, 7"}) == ["6", "7"]
    assert G.visible_gpus({"CUDA_VISIBLE_DEVICES": "GPU-a1b2,GPU-c3d4,GPU-bad"}) == ["GPU-a1b2", "GPU-c3d4"]


# ------------------------------------------------------------------- failures, classified


def test_the_failure_reason_is_the_logs_last_error_and_torchruns_root_cause_code():
    assert R.torchrun_exit_code(TORCHRUN_FAILURE, 1) == EXIT_DIVERGED == 3
    assert R.torchrun_exit_code(["no report"], 1) == 1
    assert R.failure_reason(1, TORCHRUN_FAILURE).startswith("error: non-finite loss at step 7")
    oom = ["Traceback (most recent call last):", '  File "x.py", line 1', "torch.OutOfMemoryError: CUDA out of "
           "memory. Tried to allocate 2.00 GiB", "[rank1]: RuntimeError: NCCL error in: ProcessGroupNCCL.cpp:1970"]
    assert R.failure_reason(1, oom) == "RuntimeError: NCCL error in: ProcessGroupNCCL.cpp:1970"
    assert R.failure_reason(1, oom[:3]) == "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert R.failure_reason(-9, ["step 100"]) == "killed by signal 9"
    assert R.failure_reason(1, []) == "exit code 1, no error line in the log"


def test_the_log_keeps_each_bars_final_state_once_and_an_unfinished_bar_before_an_error(tmp_path):
    """tqdm prints a bar's 100% line again when it closes, with a fresh rate (different text on a fast
    machine); two shards' bars of the same name are two bars; a bar a failure interrupts keeps its state."""
    child = r"""
import sys
w = sys.stdout.write
w("generating:   0%|          | 0/4 [00:00<?, ?img/s]\r")
w("sampling: 100%|##########| 3/3 [00:00<00:00, 91.2it/s]\r")
w("sampling: 100%|##########| 3/3 [00:00<00:00, 88.7it/s]\n")
w("generating:  50%|#####     | 2/4 [00:01<00:01, 1.9img/s]\r")
w("sampling: 100%|##########| 3/3 [00:00<00:00, 90.0it/s]\n")
w("generating: 100%|##########| 4/4 [00:02<00:00, 1.95img/s]\r")
w("generating: 100%|##########| 4/4 [00:02<00:00, 1.94img/s]\n")
w("bound:  40%|####      | 2/5 [00:01<00:02, 1.2batch/s]\r")
w("error: out of memory\n")
sys.exit(1)
"""
    (tmp_path / "child.py").write_text(child)
    log = tmp_path / "stage.log"
    rc, tail = R._call([sys.executable, str(tmp_path / "child.py")], log, "x eval")
    assert rc == 1 and tail == ["error: out of memory"]
    lines = log.read_text().splitlines()[2:]  # after the blank line and the command
    assert [ln.split("|")[0] for ln in lines] == ["sampling: 100%", "sampling: 100%", "generating: 100%",
                                                  "bound:  40%", "error: out of memory"]


def _is_train(cmd) -> bool:
    """A training stage: `ddpm train ...`, alone or over torchrun (never an eval's `--reference-split train`)."""
    return "train" in cmd and "eval" not in cmd


class FakeDdpm:
    """Stands in for experiments.run._call: records each stage (command, GPUs, when) and plays
    its part: a training writes final.pt (or exits with ``train_rc``), an evaluation metrics.json."""

    def __init__(self, train_rc=0, train_lines=(), pause=0.0):
        self.train_rc, self.train_lines, self.pause = train_rc, list(train_lines), pause
        self.calls, self.lock = [], threading.Lock()

    def __call__(self, cmd, log, label, env=None, where=""):
        t0 = time.perf_counter()
        time.sleep(self.pause)
        out = cmd[cmd.index("--out") + 1]
        gpus = (env or {}).get("CUDA_VISIBLE_DEVICES")
        with self.lock:
            self.calls.append({"cmd": cmd, "label": label, "gpus": gpus.split(",") if gpus else [],
                               "t0": t0, "t1": time.perf_counter()})
        os.makedirs(out, exist_ok=True)
        if _is_train(cmd):
            if self.train_rc:
                return self.train_rc, self.train_lines
            open(os.path.join(out, "final.pt"), "w").close()
        else:
            with open(os.path.join(out, "metrics.json"), "w") as f:
                f.write("{}")
        return 0, []


def _train(tmp_path, monkeypatch, fake):
    monkeypatch.setattr(R, "_call", fake)
    monkeypatch.setattr(R, "_POOL", None)
    return R.train_run("mu_simple", "smoke", tmp_path / "runs", tmp_path / "results", None)


def test_only_the_divergence_exit_code_is_diverged_and_it_is_final(tmp_path, monkeypatch):
    fake = FakeDdpm(train_rc=EXIT_DIVERGED, train_lines=["error: non-finite loss at step 3"])
    rec = _train(tmp_path, monkeypatch, fake)
    assert rec["status"] == "diverged" and rec["exit_code"] == 3 and rec["reason"] is None
    _train(tmp_path, monkeypatch, fake)  # a result: not trained again
    assert len(fake.calls) == 1


@pytest.mark.parametrize("rc, lines, reason", [
    (1, ["Traceback (most recent call last):", "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 9 GiB"],
     "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 9 GiB"),
    (2, ["error: train.microbatch=3 must divide the per-process batch (train.batch_size 8 / 2 processes = 4)"],
     "error: train.microbatch=3 must divide the per-process batch (train.batch_size 8 / 2 processes = 4)"),
    (-9, ["train:  40%"], "killed by signal 9"),
])
def test_any_other_failure_is_failed_with_its_reason_and_retried(tmp_path, monkeypatch, rc, lines, reason):
    fake = FakeDdpm(train_rc=rc, train_lines=lines)
    with pytest.raises(SystemExit, match="training failed .*it is retried by the next call"):
        _train(tmp_path, monkeypatch, fake)
    rec = json.loads((tmp_path / "results" / "smoke" / "mu_simple" / "train.json").read_text())
    assert rec["status"] == "failed" and rec["exit_code"] == rc and rec["reason"] == reason
    rec = _train(tmp_path, monkeypatch, FakeDdpm())  # the next call trains it again
    assert rec["status"] == "finished" and rec["reason"] is None


def test_a_finished_run_whose_checkpoint_is_absent_is_trained_again_when_evaluations_remain(tmp_path, monkeypatch):
    """A fresh clone: results/ (in git) say the run finished, runs/ (not in git) is empty."""
    fake = FakeDdpm()
    _train(tmp_path, monkeypatch, fake)
    (tmp_path / "runs" / "smoke" / "mu_simple" / "final.pt").unlink()
    _train(tmp_path, monkeypatch, fake)  # nothing left to evaluate: the record stands, nothing runs
    assert len(fake.calls) == 1
    monkeypatch.setattr(R, "_call", fake)
    rec = R.train_run("mu_simple", "smoke", tmp_path / "runs", tmp_path / "results", None, need_checkpoint=True)
    assert len(fake.calls) == 2 and rec["status"] == "finished"
    assert (tmp_path / "runs" / "smoke" / "mu_simple" / "final.pt").exists()


# -------------------------------------------------------------------- whole schedules


def test_experiments_share_a_simulated_pool_of_four_gpus(tmp_path, monkeypatch, capsys):
    """The paper profile's celebahq over torchrun on all 4 GPUs, the Table 1 runs on one each,
    their evaluations on one each; no GPU twice at once."""
    fake = FakeDdpm(pause=0.05)
    monkeypatch.setattr(R, "_call", fake)
    ids = ["0", "1", "2", "3"]
    R.run_experiments(["celebahq", "table1"], "paper", tmp_path / "runs", tmp_path / "results", None,
                      jobs=4, progress_every=0, gpus=ids)
    out = capsys.readouterr().out
    assert "GPUs: 4 (0,1,2,3)" in out and "except over torchrun: celebahq on 4" in out
    trains = {c["label"]: c for c in fake.calls if _is_train(c["cmd"])}
    assert set(trains) == {"celebahq train", "eps_simple train", "eps_vlb train"}
    chq = trains["celebahq train"]
    assert chq["cmd"][1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4"]
    assert sorted(chq["gpus"]) == ids
    for label in ("eps_simple train", "eps_vlb train"):
        assert trains[label]["cmd"][1:4] == ["-m", "ddpm", "train"] and len(trains[label]["gpus"]) == 1
    evals = [c for c in fake.calls if not _is_train(c["cmd"])]
    assert len(evals) == 3 and all(len(c["gpus"]) == 1 for c in evals)
    _check_intervals([(c["t0"], c["t1"], c["gpus"]) for c in fake.calls], 4)
    rec = json.loads((tmp_path / "results" / "paper" / "celebahq" / "train.json").read_text())
    assert rec["status"] == "finished" and sorted(rec["gpus"]) == ids
    # --gpus-per-run 2: every training over 2 GPUs
    fake2 = FakeDdpm()
    monkeypatch.setattr(R, "_call", fake2)
    R.run_experiments(["table2"], "paper", tmp_path / "runs2", tmp_path / "results2", None, jobs=4,
                      progress_every=0, gpus=ids, gpus_per_run=2)
    assert all(len(c["gpus"]) == 2 and "--nproc_per_node=2" in c["cmd"] for c in fake2.calls if _is_train(c["cmd"]))


def test_plan_on_a_gpu_machine_prints_the_schedule_and_starts_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(R, "_call", lambda *a, **k: pytest.fail("--plan started a process"))
    monkeypatch.setattr(R._Timer, "train", lambda self, cfg, k: 0.2 * k)  # GPU-seconds per step
    monkeypatch.setattr(R._Timer, "forward", lambda self, cfg: 1e-4)
    monkeypatch.setattr(R, "_gpu_name", lambda: "Simulated GPU (80 GiB)")
    R.run_experiments(["celebahq", "table1"], "paper", tmp_path / "runs", tmp_path / "results", None,
                      jobs=8, progress_every=0, gpus=[str(i) for i in range(8)], plan=True)
    out = capsys.readouterr().out
    assert not (tmp_path / "runs").exists() and not (tmp_path / "results").exists()
    rows = {tuple(ln.split()[:2]): ln for ln in out.splitlines() if ln.startswith("  ") and " GPU " in ln}
    chq = rows[("celebahq", "train")]
    assert "GPU 0,1,2,3,4,5,6,7" in chq and "500,000 steps to go at batch 64 = 8 GPUs x 8" in chq
    assert f"{500_000 * 0.2 * 8 / 3600:.1f} GPU-h" in chq
    assert rows[("eps_simple", "train")].split()[3] == "0"  # after celebahq, which asked first, on GPU 0
    assert "timed on this machine: Simulated GPU (80 GiB)" in out
    assert "expected end if started now:" in out and out.rstrip().endswith("--plan: nothing started")


def test_plan_on_the_cpu_starts_nothing_and_run_all_skips_the_report(tmp_path):
    env = {**os.environ, "DDPM_SKIP_INSTALL": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    dirs = ["--runs-dir", str(tmp_path / "runs"), "--results-dir", str(tmp_path / "results")]
    res = subprocess.run(["bash", "run_all.sh", "--profile", "smoke", "--plan", *dirs], cwd=REPO, env=env,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "no GPU here: nothing timed" in res.stdout
    assert any(ln.split()[:4] == ["eps_simple", "train", "4", "steps"] for ln in res.stdout.splitlines())
    assert "--plan: nothing started" in res.stdout
    assert "fid_floor" not in res.stdout + res.stderr and "Table 1" not in res.stdout  # no floor, report, check
    assert not (tmp_path / "runs").exists() and not (tmp_path / "results").exists()


def test_the_plans_timers_run_the_trainers_own_step():
    """What --plan times on a GPU, here on the CPU with a tiny model: the trainer's optimisation_step
    on the share of the batch one process gets, in its microbatches; a forward without gradients."""
    cfg = get_preset("tiny", ["train.batch_size=8", "train.microbatch=2"])
    assert G.time_train_step(cfg, 2, device="cpu", steps=1) > 0
    assert G.time_forward(cfg, batch=4, device="cpu", calls=1) > 0


@pytest.mark.parametrize("rc, then", [(1, ["experiments.fid_floor", "analysis.report", "analysis.claims",
                                            "analysis.check"]),
                                      (2, []), (130, [])])
def test_run_all_reports_what_finished_when_a_stage_failed(tmp_path, rc, then):
    """experiments.run exits 1 when a stage failed (the others ran): the tables are still regenerated,
    with the failed cells, and run_all.sh exits non-zero; a wrong option (2) or Ctrl-C (130) stops it."""
    calls = tmp_path / "calls"
    fake = tmp_path / "python"
    fake.write_text(f'#!/bin/bash\necho "$2" >> {calls}\n[[ "$2" == experiments.run ]] && exit {rc}\nexit 0\n')
    fake.chmod(0o755)
    env = {**os.environ, "DDPM_SKIP_INSTALL": "1", "PYTHON": str(fake)}
    res = subprocess.run(["bash", "run_all.sh", "--profile", "smoke"], cwd=REPO, env=env, capture_output=True,
                         text=True)
    assert res.returncode == rc
    assert calls.read_text().split() == ["experiments.run", *then]


def test_activation_memory_per_image_and_the_microbatch_that_fits():
    from experiments import activation_memory as M

    fp32, bf16 = M.per_image_bytes("tiny", False), M.per_image_bytes("tiny", True)
    assert 0 < bf16["per_image_bytes"] < fp32["per_image_bytes"]
    # 1 GiB per image, 1M params: 40 GB = 37.25 GiB, less 2 GiB and the state, over 1.25 GiB an image
    assert M.fitting_microbatch(2 ** 30, 10 ** 6, 64, 40e9 / 2 ** 30) == 16  # 28 fit; 16 divides 64
    assert M.fitting_microbatch(2 ** 30, 10 ** 6, 64, 80e9 / 2 ** 30) == 32
    assert M.fitting_microbatch(64 * 2 ** 30, 10 ** 6, 64, 40e9 / 2 ** 30) is None
