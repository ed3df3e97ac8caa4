// The vectorised CPU SigLIP tile kernel (the algebra is in fusedloss/siglip.py, the
// element math common/loss_math.h's softplus_sigmoid).
//
// Grid: at::parallel_for over the R rows of an (R, C) tile of dot products (common/
// siglip_ops.h launches it); one call owns a contiguous range of rows. One sweep per row
// reads each dot once and, with the gradient, writes scale * G over it: C values read and
// written per row, three sums per row out. Every element is a negative pair except the
// row's positive, column r + diagonal, which is computed on its own between the two vector
// runs around it.
//
// The host reads only the launch arguments; the kernel and its registration are compiled
// by the per-ISA units (CPU_CAPABILITY, see cpu/kernel_registry.h).
#pragma once

#include <cstdint>

#include "cpu/kernel_registry.h"

namespace fusedloss {

// One (R, C) row-major tile of image-text dot products in the accumulation type (from a
// GEMM in fusedloss/siglip.py, whose docstring has the algebra); row r's positive is
// column r + diagonal, where that column exists.
struct SiglipTileArgs {
  DType acc;                 // kFloat or kDouble
  void* dots;                // (R, C); with compute_grad overwritten with scale * G
  int64_t R, C, diagonal;
  const void* scale;         // 0-dim: logit_scale
  const void* bias;          // 0-dim: logit_bias
  const void* loss_scale;    // 0-dim: multiplies G
  const void* row_weight;    // (R,), or nullptr: multiplies G per row
  bool compute_grad;
  void* row_loss;            // (R,) sum over the row's columns of the loss, unscaled
  void* scale_rows;          // (R,) sum G * dots, or nullptr
  void* bias_rows;           // (R,) sum G, or nullptr
};

}  // namespace fusedloss

#ifdef CPU_CAPABILITY
#include <algorithm>

#include "cpu/vec.h"

namespace fusedloss {
namespace cpu {
namespace CPU_CAPABILITY {

template <class T>
struct SiglipRowSums {
  Vectorized<T> loss{T(0)}, scale{T(0)}, bias{T(0)};  // sum loss, sum G * dots, sum G
};

// Columns [c0, c1) of one row, all negatives (z = -1, so u = l): loss = softplus(l),
// G = w * sigmoid(l).
template <class T>
inline void siglip_negatives(T* row, int64_t c0, int64_t c1, T s, T b, T w, bool grad,
                             SiglipRowSums<T>& acc) {
  using V = Vectorized<T>;
  constexpr int64_t L = V::size();
  const V vs(s), vb(b), vw(w);
  for (int64_t c = c0; c < c1; c += L) {
    const int64_t n = std::min(L, c1 - c);
    const V d = n == L ? V::loadu(row + c) : V::loadu(row + c, n);
    V loss, sig;
    math::softplus_sigmoid<T>(d * vs + vb, loss, sig);
    V g = vw * sig;
    if (n < L) {  // the missing lanes read 0: keep them out of the sums
      loss = V::set(V(0), loss, n);
      g = V::set(V(0), g, n);
    }
    acc.loss = acc.loss + loss;
    if (grad) {
      acc.scale = acc.scale + g * d;
      acc.bias = acc.bias + g;
      if (n == L) (g * vs).store(row + c); else (g * vs).store(row + c, n);
    }
  }
}

template <class T>
void siglip_tile(const SiglipTileArgs& a, int64_t r0, int64_t r1) {
  const int64_t C = a.C;
  const T s = *static_cast<const T*>(a.scale), b = *static_cast<const T*>(a.bias);
  const T loss_scale = *static_cast<const T*>(a.loss_scale);
  const T* row_weight = static_cast<const T*>(a.row_weight);
  T* dots = static_cast<T*>(a.dots);
  T* row_loss = static_cast<T*>(a.row_loss);
  T* scale_rows = static_cast<T*>(a.scale_rows);
  T* bias_rows = static_cast<T*>(a.bias_rows);
  for (int64_t r = r0; r < r1; ++r) {
    T* row = dots + r * C;
    const T w = row_weight ? loss_scale * row_weight[r] : loss_scale;
    const int64_t pos = r + a.diagonal;
    const bool has_pos = pos >= 0 && pos < C;
    SiglipRowSums<T> acc;
    siglip_negatives(row, 0, has_pos ? pos : C, s, b, w, a.compute_grad, acc);
    T loss = T(0), gs = T(0), gb = T(0);
    if (has_pos) {  // z = +1: u = -l, G = -w * sigmoid(-l)
      const T d = row[pos];
      T sig;
      math::softplus_sigmoid<T>(-(s * d + b), loss, sig);
      const T g = -w * sig;
      gs = g * d;
      gb = g;
      if (a.compute_grad) row[pos] = s * g;
      siglip_negatives(row, pos + 1, C, s, b, w, a.compute_grad, acc);
    }
    row_loss[r] = hsum(acc.loss) + loss;
    if (a.compute_grad) {
      scale_rows[r] = hsum(acc.scale) + gs;
      bias_rows[r] = hsum(acc.bias) + gb;
    }
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace fusedloss

FUSEDLOSS_CPU_KERNEL(SiglipTileArgs, siglip_tile, float, double)
#endif  // CPU_CAPABILITY
