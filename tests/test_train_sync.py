"""The training loop without a device read per step; channels_last; the training set on the device.

A GPU runs ahead of the Python that launches its kernels; each read of a device value on the
host (``.item()``, ``.tolist()``, ``bool(t)``, ...) waits for the queue to drain. The loop reads
the device only at check points (log, checkpoint, sample grid, last step): in between, the
non-finite guard lives on the device, so a NaN is found at the next check point and reported
for the step where it happened. Everything runs a tiny UNet on 8x8 random images on the CPU.
"""

import json
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import on_loss_call  # noqa: E402
from test_train import images, one_thread  # noqa: E402,F401 (fixtures: the image folder, one thread)
from test_train import assert_same_weights, make_image_folder, tiny_config  # noqa: E402

from ddpm import data as D  # noqa: E402
from ddpm import train as TR  # noqa: E402
from ddpm.checkpoint import read_checkpoint  # noqa: E402
from ddpm.config import ConfigError, build_model  # noqa: E402


def stats(out: Path):
    return [json.loads(ln) for ln in (out / "stats.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------ deferred NaN check


def test_a_nan_between_check_points_is_reported_at_its_step_and_nothing_after_it_is_saved(images, tmp_path,
                                                                                        monkeypatch):
    # check points: log at 4, 8, 12; checkpoints at 3, 6, 9, 12; a grid at 6 and 12. The NaN of
    # step 10 spreads into the weights (steps 11 and 12 are NaN too): the guard must keep the first.
    cfg = tiny_config(images, **{"train.steps": 20, "train.log_every": 4, "train.ckpt_every": 3,
                                 "train.sample_every": 6})
    on_loss_call(monkeypatch, 10, "nan")
    out = tmp_path / "run"
    with pytest.raises(TR.TrainingDiverged) as e:
        TR.train(cfg, out, device="cpu", progress=False)
    monkeypatch.undo()
    msg = str(e.value)
    assert msg.startswith("non-finite loss at step 10: loss=nan, grad norm=nan; found at the check of step 12")
    assert "the updates of steps 10..12 were applied in memory but never saved" in msg
    assert f"Last good checkpoint: {out / 'last.pt'} (step 9)" in msg
    last = read_checkpoint(out / "last.pt")
    assert last["step"] == 9 and not (out / "final.pt").exists()
    assert all(torch.isfinite(v).all() for key in ("model", "ema") for v in last[key].values())
    # the stats line of the window 9..12 (which holds the NaN) is not written; the event is at step 10
    assert stats(out) == stats(out)[:2] + [{"step": 10, "event": "nonfinite", "loss": "nan", "grad_norm": "nan"}]
    assert [r["step"] for r in stats(out)[:2]] == [4, 8] and all("event" not in r for r in stats(out)[:2])
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step_0000006.png"]  # none at 12

    # the advice works as before: resume with a lower lr, recorded with the divergence's step
    res = TR.train(tiny_config(images, **{"train.steps": 20, "train.log_every": 4, "train.ckpt_every": 3,
                                          "train.sample_every": 6, "train.lr": 5e-5}),
                   out, resume=True, device="cpu", progress=False)
    assert res["finished"] and res["step"] == 20
    final = read_checkpoint(out / "final.pt")
    assert final["config"]["train"]["lr"] == 5e-5
    assert all(torch.isfinite(v).all() for v in final["model"].values())
    (resumed,) = json.loads((out / "run.json").read_text())["resumes"]
    assert resumed["reason"] == "non-finite loss at step 10" and resumed["resumed_from_step"] == 9
    assert [(r["step"], r.get("event")) for r in stats(out)] == [
        (4, None), (8, None), (10, "nonfinite"), (12, None), (16, None), (20, None)]


def test_a_nan_found_at_its_own_check_point(images, tmp_path, monkeypatch):
    cfg = tiny_config(images, **{"train.steps": 12, "train.log_every": 4, "train.ckpt_every": 4})
    on_loss_call(monkeypatch, 8, "nan")
    with pytest.raises(TR.TrainingDiverged, match=r"step 8: the update of step 8 was applied in memory but "
                                                 r"never saved.*last\.pt \(step 4\)"):
        TR.train(cfg, tmp_path / "run", device="cpu", progress=False)
    assert [r["step"] for r in stats(tmp_path / "run")] == [4, 8]  # 4: a line; 8: the event only
    assert stats(tmp_path / "run")[-1]["event"] == "nonfinite"


# ------------------------------------------------------------------------------ host reads

# What reads a tensor's value on the host (a device sync on a GPU).
READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy")


def count_reads(monkeypatch):
    """Every host read of a tensor from the training loop, by loop iteration (1-based; counted
    from the start of the iteration's run.batch). Not counted: the data stream's own work
    (next() on batch_stream's iterator: a DataLoader, numpy indices) and torch.optim's reads of
    its CPU step counter (on CUDA the trainer's fused Adam keeps that counter on the GPU)."""
    reads = defaultdict(list)
    where = {"iteration": 0, "paused": False}

    for name in READS:
        real = getattr(torch.Tensor, name)

        def counted(self, *a, _real=real, _name=name, **k):
            if not where["paused"] and where["iteration"] > 0:
                caller = sys._getframe(1).f_code.co_filename.replace("\\", "/")
                if "/torch/optim/" not in caller:
                    reads[where["iteration"]].append(_name)
            return _real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)

    real_stream, real_batch = TR.batch_stream, TR._Run.batch

    def stream(*a, **k):
        it = real_stream(*a, **k)

        class Paused:
            def __iter__(self):
                return self

            def __next__(self):
                where["paused"] = True
                try:
                    return next(it)
                finally:
                    where["paused"] = False
        return Paused()

    def batch(self, *a, **k):
        where["iteration"] += 1
        return real_batch(self, *a, **k)

    monkeypatch.setattr(TR, "batch_stream", stream)
    monkeypatch.setattr(TR._Run, "batch", batch)
    return reads


@pytest.mark.parametrize("extra", [{}, {"diffusion.var_type": "learned", "diffusion.loss_type": "vlb",
                                         "train.microbatch": 2, "train.channels_last": True}])
def test_no_host_read_per_step_and_one_per_log_step(images, tmp_path, monkeypatch, extra):
    """Steps 1..7; check points: the log steps 3 and 6, and the last step (whose checkpoint and
    sample grid read more). Fails on the old loop, which read the loss every step (.tolist())."""
    cfg = tiny_config(images, **{"train.steps": 7, "train.log_every": 3, "train.ckpt_every": 1000,
                                 "train.sample_every": 1000, **extra})
    reads = count_reads(monkeypatch)
    TR.train(cfg, tmp_path / "run", device="cpu", progress=False)
    monkeypatch.undo()
    per_step = {i: reads.get(i, []) for i in range(1, 7)}
    assert per_step == {1: [], 2: [], 3: ["tolist"], 4: [], 5: [], 6: ["tolist"]}
    assert reads[7]  # the last step: a check point, a grid and a checkpoint (the counting works)
    assert [r["step"] for r in stats(tmp_path / "run")] == [3, 6, 7]


def test_ctrl_c_of_one_process_is_still_seen_at_the_step(images, tmp_path, monkeypatch):
    # no check point near step 4: the host flag alone stops the run there, with a checkpoint of it
    cfg = tiny_config(images, **{"train.steps": 12, "train.log_every": 100, "train.ckpt_every": 100})
    on_loss_call(monkeypatch, 4, "sigint")
    res = TR.train(cfg, tmp_path / "run", device="cpu", progress=False)
    assert res["interrupted"] and res["step"] == 4
    assert read_checkpoint(tmp_path / "run" / "last.pt")["step"] == 4


# ------------------------------------------------------------------------- channels_last


def test_channels_last_trains_like_the_default_and_saves_ordinary_checkpoints(images, tmp_path, monkeypatch):
    # dropout 0: with dropout the masks are drawn in memory order, so they differ between layouts
    extra = {"model.dropout": 0.0, "train.steps": 4, "train.log_every": 1, "train.ckpt_every": 4}
    TR.train(tiny_config(images, **extra), tmp_path / "plain", device="cpu", progress=False)
    seen = []
    real = TR.optimisation_step

    def spy(state, net, diffusion, x0, t, noise, tc, d=None):
        conv = next(p for p in state.model.parameters() if p.dim() == 4)  # the input convolution, 3x3
        seen.append((x0.is_contiguous(memory_format=torch.channels_last) and not x0.is_contiguous(),
                     noise.is_contiguous(memory_format=torch.channels_last) and not noise.is_contiguous(),
                     conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()))
        return real(state, net, diffusion, x0, t, noise, tc, d)

    monkeypatch.setattr(TR, "optimisation_step", spy)
    cfg = tiny_config(images, **extra, **{"train.channels_last": True})
    TR.train(cfg, tmp_path / "cl", device="cpu", progress=False)
    monkeypatch.undo()
    assert seen == [(True, True, True)] * 4  # the network and every batch really were channels_last
    for a, b in zip(stats(tmp_path / "plain"), stats(tmp_path / "cl")):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    p, c = read_checkpoint(tmp_path / "plain" / "final.pt"), read_checkpoint(tmp_path / "cl" / "final.pt")
    assert_same_weights(p["model"], c["model"], exact=False, atol=1e-5)
    assert_same_weights(p["ema"], c["ema"], exact=False, atol=1e-5)
    # ordinary checkpoints: every tensor contiguous, the optimizer's moments too
    assert all(v.is_contiguous() for key in ("model", "ema") for v in c[key].values())
    assert all(v.is_contiguous() for s in c["optimizer"]["state"].values() for v in s.values())
    # ... that load into a plain model and give what the channels_last model gives
    plain, cl = build_model(cfg).eval(), build_model(cfg).eval().to(memory_format=torch.channels_last)
    plain.load_state_dict(c["ema"])
    cl.load_state_dict(c["ema"])
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(3, 3, 8, 8, generator=g), torch.tensor([0, 20, 49])
    with torch.no_grad():
        assert torch.allclose(plain(x, t), cl(x.contiguous(memory_format=torch.channels_last), t), atol=1e-5)


def test_a_channels_last_run_resumes_exactly(images, tmp_path, monkeypatch):
    extra = {"train.channels_last": True, "train.steps": 6, "train.ckpt_every": 3, "train.log_every": 3}
    TR.train(tiny_config(images, **extra), tmp_path / "a", device="cpu", progress=False)
    on_loss_call(monkeypatch, 5, "interrupt")  # dies in step 5: last.pt holds step 3
    with pytest.raises(KeyboardInterrupt):
        TR.train(tiny_config(images, **extra), tmp_path / "b", device="cpu", progress=False)
    monkeypatch.undo()
    TR.train(tiny_config(images, **extra), tmp_path / "b", resume=True, device="cpu", progress=False)
    a, b = read_checkpoint(tmp_path / "a" / "final.pt"), read_checkpoint(tmp_path / "b" / "final.pt")
    assert_same_weights(a["model"], b["model"])
    assert_same_weights(a["ema"], b["ema"])


def test_a_run_may_switch_channels_last_and_data_on_device_when_resumed(images, tmp_path):
    """Both change float rounding at most: allowed on --resume, and the change is recorded."""
    out = tmp_path / "run"
    TR.train(tiny_config(images, **{"train.steps": 3, "train.ckpt_every": 3}), out, device="cpu", progress=False)
    more = {"train.steps": 5, "train.ckpt_every": 3, "train.channels_last": True, "data.on_device": True}
    res = TR.train(tiny_config(images, **more), out, resume=True, device="cpu", progress=False)
    assert res["step"] == 5
    record = json.loads((out / "run.json").read_text())
    changes = record["resumes"][-1]["config_changes"]
    assert set(changes) >= {"train.channels_last", "data.on_device"}, changes
    with pytest.raises(TR.RunDirError, match="model.dropout"):  # the network itself is not a resumable change
        TR.train(tiny_config(images, **{**more, "train.steps": 7, "model.dropout": 0.3}), out, resume=True,
                 device="cpu", progress=False)


def test_the_new_switches_are_booleans(images):
    cfg = tiny_config(images, **{"train.channels_last": "true", "data.on_device": "yes"})
    assert cfg.train.channels_last is True and cfg.data.on_device is True
    cfg.train.channels_last = 1
    with pytest.raises(ConfigError, match="train.channels_last=1 must be true or false"):
        cfg.validate()
    with pytest.raises(ConfigError, match="data.on_device"):
        tiny_config(images, **{"data.on_device": "maybe"})


# ------------------------------------------------------------------- the data on the device


def test_batches_gathered_on_the_device_are_the_same_images_in_the_same_order():
    g = torch.Generator().manual_seed(0)
    ds = D.TensorImages(torch.randint(0, 256, (10, 3, 4, 4), dtype=torch.uint8, generator=g), "r")
    for rank, world in ((0, 1), (1, 2)):
        host = D.batch_stream(ds, seed=3, start_step=2, global_batch=4, rank=rank, world_size=world)
        dev = D.batch_stream(ds, seed=3, start_step=2, global_batch=4, rank=rank, world_size=world,
                             device=torch.device("cpu"))
        for _ in range(7):  # several epochs of 10 images, batches across their boundaries
            a, b = next(host), next(dev)
            assert a.dtype == b.dtype == torch.uint8 and torch.equal(a, b)


def test_a_set_read_from_files_cannot_live_on_the_device(images):
    lazy = D.FolderImages(images, 8, 3)
    with pytest.raises(D.DataError, match="data.on_device"):
        D.batch_stream(lazy, seed=0, start_step=0, global_batch=4, device=torch.device("cpu"))


def test_a_run_with_the_data_on_the_device_equals_one_without(images, tmp_path):
    extra = {"train.steps": 3, "train.log_every": 1, "train.ckpt_every": 3}
    TR.train(tiny_config(images, **extra), tmp_path / "a", device="cpu", progress=False)
    TR.train(tiny_config(images, **extra, **{"data.on_device": True}), tmp_path / "b", device="cpu", progress=False)
    a, b = read_checkpoint(tmp_path / "a" / "final.pt"), read_checkpoint(tmp_path / "b" / "final.pt")
    assert_same_weights(a["model"], b["model"])
    assert [r["loss"] for r in stats(tmp_path / "a")] == [r["loss"] for r in stats(tmp_path / "b")]


# ------------------------------------------------------------------------------------- DDP


def _ddp_worker(rank, world, ports, folder, out):
    """Two runs on 2 processes; rank 1 alone misbehaves: a NaN loss at step 5, then a Ctrl-C in step 4."""
    import os
    import signal

    from ddpm.diffusion import GaussianDiffusion

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(ports[0]), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    real, calls = GaussianDiffusion.training_losses, {"n": 0, "action": "nan"}

    def misbehaving(self, *a, **k):
        calls["n"] += 1
        res = real(self, *a, **k)
        if rank == 1 and calls["n"] == 5 and calls["action"] == "nan":
            res["loss"] = res["loss"] * float("nan")
        if rank == 1 and calls["n"] == 4 and calls["action"] == "sigint":
            os.kill(os.getpid(), signal.SIGINT)
        return res

    GaussianDiffusion.training_losses = misbehaving
    cfg = tiny_config(Path(folder), **{"train.steps": 9, "train.batch_size": 8, "train.log_every": 3,
                                       "train.ckpt_every": 3, "train.sample_every": 1000})
    seen = {}
    try:
        TR.train(cfg, Path(out) / "nan", device="cpu", progress=False)
    except TR.TrainingDiverged as e:
        seen["nan"] = str(e)
    calls.update(n=0, action="sigint")
    # The second run's process group on a port of its own: on the first one, a rank quick to get
    # there could join the store of the first group before the other rank has torn it down (a hang).
    os.environ["MASTER_PORT"] = str(ports[1])
    seen["sigint"] = TR.train(cfg, Path(out) / "sigint", device="cpu", progress=False)
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(seen))


def test_under_ddp_every_rank_stops_together_at_the_check_point(tmp_path):
    import socket

    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("needs gloo")
    folder = make_image_folder(tmp_path / "imgs", n=20)
    with socket.socket() as s1, socket.socket() as s2:  # two free ports (both held while chosen)
        s1.bind(("127.0.0.1", 0))
        s2.bind(("127.0.0.1", 0))
        ports = (s1.getsockname()[1], s2.getsockname()[1])
    mp.spawn(_ddp_worker, args=(2, ports, str(folder), str(tmp_path)), nprocs=2, join=True)
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    # the NaN of rank 1 at step 5 reaches rank 0 through the summed loss: both raise at step 6
    for s in seen:
        assert s["nan"].startswith("non-finite loss at step 5: loss=nan")
        assert "found at the check of step 6" in s["nan"] and "last.pt (step 3)" in s["nan"]
    assert read_checkpoint(tmp_path / "nan" / "last.pt")["step"] == 3
    assert [(r["step"], r.get("event")) for r in stats(tmp_path / "nan")] == [(3, None), (5, "nonfinite")]
    # rank 1's Ctrl-C in step 4 is agreed on at the next check point, step 6, by both ranks
    assert [s["sigint"]["step"] for s in seen] == [6, 6] and all(s["sigint"]["interrupted"] for s in seen)
    assert read_checkpoint(tmp_path / "sigint" / "last.pt")["step"] == 6
