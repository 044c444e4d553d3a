"""The paper's released weights, in the format of the diffusers library, loaded into our UNet.

The authors' TensorFlow checkpoints were converted to the diffusers format and
published as google/ddpm-cifar10-32, google/ddpm-celebahq-256, google/ddpm-church-256
(and google/ddpm-ema-*-256 variants). Each is a folder holding
  config.json                                  a UNet2DModel configuration
  diffusion_pytorch_model.safetensors or .bin  its state dict
  scheduler_config.json (optional)             the noise schedule and reverse variance
either at the top level or in a unet/ (and scheduler/) subfolder, as
``DDPMPipeline.save_pretrained`` writes it.

Their network is the same network as ours (Appendix B; diffusion_tf/models/unet.py):
only the parameter names differ, and attention projections are stored as Linear
[C, C] where ours are 1x1 convolutions [C, C, 1, 1]. ``parameter_map`` is the
explicit table from our names to theirs; ``convert_state_dict`` applies it and
fails, naming the keys, if anything is left over or missing.

EMA: a diffusers folder holds one set of weights; we load it as the EMA weights, as
the paper evaluates its EMA model. google/ddpm-cifar10-32 is taken to be the EMA
release (converted official weights reach FID 3.17-3.21 only as EMA weights;
non-EMA ones give about 12-14, shared/PAPER.md). For the 256x256 models Google
publishes both google/ddpm-<name>-256 and google/ddpm-ema-<name>-256: evaluate the
-ema- ones. The files do not say which they hold; an FID far above the paper's is the
sign of non-EMA weights. ``load_diffusers_folder`` refuses ``ema=False``: there is no
second set to load.

The other direction, our checkpoints written as such a folder, is ddpm.export
(``python -m ddpm export``); it uses the same name table, inverted
(``to_diffusers_state_dict``), and the inverse config maps (``diffusers_config``,
``scheduler_config``).

Nothing here downloads anything. To evaluate the released CIFAR10 model, fetch the
folder once where there is internet, e.g.
    hf download google/ddpm-cifar10-32 --local-dir ddpm-cifar10-32
(``huggingface-cli download`` with huggingface_hub older than 0.34), or copy the
files by hand, then ``python -m ddpm eval --checkpoint ddpm-cifar10-32``.
"""

from __future__ import annotations

import copy
import json
import math
import struct
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from . import diffusion as D
from .checkpoint import CheckpointError
from .config import Config, DiffusionConfig, build_diffusion, build_model, get_preset
from .provenance import atomic_write_bytes

CONFIG_FILE = "config.json"
SCHEDULER_FILE = "scheduler_config.json"
# In order of preference: safetensors cannot run code when read, a pickled .bin can.
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")

# The base config for each released resolution (see the module docstring of config.py):
# 32x32 is the paper's CIFAR10 setup (sigma^2 = beta, "fixedlarge"); 256x256 is the
# paper's 256x256 setup (sigma^2 = beta-tilde, "fixedsmall", as the official 256 runs).
PRESET_FOR_RESOLUTION = {32: "cifar10", 256: "celebahq256"}

# UNet2DModel config values our UNet implements, as (key, required value, the value
# diffusers assumes when the key is absent from config.json; old files omit many).
REQUIRED_CONFIG = (
    ("act_fn", "silu", "silu"),
    ("norm_eps", 1e-6, 1e-5),  # the official GroupNorm epsilon
    ("time_embedding_type", "positional", "positional"),
    ("flip_sin_to_cos", False, True),  # [sin | cos], as the official code
    ("freq_shift", 1, 0),  # frequencies exp(-log(10000) i / (half - 1))
    ("center_input_sample", False, False),
    ("downsample_padding", 0, 1),  # TF 'SAME' stride-2 conv: pad bottom/right only
    ("downsample_type", "conv", "conv"),
    ("upsample_type", "conv", "conv"),
    ("mid_block_type", "UNetMidBlock2D", "UNetMidBlock2D"),
    ("mid_block_scale_factor", 1, 1),
    ("resnet_time_scale_shift", "default", "default"),
    ("attention_head_dim", None, 8),  # None: one head over all channels
    ("attn_norm_num_groups", None, None),
    ("add_attention", True, True),
    ("class_embed_type", None, None),
    ("num_class_embeds", None, None),
    ("time_embedding_dim", None, None),  # None: 4 * ch
)

# Parameter names inside one residual block: ours -> diffusers' ResnetBlock2D.
RESBLOCK_NAMES = (
    ("norm1", "norm1"),
    ("conv1", "conv1"),
    ("temb_proj", "time_emb_proj"),
    ("norm2", "norm2"),
    ("conv2", "conv2"),
    ("skip", "conv_shortcut"),  # the 1x1 "nin" projection, only where channels change
)
# ... inside one self-attention block: ours (1x1 convs) -> diffusers' Attention (Linear).
ATTN_NAMES = (
    ("norm", "group_norm"),
    ("q", "to_q"),
    ("k", "to_k"),
    ("v", "to_v"),
    ("proj_out", "to_out.0"),
)
# Files written by diffusers before 0.14 (the google/ddpm-* uploads among them) name
# the attention projections differently; diffusers itself renames them on load.
LEGACY_ATTN_NAMES = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


class OfficialWeightsError(CheckpointError):
    """A diffusers folder that is missing files or describes a network we do not implement.

    A CheckpointError, so the command line reports it as a clean one-line error."""


# ------------------------------------------------------------------------------ config


def is_diffusers_folder(path) -> bool:
    """True for a folder holding config.json (at the top or in unet/)."""
    path = Path(path)
    return path.is_dir() and ((path / CONFIG_FILE).is_file() or (path / "unet" / CONFIG_FILE).is_file())


def _unet_dir(folder: Path) -> Path:
    if (folder / CONFIG_FILE).is_file():
        return folder
    if (folder / "unet" / CONFIG_FILE).is_file():
        return folder / "unet"
    raise OfficialWeightsError(f"{folder} holds no {CONFIG_FILE} (nor unet/{CONFIG_FILE}); a diffusers "
                               f"UNet2DModel folder has {CONFIG_FILE} and {' or '.join(WEIGHT_FILES)}")


def _read_json(path: Path) -> Dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise OfficialWeightsError(f"cannot read {path} as JSON ({e})") from e


def config_from_diffusers(unet_cfg: Dict[str, Any], scheduler_cfg: Optional[Dict[str, Any]] = None,
                          source: str = CONFIG_FILE, scheduler_source: str = SCHEDULER_FILE,
                          base: Optional[Config] = None) -> Config:
    """Our Config for a diffusers UNet2DModel config (and optional DDPMScheduler config).

    The network fields come from ``unet_cfg``; training and data fields from the preset
    of its resolution (PRESET_FOR_RESOLUTION: the data fields of the 256 preset name
    CelebA-HQ; for LSUN church override data.path), or from ``base``, the full config
    that our export stores in the weights' metadata (then any resolution is fine, and
    the result must equal ``base``). The schedule, T, parameterization and reverse
    variance come from the scheduler config where there is one. Anything our UNet does
    not implement (another time embedding, multi-head attention, ...) is an error naming the key.
    """
    def bad(msg):
        return OfficialWeightsError(f"{source}: {msg}")

    if unet_cfg.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise bad(f"_class_name is {unet_cfg['_class_name']!r}; only UNet2DModel folders can be loaded")
    for key, required, default in REQUIRED_CONFIG:
        value = unet_cfg.get(key, default)
        if value != required:
            raise bad(f"{key}={value!r} is not the DDPM network (needs {required!r}); this model cannot be "
                      "loaded into ddpm.unet.UNet")

    groups = unet_cfg.get("norm_num_groups", 32)  # the paper's 32; fewer only for CPU-scale networks
    if not isinstance(groups, int) or groups < 1:
        raise bad(f"norm_num_groups={groups!r} must be a positive integer")

    resolution = unet_cfg.get("sample_size")
    if isinstance(resolution, (list, tuple)):
        if len(set(resolution)) != 1:
            raise bad(f"sample_size={resolution}: only square images are supported")
        resolution = resolution[0]
    if base is None and resolution not in PRESET_FOR_RESOLUTION:
        raise bad(f"sample_size={resolution!r}; released DDPM resolutions are "
                  f"{', '.join(map(str, PRESET_FOR_RESOLUTION))}")
    in_ch, out_ch = unet_cfg.get("in_channels", 3), unet_cfg.get("out_channels", 3)
    if out_ch != in_ch:
        raise bad(f"out_channels={out_ch} != in_channels={in_ch}: only epsilon-predicting models with "
                  "fixed variance (out = in channels) are supported")

    widths = list(unet_cfg["block_out_channels"])
    ch = widths[0]
    if any(w % ch for w in widths):
        raise bad(f"block_out_channels={widths} are not multiples of the first ({ch})")
    ch_mult = tuple(w // ch for w in widths)
    down, up = list(unet_cfg["down_block_types"]), list(unet_cfg["up_block_types"])
    if not len(down) == len(up) == len(widths):
        raise bad("down_block_types, up_block_types and block_out_channels differ in length")
    # Attention levels: diffusers names them by block type, we by resolution. The up
    # path visits the levels in reverse, and must put attention at the same ones.
    attn_resolutions = []
    for level, (d, u) in enumerate(zip(down, reversed(up))):
        if d not in ("DownBlock2D", "AttnDownBlock2D") or u not in ("UpBlock2D", "AttnUpBlock2D"):
            raise bad(f"block types {d}/{u} are not the DDPM network's")
        if (d == "AttnDownBlock2D") != (u == "AttnUpBlock2D"):
            raise bad(f"attention at level {level} on the down path but not on the up path (or vice versa)")
        if d == "AttnDownBlock2D":
            attn_resolutions.append(resolution // 2 ** level)

    cfg = get_preset(PRESET_FOR_RESOLUTION[resolution]) if base is None else copy.deepcopy(base)
    m = cfg.model
    m.ch, m.ch_mult, m.num_res_blocks = ch, ch_mult, int(unet_cfg.get("layers_per_block", 2))
    m.attn_resolutions, m.groups = tuple(attn_resolutions), groups
    cfg.data.resolution, cfg.data.channels = resolution, in_ch
    if scheduler_cfg is not None:
        _apply_scheduler(cfg, scheduler_cfg, scheduler_source)
    try:
        cfg.validate()
    except ValueError as e:
        raise bad(str(e)) from None
    if base is not None and cfg != base:
        diff = [f"{s}.{k}" for s, d in cfg.to_dict().items() for k, v in d.items() if base.to_dict()[s][k] != v]
        raise bad(f"the ddpm config stored with the weights disagrees with the diffusers configs in {', '.join(diff)}")
    return cfg


def diffusers_config(cfg: Config) -> Dict[str, Any]:
    """The inverse of config_from_diffusers for the network: UNet2DModel keyword arguments
    that build diffusers' twin of ``build_model(cfg)`` (used by ddpm.export and the speed
    benchmark)."""
    m, res = cfg.model, cfg.data.resolution
    attn_levels = [res // 2 ** level in m.attn_resolutions for level in range(len(m.ch_mult))]
    if cfg.diffusion.var_type == "learned":
        raise OfficialWeightsError("diffusers' UNet2DModel twin is defined for fixed variances only")
    kwargs = {key: value for key, value, _ in REQUIRED_CONFIG}
    kwargs.update(
        sample_size=res, in_channels=cfg.data.channels, out_channels=cfg.data.channels,
        block_out_channels=[m.ch * k for k in m.ch_mult], layers_per_block=m.num_res_blocks,
        norm_num_groups=m.groups,
        down_block_types=["AttnDownBlock2D" if a else "DownBlock2D" for a in attn_levels],
        up_block_types=["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn_levels)],
        dropout=m.dropout)
    return kwargs


# DDPMScheduler's names for ours. The publisher's scheduler_config.json says which
# reverse variance the model was released with (google/ddpm-cifar10-32: fixed_large;
# the 256 models: fixed_small). Both match ours exactly for sampling: they differ from
# ours only at index 0, where no noise is added (beta uses beta-tilde_2 there, which
# matters for the NLL only). Our learned variance has no counterpart: the network's
# extra channels are the log-variance itself, where DDPMScheduler's "learned" reads a
# variance and "learned_range" an interpolation fraction (Nichol & Dhariwal 2021).
VARIANCE_TYPES = {"fixed_large": "beta", "fixed_small": "beta_tilde"}
# prediction_type: "sample" is x_0. Predicting the posterior mean (mu) has none.
PREDICTION_TYPES = {"epsilon": "eps", "sample": "x0"}
# beta_schedule: "squaredcos_cap_v2" is Nichol & Dhariwal's cosine schedule with s = 0.008
# and betas capped at 0.999, as diffusion.cosine_betas.
SCHEDULES = {"linear": "linear", "squaredcos_cap_v2": "cosine"}


def _linear_endpoints(d: DiffusionConfig) -> Optional[Tuple[float, float]]:
    """beta_1 and beta_T of our linear schedule for ``d`` (its beta_start/beta_end are the
    endpoints for T = 1000; diffusion.linear_betas scales both by 1000/T); None for a T it rejects."""
    try:
        betas = D.make_betas("linear", d.T, d.beta_start, d.beta_end)
    except (ValueError, TypeError):
        return None
    return float(betas[0]), float(betas[-1])


def _apply_scheduler(cfg: Config, s: Dict[str, Any], source: str) -> None:
    # Defaults are DDPMScheduler's for keys an old file omits; "timesteps" is the
    # pre-0.1 name of num_train_timesteps.
    T = s.get("num_train_timesteps", s.get("timesteps", 1000))
    schedule = (s.get("beta_schedule", "linear"), s.get("beta_start", 1e-4), s.get("beta_end", 0.02))
    ours = SCHEDULES.get(schedule[0]) if s.get("trained_betas") is None else None
    if ours is None or s.get("rescale_betas_zero_snr") or not isinstance(T, int):
        raise OfficialWeightsError(
            f"{source}: schedule {schedule} with T={T} is not one of ours: linear (beta_start..beta_end, "
            "the paper's 1e-4..0.02) or cosine (squaredcos_cap_v2)")
    pred = s.get("prediction_type", "epsilon")
    if pred not in PREDICTION_TYPES:
        raise OfficialWeightsError(f"{source}: prediction_type={pred!r}; supported: "
                                   f"{', '.join(PREDICTION_TYPES)} (eps and x0 prediction)")
    var = s.get("variance_type", "fixed_small")
    if var not in VARIANCE_TYPES:
        raise OfficialWeightsError(f"{source}: variance_type={var!r}; supported: {', '.join(VARIANCE_TYPES)}")
    d = cfg.diffusion
    d.T, d.schedule, d.mean_type, d.var_type = T, ours, PREDICTION_TYPES[pred], VARIANCE_TYPES[var]
    if ours == "linear":
        # The file holds beta_1 and beta_T; our config the endpoints for T = 1000. Keep the
        # config's own values where they give the file's (exact: no rounding through 1000/T).
        ends = _linear_endpoints(d)
        if not (ends and all(math.isclose(a, b, rel_tol=1e-9) for a, b in zip(schedule[1:], ends))):
            d.beta_start, d.beta_end = schedule[1] * T / 1000, schedule[2] * T / 1000
    else:
        d.beta_start, d.beta_end = DiffusionConfig().beta_start, DiffusionConfig().beta_end  # unused by cosine


def scheduler_config(cfg: Config) -> Dict[str, Any]:
    """The inverse of _apply_scheduler: the DDPMScheduler config (scheduler_config.json)
    that samples as ``build_diffusion(cfg)`` does, or OfficialWeightsError saying why
    DDPMScheduler cannot express ``cfg``."""
    d = cfg.diffusion
    if d.var_type not in VARIANCE_TYPES.values():
        raise OfficialWeightsError(
            f"diffusers' DDPMScheduler cannot express diffusion.var_type={d.var_type!r}: our network outputs "
            "the log-variance itself, its 'learned' reads a variance and 'learned_range' an interpolation "
            "fraction; export --format safetensors instead")
    if d.mean_type not in PREDICTION_TYPES.values():
        raise OfficialWeightsError(
            f"diffusers' DDPMScheduler cannot express diffusion.mean_type={d.mean_type!r} (the network predicts "
            "the posterior mean); its prediction types are epsilon, sample (x0) and v_prediction; export "
            "--format safetensors instead")
    inverse = {ours: theirs for table in (VARIANCE_TYPES, PREDICTION_TYPES, SCHEDULES)
               for theirs, ours in table.items()}
    # DDPMScheduler's linear schedule is linspace(beta_start, beta_end, T): our beta_1 and beta_T.
    beta_start, beta_end = _linear_endpoints(d) if d.schedule == "linear" else (d.beta_start, d.beta_end)
    return {"_class_name": "DDPMScheduler", "num_train_timesteps": d.T, "beta_schedule": inverse[d.schedule],
            "beta_start": beta_start, "beta_end": beta_end, "trained_betas": None,
            "variance_type": inverse[d.var_type], "prediction_type": inverse[d.mean_type],
            # our sampler clips the predicted x_0 to [-1, 1] (sampling.py), as the official code
            "clip_sample": True, "clip_sample_range": 1.0, "thresholding": False,
            "timestep_spacing": "leading", "steps_offset": 0, "rescale_betas_zero_snr": False}


# ---------------------------------------------------------------------- the name map


def parameter_map(cfg: Config) -> List[Tuple[str, str]]:
    """[(our module name, diffusers module name)] for every module with parameters.

    It walks the levels in the order our UNet's constructor builds them:
      ours  down.{k}        : per level, num_res_blocks entries [ResBlock, (AttnBlock)], then [Downsample]
      ours  up.{k}          : per level in reverse, num_res_blocks + 1 entries, then [Upsample]
      theirs down_blocks.{level}.resnets.{i} / .attentions.{i} / .downsamplers.0
      theirs up_blocks.{reversed level}.resnets.{i} / .attentions.{i} / .upsamplers.0
    Each module pair stands for its .weight and .bias.
    """
    m = cfg.model
    n_levels = len(m.ch_mult)
    pairs = [("temb.0", "time_embedding.linear_1"), ("temb.2", "time_embedding.linear_2"),
             ("conv_in", "conv_in")]

    def block(ours: str, theirs: str, has_skip: bool, attn: Optional[Tuple[str, str]]):
        pairs.extend((f"{ours}.{a}", f"{theirs}.{b}") for a, b in RESBLOCK_NAMES if has_skip or a != "skip")
        if attn:
            pairs.extend((f"{attn[0]}.{a}", f"{attn[1]}.{b}") for a, b in ATTN_NAMES)

    k, res, cur = 0, cfg.data.resolution, m.ch
    skip_chs = [m.ch]
    for level, mult in enumerate(m.ch_mult):
        has_attn = res in m.attn_resolutions
        for i in range(m.num_res_blocks):
            block(f"down.{k}.0", f"down_blocks.{level}.resnets.{i}", cur != m.ch * mult,
                  (f"down.{k}.1", f"down_blocks.{level}.attentions.{i}") if has_attn else None)
            cur = m.ch * mult
            skip_chs.append(cur)
            k += 1
        if level != n_levels - 1:
            pairs.append((f"down.{k}.0.conv", f"down_blocks.{level}.downsamplers.0.conv"))
            skip_chs.append(cur)
            k, res = k + 1, res // 2

    block("mid.0", "mid_block.resnets.0", False, ("mid.1", "mid_block.attentions.0"))
    block("mid.2", "mid_block.resnets.1", False, None)

    k = 0
    for up_index, (level, mult) in enumerate(reversed(list(enumerate(m.ch_mult)))):
        has_attn = res in m.attn_resolutions
        for i in range(m.num_res_blocks + 1):
            # Every up block concatenates a skip, so its input width always differs.
            in_ch = cur + skip_chs.pop()
            block(f"up.{k}.0", f"up_blocks.{up_index}.resnets.{i}", in_ch != m.ch * mult,
                  (f"up.{k}.1", f"up_blocks.{up_index}.attentions.{i}") if has_attn else None)
            cur = m.ch * mult
            k += 1
        if level != 0:
            pairs.append((f"up.{k}.0.conv", f"up_blocks.{up_index}.upsamplers.0.conv"))
            k, res = k + 1, res * 2

    pairs += [("norm_out", "conv_norm_out"), ("conv_out", "conv_out")]
    return pairs


def _with_legacy_names(theirs: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Rename pre-0.14 attention keys (query/key/value/proj_attn) to the current names."""
    legacy = {old: new for new, old in LEGACY_ATTN_NAMES.items()}
    out = {}
    for key, value in theirs.items():
        module, _, leaf = key.rpartition(".")
        parent, _, name = module.rpartition(".")
        if ".attentions." in key and name in legacy:
            key = f"{parent}.{legacy[name]}.{leaf}"
        out[key] = value
    return out


def convert_state_dict(theirs: Dict[str, torch.Tensor], cfg: Config) -> Dict[str, torch.Tensor]:
    """A diffusers UNet2DModel state dict -> our UNet's, through ``parameter_map``.

    Every diffusers key must be used exactly once and every one of ours filled;
    otherwise an OfficialWeightsError lists what is left over or missing.
    """
    theirs = _with_legacy_names(theirs)
    ours, used = {}, set()
    for our_module, their_module in parameter_map(cfg):
        for leaf in ("weight", "bias"):
            src = f"{their_module}.{leaf}"
            if src not in theirs:
                raise OfficialWeightsError(f"diffusers weights lack {src} (needed for our {our_module}.{leaf})")
            ours[f"{our_module}.{leaf}"] = theirs[src]
            used.add(src)
    extra = sorted(set(theirs) - used)
    if extra:
        raise OfficialWeightsError(f"diffusers weights hold {len(extra)} keys our UNet has no place for, "
                                   f"e.g. {extra[:5]}")
    return ours


def load_converted(model: torch.nn.Module, ours: Dict[str, torch.Tensor]) -> torch.nn.Module:
    """Copy converted weights into ``model``, reshaping Linear [C, C] to 1x1 conv [C, C, 1, 1]."""
    target = model.state_dict()
    if set(target) != set(ours):
        missing, extra = sorted(set(target) - set(ours)), sorted(set(ours) - set(target))
        raise OfficialWeightsError(f"name map does not fit the model: missing {missing[:5]}, extra {extra[:5]}")
    fitted = {}
    for name, value in ours.items():
        shape = target[name].shape
        if value.shape != shape:
            if value.numel() != target[name].numel() or len(shape) != 4 or shape[2:] != (1, 1):
                raise OfficialWeightsError(f"{name}: diffusers shape {tuple(value.shape)} does not fit ours "
                                           f"{tuple(shape)}; the config and the weights disagree")
            value = value.reshape(shape)  # attention projection: Linear -> 1x1 conv
        fitted[name] = value
    model.load_state_dict(fitted)
    return model


def to_diffusers_state_dict(ours: Dict[str, torch.Tensor], cfg: Config) -> Dict[str, torch.Tensor]:
    """The inverse map: our UNet's state dict under diffusers' names (for export and tests)."""
    theirs = {}
    for our_module, their_module in parameter_map(cfg):
        for leaf in ("weight", "bias"):
            value = ours[f"{our_module}.{leaf}"]
            if ".attentions." in their_module and value.ndim == 4:
                value = value.reshape(value.shape[:2])  # 1x1 conv -> Linear
            theirs[f"{their_module}.{leaf}"] = value
    return theirs


# ----------------------------------------------------------------------------- files

# safetensors layout (github.com/huggingface/safetensors, "Format"): an 8-byte
# little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets}},
# then the raw little-endian tensor bytes. Read here so that loading needs only torch.
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                      "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32}


def read_safetensors(path, with_metadata: bool = False):
    """{name: tensor} from a safetensors file; with ``with_metadata``, also its header's
    __metadata__ ({str: str}, {} when absent)."""
    path = Path(path)
    data = path.read_bytes()
    try:
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + n])
    except (struct.error, ValueError) as e:
        raise OfficialWeightsError(f"{path} is not a safetensors file ({e})") from e
    body = memoryview(data)[8 + n:]
    metadata = header.get("__metadata__") or {}
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in SAFETENSORS_DTYPES:
            raise OfficialWeightsError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        if end > len(body):
            raise OfficialWeightsError(f"{path} is truncated (tensor {name} ends past the file); download it again")
        dtype = SAFETENSORS_DTYPES[info["dtype"]]
        flat = torch.frombuffer(bytearray(body[begin:end]), dtype=dtype) if end > begin else torch.empty(0, dtype=dtype)
        out[name] = flat.reshape(info["shape"])
    return (out, metadata) if with_metadata else out


def write_safetensors(path, tensors: Dict[str, torch.Tensor], metadata: Optional[Dict[str, str]] = None) -> None:
    """Write ``tensors`` as a safetensors file (atomically), with ``metadata`` ({str: str})
    in the header: the inverse of read_safetensors, needing only torch. The header is
    padded with spaces to a multiple of 8 bytes, as the safetensors package writes it."""
    names = {v: k for k, v in SAFETENSORS_DTYPES.items()}
    header: Dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    blobs, offset = [], 0
    for name in sorted(tensors):
        value = tensors[name].detach().cpu().contiguous()
        if value.dtype not in names:
            raise OfficialWeightsError(f"tensor {name} has dtype {value.dtype}, which this writer does not cover")
        blob = value.reshape(-1).view(torch.uint8).numpy().tobytes()  # little-endian on every torch platform
        header[name] = {"dtype": names[value.dtype], "shape": list(value.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    head += b" " * (-len(head) % 8)

    def write(f):
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for blob in blobs:
            f.write(blob)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, write)


def read_diffusers_weights(unet_dir: Path, with_metadata: bool = False):
    """({name: tensor}, the file read) from a diffusers UNet folder, safetensors preferred;
    with ``with_metadata``, also the safetensors metadata ({} for a .bin)."""
    for name in WEIGHT_FILES:
        path = unet_dir / name
        if path.is_file():
            if name.endswith(".safetensors"):
                weights, metadata = read_safetensors(path, with_metadata=True)
                return (weights, path, metadata) if with_metadata else (weights, path)
            try:
                weights = torch.load(path, map_location="cpu", weights_only=True)
                return (weights, path, {}) if with_metadata else (weights, path)
            except Exception as e:
                raise OfficialWeightsError(f"cannot read {path} ({type(e).__name__}: {e}); download it again") from e
    raise OfficialWeightsError(f"{unet_dir} holds {CONFIG_FILE} but none of {', '.join(WEIGHT_FILES)}")


def _scheduler_config(folder: Path, unet_dir: Path) -> Tuple[Optional[Dict[str, Any]], str]:
    for path in (unet_dir / SCHEDULER_FILE, folder / "scheduler" / SCHEDULER_FILE, folder / SCHEDULER_FILE):
        if path.is_file():
            return _read_json(path), str(path)
    return None, ""


def load_diffusers_folder(folder, ema: bool = True, map_location="cpu"):
    """(config, our UNet in eval mode, GaussianDiffusion, state) from a diffusers folder.

    Same contract as ddpm.loading.load_model, which calls it for a folder (the model is
    built on the CPU; ``map_location`` is accepted for that signature and unused). ``state`` mimics a
    checkpoint dict: format "diffusers-folder", config, step -1 (the files do not
    record the training step; -1 is what ddpm.evaluate writes for "unknown"), ema (our
    state dict), plus source, weights_file, scheduler_file and diffusers_config.

    A folder written by ``python -m ddpm export`` (ddpm.export) carries our full config,
    the step and which weights it holds (EMA or raw) in the safetensors metadata: those
    are used, so such a folder loads back as the checkpoint it came from.
    """
    folder = Path(folder)
    unet_dir = _unet_dir(folder)
    unet_cfg = _read_json(unet_dir / CONFIG_FILE)
    scheduler_cfg, scheduler_file = _scheduler_config(folder, unet_dir)
    theirs, weights_file, meta = read_diffusers_weights(unet_dir, with_metadata=True)
    base = Config.from_dict(json.loads(meta["ddpm_config"])) if "ddpm_config" in meta else None
    holds = meta.get("ddpm_weights", "ema")
    if ema != (holds == "ema"):
        raise OfficialWeightsError(
            f"{folder} is a diffusers folder with one set of weights, the "
            + ("released (EMA) ones; there are no raw weights to load with ema=False (--no-ema)" if not ema
               else "raw (non-EMA) ones, exported with --no-ema; load them with ema=False (--no-ema)"))
    cfg = config_from_diffusers(unet_cfg, scheduler_cfg, str(unet_dir / CONFIG_FILE), scheduler_file, base=base)
    ours = convert_state_dict(theirs, cfg)
    model = load_converted(build_model(cfg), ours)
    state = {"format": "diffusers-folder", "config": cfg.to_dict(), "step": int(meta.get("ddpm_step", -1)),
             "ema" if ema else "model": model.state_dict(), "source": str(folder),
             "weights_file": str(weights_file), "scheduler_file": scheduler_file, "diffusers_config": unet_cfg}
    return cfg, model.eval(), build_diffusion(cfg), state
