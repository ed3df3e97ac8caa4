// The vectorised CPU sigmoid focal loss (element-wise; the algebra is in
// fusedloss/sigmoid_focal.py, the math common/loss_math.h's sigmoid_focal_terms).
//
// Grid: at::parallel_for over chunks of kSigmoidFocalChunk elements (Device<kCPU>::
// sigmoid_focal, cpu/device.cpp); one call owns a contiguous range of chunks. One pass:
// x and the target read once, the gradient (and for reduction none the loss) written
// once; with a reduction one partial sum per chunk, so the total does not depend on the
// thread count. The launch arguments (SigmoidFocalArgs) are common/kernel_args.h's.
#pragma once

#include <cstdint>

#include "cpu/kernel_registry.h"

namespace fusedloss {
namespace cpu {

constexpr int64_t kSigmoidFocalChunk = 4096;

}  // namespace cpu
}  // namespace fusedloss

#ifdef CPU_CAPABILITY
#include <algorithm>

#include "cpu/vec.h"

namespace fusedloss {
namespace cpu {
namespace CPU_CAPABILITY {

// Chunks [k0, k1) of kSigmoidFocalChunk elements.
template <class scalar_t, class tgt_t>
void sigmoid_focal_chunks(const SigmoidFocalArgs& a, int64_t k0, int64_t k1) {
  using acc_t = acc_of<scalar_t>;
  using V = Vectorized<acc_t>;
  constexpr int64_t L = V::size();
  const scalar_t* x = static_cast<const scalar_t*>(a.x);
  const tgt_t* tg = static_cast<const tgt_t*>(a.target);
  scalar_t* grad = static_cast<scalar_t*>(a.grad);
  // The loss (reduction none) in x's dtype or, with loss_is_acc, in acc_t.
  scalar_t* loss = a.loss_is_acc ? nullptr : static_cast<scalar_t*>(a.loss);
  acc_t* loss_acc = a.loss_is_acc ? static_cast<acc_t*>(a.loss) : nullptr;
  acc_t* partials = static_cast<acc_t*>(a.partials);
  const acc_t alpha = acc_t(a.alpha), gamma = acc_t(a.gamma);
  const V vscale(*static_cast<const acc_t*>(a.loss_scale));
  for (int64_t k = k0; k < k1; ++k) {
    const int64_t begin = k * kSigmoidFocalChunk;
    const int64_t end = std::min(a.n, begin + kSigmoidFocalChunk);
    V vsum(0);
    for (int64_t i = begin; i < end; i += L) {
      const int64_t n = std::min(L, end - i);
      const V xv = n == L ? load_acc(x + i) : load_acc(x + i, n);
      const V tv = n == L ? load_acc(tg + i) : load_acc(tg + i, n);
      V l, d;
      math::sigmoid_focal_terms(xv, tv, alpha, gamma, l, d);
      if (loss) {
        if (n == L) store_acc(loss + i, l); else store_acc(loss + i, l, n);
      }
      if (loss_acc) {
        if (n == L) store_acc(loss_acc + i, l); else store_acc(loss_acc + i, l, n);
      }
      if (partials) vsum = vsum + (n == L ? l : V::set(V(0), l, n));
      if (grad) {
        if (n == L) store_acc(grad + i, d * vscale); else store_acc(grad + i, d * vscale, n);
      }
    }
    if (partials) partials[k] = hsum(vsum);
  }
}

template <class scalar_t>
void sigmoid_focal(const SigmoidFocalArgs& a, int64_t k0, int64_t k1) {
  if (a.target_is_acc)
    sigmoid_focal_chunks<scalar_t, acc_of<scalar_t>>(a, k0, k1);
  else
    sigmoid_focal_chunks<scalar_t, scalar_t>(a, k0, k1);
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace fusedloss

FUSEDLOSS_CPU_KERNEL(SigmoidFocalArgs, sigmoid_focal, float, double, c10::BFloat16,
                     c10::Half)
#endif  // CPU_CAPABILITY
