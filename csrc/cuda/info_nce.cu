// The CUDA kernels over one block of InfoNCE similarities (the block comes from cuBLAS in
// common/info_nce_ops.h; the algebra is in fusedloss/info_nce.py): row lse / loss, column
// (max, sum-exp) statistics merged across blocks, and (backward) scale * dlogits in place.
// The scale is read on the device; no float atomics: every sum has a fixed order.
#include "cuda/common.cuh"
#include "common/device.h"

namespace fusedloss {
namespace cuda {
namespace {

constexpr int kRowThreads = 128;   // threads per similarity row
constexpr int kColThreads = 256;   // columns per block of the column kernels
constexpr int64_t kColChunk = 64;  // rows of a block folded by one column thread, at least
constexpr int64_t kMaxColChunks = 4096;  // grid.y stays far below its 65535 limit

int64_t col_chunk_rows(int64_t nb) {
  return std::max<int64_t>(kColChunk, (nb + kMaxColChunks - 1) / kMaxColChunks);
}

unsigned int row_grid(int64_t nb) {
  return static_cast<unsigned int>(std::min<int64_t>(nb, int64_t(1) << 20));
}

// Grid: one block of kRowThreads per row of the block (grid-stride over nb rows); the
// row's threads own columns j = tid + k * kRowThreads. One pass over the row (online
// softmax): nb * K * sizeof(acc) read; 8-12 bytes written per row.
template <class T>
__global__ void __launch_bounds__(kRowThreads) info_nce_rows_fwd_kernel(InfoNceBlockArgs a) {
  __shared__ T smem[3 * (kRowThreads / 32)];
  const T sc = *static_cast<const T*>(a.scale);
  const T* dots = static_cast<const T*>(a.dots);
  for (int64_t i = blockIdx.x; i < a.nb; i += gridDim.x) {
    const T* row = dots + i * a.K;
    T m = -INFINITY, s = T(0);
    for (int64_t j = threadIdx.x; j < a.K; j += kRowThreads) online_add(m, s, sc * row[j]);
    Group<kRowThreads>::merge(m, s, smem);
    if (threadIdx.x == 0) {
      const int64_t gi = a.row0 + i;
      const auto rl = math::row_lse(m, s);
      const int64_t pos = a.labels ? a.labels[gi] : gi;
      const bool defined = pos >= 0 && pos < a.K && math::fl_isfinite(m);
      static_cast<T*>(a.row_lse)[gi] = rl.lse;
      static_cast<T*>(a.row_loss)[gi] = defined ? rl.lse - sc * row[pos] : math::fl_nan<T>();
      if (a.symmetric && gi < a.M) static_cast<T*>(a.diag)[gi] = sc * row[gi];
    }
  }
}

// Grid: (ceil(M / kColThreads), ceil(nb / chunk)) blocks; thread j of block (x, y) folds
// rows [y * chunk, (y + 1) * chunk) of column j < M into one (max, sum-exp) pair, written
// to the workspace's part_m / part_s[y, j]. Reads the block's first M columns once,
// coalesced.
template <class T>
__global__ void __launch_bounds__(kColThreads)
    info_nce_cols_partial_kernel(InfoNceBlockArgs a, int64_t chunk, int64_t chunks) {
  const int64_t j = int64_t(blockIdx.x) * kColThreads + threadIdx.x;
  if (j >= a.M) return;
  const T sc = *static_cast<const T*>(a.scale);
  const T* dots = static_cast<const T*>(a.dots);
  T* part_m = static_cast<T*>(a.workspace);
  T* part_s = part_m + chunks * a.M;
  const int64_t i0 = int64_t(blockIdx.y) * chunk;
  const int64_t i1 = i0 + chunk < a.nb ? i0 + chunk : a.nb;
  T m = -INFINITY, s = T(0);
  for (int64_t i = i0; i < i1; ++i) online_add(m, s, sc * dots[i * a.K + j]);
  part_m[int64_t(blockIdx.y) * a.M + j] = m;
  part_s[int64_t(blockIdx.y) * a.M + j] = s;
}

// Grid: ceil(M / kColThreads) blocks, a thread per column: merges the chunks' pairs, in
// chunk order, into the running column statistics of all blocks so far.
template <class T>
__global__ void __launch_bounds__(kColThreads)
    info_nce_cols_merge_kernel(InfoNceBlockArgs a, int64_t chunks) {
  const int64_t j = int64_t(blockIdx.x) * kColThreads + threadIdx.x;
  if (j >= a.M) return;
  const T* part_m = static_cast<const T*>(a.workspace);
  const T* part_s = part_m + chunks * a.M;
  T* col_max = static_cast<T*>(a.col_max);
  T* col_sum = static_cast<T*>(a.col_sum);
  T m = col_max[j], s = col_sum[j];
  for (int64_t c = 0; c < chunks; ++c) online_merge(m, s, part_m[c * a.M + j], part_s[c * a.M + j]);
  col_max[j] = m;
  col_sum[j] = s;
}

// Grid: one block of kRowThreads per row of the block. Per element:
//   dlogits = g_row (exp(z - row_lse) - [j == pos])
//             + [sym, j < M] g_col_j (exp(z - col_lse_j) - [i == j])
// written back as scale * dlogits over the similarities, and the row's
// sum_j dlogits * <q_i, k_j> (for grad_scale) reduced in a fixed order. One read and one
// write of the block: 2 * nb * K * sizeof(acc) bytes, plus the column vectors (cached).
template <class T>
__global__ void __launch_bounds__(kRowThreads) info_nce_rows_bwd_kernel(InfoNceBlockArgs a) {
  __shared__ T smem[3 * (kRowThreads / 32)];
  const T sc = *static_cast<const T*>(a.scale);
  const T* grad_row = static_cast<const T*>(a.grad_row);
  const T* grad_col = static_cast<const T*>(a.grad_col);
  const T* row_lse = static_cast<const T*>(a.row_lse_in);
  const T* col_lse = static_cast<const T*>(a.col_lse_in);
  for (int64_t i = blockIdx.x; i < a.nb; i += gridDim.x) {
    T* row = static_cast<T*>(a.dots) + i * a.K;
    const int64_t gi = a.row0 + i;
    const int64_t pos = a.labels ? a.labels[gi] : gi;
    const bool bad = pos < 0 || pos >= a.K;  // its loss is NaN, and so is its gradient
    const T gr = grad_row[gi], lse = row_lse[gi];
    T part = T(0);
    for (int64_t j = threadIdx.x; j < a.K; j += kRowThreads) {
      const T d = row[j];
      const T z = sc * d;
      T dl = gr * (math::fl_exp(z - lse) - (j == pos ? T(1) : T(0)));
      if (a.symmetric && j < a.M)
        dl += grad_col[j] * (math::fl_exp(z - col_lse[j]) - (j == gi ? T(1) : T(0)));
      if (bad) dl = math::fl_nan<T>();
      part += dl * d;
      row[j] = dl * sc;
    }
    part = Group<kRowThreads>::sum(part, smem);
    if (threadIdx.x == 0) static_cast<T*>(a.scale_partial)[gi] = part;
  }
}

// Calls f(T{}) with T the accumulation type of the block.
template <class F>
void visit_acc(const InfoNceBlockArgs& a, F&& f) {
  if (a.acc == DType::kDouble) f(double{}); else f(float{});
}

}  // namespace

}  // namespace cuda

using namespace cuda;  // the kernels and helpers above

template <>
int64_t Device<kCUDA>::info_nce_workspace(int64_t block_rows, int64_t M) {
  // Two (max, sum) planes of ceil(nb / chunk) <= min(ceil(nb / kColChunk), kMaxColChunks)
  // rows of M columns.
  const int64_t chunks = std::min((block_rows + kColChunk - 1) / kColChunk, kMaxColChunks);
  return 2 * chunks * M;
}

template <>
void Device<kCUDA>::info_nce_rows_fwd(const InfoNceBlockArgs& a) {
  visit_acc(a, [&](auto tag) {
    info_nce_rows_fwd_kernel<decltype(tag)><<<row_grid(a.nb), kRowThreads, 0, stream()>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

template <>
void Device<kCUDA>::info_nce_cols_fwd(const InfoNceBlockArgs& a) {
  const int64_t chunk = col_chunk_rows(a.nb);
  const int64_t chunks = (a.nb + chunk - 1) / chunk;
  const dim3 grid(static_cast<unsigned int>((a.M + kColThreads - 1) / kColThreads),
                  static_cast<unsigned int>(chunks));
  visit_acc(a, [&](auto tag) {
    using T = decltype(tag);
    info_nce_cols_partial_kernel<T><<<grid, kColThreads, 0, stream()>>>(a, chunk, chunks);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    info_nce_cols_merge_kernel<T><<<grid.x, kColThreads, 0, stream()>>>(a, chunks);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

template <>
void Device<kCUDA>::info_nce_rows_bwd(const InfoNceBlockArgs& a) {
  visit_acc(a, [&](auto tag) {
    info_nce_rows_bwd_kernel<decltype(tag)><<<row_grid(a.nb), kRowThreads, 0, stream()>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace fusedloss
