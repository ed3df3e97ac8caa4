// CUDA implementations of fusedloss::info_nce and fusedloss::info_nce_backward.
//
// Blockwise over query rows so memory is O(block x K), K = M keys + E negatives, never
// N x K: each block's similarities come from cuBLAS (at::mm_out into a reused buffer),
// and the kernels below turn them into row lse / loss, column (max, sum-exp) statistics
// merged across blocks, or (backward) scale * dlogits in place, which two more GEMMs
// turn into grad_query (the block's rows) and grad_keys (an addmm_ into (K, D)).
// Half inputs are computed in float32. The scale stays on the device (read by the
// kernels): no host synchronisation. No float atomics: every sum has a fixed order.
#include <torch/library.h>

#include <limits>

#include "common/info_nce_host.h"
#include "cuda/common.cuh"

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

// Grid: one block of kRowThreads per row of the block (grid-stride over nb rows); the
// row's threads own columns j = tid + k * kRowThreads. One pass over the row (online
// softmax): nb * K * sizeof(acc) read; 8-12 bytes written per row.
template <class T>
__global__ void __launch_bounds__(kRowThreads)
    info_nce_rows_fwd_kernel(const T* __restrict__ dots, int64_t nb, int64_t K, int64_t M,
                             int64_t row0, const int64_t* __restrict__ labels,
                             const T* __restrict__ scale, bool symmetric,
                             T* __restrict__ row_lse, T* __restrict__ row_loss,
                             T* __restrict__ diag) {
  __shared__ T smem[3 * (kRowThreads / 32)];
  const T sc = *scale;
  for (int64_t i = blockIdx.x; i < nb; i += gridDim.x) {
    const T* row = dots + i * K;
    T m = -INFINITY, s = T(0);
    for (int64_t j = threadIdx.x; j < K; j += kRowThreads) online_add(m, s, sc * row[j]);
    Group<kRowThreads>::merge(m, s, smem);
    if (threadIdx.x == 0) {
      const int64_t gi = row0 + i;
      const auto rl = fm::row_lse(m, s);
      const int64_t pos = labels ? labels[gi] : gi;
      const bool defined = pos >= 0 && pos < K && fm::fl_isfinite(m);
      row_lse[gi] = rl.lse;
      row_loss[gi] = defined ? rl.lse - sc * row[pos] : fm::fl_nan<T>();
      if (symmetric && gi < M) diag[gi] = sc * row[gi];
    }
  }
}

// Grid: (ceil(M / kColThreads), ceil(nb / chunk)) blocks; thread j of block (x, y) folds
// rows [y * chunk, (y + 1) * chunk) of column j < M into one (max, sum-exp) pair, written
// to part_m / part_s[y, j]. Reads the block's first M columns once, coalesced.
template <class T>
__global__ void __launch_bounds__(kColThreads)
    info_nce_cols_partial_kernel(const T* __restrict__ dots, int64_t nb, int64_t K, int64_t M,
                                 int64_t chunk, const T* __restrict__ scale,
                                 T* __restrict__ part_m, T* __restrict__ part_s) {
  const int64_t j = int64_t(blockIdx.x) * kColThreads + threadIdx.x;
  if (j >= M) return;
  const T sc = *scale;
  const int64_t i0 = int64_t(blockIdx.y) * chunk;
  const int64_t i1 = i0 + chunk < nb ? i0 + chunk : nb;
  T m = -INFINITY, s = T(0);
  for (int64_t i = i0; i < i1; ++i) online_add(m, s, sc * dots[i * K + j]);
  part_m[int64_t(blockIdx.y) * M + j] = m;
  part_s[int64_t(blockIdx.y) * M + j] = s;
}

// Grid: ceil(M / kColThreads) blocks, a thread per column: merges the chunks' pairs, in
// chunk order, into the running column statistics of all blocks so far.
template <class T>
__global__ void __launch_bounds__(kColThreads)
    info_nce_cols_merge_kernel(const T* __restrict__ part_m, const T* __restrict__ part_s,
                               int64_t chunks, int64_t M, T* __restrict__ col_max,
                               T* __restrict__ col_sum) {
  const int64_t j = int64_t(blockIdx.x) * kColThreads + threadIdx.x;
  if (j >= M) return;
  T m = col_max[j], s = col_sum[j];
  for (int64_t c = 0; c < chunks; ++c) online_merge(m, s, part_m[c * M + j], part_s[c * M + j]);
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
__global__ void __launch_bounds__(kRowThreads)
    info_nce_rows_bwd_kernel(T* __restrict__ dots, int64_t nb, int64_t K, int64_t M,
                             int64_t row0, const int64_t* __restrict__ labels,
                             const T* __restrict__ scale, bool symmetric,
                             const T* __restrict__ grad_row, const T* __restrict__ grad_col,
                             const T* __restrict__ row_lse, const T* __restrict__ col_lse,
                             T* __restrict__ partial) {
  __shared__ T smem[3 * (kRowThreads / 32)];
  const T sc = *scale;
  for (int64_t i = blockIdx.x; i < nb; i += gridDim.x) {
    T* row = dots + i * K;
    const int64_t gi = row0 + i;
    const int64_t pos = labels ? labels[gi] : gi;
    const bool bad = pos < 0 || pos >= K;  // its loss is NaN, and so is its gradient
    const T gr = grad_row[gi], lse = row_lse[gi];
    T part = T(0);
    for (int64_t j = threadIdx.x; j < K; j += kRowThreads) {
      const T d = row[j];
      const T z = sc * d;
      T dl = gr * (fm::fl_exp(z - lse) - (j == pos ? T(1) : T(0)));
      if (symmetric && j < M)
        dl += grad_col[j] * (fm::fl_exp(z - col_lse[j]) - (j == gi ? T(1) : T(0)));
      if (bad) dl = fm::fl_nan<T>();
      part += dl * d;
      row[j] = dl * sc;
    }
    part = Group<kRowThreads>::sum(part, smem);
    if (threadIdx.x == 0) partial[gi] = part;
  }
}

using Problem = InfoNceProblem;

Problem prepare(const at::Tensor& query, const at::Tensor& key,
                const std::optional<at::Tensor>& negatives,
                const std::optional<at::Tensor>& labels, bool symmetric, const char* op) {
  TORCH_CHECK(query.is_cuda(), "fusedloss.", op, ": expected CUDA tensors");
  return prepare_info_nce(query, key, negatives, labels, symmetric, op);
}

// Rows per block: about 32 Mi similarities (128 MiB in float32).
int64_t block_rows(const Problem& p) { return info_nce_block_rows(p, int64_t(1) << 25); }

unsigned int row_grid(int64_t nb) {
  return static_cast<unsigned int>(std::min<int64_t>(nb, int64_t(1) << 20));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> info_nce_cuda(
    const at::Tensor& query, const at::Tensor& key, const std::optional<at::Tensor>& negatives,
    const std::optional<at::Tensor>& labels, const at::Tensor& scale, bool symmetric) {
  constexpr const char* op = "info_nce";
  at::AutoDispatchBelowADInplaceOrView guard;
  const c10::cuda::CUDAGuard device_guard(query.device());
  const Problem p = prepare(query, key, negatives, labels, symmetric, op);
  const at::Tensor scale_dev = device_scalar(scale, p.acc, p.q, op, "scale");
  const auto opts = p.q.options();
  const int64_t cols = symmetric ? p.M : 0;
  at::Tensor row_loss = at::empty({p.N}, opts), row_lse = at::empty({p.N}, opts);
  at::Tensor col_max = at::full({cols}, -std::numeric_limits<double>::infinity(), opts);
  at::Tensor col_sum = at::zeros({cols}, opts), diag = at::empty({cols}, opts);
  const int64_t blk = block_rows(p);
  at::Tensor buf = at::empty({blk, p.K}, opts);
  // ceil(nb / col_chunk_rows(nb)) never exceeds either bound for any nb <= blk.
  const int64_t chunks_max = std::min((blk + kColChunk - 1) / kColChunk, kMaxColChunks);
  at::Tensor part = symmetric ? at::empty({2, chunks_max, p.M}, opts) : at::Tensor();
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t* lab = p.labels.defined() ? p.labels.const_data_ptr<int64_t>() : nullptr;

  AT_DISPATCH_FLOATING_TYPES(p.acc, "fusedloss_info_nce", [&] {
    for (int64_t i0 = 0; i0 < p.N; i0 += blk) {
      const int64_t nb = std::min(blk, p.N - i0);
      at::Tensor dots = buf.narrow(0, 0, nb);
      at::mm_out(dots, p.q.narrow(0, i0, nb), p.keys.t());
      info_nce_rows_fwd_kernel<scalar_t><<<row_grid(nb), kRowThreads, 0, stream>>>(
          dots.const_data_ptr<scalar_t>(), nb, p.K, p.M, i0, lab,
          scale_dev.const_data_ptr<scalar_t>(), symmetric, row_lse.mutable_data_ptr<scalar_t>(),
          row_loss.mutable_data_ptr<scalar_t>(),
          symmetric ? diag.mutable_data_ptr<scalar_t>() : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (symmetric && p.M > 0) {
        const int64_t chunk = col_chunk_rows(nb);
        const int64_t chunks = (nb + chunk - 1) / chunk;
        scalar_t* pm = part.mutable_data_ptr<scalar_t>();
        scalar_t* ps = pm + chunks_max * p.M;
        const dim3 grid(static_cast<unsigned int>((p.M + kColThreads - 1) / kColThreads),
                        static_cast<unsigned int>(chunks));
        info_nce_cols_partial_kernel<scalar_t><<<grid, kColThreads, 0, stream>>>(
            dots.const_data_ptr<scalar_t>(), nb, p.K, p.M, chunk,
            scale_dev.const_data_ptr<scalar_t>(), pm, ps);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        info_nce_cols_merge_kernel<scalar_t><<<grid.x, kColThreads, 0, stream>>>(
            pm, ps, chunks, p.M, col_max.mutable_data_ptr<scalar_t>(),
            col_sum.mutable_data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    }
  });
  auto [col_loss, col_lse] = finish_info_nce_columns(col_max, col_sum, diag, symmetric);
  return {row_loss, col_loss, row_lse, col_lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> info_nce_backward_cuda(
    const at::Tensor& grad_row, const at::Tensor& grad_col, const at::Tensor& query,
    const at::Tensor& key, const std::optional<at::Tensor>& negatives,
    const std::optional<at::Tensor>& labels, const at::Tensor& scale,
    const at::Tensor& row_lse, const at::Tensor& col_lse, bool symmetric) {
  constexpr const char* op = "info_nce_backward";
  at::AutoDispatchBelowADInplaceOrView guard;
  const c10::cuda::CUDAGuard device_guard(query.device());
  const Problem p = prepare(query, key, negatives, labels, symmetric, op);
  const at::Tensor scale_dev = device_scalar(scale, p.acc, p.q, op, "scale");
  const auto opts = p.q.options();
  const InfoNceBackwardInputs in =
      prepare_info_nce_backward(p, grad_row, row_lse, grad_col, col_lse, symmetric, op);
  const at::Tensor &g_row = in.grad_row, &lse_row = in.row_lse;
  const at::Tensor &g_col = in.grad_col, &lse_col = in.col_lse;
  at::Tensor gq = at::empty({p.N, p.D}, opts);
  at::Tensor gk = at::zeros({p.K, p.D}, opts);
  at::Tensor partial = at::empty({p.N}, opts);
  const int64_t blk = block_rows(p);
  at::Tensor buf = at::empty({blk, p.K}, opts);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t* lab = p.labels.defined() ? p.labels.const_data_ptr<int64_t>() : nullptr;

  AT_DISPATCH_FLOATING_TYPES(p.acc, "fusedloss_info_nce_backward", [&] {
    for (int64_t i0 = 0; i0 < p.N; i0 += blk) {
      const int64_t nb = std::min(blk, p.N - i0);
      at::Tensor dl = buf.narrow(0, 0, nb);
      const at::Tensor qb = p.q.narrow(0, i0, nb);
      at::mm_out(dl, qb, p.keys.t());
      info_nce_rows_bwd_kernel<scalar_t><<<row_grid(nb), kRowThreads, 0, stream>>>(
          dl.mutable_data_ptr<scalar_t>(), nb, p.K, p.M, i0, lab,
          scale_dev.const_data_ptr<scalar_t>(), symmetric, g_row.const_data_ptr<scalar_t>(),
          symmetric ? g_col.const_data_ptr<scalar_t>() : nullptr,
          lse_row.const_data_ptr<scalar_t>(),
          symmetric ? lse_col.const_data_ptr<scalar_t>() : nullptr,
          partial.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      at::Tensor gq_blk = gq.narrow(0, i0, nb);
      at::mm_out(gq_blk, dl, p.keys);
      gk.addmm_(dl.t(), qb);
    }
  });
  at::Tensor grad_scale =
      partial.sum().to(scale.device(), scale.scalar_type()).reshape(scale.sizes()).clone();
  at::Tensor grad_query = query.scalar_type() == p.acc ? gq : gq.to(query.scalar_type());
  auto [grad_key, grad_neg] = split_key_grads(gk, p, key, negatives, query);
  return {grad_query, grad_key, grad_neg, grad_scale};
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedloss, CUDA, m) {
  m.impl("info_nce", &info_nce_cuda);
  m.impl("info_nce_backward", &info_nce_backward_cuda);
}

}  // namespace cuda
}  // namespace fusedloss
