// The interface between the CPU op implementations (cross_entropy.cpp, focal_loss.cpp,
// info_nce.cpp: tensors, checks, threading) and the vectorised kernels (rowwise_impl.h),
// which are compiled once per instruction set (rowwise_default.cpp, rowwise_x86_avx2.cpp,
// rowwise_x86_avx512.cpp) and picked at run time, as ATen does for its own CPU kernels.
//
// Plain data only: the per-ISA translation units see no at::Tensor, so no inline
// function of the tensor headers is ever compiled with AVX-512 instructions.
#pragma once

#include <cstdint>

namespace fusedloss {
namespace cpu {

enum class DType : int { kFloat = 0, kDouble = 1, kBFloat16 = 2, kHalf = 3 };
constexpr int kNumDTypes = 4;

enum class RowMode : int {
  kCrossEntropyClass = 0,  // class-index target
  kCrossEntropyProb = 1,   // probability target (B, C, S)
  kFocal = 2,              // softmax focal loss, class-index target
};

// One call of a row kernel: x is (B, C, S) contiguous, row r = b*S + s is x[b, :, s].
// Work items are rows when S == 1 and tiles of `lanes` consecutive s when S > 1 (the
// vector lanes then run across rows, so the strided class axis is read contiguously).
struct RowLossArgs {
  RowMode mode;
  const void* x;
  void* grad;                // (B, C, S) of x's dtype, may alias x; nullptr: no gradient
  const int64_t* target;     // class-index target (B*S,)
  const void* target_prob;   // probability target (B, C, S)
  bool target_prob_is_acc;   // its dtype is the accumulation type (else x's dtype)
  const void* weight;        // (C,) accumulation type, or nullptr
  const void* alpha;         // (C,) accumulation type, or nullptr (focal only)
  int64_t B, C, S;
  int64_t ignore_index;
  double label_smoothing, logit_scale, softcap, z_loss, gamma;
  double loss_scale;         // multiplies the gradient (the loss rows stay unscaled)
  double weight_sum;         // sum_c weight[c], or C without weights
  void* loss_rows;           // (B*S,) accumulation type
  void* lse;                 // (B*S,) accumulation type, or nullptr
};

// Element-wise sigmoid focal loss over n elements, in chunks of kSigmoidFocalChunk.
struct SigmoidFocalArgs {
  const void* x;
  const void* target;
  bool target_is_acc;
  void* grad;       // like x, or nullptr
  void* loss;       // reduction none: (n,) of x's dtype; else nullptr
  void* partials;   // reduction sum/mean: one accumulation-type sum per chunk; else nullptr
  int64_t n;
  double alpha, gamma, loss_scale;
};
constexpr int64_t kSigmoidFocalChunk = 4096;

// One block of InfoNCE logits: rows row0 .. row0+nb-1 of the (N, K) similarity matrix,
// K = M keys followed by E negatives, all in the accumulation type (float32 or float64).
struct InfoNceBlockArgs {
  void* dots;               // (nb, K) row-major <query_i, keys_j>, without the scale
  int64_t row0, nb, K, M;
  const int64_t* labels;    // (N,) positive column per row, or nullptr (row i -> column i)
  double scale;
  bool symmetric;           // column terms for j < M (labels absent, N == M)
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

using RowLossFn = void (*)(const RowLossArgs&, int64_t begin, int64_t end);
// Rows [begin, end) of the block (forward: lse, loss, diagonal; backward: dlogits).
using InfoNceRowsFn = void (*)(const InfoNceBlockArgs&, int64_t begin, int64_t end);
// Columns [begin, end) of the block, merged into the running column statistics.
using InfoNceColsFn = void (*)(const InfoNceBlockArgs&, int64_t begin, int64_t end);
using SigmoidFocalFn = void (*)(const SigmoidFocalArgs&, int64_t chunk_begin,
                                int64_t chunk_end);

struct KernelTable {
  const char* isa;
  RowLossFn row_loss[kNumDTypes];
  SigmoidFocalFn sigmoid_focal[kNumDTypes];
  int64_t lanes[kNumDTypes];  // tile width of the S > 1 path per dtype
  InfoNceRowsFn info_nce_rows_fwd[2];  // [0]: float32, [1]: float64
  InfoNceColsFn info_nce_cols_fwd[2];
  InfoNceRowsFn info_nce_rows_bwd[2];
};

const KernelTable& kernel_table_default();
const KernelTable& kernel_table_avx2();    // nullptr entries where not compiled for x86
const KernelTable& kernel_table_avx512();

// The table for this CPU (honours ATEN_CPU_CAPABILITY like ATen's own kernels).
const KernelTable& kernel_table();

}  // namespace cpu
}  // namespace fusedloss
