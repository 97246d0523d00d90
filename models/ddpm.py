"""The DDPM U-Net (Ho et al. 2020), as ported to PyTorch by the score-SDE code.

State-dict keys, order and shapes equal the original's: a float64 buffer `sigmas` followed by a
flat ModuleList `all_modules` (time embedding, input conv, down path, middle, up path, output).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from models import layers
from models.layers import NIN, ddpm_conv3x3, dense, get_act
from models.utils import register_model, register_sigmas


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6)


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, added residually (NIN_3 starts at zero)."""

    def __init__(self, channels: int):
        super().__init__()
        self.GroupNorm_0 = _group_norm(channels)
        self.NIN_0 = NIN(channels, channels)
        self.NIN_1 = NIN(channels, channels)
        self.NIN_2 = NIN(channels, channels)
        self.NIN_3 = NIN(channels, channels, init_scale=0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.GroupNorm_0(x)
        q = self.NIN_0(h).reshape(B, C, H * W)
        k = self.NIN_1(h).reshape(B, C, H * W)
        v = self.NIN_2(h).reshape(B, C, H * W)
        # weights[b, i, j]: how much query pixel i attends to key pixel j
        weights = torch.softmax(torch.bmm(q.transpose(1, 2), k) * C ** -0.5, dim=-1)
        h = torch.bmm(v, weights.transpose(1, 2)).reshape(B, C, H, W)
        return x + self.NIN_3(h)


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling, optionally followed by a 3x3 convolution."""

    def __init__(self, channels: int, with_conv: bool = False):
        super().__init__()
        if with_conv:
            self.Conv_0 = ddpm_conv3x3(channels, channels)
        self.with_conv = with_conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.Conv_0(h) if self.with_conv else h


class Downsample(nn.Module):
    """2x downsampling: a stride-2 3x3 convolution with TF 'SAME' padding, or 2x2 average pool."""

    def __init__(self, channels: int, with_conv: bool = False):
        super().__init__()
        if with_conv:
            self.Conv_0 = ddpm_conv3x3(channels, channels, stride=2, padding=0)
        self.with_conv = with_conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.with_conv:
            return self.Conv_0(F.pad(x, (0, 1, 0, 1)))
        return F.avg_pool2d(x, kernel_size=2, stride=2)


class ResnetBlockDDPM(nn.Module):
    """DDPM residual block: GN, act, conv, + Dense(act(temb)), GN, act, dropout, conv, skip.

    The skip is a NIN (or, with `conv_shortcut`, a 3x3 conv) when the channel count changes.
    """

    def __init__(self, act: nn.Module, in_ch: int, out_ch: int | None = None,
                 temb_dim: int | None = None, conv_shortcut: bool = False, dropout: float = 0.1):
        super().__init__()
        out_ch = in_ch if out_ch is None else out_ch
        self.GroupNorm_0 = _group_norm(in_ch)
        self.act = act
        self.Conv_0 = ddpm_conv3x3(in_ch, out_ch)
        if temb_dim is not None:
            self.Dense_0 = dense(temb_dim, out_ch)
        self.GroupNorm_1 = _group_norm(out_ch)
        self.Dropout_0 = nn.Dropout(dropout)
        self.Conv_1 = ddpm_conv3x3(out_ch, out_ch, init_scale=0.0)
        if in_ch != out_ch:
            if conv_shortcut:
                self.Conv_2 = ddpm_conv3x3(in_ch, out_ch)
            else:
                self.NIN_0 = NIN(in_ch, out_ch)
        self.in_ch = in_ch
        self.out_ch = out_ch
        self.conv_shortcut = conv_shortcut

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.Conv_0(self.act(self.GroupNorm_0(x)))
        if temb is not None:
            h = h + self.Dense_0(self.act(temb))[:, :, None, None]
        h = self.Conv_1(self.Dropout_0(self.act(self.GroupNorm_1(h))))
        if self.in_ch != self.out_ch:
            x = self.Conv_2(x) if self.conv_shortcut else self.NIN_0(x)
        return x + h


@register_model(name="ddpm")
class DDPM(nn.Module):
    """DDPM U-Net conditioned on the label through a sinusoidal embedding of width nf.

    Inputs in [0, 1] are mapped to [-1, 1] unless `config.data.centered`. With
    `config.model.scale_by_sigma` (SMLD training) the output is divided by sigmas[label], so the
    labels must then be integer noise-level indices.
    """

    def __init__(self, config):
        super().__init__()
        self.act = act = get_act(config)
        register_sigmas(self, config)
        self.nf = nf = config.model.nf
        ch_mult = tuple(config.model.ch_mult)
        self.num_res_blocks = num_res_blocks = config.model.num_res_blocks
        self.attn_resolutions = tuple(config.model.attn_resolutions)
        self.num_resolutions = num_resolutions = len(ch_mult)
        self.image_size = config.data.image_size
        resolutions = [self.image_size // 2**i for i in range(num_resolutions)]
        # Attention placement is decided from the configured size, so inputs must have that size.
        self.attn_at_level = [res in self.attn_resolutions for res in resolutions]
        self.conditional = bool(config.model.conditional)
        self.centered = config.data.centered
        self.scale_by_sigma = config.model.scale_by_sigma
        channels = config.data.num_channels
        dropout = config.model.dropout
        with_conv = config.model.resamp_with_conv
        temb_dim = 4 * nf if self.conditional else None

        def resnet(in_ch: int, out_ch: int | None = None) -> ResnetBlockDDPM:
            return ResnetBlockDDPM(act=act, in_ch=in_ch, out_ch=out_ch, temb_dim=temb_dim,
                                   dropout=dropout)

        modules: list[nn.Module] = []
        if self.conditional:
            modules += [dense(nf, 4 * nf), dense(4 * nf, 4 * nf)]

        modules.append(ddpm_conv3x3(channels, nf))
        skip_channels = [nf]
        in_ch = nf
        for level in range(num_resolutions):
            for _ in range(num_res_blocks):
                out_ch = nf * ch_mult[level]
                modules.append(resnet(in_ch, out_ch))
                in_ch = out_ch
                if self.attn_at_level[level]:
                    modules.append(AttnBlock(in_ch))
                skip_channels.append(in_ch)
            if level != num_resolutions - 1:
                modules.append(Downsample(in_ch, with_conv=with_conv))
                skip_channels.append(in_ch)

        modules += [resnet(in_ch), AttnBlock(in_ch), resnet(in_ch)]

        for level in reversed(range(num_resolutions)):
            for _ in range(num_res_blocks + 1):
                out_ch = nf * ch_mult[level]
                modules.append(resnet(in_ch + skip_channels.pop(), out_ch))
                in_ch = out_ch
            if self.attn_at_level[level]:
                modules.append(AttnBlock(in_ch))
            if level != 0:
                modules.append(Upsample(in_ch, with_conv=with_conv))

        modules.append(_group_norm(in_ch))
        modules.append(ddpm_conv3x3(in_ch, channels, init_scale=0.0))
        self.all_modules = nn.ModuleList(modules)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"DDPM was built for {self.image_size}x{self.image_size} inputs but got "
                f"{tuple(x.shape[-2:])}: set config.data.image_size to the input size.")
        modules = iter(self.all_modules)
        temb = None
        if self.conditional:
            temb = next(modules)(layers.get_timestep_embedding(labels, self.nf))
            temb = next(modules)(self.act(temb))

        h = x if self.centered else 2 * x - 1.0

        hs = [next(modules)(h)]
        for level in range(self.num_resolutions):
            for _ in range(self.num_res_blocks):
                h = next(modules)(hs[-1], temb)
                if self.attn_at_level[level]:
                    h = next(modules)(h)
                hs.append(h)
            if level != self.num_resolutions - 1:
                hs.append(next(modules)(hs[-1]))

        h = next(modules)(hs[-1], temb)
        h = next(modules)(h)
        h = next(modules)(h, temb)

        for level in reversed(range(self.num_resolutions)):
            for _ in range(self.num_res_blocks + 1):
                h = next(modules)(torch.cat([h, hs.pop()], dim=1), temb)
            if self.attn_at_level[level]:
                h = next(modules)(h)
            if level != 0:
                h = next(modules)(h)

        h = self.act(next(modules)(h))
        h = next(modules)(h)

        if self.scale_by_sigma:
            h = layers.divide_by_sigmas(h, self.sigmas, labels)
        return h
