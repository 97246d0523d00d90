// upfirdn2d on CUDA: one thread per output sample, summing the kernel taps that hit input
// samples of the zero-inserted, padded signal (see op/upfirdn2d.py for the definition).
#include <ATen/AccumulateType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <algorithm>

namespace {

template <typename scalar_t>
__global__ void upfirdn2d_kernel(const scalar_t* __restrict__ input,
                                 const scalar_t* __restrict__ kernel,
                                 scalar_t* __restrict__ output, int64_t total, int in_h,
                                 int in_w, int k_h, int k_w, int out_h, int out_w, int up_x,
                                 int up_y, int down_x, int down_y, int pad_x0, int pad_y0) {
  using acc_t = at::acc_type<scalar_t, true>;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += stride) {
    const int ox = static_cast<int>(idx % out_w);
    const int oy = static_cast<int>((idx / out_w) % out_h);
    const int64_t plane = idx / (static_cast<int64_t>(out_w) * out_h);
    const scalar_t* x = input + plane * in_h * in_w;
    acc_t acc = 0;
    for (int ty = 0; ty < k_h; ++ty) {
      // Position in the zero-inserted signal; only multiples of `up` carry input samples.
      const int jy = oy * down_y + ty - pad_y0;
      if (jy < 0 || jy % up_y != 0) continue;
      const int iy = jy / up_y;
      if (iy >= in_h) continue;
      const scalar_t* krow = kernel + (k_h - 1 - ty) * k_w;
      for (int tx = 0; tx < k_w; ++tx) {
        const int jx = ox * down_x + tx - pad_x0;
        if (jx < 0 || jx % up_x != 0) continue;
        const int ix = jx / up_x;
        if (ix >= in_w) continue;
        acc += static_cast<acc_t>(x[iy * in_w + ix]) * static_cast<acc_t>(krow[k_w - 1 - tx]);
      }
    }
    output[idx] = static_cast<scalar_t>(acc);
  }
}

}  // namespace

torch::Tensor upfirdn2d_cuda(const torch::Tensor& input, const torch::Tensor& kernel,
                             int64_t up_x, int64_t up_y, int64_t down_x, int64_t down_y,
                             int64_t pad_x0, int64_t pad_x1, int64_t pad_y0, int64_t pad_y1) {
  const at::cuda::OptionalCUDAGuard device_guard(device_of(input));
  const int64_t in_h = input.size(2), in_w = input.size(3);
  const int64_t k_h = kernel.size(0), k_w = kernel.size(1);
  const int64_t num_y = in_h * up_y + pad_y0 + pad_y1 - k_h;
  const int64_t num_x = in_w * up_x + pad_x0 + pad_x1 - k_w;
  TORCH_CHECK(num_y >= 0 && num_x >= 0, "upfirdn2d: the padded input is smaller than the kernel");
  const int64_t out_h = num_y / down_y + 1, out_w = num_x / down_x + 1;
  auto output = at::empty({input.size(0), input.size(1), out_h, out_w}, input.options());
  const int64_t total = output.numel();
  if (total == 0) return output;
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((total + threads - 1) / threads, 65535LL * 16);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "upfirdn2d_cuda",
                                  [&] {
    upfirdn2d_kernel<scalar_t><<<blocks, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        input.data_ptr<scalar_t>(), kernel.data_ptr<scalar_t>(), output.data_ptr<scalar_t>(),
        total, static_cast<int>(in_h), static_cast<int>(in_w), static_cast<int>(k_h),
        static_cast<int>(k_w), static_cast<int>(out_h), static_cast<int>(out_w),
        static_cast<int>(up_x), static_cast<int>(up_y), static_cast<int>(down_x),
        static_cast<int>(down_y), static_cast<int>(pad_x0), static_cast<int>(pad_y0));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return output;
}
