// The vectorised CPU softmax row kernels: cross-entropy (class-index and probability
// targets) and the softmax focal loss. The algebra and its names are those of
// fusedloss/cross_entropy.py and focal.py; the per-row math is common/row_options.h and
// common/loss_math.h, shared with the CUDA kernels.
//
// One row = one (b, s) position: C logits, a target, an optional weight per class.
// Per row, three sweeps over the same C values while they sit in L1/L2:
//   1. m = max_c z_c (z = the transformed logits, kept in a scratch row when they differ
//      from x, so the tanh of the softcap runs once per element);
//   2. e_c = exp(z_c - m), s = sum e_c, plus the side sums the loss needs (smoothing,
//      probability targets); e_c is kept (in the gradient row itself when it has the
//      accumulation type) so the exponential also runs once per element;
//   3. the gradient, an affine function of e_c, written once.
// An online (running max) sweep would fuse 1 and 2 but costs a second exp per vector
// whenever the max moves; on a CPU the separate max sweep is cheaper since the row is
// already in cache. The loss and lse of the row come from scalars between 2 and 3.
// Memory traffic per row: x read once from DRAM, the gradient written once.
//
// With S > 1 ((B, C, S) input, class stride S) the vector lanes run across S: one work
// item is a tile of `lanes` consecutive positions s, and x[b, c, s0:s0+lanes] is one
// contiguous load per class. Those tiles recompute z and exp in sweep 3 instead of
// keeping a C x lanes scratch (C is small in that layout: segmentation classes).
//
// Grid: at::parallel_for over the rows (S == 1) or the tiles (S > 1), launched by
// Device<kCPU>::softmax_rows (cpu/device.cpp); one call owns a contiguous range of them.
// The launch arguments (RowArgs) are shared with the CUDA kernels: common/kernel_args.h.
#pragma once

#include "cpu/kernel_registry.h"

#ifdef CPU_CAPABILITY
#include <algorithm>
#include <limits>

#include "cpu/vec.h"  // first: the vector overloads of common/loss_math.h's primitives
#include "common/row_options.h"

namespace fusedloss {
namespace cpu {
namespace CPU_CAPABILITY {

using math::TargetState;

// The typed pointers of a launch: x, the gradient (or nullptr), the probability target,
// and the per-row outputs (loss, lse, entropy; the last two may be nullptr).
template <class scalar_t, class tgt_t>
struct RowData {
  using acc_t = acc_of<scalar_t>;
  const scalar_t* x;
  scalar_t* grad;
  const tgt_t* tprob;
  acc_t *loss_rows, *lse, *entropy;
  explicit RowData(const RowArgs& a)
      : x(static_cast<const scalar_t*>(a.x)),
        grad(static_cast<scalar_t*>(a.grad)),
        tprob(static_cast<const tgt_t*>(a.target_prob)),
        loss_rows(static_cast<acc_t*>(a.loss_rows)),
        lse(static_cast<acc_t*>(a.lse)),
        entropy(static_cast<acc_t*>(a.entropy)) {}
};

// ---------------------------------------------------------------- S == 1: one row per item
// Work: rows [r0, r1) of one thread (at::parallel_for hands out contiguous chunks).
// Sweeps per row: 1 reads x (DRAM), 2 reads x or the z scratch (cache) and writes e,
// 3 reads e (cache) and writes the gradient. Bytes: C * sizeof(x) read, C * sizeof(x)
// written (+ C * sizeof(target) twice for probability targets), 16 per row for
// target, loss and lse. Scratch: up to two C-element rows per call, reused across rows.
template <class scalar_t, class tgt_t, RowMode kMode>
void rows_contiguous(const RowArgs& a, int64_t r0, int64_t r1) {
  using acc_t = acc_of<scalar_t>;
  using V = Vectorized<acc_t>;
  constexpr int64_t L = V::size();
  const RowOptions<acc_t> o(a);
  const int64_t C = a.C;
  const auto [x, grad, tprob, loss_rows, lse_out, entropy_out] = RowData<scalar_t, tgt_t>(a);

  constexpr bool kSame = std::is_same_v<scalar_t, acc_t>;
  // z is read straight from x (converting half types on the fly) when the transform is
  // the identity; otherwise it is computed once into a scratch row.
  const bool z_in_scratch = o.transform;
  // e_c goes into the gradient row when that row can hold it exactly.
  const bool e_in_grad = kSame && grad != nullptr;
  Scratch<acc_t> zbuf(z_in_scratch ? C : 0);
  Scratch<acc_t> ebuf(grad != nullptr && !e_in_grad ? C : 0);
  const bool smooth_sum = kMode == RowMode::kCrossEntropyClass && o.eps > acc_t(0);
  const acc_t ninf = -std::numeric_limits<acc_t>::infinity();

  for (int64_t r = r0; r < r1; ++r) {
    const scalar_t* xr = x + r * C;
    scalar_t* gr = grad ? grad + r * C : nullptr;
    const tgt_t* tr = tprob ? tprob + r * C : nullptr;
    int64_t t = 0;
    TargetState st = TargetState::kValid;
    if constexpr (kMode != RowMode::kCrossEntropyProb) {
      t = a.target[r];
      st = math::classify_target(t, a.ignore_index, C);
    }
    // z_c for c .. c+n-1 (n <= L; missing lanes 0).
    auto z_at = [&](int64_t c, int64_t n) {
      if (z_in_scratch) return n == L ? V::loadu(zbuf.p + c) : V::loadu(zbuf.p + c, n);
      return n == L ? load_acc(xr + c) : load_acc(xr + c, n);
    };

    // Sweep 1: the max (and z into the scratch row when it is not x itself).
    V vmax(ninf);
    int64_t c = 0;
    if (!z_in_scratch) {
      for (; c + L <= C; c += L) vmax = at::vec::maximum(vmax, z_at(c, L));
      if (c < C) vmax = at::vec::maximum(vmax, V::set(V(ninf), z_at(c, C - c), C - c));
    } else {
      for (; c + L <= C; c += L) {
        V z = o.apply(load_acc(xr + c));
        z.store(zbuf.p + c);
        vmax = at::vec::maximum(vmax, z);
      }
      if (c < C) {
        V z = o.apply(load_acc(xr + c, C - c));
        z.store(zbuf.p + c, C - c);
        vmax = at::vec::maximum(vmax, V::set(V(ninf), z, C - c));
      }
    }
    const acc_t m = hmax(vmax);
    // Read before sweep 2, which may overwrite x (in place, float32/float64).
    const acc_t z_t = st != TargetState::kValid ? acc_t(0)
                      : z_in_scratch            ? zbuf.p[t]
                                                : static_cast<acc_t>(xr[t]);

    // Sweep 2: e = exp(z - m), s = sum e, side sums of d = m - z (and sum e d for the
    // entropy; 0 where e is, at -inf logits).
    acc_t* er = e_in_grad ? reinterpret_cast<acc_t*>(gr) : ebuf.p;
    V vs(0), vside_d(0), vside_w(0), ved(0);
    const V vm(m);
    auto sweep2 = [&](int64_t c, int64_t n) {
      V z = z_at(c, n);
      V d = vm - z;
      V e = softmax_exp(z - vm);
      if (n < L) {
        e = V::set(V(0), e, n);
        d = V::set(V(0), d, n);
      }
      vs = vs + e;
      if (entropy_out) ved = ved + V::blendv(V(0), e * d, e > V(0));
      if (er) {
        if (n == L) e.store(er + c); else e.store(er + c, n);
      }
      if constexpr (kMode == RowMode::kCrossEntropyClass) {
        if (smooth_sum) vside_d = vside_d + (o.w ? d * V::loadu(o.w + c, n) : d);
      } else if constexpr (kMode == RowMode::kCrossEntropyProb) {
        V tp = math::smoothed_target(n == L ? load_acc(tr + c) : load_acc(tr + c, n), o.keep,
                                     o.eps_c);
        V wt = o.w ? tp * V::loadu(o.w + c, n) : tp;
        if (n < L) wt = V::set(V(0), wt, n);
        vside_d = vside_d + wt * d;
        vside_w = vside_w + wt;
      }
    };
    for (c = 0; c + L <= C; c += L) sweep2(c, L);
    if (c < C) sweep2(c, C - c);

    const auto st_row = math::row_lse(m, hsum(vs));
    const acc_t s = st_row.s, log_s = st_row.log_s, lse = st_row.lse;
    if (lse_out) lse_out[r] = lse;
    if (entropy_out) entropy_out[r] = row_entropy(s, log_s, hsum(ved));
    const auto row = finish_row<kMode>(o, r, st, t, m - z_t, log_s, lse, hsum(vside_d),
                                       hsum(vside_w));
    loss_rows[r] = row.loss;
    if (!gr) continue;

    // Sweep 3: the gradient.
    if (st != TargetState::kValid && kMode != RowMode::kCrossEntropyProb) {
      const scalar_t fill = st == TargetState::kIgnored ? scalar_t(0)
                                                        : scalar_t(math::fl_nan<acc_t>());
      std::fill(gr, gr + C, fill);
      continue;
    }
    const acc_t e_t = kMode != RowMode::kCrossEntropyProb ? er[t] : acc_t(0);
    const acc_t p_mult = row.p_coef / s * o.grad_mult;
    const acc_t w_mult = row.w_coef * o.grad_mult;
    const V vp(p_mult), vw(w_mult);
    auto sweep3 = [&](int64_t c, int64_t n) {
      V g = (n == L ? V::loadu(er + c) : V::loadu(er + c, n)) * vp;
      if constexpr (kMode == RowMode::kCrossEntropyClass) {
        if (w_mult != acc_t(0)) g = g - (o.w ? V::loadu(o.w + c, n) * vw : vw);
      } else if constexpr (kMode == RowMode::kCrossEntropyProb) {
        V tp = math::smoothed_target(n == L ? load_acc(tr + c) : load_acc(tr + c, n), o.keep,
                                     o.eps_c);
        g = g - (o.w ? tp * V::loadu(o.w + c, n) : tp) * vw;
      }
      if (o.has_cap) g = g * o.dz(n == L ? V::loadu(zbuf.p + c) : V::loadu(zbuf.p + c, n));
      if (n == L) store_acc(gr + c, g); else store_acc(gr + c, g, n);
    };
    for (c = 0; c + L <= C; c += L) sweep3(c, L);
    if (c < C) sweep3(c, C - c);
    if constexpr (kMode != RowMode::kCrossEntropyProb) {
      // The target's own term, recomputed in full so it is rounded to scalar_t once.
      acc_t g_t = e_t * p_mult - o.w_at(t) * w_mult - row.t_coef * o.grad_mult;
      if (o.has_cap) g_t *= math::softcap_grad_from_output(z_t, o.inv_cap);
      gr[t] = static_cast<scalar_t>(g_t);
    }
  }
}

// ---------------------------------------------------------------- S > 1: lanes across s
// Work: tiles [i0, i1); tile i is b = i / tiles_per_b and positions s0 .. s0+L-1, one
// vector lane per position. Three sweeps over the tile's C x L block (max, sum-exp,
// gradient), each one contiguous L-element load per class; z and exp are recomputed in
// the third. Bytes: as for contiguous rows.
template <class scalar_t, class tgt_t, RowMode kMode>
void rows_strided(const RowArgs& a, int64_t i0, int64_t i1) {
  using acc_t = acc_of<scalar_t>;
  using V = Vectorized<acc_t>;
  constexpr int64_t L = V::size();
  const RowOptions<acc_t> o(a);
  const int64_t C = a.C, S = a.S;
  const int64_t tiles_per_b = (S + L - 1) / L;
  const auto [x, grad, tprob, loss_rows, lse_out, entropy_out] = RowData<scalar_t, tgt_t>(a);
  const bool smooth_sum = kMode == RowMode::kCrossEntropyClass && o.eps > acc_t(0);

  for (int64_t item = i0; item < i1; ++item) {
    const int64_t b = item / tiles_per_b;
    const int64_t s0 = (item % tiles_per_b) * L;
    const int64_t n = std::min(L, S - s0);
    const int64_t base = b * C * S + s0;  // x[b, 0, s0]
    const int64_t row0 = b * S + s0;
    auto z_at = [&](int64_t c) {
      return o.apply(n == L ? load_acc(x + base + c * S) : load_acc(x + base + c * S, n));
    };
    auto tp_at = [&](int64_t c) {
      const tgt_t* p = tprob + base + c * S;
      return math::smoothed_target(n == L ? load_acc(p) : load_acc(p, n), o.keep, o.eps_c);
    };

    V vmax(-std::numeric_limits<acc_t>::infinity());
    for (int64_t c = 0; c < C; ++c) vmax = at::vec::maximum(vmax, z_at(c));

    V vs(0), vside_d(0), vside_w(0), ved(0);
    for (int64_t c = 0; c < C; ++c) {
      const V z = z_at(c);
      const V d = vmax - z;
      const V e = softmax_exp(z - vmax);
      vs = vs + e;
      if (entropy_out) ved = ved + V::blendv(V(0), e * d, e > V(0));
      if constexpr (kMode == RowMode::kCrossEntropyClass) {
        if (smooth_sum) vside_d = vside_d + d * V(o.w_at(c));
      } else if constexpr (kMode == RowMode::kCrossEntropyProb) {
        const V wt = tp_at(c) * V(o.w_at(c));
        vside_d = vside_d + wt * d;
        vside_w = vside_w + wt;
      }
    }

    __at_align__ acc_t m[L], s[L], side_d[L], side_w[L], ed[L];
    __at_align__ acc_t p_mult[L], w_mult[L];
    acc_t t_mult[L], z_t[L];
    int64_t t[L];
    TargetState st[L];
    vmax.store(m);
    vs.store(s);
    vside_d.store(side_d);
    vside_w.store(side_w);
    ved.store(ed);
    for (int64_t l = 0; l < L; ++l) {
      p_mult[l] = w_mult[l] = acc_t(0);
      if (l >= n) continue;
      t[l] = 0;
      st[l] = TargetState::kValid;
      z_t[l] = acc_t(0);
      if constexpr (kMode != RowMode::kCrossEntropyProb) {
        t[l] = a.target[row0 + l];
        st[l] = math::classify_target(t[l], a.ignore_index, C);
        if (st[l] == TargetState::kValid)
          z_t[l] = o.apply(static_cast<acc_t>(x[base + t[l] * S + l]));
      }
      const auto st_row = math::row_lse(m[l], s[l]);
      s[l] = st_row.s;
      const acc_t log_s = st_row.log_s, lse = st_row.lse;
      if (lse_out) lse_out[row0 + l] = lse;
      if (entropy_out) entropy_out[row0 + l] = row_entropy(s[l], log_s, ed[l]);
      const auto row = finish_row<kMode>(o, row0 + l, st[l], t[l], m[l] - z_t[l], log_s, lse,
                                         side_d[l], side_w[l]);
      loss_rows[row0 + l] = row.loss;
      p_mult[l] = row.p_coef / s[l] * o.grad_mult;
      w_mult[l] = row.w_coef * o.grad_mult;
      t_mult[l] = row.t_coef * o.grad_mult;
    }
    if (!grad) continue;

    const V vp = V::loadu(p_mult), vw = V::loadu(w_mult);
    for (int64_t c = 0; c < C; ++c) {
      const V z = z_at(c);
      V g = softmax_exp(z - vmax) * vp;
      if constexpr (kMode == RowMode::kCrossEntropyClass) {
        g = g - vw * V(o.w_at(c));
      } else if constexpr (kMode == RowMode::kCrossEntropyProb) {
        g = g - tp_at(c) * V(o.w_at(c)) * vw;
      }
      if (o.has_cap) g = g * o.dz(z);
      scalar_t* gp = grad + base + c * S;
      if (n == L) store_acc(gp, g); else store_acc(gp, g, n);
    }
    if constexpr (kMode != RowMode::kCrossEntropyProb) {
      for (int64_t l = 0; l < n; ++l) {
        if (st[l] != TargetState::kValid) continue;
        acc_t g_t = std::exp(z_t[l] - m[l]) * p_mult[l] - o.w_at(t[l]) * w_mult[l] - t_mult[l];
        if (o.has_cap) g_t *= math::softcap_grad_from_output(z_t[l], o.inv_cap);
        grad[base + t[l] * S + l] = static_cast<scalar_t>(g_t);
      }
    }
  }
}

template <class scalar_t>
void softmax_rows(const RowArgs& a, int64_t begin, int64_t end) {
  using acc_t = acc_of<scalar_t>;
  const bool strided = a.S > 1;
#define FUSEDLOSS_ROWS(TGT, MODE)                                   \
  (strided ? rows_strided<scalar_t, TGT, MODE>(a, begin, end)       \
           : rows_contiguous<scalar_t, TGT, MODE>(a, begin, end))
  switch (a.mode) {
    case RowMode::kCrossEntropyClass:
      FUSEDLOSS_ROWS(scalar_t, RowMode::kCrossEntropyClass);
      break;
    case RowMode::kCrossEntropyProb:
      if (a.target_prob_is_acc)
        FUSEDLOSS_ROWS(acc_t, RowMode::kCrossEntropyProb);
      else
        FUSEDLOSS_ROWS(scalar_t, RowMode::kCrossEntropyProb);
      break;
    case RowMode::kFocal:
      FUSEDLOSS_ROWS(scalar_t, RowMode::kFocal);
      break;
  }
#undef FUSEDLOSS_ROWS
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace fusedloss

FUSEDLOSS_CPU_KERNEL(RowArgs, softmax_rows, float, double, c10::BFloat16, c10::Half)
#endif  // CPU_CAPABILITY
