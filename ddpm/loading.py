"""Open a model from anything a command takes as ``--checkpoint``, in one place above the formats.

- ``resolve_checkpoint``: a run directory means its final.pt (an unfinished run or a folder
  that is neither a run nor a diffusers folder is a CheckpointError saying what to pass);
  a file or a diffusers folder is taken as it is.
- ``load_model``: (config, network in eval mode, GaussianDiffusion, state) from
  - our checkpoint file (ddpm.checkpoint: plain data, read with weights_only=True);
  - a diffusers folder (ddpm.official: the paper's released weights, or our export);
  - a ``.safetensors`` file written by ``python -m ddpm export --format safetensors``
    (read here: ``load_safetensors_export``; ddpm.export writes it).

``ema=True`` (the default, as the paper evaluates) loads the EMA weights and fails where
there are none rather than silently using the raw ones.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Tuple

import torch

from . import official as O
from .checkpoint import CheckpointError, read_checkpoint, state_mismatch
from .config import Config, build_diffusion, build_model

# The safetensors metadata of our exports (ddpm.export writes it, load_safetensors_export reads it):
# ddpm_format, ddpm_config (the resolved config as JSON), ddpm_step, ddpm_weights ("ema" | "raw"),
# ddpm_names ("diffusers" | "ddpm"), ddpm_commit.
EXPORT_FORMAT = "ddpm-export-v1"


def resolve_checkpoint(path) -> str:
    """``path`` as a checkpoint for sample/eval/export: a checkpoint file, a diffusers folder, or
    a run directory (its final.pt). A run directory without final.pt is a CheckpointError that
    says which checkpoint it does hold."""
    p = Path(path)
    if not p.is_dir():
        return str(path)
    weights = any((d / w).is_file() for d in (p, p / "unet") for w in O.WEIGHT_FILES)
    if O.is_diffusers_folder(p) and weights:
        return str(path)
    if (p / "final.pt").is_file():
        return str(p / "final.pt")
    if (p / "last.pt").is_file():
        raise CheckpointError(f"--checkpoint {p} is a run directory without final.pt (the run is unfinished); "
                              f"pass {p / 'last.pt'} to use its last checkpoint, or finish it with "
                              f"`python -m ddpm train --out {p} --resume`")
    if (p / "config.json").is_file() and not weights:
        raise CheckpointError(f"--checkpoint {p} is a folder with config.json but neither final.pt/last.pt (a "
                              f"ddpm run) nor {' or '.join(O.WEIGHT_FILES)} (diffusers weights)")
    return str(path)


def load_model(path, ema: bool = True, map_location="cpu") -> Tuple[Config, torch.nn.Module, Any, Dict]:
    """(config, network in eval mode, GaussianDiffusion, checkpoint dict) from ``path``: a
    checkpoint file, a diffusers folder (config.json and diffusion_pytorch_model.safetensors/.bin,
    such as google/ddpm-cifar10-32: ddpm.official.load_diffusers_folder) or a .safetensors
    export. For the last two the dict mimics a checkpoint's (format, config, step, weights)."""
    if Path(path).is_dir():
        if not O.is_diffusers_folder(path):
            raise CheckpointError(f"{path} is a folder but neither a checkpoint file nor a diffusers "
                                  "folder (config.json + diffusion_pytorch_model.safetensors/.bin)")
        return O.load_diffusers_folder(path, ema=ema, map_location=map_location)
    if Path(path).suffix == ".safetensors":
        return load_safetensors_export(path, ema=ema)
    state = read_checkpoint(path, map_location)
    cfg = Config.from_dict(state["config"])
    model = build_model(cfg)
    if ema and "ema" not in state:
        raise CheckpointError(f"checkpoint {path} has no EMA weights; pass ema=False (--no-ema)")
    weights = state["ema"] if ema else state["model"]
    bad = state_mismatch(model, weights)
    if bad:
        raise CheckpointError(f"weights in {path} do not fit its config ({bad}); the checkpoint was not "
                              "written by this code for this config")
    model.load_state_dict(weights)
    return cfg, model.eval(), build_diffusion(cfg), state


def load_safetensors_export(path, ema: bool = True):
    """(config, network in eval mode, GaussianDiffusion, state) from a file written by
    ddpm.export.export_safetensors (or a diffusers folder's weights file written by
    export_diffusers): the contract of load_model, which calls this for *.safetensors."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    weights, meta = O.read_safetensors(path, with_metadata=True)
    if meta.get("ddpm_format") != EXPORT_FORMAT or "ddpm_config" not in meta:
        raise CheckpointError(f"{path} is a safetensors file without ddpm's metadata (ddpm_format "
                              f"{EXPORT_FORMAT!r}, ddpm_config); only files written by `python -m ddpm export` "
                              "carry the config needed to build the network")
    holds = meta.get("ddpm_weights", "ema")
    if ema != (holds == "ema"):
        raise CheckpointError(f"{path} holds the {'raw' if ema else 'EMA'} weights only; "
                              + ("pass ema=False (--no-ema)" if ema else "load it with ema=True (--ema)"))
    cfg = Config.from_dict(json.loads(meta["ddpm_config"]))
    model = build_model(cfg)
    try:
        if meta.get("ddpm_names") == "diffusers":
            O.load_converted(model, O.convert_state_dict(weights, cfg))
        else:
            model.load_state_dict(weights)
    except RuntimeError as e:
        raise CheckpointError(f"weights in {path} do not fit its config: {e}") from e
    state = {"format": "safetensors-export", "config": cfg.to_dict(), "step": int(meta.get("ddpm_step", -1)),
             "ema" if ema else "model": model.state_dict(), "source": str(path)}
    return cfg, model.eval(), build_diffusion(cfg), state
