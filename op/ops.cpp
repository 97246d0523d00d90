// Python bindings of the optional CUDA kernels (built lazily by op/extension.py).
#include <torch/extension.h>

torch::Tensor upfirdn2d_cuda(const torch::Tensor& input, const torch::Tensor& kernel,
                             int64_t up_x, int64_t up_y, int64_t down_x, int64_t down_y,
                             int64_t pad_x0, int64_t pad_x1, int64_t pad_y0, int64_t pad_y1);

torch::Tensor fused_bias_leaky_relu_cuda(const torch::Tensor& input, const torch::Tensor& bias,
                                         double negative_slope, double scale);

namespace {

void check_cuda_input(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

torch::Tensor upfirdn2d(const torch::Tensor& input, const torch::Tensor& kernel, int64_t up_x,
                        int64_t up_y, int64_t down_x, int64_t down_y, int64_t pad_x0,
                        int64_t pad_x1, int64_t pad_y0, int64_t pad_y1) {
  check_cuda_input(input, "input");
  check_cuda_input(kernel, "kernel");
  TORCH_CHECK(input.dim() == 4, "input must be NCHW");
  TORCH_CHECK(kernel.dim() == 2, "kernel must be 2-D");
  TORCH_CHECK(kernel.scalar_type() == input.scalar_type(), "kernel and input dtypes differ");
  TORCH_CHECK(kernel.device() == input.device(), "kernel and input devices differ");
  TORCH_CHECK(up_x >= 1 && up_y >= 1 && down_x >= 1 && down_y >= 1, "factors must be >= 1");
  return upfirdn2d_cuda(input, kernel, up_x, up_y, down_x, down_y, pad_x0, pad_x1, pad_y0,
                        pad_y1);
}

torch::Tensor fused_bias_leaky_relu(const torch::Tensor& input, const torch::Tensor& bias,
                                    double negative_slope, double scale) {
  check_cuda_input(input, "input");
  if (bias.numel() > 0) {
    check_cuda_input(bias, "bias");
    TORCH_CHECK(input.dim() >= 2 && bias.dim() == 1 && bias.size(0) == input.size(1),
                "bias must have one entry per channel (dim 1)");
    TORCH_CHECK(bias.scalar_type() == input.scalar_type(), "bias and input dtypes differ");
  }
  return fused_bias_leaky_relu_cuda(input, bias, negative_slope, scale);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("upfirdn2d", &upfirdn2d, "upsample, FIR filter, downsample (CUDA)");
  m.def("fused_bias_leaky_relu", &fused_bias_leaky_relu, "scale * leaky_relu(x + b) (CUDA)");
}
