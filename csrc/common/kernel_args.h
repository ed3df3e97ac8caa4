// What a kernel launch reads, for the families with both CPU and CUDA kernels: plain data
// (pointers, sizes, scalars), packed once on the host by csrc/common/*_ops.h and read alike
// by the CPU kernels (csrc/cpu) and the CUDA kernels (csrc/cuda). A CPU-only family keeps
// its arguments beside its kernel, in csrc/cpu/<loss>.h. No tensor type appears here: the
// CPU translation units compiled for AVX2 / AVX-512 include it without the tensor headers.
#pragma once

#include <cstdint>

namespace fusedloss {

enum class DType : int { kFloat = 0, kDouble = 1, kBFloat16 = 2, kHalf = 3 };
constexpr int kNumDTypes = 4;

// ---------------------------------------------------------------- softmax rows
// cross_entropy, cross_entropy_inplace and focal_loss: one row r = b*S + s of the
// (B, C, S) input is x[b, :, s]. The algebra is in fusedloss/cross_entropy.py.
enum class RowMode : int {
  kCrossEntropyClass = 0,  // class-index target
  kCrossEntropyProb = 1,   // probability target (B, C, S)
  kFocal = 2,              // softmax focal loss, class-index target
};

struct RowArgs {
  RowMode mode;
  DType dtype;               // of x (and grad)
  const void* x;             // (B, C, S) contiguous
  void* grad;                // like x, may alias it; nullptr: no gradient
  const int64_t* target;     // class-index target (N,)
  const void* target_prob;   // probability target (B, C, S)
  bool target_prob_is_acc;   // its dtype is the accumulation type (else x's dtype)
  const void* weight;        // (C,) accumulation type, or nullptr
  const void* alpha;         // (C,) accumulation type, or nullptr (focal only)
  const void* row_weight;    // (N,) accumulation type, or nullptr: multiplies each row
  const void* loss_scale;    // 0-dim accumulation type: multiplies the gradient
  const void* weight_sum;    // 0-dim accumulation type, sum of weight; nullptr: C
  void* loss_rows;           // (N,) accumulation type, unscaled
  void* lse;                 // (N,) accumulation type, or nullptr
  void* entropy;             // (N,) accumulation type, or nullptr: not computed
  int64_t B, C, S, N;
  int64_t ignore_index;
  double label_smoothing, logit_scale, softcap, z_loss, gamma;
};

// ---------------------------------------------------------------- sigmoid focal
// Element-wise over n elements; the algebra is in fusedloss/sigmoid_focal.py.
struct SigmoidFocalArgs {
  DType dtype;               // of x, grad and loss
  const void* x;
  const void* target;
  bool target_is_acc;        // the target's dtype is the accumulation type (else x's)
  void* grad;                // like x, or nullptr
  void* loss;                // reduction none: (n,) of x's dtype (or acc); else nullptr
  bool loss_is_acc;          // the loss is in the accumulation type (the op's acc_loss)
  void* partials;            // reduction sum/mean: n_partials accumulation-type sums
  const void* loss_scale;    // 0-dim accumulation type: multiplies the gradient
  int64_t n, n_partials;
  double alpha, gamma;
};

// ---------------------------------------------------------------- InfoNCE blocks
// One block of InfoNCE similarities: rows row0 .. row0+nb-1 of the (N, K) matrix
// <query_i, keys_j>, K = M keys followed by E negatives, in the accumulation type.
// The algebra is in fusedloss/info_nce.py.
struct InfoNceBlockArgs {
  DType acc;                // kFloat or kDouble
  void* dots;               // (nb, K) row-major, without the scale
  int64_t row0, nb, K, M;
  const int64_t* labels;    // (N,) positive column per row, or nullptr (row i -> column i)
  const void* scale;        // 0-dim
  bool symmetric;           // column terms for j < M (labels absent, N == M)
  void* workspace;          // Device::info_nce_workspace(nb, M) values, or nullptr
  // forward
  void* row_lse;            // (N,)
  void* row_loss;           // (N,)
  void* diag;               // (M,) logits[j, j] (symmetric)
  void* col_max;            // (M,) running column max over the blocks so far
  void* col_sum;            // (M,) running sum of exp(logits - col_max)
  // backward: dots is overwritten with scale * dlogits
  const void* grad_row;     // (N,)
  const void* grad_col;     // (M,) (symmetric)
  const void* row_lse_in;   // (N,)
  const void* col_lse_in;   // (M,) (symmetric)
  void* scale_partial;      // (N,) sum_j dlogits[i, j] * dots[i, j]
};

}  // namespace fusedloss
