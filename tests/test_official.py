"""The released weights' format (diffusers UNet2DModel) maps onto our UNet exactly, both ways.

Nothing is downloaded: the diffusers configurations of google/ddpm-cifar10-32 and
google/ddpm-celebahq-256 are written out below (as published in their config.json),
diffusers builds those networks with random weights, and our UNet, given the
converted weights, must compute the same function. The other way, `python -m ddpm
export` writes our checkpoints as diffusers folders: they load back identically, and
diffusers' UNet2DModel, DDPMScheduler and DDPMPipeline read them offline and compute
what ours do. The parity tests need diffusers (`pip install diffusers`, the `official`
extra) and skip with a reason without it; the config, name-map and file tests need only torch.
"""

import copy
import json
import os
import struct

import numpy as np
import pytest
import torch

from ddpm import cli
from ddpm import export as X
from ddpm import official as O
from ddpm.checkpoint import CheckpointError, save_checkpoint
from ddpm.loading import load_model
from ddpm.config import Config, build_diffusion, build_model, get_preset
from ddpm.sampling import p_sample
from ddpm.unet import num_params
from conftest import require_module

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # diffusers must never reach for the hub here

# The parity tests run on DDPM_TEST_DEVICE (default cpu; experiments/gpu_check.sh sets cuda).
DEVICE = torch.device(os.environ.get("DDPM_TEST_DEVICE", "cpu"))
# fp32 throughout (TF32 off, below). On a GPU the attention and reduction kernels sum in
# other orders than on the CPU, hence the looser bound there.
ATOL = 1e-5 if DEVICE.type == "cpu" else 1e-4

# google/ddpm-cifar10-32, config.json (diffusers 0.5 era; keys it omits take diffusers' defaults).
CIFAR10_CONFIG = {
    "_class_name": "UNet2DModel",
    "act_fn": "silu",
    "attention_head_dim": None,
    "block_out_channels": [128, 256, 256, 256],
    "center_input_sample": False,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "downsample_padding": 0,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "in_channels": 3,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-06,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 32,
    "time_embedding_type": "positional",
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
}
# google/ddpm-celebahq-256 (and google/ddpm-church-256), config.json.
CELEBAHQ256_CONFIG = {
    **CIFAR10_CONFIG,
    "block_out_channels": [128, 128, 256, 256, 512, 512],
    "down_block_types": ["DownBlock2D"] * 4 + ["AttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "AttnUpBlock2D"] + ["UpBlock2D"] * 4,
    "resnet_time_scale_shift": "default",
    "add_attention": True,
    "sample_size": 256,
}
# A 1.4M-parameter network of the same family, for the cheap file tests.
TINY_CONFIG = {**CIFAR10_CONFIG, "block_out_channels": [32, 64],
               "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
               "up_block_types": ["AttnUpBlock2D", "UpBlock2D"], "layers_per_block": 1}


def _kwargs(cfg):
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def _perturb(model, seed=0):
    """Randomize every parameter: zero-initialized output layers and GroupNorm's 1/0
    would otherwise make swapped names (norm1 vs norm2, conv2, proj_out) undetectable."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            scale = p.std().item() if p.numel() > 1 and p.std() > 0 else 0.1
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model.eval()


def _inputs(batch, res, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, res, res, generator=g)
    t = torch.cat([torch.tensor([0, 999]), torch.randint(0, 1000, (batch,), generator=g)])[:batch]
    return x, t


@pytest.fixture(scope="module", autouse=True)
def no_tf32():
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("DDPM_TEST_DEVICE=cuda but torch sees no GPU")
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _same_outputs(ours, theirs, x, t):
    """Run both networks on DEVICE and compare to ATOL; also that the function is not trivial."""
    ours, theirs, x, t = ours.to(DEVICE), theirs.to(DEVICE), x.to(DEVICE), t.to(DEVICE)
    with torch.no_grad():
        want, got = theirs(x, t).sample, ours(x, t)
    assert want.abs().max() > 0.1  # a non-trivial function, not zeros
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


@pytest.fixture(scope="module")
def diffusers():
    return require_module("diffusers", "the parity tests need diffusers: pip install diffusers")


@pytest.fixture(scope="module")
def cifar_pair(diffusers):
    """diffusers' UNet2DModel in the google/ddpm-cifar10-32 configuration, random weights."""
    torch.manual_seed(0)
    return _perturb(diffusers.UNet2DModel(**_kwargs(CIFAR10_CONFIG)))


# ------------------------------------------------------------------- configs (torch only)


def test_cifar10_config_is_the_papers_network():
    cfg = O.config_from_diffusers(CIFAR10_CONFIG)
    assert cfg.model == get_preset("cifar10").model
    assert cfg.diffusion.var_type == "beta"  # fixedlarge, as the paper's CIFAR10 model
    assert (cfg.data.resolution, cfg.data.channels) == (32, 3)
    assert num_params(build_model(cfg)) == 35_746_307


def test_256_config_is_the_papers_256_network():
    cfg = O.config_from_diffusers(CELEBAHQ256_CONFIG)
    assert cfg.model.ch == 128 and cfg.model.ch_mult == (1, 1, 2, 2, 4, 4)
    assert cfg.model.attn_resolutions == (16,) and cfg.model.num_res_blocks == 2
    assert cfg.diffusion.var_type == "beta_tilde"  # fixedsmall, as the official 256 runs
    assert cfg.data.resolution == 256
    assert num_params(build_model(cfg)) == 113_673_219  # the paper's "about 114M"


def test_scheduler_config_sets_schedule_parameterization_and_variance():
    sched = {"beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
             "num_train_timesteps": 1000, "variance_type": "fixed_small"}
    assert O.config_from_diffusers(CIFAR10_CONFIG, sched).diffusion == get_preset(
        "cifar10", ["diffusion.var_type=beta_tilde"]).diffusion
    # the oldest file format (google/ddpm-cifar10-32's first upload) says "timesteps"
    old = {"beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear", "timesteps": 1000,
           "variance_type": "fixed_large"}
    assert O.config_from_diffusers(CIFAR10_CONFIG, old).diffusion.var_type == "beta"
    d = O.config_from_diffusers(CIFAR10_CONFIG, {**sched, "beta_schedule": "squaredcos_cap_v2",
                                                 "num_train_timesteps": 4000, "prediction_type": "sample"}).diffusion
    assert (d.schedule, d.T, d.mean_type) == ("cosine", 4000, "x0")
    # DDPMScheduler's beta_start/beta_end are beta_1/beta_T; ours the endpoints for T = 1000
    d = O.config_from_diffusers(CIFAR10_CONFIG, {**sched, "beta_end": 0.04, "num_train_timesteps": 500}).diffusion
    assert (d.T, d.beta_start, d.beta_end) == (500, pytest.approx(5e-5), pytest.approx(0.02))
    for change, message in [({"beta_schedule": "scaled_linear"}, "not one of ours"),
                            ({"prediction_type": "v_prediction"}, "prediction_type"),
                            ({"variance_type": "learned_range"}, "variance_type")]:
        with pytest.raises(O.OfficialWeightsError, match=message):
            O.config_from_diffusers(CIFAR10_CONFIG, {**sched, **change})


ABSENT = object()


@pytest.mark.parametrize("change, message", [
    ({"flip_sin_to_cos": True}, "flip_sin_to_cos"),
    ({"norm_eps": ABSENT}, "norm_eps"),  # absent: diffusers assumes 1e-5, not the official 1e-6
    ({"attention_head_dim": 8}, "attention_head_dim"),
    ({"downsample_padding": 1}, "downsample_padding"),
    ({"up_block_types": ["AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"]}, "level"),
    ({"_class_name": "UNet2DConditionModel"}, "UNet2DModel"),
    ({"sample_size": 64}, "sample_size"),
])
def test_networks_we_do_not_implement_are_rejected(change, message):
    cfg = {**CIFAR10_CONFIG, **change}
    cfg = {k: v for k, v in cfg.items() if v is not ABSENT}
    with pytest.raises(O.OfficialWeightsError, match=message):
        O.config_from_diffusers(cfg)


@pytest.mark.parametrize("dcfg", [CIFAR10_CONFIG, CELEBAHQ256_CONFIG], ids=["cifar10", "256"])
def test_name_map_covers_every_parameter_once(dcfg):
    cfg = O.config_from_diffusers(dcfg)
    pairs = O.parameter_map(cfg)
    ours = [f"{a}.{leaf}" for a, _ in pairs for leaf in ("weight", "bias")]
    theirs = [b for _, b in pairs]
    assert len(set(ours)) == len(ours) and len(set(theirs)) == len(theirs)
    assert sorted(ours) == sorted(build_model(cfg).state_dict())


# -------------------------------------------------------------------- files (torch only)


def _write_folder(folder, dcfg, theirs, fmt):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(dcfg))
    if fmt == "bin":
        torch.save(theirs, folder / "diffusion_pytorch_model.bin")
    else:  # safetensors, written by hand from the format's definition
        header, offset, blobs = {}, 0, []
        for name, value in theirs.items():
            blob = value.contiguous().numpy().tobytes()
            header[name] = {"dtype": "F32", "shape": list(value.shape), "data_offsets": [offset, offset + len(blob)]}
            offset += len(blob)
            blobs.append(blob)
        head = json.dumps(header).encode()
        (folder / "diffusion_pytorch_model.safetensors").write_bytes(struct.pack("<Q", len(head)) + head + b"".join(blobs))


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_load_model_reads_a_diffusers_folder(tmp_path, fmt):
    """Our weights -> diffusers names and files -> load_model -> the same network."""
    cfg = O.config_from_diffusers(TINY_CONFIG)
    torch.manual_seed(0)
    model = _perturb(build_model(cfg))
    _write_folder(tmp_path / "m", TINY_CONFIG, O.to_diffusers_state_dict(model.state_dict(), cfg), fmt)
    cfg2, loaded, diffusion, state = load_model(tmp_path / "m")
    assert cfg2 == cfg and not loaded.training and diffusion.T == 1000
    assert state["format"] == "diffusers-folder" and state["weights_file"].endswith(fmt)
    assert state["step"] == -1  # not recorded in diffusers files; -1 = unknown, as ddpm.evaluate writes
    x, t = _inputs(2, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x, t), model(x, t))


def test_legacy_attention_names_load(tmp_path):
    """Files from diffusers < 0.14 call the attention projections query/key/value/proj_attn."""
    cfg = O.config_from_diffusers(TINY_CONFIG)
    sd = O.to_diffusers_state_dict(_perturb(build_model(cfg)).state_dict(), cfg)
    legacy = {}
    for k, v in sd.items():
        for new, old in O.LEGACY_ATTN_NAMES.items():
            k = k.replace(f".{new}.", f".{old}.")
        legacy[k] = v
    assert any(".query." in k for k in legacy) and any(".proj_attn." in k for k in legacy)
    converted = O.convert_state_dict(legacy, cfg)
    assert all(torch.equal(converted[k], v) for k, v in O.convert_state_dict(sd, cfg).items())


def test_bad_folders_give_clear_errors(tmp_path):
    cfg = O.config_from_diffusers(TINY_CONFIG)
    sd = O.to_diffusers_state_dict(build_model(cfg).state_dict(), cfg)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="neither a checkpoint file nor a diffusers folder"):
        load_model(tmp_path / "empty")
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text(json.dumps(TINY_CONFIG))
    with pytest.raises(CheckpointError, match="none of diffusion_pytorch_model"):
        load_model(tmp_path / "noweights")
    _write_folder(tmp_path / "ok", TINY_CONFIG, sd, "safetensors")
    with pytest.raises(CheckpointError, match="no raw weights"):
        load_model(tmp_path / "ok", ema=False)
    f = tmp_path / "ok" / "diffusion_pytorch_model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="truncated"):
        load_model(tmp_path / "ok")
    del sd["conv_out.bias"]
    sd["extra.weight"] = torch.zeros(1)
    _write_folder(tmp_path / "keys", TINY_CONFIG, sd, "bin")
    with pytest.raises(CheckpointError, match="conv_out.bias"):
        load_model(tmp_path / "keys")


def test_safetensors_reader_matches_the_package(tmp_path):
    st = require_module("safetensors.torch", "needs the safetensors package (comes with diffusers)")
    tensors = {"a": torch.randn(3, 4), "b": torch.randn(5).to(torch.bfloat16), "c": torch.arange(6).reshape(2, 3),
               "d": torch.randn(2, 2, 1, 1).half()}
    st.save_file(tensors, tmp_path / "x.safetensors", metadata={"format": "pt"})
    got = O.read_safetensors(tmp_path / "x.safetensors")
    assert set(got) == set(tensors)
    assert all(got[k].dtype == v.dtype and torch.equal(got[k], v) for k, v in tensors.items())


# --------------------------------------------------------------- parity against diffusers


def test_cifar10_parity_with_diffusers(cifar_pair):
    cfg = O.config_from_diffusers(CIFAR10_CONFIG)
    ours = O.load_converted(build_model(cfg), O.convert_state_dict(cifar_pair.state_dict(), cfg)).eval()
    _same_outputs(ours, cifar_pair, *_inputs(4, 32))


def test_cifar10_pipeline_folder_through_load_model(cifar_pair, diffusers, tmp_path):
    """DDPMPipeline.save_pretrained layout (unet/ + scheduler/), as downloaded from the hub."""
    sched = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                                    beta_schedule="linear", variance_type="fixed_large")
    diffusers.DDPMPipeline(unet=cifar_pair, scheduler=sched).save_pretrained(tmp_path)
    cfg, ours, _, state = load_model(tmp_path)
    assert state["weights_file"].endswith("unet/diffusion_pytorch_model.safetensors")
    assert cfg.diffusion.var_type == "beta" and cfg.model == get_preset("cifar10").model
    _same_outputs(ours, cifar_pair, *_inputs(2, 32, seed=2))


def test_256_parity_with_diffusers(diffusers):
    """The 114M-parameter 256x256 network: one 256x256 image (about 15 s on 2 CPU cores)."""
    torch.manual_seed(0)
    theirs = _perturb(diffusers.UNet2DModel(**_kwargs(CELEBAHQ256_CONFIG)))
    cfg = O.config_from_diffusers(CELEBAHQ256_CONFIG)
    ours = O.load_converted(build_model(cfg), O.convert_state_dict(theirs.state_dict(), cfg)).eval()
    x, _ = _inputs(1, 256)
    _same_outputs(ours, theirs, x, torch.tensor([731]))


@pytest.mark.skipif(DEVICE.type == "cpu", reason="compares DDPM_TEST_DEVICE (e.g. cuda) with the CPU")
def test_our_unet_on_the_device_matches_the_cpu():
    """Needs no diffusers: the accelerator's kernels compute the same network as the CPU's."""
    cfg = O.config_from_diffusers(CIFAR10_CONFIG)
    torch.manual_seed(0)
    model = _perturb(build_model(cfg))
    x, t = _inputs(4, 32)
    with torch.no_grad():
        want = model(x, t)
        got = copy.deepcopy(model).to(DEVICE)(x.to(DEVICE), t.to(DEVICE)).cpu()
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


# ------------------------------------------------------------- export: ours -> diffusers


def _tiny_cfg(**over):
    """A 0.5M-parameter 8x8 network of the paper's family (attention at 4x4)."""
    return get_preset("cifar10", {"data.dataset": "folder", "data.path": "images", "data.resolution": 8,
                                  "model.ch": 32, "model.ch_mult": (1, 2), "model.num_res_blocks": 1,
                                  "model.attn_resolutions": (4,), **over})


def _checkpoint(path, cfg):
    """A checkpoint whose raw and EMA weights differ (both randomized), at step 42."""
    torch.manual_seed(0)
    model, ema = _perturb(build_model(cfg), seed=1), _perturb(build_model(cfg), seed=2)
    save_checkpoint(path, {"config": cfg.to_dict(), "step": 42, "model": model.state_dict(),
                           "ema": ema.state_dict()})
    return model, ema


def _same_weights(a, b):
    a, b = a.state_dict(), b.state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _cli(capsys, *argv):
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


EXPORTABLE = {
    "paper-cifar10": {},  # linear 1e-4..0.02, T = 1000, sigma^2 = beta (fixed_large), eps
    "linear-T50-beta_tilde": {"diffusion.T": 50, "diffusion.var_type": "beta_tilde"},
    "cosine-x0": {"diffusion.T": 100, "diffusion.schedule": "cosine", "diffusion.mean_type": "x0",
                  "diffusion.var_type": "beta_tilde"},
}


@pytest.mark.parametrize("over", EXPORTABLE.values(), ids=EXPORTABLE.keys())
def test_export_to_diffusers_round_trips_and_diffusers_computes_the_same(diffusers, tmp_path, over):
    cfg = _tiny_cfg(**over)
    T = cfg.diffusion.T
    _, ema = _checkpoint(tmp_path / "c.pt", cfg)
    res = X.export_diffusers(tmp_path / "c.pt", tmp_path / "d")
    assert sorted(res["files"]) == sorted(p.name for p in (tmp_path / "d").iterdir())

    # ours -> diffusers folder -> ours: the same config, step and (EMA) weights
    cfg2, back, _, state = load_model(tmp_path / "d")
    assert cfg2 == cfg and state["step"] == 42 and _same_weights(back, ema)

    # diffusers reads the folder (offline) as the same network ...
    g = torch.Generator().manual_seed(3)
    x, t = torch.randn(3, 3, 8, 8, generator=g), torch.tensor([0, T - 1, T // 2])
    _same_outputs(back, diffusers.UNet2DModel.from_pretrained(tmp_path / "d"), x, t)
    # ... and its DDPMPipeline/DDPMScheduler take our sampler's reverse step (Algorithm 2)
    pipe = diffusers.DDPMPipeline.from_pretrained(tmp_path / "d")
    assert isinstance(pipe.unet, diffusers.UNet2DModel) and isinstance(pipe.scheduler, diffusers.DDPMScheduler)
    diffusion = build_diffusion(cfg)
    np.testing.assert_allclose(pipe.scheduler.betas.double().numpy(), diffusion.betas, rtol=1e-6)
    for step in (0, 1, T // 2, T - 1):
        xt, model_out = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g)
        theirs = pipe.scheduler.step(model_out, step, xt, generator=torch.Generator().manual_seed(step)).prev_sample
        noise = torch.randn(xt.shape, generator=torch.Generator().manual_seed(step))  # the same draw
        ours, _ = p_sample(diffusion, lambda *_: model_out, xt, torch.full((2,), step), noise=noise)
        torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)  # float32 vs float64 schedule
    images = pipe(batch_size=1, num_inference_steps=2, output_type="np").images
    assert images.shape == (1, 8, 8, 3) and np.isfinite(images).all()


def test_export_raw_weights_and_bare_safetensors_through_the_command_line(tmp_path, capsys):
    cfg = _tiny_cfg()
    model, ema = _checkpoint(tmp_path / "c.pt", cfg)
    rc, out, _ = _cli(capsys, "export", "--checkpoint", tmp_path / "c.pt", "--format", "diffusers",
                      "--out", tmp_path / "raw", "--no-ema")
    assert rc == 0 and "raw weights of step 42" in out and "DDPMPipeline.from_pretrained" in out
    assert _same_weights(load_model(tmp_path / "raw", ema=False)[1], model)
    with pytest.raises(CheckpointError, match="raw"):
        load_model(tmp_path / "raw")  # never the raw weights in place of the EMA ones

    rc, out, _ = _cli(capsys, "export", "--checkpoint", tmp_path / "c.pt", "--format", "safetensors",
                      "--out", tmp_path / "m.safetensors")
    assert rc == 0 and "EMA weights of step 42" in out
    cfg2, back, _, state = load_model(tmp_path / "m.safetensors")
    assert cfg2 == cfg and state["step"] == 42 and _same_weights(back, ema)
    tensors, meta = O.read_safetensors(tmp_path / "m.safetensors", with_metadata=True)
    assert Config.from_dict(json.loads(meta["ddpm_config"])) == cfg and meta["ddpm_weights"] == "ema"
    assert tensors.keys() == ema.state_dict().keys()

    rc, _, err = _cli(capsys, "export", "--checkpoint", tmp_path / "c.pt", "--out", tmp_path / "raw")
    assert rc == 2 and "nothing is overwritten" in err


def test_safetensors_writer_matches_the_package(tmp_path):
    st = require_module("safetensors.torch", "needs the safetensors package (comes with diffusers)")
    from safetensors import safe_open

    tensors = {"a": torch.randn(3, 4), "b": torch.randn(5).to(torch.bfloat16), "c": torch.arange(6).reshape(2, 3),
               "d": torch.randn(2, 2, 1, 1).half(), "e": torch.tensor(1.5, dtype=torch.float64)}
    O.write_safetensors(tmp_path / "x.safetensors", tensors, {"format": "pt", "k": "v"})
    got = st.load_file(tmp_path / "x.safetensors")
    assert set(got) == set(tensors)
    assert all(got[k].dtype == v.dtype and torch.equal(got[k], v) for k, v in tensors.items())
    with safe_open(tmp_path / "x.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt", "k": "v"}


@pytest.mark.parametrize("over, reason", [
    ({"diffusion.var_type": "learned", "diffusion.loss_type": "vlb"}, "var_type='learned'"),
    ({"diffusion.mean_type": "mu"}, "mean_type='mu'"),
], ids=["learned-variance", "mu-prediction"])
def test_export_refuses_what_ddpmscheduler_cannot_express(tmp_path, capsys, over, reason):
    """A one-line reason and nothing written; the bare safetensors export takes any config."""
    cfg = _tiny_cfg(**over)
    _, ema = _checkpoint(tmp_path / "c.pt", cfg)
    rc, _, err = _cli(capsys, "export", "--checkpoint", tmp_path / "c.pt", "--out", tmp_path / "d")
    assert rc == 2 and err.count("\n") == 1 and reason in err and "--format safetensors" in err
    assert not (tmp_path / "d").exists()
    X.export_safetensors(tmp_path / "c.pt", tmp_path / "m.safetensors")
    cfg2, back, _, _ = load_model(tmp_path / "m.safetensors")
    assert cfg2 == cfg and _same_weights(back, ema)
