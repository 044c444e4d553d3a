"""Configuration: the paper's values, overrides, and errors for bad input."""

import pytest

from ddpm.config import PRESETS, Config, apply_overrides, get_preset


def test_cifar10_preset_is_the_papers_setup():
    c = get_preset("cifar10")
    assert (c.diffusion.T, c.diffusion.schedule, c.diffusion.mean_type, c.diffusion.var_type,
            c.diffusion.loss_type) == (1000, "linear", "eps", "beta", "simple")
    assert (c.model.ch, c.model.ch_mult, c.model.num_res_blocks, c.model.attn_resolutions,
            c.model.dropout) == (128, (1, 2, 2, 2), 2, (16,), 0.1)
    t = c.train
    assert (t.lr, t.warmup, t.grad_clip, t.adam_eps, t.ema_decay, t.batch_size, t.steps) == \
        (2e-4, 5000, 1.0, 1e-8, 0.9999, 128, 800_000)
    assert c.data.hflip and c.data.resolution == 32


def test_256_preset():
    c = get_preset("celebahq256")
    assert c.model.ch_mult == (1, 1, 2, 2, 4, 4) and c.model.dropout == 0.0
    assert (c.train.lr, c.train.batch_size, c.data.resolution) == (2e-5, 64, 256)


def test_overrides_are_typed():
    c = get_preset("cifar10", ["diffusion.var_type=beta_tilde", "train.lr=1e-3", "model.ch_mult=1,2",
                               "data.hflip=false", "train.steps=1_000"])
    assert c.diffusion.var_type == "beta_tilde" and c.train.lr == 1e-3
    assert c.model.ch_mult == (1, 2) and c.data.hflip is False and c.train.steps == 1000


@pytest.mark.parametrize("override,match", [
    ("train.lrate=1", "valid keys in train: steps, batch_size, lr"),
    ("optim.lr=1", "section.name with section in data, model, diffusion, train"),
    ("train.steps=abc", "cannot read 'abc' as int"),
    ("train.steps=1.5", "cannot read '1.5' as int"),
    ("data.hflip=maybe", "as bool"),
    ("diffusion.mean_type=epsilon", "valid: eps, mu, x0"),
    ("diffusion.var_type=learned", "vlb"),
    ("train.lr", "section.key=value"),
])
def test_bad_overrides_are_errors(override, match):
    with pytest.raises((KeyError, ValueError), match=match):
        get_preset("cifar10", [override])


def test_unknown_preset_lists_valid_ones():
    with pytest.raises(KeyError, match="cifar10"):
        get_preset("cifar100")


def test_round_trip_through_dict_and_every_preset_validates():
    for name in PRESETS:
        c = get_preset(name)
        assert Config.from_dict(c.to_dict()) == c


def test_mnist_resolution_must_fit_the_downsampling():
    with pytest.raises(ValueError, match="divisible"):
        apply_overrides(get_preset("mnist"), ["model.ch_mult=1,2,2,2"])


def test_linear_schedule_endpoints_are_config_fields():
    import numpy as np

    from ddpm.config import ConfigError, build_diffusion
    from ddpm.diffusion import make_betas

    c = get_preset("cifar10")
    assert (c.diffusion.beta_start, c.diffusion.beta_end) == (1e-4, 0.02)
    assert np.array_equal(build_diffusion(c).betas, make_betas("linear", 1000))  # the numerics of before
    assert np.array_equal(build_diffusion(get_preset("tiny")).betas, make_betas("linear", 100))  # scaled by 1000/T
    ablated = build_diffusion(get_preset("cifar10", ["diffusion.beta_end=0.01"])).betas
    assert (ablated[0], ablated[-1]) == (1e-4, 0.01)
    half = build_diffusion(get_preset("tiny", ["diffusion.beta_start=2e-4"])).betas  # T=100: x10
    assert half[0] == pytest.approx(2e-3) and half[-1] == pytest.approx(0.2)
    with pytest.raises(ConfigError, match="does not use them"):
        get_preset("cifar10", ["diffusion.schedule=cosine", "diffusion.beta_end=0.01"])
    with pytest.raises(ConfigError, match="too small for the linear schedule"):
        get_preset("tiny", ["diffusion.beta_end=0.2"])  # x10 at T=100: beta_T = 2


def test_the_tiny_preset_is_not_named_like_a_reproduction_profile():
    from experiments.registry import PROFILES

    assert "tiny" in PRESETS and not set(PRESETS) & set(PROFILES)


def test_config_errors_are_value_errors_printed_without_quotes():
    from ddpm.config import ConfigError

    with pytest.raises(ConfigError) as e:
        get_preset("cifar10", ["train.nope=1"])
    assert isinstance(e.value, KeyError) and isinstance(e.value, ValueError)
    assert str(e.value).startswith("unknown config key 'train.nope'")
    with pytest.raises(ConfigError, match="not a ddpm config"):
        Config.from_dict({"_class_name": "UNet2DModel"})


def test_ablation_choices_are_enums_in_the_config_and_plain_names_outside():
    from ddpm import diffusion as D

    cfg = get_preset("cifar10", ["diffusion.mean_type=mu", "diffusion.loss_type=vlb"])
    assert cfg.diffusion.mean_type is D.MeanType.MU and cfg.diffusion.var_type is D.VarType.BETA
    assert f"{cfg.diffusion.mean_type}" == str(cfg.diffusion.mean_type) == "mu"
    plain = cfg.to_dict()["diffusion"]
    assert type(plain["mean_type"]) is str and plain["loss_type"] == "vlb"  # safe to pickle, JSON
    # a config built in code with names is coerced by the same rule
    from ddpm.config import Config, DiffusionConfig

    built = Config(diffusion=DiffusionConfig(var_type="beta_tilde")).validate()
    assert built.diffusion.var_type is D.VarType.BETA_TILDE
