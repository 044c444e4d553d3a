"""Recorded results name their inputs without the absolute paths of the machine that made them."""

import os
from pathlib import Path

from conftest import REPO
from ddpm import provenance as P


def test_paths_are_recorded_relative_to_the_repository_its_neighbours_or_home():
    assert P.portable_path(REPO / "runs" / "quick" / "x" / "final.pt") == "runs/quick/x/final.pt"
    assert P.portable_path(f"{REPO}/../shared/data/cifar10-partial/train") == "../shared/data/cifar10-partial/train"
    assert P.portable_path(Path.home() / ".cache" / "ddpm" / "w.pth") in ("~/.cache/ddpm/w.pth",
                                                                         # home beside or above the checkout
                                                                         os.path.relpath(Path.home() / ".cache/ddpm/w.pth", REPO))
    assert P.portable_path("/nonexistent-root-dir/a/b/c.png") == "<elsewhere>/b/c.png"
    assert P.portable_path("runs/x") == "runs/x"  # relative paths stay as they are


def test_paths_inside_text_and_json_are_rewritten_and_nothing_else():
    text = (f"data folder:{REPO}/../shared/data/x (4000 images); ckpt \"{REPO}/runs/a/final.pt\", "
            "ratio 1/2, x/127.5 - 1, https://example.org/a/b")
    assert P.portable_text(text) == ('data folder:../shared/data/x (4000 images); ckpt "runs/a/final.pt", '
                                     "ratio 1/2, x/127.5 - 1, https://example.org/a/b")
    obj = {"checkpoint": f"{REPO}/runs/a/final.pt", "list": [f"({REPO}/b: c)"], "n": 3}
    assert P.portable(obj) == {"checkpoint": "runs/a/final.pt", "list": ["(b: c)"], "n": 3}


def _absolute_paths(text: str):
    """Absolute paths in ``text`` whose first folder exists on this machine (/work, /tmp, /root, ...)."""
    return [m.group(0) for m in P._ABS.finditer(text)
            if len(Path(m.group(0)).parts) > 1 and Path("/", Path(m.group(0)).parts[1]).is_dir()]


def test_committed_results_hold_no_absolute_path_of_a_machine():
    found = {}
    for f in (REPO / "results").rglob("*"):
        if f.is_file() and f.suffix in (".json", ".md", ".tex", ".txt"):
            hits = _absolute_paths(f.read_text())
            if hits:
                found[str(f.relative_to(REPO))] = hits[:3]
    assert not found, found
    assert _absolute_paths(f"x {REPO}/runs y")  # the scan itself finds one


def test_text_that_only_looks_like_a_path_is_left_alone():
    for text in ("<!-- /tables:quick -->", "loss /step", "a / b", "ratio 1/2", "https://example.org/a/b"):
        assert P.portable_text(text) == text
    assert P.portable_path("/x") == "<elsewhere>/x"
