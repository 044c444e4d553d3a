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

import math
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


# the standard errors work on N x M matrices of the two sets: up to this many images per set
JACKKNIFE_MAX = 5000


def kid_unbiased(f1: torch.Tensor, f2: torch.Tensor) -> Tuple[float, float]:
    """The unbiased MMD^2 with KID's kernel (x.y / d + 1)^3 on the whole sets, and its delete-one
    jackknife standard error (each image of either set left out in turn; the two variances add).
    At N <= 1000 this MMD^2 is exactly torch-fidelity's KID, whose every subset is then the whole set."""
    x, y = f1.double(), f2.double()
    n, m, d = len(x), len(y), x.shape[1]
    if min(n, m) < 3:
        raise FidelityError("the KID standard error needs at least 3 images in each set")
    kxx, kyy, kxy = (x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3
    kxx.fill_diagonal_(0)
    kyy.fill_diagonal_(0)
    sxx, syy, sxy = kxx.sum(), kyy.sum(), kxy.sum()
    mmd = sxx / (n * (n - 1)) + syy / (m * (m - 1)) - 2 * sxy / (n * m)
    # leave out x_i: its row and column of kxx and its row of kxy go (likewise y_j)
    lx = (sxx - 2 * kxx.sum(1)) / ((n - 1) * (n - 2)) + syy / (m * (m - 1)) - 2 * (sxy - kxy.sum(1)) / ((n - 1) * m)
    ly = sxx / (n * (n - 1)) + (syy - 2 * kyy.sum(1)) / ((m - 1) * (m - 2)) - 2 * (sxy - kxy.sum(0)) / (n * (m - 1))
    var = (n - 1) / n * ((lx - lx.mean()) ** 2).sum() + (m - 1) / m * ((ly - ly.mean()) ** 2).sum()
    return float(mmd), float(var.sqrt())


def _fid_low_rank(f1: torch.Tensor, f2: torch.Tensor) -> float:
    """FID by the same formula as torch-fidelity's, computed through the sets' own N x M product:
    with Sigma1 = A A^T and Sigma2 = B B^T (A, B the centred features / sqrt(N - 1)), the trace of
    sqrt(Sigma1 Sigma2) is the sum of the singular values of A^T B. Exact, and fast where N, M are
    smaller than the 2048 feature dimensions (no 2048 x 2048 matrix square root)."""
    x, y = f1.double(), f2.double()
    a = (x - x.mean(0)) / math.sqrt(len(x) - 1)
    b = (y - y.mean(0)) / math.sqrt(len(y) - 1)
    tr_sqrt = torch.linalg.svdvals(a @ b.T).sum()
    return float(((x.mean(0) - y.mean(0)) ** 2).sum() + (a * a).sum() + (b * b).sum() - 2 * tr_sqrt)


def fid_bootstrap_se(f1: torch.Tensor, f2: torch.Tensor, reps: int = 10, seed: int = 2020) -> float:
    """The std of FID over ``reps`` bootstrap resamples of the samples (reference fixed): the
    sampling part of FID's spread at this N. FID's small-N bias is not in it, so FIDs are read
    against the floor of real images at the same N. (Each resample's FID by _fid_low_rank.)"""
    g = torch.Generator().manual_seed(seed)
    vals = [_fid_low_rank(f1[torch.randint(0, len(f1), (len(f1),), generator=g)], f2) for _ in range(reps)]
    return float(torch.tensor(vals).std())


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
                    is_splits: int = 10, seed: int = 2020, progress: bool = True,
                    uncertainty: bool = False) -> Dict[str, object]:
    """FID / KID / IS of ``images`` (uint8) against ``reference`` (uint8, or a callable
    returning it; with ``reference_key`` its features are cached on disk).

    Returns a JSON-able dict with the values and exactly how they were obtained. IS is
    computed on ``images`` alone; offline it is null with ``is_unavailable`` saying why.
    ``uncertainty``: also FID's bootstrap standard error (``fid_se``, 10 resamples) and KID's
    jackknife one (``kid_se``, with the whole-set estimate ``kid_unbiased``; up to
    JACKKNIFE_MAX images per set), for comparing models at small N.
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
            if uncertainty and max(out["n"], out["n_reference"]) <= JACKKNIFE_MAX:
                out["fid_se"] = fid_bootstrap_se(f1["2048"], f2["2048"])
                out["fid_se_method"] = "std over 10 bootstrap resamples of the samples, reference fixed"
        if "kid" in metrics:
            out["kid"], out["kid_std"], out["kid_subset_size"] = kid_from_features(
                f1["2048"], f2["2048"], subsets=kid_subsets, subset_size=kid_subset_size, seed=seed)
            out["kid_subsets"] = kid_subsets
            if uncertainty and max(out["n"], out["n_reference"]) <= JACKKNIFE_MAX:
                out["kid_unbiased"], out["kid_se"] = kid_unbiased(f1["2048"], f2["2048"])
                out["kid_se_method"] = "delete-one jackknife of the whole-set unbiased MMD^2"
    # what was done, for these inputs: channel handling, and IS only when it was computed
    channels = {int(images.shape[1])}
    if torch.is_tensor(reference) and ("fid" in metrics or "kid" in metrics):
        channels.add(int(reference.shape[1]))
    out["inception"]["channels"] = "; ".join(
        note for c, note in ((1, CHANNELS_NOTE), (3, RGB_NOTE)) if c in channels)
    out["inception"]["network"] = INCEPTION_NOTE + (f", {IS_NOTE}" if out.get("is") is not None else "")
    out["elapsed_s"] = round(time.time() - t0, 2)
    return out
