// The vectorised CPU kernels, compiled once per instruction set (isa_default.cpp,
// isa_avx2.cpp, isa_avx512.cpp, each including cpu/isa_kernels.h) and picked at run time
// as ATen picks its own. Plain data only crosses this interface (common/kernel_args.h):
// the per-ISA translation units see no at::Tensor, so no inline function of the tensor
// headers is ever compiled with AVX-512 instructions.
#pragma once

#include <cstdint>

#include "common/kernel_args.h"

namespace fusedloss {
namespace cpu {

// Rows [begin, end) of a softmax row launch; items are rows when S == 1 and tiles of
// `lanes` consecutive s when S > 1 (the vector lanes then run across rows).
using SoftmaxRowsFn = void (*)(const RowArgs&, int64_t begin, int64_t end);
// Chunks [begin, end) of kSigmoidFocalChunk elements.
using SigmoidFocalFn = void (*)(const SigmoidFocalArgs&, int64_t begin, int64_t end);
// Rows (forward lse / loss / diagonal; backward dlogits) or columns [begin, end) of a
// block of InfoNCE similarities.
using InfoNceFn = void (*)(const InfoNceBlockArgs&, int64_t begin, int64_t end);
// Rows [begin, end) of a JSD launch.
using JsdFn = void (*)(const JsdArgs&, int64_t begin, int64_t end);
// Rows [begin, end) of a SigLIP tile.
using SiglipTileFn = void (*)(const SiglipTileArgs&, int64_t begin, int64_t end);

constexpr int64_t kSigmoidFocalChunk = 4096;

struct KernelTable {
  const char* isa;
  SoftmaxRowsFn softmax_rows[kNumDTypes];
  SigmoidFocalFn sigmoid_focal[kNumDTypes];
  int64_t lanes[kNumDTypes];      // tile width of the S > 1 softmax rows per dtype
  InfoNceFn info_nce_rows_fwd[2];  // [0]: float32, [1]: float64
  InfoNceFn info_nce_cols_fwd[2];
  InfoNceFn info_nce_rows_bwd[2];
  JsdFn jsd_rows[kNumDTypes];
  SiglipTileFn siglip_tile[2];     // [0]: float32, [1]: float64
};

const KernelTable& kernel_table_default();
const KernelTable& kernel_table_avx2();    // all-null entries where not built (not x86)
const KernelTable& kernel_table_avx512();

}  // namespace cpu
}  // namespace fusedloss
