"""Training data: MNIST, CIFAR10 and any folder of images, as uint8 [C, H, W] tensors.

Where the data lives: the data dirs are searched in this order, and each dataset is
read from the first that holds it (the choice is printed):

1. ``--data-dir DIR``, if given;
2. ``$DDPM_DATA_DIR``, if set;
3. ``./data``;
4. ``shared/data`` beside the checkout (``<repo>/../shared/data``: where this project's
   offline machines keep real MNIST and CIFAR10 data).

MNIST and CIFAR10 are read in torchvision's layout (``DIR/MNIST/raw/...``,
``DIR/cifar-10-batches-py/...``). When no dir holds a dataset, ``download=True``
(``--download``; run_all.sh passes it) lets torchvision fetch it into the first dir of
the list, saying what and where; otherwise, or offline, the error says what to fetch and
where to put it.

The scaled CIFAR10 profiles train on a named subset of real CIFAR10 images, defined by
their indices (``CIFAR10_SUBSETS``; ``data.subset``): read from torchvision's CIFAR10
when present, else from a PNG export of exactly those images (``DIR/cifar10-partial``,
the layout of ../shared/data/cifar10-partial: ``train/00000.png`` = training image 0,
``test/<class>/<index>.png``). Both sources give the same tensors in the same order.

A folder dataset (CelebA-HQ, LSUN exports) is any folder of images, searched
recursively; ``data.path`` is absolute or relative to a data dir. Folder images are
resized (shorter side) and center-cropped to ``data.resolution``. MNIST stays at its
native 28x28 (the MNIST presets use a UNet with ch_mult (1, 2, 2): 28 -> 14 -> 7) and
CIFAR10 at 32x32; asking for another resolution for them is an error rather than a
silent resize.

Data order is a pure function of (seed, position in the stream of examples): epoch
e visits the examples in the permutation ``default_rng([seed, e])``, and the global
batch of step s is stream positions [s*B, (s+1)*B), split into contiguous slices
over the DDP ranks. Resuming at step s therefore reproduces the exact order without
replaying anything, and the split does not depend on the number of ranks.

Pixel scaling (x/127.5 - 1) and random flips happen in the trainer on whole
batches, so workers only decode and all randomness stays in one seeded generator.
``to_model_range`` is that scaling, the one map from uint8 pixels to the model's [-1, 1]
(training, the bound, the figures); ddpm.generate.to_uint8 is its inverse for samples.

``FolderImages`` is the one reader of image files (training folders, the CIFAR10 PNG
export, FID inputs: see ddpm.sources for image sets named by a spec).
"""

from __future__ import annotations

import os
from pathlib import Path
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, List, Optional, Tuple

import numpy as np
import torch

if TYPE_CHECKING:  # config imports this module (to check data.subset); annotations only here
    from .config import DataConfig

ENV_DATA_DIR = "DDPM_DATA_DIR"
DEFAULT_DATA_DIR = "./data"
REPO = Path(__file__).resolve().parents[1]
SHARED_DATA_DIR = REPO.parent / "shared" / "data"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".ppm", ".tif", ".tiff")
# Folder datasets whose decoded pixels fit in this many bytes are decoded once up
# front and kept in memory (CIFAR10-sized sets); larger ones (CelebA-HQ 256: 5.9 GB)
# are decoded on the fly by DataLoader workers.
IN_MEMORY_BYTES = 1 << 30
CIFAR10_TEST_PER_CLASS = 1000  # the official test_batch holds 1,000 images of each class
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@dataclass(frozen=True)
class CifarSubset:
    """Real CIFAR10 images chosen by index: training images ``train`` (positions in the
    official order, data_batch_1 first) and every test image of ``test_classes``, in
    test_batch order. ``export``: the folder name of its PNG export in a data dir."""

    train: range
    test_classes: Tuple[str, ...]
    export: str


CIFAR10_SUBSETS = {
    # What this project's offline machines hold (../shared/data/cifar10-partial).
    "partial": CifarSubset(range(4000), ("airplane", "automobile", "ship", "truck"), "cifar10-partial"),
}


class DataError(RuntimeError):
    """The dataset is missing or unusable; the message says what to do."""


def resolve_data_dir(data_dir=None) -> Path:
    """The first data dir: --data-dir, else $DDPM_DATA_DIR, else ./data (where downloads go)."""
    return Path(data_dir or os.environ.get(ENV_DATA_DIR) or DEFAULT_DATA_DIR).expanduser().absolute()


def data_dirs(data_dir=None) -> List[Path]:
    """Every data dir, in search order (see the module docstring), without repeats."""
    out: List[Path] = []
    for d in (data_dir, os.environ.get(ENV_DATA_DIR), DEFAULT_DATA_DIR, SHARED_DATA_DIR):
        if d:
            p = Path(d).expanduser().absolute()
            if p not in out:
                out.append(p)
    return out


def _announce(what: str, where: Path) -> None:
    """Says where a split was read from; under torchrun only the first process says it (every
    process reads the same files)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"data: {what} from {where}", file=sys.stderr, flush=True)


def find_in_data_dirs(relative: str, data_dir=None) -> Optional[Path]:
    """The first data dir holding ``relative`` (a file or folder), or None."""
    for d in data_dirs(data_dir):
        if (d / relative).exists():
            return d
    return None


def _searched(data_dir) -> str:
    return ", ".join(str(d) for d in data_dirs(data_dir))


def _missing(name: str, layout: str, source: str, data_dir) -> DataError:
    root = resolve_data_dir(data_dir)
    return DataError(
        f"{name} not found in any data dir (searched {_searched(data_dir)} for {layout}). Either pass "
        f"--download to let torchvision fetch it from the internet into {root}, or get {source} "
        f"yourself, extract it into a folder DIR so that DIR/{layout} exists, and pass --data-dir DIR "
        f"(or set {ENV_DATA_DIR}=DIR).")


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

    @classmethod
    def at_own_size(cls, root: Path) -> "FolderImages":
        """The files under ``root`` at their own size, which they must share (DataError
        otherwise): 1 channel if all are grayscale (mode L), else 3 (grayscale ones converted
        as PIL's L->RGB); a non-square size is center-cropped to a square, as for training."""
        from PIL import Image

        reader = cls(root, 0, 3)  # lists the files; size and channels are set below
        if not reader.files:
            raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {root}")
        sizes, modes = {}, set()
        for p in reader.files:  # headers only
            try:
                with Image.open(p) as im:
                    sizes.setdefault(im.size, p)
                    modes.add(im.mode)
            except OSError as e:
                raise DataError(f"cannot read image {p}: {e}") from e
        if len(sizes) > 1:
            seen = ", ".join(f"{w}x{h} ({p.relative_to(root)})" for (w, h), p in list(sizes.items())[:3])
            raise DataError(f"images under {root} have different sizes ({seen}); FID inputs must share "
                            "one size")
        (w, h), = sizes
        reader.resolution, reader.channels = min(w, h), (1 if modes == {"L"} else 3)
        return reader

    def __len__(self):
        return len(self.files)

    def stack(self, progress: bool = False) -> torch.Tensor:
        """Every image, decoded: uint8 [N, C, H, W]."""
        items = range(len(self))
        if progress:
            from tqdm.auto import tqdm
            items = tqdm(items, desc=f"decoding {self.root.name}", unit="img", leave=False)
        return torch.stack([self[i] for i in items])

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


def _torchvision(kind: str, train: bool, data_dir, download: bool):
    """torchvision's MNIST / CIFAR10 split from the first data dir holding it (downloaded
    into the first data dir if none does and ``download``), or None if absent."""
    import torchvision

    layout = {"mnist": "MNIST/raw/train-images-idx3-ubyte", "cifar10": "cifar-10-batches-py/data_batch_1"}[kind]
    cls = {"mnist": torchvision.datasets.MNIST, "cifar10": torchvision.datasets.CIFAR10}[kind]
    root = find_in_data_dirs(layout, data_dir)
    fetch = root is None
    if fetch and not download:
        return None
    if fetch:
        root = resolve_data_dir(data_dir)
        print(f"data: {kind} is in no data dir; downloading it with torchvision into {root}",
              file=sys.stderr, flush=True)
    try:
        ds = cls(str(root), train=train, download=fetch)
    except (RuntimeError, OSError) as e:
        if fetch:
            raise DataError(f"could not download {kind} into {root} ({e}). "
                            + str(_missing(kind, layout, "it", data_dir))) from e
        raise DataError(f"{kind} in {root} is unreadable or corrupted ({e}); delete it and run again "
                        f"with --download, or point --data-dir at a good copy") from e
    _announce(f"{kind} ({'train' if train else 'test'})", root)
    ds.data_root = root
    return ds


def _cifar_export(subset: CifarSubset, split: str, data_dir) -> Optional[Tuple[torch.Tensor, Path]]:
    """(the subset from its PNG export, the data dir holding it), or None if none does."""
    root = find_in_data_dirs(subset.export, data_dir)
    if root is None:
        return None
    folder = root / subset.export
    if split == "train":
        files = [folder / "train" / f"{i:05d}.png" for i in subset.train]
    else:  # every test image of the classes, in test_batch order (the file name is the index)
        per_class = {c: sorted((folder / "test" / c).glob("*.png")) for c in subset.test_classes}
        short = {c: len(f) for c, f in per_class.items() if len(f) != CIFAR10_TEST_PER_CLASS}
        if short:
            raise DataError(f"the CIFAR10 export {folder} is incomplete: the test split needs "
                            f"{CIFAR10_TEST_PER_CLASS} images in each of test/{{{','.join(subset.test_classes)}}}; "
                            + ", ".join(f"test/{c} has {n}" for c, n in short.items()))
        files = sorted((f for fs in per_class.values() for f in fs), key=lambda f: int(f.stem))
    absent = [f for f in files if not f.is_file()]
    if absent:
        raise DataError(f"the CIFAR10 export {folder} is incomplete: {len(absent)} of the {split} images "
                        f"are missing (e.g. {absent[0]})")
    reader = FolderImages(folder, 32, 3)
    reader.files = files
    _announce(f"CIFAR10 subset ({split}, PNG export)", folder)
    return reader.stack(), root


def split_images(dataset: str, split: str, data_dir=None, subset: str = "",
                 download: bool = False) -> torch.Tensor:
    """uint8 [N, C, H, W]: the ``split`` ('train' | 'test') of MNIST or CIFAR10 (or of the
    named CIFAR10 ``subset``), from the first data dir that holds it."""
    return _split_and_root(dataset, split, data_dir, subset, download)[0]


def _split_and_root(dataset: str, split: str, data_dir, subset: str, download: bool) -> Tuple[torch.Tensor, Path]:
    """(split_images(...), the data dir it was read from or downloaded into)."""
    if dataset not in ("mnist", "cifar10") or split not in ("train", "test"):
        raise DataError(f"no split {split!r} of dataset {dataset!r}")
    sub = None
    if subset:
        if dataset != "cifar10" or subset not in CIFAR10_SUBSETS:
            raise DataError(f"unknown subset {subset!r} of {dataset}; CIFAR10 subsets: {', '.join(CIFAR10_SUBSETS)}")
        sub = CIFAR10_SUBSETS[subset]
    # a subset reads full CIFAR10 where present, else its export, and downloads only then
    ds = _torchvision(dataset, split == "train", data_dir, download and sub is None)
    if ds is None and sub is not None:
        export = _cifar_export(sub, split, data_dir)
        if export is not None:
            return export
        ds = _torchvision(dataset, split == "train", data_dir, download)
    if ds is None:
        if dataset == "mnist":
            raise _missing("MNIST", "MNIST/raw/train-images-idx3-ubyte",
                           "the four MNIST idx files (train-images-idx3-ubyte.gz, ...)", data_dir)
        raise _missing("CIFAR10" + (f" (or its subset's export {sub.export}/)" if sub else ""),
                       "cifar-10-batches-py/data_batch_1",
                       "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", data_dir)
    data = ds.data if torch.is_tensor(ds.data) else torch.from_numpy(ds.data)
    images = (data.unsqueeze(1) if data.ndim == 3 else data.permute(0, 3, 1, 2)).contiguous()
    if sub is not None:
        if split == "train":
            idx = torch.tensor(list(sub.train))
        else:
            wanted = torch.tensor([CIFAR10_CLASSES.index(c) for c in sub.test_classes])
            idx = torch.nonzero(torch.isin(torch.as_tensor(ds.targets), wanted)).flatten()
        images = images[idx].contiguous()
    return images, ds.data_root


def load_dataset(cfg: DataConfig, data_dir=None, download: bool = False,
                 progress: bool = False) -> torch.utils.data.Dataset:
    """The training set of ``cfg.dataset`` as a Dataset of uint8 [C, H, W] tensors.

    Downloads (MNIST, CIFAR10 via torchvision) only when ``download`` is True and no data
    dir holds the set."""
    if cfg.dataset in ("mnist", "cifar10"):
        native = {"mnist": (1, 28), "cifar10": (3, 32)}[cfg.dataset]
        if (cfg.channels, cfg.resolution) != native:
            raise DataError(f"{cfg.dataset} is {native[0]} channel(s) at {native[1]}x{native[1]}; the config "
                            f"asks for data.channels={cfg.channels}, data.resolution={cfg.resolution}")
        images, root = _split_and_root(cfg.dataset, "train", data_dir, cfg.subset, download)
        return _with_root(TensorImages(images, cfg.dataset + (f"-{cfg.subset}" if cfg.subset else "")), root)
    if cfg.dataset == "folder":
        folder = Path(cfg.path)
        root = None  # an absolute data.path needs no data dir
        if not folder.is_absolute():
            root = find_in_data_dirs(cfg.path, data_dir) or resolve_data_dir(data_dir)
            folder = root / folder
        if not folder.is_dir():
            raise DataError(
                f"image folder {cfg.path!r} does not exist (searched the data dirs {_searched(data_dir)}). "
                f"Put the images there (any layout; searched recursively), or point --data-dir / "
                f"{ENV_DATA_DIR} at the folder that holds {cfg.path!r}, or set data.path to an absolute "
                f"folder. CelebA-HQ 256x256 is not downloadable automatically: export it as image files "
                f"into such a folder.")
        _announce(f"image folder {cfg.path}", folder)
        ds = FolderImages(folder, cfg.resolution, cfg.channels)
        if len(ds) == 0:
            raise DataError(f"image folder {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        if len(ds) * cfg.channels * cfg.resolution ** 2 <= IN_MEMORY_BYTES:
            return _with_root(TensorImages(ds.stack(progress), ds.name), root)
        return _with_root(ds, root)
    raise DataError(f"unknown data.dataset {cfg.dataset!r}")


def _with_root(ds, root: Optional[Path]):
    """``ds`` with ``data_root``: the data dir it was read from (None: an absolute data.path), which
    a run records so that --resume finds it (not merely the first dir searched)."""
    ds.data_root = root
    return ds


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
                 world_size: int = 1, num_workers: int = 0, device: Optional[torch.device] = None
                 ) -> Iterator[torch.Tensor]:
    """Endless iterator over this rank's uint8 batches [global_batch/world_size, C, H, W],
    starting at ``start_step``. ``device`` (data.on_device; an in-memory set only): the whole
    set is copied there once and each batch is gathered there by the same indices."""
    if global_batch % world_size:
        raise ValueError(f"train.batch_size={global_batch} (the global batch) must be divisible "
                         f"by the number of processes ({world_size})")
    n = len(dataset)
    if device is not None and not isinstance(dataset, TensorImages):
        raise DataError(f"data.on_device: the training set ({n:,} images) is read from files, not held in "
                        "memory, so it cannot be kept on the device; set data.on_device=false")
    if isinstance(dataset, TensorImages):  # in memory: index directly, no workers needed
        images = dataset.images if device is None else dataset.images.to(device)

        def gen():
            cache: dict = {}
            step = start_step
            while True:
                idx = torch.from_numpy(step_indices(n, seed, step, global_batch, rank, world_size, cache))
                if images.device != idx.device:  # pinned on CUDA: an asynchronous copy, no wait for the GPU
                    idx = (idx.pin_memory() if images.is_cuda else idx).to(images.device, non_blocking=True)
                yield images[idx]
                step += 1
        return gen()
    # A generator of its own: iter(DataLoader) draws a base seed from it, which would otherwise
    # advance the global torch RNG (the trainer's dropout stream) and break bit-exact resume.
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=_StepBatches(n, seed, start_step, global_batch, rank, world_size),
        num_workers=num_workers, persistent_workers=num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None, pin_memory=torch.cuda.is_available(),
        generator=torch.Generator().manual_seed(seed))
    return iter(loader)
