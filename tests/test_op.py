"""op/: upfirdn2d and fused bias + leaky ReLU against their definitions; lazy-build fall-back."""
import warnings

import pytest
import torch
import torch.nn.functional as F

import op
from op import FusedLeakyReLU, fused_leaky_relu, upfirdn2d, upfirdn2d_native
from op.extension import CUDA_OPS, FORCE_NATIVE_ENV, LazyExtension, cuda_ops_for
from op.fused_act import _FusedLeakyReLUCompiled
from op.upfirdn2d import _UpFirDn2dCompiled, adjoint_params


def reference_upfirdn2d(x, k, ux, uy, dx, dy, px0, px1, py0, py1):
    """The literal recipe: zero insertion, pad/crop, full 2-D convolution, decimation."""
    n, c, h, w = x.shape
    z = torch.zeros(n, c, h * uy, w * ux, dtype=x.dtype)
    z[:, :, ::uy, ::ux] = x
    big = torch.zeros(n, c, h * uy + max(py0, 0) + max(py1, 0),
                      w * ux + max(px0, 0) + max(px1, 0), dtype=x.dtype)
    big[:, :, max(py0, 0):max(py0, 0) + h * uy, max(px0, 0):max(px0, 0) + w * ux] = z
    big = big[:, :, max(-py0, 0):big.shape[2] - max(-py1, 0),
              max(-px0, 0):big.shape[3] - max(-px1, 0)]
    kh, kw = k.shape
    oh, ow = big.shape[2] - kh + 1, big.shape[3] - kw + 1
    out = torch.zeros(n, c, oh, ow, dtype=x.dtype)
    for a in range(kh):
        for b in range(kw):  # convolution: the tap at offset (a, b) uses k[kh-1-a, kw-1-b]
            out += big[:, :, a:a + oh, b:b + ow] * k[kh - 1 - a, kw - 1 - b]
    return out[:, :, ::dy, ::dx]


SEPARABLE = torch.outer(torch.tensor([1.0, 3.0, 3.0, 1.0]), torch.tensor([1.0, 3.0, 3.0, 1.0]))
# (up, down, pad, kernel shape or None for the separable [1, 3, 3, 1] kernel, channels)
CASES = [
    (2, 1, (2, 1), None, 3),             # FIR up-sampling as in upsample_2d
    (1, 2, (1, 1), None, 3),             # FIR down-sampling as in downsample_2d
    (1, 1, (1, 1), None, 1),             # filtering only, as in upsample_conv_2d
    (1, 1, (2, 2), (3, 3), 5),           # filtering with a 2-D non-separable kernel
    (3, 1, (1, -1), (4, 2), 2),          # up 3, negative pad, rectangular kernel
    (1, 3, (-1, 2), (3, 3), 4),          # down 3, negative leading pad
    (2, 2, (0, 1, -1, 3), (3, 4), 3),    # up and down, per-axis pads (x0, x1, y0, y1)
    ((2, 1), (1, 2), (1, 0, 0, 1), (2, 3), 2),  # different factors per axis
    (4, 1, (-3, -2), (5, 5), 1),         # up 4 with cropping on both sides
]


def _expand(up, down, pad):
    ux, uy = (up, up) if isinstance(up, int) else up
    dx, dy = (down, down) if isinstance(down, int) else down
    pad = tuple(pad) * 2 if len(pad) == 2 else tuple(pad)
    return ux, uy, dx, dy, *pad


def _kernel(shape, dtype):
    if shape is None:
        return (SEPARABLE / SEPARABLE.sum()).to(dtype)
    return torch.randn(*shape, generator=torch.Generator().manual_seed(3), dtype=dtype)


@pytest.mark.parametrize("up,down,pad,kshape,channels", CASES)
def test_upfirdn2d_matches_reference(up, down, pad, kshape, channels):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, channels, 7, 6, generator=gen, dtype=torch.float64)
    k = _kernel(kshape, torch.float64)
    expected = reference_upfirdn2d(x, k, *_expand(up, down, pad))
    out = upfirdn2d(x, k, up=up, down=down, pad=pad)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    out32 = upfirdn2d_native(x.float(), k.float(), up=up, down=down, pad=pad)
    torch.testing.assert_close(out32, expected.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("up,down,pad,kshape,channels",
                         [case for case in CASES if case[0] != 1])
def test_up_sampling_in_reduced_precision_on_cpu_runs_in_float32(up, down, pad, kshape,
                                                                  channels):
    # bf16/fp16 inputs, or any input under CPU autocast, get the float32 result in their own
    # dtype (oneDNN's reduced-precision depthwise transposed convolution is 20-60x slower).
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, channels, 7, 6, generator=gen)
    k = _kernel(kshape, torch.float32)
    exact = upfirdn2d(x, k, up=up, down=down, pad=pad)
    for dtype in (torch.bfloat16, torch.float16):
        low = upfirdn2d(x.to(dtype), k, up=up, down=down, pad=pad)
        assert low.dtype == dtype
        assert torch.equal(low, upfirdn2d(x.to(dtype).float(), k, up=up, down=down,
                                          pad=pad).to(dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = upfirdn2d(x, k, up=up, down=down, pad=pad)
        assert torch.is_autocast_enabled("cpu")  # the block is still in force afterwards
    assert under_autocast.dtype == torch.float32
    assert torch.equal(under_autocast, exact)
    x.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        upfirdn2d(x, k, up=up, down=down, pad=pad).square().sum().backward()
    expected_grad, = torch.autograd.grad(
        upfirdn2d(x, k, up=up, down=down, pad=pad).square().sum(), x)
    torch.testing.assert_close(x.grad, expected_grad)


@pytest.mark.parametrize("up,down,pad,kshape,channels", CASES[::2])
def test_upfirdn2d_gradients(up, down, pad, kshape, channels):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, channels, 5, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    k = _kernel(kshape, torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: upfirdn2d(a, b, up=up, down=down, pad=pad),
                                    (x, k))
    assert torch.autograd.gradgradcheck(lambda a: upfirdn2d(a, k.detach(), up=up, down=down,
                                                            pad=pad), (x,))


@pytest.mark.parametrize("up,down,pad,kshape,channels", CASES)
def test_adjoint_params_give_the_vector_jacobian_product(up, down, pad, kshape, channels):
    # The compiled path's backward runs upfirdn2d with these parameters: <A x, g> = <x, A* g>.
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, channels, 7, 6, generator=gen, dtype=torch.float64)
    k = _kernel(kshape, torch.float64)
    params = _expand(up, down, pad)
    y = upfirdn2d(x, k, up=up, down=down, pad=pad)
    g = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    a = adjoint_params(params, tuple(x.shape[2:]), tuple(k.shape), tuple(y.shape[2:]))
    back = upfirdn2d(g, torch.flip(k, [0, 1]), up=a[:2], down=a[2:4], pad=a[4:])
    assert back.shape == x.shape
    torch.testing.assert_close((y * g).sum(), (x * back).sum(), rtol=1e-12, atol=1e-12)


class _PyTorchKernels:
    """Stand-in for the compiled module on CPU: the same call signature, computed by PyTorch."""

    @staticmethod
    def upfirdn2d(x, k, ux, uy, dx, dy, px0, px1, py0, py1):
        return upfirdn2d_native(x, k, up=(ux, uy), down=(dx, dy), pad=(px0, px1, py0, py1))

    @staticmethod
    def fused_bias_leaky_relu(x, b, negative_slope, scale):
        return op.fused_leaky_relu_native(x, b if b.numel() else None, negative_slope, scale)


def test_compiled_path_backward_formulas():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(1, 2, 5, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    k = _kernel((3, 2), torch.float64)
    params = (2, 3, 1, 2, 1, 0, -1, 2)
    out_size = tuple(reference_upfirdn2d(x.detach(), k, *params).shape[2:])
    fn = lambda a: _UpFirDn2dCompiled.apply(a, k, _PyTorchKernels, params, out_size)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(fn, (x,))

    bias = torch.randn(2, generator=gen, dtype=torch.float64, requires_grad=True)
    act = lambda a, b: _FusedLeakyReLUCompiled.apply(a, b, 0.2, 2 ** 0.5,  # noqa: E731
                                                     _PyTorchKernels)
    assert torch.autograd.gradcheck(act, (x, bias))


def _leaky_reference(x, bias, slope, scale):
    y = x + bias.reshape(1, -1, *([1] * (x.dim() - 2))) if bias is not None else x
    return torch.where(y > 0, y, slope * y) * scale


@pytest.mark.parametrize("shape", [(3, 4), (2, 4, 3, 5)])
@pytest.mark.parametrize("slope,scale,with_bias", [(0.2, 2 ** 0.5, True), (0.1, 1.7, False)])
def test_fused_leaky_relu_forward_and_backward(shape, slope, scale, with_bias):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = (torch.randn(shape[1], generator=gen, dtype=torch.float64, requires_grad=True)
            if with_bias else None)
    torch.testing.assert_close(fused_leaky_relu(x, bias, slope, scale),
                               _leaky_reference(x, bias, slope, scale), rtol=0, atol=1e-15)
    inputs = (x, bias) if with_bias else (x,)
    fn = (lambda a, b: fused_leaky_relu(a, b, slope, scale)) if with_bias else (
        lambda a: fused_leaky_relu(a, None, slope, scale))
    assert torch.autograd.gradcheck(fn, inputs)
    # Analytic gradient: scale where x + b > 0, scale * slope elsewhere.
    out = fused_leaky_relu(x, bias, slope, scale)
    (grad_x,) = torch.autograd.grad(out.sum(), x)
    pre = x + bias.reshape(1, -1, *([1] * (x.dim() - 2))) if with_bias else x
    torch.testing.assert_close(grad_x, torch.where(pre > 0, scale, scale * slope).double())


def test_fused_leaky_relu_module_and_bad_bias():
    layer = FusedLeakyReLU(3)
    assert torch.equal(layer.bias, torch.zeros(3)) and layer.bias.requires_grad
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(layer(x), F.leaky_relu(x, 0.2) * 2 ** 0.5)
    with pytest.raises(ValueError, match="one entry per channel"):
        fused_leaky_relu(x, torch.zeros(4))


def test_upfirdn2d_rejects_bad_arguments():
    x = torch.randn(1, 1, 4, 4)
    with pytest.raises(ValueError, match="NCHW"):
        upfirdn2d(x[0], torch.ones(2, 2))
    with pytest.raises(ValueError, match="2-D kernel"):
        upfirdn2d(x, torch.ones(4))
    with pytest.raises(ValueError, match="positive"):
        upfirdn2d(x, torch.ones(2, 2), up=0)
    with pytest.raises(ValueError, match="no output"):
        upfirdn2d(x, torch.ones(7, 7))
    with pytest.raises(ValueError, match="crops away"):
        upfirdn2d(x, torch.ones(1, 1), pad=(-4, 6))


def test_cpu_tensors_never_start_a_build():
    attempted_before = CUDA_OPS.attempted
    x = torch.randn(1, 2, 4, 4)
    upfirdn2d(x, torch.ones(2, 2) / 4, down=2)
    fused_leaky_relu(x, torch.zeros(2))
    FusedLeakyReLU(2)(x)
    assert cuda_ops_for(x) is None
    assert CUDA_OPS.attempted == attempted_before
    if not torch.cuda.is_available():  # nothing here (nor importing `op`) started a build
        assert not CUDA_OPS.attempted


def test_failed_build_falls_back_with_one_warning(tmp_path, monkeypatch):
    monkeypatch.delenv(FORCE_NATIVE_ENV, raising=False)
    source = tmp_path / "broken.cpp"
    source.write_text("#error this extension is deliberately broken\n")
    ext = LazyExtension("subspace_broken_test_ext", [source], build_directory=tmp_path / "build")
    with pytest.warns(RuntimeWarning, match="pure-PyTorch"):
        assert ext.load() is None
    assert ext.attempted and ext.failed and ext.error is not None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second call neither rebuilds nor warns again
        assert ext.load() is None


def test_environment_variable_forces_the_pytorch_path(tmp_path, monkeypatch):
    monkeypatch.setenv(FORCE_NATIVE_ENV, "1")
    ext = LazyExtension("subspace_forced_test_ext", [tmp_path / "missing.cpp"])
    assert ext.load() is None
    assert not ext.attempted
