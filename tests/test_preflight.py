"""experiments.preflight: each check fails on its own cause with one line that says what to do,
and anything that blocks stops experiments.run with exit 2 before any stage starts.

The causes are made with monkeypatching: no CUDA, no data dir, a folder with too few images,
Inception weights without logits, too little disk, a training step out of GPU memory.
"""

import json
import shutil
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ddpm.data
import ddpm.inception
from ddpm.config import get_preset
from experiments import gpus as G
from experiments import preflight as P
from experiments import run as R

Usage = namedtuple("Usage", "total used free")


def _one_line(check):
    assert "\n" not in check.message and check.message
    return check.message


@pytest.fixture
def no_data_dirs(tmp_path, monkeypatch):
    """No data dir holds anything: --data-dir, $DDPM_DATA_DIR, ./data and ../shared/data all empty."""
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.delenv(ddpm.data.ENV_DATA_DIR, raising=False)
    monkeypatch.setattr(ddpm.data, "DEFAULT_DATA_DIR", str(empty / "data"))
    monkeypatch.setattr(ddpm.data, "SHARED_DATA_DIR", empty / "shared")
    return empty


class OfflineInception:
    """ddpm.inception.Inception as it loads offline: converted weights, no logits."""

    def __init__(self, weights=None, device="cpu", with_logits=False):
        self.offline, self.path, self.source = True, Path("/cache/inception-converted.pth"), "DDPM_INCEPTION_WEIGHTS"


class OnlineInception(OfflineInception):
    def __init__(self, *a, **k):
        super().__init__()
        self.offline, self.path = False, None


def test_no_cuda_blocks_the_paper_profile_and_is_a_note_elsewhere(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    c = P.check_cuda("paper")
    assert not c.ok and _one_line(c).startswith("no CUDA GPU (torch ")
    assert "the paper profile does not train on the CPU; run on a GPU machine" in c.message
    assert P.check_cuda("quick").ok and "the quick profile runs on the CPU" in P.check_cuda("quick").message
    # without a GPU no training step is tried, and that is said
    step = P.Step(("eps_simple",), "cifar10", get_preset("cifar10"), 1)
    assert [c.name for c in P.gpu_checks("quick", [step])] == ["cuda", "train step"]
    assert "skipped: no GPU here" in P.gpu_checks("quick", [step])[1].message


def test_a_missing_data_dir_blocks_with_where_it_looked(no_data_dirs):
    c, = P.check_data([get_preset("smoke-mnist").data], str(no_data_dirs / "nowhere"))
    assert c.name == "data mnist" and not c.ok
    assert _one_line(c).startswith("MNIST not found in any data dir (searched ")
    assert "pass --data-dir DIR" in c.message


def test_an_incomplete_split_blocks(monkeypatch):
    monkeypatch.setattr(ddpm.data, "split_images",
                        lambda dataset, split, *a: torch.zeros((100 if split == "train" else 10_000, 3, 32, 32)))
    c, = P.check_data([get_preset("cifar10").data], None)
    assert not c.ok and _one_line(c) == ("train has 100 images, 50,000 expected: incomplete; replace it with a "
                                         "complete copy")


def test_a_folder_with_too_few_images_blocks(tmp_path, no_data_dirs):
    folder = tmp_path / "data" / "celebahq256"
    folder.mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(folder / f"{i}.png")
    c, = P.check_data([get_preset("celebahq256").data], str(tmp_path / "data"))
    assert c.name == "data folder celebahq256" and not c.ok
    assert _one_line(c) == (f"{folder} holds 3 images, fewer than the 30,000 of the full set: put all of them "
                            f"there (any layout, searched recursively)")
    c, = P.check_data([get_preset("celebahq256").data], str(no_data_dirs))  # no such folder at all
    assert not c.ok and _one_line(c).startswith("image folder 'celebahq256' does not exist")


def test_inception_weights_without_logits_block_the_paper_profile_unless_allowed(monkeypatch):
    monkeypatch.setattr(ddpm.inception, "Inception", OfflineInception)
    c = P.check_inception("paper", needs_is=True, allow_no_is=False)
    assert not c.ok and "have no logits, so no Inception Score" in _one_line(c)
    assert "pass --allow-no-is to run without IS" in c.message
    allowed = P.check_inception("paper", needs_is=True, allow_no_is=True)
    assert allowed.ok and allowed.message.endswith("IS will be reported unavailable (--allow-no-is)")
    assert P.check_inception("quick", needs_is=True, allow_no_is=False).ok  # a note at the small profiles
    assert P.check_inception("paper", needs_is=False, allow_no_is=False).ok  # FID/KID only: nothing missing
    monkeypatch.setattr(ddpm.inception, "Inception", OnlineInception)
    assert P.check_inception("paper", True, False) == ("inception", True, "torch-fidelity's weights: FID, KID and IS")

    def unloadable(*a, **k):
        raise ddpm.inception.FidelityError("offline Inception weights /x.pth do not exist")

    monkeypatch.setattr(ddpm.inception, "Inception", unloadable)
    c = P.check_inception("quick", True, False)
    assert not c.ok and _one_line(c).startswith("the Inception network of FID/KID/IS does not load "
                                                "(FidelityError: offline Inception weights /x.pth do not exist)")


def test_too_little_disk_blocks_with_the_estimate(tmp_path, monkeypatch):
    work = P.work_left(["table1"], "paper", tmp_path / "runs", tmp_path / "results")
    assert sorted(work.trainings) == ["eps_simple", "eps_vlb"] and len(work.evaluations) == 2
    # 2 trainings x 2 checkpoints x 16 bytes x 35.7M parameters, 2 x 50,000 CIFAR10 samples
    need = 2 * 2 * 16 * P._params(get_preset("cifar10")) + 2 * 50_000 * 3 * 32 * 32
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(2**40, 2**40 - need + 1, need - 1))
    c = P.check_disk(work, "paper", tmp_path / "runs")
    assert not c.ok and _one_line(c).endswith("free there: free some space, or pass --runs-dir on a larger disk")
    assert "2 trainings' checkpoints 2.1 GiB, 2 evaluations' 50,000 samples 293.0 MiB" in c.message
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(2**40, 0, need))
    assert P.check_disk(work, "paper", tmp_path / "runs").ok


def test_a_training_step_out_of_gpu_memory_blocks_with_what_to_lower(monkeypatch):
    def oom(cfg, processes, steps=3):
        assert processes == 1 and cfg.train.microbatch == 8
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(G, "time_train_step", oom)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(P, "_gpu_memory", lambda: ("Simulated GPU", 40.0, 0.0))
    c, = P.check_train_steps([P.Step(("celebahq",), "celebahq256", get_preset("celebahq256"), 1)])
    assert c.name == "train step celebahq" and not c.ok
    assert _one_line(c) == ("out of memory on Simulated GPU (40 GiB) at 64 images per GPU in microbatches of 8: "
                            "lower train.microbatch in preset 'celebahq256' (ddpm/config.py; README, 'On GPUs' "
                            "gives what fits 40 and 80 GB)")
    monkeypatch.setattr(G, "time_train_step", lambda cfg, processes, steps=3: 0.5)
    monkeypatch.setattr(P, "_gpu_memory", lambda: ("Simulated GPU", 80.0, 61.3))
    c, = P.check_train_steps([P.Step(("celebahq",), "celebahq256", get_preset("celebahq256"), 8)])
    assert c.ok and c.message == "8 images per GPU over 8 GPUs: 0.50 s a step, peak 61.3 of 80 GiB on Simulated GPU"


def test_one_step_per_distinct_configuration_at_its_gpus(tmp_path):
    work = P.work_left(["table2", "celebahq"], "paper", tmp_path / "runs", tmp_path / "results")
    steps = P.distinct_steps(work, "paper", 8, None)
    assert {s.runs[0]: s.gpus for s in steps}["celebahq"] == 8  # the registry's GPUS_PER_RUN
    assert sorted(r for s in steps for r in s.runs) == sorted(work.trainings)
    assert all(s.gpus == 1 for s in steps if s.runs[0] != "celebahq")


def test_the_command_lists_every_check_and_exits_2_when_one_blocks(tmp_path, monkeypatch, capsys, no_data_dirs):
    monkeypatch.setattr(ddpm.inception, "Inception", OfflineInception)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    dirs = ["--runs-dir", str(tmp_path / "runs"), "--results-dir", str(tmp_path / "results")]
    assert P.main(["--profile", "smoke", "mnist", *dirs, "--data-dir", str(no_data_dirs)]) == P.EXIT_BLOCKED == 2
    out = capsys.readouterr().out
    lines = {ln.split()[1]: ln.split()[0] for ln in out.splitlines() if ln.startswith("  ")}
    assert lines == {"cuda": "ok", "train": "ok", "data": "BLOCKS", "inception": "ok", "disk": "ok"}
    assert "preflight: 1 of 5 checks block the smoke profile (data mnist); nothing was started" in out
    record = json.loads((tmp_path / "results" / "smoke" / "preflight.json").read_text())
    assert record["blocked"] and [c["name"] for c in record["checks"] if not c["ok"]] == ["data mnist"]


def test_the_command_passes_on_complete_data(tmp_path, monkeypatch, capsys, shared_data):
    monkeypatch.setattr(ddpm.inception, "Inception", OfflineInception)
    dirs = ["--runs-dir", str(tmp_path / "runs"), "--results-dir", str(tmp_path / "results")]
    assert P.main(["--profile", "smoke", "mnist", *dirs, "--data-dir", str(shared_data), "--allow-no-is"]) == 0
    out = capsys.readouterr().out
    assert "data mnist" in out and "60,000 train + 10,000 test images" in out and "all 5 checks passed" in out
    record = json.loads((tmp_path / "results" / "smoke" / "preflight.json").read_text())
    assert record["allow_no_is"] is True and not record["blocked"]


def test_experiments_run_stops_before_any_stage_when_the_preflight_blocks(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(R, "_call", lambda *a, **k: pytest.fail("a stage started despite the preflight"))
    blocked = [P.Check("cuda", False, "no CUDA GPU (simulated): the paper profile does not train on the CPU"),
               P.Check("disk", True, "about 1 GiB to write")]
    monkeypatch.setattr(P, "preflight", lambda *a, **k: blocked)
    with pytest.raises(SystemExit) as e:
        R.run_experiments(["table1"], "paper", tmp_path / "runs", tmp_path / "results", None, gpus=[],
                          progress_every=0, preflight=True, allow_no_is=True)
    assert e.value.code == 2
    assert "BLOCKS cuda" in capsys.readouterr().out
    assert json.loads((tmp_path / "results" / "paper" / "preflight.json").read_text())["allow_no_is"] is True


@pytest.mark.parametrize("args, expected", [
    (["--profile", "paper"], True), (["--profile", "paper", "--no-preflight"], False),
    (["--profile", "paper", "--plan"], False), (["--profile", "quick"], False),
    (["--profile", "smoke", "--preflight"], True),
])
def test_experiments_run_runs_the_preflight_at_the_paper_profile_by_default(monkeypatch, args, expected):
    seen = {}
    monkeypatch.setattr(R, "run_experiments", lambda *a, **k: seen.update(k))
    assert R.main(["table1", *args]) == 0
    assert seen["preflight"] is expected and seen["launcher"] is None
