"""ddpm.bound (the bound's numerics, no IO) and the evaluation spec that metrics.json records."""

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from ddpm import bound as B
from ddpm.diffusion import GaussianDiffusion, make_betas
from ddpm.runtime import derive_seed


def _model(x, t):
    return 0.1 * x


def test_bound_terms_batches_draw_their_own_noise():
    """Over 5 images in batches of 2, batch k is calc_bpd_loop on its images with noise seeded
    by derive_seed(seed, k) (computed here batch by batch, independently)."""
    T = 21
    diffusion = GaussianDiffusion(make_betas("linear", T), "eps", "beta", "simple")
    images = torch.randint(0, 256, (5, 1, 4, 4), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    terms = B.bound_terms(_model, diffusion, images, batch_size=2, seed=3)
    assert B.n_batches(5, 2) == 3 and set(terms) == set(B.TERMS)
    assert terms["terms_bpd_bt"].shape == (5, T) and terms["mse_bt"].shape == (5, T)
    for k, s in enumerate(range(0, 5, 2)):
        g = torch.Generator().manual_seed(derive_seed(3, k))
        x0 = images[s:s + 2].float() / 127.5 - 1.0
        out = diffusion.calc_bpd_loop(_model, x0, clip_x0=True, max_batch=256, generator=g)
        for key in B.TERMS:
            np.testing.assert_array_equal(terms[key][s:s + 2], out[key].double().numpy())
    np.testing.assert_allclose(terms["terms_bpd_bt"].sum(1) + terms["prior_bpd_b"], terms["total_bpd_b"],
                               rtol=1e-6)


def test_nll_parts_are_the_right_columns_and_one_image_has_no_standard_error():
    rng = np.random.default_rng(2)
    terms = {"terms_bpd_bt": rng.uniform(0, 1, (4, 6)), "prior_bpd_b": rng.uniform(0, 1, 4)}
    terms["total_bpd_b"] = terms["terms_bpd_bt"].sum(1) + terms["prior_bpd_b"]
    s = B.summarize_nll(terms)
    assert s["L_0"]["mean"] == pytest.approx(terms["terms_bpd_bt"][:, 0].mean())  # the decoder: column 0
    assert s["kl_sum_L1_to_LTm1"]["mean"] == pytest.approx(terms["terms_bpd_bt"][:, 1:].sum(1).mean())
    assert s["L_T"]["se"] == pytest.approx(np.std(terms["prior_bpd_b"], ddof=1) / 2)
    one = B.mean_se(np.array([1.5]))
    assert one["mean"] == 1.5 and math.isnan(one["se"])
    bad = dict(terms, total_bpd_b=terms["total_bpd_b"] + 1e-3)  # parts that do not add up: refused
    with pytest.raises(AssertionError):
        B.summarize_nll(bad)


def test_table4_rows_are_in_the_papers_order_and_read_the_curve_at_their_steps():
    T = 40
    rd = {"reverse_step": np.arange(1, T + 1), "rate_bpd": np.linspace(0, 2, T) ** 2,
          "distortion_rmse": np.linspace(100, 1, T)}
    rows = B.table4_rows(rd)
    assert [r["reverse_step"] for r in rows] == [40, 36, 32, 28, 24, 20, 16, 12, 8, 4]
    for r in rows:  # reverse step s is entry s - 1 of the curve
        assert r["rate_bpd"] == rd["rate_bpd"][r["reverse_step"] - 1]
        assert r["distortion_rmse"] == rd["distortion_rmse"][r["reverse_step"] - 1]
    assert B.table4_steps(5)[-1] == 1  # never step 0, even for tiny T
    assert json.loads(json.dumps(rows)) == rows  # plain JSON for metrics.json


def test_the_spec_normalises_and_refuses_before_anything_runs():
    from ddpm.evaluate import EvalError, EvalSpec

    spec = EvalSpec("c.pt", metrics=(" FID", "nll ", ""), nll_splits=["test"], n=4).checked()
    assert spec.metrics == ("fid", "nll") and spec.nll_splits == ("test",) and spec.sampled == ("fid",)
    assert spec.bound_splits == ("test",)
    assert EvalSpec("c.pt", metrics=("rd",)).checked().bound_splits == ("test",)  # rd: test only
    assert EvalSpec("c.pt", metrics=("none",)).checked().metrics == ()  # the figures alone
    assert json.loads(json.dumps(dataclasses.asdict(spec)))["metrics"] == ["fid", "nll"]
    for kw, msg in (({"metrics": ("none",), "figures": False}, "nothing to do"),
                    ({"metrics": ("kid",), "n": 1}, "at least 2 samples"),
                    ({"metrics": ("nll",), "nll_splits": ("val",)}, "--nll-splits"),
                    ({"max_batch": 0}, "--max-batch 0")):
        with pytest.raises(EvalError, match=msg):
            EvalSpec("c.pt", **kw).checked()


def test_metrics_json_holds_the_spec_and_figures_alone_compute_no_metric(shared_data, tmp_path):
    """--metrics none: the figures only; run.spec is the spec as run (checked), verbatim."""
    from ddpm.checkpoint import save_checkpoint
    from ddpm.config import build_model, get_preset
    from ddpm.evaluate import EvalSpec, run_evaluation

    cfg = get_preset("tiny", ["diffusion.T=21"])
    torch.manual_seed(0)
    model = build_model(cfg)
    save_checkpoint(tmp_path / "c.pt", {"config": cfg.to_dict(), "step": 2, "model": model.state_dict(),
                                        "ema": model.state_dict()})
    spec = EvalSpec(str(tmp_path / "c.pt"), metrics=("none",), out_dir=str(tmp_path / "ev"),
                    data_dir=str(shared_data), device="cpu", seed=1)
    rep = run_evaluation(spec, progress=False)
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert m == json.loads(json.dumps(rep))
    assert m["run"]["spec"] == json.loads(json.dumps(dataclasses.asdict(spec.checked())))
    assert m["results"] == {} and m["run"]["metrics_requested"] == []
    assert {"fig6_progressive", "fig7_shared_latent", "fig8_interpolation"} <= set(m["figures"])
    assert not (tmp_path / "ev" / "samples").exists() and not list((tmp_path / "ev").glob("*.npz"))
