"""The command line: help, presets, dry-run, config errors (exit 2), missing data, sample."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from test_train import make_image_folder, one_thread, tiny_config  # noqa: E402,F401 (autouse fixture)

from ddpm import cli  # noqa: E402
from ddpm.checkpoint import save_checkpoint  # noqa: E402
from ddpm.config import PRESETS, build_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def run(capsys, *argv):
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_python_dash_m_help_lists_the_subcommands():
    res = subprocess.run([sys.executable, "-m", "ddpm", "--help"], capture_output=True, text=True,
                         cwd=REPO)
    assert res.returncode == 0, res.stderr
    for name in ("presets", "train", "sample"):
        assert name in res.stdout


def test_every_subcommand_module_plugs_in():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert {"presets", "train", "sample"} <= set(sub.choices)
    for name in cli.SUBCOMMAND_MODULES:
        assert callable(__import__(name, fromlist=["x"]).add_subcommand)


def test_presets_lists_names_descriptions_and_param_counts(capsys):
    rc, out, _ = run(capsys, "presets")
    assert rc == 0
    lines = out.strip().splitlines()
    assert [ln.split()[0] for ln in lines] == list(PRESETS)
    cifar = next(ln for ln in lines if ln.startswith("cifar10 "))
    assert "35,746,307" in cifar and PRESETS["cifar10"][0] in cifar


def test_dry_run_cifar10_is_the_paper_setup(capsys, monkeypatch, tmp_path):
    # no data anywhere: a dry run must not look for it
    monkeypatch.setenv("DDPM_DATA_DIR", str(tmp_path / "nowhere"))
    rc, out, _ = run(capsys, "train", "--preset", "cifar10", "--dry-run")
    assert rc == 0
    cfg = json.loads(out)  # exactly one JSON object
    assert cfg["num_params"] == 35_746_307
    assert cfg["diffusion"] == {"T": 1000, "schedule": "linear", "mean_type": "eps", "var_type": "beta",
                                "loss_type": "simple", "beta_start": 1e-4, "beta_end": 0.02}
    m, t, d = cfg["model"], cfg["train"], cfg["data"]
    assert (m["ch"], m["ch_mult"], m["num_res_blocks"], m["attn_resolutions"], m["dropout"]) == \
        (128, [1, 2, 2, 2], 2, [16], 0.1)
    assert (t["lr"], t["warmup"], t["grad_clip"], t["adam_eps"], t["ema_decay"], t["batch_size"],
            t["steps"]) == (2e-4, 5000, 1.0, 1e-8, 0.9999, 128, 800_000)
    assert (d["dataset"], d["resolution"], d["hflip"]) == ("cifar10", 32, True)
    assert not (tmp_path / "nowhere").exists()


def test_dry_run_applies_overrides(capsys):
    rc, out, _ = run(capsys, "train", "--preset", "quick-mnist", "--dry-run",
                     "--set", "diffusion.var_type=beta_tilde", "--set", "train.steps=7")
    cfg = json.loads(out)
    assert rc == 0 and cfg["diffusion"]["var_type"] == "beta_tilde" and cfg["train"]["steps"] == 7
    assert cfg["data"]["hflip"] is False and cfg["data"]["resolution"] == 28


@pytest.mark.parametrize("override,needle", [
    ("diffusion.var_typ=beta", "valid keys in diffusion: T, schedule, mean_type, var_type, loss_type"),
    ("train.steps=many", "train.steps: cannot read 'many' as int"),
    ("diffusion.var_type=wide", "beta"),
    ("nosection.x=1", "section in data, model, diffusion, train"),
    ("train.steps", "section.key=value"),
])
def test_bad_overrides_exit_2_with_a_clean_message(capsys, override, needle):
    rc, out, err = run(capsys, "train", "--preset", "tiny", "--dry-run", "--set", override)
    assert rc == 2 and out == ""
    assert err.startswith("error: ") and needle in err and "Traceback" not in err


def test_unknown_preset_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--preset", "cifar11", "--dry-run"])
    assert e.value.code == 2
    assert "cifar10" in capsys.readouterr().err


def test_missing_data_exits_2_and_creates_nothing(capsys, tmp_path, monkeypatch):
    import ddpm.data

    # no data dir holds MNIST (the search also looks in ./data and beside the checkout)
    monkeypatch.delenv("DDPM_DATA_DIR", raising=False)
    monkeypatch.setattr(ddpm.data, "SHARED_DATA_DIR", tmp_path / "no-shared-data")
    monkeypatch.chdir(tmp_path)
    rc, _, err = run(capsys, "train", "--preset", "tiny", "--out", str(tmp_path / "run"),
                     "--data-dir", str(tmp_path / "data"), "--no-progress")
    assert rc == 2
    assert "MNIST not found" in err and "--download" in err and "DDPM_DATA_DIR" in err
    assert not (tmp_path / "data").exists() and not (tmp_path / "run").exists()


def test_train_then_resume_finished_via_cli(capsys, tmp_path):
    folder = make_image_folder(tmp_path / "imgs", n=8)
    sets = ["--set", "data.dataset=folder", "--set", f"data.path={folder}", "--set", "data.resolution=8",
            "--set", "data.channels=3", "--set", "model.attn_resolutions=", "--set", "diffusion.T=30",
            "--set", "train.steps=2", "--set", "train.batch_size=2"]
    rc, out, err = run(capsys, "train", "--preset", "tiny", *sets, "--out", str(tmp_path / "run"),
                     "--device", "cpu", "--no-progress")
    assert rc == 0 and (tmp_path / "run" / "final.pt").exists(), err
    rc, _, err = run(capsys, "train", "--preset", "tiny", *sets, "--out", str(tmp_path / "run"),
                     "--no-progress")
    assert rc == 2 and "already holds a finished run" in err
    rc, out, _ = run(capsys, "train", "--resume", "--out", str(tmp_path / "run"), "--no-progress")
    assert rc == 0 and "already finished" in out


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    cfg = tiny_config(d, **{"diffusion.T": 30, "data.channels": 1, "data.hflip": False,
                            "model.attn_resolutions": ()})
    torch.manual_seed(0)
    model, ema = build_model(cfg), build_model(cfg)
    with torch.no_grad():  # the UNet's last conv starts at zero: perturb so outputs differ
        for p in [*model.parameters(), *ema.parameters()]:
            p.add_(0.05 * torch.randn_like(p))
    save_checkpoint(d / "final.pt", {"config": cfg.to_dict(), "step": 3, "model": model.state_dict(),
                                     "ema": ema.state_dict()})
    return d / "final.pt"


def test_sample_writes_exactly_n_pngs_a_grid_and_a_record(capsys, tmp_path, tiny_checkpoint):
    rc, out, _ = run(capsys, "sample", "--checkpoint", str(tiny_checkpoint), "--n", "5",
                     "--batch-size", "2", "--out", str(tmp_path / "s"), "--var", "beta_tilde",
                     "--seed", "3", "--device", "cpu")
    assert rc == 0
    files = sorted(p.name for p in (tmp_path / "s" / "images").iterdir())
    assert files == [f"{i:06d}.png" for i in range(5)]
    im = np.asarray(Image.open(tmp_path / "s" / "images" / "000000.png"))
    assert im.shape == (8, 8) and im.dtype == np.uint8
    assert (tmp_path / "s" / "grid.png").exists()
    rec = json.loads((tmp_path / "s" / "sample.json").read_text())
    assert rec["n"] == 5 and rec["ema"] is True and rec["var_type"] == "beta_tilde" and rec["step"] == 3
    # same seed -> same images; the raw weights (--no-ema) give other images
    run(capsys, "sample", "--checkpoint", str(tiny_checkpoint), "--n", "2", "--out", str(tmp_path / "t"),
        "--var", "beta_tilde", "--seed", "3", "--batch-size", "2", "--device", "cpu")
    run(capsys, "sample", "--checkpoint", str(tiny_checkpoint), "--n", "2", "--out", str(tmp_path / "u"),
        "--var", "beta_tilde", "--seed", "3", "--batch-size", "2", "--device", "cpu", "--no-ema")
    same = [np.asarray(Image.open(tmp_path / x / "images" / "000001.png")) for x in ("s", "t", "u")]
    assert np.array_equal(same[0], same[1]) and not np.array_equal(same[0], same[2])
    # an output folder with images is not overwritten
    rc, _, err = run(capsys, "sample", "--checkpoint", str(tiny_checkpoint), "--n", "1",
                     "--out", str(tmp_path / "s"), "--device", "cpu")
    assert rc == 2 and "already holds images" in err


def test_sample_from_a_truncated_checkpoint_names_the_file(capsys, tmp_path, tiny_checkpoint):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(tiny_checkpoint.read_bytes()[:1000])
    rc, _, err = run(capsys, "sample", "--checkpoint", str(bad), "--n", "1", "--out", str(tmp_path / "s"))
    assert rc == 2 and str(bad) in err and "corrupt or truncated" in err


def test_sample_with_fewer_steps_records_the_sampler_and_refuses_meaningless_flags(capsys, tmp_path,
                                                                                   tiny_checkpoint):
    common = ["sample", "--checkpoint", str(tiny_checkpoint), "--n", "2", "--batch-size", "2", "--seed", "3",
              "--device", "cpu"]
    rc, _, err = run(capsys, *common, "--out", str(tmp_path / "d"), "--sampler", "ddim", "--steps", "5")
    assert rc == 0, err
    rec = json.loads((tmp_path / "d" / "sample.json").read_text())
    assert rec["sampler_spec"] == {"sampler": "ddim", "steps": 5, "of_T": 30, "eta": 0.0, "skip": "uniform"}
    assert rec["steps"] == 5 and rec["sampler"].startswith("DDIM (Song et al. 2021, Eq. 12) on 5 of 30 steps")
    rc, _, _ = run(capsys, *common, "--out", str(tmp_path / "r"), "--sampler", "respaced", "--steps", "30")
    rc2, _, _ = run(capsys, *common, "--out", str(tmp_path / "a"))  # ancestral, the default
    assert rc == rc2 == 0
    img = lambda d: np.asarray(Image.open(tmp_path / d / "images" / "000001.png"))  # noqa: E731
    assert np.array_equal(img("r"), img("a"))  # respaced on all T steps is Algorithm 2
    assert not np.array_equal(img("d"), img("a"))
    assert json.loads((tmp_path / "a" / "sample.json").read_text())["sampler_spec"]["sampler"] == "ancestral"
    for flags, msg in ((["--steps", "5"], "ancestral sampler runs all T steps"),
                       (["--sampler", "respaced", "--steps", "5", "--eta", "1"], "--eta belongs to --sampler ddim"),
                       (["--sampler", "ddim", "--steps", "31"], "--steps 31"),
                       (["--sampler", "ddim", "--steps", "5", "--eta", "-1"], "--eta -1")):
        rc, _, err = run(capsys, *common, "--out", str(tmp_path / "x"), *flags)
        assert rc == 2 and msg in err and err.count("\n") == 1, (flags, err)
    assert not (tmp_path / "x").exists()
