// The options of a softmax row kernel in its accumulation type, and the end of a row:
// shared by the CPU and CUDA row kernels (built on the host for the CPU, in each thread on
// the GPU, from the same RowArgs). Names follow fusedloss/cross_entropy.py.
#pragma once

#include "common/kernel_args.h"
#include "common/loss_math.h"

namespace fusedloss {

template <class acc_t>
struct RowOptions {
  bool has_cap, transform;
  acc_t scale, cap, inv_cap;
  acc_t eps, keep, n_classes, eps_c;
  acc_t z_loss, gamma, weight_sum;
  acc_t grad_mult;  // logit_scale * loss_scale: dz/dx's constant part times the scale
  const acc_t* w;
  const acc_t* alpha;
  const acc_t* row_weight;

  // Reads the 0-dim loss_scale and weight_sum where they live (host or device memory):
  // the CPU builds this on the host, a CUDA kernel in each thread.
  FUSEDLOSS_HD explicit RowOptions(const RowArgs& a)
      : has_cap(a.softcap > 0),
        transform(a.softcap > 0 || a.logit_scale != 1.0),
        scale(acc_t(a.logit_scale)),
        cap(acc_t(a.softcap)),
        inv_cap(a.softcap > 0 ? acc_t(1.0 / a.softcap) : acc_t(0)),
        eps(acc_t(a.label_smoothing)),
        keep(acc_t(1.0 - a.label_smoothing)),
        n_classes(acc_t(a.C)),
        eps_c(acc_t(a.label_smoothing / double(a.C))),
        z_loss(acc_t(a.z_loss)),
        gamma(acc_t(a.gamma)),
        weight_sum(a.weight_sum ? *static_cast<const acc_t*>(a.weight_sum) : acc_t(a.C)),
        grad_mult(acc_t(a.logit_scale) * *static_cast<const acc_t*>(a.loss_scale)),
        w(static_cast<const acc_t*>(a.weight)),
        alpha(static_cast<const acc_t*>(a.alpha)),
        row_weight(static_cast<const acc_t*>(a.row_weight)) {}

  // z from x: logit_scale, then the softcap. V: acc_t, or a CPU vector of it.
  template <class V>
  FUSEDLOSS_HD V apply(V z) const {
    if (transform) {
      z = z * V(scale);
      if (has_cap) z = math::softcap_apply(z, cap, inv_cap);
    }
    return z;
  }
  // dz/dx from z, without the logit_scale (that one is in grad_mult).
  template <class V>
  FUSEDLOSS_HD V dz(V z) const {
    return has_cap ? math::softcap_grad_from_output(z, inv_cap) : V(acc_t(1));
  }
  FUSEDLOSS_HD acc_t w_at(int64_t c) const { return w ? w[c] : acc_t(1); }
};

// The loss and gradient coefficients of row r from its reduced statistics (see
// math::CrossEntropyRow): d_t = m - z_t, log s, lse, and the side sums
// sum_wd = sum_c w_c d_c (class-index target with smoothing) or sum_c w_c t'_c d_c
// (probability target), sum_w = sum_c w_c t'_c (probability target). The row weight, when
// given, multiplies the loss and the three coefficients.
template <RowMode kMode, class acc_t>
FUSEDLOSS_HD math::CrossEntropyRow<acc_t> finish_row(const RowOptions<acc_t>& o, int64_t r,
                                                    math::TargetState st, int64_t t,
                                                    acc_t d_t, acc_t log_s, acc_t lse,
                                                    acc_t sum_wd, acc_t sum_w) {
  math::CrossEntropyRow<acc_t> row;
  if constexpr (kMode == RowMode::kCrossEntropyProb) {
    row = math::cross_entropy_prob_row(sum_wd, sum_w, log_s, lse, o.z_loss);
  } else {
    const bool valid = st == math::TargetState::kValid;
    const acc_t w_t = valid ? o.w_at(t) : acc_t(1);
    const acc_t a_t = valid && o.alpha ? o.alpha[t] : acc_t(1);
    row = math::class_target_row(kMode == RowMode::kFocal, st, d_t, log_s, lse, w_t, a_t,
                                 o.eps, o.n_classes, o.weight_sum, sum_wd, o.z_loss, o.gamma);
  }
  if (o.row_weight && st == math::TargetState::kValid) {
    const acc_t rw = o.row_weight[r];
    row.loss *= rw;
    row.p_coef *= rw;
    row.w_coef *= rw;
    row.t_coef *= rw;
  }
  return row;
}

// The softmax entropy of a row from s and sum_c e_c d_c (e_c = exp(z_c - m), d_c = m - z_c):
// H = sum_c p_c (lse - z_c) = log s + sum_c e_c d_c / s, both terms >= 0.
template <class acc_t>
FUSEDLOSS_HD acc_t row_entropy(acc_t s, acc_t log_s, acc_t sum_ed) {
  return log_s + sum_ed / s;
}

}  // namespace fusedloss
