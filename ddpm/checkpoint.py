"""Checkpoints: written atomically, always carrying the resolved config, read with clear errors.

A checkpoint is one ``torch.save`` file holding a dict of plain data only (tensors,
numbers, strings, None, lists, tuples and dicts), so that ``torch.load(weights_only=True)``
reads it; nothing else is ever unpickled, and a checkpoint someone shares cannot run code:
  format: "ddpm-checkpoint-v2"
  config: Config.to_dict()          (so a checkpoint is self-describing)
  step: int
  model: state dict of the raw network
  ema: state dict of the EMA network (may be absent in hand-made checkpoints)
  optimizer, rng, ...: whatever training needs to resume (optional for loading); RNG
      states as tensors and lists (rng_to_plain), never numpy or Python objects

Version 1 ("ddpm-checkpoint-v1", written before the safe format) pickled numpy's RNG
state as a numpy array, which a safe load refuses. Such a file is converted once with
``python -m ddpm convert-checkpoint OLD.pt NEW.pt`` (convert_checkpoint): it is read
with ``weights_only=True`` plus numpy's array types allowed (what a v1 file holds
besides plain data; still no code runs) and written in the current format. Loading a
v1 file anywhere else names that command. A v1 file without numpy state (hand-made)
is plain data and reads as is.

Writing is atomic (ddpm.provenance.atomic_write_bytes). Opening a model from a checkpoint,
a diffusers folder or an exported file is ddpm.loading.load_model.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from .provenance import atomic_write_bytes

FORMAT = "ddpm-checkpoint-v2"
LEGACY_FORMAT = "ddpm-checkpoint-v1"
CONVERT_COMMAND = "python -m ddpm convert-checkpoint"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used as asked; its message is one line, for the command line."""


class UnsafeCheckpointError(CheckpointError):
    """A file that is not plain data: unpickling it would call the code it names. Never loaded."""


class LegacyCheckpointError(CheckpointError):
    """A checkpoint in the format of an earlier version (v1); convert_checkpoint converts it."""


# ------------------------------------------------------------------ plain data only

# What weights_only=True reads besides tensors (and what save_checkpoint lets through).
PLAIN_SCALARS = (bool, int, float, str, type(None))


def _check_plain(obj, where: str) -> None:
    """Raise TypeError naming the first value that torch.load(weights_only=True) would refuse."""
    if isinstance(obj, (torch.Tensor, torch.Size) + PLAIN_SCALARS):
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"{where}: key {k!r} is a {type(k).__name__}, not a str or int")
            _check_plain(v, f"{where}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
    else:
        raise TypeError(f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}; a checkpoint holds "
                        "only tensors, numbers, strings, None, lists, tuples and dicts")


def rng_to_plain(states: Dict[str, Any]) -> Dict[str, Any]:
    """A copy of ``states`` with numpy's ("numpy": np.random.get_state()) and Python's
    ("python": random.getstate()) RNG states as dicts of tensors, lists and numbers.
    torch's states are tensors already; other entries pass through. rng_from_plain inverts it."""
    out = dict(states)
    if isinstance(out.get("numpy"), tuple):
        name, key, pos, has_gauss, cached_gaussian = out["numpy"]
        out["numpy"] = {"bit_generator": str(name), "key": torch.from_numpy(np.asarray(key, dtype=np.int64)),
                        "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)}
    if isinstance(out.get("python"), tuple):
        version, internal, gauss_next = out["python"]
        out["python"] = {"version": int(version), "internal": [int(v) for v in internal], "gauss_next": gauss_next}
    return out


def rng_from_plain(states: Dict[str, Any]) -> Dict[str, Any]:
    """The inverse of rng_to_plain: states that np.random.set_state and random.setstate take."""
    out = dict(states)
    n = out.get("numpy")
    if isinstance(n, dict):
        out["numpy"] = (n["bit_generator"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                        n["cached_gaussian"])
    p = out.get("python")
    if isinstance(p, dict):
        out["python"] = (p["version"], tuple(p["internal"]), p["gauss_next"])
    return out


# ------------------------------------------------------------------------- files


def save_checkpoint(path, state: Dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically (see atomic_write_bytes). It must be plain data
    (see the module docstring): anything else is a TypeError here, not an unreadable file later."""
    path = Path(path)
    state = {**state, "format": FORMAT}
    _check_plain(state, "checkpoint")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, lambda f: torch.save(state, f))


def _legacy_globals() -> List[Any]:
    """What a v1 checkpoint holds besides plain data: numpy's RNG state, one uint32 array.
    Named both ways numpy has pickled _reconstruct (numpy.core before 2.0, numpy._core after)."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    allowed = [(_reconstruct, "numpy.core.multiarray._reconstruct"),
               (_reconstruct, "numpy._core.multiarray._reconstruct"), np.ndarray, np.dtype]
    allowed += sorted({type(np.dtype(t)) for t in (np.uint32, np.int64, np.float64)} - {np.dtype}, key=str)
    return allowed


LEGACY_GLOBAL_NAMES = {"numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct",
                       "numpy.ndarray", "numpy.dtype", "numpy.dtypes.UInt32DType",
                       "numpy.dtypes.Int64DType", "numpy.dtypes.Float64DType"}


def _unsafe_globals(path: Path) -> List[str]:
    """The functions and classes unpickling ``path`` would call beyond plain data, read from
    the pickle's opcodes without running it; [] where that cannot be told (torch < 2.5, not a
    torch.save zip file)."""
    find = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    try:
        return list(find(str(path))) if find else []
    except Exception:
        return []


def _refusal(path: Path, err: Exception) -> CheckpointError:
    """The one-line error for a file that torch.load(weights_only=True) refuses."""
    names = _unsafe_globals(path)
    if names and set(names) <= LEGACY_GLOBAL_NAMES:
        return LegacyCheckpointError(
            f"{path} is a checkpoint of an earlier version of ddpm ({LEGACY_FORMAT}, with numpy's RNG state "
            f"pickled as a numpy array), which is not read as is; convert it once (reads only plain data "
            f"and numpy arrays, runs no code): {CONVERT_COMMAND} {path} NEW.pt")
    if not names:  # not a zip checkpoint (torch's pre-1.6 format, a bare pickle): torch's message names it
        names = re.findall(r"Unsupported global: GLOBAL (\S+)", str(err))[:1]
    if names:
        what = f"unpickling it would call {', '.join(names[:5])}" + (" ..." if len(names) > 5 else "")
    else:
        reason = [ln.strip() for ln in str(err).splitlines() if "WeightsUnpickler error" in ln]
        what = "it is not a torch.save file of plain data" + (f" ({reason[0]})" if reason else "")
    return UnsafeCheckpointError(
        f"refused to load {path}: {what}; ddpm reads checkpoints with torch.load(weights_only=True) "
        "(tensors, numbers, strings, lists and dicts only), so that a shared file cannot run code")


def read_checkpoint(path, map_location="cpu") -> Dict[str, Any]:
    """Load a checkpoint dict with torch.load(weights_only=True), or raise CheckpointError
    naming the file and what to do (UnsafeCheckpointError for a file that would run code,
    LegacyCheckpointError for a v1 file to convert)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only refused a global (or the pickle is garbage)
        raise _refusal(path, e) from None
    except Exception as e:  # truncated zip, garbage bytes, ...
        raise CheckpointError(
            f"checkpoint {path} is corrupt or truncated ({type(e).__name__}: {e}); "
            "use an earlier checkpoint of the run or retrain"
        ) from e
    return _checked(state, path)


def _checked(state, path: Path) -> Dict[str, Any]:
    if not isinstance(state, dict) or state.get("format") not in (FORMAT, LEGACY_FORMAT):
        raise CheckpointError(f"{path} is not a ddpm checkpoint (no format field {FORMAT!r})")
    for key in ("config", "model", "step"):
        if key not in state:
            raise CheckpointError(f"checkpoint {path} lacks {key!r}")
    return state


def _plain(obj):
    """numpy arrays and scalars in ``obj`` as tensors and Python numbers (containers rebuilt)."""
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return type(obj)((k, _plain(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(v) for v in obj)
    return obj


def convert_checkpoint(old, new) -> Dict[str, Any]:
    """Rewrite a checkpoint of an earlier version (v1) in the current format; returns
    {"from": format read, "step", "rng_ranks": number of RNG states converted}.

    ``old`` is read with torch.load(weights_only=True) and numpy's array and dtype types
    allowed (_legacy_globals: a v1 file pickled numpy's RNG state as an array); anything
    else in it is refused, as read_checkpoint refuses it, so no code runs. RNG states
    become plain (rng_to_plain); model, EMA, optimizer, step and config are unchanged.
    ``new`` may be ``old`` itself (replaced atomically); another existing file is not
    overwritten.
    """
    old, new = Path(old), Path(new)
    if not old.is_file():
        raise CheckpointError(f"checkpoint {old} does not exist")
    if new.exists() and new.resolve() != old.resolve():
        raise CheckpointError(f"{new} exists; choose another NEW (nothing is overwritten), or pass OLD "
                              "twice to convert in place")
    if not hasattr(torch.serialization, "safe_globals"):
        raise CheckpointError(f"reading {old} safely needs torch >= 2.5 (torch.serialization.safe_globals); "
                              f"this is torch {torch.__version__}")
    try:
        with torch.serialization.safe_globals(_legacy_globals()):
            state = torch.load(old, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        err = _refusal(old, e)
        raise UnsafeCheckpointError(str(err).replace("refused to load", "refused to convert")) from None
    except Exception as e:
        raise CheckpointError(f"checkpoint {old} is corrupt or truncated ({type(e).__name__}: {e})") from e
    state = _checked(state, old)
    fmt, n_rng = state["format"], 0
    rng = state.get("rng")
    if isinstance(rng, dict) and isinstance(rng.get("ranks"), list):
        rng = {**rng, "ranks": [rng_to_plain(r) for r in rng["ranks"]]}
        state["rng"], n_rng = rng, len(rng["ranks"])
    save_checkpoint(new, _plain(state))
    read_checkpoint(new)  # what was written reads back safely
    return {"from": fmt, "step": int(state["step"]), "rng_ranks": n_rng}


def state_mismatch(module: torch.nn.Module, weights: Dict[str, torch.Tensor]) -> Optional[str]:
    """One line saying how ``weights`` do not fit ``module`` (None if they fit): counts of
    tensors of another shape, missing and unexpected, each with its first example (rather
    than load_state_dict's line per tensor)."""
    own = module.state_dict()
    missing = [k for k in own if k not in weights]
    extra = [k for k in weights if k not in own]
    shapes = [f"{k}: {tuple(weights[k].shape)} in the checkpoint, {tuple(own[k].shape)} for the config"
              for k in own if k in weights and tuple(weights[k].shape) != tuple(own[k].shape)]
    parts = [f"{len(shapes)} tensor(s) of another shape, e.g. {shapes[0]}" if shapes else "",
             f"{len(missing)} missing, e.g. {missing[0]}" if missing else "",
             f"{len(extra)} unexpected, e.g. {extra[0]}" if extra else ""]
    return "; ".join(p for p in parts if p) or None
