// The vectorised CPU row kernels: softmax cross-entropy (class-index and probability
// targets), softmax focal loss, and the element-wise sigmoid focal loss.
//
// Included once by each rowwise_*.cpp, after it has chosen the instruction set (it
// defines CPU_CAPABILITY, which also names the at::vec namespace in use); everything
// below lives in fusedloss::cpu::CPU_CAPABILITY so the copies never collide.
//
// One row = one (b, s) position: C logits, a target, an optional weight per class.
// Per row, three sweeps over the same C values while they sit in L1/L2:
//   1. max_c z_c (z = the transformed logits, kept in a scratch row when they differ
//      from x, so the tanh of the softcap runs once per element);
//   2. e_c = exp(z_c - max), s = sum e_c, plus the side sums the loss needs (smoothing,
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
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "cpu/vec_math.h"  // before common/loss_math.h: the Vectorized overloads
#include "common/loss_math.h"
#include "cpu/kernels.h"

#ifndef CPU_CAPABILITY
#error "define CPU_CAPABILITY before including rowwise_impl.h"
#endif

namespace fusedloss {
namespace cpu {
namespace CPU_CAPABILITY {

using at::vec::Vectorized;
namespace fm = fusedloss::math;

using fm::acc_of;

template <class T>
constexpr bool is_reduced_v = std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, c10::Half>;

// A scratch array owned by one call of a kernel (one chunk of rows of one thread).
template <class T>
struct Scratch {
  T* p = nullptr;
  explicit Scratch(int64_t n) { if (n > 0) p = new T[n]; }
  ~Scratch() { delete[] p; }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
};

// ---------------------------------------------------------------- loads and stores
// Vectorized<acc>::size() elements of scalar_t as one accumulation-type vector; the
// `n`-element forms handle row tails (missing lanes read as 0 and are never stored).
template <class scalar_t>
inline Vectorized<acc_of<scalar_t>> load_acc(const scalar_t* p) {
  if constexpr (is_reduced_v<scalar_t>) {
    Vectorized<float> out;
    at::vec::load_to_float<scalar_t>(p, out);
    return out;
  } else {
    return Vectorized<scalar_t>::loadu(p);
  }
}

template <class scalar_t>
inline Vectorized<acc_of<scalar_t>> load_acc(const scalar_t* p, int64_t n) {
  using acc_t = acc_of<scalar_t>;
  if constexpr (is_reduced_v<scalar_t>) {
    __at_align__ acc_t buf[Vectorized<acc_t>::size()];
    for (int64_t i = 0; i < Vectorized<acc_t>::size(); ++i)
      buf[i] = i < n ? static_cast<acc_t>(p[i]) : acc_t(0);
    return Vectorized<acc_t>::loadu(buf);
  } else {
    return Vectorized<scalar_t>::loadu(p, n);
  }
}

template <class scalar_t>
inline void store_acc(scalar_t* p, Vectorized<acc_of<scalar_t>> v) {
  if constexpr (is_reduced_v<scalar_t>) {
    at::vec::convert_from_float<scalar_t>(v, v).store(p, Vectorized<float>::size());
  } else {
    v.store(p);
  }
}

template <class scalar_t>
inline void store_acc(scalar_t* p, Vectorized<acc_of<scalar_t>> v, int64_t n) {
  using acc_t = acc_of<scalar_t>;
  if constexpr (is_reduced_v<scalar_t>) {
    __at_align__ acc_t buf[Vectorized<acc_t>::size()];
    v.store(buf);
    for (int64_t i = 0; i < n; ++i) p[i] = static_cast<scalar_t>(buf[i]);
  } else {
    v.store(p, n);
  }
}

template <class T>
inline T hsum(Vectorized<T> v) {
  __at_align__ T b[Vectorized<T>::size()];
  v.store(b);
  T s = T(0);
  for (int64_t i = 0; i < Vectorized<T>::size(); ++i) s += b[i];
  return s;
}

template <class T>
inline T hmax(Vectorized<T> v) {
  __at_align__ T b[Vectorized<T>::size()];
  v.store(b);
  T m = b[0];
  for (int64_t i = 1; i < Vectorized<T>::size(); ++i)
    m = (b[i] > m || std::isnan(b[i])) ? b[i] : m;  // a NaN logit makes the row NaN
  return m;
}

// exp for the softmax sweeps: for float ATen's exp_u20, the polynomial its own softmax
// kernels use (a few ulp instead of Sleef's 1, and cheaper); the accurate exp for double.
template <class T>
inline Vectorized<T> softmax_exp(Vectorized<T> v) {
  if constexpr (std::is_same_v<T, float>) {
    return v.exp_u20();
  } else {
    return v.exp();
  }
}

// Options of a row kernel in the accumulation type.
template <class acc_t>
struct RowOptions {
  bool has_cap, transform;
  acc_t scale, cap, inv_cap;
  acc_t eps, keep, eps_c;
  acc_t z_loss, gamma, weight_sum, n_classes;
  acc_t grad_mult;  // logit_scale * loss_scale: dz/dx and the caller's loss scale
  const acc_t* w;
  const acc_t* alpha;

  explicit RowOptions(const RowLossArgs& a) {
    has_cap = a.softcap > 0;
    scale = acc_t(a.logit_scale);
    transform = has_cap || a.logit_scale != 1.0;
    cap = acc_t(a.softcap);
    inv_cap = has_cap ? acc_t(1.0 / a.softcap) : acc_t(0);
    eps = acc_t(a.label_smoothing);
    keep = acc_t(1) - eps;
    n_classes = acc_t(a.C);
    eps_c = eps / n_classes;
    z_loss = acc_t(a.z_loss);
    gamma = acc_t(a.gamma);
    weight_sum = acc_t(a.weight_sum);
    grad_mult = acc_t(a.logit_scale * a.loss_scale);
    w = static_cast<const acc_t*>(a.weight);
    alpha = static_cast<const acc_t*>(a.alpha);
  }

  template <class V>
  V apply(V z0) const {
    if (scale != acc_t(1)) z0 = z0 * V(scale);
    if (has_cap) z0 = fm::softcap_apply(z0, cap, inv_cap);
    return z0;
  }
  // dz/dx without the logit_scale (that one is in grad_mult).
  template <class V>
  V dz(V z) const {
    return has_cap ? fm::softcap_grad_from_output(z, inv_cap) : V(acc_t(1));
  }
  acc_t w_at(int64_t c) const { return w ? w[c] : acc_t(1); }
};

using fm::TargetState;

inline TargetState classify(int64_t t, int64_t ignore_index, int64_t C) {
  return fm::classify_target(t, ignore_index, C);
}

// The per-row coefficients: dloss/dz_c = p_c*p_coef - w_c*w_coef [- t_coef at the target].
template <class acc_t, RowMode kMode>
inline fm::CrossEntropyRow<acc_t> finish_row(const RowOptions<acc_t>& o, TargetState st,
                                             int64_t t, acc_t d_t, acc_t log_s, acc_t lse,
                                             acc_t side_d, acc_t side_w) {
  if constexpr (kMode == RowMode::kCrossEntropyProb) {
    return fm::cross_entropy_prob_row(side_d, side_w, log_s, lse, o.z_loss);
  } else {
    const bool valid = st == TargetState::kValid;
    const acc_t w_t = valid ? o.w_at(t) : acc_t(1);
    const acc_t a_t = valid && o.alpha ? o.alpha[t] : acc_t(1);
    return fm::class_target_row(kMode == RowMode::kFocal, st, d_t, log_s, lse, w_t, a_t, o.eps,
                                o.n_classes, o.weight_sum, side_d, o.z_loss, o.gamma);
  }
}

// ---------------------------------------------------------------- S == 1: one row per item
// Work: rows [r0, r1) of one thread (at::parallel_for hands out contiguous chunks).
// Sweeps per row: 1 reads x (DRAM), 2 reads x or the z scratch (cache) and writes e,
// 3 reads e (cache) and writes the gradient. Bytes: C * sizeof(x) read, C * sizeof(x)
// written (+ C * sizeof(target) twice for probability targets), 16 per row for
// target, loss and lse. Scratch: up to two C-element rows per call, reused across rows.
template <class scalar_t, class tgt_t, RowMode kMode>
void rows_contiguous(const RowLossArgs& a, int64_t r0, int64_t r1) {
  using acc_t = acc_of<scalar_t>;
  using V = Vectorized<acc_t>;
  constexpr int64_t L = V::size();
  const RowOptions<acc_t> o(a);
  const int64_t C = a.C;
  const scalar_t* x = static_cast<const scalar_t*>(a.x);
  scalar_t* grad = static_cast<scalar_t*>(a.grad);
  const tgt_t* tprob = static_cast<const tgt_t*>(a.target_prob);
  acc_t* loss_rows = static_cast<acc_t*>(a.loss_rows);
  acc_t* lse_out = static_cast<acc_t*>(a.lse);

  constexpr bool kSame = std::is_same_v<scalar_t, acc_t>;
  // z is read straight from x when the transform is the identity.
  const bool z_is_x = kSame && !o.transform;
  // e_c goes into the gradient row when that row can hold it exactly.
  const bool e_in_grad = kSame && grad != nullptr;
  Scratch<acc_t> zbuf(z_is_x ? 0 : C);
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
      st = classify(t, a.ignore_index, C);
    }

    // Sweep 1: the max (and z into the scratch row when it is not x itself).
    const acc_t* zr = z_is_x ? reinterpret_cast<const acc_t*>(xr) : zbuf.p;
    V vmax(ninf);
    int64_t c = 0;
    if (z_is_x) {
      for (; c + L <= C; c += L) vmax = at::vec::maximum(vmax, V::loadu(zr + c));
      if (c < C) vmax = at::vec::maximum(vmax, V::set(V(ninf), V::loadu(zr + c, C - c), C - c));
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
    const acc_t z_t = st == TargetState::kValid ? zr[t] : acc_t(0);

    // Sweep 2: e = exp(z - m), s = sum e, side sums of d = m - z.
    acc_t* er = e_in_grad ? reinterpret_cast<acc_t*>(gr) : ebuf.p;
    V vs(0), vside_d(0), vside_w(0);
    const V vm(m);
    auto sweep2 = [&](int64_t c, int64_t n) {
      V z = n == L ? V::loadu(zr + c) : V::loadu(zr + c, n);
      V d = vm - z;
      V e = softmax_exp(z - vm);
      if (n < L) {
        e = V::set(V(0), e, n);
        d = V::set(V(0), d, n);
      }
      vs = vs + e;
      if (er) {
        if (n == L) e.store(er + c); else e.store(er + c, n);
      }
      if constexpr (kMode == RowMode::kCrossEntropyClass) {
        if (smooth_sum) vside_d = vside_d + (o.w ? d * V::loadu(o.w + c, n) : d);
      } else if constexpr (kMode == RowMode::kCrossEntropyProb) {
        V tp = fm::smoothed_target(n == L ? load_acc(tr + c) : load_acc(tr + c, n), o.keep,
                                   o.eps_c);
        V wt = o.w ? tp * V::loadu(o.w + c, n) : tp;
        if (n < L) wt = V::set(V(0), wt, n);
        vside_d = vside_d + wt * d;
        vside_w = vside_w + wt;
      }
    };
    for (c = 0; c + L <= C; c += L) sweep2(c, L);
    if (c < C) sweep2(c, C - c);

    const auto st_row = fm::row_lse(m, hsum(vs));
    const acc_t s = st_row.s, log_s = st_row.log_s, lse = st_row.lse;
    if (lse_out) lse_out[r] = lse;
    const auto row = finish_row<acc_t, kMode>(o, st, t, m - z_t, log_s, lse, hsum(vside_d),
                                              hsum(vside_w));
    loss_rows[r] = row.loss;
    if (!gr) continue;

    // Sweep 3: the gradient.
    if (st != TargetState::kValid && kMode != RowMode::kCrossEntropyProb) {
      const scalar_t fill = st == TargetState::kIgnored ? scalar_t(0)
                                                        : scalar_t(fm::fl_nan<acc_t>());
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
        V tp = fm::smoothed_target(n == L ? load_acc(tr + c) : load_acc(tr + c, n), o.keep,
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
      if (o.has_cap) g_t *= fm::softcap_grad_from_output(z_t, o.inv_cap);
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
void rows_strided(const RowLossArgs& a, int64_t i0, int64_t i1) {
  using acc_t = acc_of<scalar_t>;
  using V = Vectorized<acc_t>;
  constexpr int64_t L = V::size();
  const RowOptions<acc_t> o(a);
  const int64_t C = a.C, S = a.S;
  const int64_t tiles_per_b = (S + L - 1) / L;
  const scalar_t* x = static_cast<const scalar_t*>(a.x);
  scalar_t* grad = static_cast<scalar_t*>(a.grad);
  const tgt_t* tprob = static_cast<const tgt_t*>(a.target_prob);
  acc_t* loss_rows = static_cast<acc_t*>(a.loss_rows);
  acc_t* lse_out = static_cast<acc_t*>(a.lse);
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
      return fm::smoothed_target(n == L ? load_acc(p) : load_acc(p, n), o.keep, o.eps_c);
    };

    V vmax(-std::numeric_limits<acc_t>::infinity());
    for (int64_t c = 0; c < C; ++c) vmax = at::vec::maximum(vmax, z_at(c));

    V vs(0), vside_d(0), vside_w(0);
    for (int64_t c = 0; c < C; ++c) {
      const V z = z_at(c);
      const V d = vmax - z;
      vs = vs + softmax_exp(z - vmax);
      if constexpr (kMode == RowMode::kCrossEntropyClass) {
        if (smooth_sum) vside_d = vside_d + d * V(o.w_at(c));
      } else if constexpr (kMode == RowMode::kCrossEntropyProb) {
        const V wt = tp_at(c) * V(o.w_at(c));
        vside_d = vside_d + wt * d;
        vside_w = vside_w + wt;
      }
    }

    __at_align__ acc_t m[L], s[L], side_d[L], side_w[L];
    __at_align__ acc_t p_mult[L], w_mult[L];
    acc_t t_mult[L], z_t[L];
    int64_t t[L];
    TargetState st[L];
    vmax.store(m);
    vs.store(s);
    vside_d.store(side_d);
    vside_w.store(side_w);
    for (int64_t l = 0; l < L; ++l) {
      p_mult[l] = w_mult[l] = acc_t(0);
      if (l >= n) continue;
      t[l] = 0;
      st[l] = TargetState::kValid;
      z_t[l] = acc_t(0);
      if constexpr (kMode != RowMode::kCrossEntropyProb) {
        t[l] = a.target[row0 + l];
        st[l] = classify(t[l], a.ignore_index, C);
        if (st[l] == TargetState::kValid)
          z_t[l] = o.apply(static_cast<acc_t>(x[base + t[l] * S + l]));
      }
      const auto st_row = fm::row_lse(m[l], s[l]);
      s[l] = st_row.s;
      const acc_t log_s = st_row.log_s, lse = st_row.lse;
      if (lse_out) lse_out[row0 + l] = lse;
      const auto row = finish_row<acc_t, kMode>(o, st[l], t[l], m[l] - z_t[l], log_s, lse,
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
        if (o.has_cap) g_t *= fm::softcap_grad_from_output(z_t[l], o.inv_cap);
        grad[base + t[l] * S + l] = static_cast<scalar_t>(g_t);
      }
    }
  }
}

template <class scalar_t>
void row_loss(const RowLossArgs& a, int64_t begin, int64_t end) {
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

// ---------------------------------------------------------------- sigmoid focal
// Work: chunks [k0, k1) of kSigmoidFocalChunk elements. One pass: x and the target read
// once, the gradient (and for reduction none the loss) written once; with a reduction
// one partial sum per chunk, so the total does not depend on the thread count.
template <class scalar_t, class tgt_t>
void sigmoid_focal_chunks(const SigmoidFocalArgs& a, int64_t k0, int64_t k1) {
  using acc_t = acc_of<scalar_t>;
  using V = Vectorized<acc_t>;
  constexpr int64_t L = V::size();
  const scalar_t* x = static_cast<const scalar_t*>(a.x);
  const tgt_t* tg = static_cast<const tgt_t*>(a.target);
  scalar_t* grad = static_cast<scalar_t*>(a.grad);
  scalar_t* loss = static_cast<scalar_t*>(a.loss);
  acc_t* partials = static_cast<acc_t*>(a.partials);
  const acc_t alpha = acc_t(a.alpha), gamma = acc_t(a.gamma);
  const V vscale(static_cast<acc_t>(a.loss_scale));
  for (int64_t k = k0; k < k1; ++k) {
    const int64_t begin = k * kSigmoidFocalChunk;
    const int64_t end = std::min(a.n, begin + kSigmoidFocalChunk);
    V vsum(0);
    for (int64_t i = begin; i < end; i += L) {
      const int64_t n = std::min(L, end - i);
      const V xv = n == L ? load_acc(x + i) : load_acc(x + i, n);
      const V tv = n == L ? load_acc(tg + i) : load_acc(tg + i, n);
      V l, d;
      fm::sigmoid_focal_terms(xv, tv, alpha, gamma, l, d);
      if (loss) {
        if (n == L) store_acc(loss + i, l); else store_acc(loss + i, l, n);
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

// ---------------------------------------------------------------- InfoNCE blocks
// The similarity block (nb x K, row-major) is produced by a GEMM in the op; these sweeps
// stream it row by row. Rows: lse / loss (two sweeps over the row, in L1/L2). Columns: a
// thread owns a range of columns and walks all rows of the block, keeping that range's
// running max / sum in a small array, so the block is still read row-major.
template <class T>
void info_nce_rows_fwd(const InfoNceBlockArgs& a, int64_t i0, int64_t i1) {
  using V = Vectorized<T>;
  constexpr int64_t L = V::size();
  const int64_t K = a.K;
  const T sc = static_cast<T>(a.scale);
  const V vsc(sc);
  const T ninf = -std::numeric_limits<T>::infinity();
  const T* dots = static_cast<const T*>(a.dots);
  T* row_lse = static_cast<T*>(a.row_lse);
  T* row_loss = static_cast<T*>(a.row_loss);
  T* diag = static_cast<T*>(a.diag);
  for (int64_t i = i0; i < i1; ++i) {
    const T* row = dots + i * K;
    const int64_t gi = a.row0 + i;
    V vmax(ninf);
    int64_t j = 0;
    for (; j + L <= K; j += L) vmax = at::vec::maximum(vmax, V::loadu(row + j) * vsc);
    if (j < K)
      vmax = at::vec::maximum(vmax, V::set(V(ninf), V::loadu(row + j, K - j) * vsc, K - j));
    const T m = hmax(vmax);
    const V vm(m);
    V vs(0);
    for (j = 0; j + L <= K; j += L) vs = vs + softmax_exp(V::loadu(row + j) * vsc - vm);
    if (j < K) vs = vs + V::set(V(0), softmax_exp(V::loadu(row + j, K - j) * vsc - vm), K - j);
    const T lse = fm::row_lse(m, hsum(vs)).lse;
    const int64_t pos = a.labels ? a.labels[gi] : gi;
    row_lse[gi] = lse;
    const bool defined = pos >= 0 && pos < K && fm::fl_isfinite(m);
    row_loss[gi] = defined ? lse - sc * row[pos] : fm::fl_nan<T>();
    if (a.symmetric && gi < a.M) diag[gi] = sc * row[gi];
  }
}

template <class T>
void info_nce_cols_fwd(const InfoNceBlockArgs& a, int64_t j0, int64_t j1) {
  using V = Vectorized<T>;
  constexpr int64_t L = V::size();
  const int64_t K = a.K, w = j1 - j0;
  const V vsc(static_cast<T>(a.scale));
  const T ninf = -std::numeric_limits<T>::infinity();
  const T* dots = static_cast<const T*>(a.dots);
  T* col_max = static_cast<T*>(a.col_max) + j0;
  T* col_sum = static_cast<T*>(a.col_sum) + j0;
  Scratch<T> bm(w), bs(w);
  std::fill(bm.p, bm.p + w, ninf);
  std::fill(bs.p, bs.p + w, T(0));
  for (int64_t i = 0; i < a.nb; ++i) {
    const T* row = dots + i * K + j0;
    for (int64_t j = 0; j < w; j += L) {
      const int64_t n = std::min(L, w - j);
      at::vec::maximum(V::loadu(bm.p + j, n), V::loadu(row + j, n) * vsc).store(bm.p + j, n);
    }
  }
  for (int64_t i = 0; i < a.nb; ++i) {
    const T* row = dots + i * K + j0;
    for (int64_t j = 0; j < w; j += L) {
      const int64_t n = std::min(L, w - j);
      const V e = softmax_exp(V::loadu(row + j, n) * vsc - V::loadu(bm.p + j, n));
      (V::loadu(bs.p + j, n) + e).store(bs.p + j, n);
    }
  }
  // Merge (max, sum) pairs; a side whose max equals the new max keeps factor 1, which
  // also keeps a column that is -inf so far at sum 0 instead of 0 * exp(NaN).
  for (int64_t j = 0; j < w; j += L) {
    const int64_t n = std::min(L, w - j);
    const V cm = V::loadu(col_max + j, n), cs = V::loadu(col_sum + j, n);
    const V m = V::loadu(bm.p + j, n), s = V::loadu(bs.p + j, n);
    const V nm = at::vec::maximum(cm, m);
    const V one(T(1));
    const V fc = V::blendv(softmax_exp(cm - nm), one, cm == nm);
    const V fb = V::blendv(softmax_exp(m - nm), one, m == nm);
    nm.store(col_max + j, n);
    (cs * fc + s * fb).store(col_sum + j, n);
  }
}

// Backward, rows [i0, i1) of the block: one sweep reads the similarities and writes
// scale * dlogits over them; the indicator terms are applied afterwards from the dots
// saved before the sweep. Per row also sum_j dlogits * dots, for grad_scale.
template <class T>
void info_nce_rows_bwd(const InfoNceBlockArgs& a, int64_t i0, int64_t i1) {
  using V = Vectorized<T>;
  constexpr int64_t L = V::size();
  const int64_t K = a.K, M = a.M;
  const T sc = static_cast<T>(a.scale);
  const V vsc(sc);
  T* dots = static_cast<T*>(a.dots);
  const T* grad_row = static_cast<const T*>(a.grad_row);
  const T* grad_col = static_cast<const T*>(a.grad_col);
  const T* row_lse = static_cast<const T*>(a.row_lse_in);
  const T* col_lse = static_cast<const T*>(a.col_lse_in);
  T* partial = static_cast<T*>(a.scale_partial);
  for (int64_t i = i0; i < i1; ++i) {
    T* row = dots + i * K;
    const int64_t gi = a.row0 + i;
    const int64_t pos = a.labels ? a.labels[gi] : gi;
    if (pos < 0 || pos >= K) {  // the loss of this row is NaN, and so is its gradient
      std::fill(row, row + K, fm::fl_nan<T>());
      partial[gi] = fm::fl_nan<T>();
      continue;
    }
    const T gr = grad_row[gi];
    const bool diag = a.symmetric && gi < M;
    // The indicator terms need the dots before the sweep overwrites them.
    const T d_pos = row[pos];
    const T d_diag = diag ? row[gi] : T(0);
    const V vgr(gr), vlse(row_lse[gi]);
    V vpart(0);
    for (int64_t j = 0; j < K; j += L) {
      const int64_t n = std::min(L, K - j);
      const V d = V::loadu(row + j, n);
      const V z = d * vsc;
      V dl = vgr * softmax_exp(z - vlse);
      if (a.symmetric && j < M) {
        const int64_t nc = std::min(n, M - j);
        const V pc = V::set(V(0), softmax_exp(z - V::loadu(col_lse + j, nc)), nc);
        dl = dl + V::loadu(grad_col + j, nc) * pc;
      }
      if (n < L) dl = V::set(V(0), dl, n);
      vpart = vpart + dl * d;
      (dl * vsc).store(row + j, n);
    }
    T part = hsum(vpart) - gr * d_pos;
    row[pos] -= gr * sc;
    if (diag) {
      part -= grad_col[gi] * d_diag;
      row[gi] -= grad_col[gi] * sc;
    }
    partial[gi] = part;
  }
}

inline KernelTable make_table(const char* isa) {
  KernelTable t{};
  t.isa = isa;
  t.row_loss[int(DType::kFloat)] = &row_loss<float>;
  t.row_loss[int(DType::kDouble)] = &row_loss<double>;
  t.row_loss[int(DType::kBFloat16)] = &row_loss<c10::BFloat16>;
  t.row_loss[int(DType::kHalf)] = &row_loss<c10::Half>;
  t.sigmoid_focal[int(DType::kFloat)] = &sigmoid_focal<float>;
  t.sigmoid_focal[int(DType::kDouble)] = &sigmoid_focal<double>;
  t.sigmoid_focal[int(DType::kBFloat16)] = &sigmoid_focal<c10::BFloat16>;
  t.sigmoid_focal[int(DType::kHalf)] = &sigmoid_focal<c10::Half>;
  t.lanes[int(DType::kFloat)] = Vectorized<float>::size();
  t.lanes[int(DType::kDouble)] = Vectorized<double>::size();
  t.lanes[int(DType::kBFloat16)] = Vectorized<float>::size();
  t.lanes[int(DType::kHalf)] = Vectorized<float>::size();
  t.info_nce_rows_fwd[0] = &info_nce_rows_fwd<float>;
  t.info_nce_rows_fwd[1] = &info_nce_rows_fwd<double>;
  t.info_nce_cols_fwd[0] = &info_nce_cols_fwd<float>;
  t.info_nce_cols_fwd[1] = &info_nce_cols_fwd<double>;
  t.info_nce_rows_bwd[0] = &info_nce_rows_bwd<float>;
  t.info_nce_rows_bwd[1] = &info_nce_rows_bwd<double>;
  return t;
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace fusedloss
