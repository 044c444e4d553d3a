"""Generate exactly N samples, in shards on disk, resumable after an interruption.

Layout of an output folder (``generate(..., out_dir=DIR)``)::

    DIR/manifest.json        what is being generated and how (checked on resume)
    DIR/shard_00000.npz      images [n, H, W, C] uint8, n = shard_size (last shard: the rest)
    DIR/shard_00001.npz      ...

Each shard is one sampling batch with its own generator seeded from (seed, shard
index) (ddpm.runtime.derive_seed), so a shard's images do not depend on which shards
were generated before it: a run that is killed and restarted gives the same N images,
bit for bit (on the same device and torch build), as an uninterrupted run. Shards are
written atomically (temporary file + rename), so a kill leaves whole shards only. (On CUDA,
cudnn.benchmark is on while sampling (runtime.cudnn_benchmark): each process times its own
convolution algorithms, so a shard made in another process may differ by float rounding,
which moves a uint8 pixel rarely and by one.)

How the samples were computed is part of what a set is: the sampler, the network's precision
(``bf16``: ``network_precision``) and whether the sampling step was compiled (``compile``:
``compiled``, ddpm.sampling's CompiledStep). Each changes the images' rounding, so, as for
bf16, a folder of one setting is never resumed with the other (SamplesError naming the field).
A manifest written before ``compiled`` was recorded reads as compiled false, the only way
it could have been made.

Pixel handling (the paper's, PAPER.md "FID"): samples are clipped to [-1, 1] and
mapped to [0, 255] by (x + 1) * 127.5; here they are then ROUNDED TO THE NEAREST
INTEGER and stored as uint8, because torch-fidelity's Inception only accepts uint8
(the official TF code fed the floats). ``PIXEL_MAP`` states this and is written
into every manifest and metrics file.

``python -m ddpm sample`` writes another layout, PNGs for people and other tools
(``write_sample_folder``)::

    OUT/images/000000.png ...  exactly N images
    OUT/grid.png               the first 64
    OUT/sample.json            how they were drawn (checkpoint, step, EMA, variance, seed, sampler)

``is_sample_folder`` recognises it (an FID input is then its images/ only, not grid.png).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from .data import to_model_range
from .diffusion import GaussianDiffusion, Model
from .provenance import MANIFEST, atomic_write_bytes, atomic_write_text, check_manifest
from .runtime import PRECISIONS, Bf16Network, cudnn_benchmark, derive_seed
from .sampling import ANCESTRAL, Sampler

FORMAT = "ddpm-samples-v1"
PIXEL_MAP = "clip to [-1, 1], x -> (x + 1) * 127.5, round to nearest integer, uint8"
# The PNG folder of `python -m ddpm sample` (see the module docstring).
PNG_IMAGES, PNG_GRID, PNG_RECORD = "images", "grid.png", "sample.json"


class SamplesError(RuntimeError):
    """A sample folder that cannot be used as asked (another run's samples, missing or bad
    shards); the message says what to do."""


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[B, C, H, W] floats in [-1, 1] -> [B, H, W, C] uint8, as PIXEL_MAP says."""
    assert x.ndim == 4, x.shape
    x = ((x.clamp(-1.0, 1.0) + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def from_uint8(images: np.ndarray) -> torch.Tensor:
    """[B, H, W, C] uint8 -> [B, C, H, W] float32 in [-1, 1] (data.to_model_range, the data scaling)."""
    assert images.ndim == 4 and images.dtype == np.uint8, (images.shape, images.dtype)
    return to_model_range(torch.from_numpy(images).permute(0, 3, 1, 2))


def shard_path(out_dir, index: int) -> Path:
    return Path(out_dir) / f"shard_{index:05d}.npz"


def _read_shard(path: Path, expected_n: int, image_shape) -> np.ndarray:
    with np.load(path) as f:
        images = f["images"]
    want = (expected_n, *image_shape)
    if images.shape != want or images.dtype != np.uint8:
        raise SamplesError(f"{path} holds {images.shape} {images.dtype}, expected {want} uint8; "
                           "delete this shard file and rerun to regenerate it")
    return images


@torch.inference_mode()
def sample_shard(model: Model, diffusion: GaussianDiffusion, n: int, image_shape: Sequence[int],
                 seed: int, index: int, device="cpu", var_type=None, clip_x0: bool = True,
                 progress: bool = False, sampler: Sampler = ANCESTRAL, compile: bool = False) -> np.ndarray:
    """Shard ``index``: ``n`` samples [n, H, W, C] uint8 from a generator seeded by (seed, index);
    ``compile``: each sampling step through torch.compile (ddpm.sampling.CompiledStep)."""
    C, H, W = image_shape
    g = torch.Generator(device=device)
    g.manual_seed(derive_seed(seed, index))
    if var_type is not None:
        diffusion = diffusion.with_variance(var_type)
    x = sampler(diffusion, model, (n, C, H, W), generator=g, device=device, clip_x0=clip_x0, progress=progress,
                compile=compile)
    out = to_uint8(x)
    assert out.shape == (n, H, W, C), out.shape
    return out


def sample_manifest(diffusion: GaussianDiffusion, n: int, image_shape: Sequence[int], *, batch_size: int = 64,
                    seed: int = 0, var_type=None, clip_x0: bool = True,
                    meta: Optional[Dict[str, Any]] = None, sampler: Sampler = ANCESTRAL,
                    bf16: bool = False, compile: bool = False) -> Dict[str, Any]:
    """What ``generate`` with these arguments writes to DIR/manifest.json (JSON values)."""
    if n < 1:
        raise ValueError(f"n must be positive, got {n}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    C, H, W = (int(s) for s in image_shape)
    var_name = diffusion.var_type.value if var_type is None else getattr(var_type, "value", str(var_type))
    return json.loads(json.dumps({
        "format": FORMAT, "n": int(n), "shard_size": int(batch_size), "n_shards": math.ceil(n / batch_size),
        "seed": int(seed), "image_shape_hwc": [H, W, C], "var_type": var_name,
        "clip_x0": bool(clip_x0), "steps": sampler.to_dict(diffusion.T)["steps"],
        "sampler": sampler.describe(diffusion.T), "sampler_spec": sampler.to_dict(diffusion.T),
        "pixel_map": PIXEL_MAP, "network_precision": PRECISIONS[bool(bf16)], "compiled": bool(compile),
        "meta": meta or {},
    }))


def check_samples(out_dir, manifest: Dict[str, Any]) -> bool:
    """provenance.check_manifest for a sample folder: True if ``out_dir`` holds (part of) the set
    ``manifest`` describes, False if it holds none; SamplesError if another set. A manifest
    written before ``compiled`` was recorded matches as compiled false (module docstring)."""
    return check_manifest(out_dir, manifest, "samples", SamplesError, defaults={"compiled": False})


def generate(model: Model, diffusion: GaussianDiffusion, n: int, image_shape: Sequence[int], *,
             out_dir=None, batch_size: int = 64, seed: int = 0, device="cpu", var_type=None,
             clip_x0: bool = True, meta: Optional[Dict[str, Any]] = None, progress: bool = True,
             return_images: bool = True, max_shards: Optional[int] = None,
             sampler: Sampler = ANCESTRAL, bf16: bool = False, compile: bool = False,
             shards: Optional[Sequence[int]] = None) -> Optional[np.ndarray]:
    """Exactly ``n`` samples, [n, H, W, C] uint8 (``image_shape`` is (C, H, W) of the model).

    With ``out_dir``, shards of ``batch_size`` images are written there and shards
    already present are reused (resume); the manifest must then match this call (n,
    batch size, seed, variance, shape, ``meta`` such as the checkpoint), else a clear
    error, so that two different runs never mix in one folder. ``var_type``: None uses
    the model's own variance. ``meta``: JSON-able facts to record (checkpoint, EMA, ...).
    ``sampler``: ancestral over all T steps (the paper's; default), or respaced / DDIM.
    ``bf16``: the network under bf16 autocast (runtime.Bf16Network; recorded in the manifest).
    ``compile``: each sampling step (network, posterior, noise added) through torch.compile
    (ddpm.sampling.CompiledStep; with bf16 too, any sampler); recorded in the manifest as
    ``compiled``. Either setting is part of the set: a folder of the other is refused.
    Returns the images (or None with ``return_images=False``, to save memory).
    ``max_shards`` (with ``out_dir`` and ``return_images=False``): stop once the first
    ``max_shards`` shards exist, for time-boxed jobs; a later call completes the set.
    ``shards`` (with ``out_dir`` and ``return_images=False``): make only the shards with these
    indices, one process's share when several processes draw one set (ddpm.evaluate under
    torchrun; ``missing_shards`` lists what is left to share); each is the same whoever draws it.
    """
    if max_shards is not None and (out_dir is None or return_images):
        raise ValueError("max_shards needs out_dir and return_images=False (the set is incomplete)")
    if shards is not None and (out_dir is None or return_images or max_shards is not None):
        raise ValueError("shards needs out_dir and return_images=False, without max_shards (the set is "
                         "incomplete)")
    C, H, W = (int(s) for s in image_shape)
    manifest = sample_manifest(diffusion, n, image_shape, batch_size=batch_size, seed=seed,
                               var_type=var_type, clip_x0=clip_x0, meta=meta, sampler=sampler, bf16=bf16,
                               compile=compile)
    n_shards = manifest["n_shards"]
    sizes = [min(batch_size, n - i * batch_size) for i in range(n_shards)]
    assert sum(sizes) == n
    if out_dir is not None:
        out_dir = Path(out_dir)
        if not check_samples(out_dir, manifest):
            out_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(out_dir / MANIFEST, lambda f: f.write(json.dumps(manifest, indent=2).encode()))

    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    net = Bf16Network(model) if bf16 else model
    it = range(n_shards if max_shards is None else min(n_shards, max_shards))
    if shards is not None:
        it = sorted({int(i) for i in shards})
        if it and not 0 <= it[0] <= it[-1] < n_shards:
            raise ValueError(f"shards {it[0]}..{it[-1]}: this set has shards 0..{n_shards - 1}")
    made = []
    bar = None
    if progress and it:  # no empty bar where every shard asked for is there
        from tqdm.auto import tqdm
        bar = tqdm(total=sum(sizes[i] for i in it), desc="generating", unit="img")
    try:
        with cudnn_benchmark(device):  # every batch of a set has the same shape (but the last)
            for i in it:
                path = shard_path(out_dir, i) if out_dir is not None else None
                if path is not None and path.exists():
                    images = _read_shard(path, sizes[i], (H, W, C)) if return_images else None
                else:
                    images = sample_shard(net, diffusion, sizes[i], (C, H, W), seed, i, device=device,
                                          var_type=var_type, clip_x0=clip_x0, progress=progress, sampler=sampler,
                                          compile=compile)
                    if path is not None:
                        atomic_write_bytes(path, lambda f, a=images: np.savez(f, images=a))
                if return_images:
                    made.append(images)
                if bar is not None:
                    bar.update(sizes[i])
    finally:
        if bar is not None:
            bar.close()
        if was_training and hasattr(model, "train"):
            model.train()
    if not return_images:
        return None
    out = np.concatenate(made, axis=0)
    assert out.shape == (n, H, W, C), out.shape
    return out


def missing_shards(out_dir, manifest: Dict[str, Any]) -> List[int]:
    """The indices of the shards of ``manifest`` (sample_manifest's) that ``out_dir`` lacks."""
    return [i for i in range(manifest["n_shards"]) if not shard_path(out_dir, i).exists()]


def read_manifest(out_dir) -> Dict[str, Any]:
    mpath = Path(out_dir) / MANIFEST
    if not mpath.is_file():
        raise FileNotFoundError(f"{out_dir} has no {MANIFEST}: not a folder written by ddpm.generate")
    return json.loads(mpath.read_text())


def load_samples(out_dir) -> np.ndarray:
    """All N images of a complete sample folder, [N, H, W, C] uint8; error if shards are missing."""
    m = read_manifest(out_dir)
    n, bs = m["n"], m["shard_size"]
    missing = missing_shards(out_dir, m)
    if missing:
        raise SamplesError(f"{out_dir} is incomplete: {len(missing)} of {m['n_shards']} shards missing "
                           f"(first: {shard_path(out_dir, missing[0]).name}); rerun the same command "
                           "to resume")
    parts = [_read_shard(shard_path(out_dir, i), min(bs, n - i * bs), tuple(m["image_shape_hwc"]))
             for i in range(m["n_shards"])]
    out = np.concatenate(parts, axis=0)
    assert out.shape[0] == n
    return out


# ------------------------------------------------------------------------ PNG output


def make_grid(images: np.ndarray, nrow: Optional[int] = None, pad: int = 2, pad_value: int = 255) -> np.ndarray:
    """Tile [N, H, W, C] uint8 images into one [rows*(H+pad)+pad, ...] uint8 image, row-major,
    ``nrow`` images per row (default: a near-square grid)."""
    assert images.ndim == 4 and images.dtype == np.uint8, (images.shape, images.dtype)
    N, H, W, C = images.shape
    ncol = nrow or int(math.ceil(math.sqrt(N)))
    nrows = int(math.ceil(N / ncol))
    grid = np.full((nrows * (H + pad) + pad, ncol * (W + pad) + pad, C), pad_value, dtype=np.uint8)
    for k in range(N):
        r, c = divmod(k, ncol)
        y, x = pad + r * (H + pad), pad + c * (W + pad)
        grid[y:y + H, x:x + W] = images[k]
    return grid


def save_png(image: np.ndarray, path) -> None:
    """One [H, W, C] uint8 image (C = 1 or 3) to a PNG file."""
    from PIL import Image

    assert image.ndim == 3 and image.dtype == np.uint8 and image.shape[2] in (1, 3), (image.shape, image.dtype)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image).save(path)


def save_grid(images: np.ndarray, path, nrow: Optional[int] = None, pad: int = 2) -> None:
    save_png(make_grid(images, nrow=nrow, pad=pad), path)


def write_pngs(images: np.ndarray, folder, grid_path=None, grid_max: int = 64) -> Path:
    """Write each image to ``folder/000000.png`` ... and, with ``grid_path``, the first
    ``grid_max`` of them as one grid. The grid goes to its own path, never into
    ``folder``, so that the folder can be used as an FID input as is. Returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for k, img in enumerate(images):
        save_png(img, folder / f"{k:06d}.png")
    if grid_path is not None:
        save_grid(images[:grid_max], grid_path)
    return folder


def write_sample_folder(images: np.ndarray, out, record: Dict[str, Any]) -> Path:
    """The PNG folder of ``python -m ddpm sample``: OUT/images/*.png, OUT/grid.png and
    OUT/sample.json (``record``: how the images were drawn). Returns OUT."""
    out = Path(out)
    write_pngs(images, out / PNG_IMAGES, grid_path=out / PNG_GRID)
    atomic_write_text(out / PNG_RECORD, json.dumps(record, indent=2) + "\n")
    return out


def is_sample_folder(path) -> bool:
    """A folder written by ``python -m ddpm sample`` (write_sample_folder): sample.json beside images/."""
    path = Path(path)
    return (path / PNG_RECORD).is_file() and (path / PNG_IMAGES).is_dir()
