"""The quick-profile redesign (commits d024a22, a4309a8), each part against an independent
computation or a property that its obvious bug would break.

- ddpm.fidelity: KID's whole-set unbiased MMD^2 and its delete-one jackknife SE against a
  brute-force computation (every leave-one-out estimate recomputed from scratch); FID through
  the N x M product against torch-fidelity's sqrtm formula; the bootstrap SE of FID against
  the spread of FID over independent sample sets.
- bf16 sampling (runtime.Bf16Network, generate(bf16=True)): the network really runs in bf16,
  the manifest says so, and bf16 and float32 samples never mix in one folder.
- model.groups: GroupNorm(8) in the ch-16 networks, GroupNorm(32) (the paper's) elsewhere, and
  the diffusers export carries the groups both ways.
- ddpm.evaluate: the FID reference split, per-image bits/dim, the collapse detector's pixel stds.
- experiments: the quick profile's presets, the eval command it builds, the start order.
- analysis.claims: the decision rules at their thresholds, and the files they write.

Small random features, a tiny UNet (T = 21) and a stand-in Inception keep every test to
seconds on one CPU core.
"""

import json
import math

import numpy as np
import pytest
import torch

from analysis import claims as C
from analysis import paper as P
from analysis.results import load_profile
from ddpm import evaluate as E
from ddpm import export as X
from ddpm import fidelity as F
from ddpm import generate as G
from ddpm import official as O
from ddpm.config import Config, ConfigError, build_model, get_preset
from ddpm.loading import load_model
from ddpm.runtime import PRECISIONS, Bf16Network
from experiments import run as R
from experiments.registry import EVAL_SIZE, MAIN, RD_FIGURES, RUNS, Eval, eval_size, experiments_for, run_config_args

# fixtures and helpers of the suites these changes extend
from test_analysis import write_run
from test_evaluate import tiny_checkpoint  # noqa: F401  (fixture: a tiny MNIST checkpoint, T = 21)
from test_generate import tiny  # noqa: F401  (fixture: the same tiny model and its diffusion)
from test_gpus import FakeDdpm, _is_train
from test_official import _checkpoint, _same_outputs, _same_weights, _tiny_cfg, diffusers  # noqa: F401


# ------------------------------------------------------------------ KID: whole-set MMD^2 and jackknife


def _kernel(a, b):
    return (float(np.dot(a, b)) / len(a) + 1.0) ** 3  # KID's cubic kernel (x.y / d + 1)^3


def _mmd2_textbook(x, y):
    """The unbiased MMD^2 (Gretton et al. 2012, Eq. 3), pair by pair: no self-pairs within a set."""
    n, m = len(x), len(y)
    sxx = sum(_kernel(x[i], x[j]) for i in range(n) for j in range(n) if i != j)
    syy = sum(_kernel(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
    sxy = sum(_kernel(x[i], y[j]) for i in range(n) for j in range(m))
    return sxx / (n * (n - 1)) + syy / (m * (m - 1)) - 2 * sxy / (n * m)


def test_kid_unbiased_is_the_textbook_mmd_and_its_jackknife_recomputed_from_scratch():
    rng = np.random.default_rng(0)
    n, m, d = 7, 9, 5
    x, y = rng.normal(0.4, 1.0, (n, d)), rng.normal(0.0, 1.2, (m, d))
    mmd, se = F.kid_unbiased(torch.from_numpy(x), torch.from_numpy(y))
    assert mmd == pytest.approx(_mmd2_textbook(x, y), rel=1e-10)
    # delete-one jackknife over both sets: each set's leave-one-out values about their own mean
    loo_x = np.array([_mmd2_textbook(np.delete(x, i, 0), y) for i in range(n)])
    loo_y = np.array([_mmd2_textbook(x, np.delete(y, j, 0)) for j in range(m)])
    # (a U-statistic is the mean of its leave-one-out values, over either set: one centre for both)
    assert loo_x.mean() == pytest.approx(mmd, rel=1e-10) and loo_y.mean() == pytest.approx(mmd, rel=1e-10)
    var = (n - 1) / n * ((loo_x - loo_x.mean()) ** 2).sum() + (m - 1) / m * ((loo_y - loo_y.mean()) ** 2).sum()
    assert se == pytest.approx(math.sqrt(var), rel=1e-10)
    # float32 features (as Inception gives) are promoted, not computed in float32
    mmd32, _ = F.kid_unbiased(torch.from_numpy(x).float(), torch.from_numpy(y).float())
    assert mmd32 == pytest.approx(_mmd2_textbook(x.astype(np.float32).astype(np.float64),
                                                 y.astype(np.float32).astype(np.float64)), rel=1e-10)
    with pytest.raises(F.FidelityError, match="at least 3"):
        F.kid_unbiased(torch.from_numpy(x), torch.from_numpy(y[:2]))


def test_kid_jackknife_se_is_the_spread_of_the_estimate_over_independent_sets():
    """The SE is the standard deviation the estimate has over fresh draws of both sets."""
    g = torch.Generator().manual_seed(0)
    d, n, m = 8, 40, 50
    draws = [F.kid_unbiased(torch.randn(n, d, generator=g, dtype=torch.float64) + 0.3,
                            torch.randn(m, d, generator=g, dtype=torch.float64)) for _ in range(300)]
    values, ses = torch.tensor([v for v, _ in draws]), torch.tensor([s for _, s in draws])
    ratio = (ses.mean() / values.std()).item()
    assert 0.8 < ratio < 1.3, ratio  # measured 1.03-1.14 over seeds; a factor-of-n slip is far out


def test_torch_fidelity_kid_equals_the_whole_set_mmd_when_each_subset_is_the_whole_set():
    rng = np.random.default_rng(1)
    n, d = 25, 32
    f1 = torch.from_numpy(rng.normal(0.3, 1.0, (n, d))).float()
    f2 = torch.from_numpy(rng.normal(0.0, 1.0, (n, d))).float()
    kid, kid_std, size = F.kid_from_features(f1, f2, subsets=4, subset_size=1000)
    mmd, _ = F.kid_unbiased(f1, f2)
    assert size == n  # min(1000, n, m): every subset is a permutation of the whole sets
    assert kid == pytest.approx(mmd, rel=1e-5)  # torch-fidelity sums its kernels in float32
    assert kid_std < 1e-4 * abs(kid)  # every subset the same sets: no spread but float32 rounding


# ------------------------------------------------------------------ FID: low rank and bootstrap SE


@pytest.mark.parametrize("n, m, d", [(30, 40, 64), (200, 150, 64), (30, 30, 256)],
                         ids=["N<d", "N>d", "N=30"])
def test_fid_through_the_n_by_m_product_equals_torch_fidelitys_sqrtm(n, m, d):
    g = torch.Generator().manual_seed(n + m + d)
    # a non-isotropic covariance, so that Sigma1 Sigma2 is not a multiple of a projection
    mix = torch.randn(d, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    f1 = (torch.randn(n, d, generator=g, dtype=torch.float64) @ mix + 0.2).float()
    f2 = (1.3 * torch.randn(m, d, generator=g, dtype=torch.float64)).float()
    assert F._fid_low_rank(f1, f2) == pytest.approx(F.fid_from_features(f1, f2), rel=1e-6)
    assert abs(F._fid_low_rank(f1, f1)) < 1e-9 * F._fid_low_rank(f1, f2)  # a set against itself: 0


def test_fid_bootstrap_se_resamples_the_samples_only_and_is_seeded():
    g = torch.Generator().manual_seed(0)
    d = 8
    samples = torch.randn(100, d, generator=g, dtype=torch.float64) * 1.2 + 0.3
    ref = torch.randn(200, d, generator=g, dtype=torch.float64)
    se = F.fid_bootstrap_se(samples, ref, seed=5)
    assert se > 0 and se == F.fid_bootstrap_se(samples, ref, seed=5) != F.fid_bootstrap_se(samples, ref, seed=6)
    # identical samples: every resample is the same set, so the SE is 0 (the reference stays fixed;
    # resampling it instead would give a positive SE here)
    same = samples[:1].repeat(100, 1)
    assert F.fid_bootstrap_se(same, ref) < 1e-6 * F._fid_low_rank(same, ref)  # 0 up to rounding
    # ... and a fixed, identical reference does not make it 0: it is the samples that are resampled
    assert F.fid_bootstrap_se(samples, ref[:1].repeat(200, 1)) > 0


def test_fid_bootstrap_se_is_the_spread_of_fid_over_independent_sample_sets():
    g = torch.Generator().manual_seed(0)
    d, n = 8, 100
    ref = torch.randn(200, d, generator=g, dtype=torch.float64)
    draw = lambda: torch.randn(n, d, generator=g, dtype=torch.float64) * 1.2 + 0.3  # noqa: E731
    spread = torch.tensor([F._fid_low_rank(draw(), ref) for _ in range(200)]).std().item()
    se = torch.tensor([F.fid_bootstrap_se(draw(), ref, seed=k) for k in range(30)]).mean().item()
    assert 0.7 < se / spread < 1.4, (se, spread)  # measured 0.96-1.16; the SE of a mean (/sqrt(10)) is 0.3


class _PooledPixels:
    """A stand-in for the Inception network: 4x4 average-pooled pixels as features. compute_metrics
    and the evaluation call it as they call the real one (features, cached reference features)."""

    layers, offline = ["2048"], True

    def describe(self):
        return {"network": "4x4 pooled pixels (test stand-in)", "weights": "none", "channels": ""}

    def features(self, images, progress=False, desc=""):
        x = torch.as_tensor(np.asarray(images)).double()
        return {"2048": torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)}

    def features_cached(self, images_fn, key, progress=False):
        return self.features(images_fn())


def test_compute_metrics_reports_the_standard_errors_with_its_values():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (12, 1, 8, 8), generator=g, dtype=torch.uint8)
    reference = torch.randint(60, 200, (12, 1, 8, 8), generator=g, dtype=torch.uint8)
    out = F.compute_metrics(images, reference, ("fid", "kid"), inception=_PooledPixels(), progress=False,
                            uncertainty=True)
    f1, f2 = _PooledPixels().features(images)["2048"], _PooledPixels().features(reference)["2048"]
    assert (out["kid_unbiased"], out["kid_se"]) == pytest.approx(F.kid_unbiased(f1, f2), rel=1e-12)
    assert out["kid"] == pytest.approx(out["kid_unbiased"], rel=1e-5)  # N = M <= 1000: the same estimate
    assert out["fid_se"] == pytest.approx(F.fid_bootstrap_se(f1, f2), rel=1e-12) and out["fid_se"] > 0
    plain = F.compute_metrics(images, reference, ("fid", "kid"), inception=_PooledPixels(), progress=False)
    assert not {"kid_se", "kid_unbiased", "fid_se"} & set(plain)  # only when asked for


# ------------------------------------------------------------------ bf16 sampling


class _Conv(torch.nn.Module):
    """A network whose output autocast leaves in bf16 (no float32 head, unlike our UNet's)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 1, 3, padding=1)

    def forward(self, x, t):
        return self.conv(x)


class _PrecisionSpy(torch.nn.Module):
    """Records in which precision a matrix product runs inside each call of the wrapped network."""

    def __init__(self, model):
        super().__init__()
        self.model, self.seen = model, set()

    def forward(self, x, t):
        self.seen.add(torch.mm(x.new_ones(1, 1), x.new_ones(1, 1)).dtype)
        return self.model(x, t)


def test_bf16_network_runs_in_bf16_and_returns_float32(tiny):  # noqa: F811
    model, _ = tiny
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 1, 28, 28, generator=g), torch.tensor([0, 20])
    with torch.no_grad():
        fp32, got = model(x, t), Bf16Network(model)(x, t)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            want = model(x, t)
    assert got.dtype == torch.float32 and torch.equal(got, want.float())  # bf16 autocast, not fp16
    err = (got - fp32).abs().max().item()
    assert 1e-4 < err < 0.05 * fp32.abs().max().item(), err  # it ran in bf16, and stayed close
    conv = _Conv()
    with torch.no_grad():
        out = Bf16Network(conv)(x, t)
    assert out.dtype == torch.float32 and not torch.equal(out, conv(x, t))


def test_generate_bf16_samples_in_bf16_records_it_and_never_mixes_with_float32(tiny, tmp_path):  # noqa: F811
    model, diffusion = tiny
    kw = dict(batch_size=2, seed=0, progress=False)
    spy = _PrecisionSpy(model)
    half = G.generate(spy, diffusion, 2, (1, 28, 28), out_dir=tmp_path, bf16=True, **kw)
    assert spy.seen == {torch.bfloat16}
    spy.seen.clear()
    full = G.generate(spy, diffusion, 2, (1, 28, 28), **kw)
    assert spy.seen == {torch.float32}
    assert not np.array_equal(half, full)  # the same seed: only the precision differs
    manifest = json.loads((tmp_path / G.MANIFEST).read_text())
    assert manifest["network_precision"] == PRECISIONS[True] != PRECISIONS[False]
    # float32 samples asked for in the bf16 folder: refused in one line, the folder untouched
    with pytest.raises(G.SamplesError, match="network_precision") as e:
        G.generate(model, diffusion, 2, (1, 28, 28), out_dir=tmp_path, **kw)
    assert "\n" not in str(e.value)
    np.testing.assert_array_equal(G.load_samples(tmp_path), half)
    # the manifests of the two requests differ in the precision and nothing else
    a, b = (G.sample_manifest(diffusion, 2, (1, 28, 28), batch_size=2, bf16=v) for v in (False, True))
    assert {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)} == {"network_precision"}


# ------------------------------------------------------------------ GroupNorm groups


def _group_norms(model):
    return [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]


def test_the_ch16_networks_use_groupnorm_8_and_the_papers_keeps_32():
    for name in ("quick-grid", "quick-mnist"):
        cfg = get_preset(name)
        assert (cfg.model.ch, cfg.model.groups) == (16, 8), name
        norms = _group_norms(build_model(cfg))
        assert len(norms) > 10 and {n.num_groups for n in norms} == {8}, name
    assert Config().model.groups == 32
    norms = _group_norms(build_model(Config()))  # the paper's CIFAR10 network
    assert len(norms) > 10 and {n.num_groups for n in norms} == {32} and {n.eps for n in norms} == {1e-6}
    # groups change the function: the same weights with GroupNorm(8) and GroupNorm(16) differ
    cfg8 = get_preset("tiny", {"model.ch": 16, "model.groups": 8, "diffusion.T": 21})
    cfg16 = get_preset("tiny", {"model.ch": 16, "model.groups": 16, "diffusion.T": 21})
    torch.manual_seed(0)
    m8 = build_model(cfg8).eval()
    m16 = build_model(cfg16).eval()
    with torch.no_grad():
        for p in m8.parameters():
            p.add_(0.1 * torch.randn_like(p))
    m16.load_state_dict(m8.state_dict())
    x, t = torch.randn(2, 1, 28, 28), torch.tensor([3, 17])
    with torch.no_grad():
        assert not torch.allclose(m8(x, t), m16(x, t), atol=1e-4)


def test_a_width_not_divisible_by_the_groups_is_a_config_error_naming_model_groups():
    with pytest.raises(ConfigError, match=r"model\.ch=16 must be a positive multiple of model\.groups=32"):
        get_preset("tiny", {"model.ch": 16})
    with pytest.raises(ConfigError, match=r"model\.groups=0"):
        get_preset("quick-grid", {"model.groups": 0})


def test_diffusers_config_carries_the_groups_and_reads_them_back():
    cfg = get_preset("cifar10", {"model.groups": 8})
    unet = O.diffusers_config(cfg)
    assert unet["norm_num_groups"] == 8
    back = O.config_from_diffusers(unet)  # no base: every network field from the diffusers config
    assert back.model == cfg.model and back.model.groups == 8
    # config.json files that omit the key (older releases): diffusers' default, the paper's 32
    assert O.config_from_diffusers({k: v for k, v in unet.items() if k != "norm_num_groups"}).model.groups == 32


def _groups8_export(tmp_path):
    cfg = _tiny_cfg(**{"model.ch": 16, "model.groups": 8})
    _, ema = _checkpoint(tmp_path / "c.pt", cfg)
    X.export_diffusers(tmp_path / "c.pt", tmp_path / "d")
    return cfg, ema


def test_a_groups8_model_exports_and_loads_back_as_the_same_network(tmp_path):
    cfg, ema = _groups8_export(tmp_path)
    assert json.loads((tmp_path / "d" / O.CONFIG_FILE).read_text())["norm_num_groups"] == 8
    cfg2, back, _, _ = load_model(tmp_path / "d")
    assert cfg2 == cfg and _same_weights(back, ema)
    assert {n.num_groups for n in _group_norms(back)} == {8}
    g = torch.Generator().manual_seed(3)
    x, t = torch.randn(3, 3, 8, 8, generator=g), torch.tensor([0, 999, 500])
    with torch.no_grad():
        assert torch.equal(back.eval()(x, t), ema.eval()(x, t))


def test_diffusers_computes_what_our_groups8_model_computes(diffusers, tmp_path):  # noqa: F811
    _groups8_export(tmp_path)
    back = load_model(tmp_path / "d")[1]
    theirs = diffusers.UNet2DModel.from_pretrained(tmp_path / "d")
    assert {n.num_groups for n in _group_norms(theirs)} == {8}
    g = torch.Generator().manual_seed(3)
    _same_outputs(back, theirs, torch.randn(3, 3, 8, 8, generator=g), torch.tensor([0, 999, 500]))


# ------------------------------------------------------------------ the evaluation


@pytest.fixture
def spied_eval(monkeypatch):
    """The evaluation with the stand-in Inception, and the image sets it loads (spec, n, images)."""
    monkeypatch.delenv("DDPM_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setattr(E, "Inception", lambda *a, **k: _PooledPixels())
    loaded = []
    real = E.load_images

    def load_images(spec, data_dir=None, n=None, **kw):
        out = real(spec, data_dir, n, **kw)
        loaded.append((spec, n, out[0]))
        return out

    monkeypatch.setattr(E, "load_images", load_images)
    return loaded


def test_the_fid_reference_is_the_split_asked_for(tiny_checkpoint, shared_data, spied_eval, tmp_path):  # noqa: F811
    kw = dict(n=4, data_dir=str(shared_data), reference_n=6, batch_size=4, figures=False, device="cpu")
    E.prepare(E.EvalSpec(str(tiny_checkpoint), ("kid",), out_dir=str(tmp_path / "a"), **kw))
    assert [(s, n) for s, n, _ in spied_eval] == [("mnist:train", 6)]  # the paper's: the training set
    spied_eval.clear()
    E.prepare(E.EvalSpec(str(tiny_checkpoint), ("kid",), out_dir=str(tmp_path / "b"), reference_split="test", **kw))
    assert [(s, n) for s, n, _ in spied_eval] == [("mnist:test", 6)]
    with pytest.raises(E.EvalError, match="--reference-split 'val': test or train"):
        E.EvalSpec(str(tiny_checkpoint), ("kid",), reference_split="val", **kw).checked()


def test_eval_records_kid_se_pixel_stds_and_per_image_bits(tiny_checkpoint, shared_data, spied_eval,  # noqa: F811
                                                          tmp_path):
    out = tmp_path / "ev"
    rep = E.evaluate(tiny_checkpoint, ["kid", "nll"], n=6, nll_n=3, nll_splits=("test",), out_dir=out,
                     data_dir=shared_data, reference_split="test", reference_n=6, batch_size=3, bf16=True,
                     figures=False, progress=False, device="cpu")
    r = rep["results"]
    # samples: bf16 (recorded), and the collapse detector's stds, recomputed from the images
    sampling = r["sampling"]
    assert sampling["network_precision"] == PRECISIONS[True]
    assert json.loads((out / "samples" / G.MANIFEST).read_text())["network_precision"] == PRECISIONS[True]
    samples = G.load_samples(out / "samples").astype(np.float64)
    (ref_spec, _, ref_images), = [s for s in spied_eval if s[1] == 6]
    assert ref_spec == "mnist:test"
    assert sampling["pixel_std_across_set"] == pytest.approx(samples.std(axis=0).mean(), abs=1e-3)
    want_ref = np.asarray(ref_images, dtype=np.float64).std(axis=0).mean()
    assert sampling["reference_pixel_std_across_set"] == pytest.approx(want_ref, abs=1e-3)
    assert sampling["reference_pixel_std_across_set"] > 10  # real digits vary across the set
    # KID: the whole-set estimate (N = M = 6: torch-fidelity's value) with its jackknife SE
    kid = r["kid"]
    assert kid["unbiased"] == pytest.approx(kid["value"], rel=1e-5) and kid["se"] > 0
    assert kid["reference"].startswith("mnist:test")
    # NLL: one value per image, in the order of the saved per-image terms, averaging to the value
    nll = r["nll_test"]
    per_image = np.array(nll["per_image_bpd"])
    assert len(per_image) == nll["n"] == 3
    assert per_image.mean() == pytest.approx(nll["value"], abs=1e-6)
    saved = np.load(out / "bound_terms_test.npz")["total_bpd_b"]
    np.testing.assert_allclose(per_image, saved, atol=2e-6)
    assert np.ptp(per_image) > 1e-3  # per image, not the mean repeated


def test_two_variances_on_the_same_images_are_paired_image_by_image(tiny_checkpoint, shared_data,  # noqa: F811
                                                                   tmp_path):
    kw = dict(nll_n=3, nll_splits=("test",), data_dir=shared_data, seed=4, figures=False, progress=False,
              device="cpu")
    a = E.evaluate(tiny_checkpoint, ["nll"], variance="beta", out_dir=tmp_path / "a", **kw)["results"]["nll_test"]
    b = E.evaluate(tiny_checkpoint, ["nll"], variance="beta_tilde", out_dir=tmp_path / "b", **kw)["results"]["nll_test"]
    p = C.paired_nll(a, b)
    d = np.array(a["per_image_bpd"]) - np.array(b["per_image_bpd"])
    assert p["n"] == 3 and p["mean"] == pytest.approx(d.mean()) and p["se"] == pytest.approx(d.std(ddof=1) / 3 ** 0.5)
    other_seed = E.evaluate(tiny_checkpoint, ["nll"], variance="beta", out_dir=tmp_path / "c",
                            **{**kw, "seed": 5})["results"]["nll_test"]
    assert C.paired_nll(a, other_seed) is None  # other noise: not comparable image by image


# ------------------------------------------------------------------ experiments: the quick profile


def test_quick_profile_runs_the_grid_on_mnist_and_the_seed_report_for_ten_epochs():
    grid = [n for n, r in RUNS.items() if r.family == "cifar10" and not r.released]
    assert set(P.TABLE2_RUNS.values()) <= set(grid)
    for name in grid:
        assert run_config_args(RUNS[name], "quick")[0] == "quick-grid", name
        assert run_config_args(RUNS[name], "paper")[0] == "cifar10", name
    assert run_config_args(RUNS["mnist_seed"], "quick")[0] == "quick-mnist"
    assert run_config_args(RUNS["cifar10_subset"], "quick")[0] == "quick-cifar10"
    grid_cfg, seed_cfg, subset_cfg = (get_preset(p) for p in ("quick-grid", "quick-mnist", "quick-cifar10"))
    assert grid_cfg.data.dataset == seed_cfg.data.dataset == "mnist" and grid_cfg.model == seed_cfg.model
    assert (seed_cfg.train.steps, seed_cfg.train.batch_size) == (4690, 128)
    assert seed_cfg.train.steps * seed_cfg.train.batch_size / 60_000 == pytest.approx(10, abs=0.01)  # epochs
    assert (subset_cfg.data.dataset, subset_cfg.data.subset) == ("cifar10", "partial")


def _eval_args(monkeypatch, tmp_path, name, ev, profile):
    """The command eval_run builds, parsed by the real command line into the EvalSpec it asks for."""
    from ddpm import cli
    from ddpm.cli import evaluate as cli_eval

    seen = []
    monkeypatch.setattr(R, "_stage", lambda argv, log, label, gpus=1: seen.append(argv) or R.Ran(0, [], []))
    R.eval_run(name, ev, profile, tmp_path / profile / "runs", tmp_path / profile / "results", None)
    (argv,) = seen
    monkeypatch.setattr(cli_eval, "resolve_checkpoint", str)
    return argv, cli_eval.spec_from_args(cli.build_parser().parse_args(argv)).checked()


def test_eval_command_at_quick_samples_in_bf16_against_the_test_split_and_at_paper_as_the_paper(
        monkeypatch, tmp_path):
    argv, spec = _eval_args(monkeypatch, tmp_path, "eps_simple", MAIN, "quick")
    assert "--bf16" in argv and spec.bf16 is True
    assert spec.reference_split == "test" and spec.nll_splits == ("test",)
    assert (spec.batch_size, spec.n, spec.nll_n, spec.reference_n) == (100, 500, 200, 500)
    argv, spec = _eval_args(monkeypatch, tmp_path, "eps_simple", MAIN, "paper")
    assert "--bf16" not in argv and spec.bf16 is False
    assert spec.reference_split == "train" and spec.nll_splits == ("test", "train")
    assert (spec.n, spec.nll_n, spec.reference_n) == (50_000, None, None)  # every image, as the paper
    argv, spec = _eval_args(monkeypatch, tmp_path, "cifar10_subset", RD_FIGURES, "quick")
    assert spec.nll_n == 16 and spec.metrics == ("rd",) and spec.figures is True  # SMALLER_EVAL's 16
    argv, spec = _eval_args(monkeypatch, tmp_path, "mu_simple", MAIN, "quick")  # a cell outside Table 1
    assert spec.n == 200 and spec.metrics == ("fid", "is", "kid")


def test_nll_images_is_the_smaller_of_the_profiles_and_the_evaluations_cap():
    assert EVAL_SIZE["quick"]["nll_n"] == 200 and EVAL_SIZE["paper"]["nll_n"] is None
    def nll_images(ev, profile, run="eps_simple"):
        return eval_size(run, ev, profile)[2]

    assert nll_images(MAIN, "quick") == 200
    assert nll_images(RD_FIGURES, "quick") == 32
    assert nll_images(Eval("x", ("nll",), max_nll_n=500), "quick") == 200
    assert nll_images(Eval("x", ("nll",), max_nll_n=200), "quick") == 200
    assert nll_images(MAIN, "paper") is None  # the whole split stays the whole split ...
    assert nll_images(RD_FIGURES, "paper") == 32  # ... unless the evaluation caps it
    # ... or the run needs less at that profile (registry.SMALLER_EVAL)
    assert nll_images(RD_FIGURES, "quick", "cifar10_subset") == 16
    assert eval_size("mu_simple", MAIN, "quick") == (200, ("fid", "is", "kid"), 200)
    assert eval_size("mnist_seed", MAIN, "quick")[:2] == (500, ("fid", "is", "kid"))
    assert eval_size("mu_simple", MAIN, "paper") == (50_000, MAIN.metrics, None)


def test_quick_runs_start_costliest_first_and_cifar10_subset_trains_as_itself(tmp_path, monkeypatch, capsys):
    fake = FakeDdpm()
    monkeypatch.setattr(R, "_call", fake)
    monkeypatch.setattr(R, "_POOL", None)
    R.run_experiments(experiments_for("quick"), "quick", tmp_path / "runs", tmp_path / "results", None,
                      jobs=1, progress_every=0, gpus=[])
    trains = [c["label"].removesuffix(" train") for c in fake.calls if _is_train(c["cmd"])]
    # mnist_seed trains 600k images (4690 x 128), a Table 2 cell 180k, cifar10_subset 42k
    assert trains[0] == "mnist_seed" and trains[-1] == "cifar10_subset"
    assert set(P.TABLE2_RUNS.values()) <= set(trains[1:-1])
    # eps_simple carries the most evaluations of the grid (Tables 1-2, variance, Figs. 5-7)
    assert trains.index("eps_simple") < min(trains.index(r) for r in ("mu_simple", "mu_vlb", "eps_vlb_learned"))
    assert "celebahq" not in trains  # the CIFAR10 subset's model is its own run, not CelebA-HQ's stand-in
    subset_cmd = next(c["cmd"] for c in fake.calls if c["label"] == "cifar10_subset train")
    assert subset_cmd[subset_cmd.index("--preset") + 1] == "quick-cifar10"
    assert "schedule" not in experiments_for("quick") and "sampler_steps" not in experiments_for("quick")


# ------------------------------------------------------------------ analysis.claims: the rules


S = 2.0 ** -10  # KIDs and SEs on a binary grid: the threshold below is exact in floating point


def test_kid_rule_needs_more_than_two_combined_standard_errors():
    a = {"kid": 4 * S, "se": 0.75 * S}
    b_se = 1.0 * S  # 2 sqrt(0.75^2 + 1) S = 2.5 S exactly
    at = lambda diff: C.compare_kid(a, {"kid": a["kid"] + diff, "se": b_se})  # noqa: E731
    assert at(2.5 * S)["threshold"] == 2.5 * S
    assert at(2.5 * S)["better"] is None  # exactly at the threshold: not better
    assert at(2.5 * S * (1 + 1e-9))["better"] == "A"
    assert at(-2.5 * S)["better"] is None and at(-2.5 * S * (1 + 1e-9))["better"] == "B"
    assert at(3.0 * S)["better"] == "A"  # SEs add in quadrature: 2 (0.75 + 1) S = 3.5 S would miss it
    assert at(2.4 * S)["better"] is None  # one SE (1.25 S) is not enough
    assert C.compare_kid(a, {"kid": 1.0, "se": None}) == {"diff": 1.0 - a["kid"], "threshold": None, "better": None}


def _nll(per_image, data="mnist:test: 200 images", seed=0):
    return {"per_image_bpd": list(per_image), "data": data, "seed": seed, "value": float(np.mean(per_image))}


def test_paired_nll_is_the_mean_and_se_of_per_image_differences_on_the_same_images():
    rng = np.random.default_rng(0)
    hard = rng.uniform(1.0, 3.0, 50)  # images differ far more than the models do
    a, b = hard + rng.normal(0, 0.01, 50), hard + 0.05 + rng.normal(0, 0.01, 50)
    p = C.paired_nll(_nll(a), _nll(b))
    d = a - b
    assert p["n"] == 50 and p["mean"] == pytest.approx(d.mean(), rel=1e-12)
    assert p["se"] == pytest.approx(d.std(ddof=1) / math.sqrt(50), rel=1e-12)
    # paired, A is better; unpaired, the spread of the images would hide a gap of 0.05
    assert p["better"] == "A" and p["resolves_paper_gap"]
    assert math.sqrt(a.var(ddof=1) / 50 + b.var(ddof=1) / 50) > abs(d.mean()) / 2
    assert C.paired_nll(_nll(b), _nll(a))["better"] == "B"
    for other in (_nll(b, data="mnist:test: 200 other images"), _nll(b, seed=1), _nll(b[:49])):
        assert C.paired_nll(_nll(a), other) is None
    assert C.paired_nll(_nll(a), None) is None


def test_rate_distortion_share_of_the_papers_table4():
    rows = [{"reverse_step": s, "rate_bpd": r, "distortion_rmse": d} for s, (r, d) in P.TABLE4.items()]
    shares = C.rd_shares(rows)
    # Table 4: 1.77581 bits/dim at the end, 0.11994 of them sent by step 900
    assert shares["share_last_10pct"] == pytest.approx(1 - 0.11994 / 1.77581, abs=1e-12)
    assert shares["share_last_10pct"] == pytest.approx(0.932, abs=5e-4)
    assert (shares["dist_at_0.9T"], shares["dist_at_T"], shares["rate"]) == (12.02277, 0.95136, 1.77581)


def _cell(base, name, *, warmup=100, grad_norms=(), status="finished", evals=None):
    """results/quick/<name>/: train.json with its warm-up, and stats.jsonl of gradient norms
    (one row per 25 steps)."""
    write_run(base, "quick", name, status=status, evals=evals)
    tj = base / "quick" / name / "train.json"
    train = json.loads(tj.read_text())
    train["config"]["train"]["warmup"] = warmup
    tj.write_text(json.dumps(train))
    rows = [{"step": 25 * (i + 1), "loss": 0.1, "grad_norm": g} for i, g in enumerate(grad_norms)]
    (base / "quick" / name / "stats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _stability(tmp_path, name="mu_simple", ref_kid=None, **kw):
    _cell(tmp_path / name, name, **kw)
    return C.stability(load_profile(tmp_path / name, "quick")[name], tmp_path / name / "quick", ref_kid)


def test_stability_flags_a_gradient_spike_after_warmup_and_a_collapse(tmp_path):
    warm = [50.0] * 4  # steps 25..100: the warm-up, whose large norms do not count
    calm = [1.0] * 40
    assert _stability(tmp_path / "a", grad_norms=warm + calm)["verdict"] == "stable"
    st = _stability(tmp_path / "b", grad_norms=warm + calm[:20] + [10.5] + calm[20:])
    assert st["verdict"] == "unstable" and "gradient norm" in st["why"]
    assert _stability(tmp_path / "c", grad_norms=warm + calm[:20] + [9.5] + calm[20:])["verdict"] == "stable"
    # the per-pixel std across the samples below 5% of the real images'
    sampling = lambda std: {"main": {"sampling": {"pixel_std_across_set": std,  # noqa: E731
                                                  "reference_pixel_std_across_set": 30.0}}}
    st = _stability(tmp_path / "d", grad_norms=warm + calm, evals=sampling(1.4))
    assert st["verdict"] == "unstable" and "collapsed" in st["why"]
    assert _stability(tmp_path / "e", grad_norms=warm + calm, evals=sampling(1.6))["verdict"] == "stable"
    # KID above 10x the eps / L_simple cell's
    kid = lambda v: {"main": {"kid": {"value": v, "unbiased": v, "se": 0.001, "n": 500}}}  # noqa: E731
    assert _stability(tmp_path / "f", grad_norms=calm, evals=kid(0.11), ref_kid=0.01)["verdict"] == "unstable"
    assert _stability(tmp_path / "g", grad_norms=calm, evals=kid(0.09), ref_kid=0.01)["verdict"] == "stable"
    assert _stability(tmp_path / "h", status="diverged")["verdict"] == "unstable"


def test_c7_is_met_at_fid_35_and_not_above(tmp_path):
    for fid, verdict in ((35.0, "met"), (35.01, "not met"), (12.0, "met")):
        base = tmp_path / str(fid)
        write_run(base, "quick", "mnist_seed", evals={"main": {"fid": {"value": fid, "n": 500}}})
        assert C.c7(load_profile(base, "quick"), {})["verdict"] == verdict, fid


def _quick_results(base):
    """A quick profile where L_simple has the clearly lower KID and Table 4 is the paper's."""
    rows = [{"reverse_step": s, "rate_bpd": r, "distortion_rmse": d} for s, (r, d) in P.TABLE4.items()]
    rng = np.random.default_rng(0)
    hard = rng.uniform(1.0, 3.0, 40)
    worse = hard + 0.05 + rng.normal(0, 0.01, 40)
    for name, kid, nll in (("eps_simple", 0.010, worse), ("eps_vlb", 0.030, hard)):
        main = {"kid": {"value": kid, "unbiased": kid, "se": 0.002, "n": 500},
                "fid": {"value": 1000 * kid, "se": 1.0, "n": 500},
                "nll_test": {"value": float(nll.mean()), "se": 0.1, "per_image_bpd": list(nll),
                             "data": "mnist:test: 40 images", "seed": 0},
                "sampling": {"pixel_std_across_set": 80.0, "reference_pixel_std_across_set": 85.0}}
        if name == "eps_simple":
            main["rd"] = {"table4": rows, "n": 40}
        _cell(base, name, grad_norms=[1.0] * 20, evals={"main": main})
    write_run(base, "quick", "mnist_seed", evals={"main": {"fid": {"value": 30.0, "n": 500}}})


def test_write_claims_writes_both_files_and_refreshes_only_its_profiles_block_of_the_readme(tmp_path):
    _quick_results(tmp_path)
    readme = tmp_path / "README.md"
    readme.write_text("# Results\n\nabove\n<!-- claims:quick -->\nstale claims\n<!-- /claims:quick -->\nbetween\n"
                      "<!-- claims:paper -->\npaper's own\n<!-- /claims:paper -->\nbelow\n")
    written = C.write_claims(tmp_path, "quick")
    base = tmp_path / "quick"
    assert {base / "claims.md", base / "claims.json", readme} <= set(written)
    cs = {c["id"]: c for c in json.loads((base / "claims.json").read_text())}
    assert list(cs) == ["C1", "C2", "C3", "C4", "C5", "C6", "C7"]
    assert cs["C1"]["verdict"] == "consistent"  # KID 0.010 vs 0.030, 2 SE = 0.0057
    assert cs["C2"]["verdict"] == "consistent"  # L lower by 0.05 on every image
    assert cs["C5"]["verdict"] == "consistent" and "93%" in cs["C5"]["ours"]
    assert cs["C7"]["verdict"] == "met"
    md = (base / "claims.md").read_text()
    assert md.startswith("# Claims: quick profile") and all(f"| {k} |" in md for k in cs)
    text = readme.read_text()
    assert "stale claims" not in text and "| C1 |" in text
    assert text.startswith("# Results\n\nabove\n<!-- claims:quick -->\n")
    assert text.endswith("<!-- /claims:quick -->\nbetween\n<!-- claims:paper -->\npaper's own\n"
                         "<!-- /claims:paper -->\nbelow\n")
    C.write_claims(tmp_path, "quick")  # idempotent
    assert readme.read_text() == text


def test_claims_at_the_paper_scale_without_kid_standard_errors_are_undecided_not_a_crash(tmp_path):
    for name in ("eps_simple", "eps_vlb"):
        write_run(tmp_path, "paper", name, evals={"main": {"kid": {
            "value": 0.001, "std": 1e-4, "unbiased": None, "se": None, "n": 50_000}}})
    cs = {c["id"]: c for c in C.claims(tmp_path, "paper")}
    assert cs["C1"]["verdict"] == "undecided"


def test_the_fid_floor_is_measured_once_per_family_and_again_only_when_asked(tmp_path, monkeypatch):
    """run_all.sh calls experiments.fid_floor after every run: a floor fid_floor.json holds at the
    profile's N is kept (the file untouched), a missing one measured, --again measures it anew."""
    from experiments import fid_floor as F
    from experiments.registry import EVAL_SIZE

    quick = tmp_path / "quick"
    (quick / "eps_simple").mkdir(parents=True)
    (quick / "eps_simple" / "train.json").write_text(json.dumps({"family": "cifar10"}))
    size = EVAL_SIZE["quick"]
    kept = {"cifar10": {"family": "cifar10", "dataset": "mnist", "n": size["n"], "n_reference": size["ref_n"],
                        "fid": 19.1, "kid": 4e-5}}
    path = quick / "fid_floor.json"
    path.write_text(json.dumps(kept))
    before = path.stat().st_mtime_ns
    measured = []
    monkeypatch.setattr(F, "floor", lambda profile, family, *a: measured.append(family) or
                        {**kept["cifar10"], "fid": 20.0, "family": family})
    assert F.main(["--profile", "quick", "--results-dir", str(tmp_path)]) == 0
    assert measured == [] and path.stat().st_mtime_ns == before
    (quick / "mnist_seed").mkdir()
    (quick / "mnist_seed" / "train.json").write_text(json.dumps({"family": "mnist"}))
    assert F.main(["--profile", "quick", "--results-dir", str(tmp_path)]) == 0
    assert measured == ["mnist"]  # the new family only; cifar10's floor kept
    assert json.loads(path.read_text())["cifar10"]["fid"] == 19.1
    assert F.main(["--profile", "quick", "--results-dir", str(tmp_path), "--again"]) == 0
    assert json.loads(path.read_text())["cifar10"]["fid"] == 20.0
