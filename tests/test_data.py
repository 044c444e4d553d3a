"""Data loading: folder images (resize/crop), torchvision layouts, the data dirs searched, the
CIFAR10 subset by index, missing-data errors, data order."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm import data as D
from ddpm.config import DataConfig

def _png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_scaling_is_x_over_127_5_minus_1():
    x = torch.tensor([0, 1, 127, 128, 255], dtype=torch.uint8)
    expect = torch.tensor([0, 1, 127, 128, 255], dtype=torch.float64) / 127.5 - 1
    assert torch.allclose(D.to_model_range(x).double(), expect, atol=1e-7)
    assert D.to_model_range(x).min() == -1 and D.to_model_range(x).max() == 1


def test_folder_is_recursive_sorted_and_center_crops(tmp_path):
    # 16 wide x 8 high: left quarter red, middle half green, right quarter blue.
    # At resolution 8 the shorter side already fits, so the center crop is all green.
    a = np.zeros((8, 16, 3), np.uint8)
    a[:, :4] = (255, 0, 0)
    a[:, 4:12] = (0, 255, 0)
    a[:, 12:] = (0, 0, 255)
    _png(tmp_path / "b" / "wide.png", a)
    # 32x32 uniform gray: resized to 8x8 it stays that gray exactly.
    _png(tmp_path / "a.png", np.full((32, 32, 3), 77, np.uint8))
    (tmp_path / "notes.txt").write_text("not an image")
    ds = D.FolderImages(tmp_path, resolution=8, channels=3)
    assert [p.relative_to(tmp_path).as_posix() for p in ds.files] == ["a.png", "b/wide.png"]
    gray, wide = ds[0], ds[1]
    assert gray.shape == wide.shape == (3, 8, 8) and gray.dtype == torch.uint8
    assert (gray == 77).all()
    assert (wide[0] == 0).all() and (wide[1] == 255).all() and (wide[2] == 0).all()


def test_folder_grayscale_and_tall_images(tmp_path):
    a = np.zeros((40, 10), np.uint8)  # tall: resized to 8 x 32, center rows kept
    a[16:24] = 200
    _png(tmp_path / "tall.png", a)
    x = D.FolderImages(tmp_path, resolution=8, channels=1)[0]
    assert x.shape == (1, 8, 8)
    # Rows 16..24 of 40 map to rows 12.8..19.2 of 32; the crop keeps rows 12..20: the band in the
    # middle rows, partly covered edge rows, symmetric about the center.
    assert (x[0, 2:6] == 200).all()
    assert (x[0, 0] < 100).all() and (x[0, 7] < 100).all()
    assert torch.equal(x[0], x[0].flip(0))


def test_load_folder_in_memory_and_relative_to_data_dir(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    for i in range(5):
        _png(tmp_path / "set" / f"{i}.png", rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    monkeypatch.setenv(D.ENV_DATA_DIR, str(tmp_path))
    ds = D.load_dataset(DataConfig(dataset="folder", path="set", resolution=8, channels=3))
    assert isinstance(ds, D.TensorImages) and ds.images.shape == (5, 3, 8, 8)
    first = np.asarray(Image.open(tmp_path / "set" / "0.png"))
    assert np.array_equal(ds.images[0].permute(1, 2, 0).numpy(), first)
    # Above the in-memory threshold the same images are decoded lazily, in the same order.
    monkeypatch.setattr(D, "IN_MEMORY_BYTES", 0)
    lazy = D.load_dataset(DataConfig(dataset="folder", path="set", resolution=8, channels=3))
    assert isinstance(lazy, D.FolderImages)
    a = D.batch_stream(ds, seed=3, start_step=2, global_batch=4)
    b = D.batch_stream(lazy, seed=3, start_step=2, global_batch=4, num_workers=2)  # DataLoader workers
    for _ in range(3):  # crosses an epoch boundary (5 images, 4 per batch)
        assert torch.equal(next(a), next(b))


@pytest.fixture
def nowhere(tmp_path, monkeypatch):
    """No data dir holds anything: no $DDPM_DATA_DIR, an empty ./data, no shared/data."""
    monkeypatch.delenv(D.ENV_DATA_DIR, raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(D, "SHARED_DATA_DIR", tmp_path / "no-shared-data")
    return tmp_path


def test_data_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.delenv(D.ENV_DATA_DIR, raising=False)
    assert D.resolve_data_dir() == Path("data").absolute()
    assert D.data_dirs() == [Path("data").absolute(), D.SHARED_DATA_DIR]
    monkeypatch.setenv(D.ENV_DATA_DIR, str(tmp_path))
    assert D.resolve_data_dir() == tmp_path
    assert D.resolve_data_dir(tmp_path / "x") == tmp_path / "x"  # --data-dir wins
    # the search order: --data-dir, $DDPM_DATA_DIR, ./data, shared/data beside the checkout
    assert D.data_dirs(tmp_path / "x") == [tmp_path / "x", tmp_path, Path("data").absolute(), D.SHARED_DATA_DIR]
    assert D.SHARED_DATA_DIR == Path(D.__file__).resolve().parents[2] / "shared" / "data"


def test_each_dataset_comes_from_the_first_data_dir_that_holds_it(nowhere):
    first, second = nowhere / "first", nowhere / "second"
    _png(second / "faces" / "a.png", np.full((8, 8, 3), 10, np.uint8))
    _png(first / "faces" / "a.png", np.full((8, 8, 3), 20, np.uint8))
    cfg = DataConfig(dataset="folder", path="faces", resolution=8)
    assert (D.load_dataset(cfg, second).images == 10).all()  # --data-dir first
    os.environ[D.ENV_DATA_DIR] = str(first)
    try:
        assert (D.load_dataset(cfg, second).images == 10).all()
        assert (D.load_dataset(cfg).images == 20).all()  # then $DDPM_DATA_DIR
        ds = D.load_dataset(cfg, nowhere / "empty")
        assert (ds.images == 20).all()  # a dir without it is passed over
        assert ds.data_root == first  # the dir it was read from (a run records it), not the first searched
        assert D.load_dataset(cfg, second).data_root == second
    finally:
        del os.environ[D.ENV_DATA_DIR]


@pytest.mark.parametrize("name,layout", [("mnist", "MNIST/raw"), ("cifar10", "cifar-10-batches-py")])
def test_missing_torchvision_set_says_what_to_do_and_downloads_nothing(nowhere, name, layout):
    cfg = DataConfig(dataset=name, resolution=28 if name == "mnist" else 32,
                     channels=1 if name == "mnist" else 3)
    empty = nowhere / "empty"
    with pytest.raises(D.DataError) as e:
        D.load_dataset(cfg, empty)
    msg = str(e.value)
    for part in (str(empty), layout, "--download", "--data-dir", D.ENV_DATA_DIR, str(D.SHARED_DATA_DIR)):
        assert part in msg, (part, msg)
    assert not any(nowhere.rglob("*")), "nothing may be downloaded or created without --download"


def test_download_goes_to_the_first_data_dir_and_says_so(nowhere, monkeypatch, capsys):
    import torchvision

    asked = []

    class Offline:
        def __init__(self, root, train, download):
            asked.append((root, download))
            raise RuntimeError("<urlopen error no network>")

    monkeypatch.setattr(torchvision.datasets, "MNIST", Offline)
    with pytest.raises(D.DataError, match="could not download mnist.*no network.*--data-dir"):
        D.split_images("mnist", "train", nowhere / "mine", download=True)
    assert asked == [(str(nowhere / "mine"), True)]
    assert f"downloading it with torchvision into {nowhere / 'mine'}" in capsys.readouterr().err


def _fake_torchvision_cifar10(root: Path, export: Path) -> None:
    """A CIFAR10 in torchvision's layout whose images at the subset's indices are the export's
    (training images 0..3999 in data_batch_1; the test images at their test_batch positions,
    every other test image of another class)."""
    import pickle

    sub = D.CIFAR10_SUBSETS["partial"]
    batches = root / "cifar-10-batches-py"
    batches.mkdir(parents=True)
    read = lambda p: np.asarray(Image.open(p).convert("RGB"), np.uint8).transpose(2, 0, 1).reshape(-1)
    train = np.random.RandomState(0).randint(0, 256, (10000, 3072), dtype=np.uint8)
    for i in sub.train:
        train[i] = read(export / "train" / f"{i:05d}.png")
    test = np.zeros((10000, 3072), np.uint8)
    labels = [D.CIFAR10_CLASSES.index("cat")] * 10000
    for c in sub.test_classes:
        for f in (export / "test" / c).glob("*.png"):
            test[int(f.stem)], labels[int(f.stem)] = read(f), D.CIFAR10_CLASSES.index(c)
    for name, x, y in (("data_batch_1", train, [0] * 10000), ("test_batch", test, labels)):
        with open(batches / name, "wb") as fh:
            pickle.dump({"data": x, "labels": y}, fh)
    with open(batches / "batches.meta", "wb") as fh:
        pickle.dump({"label_names": list(D.CIFAR10_CLASSES)}, fh)


def test_the_cifar10_subset_is_the_same_images_from_torchvision_or_the_png_export(shared_data, nowhere,
                                                                                   monkeypatch):
    import torchvision

    export = shared_data / "cifar10-partial"
    from_export = {s: D.split_images("cifar10", s, shared_data, subset="partial") for s in ("train", "test")}
    assert from_export["train"].shape == (4000, 3, 32, 32) and from_export["test"].shape == (4000, 3, 32, 32)
    full = nowhere / "full"
    _fake_torchvision_cifar10(full, export)
    cls = torchvision.datasets.CIFAR10
    monkeypatch.setattr(cls, "train_list", [["data_batch_1", None]])  # one batch; no md5 of a fake
    monkeypatch.setattr(cls, "_check_integrity", lambda self: True)
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": None})
    for split in ("train", "test"):  # full CIFAR10 is read where present, indexed by the subset
        assert torch.equal(D.split_images("cifar10", split, full, subset="partial"), from_export[split])
    cfg = DataConfig(dataset="cifar10", subset="partial")
    assert torch.equal(D.load_dataset(cfg, full).images, from_export["train"])
    with pytest.raises(D.DataError, match="unknown subset"):
        D.split_images("cifar10", "train", full, subset="nope")


def test_missing_or_empty_folder(tmp_path):
    with pytest.raises(D.DataError, match="does not exist.*--data-dir"):
        D.load_dataset(DataConfig(dataset="folder", path="celebahq256", resolution=8), tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(D.DataError, match="holds no images"):
        D.load_dataset(DataConfig(dataset="folder", path="empty", resolution=8), tmp_path)


def test_no_silent_resize_of_mnist_or_cifar10(tmp_path):
    with pytest.raises(D.DataError, match="28x28"):
        D.load_dataset(DataConfig(dataset="mnist", resolution=32, channels=1), tmp_path)
    with pytest.raises(D.DataError, match="32x32"):
        D.load_dataset(DataConfig(dataset="cifar10", resolution=32, channels=1), tmp_path)


def test_mnist_from_shared_folder(shared_data):
    ds = D.load_dataset(DataConfig(dataset="mnist", resolution=28, channels=1, hflip=False), shared_data)
    assert ds.images.shape == (60000, 1, 28, 28) and ds.images.dtype == torch.uint8
    assert ds.images.max() == 255 and ds.images.min() == 0


def test_epochs_visit_every_example_once_and_resume_needs_no_replay():
    n, B = 10, 4  # batches straddle epoch boundaries
    stream = np.concatenate([D.step_indices(n, 7, s, B) for s in range(10)])  # 40 = 4 epochs
    for e in range(4):
        assert sorted(stream[e * n:(e + 1) * n]) == list(range(n))
    assert not np.array_equal(stream[:n], stream[n:2 * n]), "each epoch has its own order"
    # Starting at step 6 gives exactly what the uninterrupted stream had there.
    ds = D.TensorImages(torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1), "ids")
    it = D.batch_stream(ds, seed=7, start_step=6, global_batch=B)
    got = np.concatenate([next(it).flatten().numpy() for _ in range(4)])
    assert np.array_equal(got, stream[24:40])


def test_rank_slices_concatenate_to_the_global_batch():
    n, B = 13, 6
    for step in range(5):
        whole = D.step_indices(n, 1, step, B)
        parts = [D.step_indices(n, 1, step, B, rank=r, world_size=3) for r in range(3)]
        assert np.array_equal(np.concatenate(parts), whole)
    with pytest.raises(ValueError, match="divisible"):
        D.batch_stream(D.TensorImages(torch.zeros(4, 1, 2, 2, dtype=torch.uint8), "z"), 0, 0, 5,
                       rank=0, world_size=2)


def test_an_incomplete_cifar10_export_is_an_error_not_fewer_images(shared_data, nowhere):
    export = nowhere / "cut" / "cifar10-partial"
    for c in ("airplane", "automobile", "ship"):  # the truck folder is missing
        (export / "test" / c).mkdir(parents=True)
        for f in sorted((shared_data / "cifar10-partial" / "test" / c).glob("*.png")):
            (export / "test" / c / f.name).symlink_to(f)
    with pytest.raises(D.DataError, match="incomplete.*test/truck has 0"):
        D.split_images("cifar10", "test", nowhere / "cut", subset="partial")


def test_the_dataloader_path_leaves_the_global_torch_rng_alone(tmp_path):
    for i in range(4):
        _png(tmp_path / f"{i}.png", np.full((8, 8, 3), 10 * i, np.uint8))
    ds = D.FolderImages(tmp_path, 8, 3)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    next(D.batch_stream(ds, seed=1, start_step=0, global_batch=2, num_workers=0))
    assert torch.equal(torch.rand(3), expected)  # dropout after a resume sees the same stream


def test_under_torchrun_only_the_first_process_says_where_the_data_came_from(nowhere, monkeypatch, capsys):
    _png(nowhere / "data" / "faces" / "a.png", np.full((8, 8, 3), 10, np.uint8))
    cfg = DataConfig(dataset="folder", path="faces", resolution=8)
    for rank, says in (("1", False), ("0", True)):
        monkeypatch.setenv("RANK", rank)
        D.load_dataset(cfg)
        assert ("data: image folder faces from" in capsys.readouterr().err) == says, rank
