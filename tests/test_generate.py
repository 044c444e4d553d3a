"""ddpm.generate: exactly N images, resumable, seeded per shard, and the paper's pixel map."""

import json

import numpy as np
import pytest
import torch

from ddpm import generate as G
from ddpm.config import build_diffusion, build_model, get_preset


@pytest.fixture(scope="module")
def tiny():
    cfg = get_preset("tiny", ["diffusion.T=21"])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    # The UNet's last layer is zero-initialized; randomize it so samples depend on the network.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model, build_diffusion(cfg)


class Interrupt(Exception):
    pass


class DiesAfter(torch.nn.Module):
    """Wraps a model and raises after ``calls`` forward calls, like a killed job."""

    def __init__(self, model, calls):
        super().__init__()
        self.model, self.left = model, calls

    def forward(self, x, t):
        if self.left == 0:
            raise Interrupt()
        self.left -= 1
        return self.model(x, t)


def test_resume_gives_exactly_n_identical_images(tiny, tmp_path):
    model, diffusion = tiny
    n, bs = 7, 3  # 3 shards, the last one partial
    ref = G.generate(model, diffusion, n, (1, 28, 28), batch_size=bs, seed=5, progress=False)
    assert ref.shape == (n, 28, 28, 1) and ref.dtype == np.uint8
    # Killed in the middle of the second shard: one whole shard on disk, no partial one.
    with pytest.raises(Interrupt):
        G.generate(DiesAfter(model, diffusion.T + 10), diffusion, n, (1, 28, 28), out_dir=tmp_path,
                   batch_size=bs, seed=5, progress=False)
    assert sorted(p.name for p in tmp_path.glob("shard_*")) == ["shard_00000.npz"]
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(RuntimeError, match="incomplete"):
        G.load_samples(tmp_path)
    # A time-boxed call stops after the first max_shards shards.
    assert G.generate(model, diffusion, n, (1, 28, 28), out_dir=tmp_path, batch_size=bs, seed=5, progress=False,
                      return_images=False, max_shards=2) is None
    assert len(list(tmp_path.glob("shard_*"))) == 2
    out = G.generate(model, diffusion, n, (1, 28, 28), out_dir=tmp_path, batch_size=bs, seed=5,
                     progress=False)
    assert out.shape[0] == n
    np.testing.assert_array_equal(out, ref)
    np.testing.assert_array_equal(G.load_samples(tmp_path), ref)
    # A resumed run reuses the shards: a model that cannot be called still succeeds.
    again = G.generate(DiesAfter(model, 0), diffusion, n, (1, 28, 28), out_dir=tmp_path,
                       batch_size=bs, seed=5, progress=False)
    np.testing.assert_array_equal(again, ref)


def test_seed_changes_images_and_shards_differ(tiny):
    model, diffusion = tiny
    a = G.generate(model, diffusion, 4, (1, 28, 28), batch_size=2, seed=0, progress=False)
    b = G.generate(model, diffusion, 4, (1, 28, 28), batch_size=2, seed=1, progress=False)
    assert not np.array_equal(a, b)
    assert not np.array_equal(a[:2], a[2:])  # shards use different streams


def test_manifest_mismatch_is_an_error(tiny, tmp_path):
    model, diffusion = tiny
    G.generate(model, diffusion, 2, (1, 28, 28), out_dir=tmp_path, batch_size=2, seed=0, progress=False)
    m = json.loads((tmp_path / G.MANIFEST).read_text())
    assert m["n"] == 2 and m["pixel_map"] == G.PIXEL_MAP and m["steps"] == diffusion.T
    with pytest.raises(RuntimeError, match="different run"):
        G.generate(model, diffusion, 2, (1, 28, 28), out_dir=tmp_path, batch_size=2, seed=1, progress=False)


def test_pixel_map_clips_and_rounds():
    x = torch.tensor([-2.0, -1.0, 0.0, 1.0 / 127.5 * 0.49, 1.0, 3.0]).view(1, 1, 1, 6)
    got = G.to_uint8(x)[0, 0, :, 0]
    # (x + 1) * 127.5 = [clip, 0, 127.5, 127.99, 255, clip]; round-half-even gives 128 for 127.5
    np.testing.assert_array_equal(got, [0, 0, 128, 128, 255, 255])
    imgs = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    np.testing.assert_array_equal(G.to_uint8(G.from_uint8(imgs)), imgs)


def test_grid_layout_and_pngs(tmp_path):
    from PIL import Image

    imgs = np.stack([np.full((3, 5, 1), 10 * k, np.uint8) for k in range(5)])
    grid = G.make_grid(imgs, nrow=2, pad=1)
    assert grid.shape == (3 * 4 + 1, 2 * 6 + 1, 1)
    assert grid[1, 1, 0] == 0 and grid[1, 7, 0] == 10 and grid[5, 1, 0] == 20 and grid[9, 1, 0] == 40
    assert grid[9, 7, 0] == 255  # the empty sixth cell is padding
    G.write_pngs(imgs, tmp_path / "png", grid_path=tmp_path / "grid.png")
    assert sorted(p.name for p in (tmp_path / "png").iterdir()) == [f"{k:06d}.png" for k in range(5)]
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "png" / "000003.png")), imgs[3, :, :, 0])
