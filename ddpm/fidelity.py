"""FID, KID and Inception Score of image sets, through torch-fidelity's own metric functions.

What is computed (and written next to every number, ``compute_metrics``):
- Images enter as uint8 [N, C, H, W]. Samples follow the paper's handling (clip to
  [-1, 1], map to [0, 255]) and are then rounded to uint8 (ddpm.generate.PIXEL_MAP),
  because torch-fidelity's Inception only accepts uint8; the official TF code fed the
  unrounded floats.
- Features: ddpm.inception (torch-fidelity's Inception, online or converted offline;
  reference features cached on disk), pool3 (2048-d) for FID and KID, the unbiased
  logits for IS.
- Metrics: torch-fidelity's own functions on those features (FID: TTUR formula; KID:
  polynomial-kernel MMD over subsets; IS: 10 splits). Offline there are no logits: IS is
  then null with the reason, never computed from a substitute.

Image sets named by a spec (``mnist:train``, ``folder:PATH``, sample folders) are read by
ddpm.sources; ``python -m ddpm fid A B`` is ddpm.cli.fid.
"""

from __future__ import annotations

import time
from typing import Dict, Iterable, Optional, Tuple

import torch

from .inception import (CHANNELS_NOTE, INCEPTION_NOTE, IS_NOTE, IS_OFFLINE_REASON, RGB_NOTE,
                        FidelityError, Inception, as_uint8_nchw)

METRICS = ("fid", "kid", "is")


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
    unknown = set(metrics) - set(METRICS)
    if unknown:
        raise FidelityError(f"unknown fidelity metric(s) {sorted(unknown)}; valid: {', '.join(METRICS)}")
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
