"""Compiled sampling (ddpm.sampling.CompiledStep: generate(compile=True), --compile) on the CPU.

- Compiled and eager sample the same chain: the same seed gives the same samples up to float
  rounding (TOL), for every sampler kind and with bf16; the tolerance has power: noise drawn
  in another order moves the samples far beyond it.
- The last, smaller batch of a set is padded into the graph of the first, not compiled again.
- ``compiled`` is part of a sample set (as network_precision): recorded in the manifest, a
  folder of the other setting refused, a manifest older than the field read as compiled false.
- ``ddpm sample --compile`` and ``ddpm eval --compile`` run and record it.
- cudnn.benchmark is on inside runtime.cudnn_benchmark for a CUDA device only, and restored.
One tiny model for the whole file, so that each step function is compiled once (tens of
seconds on this CPU); the speed itself is measured by experiments/benchmark_speed.py.
"""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_evaluate import tiny_checkpoint  # noqa: E402,F401 (fixture)
from test_train import one_thread  # noqa: E402,F401 (autouse fixture)

from ddpm import generate as G  # noqa: E402
from ddpm import sampling as S  # noqa: E402
from ddpm.cli import main  # noqa: E402
from ddpm.loading import load_model  # noqa: E402

# inductor builds its CPU kernels with a C++ compiler (every machine of this project has g++)
pytestmark = pytest.mark.skipif(not (shutil.which("g++") or shutil.which("clang++")),
                                reason="torch.compile on the CPU needs a C++ compiler (g++ or clang++)")

# Samples live in [-1, 1]; compiled kernels sum in another order, and the chain carries the
# differences along: measured up to 2.5e-4 (DDIM, eta 0) on this model. 1e-3 is an eighth of
# one uint8 level (1 / 127.5).
TOL = 1e-3
BF16_TOL = 0.05  # with bf16 autocast: see test_compile_composes_with_bf16
SHAPE = (4, 1, 28, 28)
KINDS = {"ancestral": S.Sampler(), "respaced": S.Sampler("respaced", steps=7),
         "ddim": S.Sampler("ddim", steps=7, eta=0.5)}


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    """(checkpoint path, EMA model, diffusion): test_evaluate's tiny checkpoint (the tiny preset at
    T = 21, weights perturbed); the same architecture and T as the CLI runs below load."""
    _, model, diffusion, _ = load_model(tiny_checkpoint, ema=True)
    return tiny_checkpoint, model.eval(), diffusion


def draw(tiny, sampler, compile, seed=3):
    _, model, diffusion = tiny
    return sampler(diffusion, model, SHAPE, generator=torch.Generator().manual_seed(seed), compile=compile)


@pytest.mark.parametrize("kind", list(KINDS))
def test_compiled_and_eager_sample_the_same_chain(tiny, kind):
    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]
    eager, compiled = draw(tiny, KINDS[kind], False), draw(tiny, KINDS[kind], True)
    assert counters["stats"]["unique_graphs"] > graphs  # each kind's step compiled into a graph of its own
    assert eager.abs().max() > 0.1  # samples worth comparing
    assert (compiled - eager).abs().max().item() < TOL


def test_the_tolerance_would_catch_noise_drawn_in_another_order(tiny, monkeypatch):
    """The compiled path must draw its noise outside the graph exactly as the eager path does;
    the same draws in another order (each one's images rolled by one) fail the comparison."""
    eager = draw(tiny, KINDS["ancestral"], False)
    real = S._randn
    monkeypatch.setattr(S, "_randn", lambda *a, **k: real(*a, **k).roll(1, 0))
    moved = draw(tiny, KINDS["ancestral"], True)
    assert (moved - eager).abs().max().item() > 100 * TOL


def test_the_last_smaller_batch_is_padded_not_compiled_again(tiny):
    from torch._dynamo.utils import counters

    _, model, diffusion = tiny
    kw = dict(batch_size=4, seed=1, progress=False)
    eager = G.generate(model, diffusion, 6, SHAPE[1:], **kw)  # shards of 4 and 2
    draw(tiny, KINDS["ancestral"], True)  # the step compiled for batch 4 (a no-op if done above)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs > 0  # something was compiled
    compiled = G.generate(model, diffusion, 6, SHAPE[1:], compile=True, **kw)
    assert counters["stats"]["unique_graphs"] == graphs  # the batch of 2 ran in the graph of 4
    diff = np.abs(compiled.astype(int) - eager.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01  # rounding moves a pixel rarely, by one level


def test_compile_composes_with_bf16(tiny):
    """Under bf16 the compiled chain is the eager one up to bf16's rounding (2^-8 relative), which
    the compiled kernels do at other places (fused intermediates stay float32): measured 0.015
    at most, as far as bf16 is from float32 on the same seed; far below a broken chain's."""
    from ddpm.runtime import Bf16Network

    _, model, diffusion = tiny
    net = Bf16Network(model)
    eager, compiled = (S.sample(diffusion, net, SHAPE, torch.Generator().manual_seed(3), compile=c)[0]
                       for c in (False, True))
    fp32 = draw(tiny, KINDS["ancestral"], False)
    for bf16 in (eager, compiled):
        assert (bf16 - fp32).abs().max().item() > TOL  # the network ran in bf16, compiled too
    assert (compiled - eager).abs().max().item() < BF16_TOL


def test_the_manifest_records_compiled_and_sets_never_mix(tiny, tmp_path):
    _, model, diffusion = tiny
    kw = dict(batch_size=4, seed=2, progress=False)
    a, b = (G.sample_manifest(diffusion, 4, SHAPE[1:], compile=c, **{k: kw[k] for k in ("batch_size", "seed")})
            for c in (False, True))
    assert a["compiled"] is False and b["compiled"] is True
    assert {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)} == {"compiled"}
    G.generate(model, diffusion, 4, SHAPE[1:], out_dir=tmp_path / "c", compile=True, return_images=False, **kw)
    assert json.loads((tmp_path / "c" / G.MANIFEST).read_text())["compiled"] is True
    with pytest.raises(G.SamplesError, match="compiled: true there, false now"):
        G.generate(model, diffusion, 4, SHAPE[1:], out_dir=tmp_path / "c", **kw)
    # A manifest from before the field: eager samples, resumed by an eager call, refused to a compiled one.
    old = {k: v for k, v in a.items() if k != "compiled"}
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / G.MANIFEST).write_text(json.dumps(old))
    assert G.check_samples(tmp_path / "old", a) is True
    with pytest.raises(G.SamplesError, match="compiled: null there, true now"):
        G.check_samples(tmp_path / "old", b)
    assert json.loads((tmp_path / "old" / G.MANIFEST).read_text()) == old  # checking writes nothing


def test_sample_command_compiles_and_records_it(tiny, tmp_path, capsys):
    path = tiny[0]
    common = ["sample", "--checkpoint", str(path), "--n", "4", "--batch-size", "4", "--seed", "5",
              "--device", "cpu", "--no-progress"]
    assert main([*common, "--out", str(tmp_path / "e")]) == 0
    assert main([*common, "--out", str(tmp_path / "c"), "--compile"]) == 0
    capsys.readouterr()
    records = {k: json.loads((tmp_path / k / G.PNG_RECORD).read_text()) for k in "ec"}
    assert records["e"]["compiled"] is False and records["c"]["compiled"] is True
    from PIL import Image

    for k in range(4):
        e, c = (np.asarray(Image.open(tmp_path / d / G.PNG_IMAGES / f"{k:06d}.png")).astype(int) for d in "ec")
        assert np.abs(e - c).max() <= 1


def test_eval_command_compiles_the_fid_samples_and_records_it(tiny, shared_data, tmp_path, monkeypatch, capsys):
    from ddpm import inception as F

    w = F.build_inception_weights(tmp_path / "inception.pth")
    monkeypatch.setenv(F.ENV_CACHE, str(tmp_path / "cache"))
    common = ["eval", "--checkpoint", str(tiny[0]), "--metrics", "kid", "--n", "4", "--batch-size", "4",
              "--sampler", "ddim", "--steps", "7", "--eta", "0.5", "--reference", "mnist:test",
              "--reference-n", "4", "--inception-weights", str(w), "--data-dir", str(shared_data),
              "--no-figures", "--no-progress", "--device", "cpu"]
    assert main([*common, "--out", str(tmp_path / "ev"), "--compile"]) == 0
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert m["run"]["spec"]["compile"] is True
    assert m["results"]["kid"]["compiled"] is True and m["results"]["sampling"]["compiled"] is True
    assert json.loads((tmp_path / "ev" / "samples" / G.MANIFEST).read_text())["compiled"] is True
    # the same evaluation asked eagerly: its samples are another set, refused before sampling
    assert main([*common, "--out", str(tmp_path / "ev")]) == 2
    assert "compiled: true there, false now" in capsys.readouterr().err


@pytest.mark.parametrize("device", ["cpu", "cuda:0"])
def test_cudnn_benchmark_is_on_for_cuda_only_and_restored(device):
    from ddpm.runtime import cudnn_benchmark

    before = torch.backends.cudnn.benchmark
    with cudnn_benchmark(device):  # no GPU needed: only the flag is set
        assert torch.backends.cudnn.benchmark is (True if device.startswith("cuda") else before)
    assert torch.backends.cudnn.benchmark is before
