"""FIR up/down-sampling (`upfirdn2d`) and fused bias + leaky ReLU.

Pure PyTorch by default, so CPU works and importing this package never compiles anything. On CUDA
tensors an optional compiled fast path (`op/ops.cpp`, `op/*.cu`) is built on first use with
`torch.utils.cpp_extension.load` and cached; when that build fails the PyTorch path is used after a
single warning. Set `SUBSPACE_FORCE_NATIVE_OPS=1` to always use the PyTorch path.
"""
from op.fused_act import FusedLeakyReLU, fused_leaky_relu, fused_leaky_relu_native
from op.upfirdn2d import upfirdn2d, upfirdn2d_native

__all__ = ["FusedLeakyReLU", "fused_leaky_relu", "fused_leaky_relu_native", "upfirdn2d",
           "upfirdn2d_native"]
