"""Checkpoints: written atomically, always carrying the resolved config, read with clear errors.

A checkpoint is one ``torch.save`` file holding a dict:
  format: "ddpm-checkpoint-v1"
  config: Config.to_dict()          (so a checkpoint is self-describing)
  step: int
  model: state dict of the raw network
  ema: state dict of the EMA network (may be absent in hand-made checkpoints)
  optimizer, rng, ...: whatever training needs to resume (optional for loading)
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Dict, Tuple

import torch

from .config import Config, build_diffusion, build_model

FORMAT = "ddpm-checkpoint-v1"


class CheckpointError(RuntimeError):
    pass


def atomic_write_bytes(path: Path, write) -> None:
    """Call ``write(f)`` on a temporary file beside ``path``, then rename it over ``path``:
    a crash leaves the old file or the new one, never half of one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """``atomic_write_bytes`` for text (UTF-8): configs, run records, metrics."""
    atomic_write_bytes(Path(path), lambda f: f.write(text.encode("utf-8")))


def git_commit() -> str:
    """The commit of this checkout, for provenance records; "+dirty(ddpm/)" when the library
    has uncommitted changes."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                             check=True, timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "."],
                               cwd=here, capture_output=True, text=True, timeout=30).stdout.strip()
        return sha + ("+dirty(ddpm/)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)"


def save_checkpoint(path, state: Dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically (see atomic_write_bytes)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"format": FORMAT, **state}
    atomic_write_bytes(path, lambda f: torch.save(state, f))


def read_checkpoint(path, map_location="cpu") -> Dict[str, Any]:
    """Load a checkpoint dict, or raise CheckpointError naming the file and what to do."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # truncated zip, garbage bytes, ...
        raise CheckpointError(
            f"checkpoint {path} is corrupt or truncated ({type(e).__name__}: {e}); "
            "use an earlier checkpoint of the run or retrain"
        ) from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a ddpm checkpoint (no format field {FORMAT!r})")
    for key in ("config", "model", "step"):
        if key not in state:
            raise CheckpointError(f"checkpoint {path} lacks {key!r}")
    return state


def load_model(path, ema: bool = True, map_location="cpu") -> Tuple[Config, torch.nn.Module, Any, Dict]:
    """(config, network in eval mode, GaussianDiffusion, checkpoint dict) from a checkpoint.

    ``ema=True`` (the default, as the paper evaluates) loads the EMA weights, and fails
    if the checkpoint has none rather than silently using the raw ones.

    ``path`` may also be a folder in the diffusers format (config.json and
    diffusion_pytorch_model.safetensors/.bin), such as the paper's released weights
    google/ddpm-cifar10-32: see ddpm.official.load_diffusers_folder.
    """
    if Path(path).is_dir():
        from .official import is_diffusers_folder, load_diffusers_folder

        if not is_diffusers_folder(path):
            raise CheckpointError(f"{path} is a folder but neither a checkpoint file nor a diffusers "
                                  "folder (config.json + diffusion_pytorch_model.safetensors/.bin)")
        return load_diffusers_folder(path, ema=ema, map_location=map_location)
    state = read_checkpoint(path, map_location)
    cfg = Config.from_dict(state["config"])
    model = build_model(cfg)
    if ema and "ema" not in state:
        raise CheckpointError(f"checkpoint {path} has no EMA weights; pass ema=False (--no-ema)")
    weights = state["ema"] if ema else state["model"]
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise CheckpointError(f"weights in {path} do not fit its config: {e}") from e
    return cfg, model.eval(), build_diffusion(cfg), state
