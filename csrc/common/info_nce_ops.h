// The host side of info_nce and info_nce_backward, for both devices.
//
// Blockwise over query rows, so memory is O(block x K) (K = M keys + E negatives), never
// N x K: each block's similarities come from one GEMM (at::mm_out into a reused buffer,
// BLAS on the CPU, cuBLAS on the GPU), then the Device's kernels compute the row lse /
// loss and, for the symmetric loss, merge the block's column (max, sum-exp) into running
// statistics. The backward recomputes each block's similarities, has the Device turn
// them into scale * dlogits in place, and feeds them to two more GEMMs: grad_query rows of
// the block, and an addmm_ into the whole (K, D) key/negative gradient. Half inputs are
// computed in float32; the scale is read by the kernels where it lives (no host sync).
#pragma once

#include <c10/core/DeviceGuard.h>

#include <algorithm>
#include <limits>
#include <optional>
#include <tuple>

#include "common/host.h"
#include "common/op_boxing.h"

namespace fusedloss {

struct InfoNceProblem {
  at::Tensor q, keys, labels, scale;  // q: (N, D) acc; keys: (K, D) acc = [key; negatives]
  int64_t N, M, E, K, D;
  bool has_neg;
  at::ScalarType acc;  // float64 for float64 inputs, float32 otherwise
};

template <class Device, class A>
InfoNceProblem prepare_info_nce(const A& a, const char* op) {
  const at::Tensor &query = a.query, &key = a.key;
  TORCH_CHECK(query.device().type() == Device::kType, "fusedloss.", op, ": expected ",
              Device::kType, " tensors, got query on ", query.device());
  TORCH_CHECK(key.device() == query.device(), "fusedloss.", op,
              ": query and key must be on one device");
  TORCH_CHECK(query.dim() == 2 && key.dim() == 2 && query.size(1) == key.size(1),
              "fusedloss.", op, ": query must be (N, D) and key (M, D), got ", query.sizes(),
              " and ", key.sizes());
  dtype_of(query, op, "query");
  InfoNceProblem p;
  p.has_neg = a.negatives.has_value() && a.negatives->defined();
  if (p.has_neg) {
    TORCH_CHECK(a.negatives->dim() == 2 && a.negatives->size(1) == query.size(1) &&
                    a.negatives->device() == query.device(),
                "fusedloss.", op, ": negatives must be (E, D) on the device of query, got ",
                a.negatives->sizes());
  }
  p.acc = acc_type_of(query.scalar_type());
  p.N = query.size(0);
  p.M = key.size(0);
  p.E = p.has_neg ? a.negatives->size(0) : 0;
  p.K = p.M + p.E;
  p.D = query.size(1);
  const bool has_labels = a.labels.has_value() && a.labels->defined();
  if (a.symmetric) {
    TORCH_CHECK(!has_labels && p.N == p.M, "fusedloss.", op,
                ": the symmetric loss needs the diagonal pairing (no labels, N == M)");
  }
  if (has_labels) {
    TORCH_CHECK(!a.labels->is_floating_point() && a.labels->numel() == p.N &&
                    a.labels->device() == query.device(),
                "fusedloss.", op, ": labels must be N = ", p.N,
                " integer column indices on the device of query, got ", a.labels->sizes());
    p.labels = a.labels->to(at::kLong).contiguous();
  }
  p.q = query.to(p.acc).contiguous();
  p.keys = p.has_neg ? at::cat({key.to(p.acc), a.negatives->to(p.acc)}, 0)
                     : key.to(p.acc).contiguous();
  p.scale = device_scalar(a.scale, p.acc, p.q, op, "scale");
  return p;
}

// The kernels' arguments that the forward and the backward share.
inline InfoNceBlockArgs info_nce_block_args(const InfoNceProblem& p, bool symmetric) {
  InfoNceBlockArgs b{};
  b.acc = p.acc == at::kDouble ? DType::kDouble : DType::kFloat;
  b.K = p.K;
  b.M = p.M;
  b.labels = p.labels.defined() ? p.labels.const_data_ptr<int64_t>() : nullptr;
  b.scale = p.scale.const_data_ptr();
  b.symmetric = symmetric;
  return b;
}

// Calls f(i0, nb, dots) for each block of query rows, dots = its (nb, K) similarities.
template <class Device, class F>
void for_each_info_nce_block(const InfoNceProblem& p, F&& f) {
  const int64_t blk = std::max<int64_t>(
      1, std::min<int64_t>(p.N, Device::kInfoNceBlockValues / std::max<int64_t>(p.K, 1)));
  at::Tensor buf = at::empty({blk, p.K}, p.q.options());
  for (int64_t i0 = 0; i0 < p.N; i0 += blk) {
    const int64_t nb = std::min(blk, p.N - i0);
    at::Tensor dots = buf.narrow(0, 0, nb);
    at::mm_out(dots, p.q.narrow(0, i0, nb), p.keys.t());
    f(i0, nb, dots);
  }
}

template <class Device>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> info_nce(const schema::info_nce& a) {
  const c10::DeviceGuard device_guard(a.query.device());
  const InfoNceProblem p = prepare_info_nce<Device>(a, "info_nce");
  const auto opts = p.q.options();
  const int64_t cols = a.symmetric ? p.M : 0;
  at::Tensor row_loss = at::empty({p.N}, opts), row_lse = at::empty({p.N}, opts);
  at::Tensor col_max = at::full({cols}, -std::numeric_limits<double>::infinity(), opts);
  at::Tensor col_sum = at::zeros({cols}, opts), diag = at::empty({cols}, opts);
  InfoNceBlockArgs b = info_nce_block_args(p, a.symmetric);
  b.row_lse = row_lse.mutable_data_ptr();
  b.row_loss = row_loss.mutable_data_ptr();
  b.diag = diag.mutable_data_ptr();
  b.col_max = col_max.mutable_data_ptr();
  b.col_sum = col_sum.mutable_data_ptr();
  at::Tensor workspace;
  for_each_info_nce_block<Device>(p, [&](int64_t i0, int64_t nb, at::Tensor& dots) {
    b.dots = dots.mutable_data_ptr();
    b.row0 = i0;
    b.nb = nb;
    Device::info_nce_rows_fwd(b);
    if (a.symmetric && p.M > 0) {
      const int64_t need = Device::info_nce_workspace(nb, p.M);
      if (need > 0 && (!workspace.defined() || workspace.numel() < need))
        workspace = at::empty({need}, opts);
      b.workspace = need > 0 ? workspace.mutable_data_ptr() : nullptr;
      Device::info_nce_cols_fwd(b);
    }
  });
  if (!a.symmetric) return {row_loss, row_loss.new_empty({0}), row_lse, row_lse.new_empty({0})};
  at::Tensor col_lse = col_max + col_sum.log();
  return {row_loss, col_lse - diag, row_lse, col_lse};
}

template <class Device>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> info_nce_backward(
    const schema::info_nce_backward& a) {
  constexpr const char* op = "info_nce_backward";
  const c10::DeviceGuard device_guard(a.query.device());
  const InfoNceProblem p = prepare_info_nce<Device>(a, op);
  const auto opts = p.q.options();
  TORCH_CHECK(a.grad_row.numel() == p.N && a.row_lse.numel() == p.N, "fusedloss.", op,
              ": grad_row and row_lse must have N = ", p.N, " entries");
  if (a.symmetric) {
    TORCH_CHECK(a.grad_col.numel() == p.M && a.col_lse.numel() == p.M, "fusedloss.", op,
                ": grad_col and col_lse must have M = ", p.M, " entries");
  }
  auto as_acc = [&](const at::Tensor& t) { return t.to(p.q.device(), p.acc).contiguous(); };
  const at::Tensor grad_row = as_acc(a.grad_row), row_lse = as_acc(a.row_lse);
  const at::Tensor grad_col = a.symmetric ? as_acc(a.grad_col) : at::Tensor();
  const at::Tensor col_lse = a.symmetric ? as_acc(a.col_lse) : at::Tensor();

  at::Tensor gq = at::empty({p.N, p.D}, opts);
  at::Tensor gk = at::zeros({p.K, p.D}, opts);
  at::Tensor partial = at::empty({p.N}, opts);
  InfoNceBlockArgs b = info_nce_block_args(p, a.symmetric);
  b.grad_row = grad_row.const_data_ptr();
  b.row_lse_in = row_lse.const_data_ptr();
  b.grad_col = a.symmetric ? grad_col.const_data_ptr() : nullptr;
  b.col_lse_in = a.symmetric ? col_lse.const_data_ptr() : nullptr;
  b.scale_partial = partial.mutable_data_ptr();
  for_each_info_nce_block<Device>(p, [&](int64_t i0, int64_t nb, at::Tensor& dots) {
    b.dots = dots.mutable_data_ptr();
    b.row0 = i0;
    b.nb = nb;
    Device::info_nce_rows_bwd(b);  // dots now holds scale * dlogits of the block
    at::Tensor gq_blk = gq.narrow(0, i0, nb);
    at::mm_out(gq_blk, dots, p.keys);
    gk.addmm_(dots.t(), p.q.narrow(0, i0, nb));
  });
  at::Tensor grad_scale = Device::sum_rows(partial, at::Tensor(), a.scale.scalar_type())
                              .to(a.scale.device())
                              .reshape(a.scale.sizes());
  at::Tensor grad_key = gk.narrow(0, 0, p.M).to(a.key.scalar_type(), false, /*copy=*/true);
  at::Tensor grad_neg = p.has_neg ? gk.narrow(0, p.M, p.E).to(a.negatives->scalar_type(),
                                                              false, /*copy=*/true)
                                  : a.query.new_empty({0});
  return {gq.to(a.query.scalar_type()), grad_key, grad_neg, grad_scale};
}

FUSEDLOSS_REGISTER_OPS(info_nce, m, Device) {
  FUSEDLOSS_IMPL(m, info_nce, &info_nce<Device>);
  FUSEDLOSS_IMPL(m, info_nce_backward, &info_nce_backward<Device>);
}

}  // namespace fusedloss
