"""Building blocks shared by every score network: initialisers, DDPM convolutions, NIN, embeddings.

Network-specific blocks live beside the network that uses them (`layerspp.py` for NCSN++/DDPM++,
`ddpm.py`, `ncsnv2.py`); this module holds what they all share.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def variance_scaling(scale: float, mode: str, distribution: str, in_axis: int = 1,
                     out_axis: int = 0, dtype=torch.float32, device=None):
    """Initialiser drawing weights with variance scale / fan (JAX's `variance_scaling`).

    `device=None` draws on the current default device, so networks can be built cheaply under
    `with torch.device("meta"):`.
    """

    def _fans(shape):
        receptive_field = np.prod(shape) / shape[in_axis] / shape[out_axis]
        return shape[in_axis] * receptive_field, shape[out_axis] * receptive_field

    def init(shape, dtype=dtype, device=device):
        fan_in, fan_out = _fans(shape)
        if mode == "fan_in":
            denominator = fan_in
        elif mode == "fan_out":
            denominator = fan_out
        elif mode == "fan_avg":
            denominator = (fan_in + fan_out) / 2
        else:
            raise ValueError(f"Unknown variance-scaling mode '{mode}'.")
        variance = scale / denominator
        if distribution == "normal":
            return torch.randn(*shape, dtype=dtype, device=device) * np.sqrt(variance)
        if distribution == "uniform":
            return (torch.rand(*shape, dtype=dtype, device=device) * 2.0 - 1.0) * np.sqrt(
                3 * variance)
        raise ValueError(f"Unknown variance-scaling distribution '{distribution}'.")

    return init


def default_init(scale: float = 1.0):
    """DDPM's initialiser: fan-average uniform variance scaling (a zero scale becomes 1e-10)."""
    scale = 1e-10 if scale == 0 else scale
    return variance_scaling(scale, "fan_avg", "uniform")


def _init_conv(conv: nn.Conv2d, init_scale: float) -> nn.Conv2d:
    conv.weight.data = default_init(init_scale)(conv.weight.data.shape)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    return conv


def ddpm_conv1x1(in_planes: int, out_planes: int, stride: int = 1, bias: bool = True,
                 init_scale: float = 1.0, padding: int = 0) -> nn.Conv2d:
    """1x1 convolution with DDPM initialisation."""
    conv = nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, padding=padding,
                     bias=bias)
    return _init_conv(conv, init_scale)


def ddpm_conv3x3(in_planes: int, out_planes: int, stride: int = 1, bias: bool = True,
                 dilation: int = 1, init_scale: float = 1.0, padding: int = 1) -> nn.Conv2d:
    """3x3 convolution with DDPM initialisation."""
    conv = nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=padding,
                     dilation=dilation, bias=bias)
    return _init_conv(conv, init_scale)


def dense(in_features: int, out_features: int) -> nn.Linear:
    """Fully connected layer with DDPM initialisation (fan-average uniform weight, zero bias)."""
    layer = nn.Linear(in_features, out_features)
    layer.weight.data = default_init()(layer.weight.shape)
    nn.init.zeros_(layer.bias)
    return layer


class NIN(nn.Module):
    """Network-in-network: a per-pixel linear map over channels (parameters `W`, `b`)."""

    def __init__(self, in_dim: int, num_units: int, init_scale: float = 0.1):
        super().__init__()
        self.W = nn.Parameter(default_init(scale=init_scale)((in_dim, num_units)),
                              requires_grad=True)
        self.b = nn.Parameter(torch.zeros(num_units), requires_grad=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.einsum("bchw,cd->bdhw", x, self.W)
        return y + self.b[None, :, None, None]


def get_timestep_embedding(timesteps: torch.Tensor, embedding_dim: int,
                           max_positions: int = 10000) -> torch.Tensor:
    """Sinusoidal (transformer) embedding of a batch of time steps, shape [B, embedding_dim]."""
    assert timesteps.dim() == 1
    half_dim = embedding_dim // 2
    scale = math.log(max_positions) / (half_dim - 1)
    frequencies = torch.exp(
        torch.arange(half_dim, dtype=torch.float32, device=timesteps.device) * -scale)
    angles = timesteps.float()[:, None] * frequencies[None, :]
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    if embedding_dim % 2 == 1:
        emb = F.pad(emb, (0, 1), mode="constant")
    return emb


def get_act(config) -> nn.Module:
    """The activation named by `config.model.nonlinearity`."""
    name = config.model.nonlinearity.lower()
    if name == "elu":
        return nn.ELU()
    if name == "relu":
        return nn.ReLU()
    if name == "lrelu":
        return nn.LeakyReLU(negative_slope=0.2)
    if name == "swish":
        return nn.SiLU()
    raise NotImplementedError(
        f"Activation '{config.model.nonlinearity}' is not supported: use elu, relu, lrelu or "
        "swish.")


def noise_level_indices(labels: torch.Tensor) -> torch.Tensor:
    """The labels as integer SMLD noise-level indices (0 is sigma_max), for table look-ups."""
    if labels.is_floating_point():
        raise ValueError(
            "This network looks its noise level up by integer index but got floating-point labels: "
            "use it with a discrete-time config (config.training.continuous = False).")
    return labels.long()


def divide_by_sigmas(h: torch.Tensor, sigmas: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """h / sigma_i per batch element, sigma_i = sigmas[labels] (NCSN's output scaling).

    The quotient is formed in the precision of the float64 `sigmas` table and returned in h's dtype.
    """
    used = sigmas[noise_level_indices(labels)].reshape(-1, *([1] * (h.dim() - 1)))
    return (h / used).to(h.dtype)
