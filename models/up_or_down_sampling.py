"""FIR up/down-sampling layers of NCSN++ (the StyleGAN2 resampling ops), built on `op.upfirdn2d`.

A 1-D FIR kernel k (default [1] * factor) is made separable, k2 = outer(k, k) / sum(outer(k, k)),
so that constant images keep their value (times `gain`). Up-sampling by `factor` multiplies the
kernel by factor**2 to compensate for the inserted zeros.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from op import upfirdn2d

Kernel = Sequence[float] | Sequence[Sequence[float]] | None


def _check_factor(factor: int) -> None:
    if not isinstance(factor, int) or factor < 1:
        raise ValueError(f"The resampling factor must be a positive integer, got {factor!r}.")


def setup_kernel(k: Kernel, factor: int = 2, gain: float = 1.0) -> np.ndarray:
    """The normalised square FIR kernel (float32) for a 1-D (separable) or 2-D kernel `k`."""
    k = np.asarray([1] * factor if k is None else k, dtype=np.float32)
    if k.ndim == 1:
        k = np.outer(k, k)
    if k.ndim != 2 or k.shape[0] != k.shape[1]:
        raise ValueError(f"A FIR kernel must be 1-D or square 2-D, got shape {k.shape}.")
    k = k / np.sum(k)
    return (k * np.float32(gain)).astype(np.float32)


@functools.lru_cache(maxsize=64)
def _kernel_tensor(k: tuple, factor: int, gain: float, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(setup_kernel(k, factor, gain)).to(device)


def _as_key(k: Kernel, factor: int) -> tuple:
    # Plain Python, no NumPy: torch.compile traces this without a graph break.
    if k is None:
        return (1.0,) * factor
    if isinstance(k, torch.Tensor):
        k = k.tolist()
    if len(k) and hasattr(k[0], "__len__"):
        return tuple(tuple(float(v) for v in row) for row in k)
    return tuple(float(v) for v in k)


def _kernel(k: Kernel, factor: int, gain: float, device: torch.device) -> torch.Tensor:
    return _kernel_tensor(_as_key(k, factor), factor, float(gain), torch.device(device))


def naive_upsample_2d(x: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """Nearest-neighbour up-sampling: every pixel becomes a factor x factor block."""
    n, c, h, w = x.shape
    x = x[:, :, :, None, :, None].expand(n, c, h, factor, w, factor)
    return x.reshape(n, c, h * factor, w * factor)


def naive_downsample_2d(x: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """Mean over non-overlapping factor x factor blocks."""
    return F.avg_pool2d(x, factor, stride=factor)


def upsample_2d(x: torch.Tensor, k: Kernel = None, factor: int = 2,
                gain: float = 1.0) -> torch.Tensor:
    """FIR up-sampling of NCHW images by `factor` ([N, C, H, W] -> [N, C, H f, W f])."""
    _check_factor(factor)
    kernel = _kernel(k, factor, gain * factor ** 2, x.device)
    p = kernel.shape[0] - factor
    return upfirdn2d(x, kernel, up=factor, pad=((p + 1) // 2 + factor - 1, p // 2))


def downsample_2d(x: torch.Tensor, k: Kernel = None, factor: int = 2,
                  gain: float = 1.0) -> torch.Tensor:
    """FIR down-sampling of NCHW images by `factor` ([N, C, H, W] -> [N, C, H / f, W / f])."""
    _check_factor(factor)
    kernel = _kernel(k, factor, gain, x.device)
    p = kernel.shape[0] - factor
    return upfirdn2d(x, kernel, down=factor, pad=((p + 1) // 2, p // 2))


def upsample_conv_2d(x: torch.Tensor, w: torch.Tensor, k: Kernel = None, factor: int = 2,
                     gain: float = 1.0) -> torch.Tensor:
    """FIR up-sampling fused with a 'same' convolution by `w` [out, in, kh, kw].

    Equals `F.conv2d(upsample_2d(x, k, factor, gain), w, padding=kh // 2)` but runs the
    convolution as a strided transposed convolution on the small input.
    """
    _check_factor(factor)
    if w.dim() != 4 or w.shape[2] != w.shape[3]:
        raise ValueError(f"upsample_conv_2d needs a square [out, in, k, k] weight, got "
                         f"{tuple(w.shape)}.")
    out_c, in_c, conv_k, _ = w.shape
    kernel = _kernel(k, factor, gain * factor ** 2, x.device)
    p = (kernel.shape[0] - factor) - (conv_k - 1)
    groups = x.shape[1] // in_c
    # A transposed convolution wants [in, out / groups, kh, kw] and correlates with the flipped
    # weight, so flip it to obtain the convolution by `w`.
    w = w.reshape(groups, out_c // groups, in_c, conv_k, conv_k)
    w = torch.flip(w, [3, 4]).permute(0, 2, 1, 3, 4)
    w = w.reshape(groups * in_c, out_c // groups, conv_k, conv_k)
    x = F.conv_transpose2d(x, w, stride=factor, groups=groups)
    return upfirdn2d(x, kernel, pad=((p + 1) // 2 + factor - 1, p // 2 + 1))


def conv_downsample_2d(x: torch.Tensor, w: torch.Tensor, k: Kernel = None, factor: int = 2,
                       gain: float = 1.0) -> torch.Tensor:
    """A 'same' convolution by `w` fused with FIR down-sampling by `factor`.

    Equals `downsample_2d(F.conv2d(x, w, padding=kh // 2), k, factor, gain)`, computing only the
    kept outputs (filter first, then a strided convolution).
    """
    _check_factor(factor)
    if w.dim() != 4 or w.shape[2] != w.shape[3]:
        raise ValueError(f"conv_downsample_2d needs a square [out, in, k, k] weight, got "
                         f"{tuple(w.shape)}.")
    conv_k = w.shape[2]
    kernel = _kernel(k, factor, gain, x.device)
    p = (kernel.shape[0] - factor) + (conv_k - 1)
    x = upfirdn2d(x, kernel, pad=((p + 1) // 2, p // 2))
    return F.conv2d(x, w, stride=factor)


class Conv2d(nn.Module):
    """Square convolution with optional fused FIR up- or down-sampling (parameters weight, bias)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, up: bool = False, down: bool = False,
                 resample_kernel: Kernel = (1, 3, 3, 1), use_bias: bool = True,
                 kernel_init: Callable | None = None):
        super().__init__()
        if up and down:
            raise ValueError("Conv2d cannot both up-sample and down-sample; choose one.")
        if kernel < 1 or kernel % 2 != 1:
            raise ValueError(f"Conv2d needs an odd kernel size, got {kernel}.")
        self.weight = nn.Parameter(torch.zeros(out_ch, in_ch, kernel, kernel))
        if kernel_init is not None:
            self.weight.data = kernel_init(self.weight.data.shape)
        if use_bias:
            self.bias = nn.Parameter(torch.zeros(out_ch))
        self.up = up
        self.down = down
        self.resample_kernel = resample_kernel
        self.kernel = kernel
        self.use_bias = use_bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.up:
            x = upsample_conv_2d(x, self.weight, k=self.resample_kernel)
        elif self.down:
            x = conv_downsample_2d(x, self.weight, k=self.resample_kernel)
        else:
            x = F.conv2d(x, self.weight, padding=self.kernel // 2)
        if self.use_bias:
            x = x + self.bias.reshape(1, -1, 1, 1)
        return x
