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
variance, EMA flag, reference set, seed, git commit, device (rank 0's), number of processes
and elapsed time. ``python -m ddpm eval`` (ddpm.cli.evaluate) builds the spec from the command line.
On CUDA the steps run with cudnn.benchmark on (runtime.cudnn_benchmark: fixed shapes).
``compile`` (``--compile``) runs each sampling step of the FID/KID/IS samples through
torch.compile (ddpm.sampling.CompiledStep); it is part of the sample set (``compiled`` in its
manifest and beside every fidelity number, as ``network_precision`` for bf16). The figures
(a few images) and the bound run eagerly.

Both expensive parts are made of independent pieces kept on disk, so an evaluation resumes
where it was killed and may be shared by several processes: sample shard k (ddpm.generate)
and batch k of the bound (OUT/bound_<split>/batch_KKKKK.npz, with the request it belongs to
in OUT/bound_<split>/manifest.json and in each file) are seeded by (seed, k) and do not depend
on what ran before or on who makes them. Under ``torchrun --nproc_per_node=K -m ddpm eval``
(WORLD_SIZE > 1), rank 0 lists the shards and batches still missing, rank r makes every K-th
of them (on cuda:LOCAL_RANK, or the CPU), and rank 0 alone reads them all, computes the
metrics, draws the figures and writes metrics.json: the numbers do not depend on K.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
import zipfile
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

# the bound's numerics, also reachable here as before they had their own module (table4_steps)
from .bound import (RD_DEFINITION, TERMS, bound_batch, concat_batches, n_batches, rate_distortion,  # noqa: F401
                    summarize_nll, table4_rows, table4_steps)
from . import figures as FIG
from .config import Config, ConfigError
from .data import resolve_data_dir, to_model_range
from .diffusion import VarType, _enum
from .fidelity import compute_metrics
from .generate import PIXEL_MAP, check_samples, generate, load_samples, missing_shards, sample_manifest
from .inception import Inception, resolve_weights
from .loading import load_model
from .provenance import MANIFEST, atomic_write_bytes, atomic_write_text, check_manifest, git_commit
from .runtime import (PRECISIONS, Bf16Network, Dist, cudnn_benchmark, derive_seed, device_description,
                      pick_device, setup_distributed)
from .sampling import Sampler
from .sources import load_images

METRICS = ("fid", "is", "kid", "nll", "rd")
BOUND_FORMAT = "ddpm-bound-batches-v1"
# How long a process waits for the others at a rendezvous (torch's default: 30 minutes). Rank 0
# computes FID/KID/IS (minutes on a GPU for 50,000 samples, more with a reference not yet cached)
# while the others make their share of the bound, then wait for rank 0 at its end: the run lasts
# rank 0's FID time plus a share of the bound, and a FID step longer than WAIT fails the waiting
# ranks (a rerun resumes). Left so, for simplicity (rank 0 could take fewer batches instead).
WAIT = timedelta(hours=4)


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
    # each sampling step of the FID/KID/IS samples through torch.compile (ddpm.sampling.CompiledStep);
    # like bf16, part of the sample set (recorded as "compiled"); figures and the bound run eagerly
    compile: bool = False
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
    d: Dist = field(default_factory=Dist)  # this process among the evaluation's processes
    bound_requests: Dict[str, Dict[str, object]] = field(default_factory=dict)  # split -> bound_request
    # what is left to make, as rank 0 listed it before any work: "samples" -> shard indices,
    # "bound_<split>" -> batch indices; rank r makes every world_size-th, from the r-th on
    todo: Dict[str, List[int]] = field(default_factory=dict)

    @property
    def image_shape(self) -> Tuple[int, int, int]:
        return (self.cfg.data.channels, self.cfg.data.resolution, self.cfg.data.resolution)

    @property
    def sample_meta(self) -> Dict[str, object]:
        return {"checkpoint": self.spec.checkpoint, "step": self.common["checkpoint_step"], "ema": self.spec.ema}

    def share(self, work: str) -> List[int]:
        """This process's part of ``todo[work]``."""
        return self.todo.get(work, [])[self.d.rank::self.d.world_size]

    def stamp(self, value: Dict[str, object], t0: float, **extra) -> Dict[str, object]:
        """A result as recorded: its values, how it was obtained (common) and its elapsed time."""
        return {**value, **extra, **self.common, "elapsed_s": round(time.time() - t0, 1)}

    def save(self) -> None:
        self.report["run"]["elapsed_s_total"] = round(time.time() - self.t_start, 1)
        _write_json(self.out_dir / "metrics.json", self.report)


def prepare(spec: EvalSpec, d: Optional[Dist] = None) -> Evaluation:
    """The spec checked and opened. Everything that can fail on the request fails here, before
    anything is written or sampled: the arguments, the device, the checkpoint, what the out dir
    already holds (another evaluation's metrics.json, samples or bound batches), the data
    (reference set, NLL splits, figure sources) and the Inception weights (these two, and the
    work left to do, on rank 0 of ``d``, which alone computes metrics). Creates the out dir,
    nothing else."""
    spec, d = spec.checked(), d or Dist()
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
              # rank 0's device; under torchrun the other processes' (one GPU each) are not recorded
              "device": device_description(device), "world_size": d.world_size,
              # on CUDA cuDNN picks its convolution algorithms per process (runtime.cudnn_benchmark):
              # a resumed sample set matches an uninterrupted one up to float rounding, not bit for bit
              "cudnn_benchmark": torch.device(device).type == "cuda"}
    report = _start_report(spec, cfg, common, out_dir / "metrics.json")
    ev = Evaluation(spec, out_dir, device, cfg, model, diffusion, var, None if var == diffusion.var_type else var,
                    common, report, t_start, d=d)
    try:
        spec.sampling.tau(diffusion.T)
    except ValueError as e:
        raise EvalError(f"--steps {spec.steps}: {e}") from None
    if spec.sampled:  # samples of another request in out_dir/samples: an error now, not after hours
        manifest = sample_manifest(diffusion, spec.n, ev.image_shape, batch_size=spec.batch_size, seed=spec.seed,
                                   var_type=ev.var_arg, meta=ev.sample_meta, sampler=spec.sampling, bf16=spec.bf16,
                                   compile=spec.compile)
        started = check_samples(out_dir / "samples", manifest)
        if d.main:
            ev.todo["samples"] = (missing_shards(out_dir / "samples", manifest) if started
                                  else list(range(manifest["n_shards"])))
    _load_inputs(ev)
    for split, loaded in ev.nll_data.items():  # bound batches of another request: an error now too
        if loaded is not None:
            ev.bound_requests[split] = bound_request(ev, split)
            if d.main:
                ev.todo[f"bound_{split}"] = _missing_batches(ev, split)
    out_dir.mkdir(parents=True, exist_ok=True)
    ev.model = model.to(device).eval()
    return ev


def _load_inputs(ev: Evaluation) -> None:
    """The data and the Inception network every step will need, loaded (and so checked) now."""
    spec, cfg = ev.spec, ev.cfg
    fit = (cfg.data.channels, cfg.data.resolution)  # folder images are decoded as the trainer does
    main = ev.d.main  # the reference set and the Inception network serve rank 0's metrics only
    if spec.sampled and main:
        resolve_weights(spec.inception_weights)  # an explicit weights file that is not there: say so first
    if {"fid", "kid"} & set(spec.sampled) and main:
        ref_spec = spec.reference or dataset_spec(cfg, spec.reference_split, spec.data_dir)
        if ref_spec is None:
            raise EvalError(f"--reference-split {spec.reference_split}: dataset {cfg.data.dataset!r} has no such "
                            "split here; pass --reference")
        ev.reference = load_images(ref_spec, spec.data_dir, spec.reference_n, seed=2020, resize_to=fit)
    if spec.sampled and main:
        with_logits = "is" in spec.sampled and resolve_weights(spec.inception_weights) is None
        ev.inception = Inception(spec.inception_weights, device=ev.device, with_logits=with_logits)
    for split in spec.bound_splits:
        ds = dataset_spec(cfg, split, spec.data_dir)
        ev.nll_data[split] = None if ds is None else (ds, *load_images(ds, spec.data_dir, spec.nll_n, seed=2020,
                                                                       resize_to=fit)[:2])
        if ds is not None and tuple(ev.nll_data[split][1].shape[1:]) != ev.image_shape:
            raise EvalError(f"{ds} holds images of shape {tuple(ev.nll_data[split][1].shape[1:])}, the "
                            f"model takes {ev.image_shape}")
    if spec.figures and main:
        ds = dataset_spec(cfg, "test", spec.data_dir) or dataset_spec(cfg, "train", spec.data_dir)
        images = load_images(ds, spec.data_dir, 4, seed=2020, resize_to=fit)[0]
        if images.shape[0] < 4:
            raise EvalError(f"{ds} holds {images.shape[0]} image(s); the interpolation figure "
                            "needs 4 (or pass --no-figures)")
        ev.fig8 = (ds, images)


# ------------------------------------------------------------- the bound, batch by batch


def bound_request(ev: Evaluation, split: str) -> Dict[str, object]:
    """What the bound's batches on ``split`` are, as OUT/bound_<split>/manifest.json records it
    (and each batch file by its digest): the images (count and SHA-256 of their bytes), the
    batching and seed that fix each batch's noise, the checkpoint, EMA flag and variance."""
    spec, images = ev.spec, ev.nll_data[split][1]
    N = int(images.shape[0])
    return json.loads(json.dumps({
        "format": BOUND_FORMAT, "split": split, "n_images": N,
        "images_sha256": hashlib.sha256(images.contiguous().numpy().tobytes()).hexdigest(),
        "image_shape_chw": list(ev.image_shape), "batch_size": spec.nll_batch_size,
        "n_batches": n_batches(N, spec.nll_batch_size), "seed": spec.seed, "T": ev.diffusion.T,
        "variance": ev.var.value, "clip_x0": True, "max_batch": spec.max_batch,
        "network_precision": PRECISIONS[False], "meta": ev.sample_meta}))


def _digest(request: Dict[str, object]) -> str:
    return hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()[:16]


def bound_folder(out_dir, split: str) -> Path:
    return Path(out_dir) / f"bound_{split}"


def batch_path(folder, k: int) -> Path:
    return Path(folder) / f"batch_{k:05d}.npz"


def _missing_batches(ev: Evaluation, split: str) -> List[int]:
    """The batches of ``split`` not on disk yet; EvalError if the folder (its manifest.json), or
    a batch file in it, belongs to another request: checked before anything is computed."""
    folder, request = bound_folder(ev.out_dir, split), ev.bound_requests[split]
    if not check_manifest(folder, request, "the bound's batches", EvalError):
        return list(range(request["n_batches"]))
    missing = []
    for k in range(request["n_batches"]):
        if batch_path(folder, k).exists():
            _read_batch(folder, request, k, terms=False)
        else:
            missing.append(k)
    return missing


def _read_batch(folder: Path, request: Dict[str, object], k: int, terms: bool = True) -> Dict[str, np.ndarray]:
    """Batch ``k``'s per-image terms (float64) from its file (``terms=False``: only check whose it
    is); EvalError, saying what to do, for a file that is missing, not whole, or another request's."""
    path, digest = batch_path(folder, k), _digest(request)
    if not path.exists():
        raise EvalError(f"{path} is missing; rerun the same command to compute it")
    try:
        with np.load(path) as f:
            whose, index = str(f["request"]), int(f["index"])
            out = {key: f[key].astype(np.float64) for key in TERMS} if terms else {}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise EvalError(f"{path} is not a whole batch file ({type(e).__name__}); delete it and rerun to "
                        "compute it again") from None
    if whose != digest or index != k:
        raise EvalError(f"{path} is batch {index} of another request (digest {whose}; this one is batch "
                        f"{k} of {digest}, {folder / MANIFEST}): never reused; delete it and rerun")
    return out


def _bound_share(ev: Evaluation, split: str, progress: bool) -> None:
    """This process's share of the batches still missing on ``split``, each written to its file
    (atomically, with the request's digest and its index) as soon as it is computed."""
    from tqdm.auto import tqdm

    spec, images = ev.spec, ev.nll_data[split][1]
    folder, request = bound_folder(ev.out_dir, split), ev.bound_requests[split]
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / MANIFEST).exists():  # every process writes the same bytes
        atomic_write_text(folder / MANIFEST, json.dumps(request, indent=2))
    mine, bs, N = ev.share(f"bound_{split}"), spec.nll_batch_size, request["n_images"]
    bar = tqdm(total=sum(min(bs, N - k * bs) for k in mine), desc=f"bound on {split} (all T steps)", unit="img",
               disable=not progress or not mine)
    digest = _digest(request)
    for k in mine:
        terms = bound_batch(ev.model, ev.diffusion, images, k, batch_size=bs, var_type=ev.var_arg, seed=spec.seed,
                            device=ev.device, max_batch=spec.max_batch)
        atomic_write_bytes(batch_path(folder, k), lambda f, t=terms, k=k: np.savez(
            f, request=np.array(digest), index=np.array(k), **{key: _narrowed(v) for key, v in t.items()}))
        bar.update(terms["total_bpd_b"].shape[0])
    bar.close()


def _narrowed(a: np.ndarray) -> np.ndarray:
    """``a`` as float32 where that is exact, else as it is: the per-step terms are the float32
    network's values that calc_bpd_loop upcasts (half the disk), the sum total_bpd_b is not."""
    a32 = a.astype(np.float32)
    return a32 if np.array_equal(a32, a) else a


# -------------------------------------------------------------------------------- steps


Produced = Dict[str, Dict[str, object]]  # {"results": {name: record}, "figures": {name: path}}


def step_samples(ev: Evaluation, progress: bool = True) -> Produced:
    """Samples -> FID / KID / IS: exactly N samples (resumable shards; this process makes its
    share of those missing), then on rank 0, once every shard is there, their grid and the
    fidelity metrics against the reference set with the Inception network built in prepare."""
    spec, t0 = ev.spec, time.time()
    generate(ev.model, ev.diffusion, spec.n, ev.image_shape, out_dir=ev.out_dir / "samples",
             batch_size=spec.batch_size, seed=spec.seed, device=ev.device, var_type=ev.var_arg,
             meta=ev.sample_meta, progress=progress, sampler=spec.sampling, bf16=spec.bf16,
             compile=spec.compile, return_images=False, shards=ev.share("samples"))
    ev.d.barrier()  # every shard is written
    if not ev.d.main:
        return {}
    samples = load_samples(ev.out_dir / "samples")
    sampler = {"sampler": spec.sampling.describe(ev.diffusion.T), "sampler_spec": spec.sampling.to_dict(ev.diffusion.T),
               "network_precision": PRECISIONS[spec.bf16], "compiled": spec.compile}
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
    rate-distortion from its per-step terms (rd: Table 4's rows, Fig. 5). This process computes
    its share of the batches still missing (each kept in OUT/bound_<split>/); then rank 0 reads
    them all: the per-image terms go to OUT/bound_terms_<split>.npz, the rate-distortion curve
    to OUT/rate_distortion.npz."""
    spec, loaded = ev.spec, ev.nll_data[split]
    if loaded is None:
        return {"results": {f"nll_{split}": {"value": None, "unavailable":
                                             f"dataset {ev.cfg.data.dataset!r} has no {split} split"}}}
    t0 = time.time()
    _, images, desc = loaded
    _bound_share(ev, split, progress)
    ev.d.barrier()  # every batch is written
    if not ev.d.main:
        return {}
    folder, request = bound_folder(ev.out_dir, split), ev.bound_requests[split]
    terms = concat_batches([_read_batch(folder, request, k) for k in range(request["n_batches"])])
    assert terms["total_bpd_b"].shape == (images.shape[0],)
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
    if ev.spec.figures and ev.d.main:
        out.append(("figures", lambda: step_figures(ev, progress)))
    return out


def run_evaluation(spec: EvalSpec, progress: bool = True) -> Optional[Dict[str, object]]:
    """Prepare ``spec`` (every check), then run its steps, writing OUT/metrics.json after each.

    An earlier metrics.json in the out dir of the same checkpoint (config and step), EMA flag
    and variance is kept and extended: results not recomputed now stay, and the earlier call is
    listed under run.earlier_calls. One of another evaluation is an error (never mixed).
    Under torchrun (WORLD_SIZE > 1) every process runs this and shares the work (see the module
    docstring); rank 0 returns the report, the others None."""
    d = join_processes(spec)
    try:
        ev = _prepare_everywhere(spec, d)
        with cudnn_benchmark(ev.device):  # the samples' batches and the bound's are of fixed shapes
            for _name, step in steps(ev, progress and d.main):
                made = step()
                if d.main:
                    ev.report["results"].update(made.get("results", {}))
                    ev.report["figures"].update(made.get("figures", {}))
                    ev.save()
        if not d.main:
            return None
        ev.save()
        return ev.report
    finally:
        d.close()


def join_processes(spec: EvalSpec) -> Dist:
    """This process's place among the evaluation's processes (torchrun's WORLD_SIZE, RANK,
    LOCAL_RANK; a single process otherwise), over gloo: they exchange only waits and lists."""
    device = pick_device(spec.checked().device)  # cuda:LOCAL_RANK for auto / cuda
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1 and device.index != local:
        raise EvalError(f"--device {spec.device} under torchrun: process LOCAL_RANK={local} must use cuda:{local} "
                        "(else the processes share one GPU); pass --device cuda or auto (CUDA_VISIBLE_DEVICES "
                        "picks the GPUs)")
    if device.type == "cuda" and device.index >= torch.cuda.device_count():
        raise EvalError(f"process LOCAL_RANK={device.index} has no GPU: this machine has {torch.cuda.device_count()}; "
                        "start at most that many processes per machine (torchrun --nproc_per_node)")
    d = setup_distributed(device, backend="gloo", timeout=WAIT)
    if d.world_size > 1 and device.type == "cuda":
        torch.cuda.set_device(device)
    return d


def _prepare_everywhere(spec: EvalSpec, d: Dist) -> Evaluation:
    """``prepare`` on every process; if it fails on any, every process stops before sampling
    (the one that failed with its own error). The work left is rank 0's listing."""
    ev, err = None, None
    try:
        ev = prepare(spec, d)
    except Exception as e:  # noqa: BLE001 - told to the other processes first, then raised as it was
        err = e
    try:
        said = d.gather((None if err is None else f"{type(err).__name__}: {err}",
                         ev.todo if ev and d.main else None))
    except Exception:
        if err is not None:  # this process's own error says more than the failed exchange
            raise err from None
        raise
    if err is not None:
        raise err
    failed = [(rank, msg) for rank, (msg, _) in enumerate(said) if msg]
    if failed:
        rank, msg = failed[0]
        raise EvalError(f"process {rank} of {d.world_size} stopped before any sampling ({msg}); fix that and rerun")
    ev.todo = said[0][1]
    return ev


def evaluate(checkpoint, metrics=EvalSpec.metrics, *, progress: bool = True,
             **spec_fields) -> Optional[Dict[str, object]]:
    """``run_evaluation(EvalSpec(checkpoint, metrics, **spec_fields), progress)``; writes
    OUT/metrics.json and the figures and returns what it wrote (under torchrun: rank 0; the
    other processes get None)."""
    return run_evaluation(EvalSpec(checkpoint, tuple(metrics), **spec_fields), progress)
