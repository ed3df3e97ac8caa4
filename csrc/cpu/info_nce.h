// The vectorised CPU sweeps over one block of InfoNCE similarities (the block comes from a
// GEMM in common/info_nce_ops.h; the algebra is in fusedloss/info_nce.py). Rows: lse /
// loss, two sweeps over the row while it is in L1/L2. Columns: a thread owns a range of
// columns and walks all rows of the block, keeping that range's running max / sum in a
// small array, so the block is still read row-major.
//
// Grid: at::parallel_for over the block's rows (rows_fwd, rows_bwd) or over the M key
// columns (cols_fwd), launched by Device<kCPU> (cpu/device.cpp); the launch arguments
// (InfoNceBlockArgs) are shared with the CUDA kernels: common/kernel_args.h.
#pragma once

#include "cpu/kernel_registry.h"

namespace fusedloss {
namespace cpu {

// The three kernels read one InfoNceBlockArgs, so each is registered under a key of its own.
struct InfoNceRowsFwd { using Args = InfoNceBlockArgs; };
struct InfoNceColsFwd { using Args = InfoNceBlockArgs; };
struct InfoNceRowsBwd { using Args = InfoNceBlockArgs; };

}  // namespace cpu
}  // namespace fusedloss

#ifdef CPU_CAPABILITY
#include <algorithm>
#include <limits>

#include "cpu/vec.h"

namespace fusedloss {
namespace cpu {
namespace CPU_CAPABILITY {

template <class T>
void info_nce_rows_fwd(const InfoNceBlockArgs& a, int64_t i0, int64_t i1) {
  using V = Vectorized<T>;
  constexpr int64_t L = V::size();
  const int64_t K = a.K;
  const T sc = *static_cast<const T*>(a.scale);
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
    const T lse = math::row_lse(m, hsum(vs)).lse;
    const int64_t pos = a.labels ? a.labels[gi] : gi;
    row_lse[gi] = lse;
    const bool defined = pos >= 0 && pos < K && math::fl_isfinite(m);
    row_loss[gi] = defined ? lse - sc * row[pos] : math::fl_nan<T>();
    if (a.symmetric && gi < a.M) diag[gi] = sc * row[gi];
  }
}

template <class T>
void info_nce_cols_fwd(const InfoNceBlockArgs& a, int64_t j0, int64_t j1) {
  using V = Vectorized<T>;
  constexpr int64_t L = V::size();
  const int64_t K = a.K, w = j1 - j0;
  const V vsc(*static_cast<const T*>(a.scale));
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
  const T sc = *static_cast<const T*>(a.scale);
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
      std::fill(row, row + K, math::fl_nan<T>());
      partial[gi] = math::fl_nan<T>();
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

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace fusedloss

FUSEDLOSS_CPU_KERNEL(InfoNceRowsFwd, info_nce_rows_fwd, float, double)
FUSEDLOSS_CPU_KERNEL(InfoNceColsFwd, info_nce_cols_fwd, float, double)
FUSEDLOSS_CPU_KERNEL(InfoNceRowsBwd, info_nce_rows_bwd, float, double)
#endif  // CPU_CAPABILITY
