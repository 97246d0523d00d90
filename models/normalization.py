"""Normalisation layers of the RefineNet score networks (NCSN, NCSNv2).

`get_normalization` returns a factory called with the channel count only. Conditional layers
(NCSN) additionally take the integer noise-level index y in `forward(x, y)` and learn one set of
affine parameters per noise level; the number of levels is bound by the factory.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn as nn

_EPS = 1e-5


def _standardised_channel_means(x: torch.Tensor) -> torch.Tensor:
    """Per-channel spatial means, standardised across the channels of each sample, [B, C]."""
    means = x.mean(dim=(2, 3))
    centre = means.mean(dim=-1, keepdim=True)
    spread = means.var(dim=-1, keepdim=True)  # unbiased, as in the NCSN code
    return (means - centre) / torch.sqrt(spread + _EPS)


def _instance_normalise(x: torch.Tensor) -> torch.Tensor:
    """(x - mu_c) / s_c with per-sample, per-channel spatial mean and (biased) std."""
    return nn.functional.instance_norm(x, eps=_EPS)


def _per_channel(v: torch.Tensor) -> torch.Tensor:
    """A [C] or [B, C] coefficient shaped to broadcast over [B, C, H, W]."""
    return v[..., None, None]


class InstanceNorm2dPlus(nn.Module):
    """InstanceNorm++ (Song & Ermon 2019, NCSN appendix).

    z_c = gamma_c ((x_c - mu_c) / s_c + alpha_c (mu_c - m) / v) + beta_c, where mu_c, s_c are
    the spatial mean and std of channel c and m, v the mean and std of the mu_c over channels.
    The alpha term keeps the colour shifts that plain instance normalisation removes.
    """

    def __init__(self, num_features: int, bias: bool = True):
        super().__init__()
        self.num_features = num_features
        self.bias = bias
        self.alpha = nn.Parameter(torch.empty(num_features).normal_(1.0, 0.02))
        self.gamma = nn.Parameter(torch.empty(num_features).normal_(1.0, 0.02))
        if bias:
            self.beta = nn.Parameter(torch.zeros(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = _instance_normalise(x)
        h = h + _per_channel(_standardised_channel_means(x)) * _per_channel(self.alpha)
        out = _per_channel(self.gamma) * h
        if self.bias:
            out = out + _per_channel(self.beta)
        return out


class ConditionalInstanceNorm2dPlus(nn.Module):
    """InstanceNorm++ with gamma, alpha (and beta) chosen per noise level by an embedding."""

    def __init__(self, num_features: int, num_classes: int, bias: bool = True):
        super().__init__()
        self.num_features = num_features
        self.bias = bias
        self.embed = nn.Embedding(num_classes, (3 if bias else 2) * num_features)
        self.embed.weight.data[:, :2 * num_features].normal_(1.0, 0.02)
        self.embed.weight.data[:, 2 * num_features:].zero_()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        coefficients = self.embed(y).chunk(3 if self.bias else 2, dim=-1)
        gamma, alpha = coefficients[0], coefficients[1]
        h = _instance_normalise(x)
        h = h + _per_channel(_standardised_channel_means(x)) * _per_channel(alpha)
        out = _per_channel(gamma) * h
        if self.bias:
            out = out + _per_channel(coefficients[2])
        return out


class ConditionalInstanceNorm2d(nn.Module):
    """Instance normalisation with a per-noise-level scale (and shift)."""

    def __init__(self, num_features: int, num_classes: int, bias: bool = True):
        super().__init__()
        self.num_features = num_features
        self.bias = bias
        self.embed = nn.Embedding(num_classes, (2 if bias else 1) * num_features)
        self.embed.weight.data[:, :num_features].normal_(1.0, 0.02)
        self.embed.weight.data[:, num_features:].zero_()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        coefficients = self.embed(y).chunk(2 if self.bias else 1, dim=-1)
        out = _per_channel(coefficients[0]) * _instance_normalise(x)
        if self.bias:
            out = out + _per_channel(coefficients[1])
        return out


class VarianceNorm2d(nn.Module):
    """Division by the per-channel spatial std, then a learnt per-channel scale (no centring)."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features
        self.alpha = nn.Parameter(torch.empty(num_features).normal_(1.0, 0.02))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x / torch.sqrt(x.var(dim=(2, 3), keepdim=True) + _EPS)
        return _per_channel(self.alpha) * h


class ConditionalVarianceNorm2d(nn.Module):
    """Variance normalisation with a per-noise-level scale."""

    def __init__(self, num_features: int, num_classes: int):
        super().__init__()
        self.num_features = num_features
        self.embed = nn.Embedding(num_classes, num_features)
        self.embed.weight.data.normal_(1.0, 0.02)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = x / torch.sqrt(x.var(dim=(2, 3), keepdim=True) + _EPS)
        return _per_channel(self.embed(y)) * h


def instance_norm_2d(num_features: int) -> nn.Module:
    """Plain instance normalisation with a learnt per-channel scale and shift."""
    return nn.InstanceNorm2d(num_features, affine=True, track_running_stats=False)


def group_norm_2d(num_features: int) -> nn.Module:
    """Group normalisation with up to 32 groups (the largest power of two dividing the channels)."""
    return nn.GroupNorm(math.gcd(32, num_features), num_features)


_UNCONDITIONAL: dict[str, Callable[..., nn.Module]] = {
    "InstanceNorm": instance_norm_2d,
    "InstanceNorm++": InstanceNorm2dPlus,
    "VarianceNorm": VarianceNorm2d,
    "GroupNorm": group_norm_2d,
}

_CONDITIONAL: dict[str, Callable[..., nn.Module]] = {
    "InstanceNorm": ConditionalInstanceNorm2d,
    "InstanceNorm++": ConditionalInstanceNorm2dPlus,
    "VarianceNorm": ConditionalVarianceNorm2d,
}


def get_normalization(config, conditional: bool = False) -> Callable[[int], nn.Module]:
    """The normalisation named by `config.model.normalization`, as a factory of channel count.

    Conditional layers get one parameter set per noise level: `config.model.num_classes` when the
    config has it, else `config.model.num_scales`.
    """
    name = config.model.normalization
    table = _CONDITIONAL if conditional else _UNCONDITIONAL
    if name not in table:
        kind = "conditional" if conditional else "unconditional"
        raise ValueError(
            f"Unknown {kind} normalization '{name}': set config.model.normalization to one of "
            f"{', '.join(table)}.")
    if not conditional:
        return table[name]
    num_classes = getattr(config.model, "num_classes", None) or config.model.num_scales
    return functools.partial(table[name], num_classes=num_classes)
