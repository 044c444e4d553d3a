"""Evaluation of a checkpoint: FID / KID / IS, NLL in bits/dim, rate-distortion, figures.

An evaluation is an ``EvalSpec`` (what was asked for: checkpoint, metrics, N, variance,
EMA flag, seed, data, batch sizes, figures), written verbatim into metrics.json as
``run.spec``. ``run_evaluation(spec)`` first checks everything that can fail on the request
(``prepare``: arguments, device, checkpoint, out dir, data, Inception), then runs it as
named steps, each a function returning the results and figures it made:

    samples -> fidelity   step_samples: N samples in resumable shards, FID / KID / IS
    bound                 step_bound, per split: the NLL (Table 1) and, on test, the
                          rate-distortion (Table 4 rows, Fig. 5); numerics in ddpm.bound
    figures               step_figures: Figs. 6-8

``OUT/metrics.json`` is written after each step: every value with its N, sampler, steps,
variance, EMA flag, reference set, seed, git commit, device and elapsed time.
``python -m ddpm eval`` (ddpm.cli.evaluate) builds the spec from the command line.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch

# the bound's numerics, also reachable here as before they had their own module (table4_steps)
from .bound import RD_DEFINITION, bound_terms, rate_distortion, summarize_nll, table4_rows, table4_steps  # noqa: F401
from . import figures as FIG
from .config import Config, ConfigError
from .data import resolve_data_dir, to_model_range
from .diffusion import VarType, _enum
from .fidelity import compute_metrics
from .generate import PIXEL_MAP, check_manifest, generate, sample_manifest
from .inception import Inception, resolve_weights
from .loading import load_model
from .provenance import atomic_write_text, git_commit
from .runtime import PRECISIONS, Bf16Network, derive_seed, device_description, pick_device
from .sampling import Sampler
from .sources import load_images

METRICS = ("fid", "is", "kid", "nll", "rd")


class EvalError(RuntimeError):
    """The evaluation asked for is impossible as specified; the message says why."""


# --------------------------------------------------------------------------------- spec


@dataclass(frozen=True)
class EvalSpec:
    """One evaluation as asked for; written verbatim into metrics.json (run.spec)."""

    checkpoint: str
    metrics: Tuple[str, ...] = ("fid", "kid", "nll", "rd")  # of METRICS; ("none",): the figures alone
    n: int = 50_000  # samples for FID / KID / IS
    variance: Optional[str] = None  # beta | beta_tilde | learned; None: the checkpoint's
    ema: bool = True
    out_dir: str = "eval"
    data_dir: Optional[str] = None
    nll_n: Optional[int] = None  # a seeded subset of each split for NLL / rd; None: every image
    nll_splits: Tuple[str, ...] = ("test", "train")  # rd always uses test
    seed: int = 0  # samples (shard k: (seed, k)), the bound's noise, the figures
    device: Optional[str] = None  # None / "auto": cuda if available
    batch_size: int = 256  # sampling batch = shard size; part of what fixes the samples
    nll_batch_size: int = 16  # images per calc_bpd_loop call
    max_batch: int = 256  # (image, t) pairs per network call in the bound
    reference: Optional[str] = None  # FID reference set; None: the checkpoint's reference_split
    reference_split: str = "train"  # the paper's FID reference: the training set
    reference_n: Optional[int] = None  # a seeded subset of the reference; None: all of it
    inception_weights: Optional[str] = None  # offline weights; None: $DDPM_INCEPTION_WEIGHTS or download
    figures: bool = True
    # the network under bf16 autocast for samples and figures (about 2x on CPUs, FID/KID unchanged
    # as measured); the bound always runs in float32 (bf16 raises it by ~0.04 bits/dim)
    bf16: bool = False
    # how FID/KID/IS samples are drawn: ancestral over all T steps (the paper's protocol), or
    # respaced / ddim on `steps` of them (ddpm.sampling.Sampler); recorded with every number
    sampler: str = "ancestral"
    steps: Optional[int] = None
    eta: float = 0.0
    skip: str = "uniform"

    @property
    def sampling(self) -> Sampler:
        return Sampler(self.sampler, self.steps, self.eta, self.skip)

    @property
    def sampled(self) -> Tuple[str, ...]:
        """The metrics computed on samples, in the order they are reported."""
        return tuple(m for m in ("fid", "kid", "is") if m in self.metrics)

    @property
    def bound_splits(self) -> Tuple[str, ...]:
        """The splits the bound is computed on (rd alone needs only test)."""
        if not {"nll", "rd"} & set(self.metrics):
            return ()
        return self.nll_splits if "nll" in self.metrics else ("test",)

    def checked(self) -> "EvalSpec":
        """This spec with metrics and paths normalised; EvalError for an impossible argument."""
        metrics = [m.strip().lower() for m in self.metrics if m.strip()]
        if not metrics:
            raise EvalError(f"no metrics asked for; --metrics takes one or more of {','.join(METRICS)} "
                            f"(or 'none' for the figures alone)")
        if metrics == ["none"]:  # the figures alone
            if not self.figures:
                raise EvalError("--metrics none with --no-figures: nothing to do")
            metrics = []
        bad = set(metrics) - set(METRICS)
        if bad:
            raise EvalError(f"unknown metric(s) {sorted(bad)}; valid: {', '.join(METRICS)}")
        sampled = [m for m in ("fid", "kid", "is") if m in metrics]
        if sampled and self.n < 1:
            raise EvalError(f"--n {self.n}: must be a positive number of samples")
        if {"fid", "kid"} & set(sampled) and self.n < 2:
            raise EvalError(f"--n {self.n}: FID and KID need at least 2 samples (they compare covariances)")
        if self.nll_n is not None and self.nll_n < 1:
            raise EvalError(f"--nll-n {self.nll_n}: must be a positive number of images (omit it for every image)")
        if self.reference_split not in ("test", "train"):
            raise EvalError(f"--reference-split {self.reference_split!r}: test or train")
        if self.reference_n is not None and self.reference_n < 2:
            raise EvalError(f"--reference-n {self.reference_n}: must be at least 2 (omit it for the whole set)")
        for flag, value in (("--batch-size", self.batch_size), ("--nll-batch-size", self.nll_batch_size),
                            ("--max-batch", self.max_batch)):
            if value < 1:
                raise EvalError(f"{flag} {value}: must be positive")
        try:
            self.sampling
        except ValueError as e:
            raise EvalError(str(e)) from None
        splits = tuple(self.nll_splits)
        if {"nll", "rd"} & set(metrics) and (not splits or set(splits) - {"test", "train"}):
            raise EvalError(f"--nll-splits {','.join(splits)!r}: one or both of test, train")
        path = (lambda p: None if p is None else str(p))
        return dataclasses.replace(
            self, metrics=tuple(metrics), nll_splits=splits, checkpoint=str(self.checkpoint),
            out_dir=str(self.out_dir), data_dir=path(self.data_dir), inception_weights=path(self.inception_weights),
            variance=self.variance.value if isinstance(self.variance, VarType) else self.variance)


# --------------------------------------------------------------------------- provenance


def _write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default))


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON-able: {type(o)}")


def dataset_spec(cfg, split: str, data_dir=None) -> Optional[str]:
    """The sources.load_images spec of the checkpoint's dataset split, or None if the
    dataset has no such split (a folder dataset: data.path is 'train', data.test_path, if
    set, is 'test')."""
    ds = cfg.data.dataset
    if ds in ("mnist", "cifar10"):
        return f"{ds}{'-' + cfg.data.subset if cfg.data.subset else ''}:{split}"
    rel = {"train": cfg.data.path, "test": cfg.data.test_path}.get(split)
    if not rel:
        return None
    p = Path(rel)
    return f"folder:{p if p.is_absolute() else resolve_data_dir(data_dir) / p}"


def _earlier_report(mpath: Path, cfg, common: Dict[str, object]) -> Optional[Dict[str, object]]:
    """The metrics.json already in the out dir, if it evaluates the same checkpoint (config and
    step), EMA flag and variance (its results are then kept and extended); None if there is
    none; EvalError if it is another evaluation's (results are never mixed)."""
    if not mpath.is_file():
        return None
    try:
        old = json.loads(mpath.read_text())
        run = old["run"]
        old_cfg = Config.from_dict(run["config"]).to_dict()
    except (ValueError, KeyError, TypeError, ConfigError):
        raise EvalError(f"{mpath} exists but is not a metrics.json this code wrote; choose another --out "
                        "or move it away") from None
    differ = [f"{k}: {run.get(k)!r} there, {common[k]!r} now" for k in ("checkpoint_step", "ema", "variance")
              if run.get(k) != common[k]]
    if json.loads(json.dumps(old_cfg)) != json.loads(json.dumps(cfg.to_dict())):
        differ.insert(0, "the checkpoint's config")
    if differ:
        raise EvalError(f"{mpath} holds the results of another evaluation ({'; '.join(differ)}); choose "
                        "another --out (results of different evaluations are never mixed)")
    return old


def _start_report(spec: EvalSpec, cfg, common: Dict[str, object], mpath: Path) -> Dict[str, object]:
    """The metrics.json of this call: the run record with its spec, and the results and figures
    of an earlier call of the same evaluation (that call listed under run.earlier_calls)."""
    report: Dict[str, object] = {"run": {**common, "metrics_requested": list(spec.metrics),
                                         "torch": torch.__version__, "config": cfg.to_dict(),
                                         "spec": dataclasses.asdict(spec)},
                                 "results": {}, "figures": {}}
    earlier = _earlier_report(mpath, cfg, common)
    if earlier is not None:
        prev_run = {k: v for k, v in earlier.get("run", {}).items() if k not in ("config", "earlier_calls")}
        report["run"]["earlier_calls"] = [*earlier.get("run", {}).get("earlier_calls", []), prev_run]
        report["results"] = dict(earlier.get("results", {}))
        report["figures"] = dict(earlier.get("figures", {}))
    return report


# ------------------------------------------------------------------------------ prepare


@dataclass
class Evaluation:
    """A checked spec, opened: what its steps share. Built by ``prepare`` before any sampling."""

    spec: EvalSpec
    out_dir: Path
    device: str
    cfg: Any
    model: Any
    diffusion: Any
    var: VarType  # the reverse variance evaluated
    var_arg: Optional[VarType]  # None when it is the checkpoint's own
    common: Dict[str, object]  # recorded with every result
    report: Dict[str, object]  # the metrics.json being written
    t_start: float
    reference: Optional[tuple] = None  # (uint8 images, description, cache key) for FID / KID
    inception: Any = None
    nll_data: Dict[str, Optional[tuple]] = field(default_factory=dict)  # split -> (spec, images, desc) or None
    fig8: Optional[tuple] = None  # (spec, 4 uint8 images) for Fig. 8

    @property
    def image_shape(self) -> Tuple[int, int, int]:
        return (self.cfg.data.channels, self.cfg.data.resolution, self.cfg.data.resolution)

    @property
    def sample_meta(self) -> Dict[str, object]:
        return {"checkpoint": self.spec.checkpoint, "step": self.common["checkpoint_step"], "ema": self.spec.ema}

    def stamp(self, value: Dict[str, object], t0: float, **extra) -> Dict[str, object]:
        """A result as recorded: its values, how it was obtained (common) and its elapsed time."""
        return {**value, **extra, **self.common, "elapsed_s": round(time.time() - t0, 1)}

    def save(self) -> None:
        self.report["run"]["elapsed_s_total"] = round(time.time() - self.t_start, 1)
        _write_json(self.out_dir / "metrics.json", self.report)


def prepare(spec: EvalSpec) -> Evaluation:
    """The spec checked and opened. Everything that can fail on the request fails here, before
    anything is written or sampled: the arguments, the device, the checkpoint, what the out dir
    already holds (another evaluation's metrics.json or samples), the data (reference set, NLL
    splits, figure sources) and the Inception weights. Creates the out dir, nothing else."""
    spec = spec.checked()
    device = str(pick_device(spec.device))
    t_start = time.time()
    out_dir = Path(spec.out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise EvalError(f"--out {out_dir} is a file, not a folder")
    cfg, model, diffusion, state = load_model(spec.checkpoint, ema=spec.ema)
    var = diffusion.var_type if spec.variance is None else _enum(VarType, spec.variance)
    if var == VarType.LEARNED and diffusion.var_type != VarType.LEARNED:
        raise EvalError("--var learned needs a checkpoint trained with a learned variance")
    common = {"checkpoint": spec.checkpoint, "checkpoint_step": int(state.get("step", -1)), "ema": bool(spec.ema),
              "variance": var.value, "T": diffusion.T, "seed": int(spec.seed), "git_commit": git_commit(),
              "device": device_description(device)}
    report = _start_report(spec, cfg, common, out_dir / "metrics.json")
    ev = Evaluation(spec, out_dir, device, cfg, model, diffusion, var, None if var == diffusion.var_type else var,
                    common, report, t_start)
    try:
        spec.sampling.tau(diffusion.T)
    except ValueError as e:
        raise EvalError(f"--steps {spec.steps}: {e}") from None
    if spec.sampled:  # samples of another request in out_dir/samples: an error now, not after hours
        check_manifest(out_dir / "samples", sample_manifest(
            diffusion, spec.n, ev.image_shape, batch_size=spec.batch_size, seed=spec.seed, var_type=ev.var_arg,
            meta=ev.sample_meta, sampler=spec.sampling, bf16=spec.bf16))
    _load_inputs(ev)
    out_dir.mkdir(parents=True, exist_ok=True)
    ev.model = model.to(device).eval()
    return ev


def _load_inputs(ev: Evaluation) -> None:
    """The data and the Inception network every step will need, loaded (and so checked) now."""
    spec, cfg = ev.spec, ev.cfg
    fit = (cfg.data.channels, cfg.data.resolution)  # folder images are decoded as the trainer does
    if spec.sampled:
        resolve_weights(spec.inception_weights)  # an explicit weights file that is not there: say so first
    if {"fid", "kid"} & set(spec.sampled):
        ref_spec = spec.reference or dataset_spec(cfg, spec.reference_split, spec.data_dir)
        if ref_spec is None:
            raise EvalError(f"--reference-split {spec.reference_split}: dataset {cfg.data.dataset!r} has no such "
                            "split here; pass --reference")
        ev.reference = load_images(ref_spec, spec.data_dir, spec.reference_n, seed=2020, resize_to=fit)
    if spec.sampled:
        with_logits = "is" in spec.sampled and resolve_weights(spec.inception_weights) is None
        ev.inception = Inception(spec.inception_weights, device=ev.device, with_logits=with_logits)
    for split in spec.bound_splits:
        ds = dataset_spec(cfg, split, spec.data_dir)
        ev.nll_data[split] = None if ds is None else (ds, *load_images(ds, spec.data_dir, spec.nll_n, seed=2020,
                                                                       resize_to=fit)[:2])
        if ds is not None and tuple(ev.nll_data[split][1].shape[1:]) != ev.image_shape:
            raise EvalError(f"{ds} holds images of shape {tuple(ev.nll_data[split][1].shape[1:])}, the "
                            f"model takes {ev.image_shape}")
    if spec.figures:
        ds = dataset_spec(cfg, "test", spec.data_dir) or dataset_spec(cfg, "train", spec.data_dir)
        images = load_images(ds, spec.data_dir, 4, seed=2020, resize_to=fit)[0]
        if images.shape[0] < 4:
            raise EvalError(f"{ds} holds {images.shape[0]} image(s); the interpolation figure "
                            "needs 4 (or pass --no-figures)")
        ev.fig8 = (ds, images)


# -------------------------------------------------------------------------------- steps


Produced = Dict[str, Dict[str, object]]  # {"results": {name: record}, "figures": {name: path}}


def step_samples(ev: Evaluation, progress: bool = True) -> Produced:
    """Samples -> FID / KID / IS: exactly N samples (resumable shards), their grid, then the
    fidelity metrics against the reference set with the Inception network built in prepare."""
    spec, t0 = ev.spec, time.time()
    samples = generate(ev.model, ev.diffusion, spec.n, ev.image_shape, out_dir=ev.out_dir / "samples",
                       batch_size=spec.batch_size, seed=spec.seed, device=ev.device, var_type=ev.var_arg,
                       meta=ev.sample_meta, progress=progress, sampler=spec.sampling, bf16=spec.bf16)
    sampler = {"sampler": spec.sampling.describe(ev.diffusion.T), "sampler_spec": spec.sampling.to_dict(ev.diffusion.T),
               "network_precision": PRECISIONS[spec.bf16]}
    results: Dict[str, object] = {"sampling": {
        "n": spec.n, **sampler, "pixel_map": PIXEL_MAP, "folder": str(ev.out_dir / "samples"),
        # a collapse detector (all samples alike): the per-pixel std across the set, averaged over
        # pixels, on [0, 255]; beside it the same of the FID reference set
        "pixel_std_across_set": round(float(samples.astype(np.float64).std(axis=0).mean()), 3),
        "reference_pixel_std_across_set": (None if ev.reference is None else round(float(
            np.asarray(ev.reference[0], dtype=np.float64).std(axis=0).mean()), 3)),
        **ev.common, "elapsed_s": round(time.time() - t0, 1),
        "note": "elapsed_s is 0-ish when the shards already existed (resumed)"}}
    figures = {}
    if spec.figures:
        figures["samples"] = str(FIG.save_samples_grid(samples, ev.out_dir / "samples_grid.png"))
    want, t0 = list(spec.sampled), time.time()
    ref_images, ref_desc, ref_key = ev.reference or (None, None, None)
    fm = compute_metrics(samples, ref_images, want, inception=ev.inception, weights=spec.inception_weights,
                         device=ev.device, reference_key=ref_key, reference_desc=ref_desc, progress=progress,
                         uncertainty=True)
    base = {"n": spec.n, **sampler, "pixel_map": PIXEL_MAP, "inception": fm["inception"]}
    if "fid" in want:
        results["fid"] = ev.stamp({"value": fm["fid"], "se": fm.get("fid_se"), "se_method": fm.get("fid_se_method"),
                                   **base, "n_reference": fm["n_reference"],
                                   "reference": fm["reference"]}, t0, inception_elapsed_s=fm["elapsed_s"])
    if "kid" in want:
        results["kid"] = ev.stamp({"value": fm["kid"], "std": fm["kid_std"], "subset_size": fm["kid_subset_size"],
                                   "unbiased": fm.get("kid_unbiased"), "se": fm.get("kid_se"),
                                   "se_method": fm.get("kid_se_method"),
                                   "subsets": fm["kid_subsets"], **base, "n_reference": fm["n_reference"],
                                   "reference": fm["reference"]}, t0, inception_elapsed_s=fm["elapsed_s"])
    if "is" in want:
        if fm.get("is") is None:
            results["is"] = ev.stamp({"value": None, "std": None, "unavailable": fm["is_unavailable"], **base}, t0)
        else:
            results["is"] = ev.stamp({"value": fm["is"], "std": fm["is_std"], "splits": fm["is_splits"], **base}, t0)
    return {"results": results, "figures": figures}


def step_bound(ev: Evaluation, split: str, progress: bool = True) -> Produced:
    """The full bound over all T steps on one split (nll_<split>, Table 1) and, on test, the
    rate-distortion from its per-step terms (rd: Table 4's rows, Fig. 5). The per-image terms
    go to OUT/bound_terms_<split>.npz, the rate-distortion curve to OUT/rate_distortion.npz."""
    from tqdm.auto import tqdm

    spec, loaded = ev.spec, ev.nll_data[split]
    if loaded is None:
        return {"results": {f"nll_{split}": {"value": None, "unavailable":
                                             f"dataset {ev.cfg.data.dataset!r} has no {split} split"}}}
    t0 = time.time()
    _, images, desc = loaded
    bar = tqdm(total=images.shape[0], desc="bound (all T steps)", unit="img", disable=not progress)
    terms = bound_terms(ev.model, ev.diffusion, images, batch_size=spec.nll_batch_size, var_type=ev.var_arg,
                        seed=spec.seed, device=ev.device, max_batch=spec.max_batch, on_batch=bar.update)
    bar.close()
    np.savez_compressed(ev.out_dir / f"bound_terms_{split}.npz", **{k: v.astype(np.float32) for k, v in terms.items()})
    summary = summarize_nll(terms)
    results: Dict[str, object] = {}
    figures = {}
    if "nll" in spec.metrics:
        # per image, in the order of the seeded subset: two models evaluated on the same images with
        # the same seed are compared image by image (paired differences; analysis.claims)
        per_image = [round(float(v), 6) for v in terms["total_bpd_b"]]
        results[f"nll_{split}"] = ev.stamp({"value": summary["bpd"], "se": summary["bpd_se"], **summary,
                                            "per_image_bpd": per_image, "data": desc, "clip_x0": True,
                                            "estimator": "calc_bpd_loop: all T terms, fresh noise per term"}, t0)
    if "rd" in spec.metrics and split == "test":
        rd = rate_distortion(terms)
        results["rd"] = ev.stamp({"table4": table4_rows(rd), "definition": RD_DEFINITION, "n": summary["n"],
                                  "data": desc, "L_0_bpd": summary["L_0"]["mean"],
                                  "note": "rate(T) + L_0 = the NLL bound"}, t0)
        np.savez_compressed(ev.out_dir / "rate_distortion.npz", **rd)
        if spec.figures:
            figures["fig5_rate_distortion"] = str(FIG.rd_plots(
                rd, ev.out_dir / "fig5_rate_distortion.png",
                title=f"{Path(spec.checkpoint).name}, {desc.split(':')[0]}, N={summary['n']}, "
                      f"var={ev.var.value}, EMA={spec.ema}"))
    return {"results": results, "figures": figures}


def step_figures(ev: Evaluation, progress: bool = True) -> Produced:
    """Figs. 6-8 (progressive generation, samples sharing x_t, interpolation), all drawn from
    one generator seeded by (seed, 10000)."""
    t0, out = time.time(), ev.out_dir
    g = torch.Generator(device=ev.device)
    g.manual_seed(derive_seed(ev.spec.seed, 10_000))
    C, H, W = ev.image_shape
    kw = dict(generator=g, device=ev.device, var_type=ev.var_arg, progress=progress)
    net = Bf16Network(ev.model) if ev.spec.bf16 else ev.model
    FIG.progressive_generation(ev.diffusion, net, (8, C, H, W), out / "fig6_progressive.png", **kw)
    FIG.shared_latent(ev.diffusion, net, ev.image_shape, out / "fig7_shared_latent.png", **kw)
    fig8_spec, fig8_images = ev.fig8
    x = to_model_range(fig8_images)
    FIG.interpolation(ev.diffusion, net, [(x[0], x[1]), (x[2], x[3])], out / "fig8_interpolation.png", **kw)
    return {"figures": {"fig6_progressive": str(out / "fig6_progressive.png"),
                        "fig7_shared_latent": str(out / "fig7_shared_latent.png"),
                        "fig8_interpolation": str(out / "fig8_interpolation.png"),
                        "elapsed_s": round(time.time() - t0, 1),
                        "source_images_fig8": f"{fig8_spec}, 4 images chosen by RandomState(2020)",
                        "network_precision": PRECISIONS[ev.spec.bf16]}}


# ------------------------------------------------------------------------------ running


def steps(ev: Evaluation, progress: bool = True):
    """The named steps of a prepared evaluation, in order: [(name, function of no arguments)]."""
    out = []
    if ev.spec.sampled:
        out.append(("samples", lambda: step_samples(ev, progress)))
    for split in ev.nll_data:
        out.append((f"bound_{split}", lambda split=split: step_bound(ev, split, progress)))
    if ev.spec.figures:
        out.append(("figures", lambda: step_figures(ev, progress)))
    return out


def run_evaluation(spec: EvalSpec, progress: bool = True) -> Dict[str, object]:
    """Prepare ``spec`` (every check), then run its steps, writing OUT/metrics.json after each.

    An earlier metrics.json in the out dir of the same checkpoint (config and step), EMA flag
    and variance is kept and extended: results not recomputed now stay, and the earlier call is
    listed under run.earlier_calls. One of another evaluation is an error (never mixed)."""
    ev = prepare(spec)
    for _name, step in steps(ev, progress):
        made = step()
        ev.report["results"].update(made.get("results", {}))
        ev.report["figures"].update(made.get("figures", {}))
        ev.save()
    ev.save()
    return ev.report


def evaluate(checkpoint, metrics=EvalSpec.metrics, *, progress: bool = True, **spec_fields) -> Dict[str, object]:
    """``run_evaluation(EvalSpec(checkpoint, metrics, **spec_fields), progress)``; writes
    OUT/metrics.json and the figures and returns what it wrote."""
    return run_evaluation(EvalSpec(checkpoint, tuple(metrics), **spec_fields), progress)
