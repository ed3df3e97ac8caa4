// Every vectorised CPU kernel, and their table, for the instruction set the including
// translation unit chose (isa_*.cpp define CPU_CAPABILITY first). A new kernel family
// adds its header here and its entries to make_table.
#pragma once

#include "cpu/vec.h"  // first: the vector overloads of common/loss_math.h's primitives
#include "cpu/info_nce.h"
#include "cpu/jsd.h"
#include "cpu/kernel_table.h"
#include "cpu/sigmoid_focal.h"
#include "cpu/siglip.h"
#include "cpu/softmax_rows.h"

namespace fusedloss {
namespace cpu {
namespace CPU_CAPABILITY {

inline KernelTable make_table(const char* isa) {
  KernelTable t{};
  t.isa = isa;
  t.softmax_rows[int(DType::kFloat)] = &softmax_rows<float>;
  t.softmax_rows[int(DType::kDouble)] = &softmax_rows<double>;
  t.softmax_rows[int(DType::kBFloat16)] = &softmax_rows<c10::BFloat16>;
  t.softmax_rows[int(DType::kHalf)] = &softmax_rows<c10::Half>;
  t.sigmoid_focal[int(DType::kFloat)] = &sigmoid_focal<float>;
  t.sigmoid_focal[int(DType::kDouble)] = &sigmoid_focal<double>;
  t.sigmoid_focal[int(DType::kBFloat16)] = &sigmoid_focal<c10::BFloat16>;
  t.sigmoid_focal[int(DType::kHalf)] = &sigmoid_focal<c10::Half>;
  t.lanes[int(DType::kFloat)] = Vectorized<float>::size();
  t.lanes[int(DType::kDouble)] = Vectorized<double>::size();
  t.lanes[int(DType::kBFloat16)] = Vectorized<float>::size();
  t.lanes[int(DType::kHalf)] = Vectorized<float>::size();
  t.info_nce_rows_fwd[0] = &info_nce_rows_fwd<float>;
  t.info_nce_rows_fwd[1] = &info_nce_rows_fwd<double>;
  t.info_nce_cols_fwd[0] = &info_nce_cols_fwd<float>;
  t.info_nce_cols_fwd[1] = &info_nce_cols_fwd<double>;
  t.info_nce_rows_bwd[0] = &info_nce_rows_bwd<float>;
  t.info_nce_rows_bwd[1] = &info_nce_rows_bwd<double>;
  t.jsd_rows[int(DType::kFloat)] = &jsd_rows<float>;
  t.jsd_rows[int(DType::kDouble)] = &jsd_rows<double>;
  t.jsd_rows[int(DType::kBFloat16)] = &jsd_rows<c10::BFloat16>;
  t.jsd_rows[int(DType::kHalf)] = &jsd_rows<c10::Half>;
  t.siglip_tile[0] = &siglip_tile<float>;
  t.siglip_tile[1] = &siglip_tile<double>;
  return t;
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace fusedloss
