"""Typed configuration: four dataclasses, defaults in exactly one place, named presets.

The defaults below ARE the paper's CIFAR10 setup (../shared/PAPER.md, "Official
setup"); every other preset is a set of overrides on top of them. Overrides use
dotted keys, ``diffusion.var_type=beta_tilde``; unknown keys, ill-typed values and
invalid ablation combinations are errors that name the valid choices (ConfigError,
raised when the config is built, so that ``train --dry-run`` rejects whatever training
would reject).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Dict, Tuple, get_type_hints

from . import diffusion as D


class ConfigError(ValueError, KeyError):
    """A config that cannot be built or run (unknown key, ill-typed or out-of-range value,
    meaningless combination); the message says why. A ValueError, and a KeyError for unknown
    keys and presets, as before; printed as is (no KeyError quotes)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


@dataclass
class DataConfig:
    dataset: str = "cifar10"  # mnist | cifar10 | folder (any folder of images, e.g. CelebA-HQ)
    path: str = ""  # for dataset=folder: the folder (absolute, or relative to the data dir)
    test_path: str = ""  # for dataset=folder: held-out images for test-set NLL ("" = none)
    subset: str = ""  # for dataset=cifar10: "" (all of it) or a named subset of it (data.CIFAR10_SUBSETS)
    resolution: int = 32  # images are resized/center-cropped to this (folder datasets)
    channels: int = 3
    hflip: bool = True  # random horizontal flips (CIFAR10, CelebA-HQ; not MNIST)
    num_workers: int = 2
    # Keep the whole uint8 training set on the training device and gather each batch there by
    # index (the same images in the same order as without): no loader, no host-to-device copy of
    # images per step. For sets held in memory (CIFAR10 is 150 MB); on a CPU the same as without.
    on_device: bool = False


@dataclass
class ModelConfig:
    ch: int = 128
    ch_mult: Tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: Tuple[int, ...] = (16,)
    dropout: float = 0.1
    groups: int = 32  # GroupNorm groups (the paper's 32; fewer for networks narrower than 32 channels)


@dataclass
class DiffusionConfig:
    T: int = 1000
    schedule: D.Schedule = D.Schedule.LINEAR  # linear | cosine
    mean_type: D.MeanType = D.MeanType.EPS  # eps | mu | x0
    var_type: D.VarType = D.VarType.BETA  # beta (fixedlarge) | beta_tilde (fixedsmall) | learned
    loss_type: D.LossType = D.LossType.SIMPLE  # simple | mu_mse | vlb
    # The linear schedule's endpoints for T = 1000 (Sec. 4); for another T both scale by 1000/T
    # (diffusion.linear_betas). Not used by the cosine schedule.
    beta_start: float = 1e-4
    beta_end: float = 0.02


@dataclass
class TrainConfig:
    steps: int = 800_000
    batch_size: int = 128  # global batch, split over DDP ranks
    lr: float = 2e-4
    warmup: int = 5000  # linear learning-rate warm-up steps
    grad_clip: float = 1.0  # gradient-norm clipping; 0 = no clipping
    adam_eps: float = 1e-8
    ema_decay: float = 0.9999
    seed: int = 0
    log_every: int = 100
    sample_every: int = 10_000
    ckpt_every: int = 10_000
    bf16: bool = False  # bf16 autocast
    # The network, its optimizer state and each batch in channels_last memory format (faster
    # convolutions on GPUs with tensor cores, with bf16 most of all); the same numbers up to float
    # rounding (dropout masks are drawn in memory order: with dropout, the same in distribution).
    # Checkpoints stay in the ordinary (contiguous) format.
    channels_last: bool = False
    compile: bool = False  # torch.compile the network
    # Gradient accumulation: each rank runs its share of the batch in pieces of this many
    # images, one optimizer step per global batch (the same update up to float rounding, less
    # activation memory). 0, or at least the per-rank batch: the whole per-rank batch at once.
    microbatch: int = 0


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> "Config":
        """``self`` if it can be built and trained, else ConfigError saying why."""
        try:
            self._validate()
        except ConfigError:
            raise
        except ValueError as e:  # from the diffusion module's enums and schedules
            raise ConfigError(str(e)) from None
        return self

    def _validate(self) -> None:
        d = self.diffusion
        for f in dataclasses.fields(d):  # the one coercion rule, also for configs built in code
            typ = get_type_hints(type(d))[f.name]
            if isinstance(typ, type) and issubclass(typ, D.Choice):
                setattr(d, f.name, typ.parse(getattr(d, f.name)))
        D.check_combination(d.mean_type, d.var_type, d.loss_type)
        self._check_values()
        D.make_betas(d.schedule, d.T, d.beta_start, d.beta_end)  # rejects a T the schedule cannot take
        if self.data.dataset not in DATASETS:
            raise ValueError(f"unknown data.dataset {self.data.dataset!r}; valid: {', '.join(DATASETS)}")
        if self.data.dataset == "folder" and not self.data.path:
            raise ValueError("data.dataset='folder' needs data.path (a folder of images)")
        if self.data.subset:
            from .data import CIFAR10_SUBSETS

            if self.data.dataset != "cifar10" or self.data.subset not in CIFAR10_SUBSETS:
                raise ValueError(f"data.subset={self.data.subset!r}: subsets exist for data.dataset=cifar10 "
                                 f"only, named {', '.join(CIFAR10_SUBSETS)}")
        for name in ("steps", "batch_size"):
            if getattr(self.train, name) < 1:
                raise ValueError(f"train.{name} must be positive")
        if not 0.0 <= self.train.ema_decay < 1.0:
            raise ValueError("train.ema_decay must be in [0, 1)")
        mb, batch = self.train.microbatch, self.train.batch_size
        if mb < 0 or (0 < mb < batch and batch % mb):
            raise ValueError(f"train.microbatch={mb} must divide train.batch_size={batch} (the images per "
                             "forward/backward pass on each process; 0: the whole per-process batch at once)")

    def _check_values(self) -> None:
        """Ranges of single fields, and the model's fit to the data: everything training or
        building the network would reject later (with a traceback, or silently wrong)."""
        for f in dataclasses.fields(self):
            for key, value in dataclasses.asdict(getattr(self, f.name)).items():
                if isinstance(value, float) and not math.isfinite(value):
                    raise ConfigError(f"{f.name}.{key}={value} is not a finite number")
        d, m, t, data = self.diffusion, self.model, self.train, self.data

        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)

        need(t.lr > 0, f"train.lr={t.lr} must be positive")
        need(t.adam_eps > 0, f"train.adam_eps={t.adam_eps} must be positive")
        need(t.grad_clip >= 0, f"train.grad_clip={t.grad_clip} must be positive (the largest gradient "
                               "norm), or 0 for no clipping")
        need(t.warmup >= 0, f"train.warmup={t.warmup} must be >= 0 (0: no warm-up)")
        need(t.seed >= 0, f"train.seed={t.seed} must be >= 0")
        for name in ("log_every", "sample_every", "ckpt_every"):
            need(getattr(t, name) >= 1, f"train.{name}={getattr(t, name)} must be >= 1 (steps)")
        need(m.groups >= 1, f"model.groups={m.groups} must be positive (GroupNorm groups; the paper's 32)")
        need(m.ch >= 1 and m.ch % m.groups == 0, f"model.ch={m.ch} must be a positive multiple of "
                                                 f"model.groups={m.groups} (the UNet's GroupNorm groups)")
        need(len(m.ch_mult) >= 1 and all(k >= 1 for k in m.ch_mult),
             f"model.ch_mult={m.ch_mult} must be one or more positive multipliers, one per resolution level")
        need(m.num_res_blocks >= 0, f"model.num_res_blocks={m.num_res_blocks} must be >= 0")
        need(0.0 <= m.dropout < 1.0, f"model.dropout={m.dropout} must be in [0, 1)")
        need(data.resolution >= 1, f"data.resolution={data.resolution} must be positive")
        need(data.channels in (1, 3), f"data.channels={data.channels} must be 1 (grayscale) or 3 (RGB)")
        need(data.num_workers >= 0, f"data.num_workers={data.num_workers} must be >= 0")
        for key, value in (("train.bf16", t.bf16), ("train.channels_last", t.channels_last),
                           ("train.compile", t.compile), ("data.on_device", data.on_device)):
            need(isinstance(value, bool), f"{key}={value!r} must be true or false")
        native = {"mnist": (1, 28), "cifar10": (3, 32)}.get(data.dataset)
        need(native is None or (data.channels, data.resolution) == native,
             f"data.dataset={data.dataset} is {native and native[0]} channel(s) at "
             f"{native and native[1]}x{native and native[1]}; the config asks for data.channels="
             f"{data.channels}, data.resolution={data.resolution}")
        n_down = len(m.ch_mult) - 1
        need(data.resolution % (2 ** n_down) == 0,
             f"data.resolution={data.resolution} must be divisible by 2**{n_down} for model.ch_mult={m.ch_mult}")
        levels = [data.resolution // 2 ** i for i in range(len(m.ch_mult))]
        stray = [r for r in m.attn_resolutions if r not in levels]
        need(not stray, f"model.attn_resolutions={m.attn_resolutions}: {stray} match no resolution level "
                        f"of the UNet (levels: {levels})")
        need(0 < d.beta_start < d.beta_end < 1, f"diffusion.beta_start={d.beta_start}, beta_end={d.beta_end}: "
                                                "need 0 < beta_start < beta_end < 1")
        defaults = DiffusionConfig()
        need(d.schedule == D.Schedule.LINEAR.value
             or (d.beta_start, d.beta_end) == (defaults.beta_start, defaults.beta_end),
             f"diffusion.beta_start/beta_end set the linear schedule; schedule={d.schedule!r} does not use them")

    def to_dict(self) -> Dict[str, Any]:
        """Plain values only (choices as their names): what checkpoints and JSON files hold."""
        return dataclasses.asdict(self, dict_factory=lambda kv: {k: v.value if isinstance(v, D.Choice) else v
                                                                 for k, v in kv})

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "Config":
        cfg = cls()
        if not isinstance(d, dict) or not all(isinstance(v, dict) for v in d.values()):
            raise ConfigError("not a ddpm config: expected an object of sections "
                              f"({', '.join(f.name for f in dataclasses.fields(cls))}) holding fields")
        for section, values in d.items():
            for key, value in values.items():
                _set(cfg, f"{section}.{key}", value)
        return cfg.validate()

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


DATASETS = ("mnist", "cifar10", "folder")


# ---------------------------------------------------------------------------- building


def build_diffusion(cfg: Config) -> D.GaussianDiffusion:
    d = cfg.diffusion
    return D.GaussianDiffusion(D.make_betas(d.schedule, d.T, d.beta_start, d.beta_end), d.mean_type,
                               d.var_type, d.loss_type)


def build_model(cfg: Config):
    from .unet import UNet

    m, c = cfg.model, cfg.data.channels
    out_ch = 2 * c if cfg.diffusion.var_type == D.VarType.LEARNED.value else c
    return UNet(in_ch=c, out_ch=out_ch, ch=m.ch, ch_mult=m.ch_mult, num_res_blocks=m.num_res_blocks,
                attn_resolutions=m.attn_resolutions, dropout=m.dropout, resolution=cfg.data.resolution,
                groups=m.groups)


# --------------------------------------------------------------------------- overrides


def _coerce(value: Any, typ, key: str):
    """Convert ``value`` (a string from the command line, or a JSON value) to ``typ``."""
    def bad():
        return ConfigError(f"{key}: cannot read {value!r} as {getattr(typ, '__name__', typ)}")

    origin = getattr(typ, "__origin__", None)
    if origin in (tuple, Tuple):
        if isinstance(value, str):
            parts = [p for p in value.strip("()[] ").split(",") if p.strip()]
        elif isinstance(value, (list, tuple)):
            parts = list(value)
        else:
            raise bad()
        return tuple(_coerce(p, int, key) for p in parts)
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no"):
            return False
        raise bad()
    if typ is int:
        if isinstance(value, bool):
            raise bad()
        if isinstance(value, int):
            return value
        try:
            f = float(str(value).replace("_", ""))
        except ValueError:
            raise bad() from None
        if f != int(f):
            raise bad()
        return int(f)
    if typ is float:
        if isinstance(value, bool):
            raise bad()
        try:
            return float(value)
        except (TypeError, ValueError):
            raise bad() from None
    if isinstance(typ, type) and issubclass(typ, D.Choice):  # an ablation axis: one of its named values
        try:
            return typ.parse(value)
        except ValueError as e:
            raise ConfigError(f"{key}: {e}") from None
    if typ is str:
        if not isinstance(value, str):
            raise bad()
        return value
    raise TypeError(f"unsupported config type {typ} for {key}")


def _set(cfg: Config, key: str, value: Any) -> None:
    parts = key.split(".")
    sections = {f.name: f for f in dataclasses.fields(cfg)}
    if len(parts) != 2 or parts[0] not in sections:
        raise ConfigError(f"unknown config key {key!r}; keys look like section.name with section in "
                       f"{', '.join(sections)}")
    section = getattr(cfg, parts[0])
    hints = get_type_hints(type(section))
    if parts[1] not in hints:
        raise ConfigError(f"unknown config key {key!r}; valid keys in {parts[0]}: "
                       f"{', '.join(f.name for f in dataclasses.fields(section))}")
    setattr(section, parts[1], _coerce(value, hints[parts[1]], key))


def apply_overrides(cfg: Config, overrides) -> Config:
    """Apply ``["section.key=value", ...]`` (or a dict) and validate."""
    items = overrides.items() if isinstance(overrides, dict) else (_split(o) for o in overrides)
    for key, value in items:
        _set(cfg, key, value)
    return cfg.validate()


def _split(override: str):
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like section.key=value")
    key, value = override.split("=", 1)
    return key.strip(), value.strip()


# ----------------------------------------------------------------------------- presets

# The quick profile's MNIST recipe, chosen by measurement on this machine (results/quick/
# recipe_search.md): ch 16 with GroupNorm(8), 4x the network evaluations per second of ch 32.
_QUICK_GRID: Dict[str, Any] = {
    "data.dataset": "mnist", "data.resolution": 28, "data.channels": 1, "data.hflip": False,
    "data.num_workers": 0, "model.ch": 16, "model.groups": 8, "model.ch_mult": (1, 2, 2),
    "model.num_res_blocks": 1, "model.attn_resolutions": (7,), "train.steps": 1407,
    "train.batch_size": 128, "train.lr": 1e-3, "train.warmup": 100, "train.ema_decay": 0.995,
    "train.log_every": 25, "train.sample_every": 100_000, "train.ckpt_every": 200, "train.bf16": True}

# Each preset: (one-line description, overrides on the defaults above).
PRESETS: Dict[str, Tuple[str, Dict[str, Any]]] = {
    "cifar10": ("The paper's CIFAR10 setup (35.7M params, 800k steps); needs GPUs.", {}),
    "celebahq256": (
        "The paper's 256x256 setup (about 114M params) on a folder of CelebA-HQ images; needs GPUs. "
        "Steps from the paper's appendix (0.5M); sigma^2 = beta-tilde as the official 256x256 runs. "
        "Batch 64 needs about 126 GiB of activations in fp32 (2.0 GiB per image, computed by "
        "experiments/activation_memory.py): train.microbatch 8 fits a 40 GB GPU (16 fits 80 GB); "
        "the same update up to float rounding.",
        {"data.dataset": "folder", "data.path": "celebahq256", "data.resolution": 256,
         "model.ch_mult": (1, 1, 2, 2, 4, 4), "model.dropout": 0.0,
         "diffusion.var_type": "beta_tilde",
         "train.lr": 2e-5, "train.batch_size": 64, "train.steps": 500_000, "train.microbatch": 8},
    ),
    "mnist": (
        "The seed report's setting: MNIST (1 channel, 28x28, no flips), 10 epochs at batch 128.",
        {"data.dataset": "mnist", "data.resolution": 28, "data.channels": 1, "data.hflip": False,
         "model.ch": 64, "model.ch_mult": (1, 2, 2), "model.attn_resolutions": (14,),
         "train.steps": 4690, "train.warmup": 500, "train.ema_decay": 0.999,
         "train.sample_every": 1000, "train.ckpt_every": 1000},
    ),
    # The scaled profiles of the reproduction (experiments/registry.py names them): everything a
    # run of that profile trains with, in one place. quick: a 2-core CPU; smoke: seconds, for CI.
    "quick-grid": (
        "The quick profile's ablation grid (Tables 1-2, variance, rate-distortion; 2-core CPU) on MNIST: "
        "28x28, 0.28M-param UNet (ch 16, GroupNorm(8), (1, 2, 2), attention at 7x7), T=1000, 3 epochs "
        "(1407 steps) at batch 128, lr 1e-3, EMA 0.995, bf16 autocast.",
        _QUICK_GRID,
    ),
    "quick-mnist": (
        "The quick profile's seed-report run (2-core CPU): the quick-grid network and recipe for 10 epochs "
        "(4690 steps at batch 128).",
        {**_QUICK_GRID, "train.steps": 4690, "train.log_every": 50, "train.ckpt_every": 500},
    ),
    "quick-cifar10": (
        "The quick profile's CIFAR10-subset run, for Figs. 5-8 on natural images (2-core CPU): 32x32 RGB, "
        "1.5M-param UNet (ch 32), T=1000, 650 steps (10 epochs of the subset) at batch 64, lr 1e-3, EMA 0.995, "
        "bf16 autocast, on the CIFAR10 subset 'partial' (training images 0..3999; for the test bound the "
        "4,000 test images of 4 classes), read from torchvision's CIFAR10 or its PNG export.",
        {"data.dataset": "cifar10", "data.subset": "partial", "data.num_workers": 0,
         "model.ch": 32, "model.num_res_blocks": 1, "train.steps": 650, "train.batch_size": 64,
         "train.lr": 1e-3, "train.warmup": 100, "train.ema_decay": 0.995, "train.log_every": 25,
         "train.sample_every": 100_000, "train.ckpt_every": 100, "train.bf16": True},
    ),
    "smoke-mnist": (
        "The smoke profile's MNIST runs (CI, seconds): a tiny UNet, T=40, 4 steps at batch 8.",
        {"data.dataset": "mnist", "data.resolution": 28, "data.channels": 1, "data.hflip": False,
         "data.num_workers": 0, "model.ch": 32, "model.ch_mult": (1, 2), "model.num_res_blocks": 1,
         "model.attn_resolutions": (), "diffusion.T": 40, "train.steps": 4, "train.batch_size": 8,
         "train.warmup": 2, "train.ema_decay": 0.5, "train.log_every": 1, "train.sample_every": 4,
         "train.ckpt_every": 2},
    ),
    "smoke-cifar10": (
        "The smoke profile's CIFAR10 runs (CI, seconds): the CIFAR10 subset 'partial', a tiny UNet, "
        "T=40, 4 steps at batch 8.",
        {"data.dataset": "cifar10", "data.subset": "partial", "data.num_workers": 0,
         "model.ch": 32, "model.ch_mult": (1, 2), "model.num_res_blocks": 1, "model.attn_resolutions": (),
         "diffusion.T": 40, "train.steps": 4, "train.batch_size": 8, "train.warmup": 2,
         "train.ema_decay": 0.5, "train.log_every": 1, "train.sample_every": 4, "train.ckpt_every": 2},
    ),
    "tiny": (
        "Tiny and fast, for tests: MNIST, a 0.65M-param UNet, T=100, 20 steps.",
        {"data.dataset": "mnist", "data.resolution": 28, "data.channels": 1, "data.hflip": False,
         "data.num_workers": 0, "model.ch": 32, "model.ch_mult": (1, 2), "model.num_res_blocks": 1,
         "model.attn_resolutions": (), "diffusion.T": 100, "train.steps": 20,
         "train.batch_size": 16, "train.warmup": 5, "train.ema_decay": 0.9, "train.log_every": 5,
         "train.sample_every": 10, "train.ckpt_every": 10},
    ),
}


def get_preset(name: str, overrides=()) -> Config:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; valid: {', '.join(PRESETS)}")
    cfg = apply_overrides(Config(), PRESETS[name][1])
    return apply_overrides(cfg, overrides)
