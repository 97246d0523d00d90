"""RefineNet blocks of NCSN (Song & Ermon 2019) and NCSNv2 (Song & Ermon 2020).

Each block works unconditionally (NCSNv2) or conditioned on the integer noise level y (NCSN),
depending on whether its normalisation factory is conditional; pass `y=None` for the former.
Parameter names follow the score-SDE port so state dicts line up with it.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

Normalization = Callable[[int], nn.Module]


def _scale_init(conv: nn.Conv2d, init_scale: float) -> nn.Conv2d:
    init_scale = 1e-10 if init_scale == 0 else init_scale
    conv.weight.data *= init_scale
    if conv.bias is not None:
        conv.bias.data *= init_scale
    return conv


def ncsn_conv1x1(in_planes: int, out_planes: int, stride: int = 1, bias: bool = True,
                 init_scale: float = 1.0) -> nn.Conv2d:
    """1x1 convolution with PyTorch's default initialisation scaled by `init_scale`."""
    conv = nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=bias)
    return _scale_init(conv, init_scale)


def ncsn_conv3x3(in_planes: int, out_planes: int, stride: int = 1, bias: bool = True,
                 dilation: int = 1, init_scale: float = 1.0) -> nn.Conv2d:
    """3x3 convolution (padding = dilation, so size-preserving at stride 1), default init."""
    conv = nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=dilation,
                     dilation=dilation, bias=bias)
    return _scale_init(conv, init_scale)


def _normalise(norm: nn.Module, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    return norm(x) if y is None else norm(x, y)


def _mean_pool_2x2(x: torch.Tensor) -> torch.Tensor:
    """Average of each 2x2 block (the sum of the four strided sub-grids, over 4)."""
    return (x[:, :, ::2, ::2] + x[:, :, 1::2, ::2] + x[:, :, ::2, 1::2]
            + x[:, :, 1::2, 1::2]) / 4.0


class ConvMeanPool(nn.Module):
    """Size-preserving convolution followed by 2x2 mean pooling (a learnt downsampling)."""

    def __init__(self, input_dim: int, output_dim: int, kernel_size: int = 3, biases: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(input_dim, output_dim, kernel_size, stride=1,
                              padding=kernel_size // 2, bias=biases)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _mean_pool_2x2(self.conv(x))


class ResidualBlock(nn.Module):
    """Pre-activation residual block: norm, act, conv, norm, act, conv, plus a shortcut.

    `resample='down'` halves the resolution with ConvMeanPool, or, when `dilation > 1`, keeps it
    and widens the receptive field with dilated convolutions instead (NCSN's dilated RefineNet).
    A 1x1 (or matching) shortcut convolution is used whenever the shape changes.
    """

    def __init__(self, input_dim: int, output_dim: int, normalization: Normalization,
                 act: nn.Module, resample: str | None = None, dilation: int = 1):
        super().__init__()
        if resample not in (None, "down"):
            raise ValueError(f"Unknown resample '{resample}': use None or 'down'.")
        self.act = act
        self.input_dim = input_dim
        self.output_dim = output_dim
        self.resample = resample
        mid_dim = input_dim if resample == "down" else output_dim
        self.conv1 = ncsn_conv3x3(input_dim, mid_dim, dilation=dilation)
        self.normalize2 = normalization(mid_dim)
        pooled = resample == "down" and dilation == 1
        if pooled:
            self.conv2 = ConvMeanPool(input_dim, output_dim, 3)
        else:
            self.conv2 = ncsn_conv3x3(mid_dim, output_dim, dilation=dilation)
        if output_dim != input_dim or resample is not None:
            if pooled:
                self.shortcut = ConvMeanPool(input_dim, output_dim, kernel_size=1)
            elif dilation > 1:
                self.shortcut = ncsn_conv3x3(input_dim, output_dim, dilation=dilation)
            else:
                self.shortcut = ncsn_conv1x1(input_dim, output_dim)
        self.normalize1 = normalization(input_dim)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(self.act(_normalise(self.normalize1, x, y)))
        h = self.conv2(self.act(_normalise(self.normalize2, h, y)))
        skip = self.shortcut(x) if hasattr(self, "shortcut") else x
        return skip + h


class CRPBlock(nn.Module):
    """Chained residual pooling: x + sum of a chain of (pool 5x5, conv) stages on act(x).

    Unconditional blocks pool with max (NCSNv2) unless `maxpool=False`; conditional blocks
    normalise before each average pool (NCSN).
    """

    def __init__(self, features: int, n_stages: int, act: nn.Module,
                 normalization: Normalization | None = None, maxpool: bool = True):
        super().__init__()
        self.convs = nn.ModuleList(
            [ncsn_conv3x3(features, features, bias=False) for _ in range(n_stages)])
        if normalization is not None:
            self.norms = nn.ModuleList([normalization(features) for _ in range(n_stages)])
        use_max = maxpool and normalization is None
        self.pool = (nn.MaxPool2d(kernel_size=5, stride=1, padding=2) if use_max
                     else nn.AvgPool2d(kernel_size=5, stride=1, padding=2))
        self.act = act

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        x = self.act(x)
        path = x
        for i, conv in enumerate(self.convs):
            if hasattr(self, "norms"):
                path = _normalise(self.norms[i], path, y)
            path = conv(self.pool(path))
            x = path + x
        return x


class RCUBlock(nn.Module):
    """Residual conv units: n_blocks residual chains of n_stages ([norm], act, conv)."""

    def __init__(self, features: int, n_blocks: int, n_stages: int, act: nn.Module,
                 normalization: Normalization | None = None):
        super().__init__()
        self.n_blocks = n_blocks
        self.n_stages = n_stages
        self.conditional = normalization is not None
        for i in range(1, n_blocks + 1):
            for j in range(1, n_stages + 1):
                if normalization is not None:
                    setattr(self, f"{i}_{j}_norm", normalization(features))
                setattr(self, f"{i}_{j}_conv", ncsn_conv3x3(features, features, bias=False))
        self.act = act

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        for i in range(1, self.n_blocks + 1):
            residual = x
            for j in range(1, self.n_stages + 1):
                if self.conditional:
                    x = _normalise(getattr(self, f"{i}_{j}_norm"), x, y)
                x = getattr(self, f"{i}_{j}_conv")(self.act(x))
            x = x + residual
        return x


class MSFBlock(nn.Module):
    """Multi-resolution fusion: convolve each input, resize bilinearly to `shape`, and sum."""

    def __init__(self, in_planes: Sequence[int], features: int,
                 normalization: Normalization | None = None):
        super().__init__()
        self.features = features
        self.convs = nn.ModuleList([ncsn_conv3x3(c, features) for c in in_planes])
        if normalization is not None:
            self.norms = nn.ModuleList([normalization(c) for c in in_planes])

    def forward(self, xs: Sequence[torch.Tensor], shape: Sequence[int],
                y: torch.Tensor | None = None) -> torch.Tensor:
        total = 0.0
        for i, (x, conv) in enumerate(zip(xs, self.convs)):
            if hasattr(self, "norms"):
                x = _normalise(self.norms[i], x, y)
            total = total + F.interpolate(conv(x), size=tuple(shape), mode="bilinear",
                                          align_corners=True)
        return total


class RefineBlock(nn.Module):
    """RefineNet block: RCU-adapt each input, fuse them (MSF), chained pooling, output RCUs.

    `start` marks the deepest block (a single input, no fusion); `end` the last one, which gets
    three output RCUs instead of one.
    """

    def __init__(self, in_planes: Sequence[int], features: int, act: nn.Module,
                 normalization: Normalization | None = None, start: bool = False,
                 end: bool = False, maxpool: bool = True):
        super().__init__()
        if start and len(in_planes) != 1:
            raise ValueError("The first RefineBlock (start=True) takes exactly one input.")
        self.n_blocks = len(in_planes)
        self.adapt_convs = nn.ModuleList(
            [RCUBlock(c, 2, 2, act, normalization) for c in in_planes])
        self.output_convs = RCUBlock(features, 3 if end else 1, 2, act, normalization)
        if not start:
            self.msf = MSFBlock(in_planes, features, normalization)
        self.crp = CRPBlock(features, 2, act, normalization, maxpool=maxpool)

    def forward(self, xs: Sequence[torch.Tensor], output_shape: Sequence[int],
                y: torch.Tensor | None = None) -> torch.Tensor:
        hs = [adapt(x, y) for adapt, x in zip(self.adapt_convs, xs)]
        h = self.msf(hs, output_shape, y) if self.n_blocks > 1 else hs[0]
        return self.output_convs(self.crp(h, y), y)
