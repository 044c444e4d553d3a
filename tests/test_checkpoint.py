"""Checkpoints are plain data: loading one runs no code, and old ones convert explicitly.

A checkpoint-shaped pickle whose unpickling would create a marker file is refused
everywhere a checkpoint is read (library, `sample`, `convert-checkpoint`) with a one-line
error, and the marker never appears; the same file loaded with full pickle does create it
(so the test pickle is live). A checkpoint of the old format (numpy's RNG state pickled as
a numpy array) is refused with the command that converts it; converted, the run resumes
to the same weights as an uninterrupted one.
"""

import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import on_loss_call  # noqa: E402
from test_train import assert_same_weights, make_image_folder, one_thread, tiny_config  # noqa: E402,F401

from ddpm import cli  # noqa: E402
from ddpm import train as TR  # noqa: E402
from ddpm.checkpoint import (FORMAT, LEGACY_FORMAT, CheckpointError, LegacyCheckpointError,  # noqa: E402
                             UnsafeCheckpointError, convert_checkpoint, read_checkpoint,
                             rng_from_plain, rng_to_plain, save_checkpoint)
from ddpm.loading import load_model  # noqa: E402
from ddpm.config import build_model  # noqa: E402


class MakesMarker:
    """Unpickling this calls exec, which creates the file ``path``: what a malicious
    checkpoint would do (with any code in place of the marker)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return exec, (f"open({self.path!r}, 'w').close()",)


@pytest.fixture(scope="module")
def plain_state(tmp_path_factory):
    """A small checkpoint dict: config, weights, step (as `sample` needs)."""
    cfg = tiny_config(tmp_path_factory.mktemp("imgs"), **{"model.attn_resolutions": ()})
    torch.manual_seed(0)
    model = build_model(cfg)
    return {"config": cfg.to_dict(), "step": 3, "model": model.state_dict(), "ema": model.state_dict()}


def run_cli(capsys, *argv):
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


# ------------------------------------------------------------------------ plain data


def test_rng_states_round_trip_as_plain_data(tmp_path):
    """torch, numpy (with a cached Gaussian) and Python (with gauss_next) states, saved and
    restored through a checkpoint that weights_only=True reads, give the same draws."""
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    np.random.standard_normal()  # leaves numpy's second Gaussian of a pair cached
    random.gauss(0, 1)  # leaves Python's gauss_next set
    gen = torch.Generator().manual_seed(4)
    states = rng_to_plain({"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                           "python": random.getstate(), "batch_gen": gen.get_state()})
    assert states["numpy"]["has_gauss"] == 1 and states["python"]["gauss_next"] is not None
    want = (torch.rand(3), np.random.standard_normal(3), [random.gauss(0, 1) for _ in range(3)],
            torch.rand(3, generator=gen))

    save_checkpoint(tmp_path / "c.pt", {"config": {}, "model": {}, "step": 0, "rng": states})
    back = torch.load(tmp_path / "c.pt", weights_only=True)  # plain torch, no allowlist
    assert back["format"] == FORMAT
    s = rng_from_plain(back["rng"])
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    gen.set_state(s["batch_gen"])
    got = (torch.rand(3), np.random.standard_normal(3), [random.gauss(0, 1) for _ in range(3)],
           torch.rand(3, generator=gen))
    assert torch.equal(got[0], want[0]) and np.array_equal(got[1], want[1]) and got[2] == want[2]
    assert torch.equal(got[3], want[3])


def test_saving_anything_but_plain_data_is_an_error(tmp_path):
    with pytest.raises(TypeError, match=r"checkpoint\.rng\.numpy\[1\] is a numpy.ndarray"):
        save_checkpoint(tmp_path / "c.pt", {"config": {}, "model": {}, "step": 0,
                                            "rng": {"numpy": np.random.get_state()}})
    assert not (tmp_path / "c.pt").exists()


# ------------------------------------------------------------------ code is never run


@pytest.mark.parametrize("zipfile", [True, False], ids=["zip", "pre-1.6 format"])
def test_a_checkpoint_that_would_run_code_is_refused_and_runs_nothing(plain_state, tmp_path, capsys, zipfile):
    marker = tmp_path / "marker"
    evil = tmp_path / "evil.pt"
    state = {**plain_state, "format": FORMAT, "optimizer": {"payload": MakesMarker(marker)}}
    torch.save(state, evil, _use_new_zipfile_serialization=zipfile)  # torch.load reads both

    with pytest.raises(UnsafeCheckpointError) as e:
        read_checkpoint(evil)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"refused to load {evil}") and "weights_only=True" in msg
    assert "exec" in msg  # names what it would have called, found without running it
    with pytest.raises(UnsafeCheckpointError):
        load_model(evil)
    rc, _, err = run_cli(capsys, "sample", "--checkpoint", evil, "--n", "1", "--out", tmp_path / "s")
    assert rc == 2 and err.count("\n") == 1 and "refused to load" in err
    rc, _, err = run_cli(capsys, "convert-checkpoint", evil, tmp_path / "new.pt")
    assert rc == 2 and "refused to convert" in err and not (tmp_path / "new.pt").exists()
    assert not marker.exists()

    # The control: unpickled without the guard, the file does run its code.
    torch.load(evil, weights_only=False)
    assert marker.exists()


# ------------------------------------------------------------------ the old format


def _as_legacy(path: Path) -> None:
    """Rewrite a checkpoint the way earlier versions saved it: numpy's and Python's RNG
    states as their native tuples (a numpy array inside), format v1."""
    st = torch.load(path, weights_only=True)
    st["format"] = LEGACY_FORMAT
    st["rng"]["ranks"] = [rng_from_plain(r) for r in st["rng"]["ranks"]]
    assert isinstance(st["rng"]["ranks"][0]["numpy"][1], np.ndarray)
    torch.save(st, path)


def test_legacy_checkpoint_is_refused_then_converted_and_resumes_bit_exactly(tmp_path, monkeypatch, capsys):
    images = make_image_folder(tmp_path / "imgs")
    cfg = tiny_config(images)
    TR.train(cfg, tmp_path / "a", device="cpu", progress=False)

    on_loss_call(monkeypatch, 8, "interrupt")  # dies during step 8: last.pt holds step 5
    with pytest.raises(KeyboardInterrupt):
        TR.train(cfg, tmp_path / "b", device="cpu", progress=False)
    monkeypatch.undo()
    last = tmp_path / "b" / "last.pt"
    _as_legacy(last)

    with pytest.raises(LegacyCheckpointError) as e:
        read_checkpoint(last)
    assert "\n" not in str(e.value) and f"python -m ddpm convert-checkpoint {last} NEW.pt" in str(e.value)
    with pytest.raises(CheckpointError, match="convert-checkpoint"):
        TR.train(cfg, tmp_path / "b", resume=True, device="cpu", progress=False)

    rc, out, _ = run_cli(capsys, "convert-checkpoint", last, last)  # in place
    assert rc == 0 and f"({LEGACY_FORMAT}, step 5)" in out and "no code was run" in out
    converted = read_checkpoint(last)
    assert converted["format"] == FORMAT and isinstance(converted["rng"]["ranks"][0]["numpy"]["key"], torch.Tensor)

    TR.train(cfg, tmp_path / "b", resume=True, device="cpu", progress=False)
    a, b = read_checkpoint(tmp_path / "a" / "final.pt"), read_checkpoint(tmp_path / "b" / "final.pt")
    assert_same_weights(a["model"], b["model"])
    assert_same_weights(a["ema"], b["ema"])


def test_convert_does_not_overwrite_another_file_and_plain_v1_reads_as_is(plain_state, tmp_path):
    old = tmp_path / "old.pt"
    torch.save({**plain_state, "format": LEGACY_FORMAT}, old)  # a hand-made v1 file: plain data only
    assert read_checkpoint(old)["step"] == 3
    (tmp_path / "taken.pt").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="nothing is overwritten"):
        convert_checkpoint(old, tmp_path / "taken.pt")
    assert (tmp_path / "taken.pt").read_bytes() == b"x"
    assert convert_checkpoint(old, tmp_path / "new.pt") == {"from": LEGACY_FORMAT, "step": 3, "rng_ranks": 0}
    assert read_checkpoint(tmp_path / "new.pt")["format"] == FORMAT
