"""The training recipe as the loop applies it, not as it logs it.

ddpm.train.train runs unchanged; three spies watch it from outside:
- a tiny network (``Probe``: a 1x1 convolution plus a per-t bias) that records what it is
  fed and the dtype of its activations,
- ``GaussianDiffusion.training_losses`` wrapped to record the x_0, t and noise of every
  batch and the per-example losses,
- ``torch.optim.Adam`` replaced by a subclass that records, at each ``step()``, the
  learning rate in the optimizer and the norm of the gradient it is about to apply.
The data is one asymmetric image (dataset loading is replaced), so every flip is visible.
"""

import copy
import json
import math

import numpy as np
import pytest
import torch
from scipy import stats

from ddpm import train as TR
from ddpm.checkpoint import read_checkpoint
from ddpm.config import Config, apply_overrides
from ddpm.data import TensorImages, to_model_range
from ddpm.diffusion import GaussianDiffusion
from test_train import one_thread  # noqa: F401 - the module's tests run single-threaded

C, R = 3, 8


class Probe(torch.nn.Module):
    """A network small enough for hundreds of steps in a second; it records its inputs and
    the dtype of its convolution's output while training (not while the trainer samples)."""

    def __init__(self, T):
        super().__init__()
        self.conv = torch.nn.Conv2d(C, C, 1)
        self.temb = torch.nn.Embedding(T, C)
        self.seen = []  # (x_t, t, activation dtype) per training forward

    def forward(self, x, t):
        h = self.conv(x)
        if self.training:
            self.seen.append((x.detach().float().clone(), t.clone(), h.dtype))
        return h + self.temb(t)[:, :, None, None]


def asymmetric_image():
    """One uint8 image that equals neither its left-right nor its up-down mirror, nor any
    flip of another channel."""
    img = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (1, C, R, R), dtype=np.uint8))
    x = img[0]
    assert not torch.equal(x, x.flip(2)) and not torch.equal(x, x.flip(1)) and not torch.equal(x, x.flip(1, 2))
    return img


def probe_run(tmp_path, monkeypatch, **overrides):
    """Train with the spies in place; returns what they saw and the run's files."""
    o = {"data.dataset": "folder", "data.path": "probe-images (replaced by the test)", "data.resolution": R,
         "data.channels": C, "data.hflip": True, "data.num_workers": 0, "diffusion.T": 24,
         "train.steps": 1, "train.batch_size": 8, "train.lr": 1e-2, "train.warmup": 0, "train.grad_clip": 1.0,
         "train.ema_decay": 0.9, "train.log_every": 1, "train.sample_every": 10 ** 6,
         "train.ckpt_every": 10 ** 6,
         # unused (Probe replaces the UNet) but validated: a UNet that fits 8x8 images
         "model.ch": 32, "model.ch_mult": (1, 2), "model.attn_resolutions": ()}
    o.update(overrides)
    cfg = apply_overrides(Config(), o)
    rec = {"models": [], "init": None, "batches": [], "opt_steps": []}

    def build_model(cfg_):
        m = Probe(cfg_.diffusion.T)
        rec["models"].append(m)
        rec["init"] = copy.deepcopy(m.state_dict())
        return m

    real_losses = GaussianDiffusion.training_losses

    def training_losses(self, model, x0, t, noise=None):
        out = real_losses(self, model, x0, t, noise)
        rec["batches"].append({"x0": x0.detach().clone(), "t": t.clone(), "noise": noise.clone(),
                               "loss": out["loss"].detach().double().clone(), "diffusion": self})
        return out

    RealAdam = torch.optim.Adam

    class SpyAdam(RealAdam):
        def step(self, closure=None):
            grads = torch.cat([p.grad.detach().double().flatten() for g in self.param_groups
                               for p in g["params"] if p.grad is not None])
            rec["opt_steps"].append({"lr": [g["lr"] for g in self.param_groups],
                                     "grad_norm": torch.linalg.vector_norm(grads).item()})
            return super().step(closure)

    image = asymmetric_image()
    monkeypatch.setattr(TR, "build_model", build_model)
    monkeypatch.setattr(TR, "load_dataset", lambda *a, **k: TensorImages(image, "one asymmetric image"))
    monkeypatch.setattr(GaussianDiffusion, "training_losses", training_losses)
    monkeypatch.setattr(torch.optim, "Adam", SpyAdam)
    out = tmp_path / "run"
    TR.train(cfg, out, device="cpu", progress=False)
    monkeypatch.undo()
    rec["cfg"], rec["out"], rec["image"] = cfg, out, image
    rec["final"] = read_checkpoint(out / "final.pt")
    rec["stats"] = [json.loads(ln) for ln in (out / "stats.jsonl").read_text().splitlines()]
    assert len(rec["models"]) == 1 and len(rec["batches"]) == len(rec["opt_steps"]) == cfg.train.steps
    return rec


@pytest.fixture(scope="module")
def long_run(tmp_path_factory):
    """40 steps of batch 64 (2560 draws of t and of the flip) with a warm-up of 5 steps
    and a gradient clip far below the gradient norm, so that every step is clipped."""
    with pytest.MonkeyPatch.context() as mp:
        return probe_run(tmp_path_factory.mktemp("long"), mp, **{
            "train.steps": 40, "train.batch_size": 64, "train.warmup": 5, "train.grad_clip": 1e-3,
            "train.log_every": 10})


# ------------------------------------------------------------------------- learning rate


def test_first_update_under_warmup_leaves_the_weights_unchanged(tmp_path, monkeypatch):
    """The official warm-up gives the first update lr 0: after one step the weights are the
    initial ones, bit for bit (and the EMA too), although the gradient is not zero."""
    rec = probe_run(tmp_path, monkeypatch, **{"train.warmup": 3})
    assert rec["opt_steps"][0]["grad_norm"] > 0
    for k, v in rec["init"].items():
        assert torch.equal(rec["final"]["model"][k], v), k
        assert torch.equal(rec["final"]["ema"][k], v), k


def test_the_optimizer_applies_the_warmed_up_learning_rate_at_every_step(long_run):
    lr, warmup = long_run["cfg"].train.lr, long_run["cfg"].train.warmup
    assert all(len(s["lr"]) == 1 for s in long_run["opt_steps"])  # one parameter group
    applied = [s["lr"][0] for s in long_run["opt_steps"]]
    expected = [lr * min(k / warmup, 1.0) for k in range(len(applied))]  # k updates done before this one
    assert applied == pytest.approx(expected, rel=1e-12, abs=0)
    assert applied[0] == 0.0 and applied[-1] == lr


# -------------------------------------------------------------------------------- EMA


def test_ema_after_one_step_is_decay_init_plus_rest_new(tmp_path, monkeypatch):
    rec = probe_run(tmp_path, monkeypatch, **{"train.warmup": 0, "train.ema_decay": 0.9})
    d, moved = 0.9, 0.0
    for k, init in rec["init"].items():
        new, ema = rec["final"]["model"][k], rec["final"]["ema"][k]
        moved = max(moved, (new - init).abs().max().item())
        # float32 arithmetic on values of order 1: 1e-6 is ~10 ulps
        torch.testing.assert_close(ema, d * init + (1 - d) * new, rtol=0, atol=1e-6)
    # the weights moved by ~lr (Adam's first step is lr * sign(g)): (1-d) vs d weighting differ by 8e-3
    assert moved > 5e-3


# --------------------------------------------------------------------------- clipping


def test_the_optimizer_sees_the_gradient_clipped_to_the_threshold(long_run):
    """stats.jsonl logs the norm before clipping (clip_grad_norm_'s return value); the norm the
    optimizer applies must be min(raw, clip), here always the clip (1e-3 << raw)."""
    clip = long_run["cfg"].train.grad_clip
    applied = np.array([s["grad_norm"] for s in long_run["opt_steps"]])
    raw_logged = np.array([r["grad_norm"] for r in long_run["stats"]])  # window means of raw norms
    assert (raw_logged > 100 * clip).all()
    # clip_grad_norm_ scales by clip / (raw + 1e-6): the result is clip (1 - 1e-6/raw)
    np.testing.assert_allclose(applied, clip, rtol=1e-4)


def test_gradients_below_the_threshold_are_not_changed(tmp_path, monkeypatch):
    rec = probe_run(tmp_path, monkeypatch, **{"train.steps": 2, "train.grad_clip": 1e6})
    for s, r in zip(rec["opt_steps"], rec["stats"]):
        assert s["grad_norm"] == pytest.approx(r["grad_norm"], rel=1e-5)


# ------------------------------------------------------------------------- flips and t


def test_the_network_sees_the_image_or_its_left_right_mirror_both_and_nothing_else(long_run):
    x = to_model_range(long_run["image"])[0]
    seen = torch.cat([b["x0"] for b in long_run["batches"]])
    same = (seen == x).flatten(1).all(1)
    mirror = (seen == x.flip(-1)).flatten(1).all(1)  # W is the last axis of [N, C, H, W]
    assert bool((same | mirror).all()), "a training image is neither the data nor its left-right mirror"
    n, k = len(seen), int(mirror.sum())
    # flips with probability 1/2: the count is Binomial(n, 1/2), standard deviation sqrt(n)/2
    assert abs(k - n / 2) < 4 * math.sqrt(n) / 2, (k, n)
    # ... and that is what the network is fed: x_t = q_sample(x_0, t, noise) of these very images
    (model,) = long_run["models"]
    assert len(model.seen) == len(long_run["batches"])
    for (xt, t, _), b in zip(model.seen, long_run["batches"]):
        assert torch.equal(t, b["t"])
        torch.testing.assert_close(xt, b["diffusion"].q_sample(b["x0"], b["t"], b["noise"]), rtol=0, atol=1e-6)


def test_no_flips_when_hflip_is_off(tmp_path, monkeypatch):
    rec = probe_run(tmp_path, monkeypatch, **{"data.hflip": False, "train.steps": 2, "train.batch_size": 32})
    x = to_model_range(rec["image"])[0]
    seen = torch.cat([b["x0"] for b in rec["batches"]])
    assert bool((seen == x).flatten(1).all(1).all())


def test_t_is_uniform_on_0_to_T_minus_1(long_run):
    T = long_run["cfg"].diffusion.T
    t = torch.cat([b["t"] for b in long_run["batches"]]).numpy()
    assert t.min() >= 0 and t.max() <= T - 1
    counts = np.bincount(t, minlength=T)
    assert counts.shape == (T,)
    # chi-square goodness of fit against Uniform{0..T-1} (2560 draws, about 107 expected per value)
    p = stats.chisquare(counts).pvalue
    assert p > 1e-4, (p, counts)
    assert counts.min() > 0


# ------------------------------------------------------------------------------- bf16


@pytest.mark.parametrize("bf16", [False, True])
def test_bf16_autocast_is_active_exactly_when_asked(tmp_path, monkeypatch, bf16):
    rec = probe_run(tmp_path, monkeypatch, **{"train.bf16": bf16, "train.steps": 2})
    dtypes = {d for _, _, d in rec["models"][0].seen}
    assert dtypes == {torch.bfloat16 if bf16 else torch.float32}
    assert all(v.dtype == torch.float32 for v in rec["final"]["model"].values())


# ------------------------------------------------------------------------------ stats


def test_logged_losses_are_the_window_means_overall_and_per_quarter_of_t(long_run):
    """stats.jsonl: loss = mean over the window's examples; loss_by_t_quarter[q] = mean of the
    per-example losses with 4t // T = q; so loss is their count-weighted mean."""
    T, every = long_run["cfg"].diffusion.T, long_run["cfg"].train.log_every
    batches = long_run["batches"]
    assert [r["step"] for r in long_run["stats"]] == list(range(every, len(batches) + 1, every))
    for r in long_run["stats"]:
        window = batches[r["step"] - every:r["step"]]
        loss = torch.cat([b["loss"] for b in window]).numpy()
        q = (torch.cat([b["t"] for b in window]) * 4 // T).numpy()
        counts = np.bincount(q, minlength=4)
        means = [loss[q == k].mean() if counts[k] else None for k in range(4)]
        assert r["loss"] == pytest.approx(loss.mean(), rel=1e-6)
        assert r["loss_by_t_quarter"] == pytest.approx(means, rel=1e-6)
        weighted = sum(c * m for c, m in zip(counts, means) if c) / counts.sum()
        assert r["loss"] == pytest.approx(weighted, rel=1e-6)
