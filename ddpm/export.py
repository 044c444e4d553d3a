"""Export a trained model to formats other tools read without this project's code.

    python -m ddpm export --checkpoint RUN/final.pt --format diffusers --out DIR [--no-ema]
    python -m ddpm export --checkpoint RUN/final.pt --format safetensors --out FILE.safetensors [--no-ema]

``diffusers`` writes DIR in the flat layout of the released google/ddpm-cifar10-32:
  config.json                          UNet2DModel config (official.diffusers_config)
  diffusion_pytorch_model.safetensors  the weights under diffusers' names: official's name
                                       table, inverted (official.to_diffusers_state_dict)
  scheduler_config.json                DDPMScheduler config: the run's schedule, T,
                                       parameterization and reverse variance (official.scheduler_config)
  model_index.json                     DDPMPipeline = that UNet2DModel + that DDPMScheduler
so that ``UNet2DModel.from_pretrained(DIR)``, ``DDPMScheduler.from_pretrained(DIR)`` and
``DDPMPipeline.from_pretrained(DIR)`` load it (a local folder: nothing is downloaded),
and ``--checkpoint DIR`` loads it back here. DDPMScheduler samples as our sampler does
(Algorithm 2, x_0 clipped to [-1, 1], no noise at the last step) up to float32
rounding: it computes the schedule in float32, ours in float64. What it cannot express
is an error with the reason, before anything is written: a learned variance (our
network outputs the log-variance itself; DDPMScheduler's "learned" reads a variance,
"learned_range" an interpolation fraction) and mu (posterior-mean) prediction. The
cosine schedule (squaredcos_cap_v2), both fixed variances (fixed_large, fixed_small),
eps (epsilon) and x0 (sample) prediction and any T are expressed exactly.

``safetensors`` writes one file holding our state dict under our names; it exports
every configuration.

Either way the weights are the EMA ones unless ``--no-ema``, and the safetensors header
carries, as string metadata: ddpm_format ("ddpm-export-v1"), ddpm_config (the resolved
config as JSON), ddpm_step, ddpm_weights ("ema" or "raw"), ddpm_names ("diffusers" or
"ddpm") and ddpm_commit. Safetensors files hold tensors and a JSON header only: reading
one cannot run code. ddpm.loading reads both back (``load_model``), so that an export is a
``--checkpoint`` here too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List

from . import official as O
from .checkpoint import CheckpointError
from .config import Config
from .loading import EXPORT_FORMAT, load_model
from .provenance import atomic_write_text, git_commit

FORMATS = ("diffusers", "safetensors")
MODEL_INDEX = "model_index.json"


class ExportError(CheckpointError):
    """A model that cannot be exported as asked; one line, exit code 2 on the command line."""


def _metadata(cfg: Config, state: Dict[str, Any], ema: bool, names: str) -> Dict[str, str]:
    return {"format": "pt",  # what diffusers' and transformers' safetensors files say
            "ddpm_format": EXPORT_FORMAT, "ddpm_config": json.dumps(cfg.to_dict()),
            "ddpm_step": str(int(state.get("step", -1))), "ddpm_weights": "ema" if ema else "raw",
            "ddpm_names": names, "ddpm_commit": git_commit()}


def _notes(cfg: Config) -> List[str]:
    notes = ["DDPMScheduler computes the noise schedule in float32 (ours: float64): its samples match ours "
             "to float32 rounding, not bit for bit"]
    if cfg.diffusion.T != 1000:
        notes.append(f"T={cfg.diffusion.T}: call DDPMPipeline with num_inference_steps={cfg.diffusion.T} "
                     "(its default, 1000, is more steps than the model has)")
    return notes


def export_diffusers(checkpoint, out, ema: bool = True) -> Dict[str, Any]:
    """Write ``checkpoint`` (anything load_model reads) as a diffusers folder ``out``; returns
    {"out", "files", "step", "ema", "notes"}. ExportError, before anything is written, for a
    configuration that diffusers cannot express or an ``out`` that is not a new or empty folder."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"--out {out} exists and is not an empty folder; choose another (nothing is overwritten)")
    cfg, model, _, state = load_model(checkpoint, ema=ema)
    try:
        scheduler = O.scheduler_config(cfg)
        unet = {"_class_name": "UNet2DModel", **O.diffusers_config(cfg)}
        # What is written must read back as what was exported (the importer's checks are the spec).
        O.config_from_diffusers(unet, scheduler, base=cfg)
    except O.OfficialWeightsError as e:
        raise ExportError(f"cannot export {checkpoint} as a diffusers folder: {e}") from None
    theirs = O.to_diffusers_state_dict(model.state_dict(), cfg)
    out.mkdir(parents=True, exist_ok=True)
    O.write_safetensors(out / O.WEIGHT_FILES[0], theirs, _metadata(cfg, state, ema, "diffusers"))
    atomic_write_text(out / O.CONFIG_FILE, json.dumps(unet, indent=2) + "\n")
    atomic_write_text(out / O.SCHEDULER_FILE, json.dumps(scheduler, indent=2) + "\n")
    atomic_write_text(out / MODEL_INDEX, json.dumps({"_class_name": "DDPMPipeline",
                                                     "scheduler": ["diffusers", "DDPMScheduler"],
                                                     "unet": ["diffusers", "UNet2DModel"]}, indent=2) + "\n")
    return {"out": str(out), "files": [O.CONFIG_FILE, O.WEIGHT_FILES[0], O.SCHEDULER_FILE, MODEL_INDEX],
            "step": int(state.get("step", -1)), "ema": ema, "notes": _notes(cfg)}


def export_safetensors(checkpoint, out, ema: bool = True) -> Dict[str, Any]:
    """Write the weights of ``checkpoint`` under our names, with the config as metadata, to
    the file ``out`` (*.safetensors, not overwritten); returns {"out", "step", "ema", "notes"}."""
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ExportError(f"--out {out} must end in .safetensors")
    if out.exists():
        raise ExportError(f"--out {out} exists; choose another (nothing is overwritten)")
    cfg, model, _, state = load_model(checkpoint, ema=ema)
    O.write_safetensors(out, model.state_dict(), _metadata(cfg, state, ema, "ddpm"))
    return {"out": str(out), "step": int(state.get("step", -1)), "ema": ema, "notes": []}
