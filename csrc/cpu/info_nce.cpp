// CPU implementations of fusedloss::info_nce and fusedloss::info_nce_backward.
//
// Blockwise over query rows, so memory is O(block x K) (K = M keys + E negatives), never
// N x K: each block's similarities come from one GEMM (at::mm_out into a reused buffer),
// then the vectorised sweeps of rowwise_impl.h compute the row lse / loss and, for the
// symmetric loss, merge the block's column (max, sum-exp) into running statistics. The
// backward recomputes each block's similarities, turns them into scale * dlogits in
// place, and feeds them to two more GEMMs: grad_query rows of the block, and an addmm_
// into the full (K, D) key/negative gradient. Half inputs are computed in float32.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <limits>

#include "common/info_nce_host.h"
#include "cpu/kernels.h"
#include "cpu/ops_common.h"

namespace fusedloss {
namespace cpu {
namespace {

using Problem = InfoNceProblem;

Problem prepare(const at::Tensor& query, const at::Tensor& key,
                const std::optional<at::Tensor>& negatives,
                const std::optional<at::Tensor>& labels, bool symmetric, const char* op) {
  TORCH_CHECK(query.device().is_cpu(), "fusedloss.", op, ": expected CPU tensors");
  return prepare_info_nce(query, key, negatives, labels, symmetric, op);
}

// Rows per block: about 4 Mi similarities (16 MiB in float32), enough rows for the GEMM.
// The block kernels' arguments that the forward and the backward share.
InfoNceBlockArgs shared_block_args(const Problem& p, const at::Tensor& scale, bool symmetric,
                                   const char* op) {
  InfoNceBlockArgs a{};
  a.K = p.K;
  a.M = p.M;
  a.labels = p.labels.defined() ? p.labels.const_data_ptr<int64_t>() : nullptr;
  a.scale = scalar_value(scale, op, "scale");
  a.symmetric = symmetric;
  return a;
}

int64_t block_rows(const Problem& p) { return info_nce_block_rows(p, int64_t(1) << 22); }

int64_t grain_for(int64_t work_per_item) {
  return std::max<int64_t>(1, (int64_t(1) << 14) / std::max<int64_t>(work_per_item, 1));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> info_nce_cpu(
    const at::Tensor& query, const at::Tensor& key, const std::optional<at::Tensor>& negatives,
    const std::optional<at::Tensor>& labels, const at::Tensor& scale, bool symmetric) {
  constexpr const char* op = "info_nce";
  // Kernel level: the tensor ops below must not record autograd history.
  at::AutoDispatchBelowADInplaceOrView guard;
  const Problem p = prepare(query, key, negatives, labels, symmetric, op);
  const auto opts = p.q.options();
  const int64_t cols = symmetric ? p.M : 0;
  at::Tensor row_loss = at::empty({p.N}, opts), row_lse = at::empty({p.N}, opts);
  at::Tensor col_max = at::full({cols}, -std::numeric_limits<double>::infinity(), opts);
  at::Tensor col_sum = at::zeros({cols}, opts), diag = at::empty({cols}, opts);

  const KernelTable& k = kernel_table();
  const int idx = p.acc == at::kDouble ? 1 : 0;
  const int64_t blk = block_rows(p);
  at::Tensor buf = at::empty({blk, p.K}, opts);
  InfoNceBlockArgs a = shared_block_args(p, scale, symmetric, op);
  a.row_lse = row_lse.mutable_data_ptr();
  a.row_loss = row_loss.mutable_data_ptr();
  if (symmetric) {
    a.diag = diag.mutable_data_ptr();
    a.col_max = col_max.mutable_data_ptr();
    a.col_sum = col_sum.mutable_data_ptr();
  }
  for (int64_t i0 = 0; i0 < p.N; i0 += blk) {
    const int64_t nb = std::min(blk, p.N - i0);
    at::Tensor dots = buf.narrow(0, 0, nb);
    at::mm_out(dots, p.q.narrow(0, i0, nb), p.keys.t());
    a.dots = dots.data_ptr();
    a.row0 = i0;
    a.nb = nb;
    at::parallel_for(0, nb, grain_for(p.K), [&](int64_t b, int64_t e) {
      k.info_nce_rows_fwd[idx](a, b, e);
    });
    if (symmetric) {
      at::parallel_for(0, p.M, grain_for(nb), [&](int64_t b, int64_t e) {
        k.info_nce_cols_fwd[idx](a, b, e);
      });
    }
  }
  auto [col_loss, col_lse] = finish_info_nce_columns(col_max, col_sum, diag, symmetric);
  return {row_loss, col_loss, row_lse, col_lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> info_nce_backward_cpu(
    const at::Tensor& grad_row, const at::Tensor& grad_col, const at::Tensor& query,
    const at::Tensor& key, const std::optional<at::Tensor>& negatives,
    const std::optional<at::Tensor>& labels, const at::Tensor& scale,
    const at::Tensor& row_lse, const at::Tensor& col_lse, bool symmetric) {
  constexpr const char* op = "info_nce_backward";
  // Kernel level: the tensor ops below must not record autograd history.
  at::AutoDispatchBelowADInplaceOrView guard;
  const Problem p = prepare(query, key, negatives, labels, symmetric, op);
  const auto opts = p.q.options();
  const InfoNceBackwardInputs in =
      prepare_info_nce_backward(p, grad_row, row_lse, grad_col, col_lse, symmetric, op);
  const at::Tensor &g_row = in.grad_row, &lse_row = in.row_lse;
  const at::Tensor &g_col = in.grad_col, &lse_col = in.col_lse;

  at::Tensor gq = at::empty({p.N, p.D}, opts);
  at::Tensor gk = at::zeros({p.K, p.D}, opts);
  at::Tensor partial = at::empty({p.N}, opts);
  const KernelTable& k = kernel_table();
  const int idx = p.acc == at::kDouble ? 1 : 0;
  const int64_t blk = block_rows(p);
  at::Tensor buf = at::empty({blk, p.K}, opts);
  InfoNceBlockArgs a = shared_block_args(p, scale, symmetric, op);
  a.grad_row = g_row.const_data_ptr();
  a.row_lse_in = lse_row.const_data_ptr();
  if (symmetric) {
    a.grad_col = g_col.const_data_ptr();
    a.col_lse_in = lse_col.const_data_ptr();
  }
  a.scale_partial = partial.mutable_data_ptr();
  for (int64_t i0 = 0; i0 < p.N; i0 += blk) {
    const int64_t nb = std::min(blk, p.N - i0);
    at::Tensor dl = buf.narrow(0, 0, nb);
    const at::Tensor qb = p.q.narrow(0, i0, nb);
    at::mm_out(dl, qb, p.keys.t());
    a.dots = dl.data_ptr();
    a.row0 = i0;
    a.nb = nb;
    at::parallel_for(0, nb, grain_for(p.K), [&](int64_t b, int64_t e) {
      k.info_nce_rows_bwd[idx](a, b, e);
    });
    // dl now holds scale * dlogits of the block.
    at::Tensor gq_blk = gq.narrow(0, i0, nb);
    at::mm_out(gq_blk, dl, p.keys);
    gk.addmm_(dl.t(), qb);
  }
  double gs;
  if (p.acc == at::kDouble) {
    gs = pairwise_sum(partial.const_data_ptr<double>(), p.N);
  } else {
    gs = pairwise_sum(partial.const_data_ptr<float>(), p.N);
  }
  at::Tensor grad_scale = at::empty_like(scale).fill_(gs);
  at::Tensor grad_query = gq.to(query.scalar_type());
  auto [grad_key, grad_neg] = split_key_grads(gk, p, key, negatives, query);
  return {grad_query, grad_key, grad_neg, grad_scale};
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedloss, CPU, m) {
  m.impl("info_nce", &info_nce_cpu);
  m.impl("info_nce_backward", &info_nce_backward_cpu);
}

}  // namespace cpu
}  // namespace fusedloss
