#pragma once
// Host-side set-up of the blockwise InfoNCE, shared by the CPU and CUDA backends: argument
// checks, the embeddings in the accumulation type, the block size, and the split of the
// keys' gradient into grad_key and grad_negatives. (The device code differs; this does not.)
#include <ATen/ATen.h>

#include <algorithm>
#include <optional>
#include <utility>

namespace fusedloss {

struct InfoNceProblem {
  at::Tensor q, keys, labels;  // q: (N, D) acc; keys: (K, D) acc = [key; negatives]
  int64_t N, M, E, K, D;
  bool has_neg;
  at::ScalarType acc;  // float64 for float64 inputs, float32 otherwise
};

inline InfoNceProblem prepare_info_nce(const at::Tensor& query, const at::Tensor& key,
                                       const std::optional<at::Tensor>& negatives,
                                       const std::optional<at::Tensor>& labels, bool symmetric,
                                       const char* op) {
  TORCH_CHECK(key.device() == query.device(), "fusedloss.", op,
              ": query and key must be on one device");
  TORCH_CHECK(query.dim() == 2 && key.dim() == 2 && query.size(1) == key.size(1),
              "fusedloss.", op, ": query must be (N, D) and key (M, D), got ", query.sizes(),
              " and ", key.sizes());
  const auto dt = query.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
              "fusedloss.", op, ": query must be float32, float64, bfloat16 or float16, got ",
              dt);
  InfoNceProblem p;
  p.has_neg = negatives.has_value() && negatives->defined();
  if (p.has_neg) {
    TORCH_CHECK(negatives->dim() == 2 && negatives->size(1) == query.size(1) &&
                    negatives->device() == query.device(),
                "fusedloss.", op, ": negatives must be (E, D) on the device of query, got ",
                negatives->sizes());
  }
  p.acc = dt == at::kDouble ? at::kDouble : at::kFloat;
  p.N = query.size(0);
  p.M = key.size(0);
  p.E = p.has_neg ? negatives->size(0) : 0;
  p.K = p.M + p.E;
  p.D = query.size(1);
  const bool has_labels = labels.has_value() && labels->defined();
  if (symmetric) {
    TORCH_CHECK(!has_labels && p.N == p.M, "fusedloss.", op,
                ": the symmetric loss needs the diagonal pairing (no labels, N == M)");
  }
  if (has_labels) {
    TORCH_CHECK(!labels->is_floating_point() && labels->numel() == p.N &&
                    labels->device() == query.device(),
                "fusedloss.", op, ": labels must be N = ", p.N,
                " integer column indices on the device of query, got ", labels->sizes());
    p.labels = labels->to(at::kLong).contiguous();
  }
  p.q = query.to(p.acc).contiguous();
  p.keys = p.has_neg ? at::cat({key.to(p.acc), negatives->to(p.acc)}, 0)
                     : key.to(p.acc).contiguous();
  return p;
}

// Query rows per block, so that one block's similarities hold at most `budget` values.
inline int64_t info_nce_block_rows(const InfoNceProblem& p, int64_t budget) {
  return std::max<int64_t>(1, std::min<int64_t>(p.N, budget / std::max<int64_t>(p.K, 1)));
}

// The (K, D) accumulated gradient of [key; negatives], split and cast to their dtypes.
inline std::pair<at::Tensor, at::Tensor> split_key_grads(
    const at::Tensor& grad_keys, const InfoNceProblem& p, const at::Tensor& key,
    const std::optional<at::Tensor>& negatives, const at::Tensor& query) {
  at::Tensor grad_key = grad_keys.narrow(0, 0, p.M).to(key.scalar_type(), false, /*copy=*/true);
  at::Tensor grad_neg =
      p.has_neg ? grad_keys.narrow(0, p.M, p.E).to(negatives->scalar_type(), false, true)
                : query.new_empty({0});
  return {grad_key, grad_neg};
}

// The backward's per-row inputs, checked and converted to the accumulation type on the
// embeddings' device: grad_row and row_lse (N), and grad_col and col_lse (M) when symmetric.
struct InfoNceBackwardInputs {
  at::Tensor grad_row, row_lse, grad_col, col_lse;
};

inline InfoNceBackwardInputs prepare_info_nce_backward(
    const InfoNceProblem& p, const at::Tensor& grad_row, const at::Tensor& row_lse,
    const at::Tensor& grad_col, const at::Tensor& col_lse, bool symmetric, const char* op) {
  TORCH_CHECK(grad_row.numel() == p.N && row_lse.numel() == p.N, "fusedloss.", op,
              ": grad_row and row_lse must have N = ", p.N, " entries");
  if (symmetric) {
    TORCH_CHECK(grad_col.numel() == p.M && col_lse.numel() == p.M, "fusedloss.", op,
                ": grad_col and col_lse must have M = ", p.M, " entries");
  }
  auto acc = [&](const at::Tensor& t) { return t.to(p.q.device(), p.acc).contiguous(); };
  return {acc(grad_row), acc(row_lse), symmetric ? acc(grad_col) : at::Tensor(),
          symmetric ? acc(col_lse) : at::Tensor()};
}

// The forward's column outputs from the merged (max, sum-exp) statistics and the diagonal
// logits: (col_loss, col_lse), both empty unless symmetric.
inline std::pair<at::Tensor, at::Tensor> finish_info_nce_columns(
    const at::Tensor& col_max, const at::Tensor& col_sum, const at::Tensor& diag,
    bool symmetric) {
  if (!symmetric) return {col_max.new_empty({0}), col_max.new_empty({0})};
  at::Tensor col_lse = col_max + col_sum.log();
  return {col_lse - diag, col_lse};
}

}  // namespace fusedloss
