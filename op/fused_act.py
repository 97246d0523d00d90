"""Fused bias + leaky ReLU + gain: scale * leaky_relu(x + b, negative_slope), b per channel (dim 1).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from op.extension import cuda_ops_for


def _check_bias(input: torch.Tensor, bias: torch.Tensor | None) -> None:
    if bias is None:
        return
    if input.dim() < 2 or bias.dim() != 1 or bias.shape[0] != input.shape[1]:
        raise ValueError(f"fused_leaky_relu: bias must be 1-D with one entry per channel (dim 1) "
                         f"of the input; got bias {tuple(bias.shape)} for input "
                         f"{tuple(input.shape)}.")


def fused_leaky_relu_native(input: torch.Tensor, bias: torch.Tensor | None = None,
                            negative_slope: float = 0.2, scale: float = 2 ** 0.5) -> torch.Tensor:
    """scale * leaky_relu(input + bias[None, :, None, ...], negative_slope) in plain PyTorch."""
    _check_bias(input, bias)
    if bias is not None:
        input = input + bias.view(1, -1, *([1] * (input.dim() - 2)))
    return F.leaky_relu(input, negative_slope) * scale


class _FusedLeakyReLUCompiled(torch.autograd.Function):
    """Compiled forward; backward in PyTorch ops (so it is differentiable again)."""

    @staticmethod
    def forward(ctx, input, bias, negative_slope, scale, ext):
        b = bias if bias is not None else input.new_empty(0)
        out = ext.fused_bias_leaky_relu(input.contiguous(), b.to(input.dtype).contiguous(),
                                        float(negative_slope), float(scale))
        ctx.save_for_backward(out)
        ctx.negative_slope, ctx.scale, ctx.has_bias = negative_slope, scale, bias is not None
        return out

    @staticmethod
    def backward(ctx, grad_output):
        (out,) = ctx.saved_tensors
        # With scale > 0 and slope >= 0, the output is positive exactly where x + b is.
        factor = torch.where(out > 0, ctx.scale, ctx.scale * ctx.negative_slope).to(out.dtype)
        grad_input = grad_output * factor
        grad_bias = None
        if ctx.has_bias and ctx.needs_input_grad[1]:
            dims = [d for d in range(grad_input.dim()) if d != 1]
            grad_bias = grad_input.sum(dim=dims)
        return grad_input, grad_bias, None, None, None


def fused_leaky_relu(input: torch.Tensor, bias: torch.Tensor | None = None,
                     negative_slope: float = 0.2, scale: float = 2 ** 0.5) -> torch.Tensor:
    """scale * leaky_relu(input + bias, negative_slope), bias broadcast along channels (dim 1).

    CUDA tensors use the compiled kernel when it builds; otherwise the PyTorch path runs.
    """
    _check_bias(input, bias)
    if scale > 0 and negative_slope >= 0:
        ext = cuda_ops_for(input)
        if ext is not None:
            return _FusedLeakyReLUCompiled.apply(input, bias, negative_slope, scale, ext)
    return fused_leaky_relu_native(input, bias, negative_slope, scale)


class FusedLeakyReLU(nn.Module):
    """Learned per-channel bias (initialised to zero) followed by a scaled leaky ReLU."""

    def __init__(self, channel: int, bias: bool = True, negative_slope: float = 0.2,
                 scale: float = math.sqrt(2.0)):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channel)) if bias else None
        self.negative_slope = negative_slope
        self.scale = scale

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return fused_leaky_relu(input, self.bias, self.negative_slope, self.scale)

    def extra_repr(self) -> str:
        return (f"channel={None if self.bias is None else self.bias.shape[0]}, "
                f"negative_slope={self.negative_slope}, scale={self.scale}")
