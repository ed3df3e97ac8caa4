// Loss math shared by the CPU and CUDA kernels: written once, compiled for both.
//
// Every function here is a template over the value type T. The CUDA kernels and the
// scalar parts of the CPU kernels instantiate it with float or double; the CPU vector
// loops instantiate the element-wise ones (softcap, sigmoid focal) with
// at::vec::Vectorized<float/double>. The primitives (fl_exp, fl_select, ...) are
// overloaded for float and double below; csrc/cpu/vec.h declares the Vectorized
// overloads and must therefore be included before this header in a CPU vector TU
// (unqualified calls in a template see the overloads declared before its definition).
//
// The algebra, and the names used for its quantities here, in the Triton kernels and in
// the CUDA and CPU kernels alike, is written once with each op: fusedloss/cross_entropy.py,
// focal.py, sigmoid_focal.py, info_nce.py. The comments here only record the numerical
// choices.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FUSEDLOSS_HD __host__ __device__ __forceinline__
#else
#define FUSEDLOSS_HD inline
#endif

namespace fusedloss {
namespace math {

// The accumulation type of an element type: double for double, float for the rest.
template <class T>
struct AccOf { using type = float; };
template <>
struct AccOf<double> { using type = double; };
template <class T>
using acc_of = typename AccOf<T>::type;

// ---------------------------------------------------------------- scalar primitives
FUSEDLOSS_HD float fl_exp(float x) { return ::expf(x); }
FUSEDLOSS_HD double fl_exp(double x) { return ::exp(x); }
FUSEDLOSS_HD float fl_log(float x) { return ::logf(x); }
FUSEDLOSS_HD double fl_log(double x) { return ::log(x); }
FUSEDLOSS_HD float fl_log1p(float x) { return ::log1pf(x); }
FUSEDLOSS_HD double fl_log1p(double x) { return ::log1p(x); }
FUSEDLOSS_HD float fl_expm1(float x) { return ::expm1f(x); }
FUSEDLOSS_HD double fl_expm1(double x) { return ::expm1(x); }
FUSEDLOSS_HD float fl_tanh(float x) { return ::tanhf(x); }
FUSEDLOSS_HD double fl_tanh(double x) { return ::tanh(x); }
FUSEDLOSS_HD float fl_abs(float x) { return ::fabsf(x); }
FUSEDLOSS_HD double fl_abs(double x) { return ::fabs(x); }
FUSEDLOSS_HD float fl_pow(float x, float y) { return ::powf(x, y); }
FUSEDLOSS_HD double fl_pow(double x, double y) { return ::pow(x, y); }
FUSEDLOSS_HD float fl_select(bool c, float a, float b) { return c ? a : b; }
FUSEDLOSS_HD double fl_select(bool c, double a, double b) { return c ? a : b; }
// max(x, 0) that keeps a NaN x a NaN (fmaxf would return 0).
FUSEDLOSS_HD float fl_relu(float x) { return x < 0.f ? 0.f : x; }
FUSEDLOSS_HD double fl_relu(double x) { return x < 0.0 ? 0.0 : x; }

template <class T>
FUSEDLOSS_HD T fl_nan() {
  return T(NAN);
}

template <class T>
FUSEDLOSS_HD bool fl_isfinite(T x) {
#if defined(__CUDA_ARCH__)
  return isfinite(x);
#else
  return std::isfinite(x);
#endif
}

// ---------------------------------------------------------------- row log-sum-exp
// From a row's max m and s = sum_c exp(z_c - m): s, log s and lse = m + log s. A row
// whose max is not finite (a NaN, a +inf, or only -inf logits) has no softmax: as in
// torch's log_softmax its loss and gradient are NaN (s and log s are NaN here, whatever
// the fast vector exp made of inf - inf), while lse keeps m like torch.logsumexp.
template <class T>
struct RowLse {
  T s, log_s, lse;
};

template <class T>
FUSEDLOSS_HD RowLse<T> row_lse(T m, T s) {
  RowLse<T> r;
  if (fl_isfinite(m)) {
    r.s = s;
    r.log_s = fl_log(s);
    r.lse = m + r.log_s;
  } else {
    r.s = r.log_s = fl_nan<T>();
    r.lse = m;
  }
  return r;
}

// ---------------------------------------------------------------- logit transform
// z = softcap * tanh(z0 / softcap); `inv_cap` = 1 / softcap is passed in so that the
// per-element work is a multiply, not a divide.
template <class T, class S>
FUSEDLOSS_HD T softcap_apply(T z0, S cap, S inv_cap) {
  return T(cap) * fl_tanh(z0 * T(inv_cap));
}

// dz/dz0 of the softcap, from its output z: 1 - tanh^2 = 1 - (z / cap)^2. Recovering it
// from z saves a second tanh in the gradient sweep.
template <class T, class S>
FUSEDLOSS_HD T softcap_grad_from_output(T z, S inv_cap) {
  T u = z * T(inv_cap);
  return T(S(1)) - u * u;
}

// ---------------------------------------------------------------- focal power
// base^gamma for base in [0, 1] with the common exponents special-cased: gamma = 2 is the
// default of every focal loss and pow() costs ~20x a multiply. 0^0 = 1 (the loss is then
// plain cross-entropy), matching the reference's safe_pow.
template <class T, class S>
FUSEDLOSS_HD T focal_pow(T base, S gamma) {
  if (gamma == S(0)) return T(S(1));
  if (gamma == S(1)) return base;
  if (gamma == S(2)) return base * base;
  return fl_pow(base, T(gamma));
}

// ---------------------------------------------------------------- cross-entropy rows
// The row statistics come from a max-shifted sweep: m = max_c z_c, d_c = m - z_c >= 0,
// s = sum_c exp(-d_c), so lse = m + log s and lse - z_c = d_c + log s without the
// cancellation of (m + log s) - z_c when |m| is large. The gradient is
// dloss/dz_c = p_c * p_coef - w_c * w_coef - [c == t] * t_coef (fusedloss/cross_entropy.py).
template <class T>
struct CrossEntropyRow {
  T loss;
  T p_coef;  // multiplies p_c = exp(-d_c) / s
  T w_coef;  // multiplies w_c (1 without weights)
  T t_coef;  // subtracted at the target class only
};

template <class T>
FUSEDLOSS_HD CrossEntropyRow<T> cross_entropy_class_row(T d_t, T log_s, T lse, T w_t,
                                                        T eps, T n_classes, T weight_sum,
                                                        T sum_wd, T z_loss) {
  CrossEntropyRow<T> r;
  const T keep = T(1) - eps;
  r.loss = keep * w_t * (d_t + log_s);
  r.p_coef = keep * w_t;
  r.w_coef = T(0);
  if (eps > T(0)) {
    // Skipped entirely without smoothing so that a -inf logit (d = inf) elsewhere in the
    // row cannot turn the loss into 0 * inf = NaN.
    const T eps_c = eps / n_classes;
    r.loss += eps_c * (sum_wd + weight_sum * log_s);
    r.p_coef += eps_c * weight_sum;
    r.w_coef = eps_c;
  }
  if (z_loss != T(0)) {
    r.loss += z_loss * w_t * lse * lse;
    r.p_coef += T(2) * z_loss * w_t * lse;
  }
  r.t_coef = keep * w_t;
  return r;
}

// Probability target: w_coef multiplies w_c t'_c, and t_coef is 0.
template <class T>
FUSEDLOSS_HD CrossEntropyRow<T> cross_entropy_prob_row(T sum_wtd, T sum_wt, T log_s, T lse,
                                                       T z_loss) {
  CrossEntropyRow<T> r;
  r.loss = sum_wtd + sum_wt * log_s + z_loss * lse * lse;
  r.p_coef = sum_wt + T(2) * z_loss * lse;
  r.w_coef = T(1);  // multiplies w_c t'_c
  r.t_coef = T(0);
  return r;
}

// Smoothed probability target of one class.
template <class T, class S>
FUSEDLOSS_HD T smoothed_target(T t, S keep, S eps_c) {
  return t * T(keep) + T(eps_c);
}

// ---------------------------------------------------------------- softmax focal rows
// q = 1 - p_t = -expm1(logp_t) (accurate as p_t -> 1), and logp_t / q -> -1 as q -> 0,
// so the gradient coefficient stays finite for every gamma >= 0 (fusedloss/focal.py).
template <class T>
struct FocalRow {
  T loss;
  T coef;  // dloss/dz_c = coef * (p_c - [c == t])
};

template <class T>
FUSEDLOSS_HD FocalRow<T> focal_row(T logp_t, T gamma, T wa) {
  FocalRow<T> r;
  const T p_t = fl_exp(logp_t);
  T q = -fl_expm1(logp_t);
  q = q > T(0) ? q : T(0);
  const T qg = focal_pow(q, gamma);
  const T ratio = q > T(0) ? logp_t / q : T(-1);
  r.loss = -wa * qg * logp_t;
  r.coef = wa * qg * (T(1) - gamma * p_t * ratio);
  return r;
}

// ---------------------------------------------------------------- class-index rows
enum class TargetState : int { kValid = 0, kIgnored = 1, kBad = 2 };

FUSEDLOSS_HD TargetState classify_target(int64_t t, int64_t ignore_index, int64_t n_classes) {
  if (t == ignore_index) return TargetState::kIgnored;
  // Out of range: never used as an index; the row's loss and gradient become NaN.
  if (t < 0 || t >= n_classes) return TargetState::kBad;
  return TargetState::kValid;
}

// The coefficients of a class-index row for cross-entropy or (focal) the softmax focal
// loss, in the CrossEntropyRow form dloss/dz_c = p_c p_coef - w_c w_coef - [c==t] t_coef.
// Ignored rows are all zeros, rows with a bad target all NaN. w_t = weight[t] (1 without
// weights), a_t = alpha[t] (focal only, 1 without alpha).
template <class T>
FUSEDLOSS_HD CrossEntropyRow<T> class_target_row(bool focal, TargetState st, T d_t, T log_s,
                                                 T lse, T w_t, T a_t, T eps, T n_classes,
                                                 T weight_sum, T sum_wd, T z_loss, T gamma) {
  if (st == TargetState::kIgnored) return {T(0), T(0), T(0), T(0)};
  if (st == TargetState::kBad) {
    const T nan = fl_nan<T>();
    return {nan, nan, nan, nan};
  }
  if (!focal) {
    return cross_entropy_class_row(d_t, log_s, lse, w_t, eps, n_classes, weight_sum, sum_wd,
                                   z_loss);
  }
  const FocalRow<T> f = focal_row(-(d_t + log_s), gamma, w_t * a_t);
  return {f.loss, f.coef, T(0), f.coef};
}

// ---------------------------------------------------------------- sigmoid focal
// Element-wise (fusedloss/sigmoid_focal.py). p and 1-p both come from e = exp(-|x|) so
// neither rounds to 0 or 1 for large |x|. T is float/double or a Vectorized of them
// (comparisons then yield lane masks).
template <class T, class S>
FUSEDLOSS_HD void sigmoid_focal_terms(T x, T t, S alpha, S gamma, T& loss, T& dloss_dx) {
  const T zero(S(0)), one(S(1));
  const T e = fl_exp(zero - fl_abs(x));
  const T inv = one / (one + e);
  const auto nonneg = x >= zero;
  const T p = fl_select(nonneg, inv, e * inv);
  const T p_bar = fl_select(nonneg, e * inv, inv);  // 1 - p
  const T ce = fl_relu(x) - x * t + fl_log1p(e);
  const T m = p * (one - t) + p_bar * t;
  const T mg = focal_pow(m, gamma);
  T a_t = one;
  if (alpha >= S(0)) a_t = T(alpha) * t + T(S(1) - alpha) * (one - t);
  loss = a_t * ce * mg;
  T dx = p - t;
  if (gamma != S(0)) {
    const T r = fl_select(m == zero, zero, p * p_bar * (one - T(S(2)) * t) / m);
    dx = dx + T(gamma) * ce * r;
  }
  dloss_dx = a_t * mg * dx;
}

// ---------------------------------------------------------------- SigLIP pairs
// softplus(u) = log(1 + exp(u)) and sigmoid(u) for u = -z l (fusedloss/siglip.py), both
// from e = exp(-|u|): neither overflows, and softplus keeps log1p's accuracy. S is the
// scalar type of T (T itself, or the element type of a Vectorized).
template <class S, class T>
FUSEDLOSS_HD void softplus_sigmoid(T u, T& softplus, T& sigmoid) {
  const T zero(S(0)), one(S(1));
  const T e = fl_exp(zero - fl_abs(u));
  const T inv = one / (one + e);
  sigmoid = fl_select(u >= zero, inv, e * inv);
  softplus = fl_relu(u) + fl_log1p(e);
}

}  // namespace math
}  // namespace fusedloss
