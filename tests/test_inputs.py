"""Bad input is one clear line and exit code 2, checked before anything is written; and
nothing a run or an evaluation produced is lost (issue 13, sections 3-5).

The command-line cases are a table of (argv, expected message fragment), run in-process:
each must exit with 2, print exactly one line ``error: ...`` on stderr, and create no
output folder.
"""

import json
import os
import signal
import stat
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from conftest import SHARED_DATA, on_loss_call, require_fid_helper  # noqa: E402
from test_train import as_cli_sets, make_image_folder, one_thread, tiny_config, tiny_overrides  # noqa: E402,F401

from ddpm import cli  # noqa: E402
from ddpm import train as TR  # noqa: E402
from ddpm.checkpoint import read_checkpoint, save_checkpoint  # noqa: E402
from ddpm.config import build_model, get_preset  # noqa: E402
from ddpm.generate import sample_manifest  # noqa: E402


def run(capsys, *argv):
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc, err, fragment):
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err and fragment in lines[0], err


def _png(path: Path, size=8, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    shape = (size, size, 3) if mode == "RGB" else (size, size)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)
    return path


def _checkpoint(path: Path, cfg, weights_cfg=None, step=3):
    torch.manual_seed(0)
    model = build_model(weights_cfg or cfg)
    save_checkpoint(path, {"config": cfg.to_dict(), "step": step, "model": model.state_dict(),
                           "ema": model.state_dict()})
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Inputs shared by the table: image folders (good, one image, a non-image, a truncated
    file), checkpoints (good, of another configuration), run folders (unfinished, foreign)."""
    root = tmp_path_factory.mktemp("inputs")
    w = {"imgs": make_image_folder(root / "imgs", n=4)}
    _png(root / "one" / "0.png")
    w["one"] = root / "one"
    make_image_folder(root / "garbage", n=2)
    make_image_folder(root / "truncated", n=2, size=64)
    (root / "garbage" / "notes.png").write_text("not an image")
    big = _png(root / "big.png", size=64).read_bytes()
    (root / "truncated" / "cut.png").write_bytes(big[: len(big) // 2])
    w["garbage"], w["truncated"] = root / "garbage", root / "truncated"
    cfg = get_preset("tiny", ["diffusion.T=21"])
    w["ckpt"] = _checkpoint(root / "ckpt" / "final.pt", cfg)
    # the config says ch=32, the weights are a ch=64 network's
    w["mismatch"] = _checkpoint(root / "mismatch.pt", cfg, get_preset("tiny", ["diffusion.T=21", "model.ch=64"]))
    w["unfinished"] = root / "unfinished"
    _checkpoint(w["unfinished"] / "last.pt", cfg)
    (w["unfinished"] / "config.json").write_text(cfg.to_json())
    w["foreign"] = root / "foreign"
    w["foreign"].mkdir()
    (w["foreign"] / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel", "sample_size": 32}))
    w["badrun"] = root / "badrun"
    _checkpoint(w["badrun"] / "last.pt", cfg, get_preset("tiny", ["diffusion.T=21", "model.ch=64"]))
    (w["badrun"] / "config.json").write_text(cfg.to_json())
    return w


CONFIG_CASES = [
    ("train.grad_clip=-1", "train.grad_clip=-1.0 must be positive"),
    ("train.lr=-1e-4", "train.lr=-0.0001 must be positive"),
    ("train.lr=nan", "train.lr=nan is not a finite number"),
    ("train.lr=inf", "train.lr=inf is not a finite number"),
    ("train.adam_eps=0", "train.adam_eps=0.0 must be positive"),
    ("train.warmup=-1", "train.warmup=-1 must be >= 0"),
    ("train.log_every=0", "train.log_every=0 must be >= 1"),
    ("train.ckpt_every=0", "train.ckpt_every=0 must be >= 1"),
    ("model.ch=0", "model.ch=0 must be a positive multiple of model.groups=32"),
    ("model.ch=48", "multiple of model.groups=32"),
    ("model.groups=0", "model.groups=0 must be positive"),
    ("model.dropout=1", "model.dropout=1.0 must be in [0, 1)"),
    ("model.dropout=-0.1", "model.dropout=-0.1 must be in [0, 1)"),
    ("model.ch_mult=", "model.ch_mult=() must be one or more positive multipliers"),
    ("model.attn_resolutions=5", "[5] match no resolution level of the UNet (levels: [28, 14])"),
    ("data.channels=3", "data.dataset=mnist is 1 channel(s) at 28x28"),
    ("diffusion.beta_start=0.05", "need 0 < beta_start < beta_end < 1"),
    ("diffusion.beta_end=nan", "diffusion.beta_end=nan is not a finite number"),
    ("train.ema_decay=nan", "train.ema_decay=nan is not a finite number"),
]


@pytest.mark.parametrize("override,fragment", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
@pytest.mark.parametrize("mode", ["--dry-run", "--out"])
def test_bad_config_values_are_one_line_in_dry_run_and_training(capsys, tmp_path, override, fragment, mode):
    argv = ["train", "--preset", "tiny", "--set", override, "--no-progress"]
    argv += ["--dry-run"] if mode == "--dry-run" else ["--out", tmp_path / "run"]
    rc, out, err = run(capsys, *argv)
    assert_one_line_error(rc, err, fragment)
    assert out == "" and not (tmp_path / "run").exists()


NO_GPU = not torch.cuda.is_available()
CLI_CASES = [
    # --threads and --device, for every subcommand that computes
    (["train", "--preset", "tiny", "--out", "{out}", "--threads", "-1"], "--threads -1: must be a positive"),
    (["train", "--preset", "tiny", "--out", "{out}", "--threads", "0"], "--threads 0: must be a positive"),
    (["sample", "--checkpoint", "{ckpt}", "--out", "{out}", "--threads", "0"], "--threads 0"),
    (["eval", "--checkpoint", "{ckpt}", "--out", "{out}", "--threads", "-2"], "--threads -2"),
    (["fid", "{imgs}", "{imgs}", "--threads", "0"], "--threads 0"),
    (["train", "--preset", "tiny", "--out", "{out}", "--device", "tpu"], "--device 'tpu' is not a device"),
    (["sample", "--checkpoint", "{ckpt}", "--out", "{out}", "--device", "tpu"], "--device 'tpu'"),
    (["eval", "--checkpoint", "{ckpt}", "--out", "{out}", "--device", "tpu"], "--device 'tpu'"),
    (["fid", "{imgs}", "{imgs}", "--device", "tpu"], "--device 'tpu'"),
    pytest.param(["train", "--preset", "tiny", "--out", "{out}", "--device", "cuda"], "no CUDA GPU is available",
                 marks=pytest.mark.skipif(not NO_GPU, reason="this machine has a GPU")),
    pytest.param(["sample", "--checkpoint", "{ckpt}", "--out", "{out}", "--device", "cuda:0"], "no CUDA GPU",
                 marks=pytest.mark.skipif(not NO_GPU, reason="this machine has a GPU")),
    # fid
    (["fid", "{one}", "{imgs}"], "holds 1 image(s); FID needs at least 2"),
    (["fid", "{imgs}", "{imgs}", "--n", "0"], "--n 0: must be a positive number"),
    (["fid", "{imgs}", "{imgs}", "--n", "-3"], "--n -3: must be a positive number"),
    (["fid", "{garbage}", "{imgs}"], "cannot read image"),
    (["fid", "{truncated}", "{imgs}"], "cannot read image"),
    (["fid", "{imgs}", "{imgs}", "--metrics", ""], "--metrics '': choose one or more of fid, kid, is"),
    (["fid", "{imgs}", "{imgs}", "--metrics", "fid,fd"], "choose one or more of fid, kid, is"),
    # eval
    (["eval", "--checkpoint", "{ckpt}", "--out", "{out}", "--metrics", "fid", "--n", "0"], "--n 0: must be a positive"),
    (["eval", "--checkpoint", "{ckpt}", "--out", "{out}", "--metrics", "is", "--n", "-5"], "--n -5"),
    (["eval", "--checkpoint", "{ckpt}", "--out", "{out}", "--metrics", "fid", "--n", "1"], "at least 2 samples"),
    (["eval", "--checkpoint", "{ckpt}", "--out", "{out}", "--metrics", "nll", "--nll-n", "0"], "--nll-n 0"),
    (["eval", "--checkpoint", "{ckpt}", "--out", "{out}", "--metrics", "nll", "--nll-n", "-1"], "--nll-n -1"),
    (["eval", "--checkpoint", "{ckpt}", "--out", "{out}", "--metrics", ""], "no metrics asked for"),
    (["eval", "--checkpoint", "{ckpt}", "--out", "{out}", "--metrics", "fid,nl"], "unknown metric(s) ['nl']"),
    (["eval", "--checkpoint", "{out}/missing.pt"], "does not exist"),
    (["eval", "--checkpoint", "{ckpt}", "--out", "{out}", "--metrics", "fid", "--n", "4",
      "--inception-weights", "{out}.pth"], "do not exist"),
    (["eval", "--checkpoint", "{ckpt}", "--out", "{out}", "--metrics", "fid", "--n", "4",
      "--reference", "folder:{out}-nowhere"], "nor an existing folder"),
    # a run folder as --checkpoint; checkpoints of another configuration
    (["eval", "--checkpoint", "{unfinished}", "--out", "{out}"], "is a run directory without final.pt"),
    (["sample", "--checkpoint", "{unfinished}", "--out", "{out}"], "pass {unfinished}/last.pt"),
    (["sample", "--checkpoint", "{foreign}", "--out", "{out}"], "neither final.pt/last.pt"),
    (["sample", "--checkpoint", "{mismatch}", "--out", "{out}"], "do not fit its config (113 tensor(s) of "
                                                                  "another shape, e.g. temb.0.weight: (256, 64) in "
                                                                  "the checkpoint, (128, 32) for the config)"),
    (["sample", "--checkpoint", "{ckpt}", "--out", "{out}", "--n", "0"], "--n 0 and --batch-size 64"),
    # --resume on what is not a run of this code
    (["train", "--resume", "--out", "{foreign}"], "config.json is not the config of a ddpm run"),
    (["train", "--resume", "--out", "{badrun}", "--device", "cpu"], "do not fit its config (113 tensor(s)"),
]


def _fill(argv, w, out):
    names = {k: str(v) for k, v in w.items()}
    return [a.format(out=out, **names) for a in argv]


@pytest.mark.parametrize("argv,fragment", CLI_CASES)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(capsys, tmp_path, world, argv, fragment):
    out = tmp_path / "out"
    before = {p: sorted(x.name for x in p.rglob("*")) for p in world.values() if p.is_dir()}
    rc, stdout, err = run(capsys, *_fill(argv, world, out))
    assert_one_line_error(rc, err, fragment.format(**{k: str(v) for k, v in world.items()}))
    assert stdout == ""
    assert not out.exists() and not (tmp_path / "eval").exists()
    assert not (Path(world["ckpt"]).parent / "eval").exists()
    assert {p: sorted(x.name for x in p.rglob("*")) for p in before} == before  # nothing written anywhere


def test_eval_refuses_an_out_dir_holding_samples_of_another_n(capsys, tmp_path, world):
    """Found before the model samples anything: the manifest is compared first."""
    from ddpm.config import build_diffusion

    cfg = get_preset("tiny", ["diffusion.T=21"])
    out = tmp_path / "ev"
    m = sample_manifest(build_diffusion(cfg), 2, (1, 28, 28), batch_size=256, seed=0,
                        meta={"checkpoint": str(world["ckpt"]), "step": 3, "ema": True})
    (out / "samples").mkdir(parents=True)
    (out / "samples" / "manifest.json").write_text(json.dumps(m))
    rc, _, err = run(capsys, "eval", "--checkpoint", world["ckpt"], "--out", out, "--metrics", "fid", "--n", "3")
    assert_one_line_error(rc, err, "holds samples of a different run (n: 2 there, 3 now)")
    assert sorted(p.name for p in out.rglob("*")) == ["manifest.json", "samples"]


# ------------------------------------------------------------------------ nothing is lost


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("imgs"))


def test_ctrl_c_saves_a_checkpoint_prints_one_line_and_resumes_exactly(capsys, images, tmp_path, monkeypatch):
    over = tiny_overrides(images)  # 12 steps, checkpoints every 5
    TR.train(get_preset("tiny", over), tmp_path / "ref", device="cpu", progress=False)
    on_loss_call(monkeypatch, 7, "sigint")  # Ctrl-C during step 7
    out = tmp_path / "run"
    rc, _, err = run(capsys, "train", "--preset", "tiny", *as_cli_sets(over), "--out", out, "--device", "cpu",
                     "--no-progress")
    monkeypatch.undo()
    assert rc == 130
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("data: ")]
    assert lines == [f"interrupted (Ctrl-C) at step 7 of 12: saved {out / 'last.pt'}; continue with: "
                     f"python -m ddpm train --out {out} --resume"]
    assert read_checkpoint(out / "last.pt")["step"] == 7 and not (out / "final.pt").exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is put back
    rc, _, err = run(capsys, "train", "--out", out, "--resume", "--device", "cpu", "--no-progress")
    assert rc == 0, err
    a, b = read_checkpoint(tmp_path / "ref" / "final.pt"), read_checkpoint(out / "final.pt")
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key


def test_a_divergence_can_be_resumed_with_a_lower_lr_and_it_is_recorded(capsys, images, tmp_path, monkeypatch):
    on_loss_call(monkeypatch, 7, "nan")
    over = tiny_overrides(images)
    out = tmp_path / "run"
    rc, _, err = run(capsys, "train", "--preset", "tiny", *as_cli_sets(over), "--out", out, "--device", "cpu",
                     "--no-progress")
    monkeypatch.undo()
    assert rc == 3  # EXIT_DIVERGED: its own code, which experiments.run records as diverged
    advice = f"python -m ddpm train --out {out} --resume --set train.lr=5e-05"
    assert advice in err
    # the advice works: only train.lr may change, and only because of the divergence
    rc, _, err = run(capsys, *advice.split()[3:], "--set", "train.warmup=4", "--device", "cpu", "--no-progress")
    assert_one_line_error(rc, err, "train.warmup (run: 3, now: 4)")
    rc, _, err = run(capsys, *advice.split()[3:], "--device", "cpu", "--no-progress")
    assert rc == 0, err
    assert read_checkpoint(out / "final.pt")["config"]["train"]["lr"] == 5e-05
    rec = json.loads((out / "run.json").read_text())
    assert "--resume" not in rec["command"]  # the first call's record stays on top
    (resumed,) = rec["resumes"]
    assert resumed["config_changes"] == {"train.lr": [2e-4, 5e-05]}
    assert resumed["reason"] == "non-finite loss at step 7" and resumed["resumed_from_step"] == 5
    events = [json.loads(ln) for ln in (out / "stats.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e.get("event") == "nonfinite"] == [7]  # the history stays
    # once past the divergence, the learning rate is fixed again
    rc, _, err = run(capsys, "train", "--out", out, "--resume", "--set", "train.steps=14", "--set",
                     "train.lr=1e-5", "--device", "cpu", "--no-progress")
    assert_one_line_error(rc, err, "train.lr (run: 5e-05, now: 1e-05)")


def test_resume_keeps_the_run_history_and_finds_the_runs_data_dir(capsys, tmp_path, monkeypatch):
    data = tmp_path / "data"
    make_image_folder(data / "imgs", n=8)
    over = tiny_overrides("imgs", **{"train.steps": 3, "train.ckpt_every": 3})  # data.path relative
    out = tmp_path / "run"
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # where ./data finds nothing
    monkeypatch.delenv("DDPM_DATA_DIR", raising=False)
    rc, _, err = run(capsys, "train", "--preset", "tiny", *as_cli_sets(over), "--out", out, "--data-dir", data,
                     "--device", "cpu", "--no-progress")
    assert rc == 0, err
    first = json.loads((out / "run.json").read_text())
    rc, stdout, err = run(capsys, "train", "--out", out, "--resume", "--set", "train.steps=5", "--device", "cpu",
                          "--no-progress")
    assert rc == 0, err
    assert f"data dir {data} (from {out / 'run.json'})" in stdout
    rec = json.loads((out / "run.json").read_text())
    assert {k: v for k, v in rec.items() if k != "resumes"} == first
    assert len(rec["resumes"]) == 1 and rec["resumes"][0]["resumed_from_step"] == 3
    assert "--resume" in rec["resumes"][0]["command"] and rec["resumes"][0]["data_dir"] == str(data)


def test_outputs_get_the_usual_file_mode(images, tmp_path):
    """Other users of a shared machine can read runs, checkpoints, metrics and samples."""
    from ddpm.config import build_diffusion
    from ddpm.evaluate import _write_json
    from ddpm.generate import generate

    old = os.umask(0o022)
    try:
        cfg = tiny_config(images, **{"train.steps": 3, "train.ckpt_every": 3})
        TR.train(cfg, tmp_path / "run", device="cpu", progress=False)
        _write_json(tmp_path / "metrics.json", {"x": 1})
        generate(lambda x, t: 0 * x, build_diffusion(cfg), 2, (3, 8, 8), out_dir=tmp_path / "s", batch_size=1,
                 progress=False)
    finally:
        os.umask(old)
    files = [tmp_path / "run" / f for f in ("config.json", "run.json", "last.pt", "final.pt")]
    files += [tmp_path / "metrics.json", tmp_path / "s" / "manifest.json", tmp_path / "s" / "shard_00000.npz"]
    assert {f.name: oct(stat.S_IMODE(f.stat().st_mode)) for f in files} == {f.name: "0o644" for f in files}


@pytest.mark.skipif(SHARED_DATA is None, reason="needs MNIST in ../shared/data")
def test_a_second_eval_into_the_same_folder_adds_to_metrics_json(capsys, tmp_path, world):
    out = tmp_path / "ev"
    common = ["eval", "--checkpoint", world["ckpt"], "--out", out, "--data-dir", SHARED_DATA, "--nll-n", "2",
              "--nll-splits", "test", "--no-figures", "--no-progress", "--device", "cpu"]
    assert run(capsys, *common, "--metrics", "nll")[0] == 0
    first = json.loads((out / "metrics.json").read_text())
    rc, stdout, err = run(capsys, *common, "--metrics", "rd")
    assert rc == 0, err
    m = json.loads((out / "metrics.json").read_text())
    assert m["results"]["nll_test"] == first["results"]["nll_test"]  # kept, not recomputed
    assert "rd" in m["results"] and m["run"]["metrics_requested"] == ["rd"]
    assert [c["metrics_requested"] for c in m["run"]["earlier_calls"]] == [["nll"]]
    # another evaluation (another variance) into the same folder is refused, nothing changes
    rc, _, err = run(capsys, *common, "--metrics", "nll", "--var", "beta_tilde")
    assert_one_line_error(rc, err, "holds the results of another evaluation (variance: 'beta' there, "
                                   "'beta_tilde' now)")
    assert json.loads((out / "metrics.json").read_text()) == m


# ------------------------------------------------------------------ fid and sample folders


def test_fid_reads_gray_and_rgb_together_and_a_sample_folder_without_its_grid(capsys, tmp_path, world):
    from ddpm.sources import load_images

    mixed = tmp_path / "mixed"
    _png(mixed / "a.png", mode="L", seed=1)
    _png(mixed / "b.png", mode="RGB", seed=2)
    images, _, _ = load_images(str(mixed))
    assert images.shape == (2, 3, 8, 8)
    gray = np.asarray(Image.open(mixed / "a.png").convert("RGB")).transpose(2, 0, 1)
    assert np.array_equal(images[0].numpy(), gray)
    # a folder written by `sample` (--checkpoint: a run folder, i.e. its final.pt)
    rc, _, err = run(capsys, "sample", "--checkpoint", world["ckpt"].parent, "--n", "3", "--out", tmp_path / "s",
                     "--device", "cpu")
    assert rc == 0, err
    assert (tmp_path / "s" / "grid.png").is_file()
    images, desc, _ = load_images(str(tmp_path / "s"))
    assert images.shape == (3, 1, 28, 28) and "python -m ddpm sample" in desc


@pytest.fixture(scope="module")
def offline_weights(tmp_path_factory):
    from ddpm import inception as F

    require_fid_helper()
    path = F.default_converted_path()
    return path if path.is_file() else F.build_inception_weights(tmp_path_factory.mktemp("w") / "inception.pth")


def test_fid_warns_about_different_sizes_and_describes_what_it_did(capsys, tmp_path, monkeypatch, offline_weights):
    a, b = tmp_path / "a", tmp_path / "b"
    for k in range(2):
        _png(a / f"{k}.png", size=8, seed=k)
        _png(b / f"{k}.png", size=16, seed=10 + k)
    monkeypatch.setenv("DDPM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("DDPM_INCEPTION_WEIGHTS", str(offline_weights))
    rc, stdout, err = run(capsys, "fid", a, b, "--metrics", "fid,is", "--no-progress", "--device", "cpu")
    assert rc == 0, err
    res = json.loads(stdout)
    assert res["shape_a_chw"] == [3, 8, 8] and res["shape_b_chw"] == [3, 16, 16]
    assert "warning: the inputs differ in size or channels (A: 3x8x8, B: 3x16x16" in err
    assert res["warning"].startswith("the inputs differ")
    assert np.isfinite(res["fid"])
    assert res["is"] is None and "not available offline" in res["is_unavailable"]
    assert "IS" not in res["inception"]["network"]  # IS was not computed
    assert res["inception"]["channels"] == "3-channel (RGB) images, fed as they are"


def test_eval_says_why_is_is_null_offline(capsys, tmp_path, world, monkeypatch, offline_weights):
    monkeypatch.setenv("DDPM_CACHE_DIR", str(tmp_path / "cache"))
    rc, stdout, err = run(capsys, "eval", "--checkpoint", world["ckpt"], "--out", tmp_path / "ev", "--metrics", "is",
                          "--n", "2", "--inception-weights", offline_weights, "--no-figures", "--no-progress",
                          "--device", "cpu")
    assert rc == 0, err
    printed = json.loads(stdout.strip().splitlines()[-1])
    assert printed["is"]["value"] is None and "not available offline" in printed["is"]["unavailable"]


# ------------------------------------------------------------------------------- --help


def _subparsers():
    parser = cli.build_parser()
    return next(a for a in parser._actions if a.dest == "command").choices


@pytest.mark.parametrize("name", ["train", "sample", "eval", "fid"])
def test_every_option_has_help_and_every_computing_command_takes_threads(name):
    p = _subparsers()[name]
    assert p.description
    options = {a.dest: a for a in p._actions if a.dest != "help"}
    assert "threads" in options and "device" in options
    assert [d for d, a in options.items() if not a.help] == []


def test_eval_help_states_the_paper_scale_defaults():
    text = _subparsers()["eval"].format_help()
    assert "default 50000" in text and "every image" in text


def test_ctrl_c_in_other_commands_is_one_line_and_exit_130(capsys, tmp_path, world, monkeypatch):
    import ddpm.cli.sample

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ddpm.cli.sample, "generate", interrupted)
    rc, _, err = run(capsys, "sample", "--checkpoint", world["ckpt"], "--out", tmp_path / "s", "--device", "cpu")
    assert rc == 130 and err.splitlines() == ["interrupted (Ctrl-C): `python -m ddpm sample` did not finish"]
