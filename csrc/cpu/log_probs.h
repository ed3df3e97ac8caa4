// The vectorised CPU token log-probs rows: the forward (log_probs, entropy and the extras
// of each row) and the backward (d / d x for per-row upstream gradients of log_probs and
// entropy). The algebra and its names (z, m, s, d, q, g, h) are fusedloss/log_probs.py's.
//
// Grid: at::parallel_for over the N rows (common/log_probs_ops.h launches it); one call
// owns a contiguous range of rows. A row whose target is ignore_index is not read: its
// outputs (or gradient) are written as 0.
//   forward:  sweep 1, the max of z (and the sum of z); sweep 2, e = exp(z - m) and the
//             sums s, d = sum e (m - z), q = sum e^2 (the row is in L1/L2 by then); the
//             first index of the max, when asked, a compare sweep. Bytes: the row read
//             once from DRAM, up to 6 values written.
//   backward: one sweep: p from the saved lse, the gradient written (over x itself for
//             log_probs_grad_inplace: each element is read before it is written).
//
// The host reads only the launch arguments; the kernels and their registration are
// compiled by the per-ISA units (CPU_CAPABILITY, see cpu/kernel_registry.h).
#pragma once

#include <cstdint>

#include "cpu/kernel_registry.h"

namespace fusedloss {

// (N, V) logits, contiguous, one row per token.
struct LogProbsArgs {
  DType dtype;                       // of x and grad
  const void* x;
  void* grad;                        // backward: like x, may alias it
  const int64_t* target;             // (N,)
  const void* row_inv_temperature;   // (N,) accumulation type, or nullptr: inv_temperature
  double inv_temperature, logit_scale, softcap;  // softcap 0: none
  int64_t N, V, ignore_index;
  // forward outputs, (N,) accumulation type (is_top1: bool), nullptr where not asked
  void* log_probs;
  void* entropy;
  void* lse;
  void* log_sum_sq;
  void* mean;
  bool* is_top1;
  // backward inputs, (N,) accumulation type, nullptr where absent
  const void* lse_in;
  const void* entropy_in;
  const void* grad_log_probs;
  const void* grad_entropy;
  const void* grad_lse;              // k: dz_c += k p_c (the vocab-parallel losses)
  const void* grad_mean;             // u: dz_c += u / V
};

// The two kernels over LogProbsArgs (cpu/kernel_registry.h's tags).
struct LogProbsForward { using Args = LogProbsArgs; };
struct LogProbsBackward { using Args = LogProbsArgs; };

}  // namespace fusedloss

#ifdef CPU_CAPABILITY
#include <algorithm>
#include <limits>

#include "cpu/vec.h"

namespace fusedloss {
namespace cpu {
namespace CPU_CAPABILITY {

// The two kernels over the rows of one launch, and what they share: z = a * softcap(
// logit_scale * x) of a row, vector by vector.
template <class scalar_t>
struct LogProbsRow {
  using acc_t = acc_of<scalar_t>;
  using V = Vectorized<acc_t>;
  static constexpr int64_t L = V::size();
  const LogProbsArgs& a;
  const acc_t ls, cap, inv_cap;
  const bool capped;
  const int64_t C;
  const scalar_t* const x_all;

  explicit LogProbsRow(const LogProbsArgs& args)
      : a(args), ls(acc_t(args.logit_scale)), cap(acc_t(args.softcap)),
        inv_cap(args.softcap > 0 ? acc_t(1.0 / args.softcap) : acc_t(0)),
        capped(args.softcap > 0), C(args.V), x_all(static_cast<const scalar_t*>(args.x)) {}

  acc_t inv_t(int64_t r) const {
    return a.row_inv_temperature ? static_cast<const acc_t*>(a.row_inv_temperature)[r]
                                 : acc_t(a.inv_temperature);
  }
  // y = softcap(logit_scale x), in lanes [0, n) (the others: -inf after the transform).
  V y(const scalar_t* p, int64_t n) const {
    V u = (n == L ? load_acc(p) : load_acc(p, n)) * V(ls);
    if (capped) u = (u * V(inv_cap)).tanh() * V(cap);
    return n == L ? u : V::set(V(-std::numeric_limits<acc_t>::infinity()), u, n);
  }
  acc_t y_scalar(scalar_t x) const {
    acc_t u = acc_t(x) * ls;
    return capped ? math::fl_tanh(u * inv_cap) * cap : u;
  }
  // dz/dx / a: logit_scale (1 - (y / softcap)^2)
  V dy(V yv) const {
    if (!capped) return V(ls);
    const V t = yv * V(inv_cap);
    return (V(acc_t(1)) - t * t) * V(ls);
  }
  void forward(int64_t r0, int64_t r1) const;
  void backward(int64_t r0, int64_t r1) const;
};

template <class scalar_t>
void LogProbsRow<scalar_t>::forward(int64_t r0, int64_t r1) const {
  const LogProbsRow& row = *this;
  auto out = [&](void* p, int64_t r, acc_t v) { if (p) static_cast<acc_t*>(p)[r] = v; };
  const acc_t ninf = -std::numeric_limits<acc_t>::infinity(), nan = math::fl_nan<acc_t>();

  for (int64_t r = r0; r < r1; ++r) {
    const int64_t t = a.target[r];
    const bool ignored = t == a.ignore_index, valid = t >= 0 && t < C;
    const acc_t inv_t = row.inv_t(r);
    if (ignored || !valid || !(inv_t > acc_t(0))) {  // 0 where ignored, else NaN
      const acc_t v = ignored ? acc_t(0) : nan;
      for (void* p : {a.log_probs, a.entropy, a.lse, a.log_sum_sq, a.mean}) out(p, r, v);
      if (a.is_top1) a.is_top1[r] = false;
      continue;
    }
    const scalar_t* x = x_all + r * C;
    const V vinv_t(inv_t);
    // Sweep 1: the max of z (a > 0 keeps it at the max of y), and the sum of z.
    V vm(ninf), vsum(0);
    for (int64_t c = 0; c < C; c += L) {
      const int64_t n = std::min(L, C - c);
      const V z = row.y(x + c, n) * vinv_t;
      vm = at::vec::maximum(vm, z);
      if (a.mean) vsum = vsum + (n == L ? z : V::set(V(0), z, n));
    }
    const acc_t m = hmax(vm);
    const acc_t z_t = row.y_scalar(x[t]) * inv_t;
    if (!math::fl_isfinite(m)) {  // a NaN or +inf logit, or only -inf ones: NaN, as torch
      for (void* p : {a.log_probs, a.entropy, a.lse, a.log_sum_sq}) out(p, r, nan);
      out(a.mean, r, hsum(vsum) / acc_t(C));
      if (a.is_top1) a.is_top1[r] = false;
      continue;
    }
    // Sweep 2: e = exp(z - m) and the sums s, d (entropy) and q (log sum p^2).
    const V vmax(m);
    V vs(0), vd(0), vq(0);
    for (int64_t c = 0; c < C; c += L) {
      const int64_t n = std::min(L, C - c);
      const V z = row.y(x + c, n) * vinv_t;
      const V e = softmax_exp(z - vmax);  // -inf lanes: 0
      vs = vs + e;
      if (a.entropy) vd = vd + math::fl_select(e > V(0), e * (vmax - z), V(0));
      if (a.log_sum_sq) vq = vq + e * e;
    }
    const math::RowLse<acc_t> l = math::row_lse(m, hsum(vs));
    out(a.log_probs, r, z_t - l.lse);
    out(a.lse, r, l.lse);
    out(a.entropy, r, l.log_s + hsum(vd) / l.s);
    out(a.log_sum_sq, r, math::fl_log(hsum(vq)) - acc_t(2) * l.log_s);
    out(a.mean, r, hsum(vsum) / acc_t(C));
    if (a.is_top1) {
      // The first index where z equals the max, as the sweeps computed z.
      int64_t first = C;
      for (int64_t c = 0; c < C && first == C; c += L) {
        const int64_t n = std::min(L, C - c);
        __at_align__ acc_t z[L];
        (row.y(x + c, n) * vinv_t).store(z);
        for (int64_t i = 0; i < n; ++i)
          if (z[i] == m) { first = c + i; break; }
      }
      a.is_top1[r] = first == t;
    }
  }
}

template <class scalar_t>
void LogProbsRow<scalar_t>::backward(int64_t r0, int64_t r1) const {
  const LogProbsRow& row = *this;
  auto* g_all = static_cast<scalar_t*>(a.grad);
  const auto* lse_all = static_cast<const acc_t*>(a.lse_in);
  const auto* ent_all = static_cast<const acc_t*>(a.entropy_in);
  const auto* g_lp = static_cast<const acc_t*>(a.grad_log_probs);
  const auto* g_ent = static_cast<const acc_t*>(a.grad_entropy);
  const auto* g_lse = static_cast<const acc_t*>(a.grad_lse);
  const auto* g_mean = static_cast<const acc_t*>(a.grad_mean);

  for (int64_t r = r0; r < r1; ++r) {
    const int64_t t = a.target[r];
    scalar_t* gx = g_all + r * C;
    if (t == a.ignore_index) {  // not read: exact zeros
      std::fill(gx, gx + C, scalar_t(0));
      continue;
    }
    const scalar_t* x = x_all + r * C;
    const bool valid = t >= 0 && t < C;
    const acc_t inv_t = row.inv_t(r), lse = lse_all[r];
    const acc_t g = g_lp ? g_lp[r] : acc_t(0), h = g_ent ? g_ent[r] : acc_t(0);
    const acc_t ent = g_ent ? ent_all[r] : acc_t(0);
    const acc_t k = g_lse ? g_lse[r] : acc_t(0), u = g_mean ? g_mean[r] / acc_t(C) : acc_t(0);
    const acc_t bad = valid ? acc_t(1) : math::fl_nan<acc_t>();  // NaN, as the outputs
    // The target's logit, read before the sweep may overwrite x (in place).
    const scalar_t x_t = x[valid ? t : 0];
    const V vkg(k - g), vu(u), vh(h), vlse(lse), vlse_h(lse - ent), vinv_t(inv_t),
        vscale(inv_t * bad);
    for (int64_t c = 0; c < C; c += L) {
      const int64_t n = std::min(L, C - c);
      const V yv = row.y(x + c, n);
      const V z = yv * vinv_t;
      const V p = softmax_exp(z - vlse);
      // dz = (k - g) p + u - h p (z - lse + H), without the target's [c == t] g (added
      // below)
      V dz = vkg * p + vu;
      if (g_ent) dz = dz - vh * math::fl_select(p > V(0), p * (z - vlse_h), V(0));
      const V dx = dz * row.dy(yv) * vscale;
      if (n == L) store_acc(gx + c, dx); else store_acc(gx + c, dx, n);
    }
    if (valid) {  // the target's element again, whole, in acc: one rounding
      const acc_t y_t = row.y_scalar(x_t), z_t = y_t * inv_t;
      const acc_t p_t = math::fl_exp(z_t - lse);
      acc_t dz_t = g * (acc_t(1) - p_t) + k * p_t + u;
      if (g_ent && p_t > acc_t(0)) dz_t -= h * p_t * (z_t - lse + ent);
      const acc_t q = y_t * row.inv_cap;
      const acc_t dy_t = row.capped ? row.ls * (acc_t(1) - q * q) : row.ls;
      gx[t] = static_cast<scalar_t>(dz_t * dy_t * inv_t);
    }
  }
}

// The registered kernels: rows [r0, r1) of a launch.
template <class scalar_t>
void log_probs_forward(const LogProbsArgs& a, int64_t r0, int64_t r1) {
  LogProbsRow<scalar_t>(a).forward(r0, r1);
}

template <class scalar_t>
void log_probs_backward(const LogProbsArgs& a, int64_t r0, int64_t r1) {
  LogProbsRow<scalar_t>(a).backward(r0, r1);
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace fusedloss

FUSEDLOSS_CPU_KERNEL(LogProbsForward, log_probs_forward, float, double, c10::BFloat16,
                     c10::Half)
FUSEDLOSS_CPU_KERNEL(LogProbsBackward, log_probs_backward, float, double, c10::BFloat16,
                     c10::Half)
#endif  // CPU_CAPABILITY
