"""The trainer: the run directory, exact resume (also after kill -9), divergence, overwrite protection.

Everything runs a tiny UNet on a folder of 8x8 random images on the CPU.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import on_loss_call
from ddpm import train as TR
from ddpm.checkpoint import CheckpointError, read_checkpoint
from ddpm.config import Config, get_preset
from ddpm.diffusion import GaussianDiffusion

REPO = Path(__file__).resolve().parents[1]


def make_image_folder(root: Path, n: int = 24, size: int = 8, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / f"{i:03d}.png")
    return root


def tiny_overrides(folder: Path, **extra) -> dict:
    o = {"data.dataset": "folder", "data.path": str(folder), "data.resolution": 8, "data.channels": 3,
         "data.hflip": True, "data.num_workers": 0, "model.ch": 32, "model.ch_mult": (1, 2),
         "model.num_res_blocks": 1, "model.attn_resolutions": (4,), "model.dropout": 0.1,
         "diffusion.T": 50, "train.steps": 12, "train.batch_size": 4, "train.warmup": 3,
         "train.ema_decay": 0.9, "train.log_every": 4, "train.sample_every": 1000,
         "train.ckpt_every": 5}
    o.update(extra)
    return o


def tiny_config(folder: Path, **extra) -> Config:
    return get_preset("tiny", tiny_overrides(folder, **extra))


def as_cli_sets(overrides: dict) -> list:
    out = []
    for k, v in overrides.items():
        v = ",".join(map(str, v)) if isinstance(v, tuple) else v
        out += ["--set", f"{k}={v}"]
    return out


def assert_same_weights(a: dict, b: dict, exact=True, atol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), k
        else:
            assert torch.allclose(a[k], b[k], atol=atol, rtol=1e-4), (k, (a[k] - b[k]).abs().max())


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The CI/dev machine has 2 shared cores: intra-op threads fighting over them make tiny
    convolutions ~7x slower, so these tests run single-threaded (subprocesses too: runs compared
    bit for bit must use the same thread count)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("imgs"))


# ------------------------------------------------------------------------- pure functions


def test_warmup_is_linear_from_zero_like_the_official_code():
    assert TR.warmup_lr(2e-4, 5000, 0) == 0.0
    assert TR.warmup_lr(2e-4, 5000, 2500) == pytest.approx(1e-4)
    assert TR.warmup_lr(2e-4, 5000, 5000) == TR.warmup_lr(2e-4, 5000, 10 ** 6) == 2e-4
    assert TR.warmup_lr(2e-4, 0, 0) == 2e-4


def test_ema_update_is_decay_times_ema_plus_rest_times_model():
    torch.manual_seed(0)
    model, ema = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    TR.ema_update(ema, model, 0.9)
    for k, v in ema.state_dict().items():
        assert torch.allclose(v, 0.9 * before[k] + 0.1 * model.state_dict()[k], atol=1e-7)


# ---------------------------------------------------------------------------- a full run


def test_run_directory_contents(images, tmp_path, monkeypatch):
    cfg = tiny_config(images, **{"train.sample_every": 6})
    out = tmp_path / "run"
    seen = []  # (t, per-example loss) of every training batch
    real = GaussianDiffusion.training_losses

    def spy(self, model, x0, t, noise=None):
        res = real(self, model, x0, t, noise)
        seen.append((t.clone(), res["loss"].detach().double().clone()))
        return res

    monkeypatch.setattr(GaussianDiffusion, "training_losses", spy)
    res = TR.train(cfg, out, device="cpu", progress=False)
    monkeypatch.undo()
    assert res["step"] == 12 and res["finished"]
    # config.json is the resolved config and reads back to the same Config
    assert Config.from_dict(json.loads((out / "config.json").read_text())).to_dict() == cfg.to_dict()
    run = json.loads((out / "run.json").read_text())
    assert run["num_params"] == res["num_params"] and run["world_size"] == 1 and run["dataset_size"] == 24
    stats = [json.loads(ln) for ln in (out / "stats.jsonl").read_text().splitlines()]
    assert [r["step"] for r in stats] == [4, 8, 12] and len(seen) == 12
    T = cfg.diffusion.T
    for r in stats:
        assert np.isfinite(r["loss"]) and r["grad_norm"] > 0 and r["images_per_s"] > 0
        assert len(r["loss_by_t_quarter"]) == 4
        # the window's per-example losses, recomputed from what the loop saw: the overall loss is
        # their mean, each quarter's is the mean over the examples whose t falls in that quarter
        # (quarter edges T//4, T//2, 3T//4), so the overall loss is the count-weighted mean of those
        t = torch.cat([a for a, _ in seen[r["step"] - 4:r["step"]]]).numpy()
        loss = torch.cat([b for _, b in seen[r["step"] - 4:r["step"]]]).numpy()
        q = np.searchsorted([T // 4, T // 2, 3 * T // 4], t, side="right")
        counts = np.bincount(q, minlength=4)
        means = [loss[q == k].mean() if counts[k] else None for k in range(4)]
        assert r["loss_by_t_quarter"] == pytest.approx(means, rel=1e-6)
        assert r["loss"] == pytest.approx(loss.mean(), rel=1e-6)
        weighted = sum(c * m for c, m in zip(counts, means) if c) / counts.sum()
        assert r["loss"] == pytest.approx(weighted, rel=1e-6)
    assert stats[0]["lr"] == pytest.approx(2e-4)  # update 4 ran after 3 warm-up steps
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step_0000006.png", "step_0000012.png"]
    assert Image.open(out / "samples" / "step_0000012.png").size[0] > 4 * 8
    last, final = read_checkpoint(out / "last.pt"), read_checkpoint(out / "final.pt")
    assert last["step"] == final["step"] == 12
    assert_same_weights(last["model"], final["model"])
    for key in ("model", "ema", "optimizer", "rng", "data", "config"):
        assert key in final, key
    assert Config.from_dict(final["config"]).to_dict() == cfg.to_dict()
    assert set(final["rng"]["ranks"][0]) >= {"torch", "numpy", "python", "batch_gen"}
    assert final["data"]["next_position"] == 12 * 4
    # EMA (decay 0.9) lags the raw weights: it differs from them and from the initial weights
    assert any(not torch.equal(final["ema"][k], final["model"][k]) for k in final["model"])


def test_interrupted_and_resumed_equals_uninterrupted(images, tmp_path, monkeypatch):
    cfg = tiny_config(images)
    TR.train(cfg, tmp_path / "a", device="cpu", progress=False)

    # Crash at the 8th loss evaluation: last.pt holds step 5.
    on_loss_call(monkeypatch, 8, "interrupt")
    with pytest.raises(KeyboardInterrupt):
        TR.train(cfg, tmp_path / "b", device="cpu", progress=False)
    monkeypatch.undo()
    assert read_checkpoint(tmp_path / "b" / "last.pt")["step"] == 5
    assert not (tmp_path / "b" / "final.pt").exists()
    res = TR.train(cfg, tmp_path / "b", resume=True, device="cpu", progress=False)
    assert res["step"] == 12
    a, b = read_checkpoint(tmp_path / "a" / "final.pt"), read_checkpoint(tmp_path / "b" / "final.pt")
    assert_same_weights(a["model"], b["model"])
    assert_same_weights(a["ema"], b["ema"])
    sa = [json.loads(x) for x in (tmp_path / "a" / "stats.jsonl").read_text().splitlines()]
    sb = [json.loads(x) for x in (tmp_path / "b" / "stats.jsonl").read_text().splitlines()]
    assert [r["step"] for r in sb] == [4, 8, 12]  # no duplicate lines after the resume
    assert [r["loss"] for r in sa] == [r["loss"] for r in sb]


def test_kill_9_then_resume_equals_uninterrupted(images, tmp_path):
    over = tiny_overrides(images, **{"train.steps": 40, "train.ckpt_every": 10, "train.log_every": 10})
    cfg = get_preset("tiny", over)
    TR.train(cfg, tmp_path / "ref", device="cpu", progress=False)

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "ddpm", "train", "--preset", "tiny", *as_cli_sets(over),
           "--out", str(out), "--device", "cpu", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while not (out / "last.pt").exists():
        assert proc.poll() is None, proc.stdout.read().decode()
        assert time.time() < deadline, "no checkpoint within 120 s"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "final.pt").exists(), "the run finished before it could be killed"
    killed_at = read_checkpoint(out / "last.pt")["step"]
    assert 10 <= killed_at < 40

    res = subprocess.run([sys.executable, "-m", "ddpm", "train", "--resume", "--out", str(out),
                          "--device", "cpu", "--no-progress"], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert f"resuming {out} from step {killed_at}" in res.stdout
    a, b = read_checkpoint(tmp_path / "ref" / "final.pt"), read_checkpoint(out / "final.pt")
    assert b["step"] == 40
    assert_same_weights(a["model"], b["model"])
    assert_same_weights(a["ema"], b["ema"])
    for (ka, va), (kb, vb) in zip(a["optimizer"]["state"].items(), b["optimizer"]["state"].items()):
        assert torch.equal(va["exp_avg_sq"], vb["exp_avg_sq"])
    steps = [json.loads(x)["step"] for x in (out / "stats.jsonl").read_text().splitlines()]
    assert steps == list(range(10, 41, 10))


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(images, tmp_path, monkeypatch):
    cfg = tiny_config(images)
    on_loss_call(monkeypatch, 7, "nan")
    out = tmp_path / "run"
    # found at the check point of step 8 (a log step): steps 7 and 8 ran, nothing after 5 was saved
    with pytest.raises(TR.TrainingDiverged, match=r"non-finite loss at step 7.*steps 7\.\.8 were applied in memory "
                                                  r"but never saved.*last\.pt \(step 5\)"):
        TR.train(cfg, out, device="cpu", progress=False)
    st = read_checkpoint(out / "last.pt")
    assert st["step"] == 5 and not (out / "final.pt").exists()
    assert all(torch.isfinite(v).all() for v in st["model"].values())
    stats = [json.loads(ln) for ln in (out / "stats.jsonl").read_text().splitlines()]
    assert [r["step"] for r in stats] == [4, 7]  # no line for the window 5..8, which holds the NaN
    assert stats[-1]["event"] == "nonfinite"


def test_existing_runs_are_never_overwritten(images, tmp_path):
    cfg = tiny_config(images, **{"train.steps": 3, "train.ckpt_every": 3})
    out = tmp_path / "run"
    TR.train(cfg, out, device="cpu", progress=False)
    before = (out / "final.pt").read_bytes()
    with pytest.raises(TR.RunDirError, match="already holds a finished run.*--resume"):
        TR.train(cfg, out, device="cpu", progress=False)
    res = TR.train(cfg, out, resume=True, device="cpu", progress=False)
    assert res["already_finished"]
    assert (out / "final.pt").read_bytes() == before
    # a folder with other files is not a run and is not touched
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "thesis.tex").write_text("precious")
    with pytest.raises(TR.RunDirError, match="not a ddpm run"):
        TR.train(cfg, tmp_path / "other", device="cpu", progress=False)
    with pytest.raises(TR.RunDirError, match="no run to resume"):
        TR.train(cfg, tmp_path / "fresh", resume=True, device="cpu", progress=False)


def test_resume_accepts_more_steps_but_not_another_config(images, tmp_path):
    cfg = tiny_config(images, **{"train.steps": 3, "train.ckpt_every": 3})
    out = tmp_path / "run"
    TR.train(cfg, out, device="cpu", progress=False)
    with pytest.raises(TR.RunDirError, match=r"train\.lr \(run: 0\.0002, now: 0\.001\)"):
        TR.train(tiny_config(images, **{"train.steps": 3, "train.lr": 1e-3}), out, resume=True,
                 device="cpu", progress=False)
    res = TR.train(tiny_config(images, **{"train.steps": 5, "train.ckpt_every": 3}), out,
                   resume=True, device="cpu", progress=False)
    assert res["step"] == 5 and read_checkpoint(out / "final.pt")["step"] == 5


def test_corrupt_checkpoint_on_resume_names_the_file(images, tmp_path):
    cfg = tiny_config(images, **{"train.steps": 3, "train.ckpt_every": 3})
    out = tmp_path / "run"
    TR.train(cfg, out, device="cpu", progress=False)
    data = (out / "last.pt").read_bytes()
    (out / "last.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=str(out / "last.pt") + ".*corrupt or truncated"):
        TR.train(cfg, out, resume=True, device="cpu", progress=False)


def test_bf16_autocast_trains(images, tmp_path):
    cfg = tiny_config(images, **{"train.steps": 2, "train.bf16": True, "train.log_every": 1})
    TR.train(cfg, tmp_path / "run", device="cpu", progress=False)
    stats = [json.loads(x) for x in (tmp_path / "run" / "stats.jsonl").read_text().splitlines()]
    assert len(stats) == 2 and all(np.isfinite(r["loss"]) for r in stats)
    # the stored weights stay float32 (autocast only changes the compute precision)
    assert all(v.dtype == torch.float32 for v in read_checkpoint(tmp_path / "run" / "final.pt")["model"].values())


# ---------------------------------------------------------------- gradient accumulation


def _gradient(cfg, x0, t, noise):
    """The gradient optimisation_step applies (grad_clip 0: unclipped), from the seed's initial weights."""
    state = TR.TrainState.create(cfg, torch.device("cpu"))
    TR.optimisation_step(state, state.model, TR.build_diffusion(cfg), x0, t, noise, cfg.train)
    return torch.cat([p.grad.double().flatten() for p in state.model.parameters()])


@pytest.mark.parametrize("loss_type", ["simple", "vlb"])
def test_accumulated_microbatches_give_the_full_batch_gradient(images, loss_type):
    base = {"model.dropout": 0.0, "train.batch_size": 8, "train.grad_clip": 0.0, "diffusion.loss_type": loss_type}
    cfg = tiny_config(images, **base)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(8, 3, 8, 8, generator=g) * 2 - 1
    t = torch.randint(0, cfg.diffusion.T, (8,), generator=g)
    noise = torch.randn(8, 3, 8, 8, generator=g)
    # the reference: autograd on the whole batch's mean loss, outside optimisation_step
    torch.manual_seed(TR.derive_seed(0, 0))
    model = TR.build_model(cfg)
    TR.build_diffusion(cfg).training_losses(model, x0, t, noise)["loss"].mean().backward()
    full = torch.cat([p.grad.double().flatten() for p in model.parameters()])
    assert torch.equal(_gradient(cfg, x0, t, noise), full)  # microbatch 0: the same computation
    for mb in (1, 2, 4):
        acc = _gradient(tiny_config(images, **base, **{"train.microbatch": mb}), x0, t, noise)
        err = ((acc - full).norm() / full.norm()).item()
        assert err < 1e-6, (mb, err)
        assert (acc - full).abs().max().item() <= 1e-6 * full.abs().max().item(), mb


def test_a_run_with_microbatches_equals_one_without(images, tmp_path):
    extra = {"model.dropout": 0.0, "train.steps": 6, "train.batch_size": 8, "train.log_every": 3}
    TR.train(tiny_config(images, **extra), tmp_path / "whole", device="cpu", progress=False)
    TR.train(tiny_config(images, **extra, **{"train.microbatch": 2}), tmp_path / "acc", device="cpu", progress=False)
    a, b = read_checkpoint(tmp_path / "whole" / "final.pt"), read_checkpoint(tmp_path / "acc" / "final.pt")
    # Adam divides by the root of the squared gradients, which magnifies float-rounding differences
    # in tiny gradients: 1e-5 as tests/test_ddp.py (6 steps move weights by up to about 8e-4)
    assert_same_weights(a["model"], b["model"], exact=False, atol=1e-5)
    assert_same_weights(a["ema"], b["ema"], exact=False, atol=1e-5)
    s1 = [json.loads(x) for x in (tmp_path / "whole" / "stats.jsonl").read_text().splitlines()]
    s2 = [json.loads(x) for x in (tmp_path / "acc" / "stats.jsonl").read_text().splitlines()]
    assert [r["step"] for r in s1] == [r["step"] for r in s2] == [3, 6]
    for x, y in zip(s1, s2):  # the same batches, t and noise: the same per-example losses
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-6)
        assert x["loss_by_t_quarter"] == pytest.approx(y["loss_by_t_quarter"], rel=1e-6)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-5)


def test_microbatch_must_divide_the_per_process_batch():
    from ddpm.config import ConfigError

    with pytest.raises(ConfigError, match=r"train.microbatch=3 must divide train.batch_size=8"):
        get_preset("tiny", ["train.batch_size=8", "train.microbatch=3"])
    with pytest.raises(ConfigError, match="train.microbatch=-1"):
        get_preset("tiny", ["train.microbatch=-1"])
    tc = get_preset("tiny", ["train.batch_size=12", "train.microbatch=4"]).train
    TR.check_batch_split(tc, 1)
    TR.check_batch_split(tc, 3)  # 4 per process: one microbatch
    with pytest.raises(ConfigError, match=r"per-process batch \(train.batch_size 12 / 2 processes = 6\)"):
        TR.check_batch_split(tc, 2)
    with pytest.raises(ConfigError, match="must be divisible by the number of processes"):
        TR.check_batch_split(tc, 5)
    assert get_preset("tiny", ["train.microbatch=64"]).train.microbatch == 64  # >= the batch: no accumulation
    assert TR.microbatches(8, 0) == TR.microbatches(8, 16) == [slice(0, 8)]
    assert TR.microbatches(8, 2) == [slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 8)]
