"""What every record carries: portable paths, the code version, and files written whole.

- ``atomic_write_bytes`` / ``atomic_write_text``: every file a run, an evaluation or an
  export writes (checkpoints, configs, run records, metrics, sample shards, weights) is
  written to a temporary file beside it and renamed over it, so that a crash leaves the
  old file or the new one, never half of one.
- ``check_manifest``: a folder filled piece by piece (sample shards, the bound's batches)
  names the request it belongs to in its manifest.json; another request's folder is refused,
  never mixed.
- ``git_commit``: the commit of this checkout, flagged when the library has uncommitted
  changes.
- ``portable_path`` / ``portable``: paths in recorded results, without the absolute paths
  of the machine that made them.

Every file that leaves a machine (results/, metrics.json, sample and run records) names
its inputs (checkpoints, data folders, weights). Absolute paths would name folders that
exist on no other machine, so they are recorded as:

- inside the repository: relative to it (``runs/quick/eps_simple/final.pt``);
- beside it (under the folder that holds the checkout, e.g. ``shared/data``): relative to
  the repository (``../shared/data/cifar10-partial/train``);
- under the home folder: ``~/...`` (``~/.cache/ddpm/inception-...pth``);
- anywhere else: ``<elsewhere>/`` and the last two parts of the path.

Paths are normalised first (``/work/main/../shared`` is ``/work/shared``).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Type


# ------------------------------------------------------------------------ atomic files


def atomic_write_bytes(path, write) -> None:
    """Call ``write(f)`` on a temporary file beside ``path``, then rename it over ``path``:
    a crash leaves the old file or the new one, never half of one. The file gets the usual
    mode (0666 less the umask, as open() would give), not mkstemp's private 0600."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


def atomic_write_text(path, text: str) -> None:
    """``atomic_write_bytes`` for text (UTF-8): configs, run records, metrics."""
    atomic_write_bytes(Path(path), lambda f: f.write(text.encode("utf-8")))


MANIFEST = "manifest.json"


def check_manifest(folder, manifest: Dict[str, Any], what: str, error: Type[Exception],
                   defaults: Optional[Dict[str, Any]] = None) -> bool:
    """True if ``folder`` holds (part of) the ``what`` that ``manifest`` describes (its
    manifest.json is ``manifest``), False if it holds no manifest.json; ``error``, in one line
    saying what differs, if it holds ``what`` of another request. ``defaults``: the values of
    fields a manifest written before they were recorded lacks. Writes nothing."""
    mpath = Path(folder) / MANIFEST
    if not mpath.exists():
        return False
    try:
        old = json.loads(mpath.read_text())
    except ValueError:
        raise error(f"{mpath} is not readable JSON; delete {folder} to make the {what} again") from None
    if old == manifest or (isinstance(old, dict) and {**(defaults or {}), **old} == manifest):
        return True
    diff = "; ".join(f"{k}: {json.dumps(old.get(k))} there, {json.dumps(manifest.get(k))} now"
                     for k in sorted(set(old) | set(manifest)) if old.get(k) != manifest.get(k))
    raise error(f"{folder} holds {what} of a different run ({diff}); use another --out folder or delete {folder}")


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


# ---------------------------------------------------------------------- portable paths

REPO = Path(__file__).resolve().parents[1]
# An absolute path inside a string: starts at a "/" that follows a start, space, quote,
# "(", "=", ":" or "," (not "//", as in a URL), has at least two parts ("/a/b": a lone
# "/step" or an HTML comment's "/tables:quick" is no path) and runs to the next delimiter.
_ABS = re.compile(r"(?:(?<=^)|(?<=[\s\"'(=:,\[]))/(?!/)[^\s\"'(),:\[\]/]+/[^\s\"'(),:\[\]]+")


def portable_path(path) -> str:
    """``path`` as it may be recorded (see the module docstring)."""
    p = Path(os.path.normpath(os.path.expanduser(str(path))))
    if not p.is_absolute():
        return str(p)
    for base, prefix in ((REPO, ""), (REPO.parent, None), (Path.home(), "~")):
        try:
            rel = p.relative_to(base)
        except ValueError:
            continue
        if prefix is None:  # beside the checkout
            return os.path.relpath(p, REPO)
        if base == Path("/"):
            break
        return str(Path(prefix) / rel) if prefix else (str(rel) if str(rel) != "." else ".")
    return "<elsewhere>/" + "/".join(p.parts[1:][-2:])


def portable_text(text: str) -> str:
    """Every absolute path inside ``text`` replaced by its portable form."""
    return _ABS.sub(lambda m: portable_path(m.group(0)), text)


def portable(obj: Any) -> Any:
    """A JSON-able object with every string made portable (dict keys too)."""
    if isinstance(obj, str):
        return portable_text(obj)
    if isinstance(obj, dict):
        return {portable(k): portable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [portable(v) for v in obj]
    return obj


def main(argv=None) -> int:
    """Rewrite the text files (.json, .md, .tex, .txt) under the given folders with portable
    paths: ``python -m ddpm.provenance results/`` (for results written before this existed)."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m ddpm.provenance", description=main.__doc__)
    p.add_argument("folders", nargs="+")
    args = p.parse_args(argv)
    changed = 0
    for folder in args.folders:
        for f in sorted(Path(folder).rglob("*")):
            if f.is_file() and f.suffix in (".json", ".md", ".tex", ".txt", ".jsonl"):
                text = f.read_text()
                new = portable_text(text)
                if new != text:
                    f.write_text(new)
                    changed += 1
                    print(f"rewrote {f}")
    print(f"{changed} file(s) rewritten")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
