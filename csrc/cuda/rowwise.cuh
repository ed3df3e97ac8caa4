// The CUDA softmax row kernels behind cross_entropy, cross_entropy_inplace (RowMode
// kCrossEntropyClass / kCrossEntropyProb) and focal_loss (kFocal): one row is one (b, s)
// position of the (B, C, S) input, its C logits at class stride S.
//
// Per row, two passes over the logits:
//   A. online softmax: running (max, sum-exp) per thread, merged across the row's
//      threads by warp shuffles (and shared memory for a block), plus the side sums the
//      loss needs (smoothing: sum w_c z_c; probability targets: sum w_c t'_c z_c and
//      sum w_c t'_c). One exp per element.
//   B. the gradient, p_c = exp(z_c - lse) and an affine function of it, written once.
// The loss and lse of the row come from the reduced scalars between A and B.
#pragma once

#include "cuda/common.cuh"

namespace fusedloss {
namespace cuda {

enum class RowMode : int { kCrossEntropyClass = 0, kCrossEntropyProb = 1, kFocal = 2 };

// Pointers and sizes of one launch. All pointers are device pointers; per-class vectors
// and the loss scale are in the accumulation type.
struct RowPtrs {
  const void* x;
  void* grad;                // like x (may alias it), or nullptr: no gradient
  const int64_t* target;     // (N,) class indices
  const void* target_prob;   // (B, C, S) probabilities
  const void* weight;        // (C,) or nullptr
  const void* alpha;         // (C,) or nullptr (focal)
  const void* loss_scale;    // 0-dim: read on the device, never on the host
  const void* weight_sum;    // 0-dim sum of weight (computed on the device), or nullptr
  void* loss_rows;           // (N,): x's dtype for reduction none, else accumulation type
  bool loss_rows_acc;
  void* lse;                 // (N,) accumulation type
  int64_t C, S, N;
  int64_t ignore_index;
};

template <class acc_t>
struct RowOpts {
  acc_t scale, cap, inv_cap;
  acc_t eps, keep, eps_c, n_classes;
  acc_t z_loss, gamma;
  bool has_cap, transform, smooth;

  __device__ __forceinline__ acc_t apply(acc_t z) const {
    if (transform) {
      z *= scale;
      if (has_cap) z = fm::softcap_apply(z, cap, inv_cap);
    }
    return z;
  }
};

// Processes row r with the kThreads threads of its group (lane = index in the group).
// kThreads == 1: one thread per row (the strided S > 1 layout, where consecutive threads
// own consecutive s and every class load is coalesced across the warp).
template <class scalar_t, class tgt_t, RowMode kMode, int kThreads>
__device__ __forceinline__ void softmax_row(const RowPtrs& p, const RowOpts<acc_of<scalar_t>>& o,
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
  const acc_t* w = static_cast<const acc_t*>(p.weight);
  const acc_t weight_sum =
      p.weight_sum ? *static_cast<const acc_t*>(p.weight_sum) : o.n_classes;

  int64_t t = 0;
  fm::TargetState st = fm::TargetState::kValid;
  acc_t z_t = acc_t(0);
  if constexpr (kMode != RowMode::kCrossEntropyProb) {
    t = p.target[r];
    st = fm::classify_target(t, p.ignore_index, C);
    // Read by every thread of the row before the reductions below: in place, another
    // thread overwrites x[t] in pass B, which starts only after them.
    if (st == fm::TargetState::kValid) z_t = o.apply(static_cast<acc_t>(xr[t * S]));
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
  auto w_at = [&](int64_t c) { return w ? w[c] : acc_t(1); };
  auto tp_at = [&](int64_t c) {
    return fm::smoothed_target(static_cast<acc_t>(tr[c * S]), o.keep, o.eps_c);
  };

  // Pass A.
  acc_t m = -INFINITY, s = acc_t(0), side_a = acc_t(0), side_b = acc_t(0), unused = acc_t(0);
  for_each([&](int64_t c, acc_t xv) {
    const acc_t z = o.apply(xv);
    online_add(m, s, z);
    if constexpr (kMode == RowMode::kCrossEntropyClass) {
      if (o.smooth) side_a += w_at(c) * z;
    } else if constexpr (kMode == RowMode::kCrossEntropyProb) {
      const acc_t wt = w_at(c) * tp_at(c);
      side_a += wt * z;
      side_b += wt;
    }
  });
  if constexpr (kThreads > 1) {
    Group<kThreads>::merge(m, s, smem);
    if constexpr (kMode != RowMode::kFocal) Group<kThreads>::sum3(side_a, side_b, unused, smem);
  }

  const auto rl = fm::row_lse(m, s);
  // The side sums were taken on z, not on d = m - z as on the CPU (m was not known yet):
  // sum_c w_c d_c = (sum_c w_c) m - sum_c w_c z_c.
  fm::CrossEntropyRow<acc_t> row;
  if constexpr (kMode == RowMode::kCrossEntropyProb) {
    row = fm::cross_entropy_prob_row(side_b * m - side_a, side_b, rl.log_s, rl.lse, o.z_loss);
  } else {
    const bool valid = st == fm::TargetState::kValid;
    const acc_t w_t = valid ? w_at(t) : acc_t(1);
    const acc_t a_t = valid && p.alpha ? static_cast<const acc_t*>(p.alpha)[t] : acc_t(1);
    row = fm::class_target_row(kMode == RowMode::kFocal, st, m - z_t, rl.log_s, rl.lse, w_t,
                               a_t, o.eps, o.n_classes, weight_sum, weight_sum * m - side_a,
                               o.z_loss, o.gamma);
  }
  if (lane == 0) {
    static_cast<acc_t*>(p.lse)[r] = rl.lse;
    if (p.loss_rows_acc)
      static_cast<acc_t*>(p.loss_rows)[r] = row.loss;
    else
      static_cast<scalar_t*>(p.loss_rows)[r] = static_cast<scalar_t>(row.loss);
  }
  if (p.grad == nullptr) return;
  // A warp's shuffles do not order memory; this does (see z_t above). A block's
  // reductions already passed __syncthreads.
  if constexpr (kThreads == 32) __syncwarp();

  // Pass B. m + log s (not rl.lse) so that a row without a softmax gets NaN everywhere.
  scalar_t* gr = static_cast<scalar_t*>(p.grad) + base;
  const acc_t lse_p = m + rl.log_s;
  const acc_t gm = o.scale * *static_cast<const acc_t*>(p.loss_scale);
  const acc_t p_mult = row.p_coef * gm, w_mult = row.w_coef * gm, t_mult = row.t_coef * gm;
  const bool zero_row = kMode != RowMode::kCrossEntropyProb && st == fm::TargetState::kIgnored;
  auto grad_of = [&](int64_t c, acc_t xv) -> acc_t {
    if (zero_row) return acc_t(0);
    const acc_t z = o.apply(xv);
    acc_t g = fm::fl_exp(z - lse_p) * p_mult;
    if constexpr (kMode == RowMode::kCrossEntropyClass) {
      g -= w_at(c) * w_mult;
    } else if constexpr (kMode == RowMode::kCrossEntropyProb) {
      g -= w_at(c) * tp_at(c) * w_mult;
    }
    if constexpr (kMode != RowMode::kCrossEntropyProb) {
      if (c == t) g -= t_mult;
    }
    if (o.has_cap) g *= fm::softcap_grad_from_output(z, o.inv_cap);
    return g;
  };
  if (vec && aligned16(gr)) {
    for (int64_t c0 = int64_t(lane) * kVec; c0 < C; c0 += int64_t(kThreads) * kVec) {
      const XVec v = *reinterpret_cast<const XVec*>(xr + c0);
      XVec out;
#pragma unroll
      for (int k = 0; k < kVec; ++k)
        out.v[k] = static_cast<scalar_t>(grad_of(c0 + k, static_cast<acc_t>(v.v[k])));
      *reinterpret_cast<XVec*>(gr + c0) = out;
    }
  } else {
    for (int64_t c = lane; c < C; c += kThreads)
      gr[c * S] = static_cast<scalar_t>(grad_of(c, static_cast<acc_t>(xr[c * S])));
  }
}

// ---------------------------------------------------------------- kernels
// Grid: a grid-stride loop over rows. kThreads == 32: blocks of 256 threads, one warp per
// row (8 rows per block), for C <= 1024 where a block would idle most threads.
// kThreads == 512: one block per row, for long rows (a 32k-128k vocabulary).
// Each thread owns classes lane*kVec + k*kThreads*kVec (16-byte vectors) or
// lane + k*kThreads. Passes: x read twice (the second mostly from L2), the gradient
// written once: 2 * N*C*sizeof(x) read + N*C*sizeof(x) written (+ a probability target
// read twice), plus 12-16 bytes per row for target, lse and loss.
template <class scalar_t, class tgt_t, RowMode kMode, int kThreads>
__global__ void __launch_bounds__(kThreads == 32 ? 256 : kThreads)
    softmax_rows_kernel(RowPtrs p, RowOpts<acc_of<scalar_t>> o) {
  using acc_t = acc_of<scalar_t>;
  constexpr int kRowsPerBlock = kThreads == 32 ? 8 : 1;
  __shared__ acc_t smem[3 * (kThreads / 32)];
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
__global__ void __launch_bounds__(256)
    softmax_rows_strided_kernel(RowPtrs p, RowOpts<acc_of<scalar_t>> o) {
  for (int64_t r = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; r < p.N;
       r += int64_t(gridDim.x) * blockDim.x) {
    softmax_row<scalar_t, tgt_t, kMode, 1>(p, o, r, 0, nullptr);
  }
}

template <class scalar_t, class tgt_t, RowMode kMode>
void launch_softmax_rows(const RowPtrs& p, const RowOpts<acc_of<scalar_t>>& o) {
  if (p.N == 0) return;
  auto stream = c10::cuda::getCurrentCUDAStream();
  constexpr int64_t kMaxBlocks = int64_t(1) << 20;
  if (p.S > 1) {
    const int64_t blocks = std::min<int64_t>((p.N + 255) / 256, kMaxBlocks);
    softmax_rows_strided_kernel<scalar_t, tgt_t, kMode><<<blocks, 256, 0, stream>>>(p, o);
  } else if (p.C <= 1024) {
    const int64_t blocks = std::min<int64_t>((p.N + 7) / 8, kMaxBlocks);
    softmax_rows_kernel<scalar_t, tgt_t, kMode, 32><<<blocks, 256, 0, stream>>>(p, o);
  } else {
    const int64_t blocks = std::min<int64_t>(p.N, kMaxBlocks);
    softmax_rows_kernel<scalar_t, tgt_t, kMode, 512><<<blocks, 512, 0, stream>>>(p, o);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <class acc_t>
RowOpts<acc_t> make_row_opts(int64_t C, double label_smoothing, double logit_scale,
                             double softcap, double z_loss, double gamma) {
  RowOpts<acc_t> o;
  o.has_cap = softcap > 0;
  o.transform = o.has_cap || logit_scale != 1.0;
  o.scale = acc_t(logit_scale);
  o.cap = acc_t(softcap);
  o.inv_cap = o.has_cap ? acc_t(1.0 / softcap) : acc_t(0);
  o.eps = acc_t(label_smoothing);
  o.keep = acc_t(1.0 - label_smoothing);
  o.n_classes = acc_t(C);
  o.eps_c = acc_t(label_smoothing / double(C));
  o.smooth = label_smoothing > 0;
  o.z_loss = acc_t(z_loss);
  o.gamma = acc_t(gamma);
  return o;
}

}  // namespace cuda
}  // namespace fusedloss
