// The CUDA sigmoid focal loss (element-wise; the algebra is in fusedloss/sigmoid_focal.py,
// the math common/loss_math.h's sigmoid_focal_terms, shared with the CPU kernel).
#include "cuda/common.cuh"
#include "common/device.h"

namespace fusedloss {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 2048;  // fixed: the partial sums do not depend on the GPU

// Grid: min(ceil(n / 256), 2048) blocks of 256 threads, a grid-stride loop over the n
// elements; each thread owns elements i = tid + k * (grid size). One pass: reads x and
// the target once, writes the gradient (and the per-element loss for reduction none)
// once: n * (2 * sizeof(x) + sizeof(target)) bytes. With a reduction every block writes
// one partial sum (fixed order, no atomics) that Device<kCUDA>::sum_rows then adds up.
template <class scalar_t, class tgt_t>
__global__ void __launch_bounds__(kThreads) sigmoid_focal_kernel(SigmoidFocalArgs a) {
  using acc_t = acc_of<scalar_t>;
  __shared__ acc_t smem[3 * (kThreads / 32)];
  const scalar_t* x = static_cast<const scalar_t*>(a.x);
  const tgt_t* target = static_cast<const tgt_t*>(a.target);
  // The loss (reduction none) in x's dtype or, with loss_is_acc, in acc_t.
  scalar_t* loss = a.loss_is_acc ? nullptr : static_cast<scalar_t*>(a.loss);
  acc_t* loss_acc = a.loss_is_acc ? static_cast<acc_t*>(a.loss) : nullptr;
  scalar_t* grad = static_cast<scalar_t*>(a.grad);
  const acc_t alpha = acc_t(a.alpha), gamma = acc_t(a.gamma);
  const acc_t ls = *static_cast<const acc_t*>(a.loss_scale);
  acc_t sum = acc_t(0);
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < a.n;
       i += int64_t(gridDim.x) * kThreads) {
    acc_t l, d;
    math::sigmoid_focal_terms(static_cast<acc_t>(x[i]), static_cast<acc_t>(target[i]), alpha,
                              gamma, l, d);
    if (loss) loss[i] = static_cast<scalar_t>(l);
    if (loss_acc) loss_acc[i] = l;
    sum += l;
    if (grad) grad[i] = static_cast<scalar_t>(d * ls);
  }
  if (a.partials) {
    sum = Group<kThreads>::sum(sum, smem);
    if (threadIdx.x == 0) static_cast<acc_t*>(a.partials)[blockIdx.x] = sum;
  }
}

}  // namespace

}  // namespace cuda

using namespace cuda;  // the kernels and helpers above

template <>
int64_t Device<kCUDA>::sigmoid_focal_partials(int64_t n) {
  return std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, kMaxBlocks));
}

template <>
void Device<kCUDA>::sigmoid_focal(const SigmoidFocalArgs& a) {
  const int64_t blocks = sigmoid_focal_partials(a.n);
  visit_dtype(a.dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    if (a.target_is_acc)
      sigmoid_focal_kernel<scalar_t, acc_of<scalar_t>><<<blocks, kThreads, 0, stream()>>>(a);
    else
      sigmoid_focal_kernel<scalar_t, scalar_t><<<blocks, kThreads, 0, stream()>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace fusedloss
