// The CUDA device's buffers and sums (Device<kCUDA>::new_grad, sum_rows).
#include <ATen/ATen.h>

#include "cuda/common.cuh"
#include "common/device.h"

namespace fusedloss {
namespace cuda {
namespace {

constexpr int kSumThreads = 1024;

// One block of kSumThreads threads: out[0] = (sum_i rows[i]) * scale[0] (scale nullptr:
// 1). Reads n accumulation-type values once; a fixed assignment of rows to threads and a
// fixed tree make the result independent of timing (no atomics).
template <class acc_t, class out_t>
__global__ void __launch_bounds__(kSumThreads)
    sum_rows_kernel(const acc_t* __restrict__ rows, int64_t n,
                    const acc_t* __restrict__ scale, out_t* __restrict__ out) {
  __shared__ acc_t smem[3 * (kSumThreads / 32)];
  acc_t v = acc_t(0);
  for (int64_t i = threadIdx.x; i < n; i += kSumThreads) v += rows[i];
  v = Group<kSumThreads>::sum(v, smem);
  if (threadIdx.x == 0) out[0] = static_cast<out_t>(scale ? v * scale[0] : v);
}

DType dtype_of(at::ScalarType t) {
  switch (t) {
    case at::kDouble: return DType::kDouble;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kHalf;
    default: return DType::kFloat;
  }
}

}  // namespace

}  // namespace cuda

using namespace cuda;  // the kernels and helpers above

template <>
at::Tensor Device<kCUDA>::new_grad(const at::Tensor& x) {
  return at::empty_like(x, at::MemoryFormat::Contiguous);
}

template <>
at::Tensor Device<kCUDA>::sum_rows(const at::Tensor& rows, const at::Tensor& scale,
                                   at::ScalarType out_dtype) {
  const at::Tensor r = rows.contiguous();
  at::Tensor out = at::empty({}, r.options().dtype(out_dtype));
  visit_dtype(dtype_of(out_dtype), [&](auto out_tag) {
    using out_t = decltype(out_tag);
    visit_dtype(dtype_of(r.scalar_type()), [&](auto acc_tag) {
      using acc_t = decltype(acc_tag);
      if constexpr (std::is_same_v<acc_t, float> || std::is_same_v<acc_t, double>) {
        sum_rows_kernel<acc_t, out_t><<<1, kSumThreads, 0, stream()>>>(
            r.const_data_ptr<acc_t>(), r.numel(),
            scale.defined() ? scale.const_data_ptr<acc_t>() : nullptr,
            out.mutable_data_ptr<out_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  });
  return out;
}

}  // namespace fusedloss
