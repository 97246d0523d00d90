"""upfirdn2d: zero-insertion up-sampling, FIR filtering and decimation of NCHW images.

For one axis with up-sampling factor u, pads (p0, p1), filter k of length K and down-sampling
factor d, the output is

    out[m] = sum_t v[d * m + t] * k[K - 1 - t],   v[j] = x[(j - p0) / u] when (j - p0) is a
                                                   multiple of u inside the input, else 0,

i.e. insert u - 1 zeros after every sample, pad by (p0, p1) zeros (negative pads crop), convolve
with k (a true convolution, so the kernel is flipped relative to `F.conv2d`), keep every d-th
sample. The output length is (n * u + p0 + p1 - K) // d + 1. Both axes use the same rule with
their own factors and pads; every channel is filtered independently with the same 2-D kernel.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from op.extension import cuda_ops_for

Params = tuple[int, int, int, int, int, int, int, int]


def _pair(value: int | Sequence[int], what: str) -> tuple[int, int]:
    if isinstance(value, int):
        pair = (value, value)
    else:
        pair = tuple(int(v) for v in value)
        if len(pair) != 2:
            raise ValueError(f"upfirdn2d: {what} must be an int or an (x, y) pair, got {value!r}.")
    if min(pair) < 1:
        raise ValueError(f"upfirdn2d: {what} factors must be positive integers, got {value!r}.")
    return pair


def _parse_args(up, down, pad) -> Params:
    ux, uy = _pair(up, "up")
    dx, dy = _pair(down, "down")
    pad = tuple(int(p) for p in pad)
    if len(pad) == 2:
        pad = pad + pad
    if len(pad) != 4:
        raise ValueError(
            f"upfirdn2d: pad must be (p0, p1) for both axes or (x0, x1, y0, y1), got {pad!r}.")
    return (ux, uy, dx, dy, *pad)


def _axis_output_size(size: int, up: int, down: int, p0: int, p1: int, taps: int) -> int:
    return (size * up + p0 + p1 - taps) // down + 1


def _check(input: torch.Tensor, kernel: torch.Tensor, params: Params) -> tuple[int, int]:
    if input.dim() != 4:
        raise ValueError(f"upfirdn2d expects an NCHW input, got shape {tuple(input.shape)}.")
    if kernel.dim() != 2:
        raise ValueError(f"upfirdn2d expects a 2-D kernel, got shape {tuple(kernel.shape)}.")
    ux, uy, dx, dy, px0, px1, py0, py1 = params
    _, _, h, w = input.shape
    kh, kw = kernel.shape
    for p, n in ((px0, w * ux), (px1, w * ux), (py0, h * uy), (py1, h * uy)):
        if -p >= n:
            raise ValueError(f"upfirdn2d: pad {p} crops away the whole up-sampled input "
                             f"(size {n}); use smaller negative pads.")
    out_h = _axis_output_size(h, uy, dy, py0, py1, kh)
    out_w = _axis_output_size(w, ux, dx, px0, px1, kw)
    if out_h < 1 or out_w < 1:
        raise ValueError(f"upfirdn2d: a {kh}x{kw} kernel leaves no output for a {h}x{w} input "
                         f"with up={(ux, uy)}, pad={(px0, px1, py0, py1)}; pad more.")
    return out_h, out_w


def _reduced_precision_on_cpu(input: torch.Tensor) -> bool:
    """Whether a convolution of `input` would run in bfloat16/float16 on the CPU (its own dtype,
    or CPU autocast in force)."""
    if input.device.type != "cpu":
        return False
    return input.dtype in (torch.bfloat16, torch.float16) or torch.is_autocast_enabled("cpu")


def _native(input: torch.Tensor, kernel: torch.Tensor, params: Params) -> torch.Tensor:
    ux, uy, dx, dy, px0, px1, py0, py1 = params
    channels = input.shape[1]
    kh, kw = kernel.shape
    k = kernel.to(dtype=input.dtype, device=input.device)
    if ux == 1 and uy == 1:
        # Pad (negative = crop), then a depthwise cross-correlation with the flipped kernel whose
        # stride performs the decimation.
        weight = torch.flip(k, [0, 1]).expand(channels, 1, kh, kw)
        if px0 == px1 >= 0 and py0 == py1 >= 0:  # symmetric zero padding: let the conv pad
            return F.conv2d(input, weight, stride=(dy, dx), padding=(py0, px0), groups=channels)
        x = F.pad(input, [px0, px1, py0, py1])
        return F.conv2d(x, weight, stride=(dy, dx), groups=channels)

    if _reduced_precision_on_cpu(input):
        # oneDNN has no fast bfloat16/float16 depthwise transposed convolution: measured 20-60x
        # slower than float32 at NCSN++ sizes. The float32 result is also the more accurate one.
        with torch.autocast("cpu", enabled=False):
            return _native(input.float(), kernel, params).to(input.dtype)

    # A strided transposed convolution with the unflipped kernel equals zero insertion followed
    # by the convolution, without multiplying the inserted zeros: y[m] = sum_i x[i] k[m - u i].
    # The wanted signal is that one shifted by K - 1 - p0 and cut to length n u + p0 + p1 - K + 1.
    weight = k.expand(channels, 1, kh, kw)
    front_y, back_y = py0 - kh + 1, uy + py1 - kh
    front_x, back_x = px0 - kw + 1, ux + px1 - kw
    if front_y == back_y <= 0 and front_x == back_x <= 0:
        out = F.conv_transpose2d(input, weight, stride=(uy, ux), padding=(-front_y, -front_x),
                                 groups=channels)
    else:
        out = F.conv_transpose2d(input, weight, stride=(uy, ux), groups=channels)
        out = F.pad(out, [front_x, back_x, front_y, back_y])
    if dx > 1 or dy > 1:
        out = out[:, :, ::dy, ::dx]
    return out


def upfirdn2d_native(input: torch.Tensor, kernel: torch.Tensor, up: int | Sequence[int] = 1,
                     down: int | Sequence[int] = 1, pad: Sequence[int] = (0, 0)) -> torch.Tensor:
    """upfirdn2d in pure PyTorch (any device, any float dtype, differentiable in input and kernel).

    Computed with depthwise (transposed) strided convolutions, which give the same result as the
    literal zero-insert / pad / convolve / decimate recipe without touching the inserted zeros.
    """
    params = _parse_args(up, down, pad)
    _check(input, kernel, params)
    return _native(input, kernel, params)


def adjoint_params(params: Params, in_size: tuple[int, int], kernel_size: tuple[int, int],
                   out_size: tuple[int, int]) -> Params:
    """Factors and pads of the upfirdn2d (with the flipped kernel) that is the adjoint (VJP).

    Per axis: up and down swap, p0' = K - 1 - p0 and p1' = n u - m d - p0' + K - 1, where n and m
    are the input and output lengths, so that the adjoint maps length m back to length n.
    """
    ux, uy, dx, dy, px0, px1, py0, py1 = params
    (h, w), (kh, kw), (out_h, out_w) = in_size, kernel_size, out_size
    gx0, gy0 = kw - 1 - px0, kh - 1 - py0
    gx1 = w * ux - out_w * dx - gx0 + kw - 1
    gy1 = h * uy - out_h * dy - gy0 + kh - 1
    return (dx, dy, ux, uy, gx0, gx1, gy0, gy1)


class _UpFirDn2dCompiled(torch.autograd.Function):
    """The compiled CUDA kernel with its adjoint as backward (differentiable in the input)."""

    @staticmethod
    def forward(ctx, input, kernel, ext, params, out_size):
        ctx.save_for_backward(kernel)
        ctx.params = params
        ctx.in_size = tuple(input.shape[2:])
        ctx.out_size = out_size
        k = kernel.to(dtype=input.dtype, device=input.device).contiguous()
        return ext.upfirdn2d(input.contiguous(), k, *params)

    @staticmethod
    def backward(ctx, grad_output):
        (kernel,) = ctx.saved_tensors
        g = adjoint_params(ctx.params, ctx.in_size, tuple(kernel.shape), ctx.out_size)
        grad_input = upfirdn2d(grad_output, torch.flip(kernel, [0, 1]), up=(g[0], g[1]),
                               down=(g[2], g[3]), pad=g[4:])
        return grad_input, None, None, None, None


def upfirdn2d(input: torch.Tensor, kernel: torch.Tensor, up: int | Sequence[int] = 1,
              down: int | Sequence[int] = 1, pad: Sequence[int] = (0, 0)) -> torch.Tensor:
    """Up-sample by zero insertion, pad, FIR-filter with `kernel` and down-sample (see module doc).

    `input` is [N, C, H, W] (any C), `kernel` [kh, kw]; `up`/`down` are ints or (x, y) pairs and
    `pad` is (p0, p1) for both axes or (x0, x1, y0, y1). CUDA tensors use the compiled kernel when
    it builds (gradients flow to the input only); otherwise the pure-PyTorch path runs.
    """
    params = _parse_args(up, down, pad)
    out_size = _check(input, kernel, params)
    ext = None if kernel.requires_grad else cuda_ops_for(input)
    if ext is not None:
        return _UpFirDn2dCompiled.apply(input, kernel, ext, params, out_size)
    return _native(input, kernel, params)
