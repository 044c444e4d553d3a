"""Distributed, resumable evaluation (ddpm.evaluate) and the splits the runner asks for.

K processes (gloo on the CPU here; one GPU each under torchrun) share the sample shards and the
bound's batches, and rank 0 alone computes the metrics: metrics.json holds the values of one
process. The bound keeps each batch in its own file, so a killed evaluation resumes to the terms
of an uninterrupted one, and a batch file of another request is refused, never reused. A single
process gives the numbers it gave before batch files existed (a copy of that code is below).
"""

import dataclasses
import json
import os
import shutil
import socket
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import require_fid_helper
from ddpm import evaluate as E
from ddpm.data import to_model_range
from ddpm.runtime import Dist, derive_seed
from test_evaluate import tiny_checkpoint  # noqa: F401  (fixture: a tiny MNIST checkpoint, T = 21)

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # as each worker: the same float summation order
    yield
    torch.set_num_threads(n)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, spec, dies_at=None):
    """One process of ``world``; ``dies_at`` = (rank, n): that rank fails as it starts its n-th
    bound batch."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    E.WAIT = timedelta(seconds=60)  # a process left waiting fails in a minute, not in hours
    if dies_at is not None and dies_at[0] == rank:
        real, made = E.bound_batch, []

        def dies(*args, **kw):
            if len(made) == dies_at[1]:
                raise RuntimeError(f"rank {rank} killed")
            made.append(args[3])
            return real(*args, **kw)

        E.bound_batch = dies
    report = E.run_evaluation(spec, progress=False)
    assert (report is None) == (rank != 0)  # rank 0 alone reports
    assert not dist.is_initialized(), "run_evaluation must leave the process group it joined"


def _spawn(spec, world=2, dies_at=None):
    mp.spawn(_worker, args=(world, _free_port(), spec, dies_at), nprocs=world, join=True)


def _values(m):
    """metrics.json's results without how long they took, where the folder was and how many
    processes made them."""
    skip = {"elapsed_s", "inception_elapsed_s", "world_size", "folder", "device"}
    return {k: {kk: vv for kk, vv in v.items() if kk not in skip} for k, v in m["results"].items()}


def _files(folder: Path, pattern: str):
    return {p.name: p.read_bytes() for p in sorted(folder.glob(pattern))}


def test_two_processes_write_the_metrics_of_one_and_resume(tiny_checkpoint, shared_data, tmp_path, monkeypatch,
                                                           one_thread):
    """FID, KID, NLL on test and train and rd from 1 and from 2 gloo processes: the same values;
    the same sample shards and bound batches, byte for byte. Then, with a shard and a batch of
    each split deleted (a kill), 2 processes make only those again: the same values once more."""
    from ddpm import inception as F

    require_fid_helper()
    w = F.build_inception_weights(tmp_path / "inception.pth")
    monkeypatch.setenv(F.ENV_CACHE, str(tmp_path / "cache"))  # the spawned processes inherit it
    one = E.EvalSpec(str(tiny_checkpoint), ("fid", "kid", "nll", "rd"), n=6, batch_size=4, nll_n=5, nll_batch_size=2,
                     nll_splits=("test", "train"), data_dir=str(shared_data), reference="mnist:test", reference_n=6,
                     seed=3, inception_weights=str(w), figures=False, device="cpu", out_dir=str(tmp_path / "one"))
    two = dataclasses.replace(one, out_dir=str(tmp_path / "two"))
    E.run_evaluation(one, progress=False)
    _spawn(two)

    m1, m2 = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("one", "two"))
    assert m1["run"]["world_size"] == 1 and m2["run"]["world_size"] == 2
    assert m2["results"]["fid"]["world_size"] == 2
    assert set(m1["results"]) == {"sampling", "fid", "kid", "nll_test", "nll_train", "rd"}
    assert _values(m1) == _values(m2)
    assert np.isfinite(m2["results"]["fid"]["value"]) and m2["results"]["nll_train"]["n"] == 5
    assert _files(tmp_path / "one" / "samples", "shard_*.npz") == _files(tmp_path / "two" / "samples", "shard_*.npz")
    for split in ("test", "train"):
        batches = _files(tmp_path / "two" / f"bound_{split}", "batch_*.npz")
        assert sorted(batches) == ["batch_00000.npz", "batch_00001.npz", "batch_00002.npz"]
        assert _files(tmp_path / "one" / f"bound_{split}", "batch_*.npz") == batches

    kept = {p: p.stat().st_mtime_ns for p in (tmp_path / "two").glob("*/*.*")}  # shards, batches, manifests
    killed = [tmp_path / "two" / "samples" / "shard_00001.npz"] + [
        tmp_path / "two" / f"bound_{split}" / "batch_00001.npz" for split in ("test", "train")]
    for path in killed:
        path.unlink()
    _spawn(two)
    again = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert _values(again) == _values(m1) and len(again["run"]["earlier_calls"]) == 1
    assert all(path.exists() for path in killed)
    # only those were made again: every other file is the one written by the first call
    assert {p: t for p, t in kept.items() if p not in killed} == {
        p: p.stat().st_mtime_ns for p in (tmp_path / "two").glob("*/*.*") if p not in killed}


def test_a_process_that_fails_midway_stops_them_all(tiny_checkpoint, shared_data, tmp_path):
    """Rank 1 fails as it starts its second bound batch (of 4): the spawn ends with its error
    (rank 0 does not wait for it), no metrics.json is written, and a rerun completes the set."""
    spec = E.EvalSpec(str(tiny_checkpoint), ("nll",), nll_n=8, nll_batch_size=2, nll_splits=("test",),
                      data_dir=str(shared_data), seed=1, figures=False, device="cpu", out_dir=str(tmp_path / "ev"))
    with pytest.raises(mp.ProcessRaisedException, match="rank 1 killed"):
        _spawn(spec, dies_at=(1, 1))
    folder = tmp_path / "ev" / "bound_test"
    assert (folder / "batch_00001.npz").exists() and not (folder / "batch_00003.npz").exists()
    assert not (tmp_path / "ev" / "metrics.json").exists()
    report = E.run_evaluation(spec, progress=False)
    assert report["results"]["nll_test"]["n"] == 8 and len(list(folder.glob("batch_*.npz"))) == 4


def _old_bound_terms(model, diffusion, images, batch_size, seed):
    """ddpm.bound.bound_terms as it was before batch files (a copy): the numbers of one process."""
    parts = {k: [] for k in ("total_bpd_b", "prior_bpd_b", "terms_bpd_bt", "mse_bt")}
    with torch.inference_mode():
        for k, s in enumerate(range(0, images.shape[0], batch_size)):
            x0 = to_model_range(images[s:s + batch_size])
            g = torch.Generator()
            g.manual_seed(derive_seed(seed, k))
            out = diffusion.calc_bpd_loop(model, x0, clip_x0=True, max_batch=256, generator=g)
            for key in parts:
                parts[key].append(out[key].double().cpu().numpy())
    return {k: np.concatenate(v) for k, v in parts.items()}


def test_an_interrupted_bound_resumes_to_the_terms_of_an_uninterrupted_one(tiny_checkpoint, shared_data, tmp_path,
                                                                           monkeypatch, one_thread):
    """7 test images in 4 batches; the first call dies after 2 batches, the second computes
    only batches 2 and 3: the same per-image terms, NLL and rate-distortion as one uninterrupted
    call, and as the bound before batch files."""
    from ddpm.loading import load_model
    from ddpm.sources import load_images

    spec = E.EvalSpec(str(tiny_checkpoint), ("nll", "rd"), nll_n=7, nll_batch_size=2, nll_splits=("test",),
                      data_dir=str(shared_data), seed=4, figures=False, device="cpu", out_dir=str(tmp_path / "cut"))
    whole = E.run_evaluation(dataclasses.replace(spec, out_dir=str(tmp_path / "whole")), progress=False)

    real, made = E.bound_batch, []

    def dies_after_two(model, diffusion, images, k, **kw):
        if len(made) == 2:
            raise RuntimeError("killed")
        made.append(k)
        return real(model, diffusion, images, k, **kw)

    monkeypatch.setattr(E, "bound_batch", dies_after_two)
    with pytest.raises(RuntimeError, match="killed"):
        E.run_evaluation(spec, progress=False)
    folder = tmp_path / "cut" / "bound_test"
    assert sorted(p.name for p in folder.glob("batch_*.npz")) == ["batch_00000.npz", "batch_00001.npz"]
    assert not (tmp_path / "cut" / "metrics.json").exists()

    made.clear()
    monkeypatch.setattr(E, "bound_batch", lambda model, diffusion, images, k, **kw: made.append(k) or real(
        model, diffusion, images, k, **kw))
    resumed = E.run_evaluation(spec, progress=False)
    assert made == [2, 3]  # only what the killed call had not finished
    for key in ("nll_test", "rd"):
        assert _values(resumed)[key] == _values(whole)[key]
    a, b = np.load(tmp_path / "cut" / "bound_terms_test.npz"), np.load(tmp_path / "whole" / "bound_terms_test.npz")
    for key in a.files:
        np.testing.assert_array_equal(a[key], b[key])

    # the numbers of the bound before batch files, from a copy of its code
    _, model, diffusion, _ = load_model(tiny_checkpoint, ema=True)
    images = load_images("mnist:test", str(shared_data), 7, seed=2020, resize_to=(1, 28))[0]
    old = _old_bound_terms(model.eval(), diffusion, images, 2, seed=4)
    nll = resumed["results"]["nll_test"]
    assert nll["value"] == E.summarize_nll(old)["bpd"] and nll["se"] == E.summarize_nll(old)["bpd_se"]
    assert nll["per_image_bpd"] == [round(float(v), 6) for v in old["total_bpd_b"]]
    assert resumed["results"]["rd"]["table4"] == E.table4_rows(E.rate_distortion(old))


def test_bound_files_of_another_request_are_refused_before_anything_is_computed(tiny_checkpoint, shared_data,
                                                                                tmp_path, monkeypatch, capsys):
    from ddpm.cli import main

    def spec(seed, out):
        return E.EvalSpec(str(tiny_checkpoint), ("nll",), nll_n=4, nll_batch_size=2, nll_splits=("test",),
                          data_dir=str(shared_data), seed=seed, figures=False, device="cpu", out_dir=str(out))

    E.run_evaluation(spec(1, tmp_path / "a"), progress=False)
    E.run_evaluation(spec(2, tmp_path / "b"), progress=False)
    a, b = tmp_path / "a" / "bound_test", tmp_path / "b" / "bound_test"
    made = []
    real = E.bound_batch
    monkeypatch.setattr(E, "bound_batch", lambda *x, **k: made.append(x[3]) or real(*x, **k))

    # one batch of seed 1 among those of seed 2: refused, naming the file, nothing computed
    shutil.copy(a / "batch_00001.npz", b / "batch_00001.npz")
    with pytest.raises(E.EvalError, match=r"batch_00001.npz is batch 1 of another request .* never reused"):
        E.run_evaluation(spec(2, tmp_path / "b"), progress=False)
    rc = main(["eval", "--checkpoint", str(tiny_checkpoint), "--metrics", "nll", "--nll-n", "4", "--nll-batch-size",
               "2", "--nll-splits", "test", "--seed", "2", "--out", str(tmp_path / "b"), "--data-dir", str(shared_data),
               "--no-figures", "--no-progress", "--device", "cpu"])
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("data: ")]
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and "delete it and rerun" in err[0]
    # the whole folder of another request (its manifest): refused, saying what differs
    (b / "batch_00001.npz").unlink()
    own = (b / "manifest.json").read_text()
    shutil.copy(a / "manifest.json", b / "manifest.json")
    with pytest.raises(E.EvalError, match=r"holds the bound's batches of a different run \(seed: 1 there, 2 now\)"):
        E.run_evaluation(spec(2, tmp_path / "b"), progress=False)
    # a file that is not a whole batch
    (b / "manifest.json").write_text(own)
    (b / "batch_00000.npz").write_bytes(b"not a batch")
    with pytest.raises(E.EvalError, match="batch_00000.npz is not a whole batch file"):
        E.run_evaluation(spec(2, tmp_path / "b"), progress=False)
    assert made == []
    # removed, it is computed again: the values of the first call
    (b / "batch_00000.npz").unlink()
    again = E.run_evaluation(spec(2, tmp_path / "b"), progress=False)
    assert made == [0, 1]
    first = json.loads((tmp_path / "b" / "metrics.json").read_text())["run"]["earlier_calls"]
    assert len(first) == 1 and again["results"]["nll_test"]["n"] == 4


def test_a_process_that_cannot_start_stops_them_all_before_sampling(tiny_checkpoint, shared_data, tmp_path,
                                                                   monkeypatch):
    """Rank 0 learns that rank 1 failed to prepare (the gather every process joins after
    prepare) and stops with one line naming it, before computing anything. A process whose
    prepare failed raises its own error, even when that exchange fails too."""

    class Rank0Of2(Dist):
        def gather(self, obj):
            return [obj, ("EvalError: no data here", None)]

    class Lost(Dist):
        def gather(self, obj):
            raise RuntimeError("connection closed by peer")

    made = []
    monkeypatch.setattr(E, "bound_batch", lambda *args, **kw: made.append(args[3]))
    monkeypatch.setattr(E, "join_processes", lambda spec: Rank0Of2(0, 2))
    spec = E.EvalSpec(str(tiny_checkpoint), ("nll",), nll_n=2, nll_splits=("test",), data_dir=str(shared_data),
                      figures=False, device="cpu", out_dir=str(tmp_path / "ev"))
    with pytest.raises(E.EvalError, match=r"process 1 of 2 stopped before any sampling \(EvalError: no data here\)"):
        E.run_evaluation(spec, progress=False)
    assert made == [] and not (tmp_path / "ev" / "metrics.json").exists()

    with pytest.raises(E.EvalError, match="no metrics asked for"):
        E._prepare_everywhere(dataclasses.replace(spec, metrics=()), Lost(1, 2))
    with pytest.raises(RuntimeError, match="connection closed"):
        E._prepare_everywhere(spec, Lost(1, 2))


def test_an_explicit_gpu_other_than_local_rank_is_refused_under_torchrun(tiny_checkpoint, tmp_path, monkeypatch):
    """--device cuda:1 in every process of torchrun would put them all on one GPU: refused."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setattr(E, "pick_device", lambda name: torch.device(name))  # as if this machine had 2 GPUs
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    spec = E.EvalSpec(str(tiny_checkpoint), ("nll",), device="cuda:1", out_dir=str(tmp_path / "ev"))
    with pytest.raises(E.EvalError, match=r"--device cuda:1 under torchrun: process LOCAL_RANK=0 must use cuda:0"):
        E.join_processes(spec)
    assert not dist.is_initialized()


# ------------------------------------------------------------------------------ the runner


def test_only_table1_asks_for_train_nll_and_only_at_the_paper_profile(tmp_path, monkeypatch):
    from ddpm.config import get_preset
    from experiments import run as R
    from analysis import paper
    from experiments.registry import EXPERIMENTS, MAIN, PROFILES, TABLE1_RUNS

    for profile in PROFILES:
        shared = {}
        for e in EXPERIMENTS.values():
            for r in e.runs:
                for ev in e.evals:
                    assert shared.setdefault((r, ev.name), ev) == ev  # as run_experiments asserts
                    train = "train" in ev.nll_splits(r, profile)
                    assert ev.nll_splits(r, profile)[0] == "test"
                    assert train == (profile == "paper" and r in TABLE1_RUNS and ev is MAIN), (profile, r, ev.name)
    assert set(TABLE1_RUNS) == set(paper.TABLE1)  # the rows analysis.report prints with NLL train

    def nll_splits_arg(run, profile):
        seen = []
        monkeypatch.setattr(R, "_stage", lambda argv, log, label, gpus=1: seen.append(argv) or R.Ran(0, [], []))
        R.eval_run(run, MAIN, profile, tmp_path / "runs", tmp_path / "results", None)
        (argv,) = seen
        return argv[argv.index("--nll-splits") + 1]

    assert nll_splits_arg("eps_simple", "paper") == "test,train" and nll_splits_arg("eps_vlb", "paper") == "test,train"
    assert nll_splits_arg("mu_vlb", "paper") == "test" and nll_splits_arg("released_cifar10", "paper") == "test"
    assert nll_splits_arg("eps_simple", "quick") == "test" and nll_splits_arg("eps_simple", "smoke") == "test"
    # the plan counts the train bound (50,000 images x T) where it is computed
    cfg = get_preset("cifar10")
    calls = {r: R.eval_forwards(MAIN, cfg, "paper", r) for r in ("eps_simple", "mu_vlb")}
    assert calls["eps_simple"] - calls["mu_vlb"] == 50_000 * cfg.diffusion.T
    # at quick no run's bound has a train split: 500 samples and 200 test images, x T each
    assert R.eval_forwards(MAIN, cfg, "quick", "eps_simple") == (500 + 200) * cfg.diffusion.T
    # the order of the runs counts it by run too: the released weights get no train bound
    assert R.run_forwards("released_cifar10", {"main": MAIN}, "paper") == calls["mu_vlb"]
