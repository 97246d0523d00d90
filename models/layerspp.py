"""Blocks of NCSN++ / DDPM++ (Song et al. 2021, appendix H): embeddings, attention, resampling
and the two residual blocks. Submodule names follow the original so checkpoints load unchanged.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from models import up_or_down_sampling
from models.layers import NIN, ddpm_conv1x1, ddpm_conv3x3, default_init, dense

conv1x1 = ddpm_conv1x1
conv3x3 = ddpm_conv3x3


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with min(C / 4, 32) groups and eps 1e-6, as everywhere in NCSN++."""
    return nn.GroupNorm(num_groups=min(channels // 4, 32), num_channels=channels, eps=1e-6)


def skip_sum(x: torch.Tensor, h: torch.Tensor, skip_rescale: bool) -> torch.Tensor:
    """Residual sum x + h, divided by sqrt(2) when `skip_rescale` (keeps the variance)."""
    return (x + h) / np.sqrt(2.0) if skip_rescale else x + h


class GaussianFourierProjection(nn.Module):
    """Random Fourier features [sin(2 pi W x), cos(2 pi W x)] of a scalar (log sigma), W fixed."""

    def __init__(self, embedding_size: int = 256, scale: float = 1.0):
        super().__init__()
        self.W = nn.Parameter(torch.randn(embedding_size) * scale, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_proj = x[:, None] * self.W[None, :] * 2 * np.pi
        return torch.cat([torch.sin(x_proj), torch.cos(x_proj)], dim=-1)


class Combine(nn.Module):
    """Merge a skip input x into h: a 1x1 conv of x, then concatenated ('cat') or added ('sum')."""

    def __init__(self, dim1: int, dim2: int, method: str = "cat"):
        super().__init__()
        if method not in ("cat", "sum"):
            raise ValueError(f"Combine method must be 'cat' or 'sum', got '{method}'.")
        self.Conv_0 = conv1x1(dim1, dim2)
        self.method = method

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.Conv_0(x)
        if self.method == "cat":
            return torch.cat([h, y], dim=1)
        return h + y


class AttnBlockpp(nn.Module):
    """Single-head self-attention over the pixels, with a residual connection (DDPM style)."""

    def __init__(self, channels: int, skip_rescale: bool = False, init_scale: float = 0.0):
        super().__init__()
        self.GroupNorm_0 = group_norm(channels)
        self.NIN_0 = NIN(channels, channels)
        self.NIN_1 = NIN(channels, channels)
        self.NIN_2 = NIN(channels, channels)
        self.NIN_3 = NIN(channels, channels, init_scale=init_scale)
        self.skip_rescale = skip_rescale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, height, width = x.shape
        h = self.GroupNorm_0(x)
        q = self.NIN_0(h).reshape(b, c, height * width)
        k = self.NIN_1(h).reshape(b, c, height * width)
        v = self.NIN_2(h).reshape(b, c, height * width)
        # logits[b, i, j] = <q_i, k_j> / sqrt(C), softmax over the key pixels j.
        w = torch.bmm(q.transpose(1, 2), k) * (int(c) ** (-0.5))
        w = F.softmax(w, dim=-1)
        h = torch.bmm(v, w.transpose(1, 2)).reshape(b, c, height, width)
        h = self.NIN_3(h)
        return skip_sum(x, h, self.skip_rescale)


class Upsample(nn.Module):
    """2x up-sampling: nearest or FIR, optionally with a 3x3 convolution (fused when FIR)."""

    def __init__(self, in_ch: int | None = None, out_ch: int | None = None,
                 with_conv: bool = False, fir: bool = False,
                 fir_kernel: Sequence[int] = (1, 3, 3, 1)):
        super().__init__()
        out_ch = out_ch if out_ch else in_ch
        if with_conv and in_ch is None:
            raise ValueError("A resampling layer with a convolution needs in_ch.")
        if with_conv:
            if fir:
                self.Conv2d_0 = up_or_down_sampling.Conv2d(
                    in_ch, out_ch, kernel=3, up=True, resample_kernel=fir_kernel,
                    use_bias=True, kernel_init=default_init())
            else:
                self.Conv_0 = conv3x3(in_ch, out_ch)
        elif out_ch != in_ch:
            raise ValueError("Upsample without a convolution cannot change the channel count.")
        self.fir = fir
        self.with_conv = with_conv
        self.fir_kernel = fir_kernel
        self.out_ch = out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fir:
            h = up_or_down_sampling.naive_upsample_2d(x, factor=2)
            if self.with_conv:
                h = self.Conv_0(h)
        elif self.with_conv:
            h = self.Conv2d_0(x)
        else:
            h = up_or_down_sampling.upsample_2d(x, self.fir_kernel, factor=2)
        return h


class Downsample(nn.Module):
    """2x down-sampling: strided 3x3 conv / average pooling, or FIR (fused with a conv)."""

    def __init__(self, in_ch: int | None = None, out_ch: int | None = None,
                 with_conv: bool = False, fir: bool = False,
                 fir_kernel: Sequence[int] = (1, 3, 3, 1)):
        super().__init__()
        out_ch = out_ch if out_ch else in_ch
        if with_conv and in_ch is None:
            raise ValueError("A resampling layer with a convolution needs in_ch.")
        if with_conv:
            if fir:
                self.Conv2d_0 = up_or_down_sampling.Conv2d(
                    in_ch, out_ch, kernel=3, down=True, resample_kernel=fir_kernel,
                    use_bias=True, kernel_init=default_init())
            else:
                self.Conv_0 = conv3x3(in_ch, out_ch, stride=2, padding=0)
        elif out_ch != in_ch:
            raise ValueError("Downsample without a convolution cannot change the channel count.")
        self.fir = fir
        self.fir_kernel = fir_kernel
        self.with_conv = with_conv
        self.out_ch = out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fir:
            if self.with_conv:
                # The original pads one row/column at the bottom/right before the 3x3 stride-2
                # convolution (TF 'SAME' alignment).
                return self.Conv_0(F.pad(x, (0, 1, 0, 1)))
            return F.avg_pool2d(x, 2, stride=2)
        if self.with_conv:
            return self.Conv2d_0(x)
        return up_or_down_sampling.downsample_2d(x, self.fir_kernel, factor=2)


class ResnetBlockDDPMpp(nn.Module):
    """DDPM residual block: GN-act-conv, + Dense(act(temb)), GN-act-dropout-conv, NIN shortcut."""

    def __init__(self, act: nn.Module, in_ch: int, out_ch: int | None = None,
                 temb_dim: int | None = None, conv_shortcut: bool = False, dropout: float = 0.1,
                 skip_rescale: bool = False, init_scale: float = 0.0):
        super().__init__()
        out_ch = out_ch if out_ch else in_ch
        self.GroupNorm_0 = group_norm(in_ch)
        self.Conv_0 = conv3x3(in_ch, out_ch)
        if temb_dim is not None:
            self.Dense_0 = dense(temb_dim, out_ch)
        self.GroupNorm_1 = group_norm(out_ch)
        self.Dropout_0 = nn.Dropout(dropout)
        self.Conv_1 = conv3x3(out_ch, out_ch, init_scale=init_scale)
        if in_ch != out_ch:
            if conv_shortcut:
                self.Conv_2 = conv3x3(in_ch, out_ch)
            else:
                self.NIN_0 = NIN(in_ch, out_ch)
        self.skip_rescale = skip_rescale
        self.act = act
        self.out_ch = out_ch
        self.conv_shortcut = conv_shortcut

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.Conv_0(self.act(self.GroupNorm_0(x)))
        if temb is not None:
            h = h + self.Dense_0(self.act(temb))[:, :, None, None]
        h = self.Conv_1(self.Dropout_0(self.act(self.GroupNorm_1(h))))
        if x.shape[1] != self.out_ch:
            x = self.Conv_2(x) if self.conv_shortcut else self.NIN_0(x)
        return skip_sum(x, h, self.skip_rescale)


class ResnetBlockBigGANpp(nn.Module):
    """BigGAN residual block; optionally up- or down-samples both paths (FIR or naive)."""

    def __init__(self, act: nn.Module, in_ch: int, out_ch: int | None = None,
                 temb_dim: int | None = None, up: bool = False, down: bool = False,
                 dropout: float = 0.1, fir: bool = False,
                 fir_kernel: Sequence[int] = (1, 3, 3, 1), skip_rescale: bool = True,
                 init_scale: float = 0.0):
        super().__init__()
        if up and down:
            raise ValueError("A residual block cannot both up-sample and down-sample.")
        out_ch = out_ch if out_ch else in_ch
        self.GroupNorm_0 = group_norm(in_ch)
        self.up = up
        self.down = down
        self.fir = fir
        self.fir_kernel = fir_kernel
        self.Conv_0 = conv3x3(in_ch, out_ch)
        if temb_dim is not None:
            self.Dense_0 = dense(temb_dim, out_ch)
        self.GroupNorm_1 = group_norm(out_ch)
        self.Dropout_0 = nn.Dropout(dropout)
        self.Conv_1 = conv3x3(out_ch, out_ch, init_scale=init_scale)
        if in_ch != out_ch or up or down:
            self.Conv_2 = conv1x1(in_ch, out_ch)
        self.skip_rescale = skip_rescale
        self.act = act
        self.in_ch = in_ch
        self.out_ch = out_ch

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.up:
            if self.fir:
                return up_or_down_sampling.upsample_2d(x, self.fir_kernel, factor=2)
            return up_or_down_sampling.naive_upsample_2d(x, factor=2)
        if self.down:
            if self.fir:
                return up_or_down_sampling.downsample_2d(x, self.fir_kernel, factor=2)
            return up_or_down_sampling.naive_downsample_2d(x, factor=2)
        return x

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self._resample(self.act(self.GroupNorm_0(x)))
        x = self._resample(x)
        h = self.Conv_0(h)
        if temb is not None:
            h = h + self.Dense_0(self.act(temb))[:, :, None, None]
        h = self.Conv_1(self.Dropout_0(self.act(self.GroupNorm_1(h))))
        if self.in_ch != self.out_ch or self.up or self.down:
            x = self.Conv_2(x)
        return skip_sum(x, h, self.skip_rescale)

