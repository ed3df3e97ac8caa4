// The CUDA softmax row kernels behind cross_entropy, cross_entropy_inplace (RowMode
// kCrossEntropyClass / kCrossEntropyProb) and focal_loss (kFocal): one row is one (b, s)
// position of the (B, C, S) input, its C logits at class stride S. The algebra and its
// names are those of fusedloss/cross_entropy.py; the per-row math (RowOptions,
// finish_row) is shared with the CPU kernels.
//
// Per row, two passes over the logits:
//   A. online softmax: running (m, s) per thread, merged across the row's threads by warp
//      shuffles (and shared memory for a block), plus the side sums the loss needs
//      (smoothing: sum w_c z_c; probability targets: sum w_c t'_c z_c and sum w_c t'_c).
//      One exp per element.
//   B. the gradient, p_c = exp(z_c - lse) and an affine function of it, written once.
// The loss and lse of the row come from the reduced scalars between A and B.
#include "common/row_options.h"
#include "cuda/common.cuh"
#include "common/device.h"

namespace fusedloss {
namespace cuda {
namespace {

// Processes row r with the kThreads threads of its group (lane = index in the group).
// kThreads == 1: one thread per row (the strided S > 1 layout, where consecutive threads
// own consecutive s and every class load is coalesced across the warp).
template <class scalar_t, class tgt_t, RowMode kMode, int kThreads>
__device__ __forceinline__ void softmax_row(const RowArgs& p, const RowOptions<acc_of<scalar_t>>& o,
                                            int64_t r, int lane, acc_of<scalar_t>* smem) {
  using acc_t = acc_of<scalar_t>;
  constexpr int kVec = VecWidth<scalar_t>::value;
  using XVec = VecOf<scalar_t, kVec>;
  const int64_t C = p.C, S = p.S;
  const int64_t b = r / S;
  const int64_t base = b * C * S + (r - b * S);  // x[b, 0, s], 64-bit
  const scalar_t* xr = static_cast<const scalar_t*>(p.x) + base;
  const tgt_t* tr = kMode == RowMode::kCrossEntropyProb
                       ? static_cast<const tgt_t*>(p.target_prob) + base
                       : nullptr;

  int64_t t = 0;
  math::TargetState st = math::TargetState::kValid;
  acc_t z_t = acc_t(0);
  if constexpr (kMode != RowMode::kCrossEntropyProb) {
    t = p.target[r];
    st = math::classify_target(t, p.ignore_index, C);
    // Read by every thread of the row before the reductions below: in place, another
    // thread overwrites x[t] in pass B, which starts only after them.
    if (st == math::TargetState::kValid) z_t = o.apply(static_cast<acc_t>(xr[t * S]));
  }
  // 16-byte loads when the row allows them (contiguous rows, C a multiple of the width,
  // aligned base); the choice is uniform over the row's threads.
  const bool vec = kThreads > 1 && S == 1 && C % kVec == 0 && aligned16(xr);

  // Calls f(c, x[c] as acc) for every class c this thread owns.
  auto for_each = [&](auto&& f) {
    if (vec) {
      for (int64_t c0 = int64_t(lane) * kVec; c0 < C; c0 += int64_t(kThreads) * kVec) {
        const XVec v = *reinterpret_cast<const XVec*>(xr + c0);
#pragma unroll
        for (int k = 0; k < kVec; ++k) f(c0 + k, static_cast<acc_t>(v.v[k]));
      }
    } else {
      for (int64_t c = lane; c < C; c += kThreads) f(c, static_cast<acc_t>(xr[c * S]));
    }
  };
  auto tp_at = [&](int64_t c) {
    return math::smoothed_target(static_cast<acc_t>(tr[c * S]), o.keep, o.eps_c);
  };

  // Pass A.
  acc_t m = -INFINITY, s = acc_t(0), side_z = acc_t(0), side_w = acc_t(0), unused = acc_t(0);
  for_each([&](int64_t c, acc_t xv) {
    const acc_t z = o.apply(xv);
    online_add(m, s, z);
    if constexpr (kMode == RowMode::kCrossEntropyClass) {
      if (o.eps > acc_t(0)) side_z += o.w_at(c) * z;
    } else if constexpr (kMode == RowMode::kCrossEntropyProb) {
      const acc_t wt = o.w_at(c) * tp_at(c);
      side_z += wt * z;
      side_w += wt;
    }
  });
  if constexpr (kThreads > 1) {
    Group<kThreads>::merge(m, s, smem);
    if constexpr (kMode != RowMode::kFocal) Group<kThreads>::sum3(side_z, side_w, unused, smem);
  }

  const auto rl = math::row_lse(m, s);
  // The side sums were taken on z, not on d = m - z as on the CPU (m was not known yet):
  // sum_c w_c d_c = (sum_c w_c) m - sum_c w_c z_c.
  const acc_t w_total = kMode == RowMode::kCrossEntropyProb ? side_w : o.weight_sum;
  const auto row = finish_row<kMode>(o, r, st, t, m - z_t, rl.log_s, rl.lse,
                                     w_total * m - side_z, side_w);
  if (lane == 0) {
    if (p.lse) static_cast<acc_t*>(p.lse)[r] = rl.lse;
    static_cast<acc_t*>(p.loss_rows)[r] = row.loss;
  }
  if (p.grad == nullptr && p.entropy == nullptr) return;
  // A warp's shuffles do not order memory; this does (see z_t above). A block's
  // reductions already passed __syncthreads.
  if constexpr (kThreads == 32) __syncwarp();

  // Pass B: the gradient, and the entropy sum_c p_c (lse - z_c) (0 where p_c is). m + log s
  // (not rl.lse) so that a row without a softmax gets NaN everywhere.
  scalar_t* gr = p.grad ? static_cast<scalar_t*>(p.grad) + base : nullptr;
  const acc_t lse_p = m + rl.log_s;
  const acc_t p_mult = row.p_coef * o.grad_mult, w_mult = row.w_coef * o.grad_mult;
  const acc_t t_mult = row.t_coef * o.grad_mult;
  const bool zero_row =
      kMode != RowMode::kCrossEntropyProb && st == math::TargetState::kIgnored;
  acc_t entropy = acc_t(0);
  auto grad_of = [&](int64_t c, acc_t xv) -> acc_t {
    const acc_t z = o.apply(xv);
    const acc_t e = math::fl_exp(z - lse_p);
    if (p.entropy && e > acc_t(0)) entropy += e * (lse_p - z);
    if (zero_row) return acc_t(0);
    acc_t g = e * p_mult;
    if constexpr (kMode == RowMode::kCrossEntropyClass) {
      g -= o.w_at(c) * w_mult;
    } else if constexpr (kMode == RowMode::kCrossEntropyProb) {
      g -= o.w_at(c) * tp_at(c) * w_mult;
    }
    if constexpr (kMode != RowMode::kCrossEntropyProb) {
      if (c == t) g -= t_mult;
    }
    if (o.has_cap) g *= o.dz(z);
    return g;
  };
  if (vec && (gr == nullptr || aligned16(gr))) {
    for (int64_t c0 = int64_t(lane) * kVec; c0 < C; c0 += int64_t(kThreads) * kVec) {
      const XVec v = *reinterpret_cast<const XVec*>(xr + c0);
      XVec out;
#pragma unroll
      for (int k = 0; k < kVec; ++k)
        out.v[k] = static_cast<scalar_t>(grad_of(c0 + k, static_cast<acc_t>(v.v[k])));
      if (gr) *reinterpret_cast<XVec*>(gr + c0) = out;
    }
  } else {
    for (int64_t c = lane; c < C; c += kThreads) {
      const acc_t g = grad_of(c, static_cast<acc_t>(xr[c * S]));
      if (gr) gr[c * S] = static_cast<scalar_t>(g);
    }
  }
  if (p.entropy) {  // uniform over the row's threads, as the group sum requires
    if constexpr (kThreads > 1) entropy = Group<kThreads>::sum(entropy, smem);
    if (lane == 0)
      static_cast<acc_t*>(p.entropy)[r] = math::fl_isfinite(lse_p) ? entropy : lse_p;
  }
}

// Grid: a grid-stride loop over rows. kThreads == 32: blocks of 256 threads, one warp per
// row (8 rows per block), for C <= 1024 where a block would idle most threads.
// kThreads == 512: one block per row, for long rows (a 32k-128k vocabulary).
// Each thread owns classes lane*kVec + k*kThreads*kVec (16-byte vectors) or
// lane + k*kThreads. Passes: x read twice (the second mostly from L2), the gradient
// written once: 2 * N*C*sizeof(x) read + N*C*sizeof(x) written (+ a probability target
// read twice), plus 12-16 bytes per row for target, lse and loss.
template <class scalar_t, class tgt_t, RowMode kMode, int kThreads>
__global__ void __launch_bounds__(kThreads == 32 ? 256 : kThreads)
    softmax_rows_kernel(RowArgs p) {
  using acc_t = acc_of<scalar_t>;
  constexpr int kRowsPerBlock = kThreads == 32 ? 8 : 1;
  __shared__ acc_t smem[3 * (kThreads / 32)];
  const RowOptions<acc_t> o(p);
  const int lane = kThreads == 32 ? threadIdx.x % 32 : threadIdx.x;
  const int64_t group = kThreads == 32 ? threadIdx.x / 32 : 0;
  // The loop bound is uniform over a block-per-row block, as its reductions require.
  for (int64_t r = int64_t(blockIdx.x) * kRowsPerBlock + group; r < p.N;
       r += int64_t(gridDim.x) * kRowsPerBlock) {
    softmax_row<scalar_t, tgt_t, kMode, kThreads>(p, o, r, lane, smem);
  }
}

// Grid: a grid-stride loop, blocks of 256 threads, one thread per row: for S > 1, where
// thread r reads x[b, c, s] for every c and the warp's loads of one class are adjacent.
// Same passes and bytes as above.
template <class scalar_t, class tgt_t, RowMode kMode>
__global__ void __launch_bounds__(256) softmax_rows_strided_kernel(RowArgs p) {
  const RowOptions<acc_of<scalar_t>> o(p);
  for (int64_t r = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; r < p.N;
       r += int64_t(gridDim.x) * blockDim.x) {
    softmax_row<scalar_t, tgt_t, kMode, 1>(p, o, r, 0, nullptr);
  }
}

template <class scalar_t, class tgt_t, RowMode kMode>
void launch(const RowArgs& p) {
  constexpr int64_t kMaxBlocks = int64_t(1) << 20;
  if (p.S > 1) {
    const int64_t blocks = std::min<int64_t>((p.N + 255) / 256, kMaxBlocks);
    softmax_rows_strided_kernel<scalar_t, tgt_t, kMode><<<blocks, 256, 0, stream()>>>(p);
  } else if (p.C <= 1024) {
    const int64_t blocks = std::min<int64_t>((p.N + 7) / 8, kMaxBlocks);
    softmax_rows_kernel<scalar_t, tgt_t, kMode, 32><<<blocks, 256, 0, stream()>>>(p);
  } else {
    const int64_t blocks = std::min<int64_t>(p.N, kMaxBlocks);
    softmax_rows_kernel<scalar_t, tgt_t, kMode, 512><<<blocks, 512, 0, stream()>>>(p);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

}  // namespace cuda

using namespace cuda;  // the kernels and helpers above

template <>
void Device<kCUDA>::softmax_rows(const RowArgs& a) {
  if (a.N == 0) return;
  visit_dtype(a.dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = acc_of<scalar_t>;
    switch (a.mode) {
      case RowMode::kCrossEntropyClass:
        launch<scalar_t, scalar_t, RowMode::kCrossEntropyClass>(a);
        break;
      case RowMode::kCrossEntropyProb:
        if (a.target_prob_is_acc)
          launch<scalar_t, acc_t, RowMode::kCrossEntropyProb>(a);
        else
          launch<scalar_t, scalar_t, RowMode::kCrossEntropyProb>(a);
        break;
      case RowMode::kFocal:
        launch<scalar_t, scalar_t, RowMode::kFocal>(a);
        break;
    }
  });
}

}  // namespace fusedloss
