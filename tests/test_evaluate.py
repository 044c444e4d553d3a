"""ddpm.evaluate: NLL summary, rate-distortion as defined (Table 4), figures, the eval command."""

import json
import math
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from ddpm import evaluate as E
from ddpm import figures as FIG
from ddpm.diffusion import GaussianDiffusion, make_betas
from conftest import require_fid_helper


def test_rate_distortion_sums_the_right_terms():
    rng = np.random.default_rng(0)
    N, T = 3, 10
    terms = {"terms_bpd_bt": rng.uniform(0, 1, (N, T)), "prior_bpd_b": rng.uniform(0, 1e-3, N),
             "mse_bt": rng.uniform(0, 1, (N, T))}
    terms["total_bpd_b"] = terms["terms_bpd_bt"].sum(1) + terms["prior_bpd_b"]
    rd = E.rate_distortion(terms)
    kl, LT, mse = terms["terms_bpd_bt"].mean(0), terms["prior_bpd_b"].mean(), terms["mse_bt"].mean(0)
    for s in range(1, T + 1):
        t = T - s + 1  # the receiver holds x_t after s reverse steps
        assert rd["rate_bpd"][s - 1] == pytest.approx(LT + kl[t:T].sum())  # L_t .. L_{T-1}, 0-based cols
        assert rd["distortion_rmse"][s - 1] == pytest.approx(127.5 * math.sqrt(mse[t - 1]))
    assert rd["rate_bpd"][0] == pytest.approx(LT)  # s = 1: only x_T sent
    # s = T: every KL term and L_T, but not the decoder term L_0 (column 0).
    assert rd["rate_bpd"][-1] == pytest.approx(terms["total_bpd_b"].mean() - kl[0])
    assert E.table4_steps(1000) == [1000, 900, 800, 700, 600, 500, 400, 300, 200, 100]
    assert E.table4_steps(30) == [30, 27, 24, 21, 18, 15, 12, 9, 6, 3]


def test_nll_summary_and_standard_error():
    rng = np.random.default_rng(1)
    terms = {"terms_bpd_bt": rng.uniform(0, 1, (5, 4)), "prior_bpd_b": rng.uniform(0, 1, 5)}
    terms["total_bpd_b"] = terms["terms_bpd_bt"].sum(1) + terms["prior_bpd_b"]
    s = E.summarize_nll(terms)
    tot = terms["total_bpd_b"]
    assert s["bpd"] == pytest.approx(tot.mean())
    assert s["bpd_se"] == pytest.approx(np.std(tot, ddof=1) / math.sqrt(5))
    assert s["L_0"]["mean"] + s["kl_sum_L1_to_LTm1"]["mean"] + s["L_T"]["mean"] == pytest.approx(s["bpd"])


def test_rate_distortion_monotone_for_the_optimal_denoiser():
    """Data: pixels +-0.5 with equal probability. Then E[x_0 | x_t] = 0.5 tanh(0.5 a x_t / b^2)
    (a = sqrt(abar_t), b^2 = 1 - abar_t), so the eps-model built from it is Bayes-optimal and
    its x_0 error can only grow with t (x_0 -> x_t -> x_{t+1} is a Markov chain). Along
    Table 4's rows (s = T, 0.9T, ..., 0.1T) the rate must not increase and the distortion
    must not decrease."""
    T = 100
    diffusion = GaussianDiffusion(make_betas("linear", T), "eps", "beta", "simple")
    a_t = torch.from_numpy(diffusion.sqrt_alphas_cumprod).float()
    b_t = torch.from_numpy(diffusion.sqrt_one_minus_alphas_cumprod).float()

    def optimal_eps(xt, t):
        a, b = a_t[t].view(-1, 1, 1, 1), b_t[t].view(-1, 1, 1, 1)
        x0_hat = 0.5 * torch.tanh(0.5 * a * xt / b ** 2)
        return (xt - a * x0_hat) / b

    g = torch.Generator().manual_seed(0)
    x0 = (torch.randint(0, 2, (64, 1, 8, 8), generator=g).float() - 0.5)
    out = diffusion.calc_bpd_loop(optimal_eps, x0, max_batch=6400, generator=g)
    terms = {k: v.double().numpy() for k, v in out.items()}
    assert (terms["terms_bpd_bt"][:, 1:] >= -1e-9).all()  # KL terms are non-negative
    rows = E.table4_rows(E.rate_distortion(terms))
    rate = [r["rate_bpd"] for r in rows]
    dist = [r["distortion_rmse"] for r in rows]
    assert all(r1 >= r2 for r1, r2 in zip(rate, rate[1:])), rate
    assert all(d1 <= d2 for d1, d2 in zip(dist, dist[1:])), dist
    assert dist[-1] > 2 * dist[0]


def _trivial_model(x, t):
    return 0.1 * x


def test_figure_layouts(tmp_path):
    from PIL import Image

    T = 30
    diffusion = GaussianDiffusion(make_betas("linear", T), "eps", "beta", "simple")
    g = torch.Generator().manual_seed(0)
    grid6 = FIG.progressive_generation(diffusion, _trivial_model, (2, 1, 8, 8), tmp_path / "f6.png", generator=g,
                                       n_cols=5)
    assert grid6.shape == (2, 6, 8, 8, 1)
    assert FIG.reverse_indices(T, 5) == [29, 22, 14, 7, 0]
    k = FIG.display_scale(8)  # 8x8 images are shown at 64x64 by pixel repetition
    assert k == 8 and Image.open(tmp_path / "f6.png").size == (6 * (8 * k + 2) + 2, 2 * (8 * k + 2) + 2)
    big = np.asarray(Image.open(tmp_path / "f6.png"))
    np.testing.assert_array_equal(big[2:2 + 8 * k:k, 2:2 + 8 * k:k], grid6[0, 0, :, :, 0])
    blocks = FIG.shared_latent(diffusion, _trivial_model, (1, 8, 8), tmp_path / "f7.png", generator=g)
    assert sorted(blocks) == [7, 14, 21, 29] and all(b.shape == (4, 8, 8, 1) for b in blocks.values())
    x = torch.rand(4, 1, 8, 8, generator=g) * 2 - 1
    grid8 = FIG.interpolation(diffusion, _trivial_model, [(x[0], x[1]), (x[2], x[3])], tmp_path / "f8.png",
                              generator=g)
    assert grid8.shape == (2, 13, 8, 8, 1)  # source, lambda = 0, 0.1, ..., 1, source
    from ddpm.generate import to_uint8
    np.testing.assert_array_equal(grid8[1, 0], to_uint8(x[2:3])[0])
    np.testing.assert_array_equal(grid8[1, -1], to_uint8(x[3:4])[0])
    rd = {"reverse_step": np.arange(1, T + 1), "rate_bpd": np.linspace(0, 1, T), "distortion_rmse": np.linspace(9, 1, T)}
    assert FIG.rd_plots(rd, tmp_path / "f5.png").is_file()


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from ddpm.checkpoint import save_checkpoint
    from ddpm.config import build_model, get_preset

    cfg = get_preset("tiny", ["diffusion.T=21"])
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_checkpoint(path, {"config": cfg.to_dict(), "step": 3, "model": model.state_dict(),
                           "ema": model.state_dict()})
    return path


def test_eval_command_end_to_end(tiny_checkpoint, shared_data, tmp_path, capsys):
    """NLL + rd through `python -m ddpm eval`, for both fixed variances of one checkpoint."""
    from ddpm.cli import main

    results = {}
    for var in ("beta", "beta_tilde"):
        out = tmp_path / var
        rc = main(["eval", "--checkpoint", str(tiny_checkpoint), "--metrics", "nll,rd", "--nll-n", "3",
                   "--nll-splits", "test", "--var", var, "--out", str(out), "--data-dir", str(shared_data),
                   "--seed", "4", "--no-figures", "--no-progress", "--device", "cpu"])
        assert rc == 0
        printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        m = json.loads((out / "metrics.json").read_text())
        assert printed["nll_test"]["value"] == m["results"]["nll_test"]["value"]
        nll, rd = m["results"]["nll_test"], m["results"]["rd"]
        for entry in (nll, rd):
            for key in ("n", "variance", "ema", "seed", "git_commit", "device", "elapsed_s", "T"):
                assert key in entry, key
        assert nll["n"] == rd["n"] == 3 and nll["variance"] == var and nll["ema"] is True and nll["T"] == 21
        assert nll["se"] > 0 and np.isfinite(nll["value"])
        parts = nll["L_T"]["mean"] + nll["L_0"]["mean"] + nll["kl_sum_L1_to_LTm1"]["mean"]
        assert parts == pytest.approx(nll["value"], rel=1e-9)
        rows = rd["table4"]
        assert [r["reverse_step"] for r in rows] == E.table4_steps(21)
        rates = [r["rate_bpd"] for r in rows]
        assert all(r1 >= r2 for r1, r2 in zip(rates, rates[1:]))
        # rate at s = T is the bound without the decoder term
        assert rows[0]["rate_bpd"] + rd["L_0_bpd"] == pytest.approx(nll["value"], rel=1e-6)
        saved = np.load(out / "bound_terms_test.npz")
        assert saved["terms_bpd_bt"].shape == (3, 21)
        results[var] = nll
    # Same images and noise, different reverse variance: the bound changes.
    assert results["beta"]["value"] != pytest.approx(results["beta_tilde"]["value"], rel=1e-6)


def test_eval_fid_offline_reports_is_unavailable(tiny_checkpoint, shared_data, tmp_path, monkeypatch):
    """FID/KID from generated samples against MNIST test, offline: IS must be null with a reason."""
    from ddpm import inception as F

    require_fid_helper()
    w = F.build_inception_weights(tmp_path / "inception.pth")
    monkeypatch.setenv(F.ENV_CACHE, str(tmp_path / "cache"))
    rep = E.evaluate(tiny_checkpoint, ["fid", "kid", "is"], n=5, out_dir=tmp_path / "ev", data_dir=shared_data,
                     reference="mnist:test", reference_n=5, batch_size=3, inception_weights=w, figures=False,
                     progress=False, device="cpu")
    r = rep["results"]
    assert r["fid"]["n"] == 5 and r["fid"]["n_reference"] == 5 and "mnist:test" in r["fid"]["reference"]
    assert np.isfinite(r["fid"]["value"]) and r["fid"]["value"] > 0
    assert r["kid"]["subset_size"] == 5
    assert r["is"]["value"] is None and "not available offline" in r["is"]["unavailable"]
    assert r["fid"]["pixel_map"].startswith("clip to [-1, 1]")
    assert sorted(p.name for p in (tmp_path / "ev" / "samples").glob("shard_*")) == ["shard_00000.npz",
                                                                                       "shard_00001.npz"]
    assert list((tmp_path / "cache" / "fidelity").glob("mnist-test-n5-seed2020-offline-*.pt"))


def test_eval_with_a_fewer_step_sampler_records_it_and_never_mixes_its_samples(tiny_checkpoint, shared_data,
                                                                               tmp_path, monkeypatch):
    from ddpm import inception as F

    w = F.build_inception_weights(tmp_path / "inception.pth")
    monkeypatch.setenv(F.ENV_CACHE, str(tmp_path / "cache"))
    kw = dict(n=4, out_dir=tmp_path / "ev", data_dir=shared_data, reference="mnist:test", reference_n=4,
              batch_size=4, inception_weights=w, figures=False, progress=False, device="cpu")
    rep = E.evaluate(tiny_checkpoint, ["kid"], sampler="ddim", steps=5, eta=0.5, **kw)
    kid = rep["results"]["kid"]
    assert kid["sampler_spec"] == {"sampler": "ddim", "steps": 5, "of_T": 21, "eta": 0.5, "skip": "uniform"}
    assert kid["sampler"].startswith("DDIM") and rep["results"]["sampling"]["sampler_spec"] == kid["sampler_spec"]
    assert rep["run"]["spec"]["sampler"] == "ddim" and rep["run"]["spec"]["steps"] == 5
    # the same folder asked for ancestral samples: refused before sampling, never mixed
    with pytest.raises(Exception, match="holds samples of a different run"):
        E.evaluate(tiny_checkpoint, ["kid"], **kw)
    with pytest.raises(E.EvalError, match="--steps 22"):
        E.evaluate(tiny_checkpoint, ["kid"], sampler="ddim", steps=22, **{**kw, "out_dir": tmp_path / "x"})
    with pytest.raises(E.EvalError, match="belong to --sampler respaced or ddim"):
        E.evaluate(tiny_checkpoint, ["kid"], steps=5, **{**kw, "out_dir": tmp_path / "y"})


def test_eval_on_a_folder_dataset_decodes_images_like_the_trainer(tmp_path):
    """A folder dataset of 40x30 RGB images evaluated by a 1-channel 28x28 model: the NLL
    images are decoded as data.FolderImages does (resize, center crop, grayscale)."""
    from PIL import Image

    from ddpm.checkpoint import save_checkpoint
    from ddpm.config import build_model, get_preset

    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for k in range(3):
        Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(folder / f"{k}.png")
    cfg = get_preset("tiny", ["diffusion.T=21", "data.dataset=folder", f"data.path={folder}"])
    torch.manual_seed(0)
    model = build_model(cfg)
    save_checkpoint(tmp_path / "c.pt", {"config": cfg.to_dict(), "step": 1, "model": model.state_dict(),
                                        "ema": model.state_dict()})
    rep = E.evaluate(tmp_path / "c.pt", ["nll"], nll_splits=["train", "test"], out_dir=tmp_path / "ev",
                     figures=False, progress=False, device="cpu")
    r = rep["results"]
    assert r["nll_train"]["n"] == 3 and "28x28" in r["nll_train"]["data"] and np.isfinite(r["nll_train"]["value"])
    assert r["nll_test"]["value"] is None and "no test split" in r["nll_test"]["unavailable"]


# --------------------------------------------------------------------------- provenance


def _git(repo, *args) -> str:
    return subprocess.run(["git", "-c", "user.name=test", "-c", "user.email=test@example.com", *args], cwd=repo,
                          check=True, capture_output=True, text=True).stdout.strip()


def _expected_commit(repo) -> str:
    return _git(repo, "rev-parse", "HEAD") + ("+dirty(ddpm/)" if _git(repo, "status", "--porcelain", "--", "ddpm")
                                              else "")


@pytest.fixture(scope="module")
def two_weights_checkpoint(tmp_path_factory):
    """A checkpoint at step 7 whose EMA and raw weights differ, for a folder of 4 images."""
    from PIL import Image

    from ddpm.checkpoint import save_checkpoint
    from ddpm.config import build_model, get_preset

    base = tmp_path_factory.mktemp("two_weights")
    folder = base / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for k in range(4):
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(folder / f"{k}.png")
    cfg = get_preset("tiny", ["diffusion.T=21", "data.dataset=folder", f"data.path={folder}"])
    torch.manual_seed(0)
    ema = build_model(cfg)
    with torch.no_grad():
        for p in ema.parameters():  # open the zero-initialized output layer too
            p.add_(0.02 * torch.randn_like(p))
    raw = build_model(cfg)
    raw.load_state_dict(ema.state_dict())
    with torch.no_grad():
        for p in raw.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = base / "ckpt.pt"
    save_checkpoint(path, {"config": cfg.to_dict(), "step": 7, "model": raw.state_dict(), "ema": ema.state_dict()})
    return path, cfg, folder


def test_metrics_json_records_the_seed_step_commit_and_weights_actually_used(two_weights_checkpoint, tmp_path):
    """Values, not keys: metrics.json's seed and weights (EMA or raw) reproduce its NLL, its
    checkpoint_step is the checkpoint's step, and git_commit is this checkout's HEAD with the
    dirty flag of ddpm/ as git reports it."""
    from ddpm.checkpoint import read_checkpoint
    from ddpm.config import build_diffusion, build_model
    from ddpm.runtime import derive_seed
    from ddpm.sources import load_images

    path, cfg, folder = two_weights_checkpoint
    state = read_checkpoint(path)
    images, _, _ = load_images(f"folder:{folder}", resize_to=(1, 28))
    diffusion = build_diffusion(cfg)

    def nll(weights: str, seed: int) -> float:
        """The bound as bound_terms documents it: batch k (one batch here) draws its noise from a
        generator seeded by derive_seed(seed, k); x0 = x / 127.5 - 1; clipped x0 predictions."""
        model = build_model(cfg)
        model.load_state_dict(state[weights])
        g = torch.Generator().manual_seed(derive_seed(seed, 0))
        x0 = images.float() / 127.5 - 1.0
        with torch.no_grad():
            out = diffusion.calc_bpd_loop(model.eval(), x0, clip_x0=True, max_batch=256, generator=g)
        return float(out["total_bpd_b"].double().mean())

    repo = Path(E.__file__).resolve().parents[1]
    values = {}
    for ema in (True, False):
        before = _expected_commit(repo)
        E.evaluate(path, ["nll"], nll_splits=["train"], ema=ema, seed=5, out_dir=tmp_path / f"ema{ema}",
                   figures=False, progress=False, device="cpu")
        after = _expected_commit(repo)  # others may commit or edit meanwhile: either state is right
        m = json.loads((tmp_path / f"ema{ema}" / "metrics.json").read_text())
        res = m["results"]["nll_train"]
        for rec in (m["run"], res):
            assert rec["seed"] == 5 and rec["checkpoint_step"] == 7 and rec["ema"] is ema
            assert rec["git_commit"] in (before, after), (rec["git_commit"], before, after)
        assert res["n"] == 4
        assert res["value"] == pytest.approx(nll("ema" if ema else "model", 5), rel=1e-9)
        values[ema] = res["value"]
    # the checks above have power: the weights and the seed each change the value
    assert abs(values[True] - values[False]) > 1e-3 * abs(values[True])
    assert abs(nll("ema", 6) - values[True]) > 1e-6 * abs(values[True])


def test_git_commit_flags_uncommitted_changes_to_the_library_only(tmp_path):
    """provenance.git_commit() run from a copy of ddpm/ in a scratch repository: the bare commit
    when clean, still bare after a change outside ddpm/, '+dirty(ddpm/)' after a change inside."""
    import importlib
    import importlib.util
    import shutil
    import sys

    repo = tmp_path / "repo"
    shutil.copytree(Path(E.__file__).parent, repo / "ddpm", ignore=shutil.ignore_patterns("__pycache__"))
    (repo / "notes.txt").write_text("a\n")
    (repo / ".gitignore").write_text("__pycache__/\n")  # as the project's: importing writes bytecode
    _git(repo, "init", "-q")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "scratch")
    head = _git(repo, "rev-parse", "HEAD")
    name = "ddpm_scratch_copy"
    spec = importlib.util.spec_from_file_location(name, repo / "ddpm" / "__init__.py",
                                                  submodule_search_locations=[str(repo / "ddpm")])
    pkg = importlib.util.module_from_spec(spec)
    sys.modules[name] = pkg
    try:
        spec.loader.exec_module(pkg)
        ck = importlib.import_module(f"{name}.provenance")
        assert Path(ck.__file__).resolve().parent == (repo / "ddpm").resolve()
        assert ck.git_commit() == head
        (repo / "notes.txt").write_text("b\n")  # outside the library
        assert ck.git_commit() == head
        with open(repo / "ddpm" / "sampling.py", "a") as f:
            f.write("# an uncommitted edit\n")
        assert ck.git_commit() == head + "+dirty(ddpm/)"
    finally:
        for k in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            del sys.modules[k]
