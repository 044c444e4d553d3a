"""The paper's UNet: exact size, shapes, and that it really uses its inputs."""

import pytest
import torch

from ddpm import build_model, get_preset
from ddpm.unet import UNet, num_params, timestep_embedding


def test_cifar10_unet_has_the_official_parameter_count():
    assert num_params(build_model(get_preset("cifar10"))) == 35_746_307


def test_256_unet_is_about_114M():
    n = num_params(build_model(get_preset("celebahq256")))
    assert 110e6 < n < 118e6


def test_learned_variance_doubles_output_channels():
    cfg = get_preset("tiny", ["diffusion.var_type=learned", "diffusion.loss_type=vlb"])
    model = build_model(cfg)
    x = torch.randn(2, 1, 28, 28)
    assert model(x, torch.tensor([0, 5])).shape == (2, 2, 28, 28)


def test_timestep_embedding_matches_formula():
    t = torch.tensor([0, 1, 999])
    emb = timestep_embedding(t, 8)
    freqs = torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(4) / 3)
    assert torch.allclose(emb[:, :4], torch.sin(t[:, None] * freqs))
    assert torch.allclose(emb[:, 4:], torch.cos(t[:, None] * freqs))


def test_output_depends_on_input_and_time_and_is_zero_at_init():
    torch.manual_seed(0)
    model = UNet(in_ch=1, out_ch=1, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,),
                 dropout=0.0, resolution=16).eval()
    x = torch.randn(2, 1, 16, 16)
    # the last convolution is zero-initialized, as in the official code
    assert model(x, torch.tensor([3, 3])).abs().max() == 0
    with torch.no_grad():
        for p in model.conv_out.parameters():
            p.normal_(0, 0.1)
        for m in model.modules():  # also open the zero-initialized residual branches
            if hasattr(m, "proj_out") or hasattr(m, "conv2"):
                for p in (m.proj_out if hasattr(m, "proj_out") else m.conv2).parameters():
                    p.normal_(0, 0.05)
    y1 = model(x, torch.tensor([3, 3]))
    assert not torch.allclose(y1, model(x, torch.tensor([90, 90])))  # time matters
    assert not torch.allclose(y1[0], y1[1])  # the input matters
    # each image is processed independently (GroupNorm is per example)
    assert torch.allclose(model(x[:1], torch.tensor([3])), y1[:1], atol=1e-5)


def test_rejects_wrong_resolution():
    model = build_model(get_preset("tiny"))
    with pytest.raises(AssertionError):
        model(torch.randn(1, 1, 32, 32), torch.tensor([0]))


def test_a_learned_log_variance_survives_the_forward_pass_under_bf16_autocast():
    """For 973 of the 1000 steps [log beta-tilde_t, log beta_t] is narrower than two bf16 steps:
    the output head must stay in float32 under autocast, or the learned variance is rounded
    outside its interval."""
    import numpy as np

    from ddpm.diffusion import GaussianDiffusion, linear_betas

    d = GaussianDiffusion(linear_betas(1000))
    lo, hi = d.posterior_log_variance_clipped, np.log(d.betas)
    torch.manual_seed(0)
    net = UNet(in_ch=1, out_ch=2, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), dropout=0.0,
               resolution=8).eval()
    ts = torch.tensor([100, 500, 900])
    targets = torch.tensor(lo[ts] + 0.37 * (hi[ts] - lo[ts]), dtype=torch.float32)
    with torch.no_grad():  # the variance channel outputs exactly its bias: a value inside the interval
        net.conv_out.weight[1].zero_()
        x = torch.randn(3, 1, 8, 8)
    outs = []
    for i, t in enumerate(ts):
        with torch.no_grad():
            net.conv_out.bias[1] = targets[i]
        with torch.no_grad(), torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            out = net(x[i:i + 1], t.view(1))
        assert out.dtype == torch.float32
        outs.append(out[0, 1])
    for i, t in enumerate(ts):
        assert torch.all(outs[i] == targets[i]), (int(t), outs[i].flatten()[:3], targets[i])
        assert lo[t] < float(outs[i][0, 0]) < hi[t]
    # what a bf16 head would have made of it: outside the interval (the test has power)
    rounded = targets.to(torch.bfloat16).float()
    assert any(not lo[t] < float(r) < hi[t] for t, r in zip(ts, rounded)), rounded


def test_attention_is_the_reference_formula_and_feeds_the_fused_kernel_contiguous_inputs(monkeypatch):
    """AttnBlock = x + proj(softmax(q k^T / sqrt(C)) v) with q, k, v the 1x1 convolutions; and what
    it hands scaled_dot_product_attention is contiguous (transposed views send it to the unfused
    path: slower on the CPU, and no flash kernel on a GPU)."""
    import math

    import torch.nn.functional as F

    from ddpm.unet import AttnBlock

    torch.manual_seed(0)
    block = AttnBlock(32)
    for p in block.parameters():  # proj_out starts at zero: perturb everything
        p.data.add_(0.1 * torch.randn_like(p))
    x = torch.randn(2, 32, 4, 4)
    h = block.norm(x)
    q, k, v = (F.conv2d(h, m.weight, m.bias).flatten(2) for m in (block.q, block.k, block.v))  # [B, C, HW]
    w = torch.softmax(q.transpose(1, 2) @ k / math.sqrt(32), dim=-1)  # [B, HW, HW]
    ref = x + F.conv2d((v @ w.transpose(1, 2)).reshape(x.shape), block.proj_out.weight, block.proj_out.bias)
    seen = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        lambda *a, **k: seen.append([t.is_contiguous() for t in a]) or real(*a, **k))
    with torch.no_grad():
        out = block(x)
    assert torch.allclose(out, ref, atol=1e-5), (out - ref).abs().max()
    assert seen == [[True, True, True]]
