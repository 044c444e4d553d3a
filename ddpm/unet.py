"""The paper's UNet (Appendix B; official diffusion_tf/models/unet.py), in PyTorch.

A PixelCNN++-style UNet: residual blocks with GroupNorm (32 groups, as the paper; fewer only for the
CPU-scale networks narrower than 32 channels) and swish, a sinusoidal
time embedding fed through an MLP of width 4*ch into every residual block,
self-attention at chosen resolutions and in the middle. The network knows nothing
about how its output is used (eps, mu or x0; fixed or learned variance): that is
ddpm.diffusion's job. For the CIFAR10 configuration it has exactly 35,746,307
parameters, like the official model.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

GROUPS = 32  # the paper's GroupNorm groups (UNet(groups=...) for narrower CPU-scale networks)
GN_EPS = 1e-6  # the official code's GroupNorm epsilon (tf.contrib.layers.group_norm's 1e-6)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of the (0-based) step index, as in the official code:
    frequencies exp(-log(10000) i / (dim/2 - 1)), [sin | cos] concatenated."""
    assert t.ndim == 1 and dim % 2 == 0
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / (half - 1))
    args = t.float()[:, None] * freqs[None, :]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


def _zero(module: nn.Module) -> nn.Module:
    """Zero-initialize (the official init_scale=0 on the last layer of each branch)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def _norm(ch: int, groups: int) -> nn.GroupNorm:
    if ch % groups:
        raise ValueError(f"GroupNorm({groups}) needs channel counts divisible by {groups}, got {ch}: "
                         "use model.ch a multiple of model.groups")
    return nn.GroupNorm(groups, ch, eps=GN_EPS)


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, temb_ch: int, dropout: float, groups: int = GROUPS):
        super().__init__()
        self.norm1 = _norm(in_ch, groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.temb_proj = nn.Linear(temb_ch, out_ch)
        self.norm2 = _norm(out_ch, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        # The official block uses a 1x1 "nin" projection when channels change.
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions, with a residual connection."""

    def __init__(self, ch: int, groups: int = GROUPS):
        super().__init__()
        self.norm = _norm(ch, groups)
        self.q = nn.Conv2d(ch, ch, 1)
        self.k = nn.Conv2d(ch, ch, 1)
        self.v = nn.Conv2d(ch, ch, 1)
        self.proj_out = _zero(nn.Conv2d(ch, ch, 1))

    def forward(self, x):
        B, C, H, W = x.shape
        # The 1x1 convolutions as matmuls over the H*W positions (the same weights, [C, C, 1, 1]
        # viewed as [C, C]): q, k and v come out contiguous in [B, HW, C], the layout the fused
        # attention kernels take (transposed views sent the CPU to the unfused path: measured).
        h = self.norm(x).flatten(2).transpose(1, 2)
        q, k, v = (F.linear(h, m.weight.view(C, C), m.bias).unsqueeze(1) for m in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v).squeeze(1)  # softmax(q k^T / sqrt(C)) v
        h = F.linear(h, self.proj_out.weight.view(C, C), self.proj_out.bias)
        return x + h.transpose(1, 2).reshape(B, C, H, W)


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0)

    def forward(self, x):
        # The official TF conv uses padding 'SAME' with stride 2, which for even sizes
        # pads one pixel on the bottom/right only.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    """UNet(x_t [B, C, H, W], t [B] long) -> [B, out_ch, H, W]."""

    def __init__(self, in_ch: int = 3, out_ch: int = 3, ch: int = 128,
                 ch_mult: Sequence[int] = (1, 2, 2, 2), num_res_blocks: int = 2,
                 attn_resolutions: Sequence[int] = (16,), dropout: float = 0.1,
                 resolution: int = 32, groups: int = GROUPS):
        super().__init__()
        self.ch, self.resolution = ch, resolution
        temb_ch = 4 * ch
        self.temb = nn.Sequential(nn.Linear(ch, temb_ch), nn.SiLU(), nn.Linear(temb_ch, temb_ch))
        self.conv_in = nn.Conv2d(in_ch, ch, 3, padding=1)

        # Down path: remember the channels of every activation kept for a skip.
        self.down = nn.ModuleList()
        skip_chs, cur, res = [ch], ch, resolution
        for level, mult in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                block = nn.ModuleList([ResBlock(cur, ch * mult, temb_ch, dropout, groups)])
                cur = ch * mult
                if res in attn_resolutions:
                    block.append(AttnBlock(cur, groups))
                self.down.append(block)
                skip_chs.append(cur)
            if level != len(ch_mult) - 1:
                self.down.append(nn.ModuleList([Downsample(cur)]))
                skip_chs.append(cur)
                res //= 2

        self.mid = nn.ModuleList([ResBlock(cur, cur, temb_ch, dropout, groups), AttnBlock(cur, groups),
                                  ResBlock(cur, cur, temb_ch, dropout, groups)])

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(ch_mult))):
            for _ in range(num_res_blocks + 1):
                block = nn.ModuleList([ResBlock(cur + skip_chs.pop(), ch * mult, temb_ch, dropout, groups)])
                cur = ch * mult
                if res in attn_resolutions:
                    block.append(AttnBlock(cur, groups))
                self.up.append(block)
            if level != 0:
                self.up.append(nn.ModuleList([Upsample(cur)]))
                res *= 2
        assert not skip_chs

        self.norm_out = _norm(cur, groups)
        self.conv_out = _zero(nn.Conv2d(cur, out_ch, 3, padding=1))

    def forward(self, x, t):
        assert x.shape[2] == x.shape[3] == self.resolution, (x.shape, self.resolution)
        assert t.shape == (x.shape[0],), (t.shape, x.shape)
        temb = self.temb(timestep_embedding(t, self.ch).to(x.dtype))
        hs = [self.conv_in(x)]
        for block in self.down:
            h = hs[-1]
            for layer in block:
                h = layer(h, temb) if isinstance(layer, ResBlock) else layer(h)
            hs.append(h)
        h = hs[-1]
        h = self.mid[0](h, temb)
        h = self.mid[1](h)
        h = self.mid[2](h, temb)
        for block in self.up:
            for layer in block:
                if isinstance(layer, ResBlock):
                    h = layer(torch.cat([h, hs.pop()], dim=1), temb)
                else:
                    h = layer(h)
        assert not hs
        # The output head runs in float32 even under autocast: a learned log-variance must fall
        # between log beta-tilde_t and log beta_t, and for most t that interval is narrower than
        # two steps of bf16 (8 bits of mantissa), so a bf16 head could not represent it.
        with torch.autocast(device_type=h.device.type, enabled=False):
            return self.conv_out(F.silu(self.norm_out(h.float())))


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
