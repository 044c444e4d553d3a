"""Training data: MNIST, CIFAR10 and any folder of images, as uint8 [C, H, W] tensors.

Where the data lives (the "data dir"): ``--data-dir DIR``, else the environment
variable ``DDPM_DATA_DIR``, else ``./data``. MNIST and CIFAR10 are read from it in
torchvision's layout (``DIR/MNIST/raw/...``, ``DIR/cifar-10-batches-py/...``);
nothing is downloaded unless the user asks (``--download``), and a missing set is an
error that says what to download and where to point the code. A folder dataset
(CelebA-HQ, LSUN exports, the CIFAR10 PNG subset in ../shared/data/cifar10-partial)
is any folder of images, searched recursively; ``data.path`` is absolute or relative
to the data dir. Folder images are resized (shorter side) and center-cropped to
``data.resolution``. MNIST stays at its native 28x28 (the MNIST presets use a UNet
with ch_mult (1, 2, 2): 28 -> 14 -> 7) and CIFAR10 at 32x32; asking for another
resolution for them is an error rather than a silent resize.

Data order is a pure function of (seed, position in the stream of examples): epoch
e visits the examples in the permutation ``default_rng([seed, e])``, and the global
batch of step s is stream positions [s*B, (s+1)*B), split into contiguous slices
over the DDP ranks. Resuming at step s therefore reproduces the exact order without
replaying anything, and the split does not depend on the number of ranks.

Pixel scaling (x/127.5 - 1) and random flips happen in the trainer on whole
batches (see ``to_model_range``), so workers only decode and all randomness stays
in one seeded generator.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from .config import DataConfig

ENV_DATA_DIR = "DDPM_DATA_DIR"
DEFAULT_DATA_DIR = "./data"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".ppm", ".tif", ".tiff")
# Folder datasets whose decoded pixels fit in this many bytes are decoded once up
# front and kept in memory (CIFAR10-sized sets); larger ones (CelebA-HQ 256: 5.9 GB)
# are decoded on the fly by DataLoader workers.
IN_MEMORY_BYTES = 1 << 30


class DataError(RuntimeError):
    """The dataset is missing or unusable; the message says what to do."""


def resolve_data_dir(data_dir=None) -> Path:
    """--data-dir, else $DDPM_DATA_DIR, else ./data."""
    return Path(data_dir or os.environ.get(ENV_DATA_DIR) or DEFAULT_DATA_DIR).expanduser().absolute()


def to_model_range(x: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1] by x/127.5 - 1 (the official scaling)."""
    assert x.dtype == torch.uint8, x.dtype
    return x.float() / 127.5 - 1.0


# ------------------------------------------------------------------------------ datasets


class TensorImages(torch.utils.data.Dataset):
    """Images held in memory as one uint8 tensor [N, C, H, W]."""

    def __init__(self, images: torch.Tensor, name: str):
        assert images.dtype == torch.uint8 and images.ndim == 4, (images.dtype, images.shape)
        self.images, self.name = images, name

    def __len__(self):
        return self.images.shape[0]

    def __getitem__(self, i):
        return self.images[i]


class FolderImages(torch.utils.data.Dataset):
    """Every image file under ``root`` (recursive, sorted by relative path), decoded
    to ``channels`` (1: grayscale, 3: RGB), shorter side resized to ``resolution``
    (bicubic, antialiased) and center-cropped to ``resolution`` x ``resolution``."""

    def __init__(self, root: Path, resolution: int, channels: int):
        self.root, self.resolution, self.channels = Path(root), resolution, channels
        self.name = f"folder:{root}"
        self.files = sorted(p for p in self.root.rglob("*")
                            if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        from PIL import Image

        path = self.files[i]
        try:
            with Image.open(path) as im:
                im = im.convert("L" if self.channels == 1 else "RGB")
                w, h = im.size
                r = self.resolution
                if (w, h) != (r, r):
                    s = r / min(w, h)
                    nw, nh = max(r, round(w * s)), max(r, round(h * s))
                    im = im.resize((nw, nh), Image.BICUBIC)
                    left, top = (nw - r) // 2, (nh - r) // 2
                    im = im.crop((left, top, left + r, top + r))
                a = np.asarray(im, dtype=np.uint8)
        except OSError as e:
            raise DataError(f"cannot read image {path}: {e}") from e
        if a.ndim == 2:
            a = a[:, :, None]
        x = torch.from_numpy(a.copy()).permute(2, 0, 1)
        assert x.shape == (self.channels, self.resolution, self.resolution), (path, x.shape)
        return x


def _missing(name: str, root: Path, layout: str, source: str) -> DataError:
    return DataError(
        f"{name} not found in the data dir {root} (torchvision's layout: {root / layout}). "
        f"Either pass --download to let torchvision fetch it from the internet into {root}, "
        f"or get {source} yourself, extract it into a folder DIR so that DIR/{layout} exists, and "
        f"pass --data-dir DIR (or set {ENV_DATA_DIR}=DIR).")


def load_dataset(cfg: DataConfig, data_dir=None, download: bool = False,
                 progress: bool = False) -> torch.utils.data.Dataset:
    """The training set of ``cfg.dataset`` as a Dataset of uint8 [C, H, W] tensors.

    Downloads (MNIST, CIFAR10 via torchvision) only when ``download`` is True."""
    root = resolve_data_dir(data_dir)
    if cfg.dataset == "mnist":
        if (cfg.channels, cfg.resolution) != (1, 28):
            raise DataError(f"MNIST is 1 channel at 28x28; the config asks for data.channels="
                            f"{cfg.channels}, data.resolution={cfg.resolution}")
        import torchvision

        try:
            ds = torchvision.datasets.MNIST(str(root), train=True, download=download)
        except RuntimeError as e:
            raise _missing("MNIST", root, "MNIST/raw/train-images-idx3-ubyte",
                           "the four MNIST idx files (train-images-idx3-ubyte.gz, ...)") from e
        return TensorImages(ds.data.unsqueeze(1).contiguous(), "mnist")
    if cfg.dataset == "cifar10":
        if (cfg.channels, cfg.resolution) != (3, 32):
            raise DataError(f"CIFAR10 is 3 channels at 32x32; the config asks for data.channels="
                            f"{cfg.channels}, data.resolution={cfg.resolution}")
        import torchvision

        try:
            ds = torchvision.datasets.CIFAR10(str(root), train=True, download=download)
        except RuntimeError as e:
            raise _missing("CIFAR10", root, "cifar-10-batches-py/data_batch_1",
                           "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz") from e
        return TensorImages(torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), "cifar10")
    if cfg.dataset == "folder":
        folder = Path(cfg.path)
        if not folder.is_absolute():
            folder = root / folder
        if not folder.is_dir():
            raise DataError(
                f"image folder {folder} does not exist (data.path={cfg.path!r}, relative to the data "
                f"dir {root}). Put the images there (any layout; searched recursively), or point "
                f"--data-dir / {ENV_DATA_DIR} at the folder that holds {cfg.path!r}, or set "
                f"data.path to an absolute folder. CelebA-HQ 256x256 is not downloadable "
                f"automatically: export it as image files into such a folder.")
        ds = FolderImages(folder, cfg.resolution, cfg.channels)
        if len(ds) == 0:
            raise DataError(f"image folder {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        if len(ds) * cfg.channels * cfg.resolution ** 2 <= IN_MEMORY_BYTES:
            items = range(len(ds))
            if progress:
                from tqdm.auto import tqdm
                items = tqdm(items, desc=f"decoding {folder.name}", unit="img", leave=False)
            return TensorImages(torch.stack([ds[i] for i in items]), ds.name)
        return ds
    raise DataError(f"unknown data.dataset {cfg.dataset!r}")


# ----------------------------------------------------------------------------- data order


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The order in which epoch ``epoch`` visits the ``n`` examples."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def step_indices(n: int, seed: int, step: int, global_batch: int, rank: int = 0,
                 world_size: int = 1, _cache: Optional[dict] = None) -> np.ndarray:
    """Dataset indices of this rank's share of the global batch of ``step`` (0-based)."""
    assert global_batch % world_size == 0, (global_batch, world_size)
    local = global_batch // world_size
    start = step * global_batch + rank * local
    pos = np.arange(start, start + local)
    epochs, offsets = pos // n, pos % n
    out = np.empty(local, dtype=np.int64)
    cache = {} if _cache is None else _cache
    for e in np.unique(epochs):
        if e not in cache:
            cache.clear()  # keep at most the epochs of one batch
            cache[e] = epoch_permutation(n, seed, int(e))
        m = epochs == e
        out[m] = cache[e][offsets[m]]
    return out


class _StepBatches(torch.utils.data.Sampler):
    def __init__(self, n, seed, start_step, global_batch, rank, world_size):
        self.args = (n, seed, start_step, global_batch, rank, world_size)

    def __iter__(self):
        n, seed, step, gb, rank, ws = self.args
        cache: dict = {}
        while True:
            yield step_indices(n, seed, step, gb, rank, ws, cache).tolist()
            step += 1


def batch_stream(dataset, seed: int, start_step: int, global_batch: int, rank: int = 0,
                 world_size: int = 1, num_workers: int = 0) -> Iterator[torch.Tensor]:
    """Endless iterator over this rank's uint8 batches [global_batch/world_size, C, H, W],
    starting at ``start_step``."""
    if global_batch % world_size:
        raise ValueError(f"train.batch_size={global_batch} (the global batch) must be divisible "
                         f"by the number of processes ({world_size})")
    n = len(dataset)
    if isinstance(dataset, TensorImages):  # in memory: index directly, no workers needed
        def gen():
            cache: dict = {}
            step = start_step
            while True:
                yield dataset.images[torch.from_numpy(
                    step_indices(n, seed, step, global_batch, rank, world_size, cache))]
                step += 1
        return gen()
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=_StepBatches(n, seed, start_step, global_batch, rank, world_size),
        num_workers=num_workers, persistent_workers=num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None, pin_memory=torch.cuda.is_available())
    return iter(loader)
