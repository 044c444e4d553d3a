"""Image sets named by a spec, as uint8 tensors: FID inputs and references, the bound's data.

    mnist:train, mnist:test, cifar10:train, cifar10:test   a split (data.split_images: the
    cifar10-partial:train, cifar10-partial:test             first data dir holding it)
    folder:PATH, or a plain folder path                     every image file under it (data.FolderImages)
    samples:PATH, or a folder with manifest.json            samples in shards (ddpm.generate)
    a folder written by ``python -m ddpm sample``           its images/ only, not grid.png

``load_images`` returns the images with a description of exactly what was read and a key
for caching their Inception features. A subset of ``n`` images is chosen as in
torch-fidelity's reference protocol (``subset_indices``).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch

from .data import DataError, FolderImages, split_images
from .generate import PNG_IMAGES, PNG_RECORD, is_sample_folder, load_samples, read_manifest

DATASETS = ("mnist", "cifar10")


def subset_indices(N: int, n: Optional[int], seed: int) -> Optional[np.ndarray]:
    """The indices of the random subset of ``n`` of ``N`` images that load_images takes, chosen
    as in torch-fidelity's reference protocol (PAPER.md): numpy.random.RandomState(seed).choice(N,
    n, replace=False); None when the subset is the whole set."""
    if n is None or n >= N:
        return None
    return np.random.RandomState(seed).choice(N, n, replace=False)


def _subset(images: torch.Tensor, n: Optional[int], seed: int) -> Tuple[torch.Tensor, str]:
    N = images.shape[0]
    idx = subset_indices(N, n, seed)
    if idx is None:
        return images, f"all {N}"
    return images[torch.from_numpy(idx)], f"{n} of {N} chosen by numpy RandomState({seed}).choice(replace=False)"


def _folder(path: Path, resize_to: Optional[Tuple[int, int]]) -> Tuple[torch.Tensor, str]:
    """(uint8 [N, C, H, W], what they are) for a folder: samples in shards, or image files."""
    if (path / "manifest.json").is_file():
        images = torch.from_numpy(load_samples(path)).permute(0, 3, 1, 2).contiguous()
        m = read_manifest(path)
        return images, f"samples written by ddpm.generate (n={m['n']}, seed={m['seed']}, {m['pixel_map']})"
    if resize_to is None:
        return FolderImages.at_own_size(path).stack(), "image files"
    ds = FolderImages(path, resize_to[1], resize_to[0])
    if len(ds) == 0:
        raise DataError(f"no images under {path}")
    return ds.stack(), (f"image files decoded to {resize_to[0]} channel(s) at {resize_to[1]}x{resize_to[1]} "
                        "(data.FolderImages)")


def load_images(spec: str, data_dir=None, n: Optional[int] = None, seed: int = 2020,
                resize_to: Optional[Tuple[int, int]] = None):
    """(uint8 [N, C, H, W], description, cache key) for the image set ``spec`` (see the module
    docstring); ``data_dir`` is where datasets are looked for first. ``n`` takes a seeded
    random subset (subset_indices). ``resize_to=(channels, resolution)``: image files are
    decoded as the trainer decodes a folder dataset (data.FolderImages: shorter side resized,
    center crop), so that they match a model's input; without it they are read at their own
    size (FolderImages.at_own_size), which they must share."""
    kind, _, rest = spec.partition(":")
    dataset, _, named_subset = kind.partition("-")
    if dataset in DATASETS and rest in ("train", "test"):
        images, how = _subset(split_images(dataset, rest, data_dir, named_subset), n, seed)
        return images, f"{spec}: {how}", f"{kind}-{rest}-n{images.shape[0]}-seed{seed}"
    path = Path(rest if kind in ("folder", "samples") and rest else spec)
    if not path.is_dir():
        raise DataError(f"{spec!r} is neither a dataset name (mnist:train, mnist:test, "
                        "cifar10:train, cifar10:test) nor an existing folder (folder:PATH)")
    written_by_sample = is_sample_folder(path)
    if written_by_sample:
        path = path / PNG_IMAGES
    images, what = _folder(path, resize_to)
    if written_by_sample:
        what = f"PNGs written by `python -m ddpm sample` ({PNG_RECORD}: how they were drawn)"
    images, how = _subset(images, n, seed)
    # keyed by content: the same pixels (whatever the folder is called) share cached features
    digest = hashlib.sha1(str(tuple(images.shape)).encode() + images.contiguous().numpy().tobytes()).hexdigest()[:16]
    return images, f"{path}: {what}, {how}", f"folder-{digest}-n{images.shape[0]}"
