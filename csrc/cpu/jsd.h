// The vectorised CPU JSD / KL rows (the algebra and its names are fusedloss/jsd.py's).
//
// Grid: at::parallel_for over the N rows (common/jsd_ops.h launches it); one call owns a
// contiguous range of rows and two to four V-element scratch rows reused across them.
// One row = one token: the student's and the teacher's V logits. Per row, while both
// rows sit in L1/L2 after the first read:
//   1. the two maxima (reads both rows from DRAM);
//   2. e_c = exp((x_c - max) / T) for both, and their sums: the two log-sum-exps; e is
//      kept in scratch rows, so each exponential runs once;
//   3. the loss terms: KL mode (beta 0; beta 1 arrives with student and teacher swapped
//      by the host) D_c = log p_c - log q_c from the logits, no transcendental; mixture
//      mode D_c = log p_c - log m_c for both sides, one log per class, kept in scratch
//      rows for sweep 4;
//   4. the gradients, written once (only those asked for).
// Memory traffic per row: both rows read once from DRAM, each gradient written once.
//
// The host reads only the launch arguments; the kernel and its registration are compiled
// by the per-ISA units (CPU_CAPABILITY, see cpu/kernel_registry.h).
#pragma once

#include <cstdint>

#include "cpu/kernel_registry.h"

namespace fusedloss {

// (N, V) student and teacher logits, contiguous, one row per token. beta 0 is
// KL(teacher || student); the host passes beta 1 (reverse KL) as beta 0 with the two
// sides swapped; 0 < beta < 1 is the mixture.
struct JsdArgs {
  DType dtype;               // of both logits and both gradients
  const void* student;
  const void* teacher;
  void* grad_student;        // like student, or nullptr
  void* grad_teacher;        // like teacher, or nullptr
  const int64_t* target;     // (N,) or nullptr: rows equal to ignore_index are left out
  const void* row_weight;    // (N,) accumulation type, or nullptr: multiplies each row
  const void* loss_scale;    // 0-dim accumulation type: multiplies the gradients
  void* loss_rows;           // (N,) accumulation type, unscaled
  int64_t N, V, ignore_index;
  double beta, inv_temperature;
};

}  // namespace fusedloss

#ifdef CPU_CAPABILITY
#include <algorithm>
#include <limits>

#include "cpu/vec.h"

namespace fusedloss {
namespace cpu {
namespace CPU_CAPABILITY {

// Rows [r0, r1) of a JSD launch; scratch rows reused across them.
template <class scalar_t>
void jsd_rows(const JsdArgs& a, int64_t r0, int64_t r1) {
  using acc_t = acc_of<scalar_t>;
  using V = Vectorized<acc_t>;
  constexpr int64_t L = V::size();
  const int64_t C = a.V;
  const auto* xs_all = static_cast<const scalar_t*>(a.student);
  const auto* xt_all = static_cast<const scalar_t*>(a.teacher);
  auto* gs_all = static_cast<scalar_t*>(a.grad_student);
  auto* gt_all = static_cast<scalar_t*>(a.grad_teacher);
  const auto* row_weight = static_cast<const acc_t*>(a.row_weight);
  auto* loss_rows = static_cast<acc_t*>(a.loss_rows);
  const acc_t inv_t = acc_t(a.inv_temperature), beta = acc_t(a.beta);
  const acc_t scale = *static_cast<const acc_t*>(a.loss_scale);
  const bool mixture = a.beta > 0.0;  // beta 1 came as beta 0, the roles swapped
  const V vbeta(beta), v1m_beta(acc_t(1) - beta), vtiny(std::numeric_limits<acc_t>::min());
  const bool grads = gs_all != nullptr || gt_all != nullptr;
  // e rows of both sides; the mixture's D rows when their gradient is asked for.
  Scratch<acc_t> es(C), et(C);
  Scratch<acc_t> ds(mixture && gs_all ? C : 0), dt(mixture && gt_all ? C : 0);
  const acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  const V vzero(0), vinv_t(inv_t);

  auto tail = [](V v, int64_t n, acc_t fill) { return n == L ? v : V::set(V(fill), v, n); };
  auto load = [](const scalar_t* p, int64_t n) { return n == L ? load_acc(p) : load_acc(p, n); };
  auto store = [](scalar_t* p, V v, int64_t n) {
    if (n == L) store_acc(p, v); else store_acc(p, v, n);
  };
  auto store_acc_row = [](acc_t* p, V v, int64_t n) {
    if (n == L) v.store(p); else v.store(p, n);
  };
  auto load_acc_row = [](const acc_t* p, int64_t n) {
    return n == L ? V::loadu(p) : V::loadu(p, n);
  };

  for (int64_t r = r0; r < r1; ++r) {
    const scalar_t* xs = xs_all + r * C;
    const scalar_t* xt = xt_all + r * C;
    scalar_t* gs = gs_all ? gs_all + r * C : nullptr;
    scalar_t* gt = gt_all ? gt_all + r * C : nullptr;
    if (a.target != nullptr && a.target[r] == a.ignore_index) {  // left out: exact zeros
      loss_rows[r] = acc_t(0);
      if (gs) std::fill(gs, gs + C, scalar_t(0));
      if (gt) std::fill(gt, gt + C, scalar_t(0));
      continue;
    }
    // Sweep 1: the maxima of the logits (1/T > 0 keeps the argmax).
    V vms(ninf), vmt(ninf);
    for (int64_t c = 0; c < C; c += L) {
      const int64_t n = std::min(L, C - c);
      vms = at::vec::maximum(vms, tail(load(xs + c, n), n, ninf));
      vmt = at::vec::maximum(vmt, tail(load(xt + c, n), n, ninf));
    }
    const acc_t ms = hmax(vms) * inv_t, mt = hmax(vmt) * inv_t;
    if (!math::fl_isfinite(ms) || !math::fl_isfinite(mt)) {
      // A NaN or +inf logit, or only -inf ones: no softmax, so (as torch's log_softmax)
      // the row's loss and gradients are NaN.
      loss_rows[r] = math::fl_nan<acc_t>();
      if (gs) std::fill(gs, gs + C, static_cast<scalar_t>(math::fl_nan<acc_t>()));
      if (gt) std::fill(gt, gt + C, static_cast<scalar_t>(math::fl_nan<acc_t>()));
      continue;
    }
    // Sweep 2: e = exp(x / T - max / T) and the sums.
    const V vms_t(ms), vmt_t(mt);
    V vss(0), vst(0);
    for (int64_t c = 0; c < C; c += L) {
      const int64_t n = std::min(L, C - c);
      const V e_s = tail(softmax_exp(load(xs + c, n) * vinv_t - vms_t), n, 0);
      const V e_t = tail(softmax_exp(load(xt + c, n) * vinv_t - vmt_t), n, 0);
      store_acc_row(es.p + c, e_s, n);
      store_acc_row(et.p + c, e_t, n);
      vss = vss + e_s;
      vst = vst + e_t;
    }
    const math::RowLse<acc_t> ls = math::row_lse(ms, hsum(vss));
    const math::RowLse<acc_t> lt = math::row_lse(mt, hsum(vst));
    const V vlse_s(ls.lse), vlse_t(lt.lse), vinv_ss(acc_t(1) / ls.s), vinv_st(acc_t(1) / lt.s);
    // log p_c - log q_c of the KL mode (p the teacher, q the student), from the logits.
    auto kl_d = [&](int64_t c, int64_t n) {
      return (load(xt + c, n) * vinv_t - vlse_t) - (load(xs + c, n) * vinv_t - vlse_s);
    };
    // Sweep 3: the loss (and, for the mixture, each side's D and KL sum).
    V vk_s(0), vk_t(0);
    for (int64_t c = 0; c < C; c += L) {
      const int64_t n = std::min(L, C - c);
      const V p_t = load_acc_row(et.p + c, n) * vinv_st;
      if (!mixture) {
        vk_t = vk_t + math::fl_select(p_t > vzero, p_t * kl_d(c, n), vzero);
        continue;
      }
      const V p_s = load_acc_row(es.p + c, n) * vinv_ss;
      const V lp_s = load(xs + c, n) * vinv_t - vlse_s;
      const V lp_t = load(xt + c, n) * vinv_t - vlse_t;
      // log m = log(beta p_t + (1 - beta) p_s): one log from the probabilities at hand.
      // Where m underflows (p both < ~1e-38) it is clamped to the smallest normal value, so
      // a class whose p did not underflow adds ~p (lp - log tiny) ~ 0, never p * inf.
      const V lm = at::vec::maximum(p_t * vbeta + p_s * v1m_beta, vtiny).log();
      const V d_s = lp_s - lm, d_t = lp_t - lm;
      if (ds.p) store_acc_row(ds.p + c, d_s, n);
      if (dt.p) store_acc_row(dt.p + c, d_t, n);
      vk_s = vk_s + tail(math::fl_select(p_s > vzero, p_s * d_s, vzero), n, 0);
      vk_t = vk_t + tail(math::fl_select(p_t > vzero, p_t * d_t, vzero), n, 0);
    }
    const acc_t k_s = hsum(vk_s), k_t = hsum(vk_t);
    const acc_t loss = mixture ? beta * k_t + (acc_t(1) - beta) * k_s : k_t;
    const acc_t rw = row_weight ? row_weight[r] : acc_t(1);
    loss_rows[r] = loss * rw;
    if (!grads) continue;
    // Sweep 4: the gradients, d loss / d x = (d loss / d z) / T, times the row's weight
    // and the loss scale. Classes of probability 0 get exactly 0 on their own side.
    const acc_t coef = scale * rw * inv_t;
    const V vk_s_(k_s), vk_t_(k_t);
    const V vc_s(mixture ? coef * (acc_t(1) - beta) : coef);
    const V vc_t(mixture ? coef * beta : coef);
    for (int64_t c = 0; c < C; c += L) {
      const int64_t n = std::min(L, C - c);
      const V p_s = load_acc_row(es.p + c, n) * vinv_ss;
      const V p_t = load_acc_row(et.p + c, n) * vinv_st;
      if (mixture) {
        if (gs) {
          const V g = p_s * (load_acc_row(ds.p + c, n) - vk_s_);
          store(gs + c, math::fl_select(p_s > vzero, g, vzero) * vc_s, n);
        }
        if (gt) {
          const V g = p_t * (load_acc_row(dt.p + c, n) - vk_t_);
          store(gt + c, math::fl_select(p_t > vzero, g, vzero) * vc_t, n);
        }
      } else {
        if (gs) store(gs + c, (p_s - p_t) * vc_s, n);
        if (gt) {
          const V g = p_t * (kl_d(c, n) - vk_t_);
          store(gt + c, math::fl_select(p_t > vzero, g, vzero) * vc_t, n);
        }
      }
    }
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace fusedloss

FUSEDLOSS_CPU_KERNEL(JsdArgs, jsd_rows, float, double, c10::BFloat16, c10::Half)
#endif  // CPU_CAPABILITY
