// The CPU launches behind the host code of csrc/common/*_ops.h: the same names as
// csrc/cuda/device.h, so the two read side by side. Definitions in csrc/cpu/device.cpp.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "common/kernel_args.h"

namespace fusedloss {
namespace cpu {

struct Device {
  static constexpr c10::DeviceType kType = c10::DeviceType::CPU;
  // Class indices are checked on the host (an IndexError): reading them costs no sync.
  static constexpr bool kChecksTargets = true;
  // InfoNCE: similarities per block, ~16 MiB of float32 (enough rows for the GEMM).
  static constexpr int64_t kInfoNceBlockValues = int64_t(1) << 22;

  // A gradient buffer like x (see device.cpp on its first touch).
  static at::Tensor new_grad(const at::Tensor& x);
  // (sum of rows) * scale (scale undefined: 1) as a 0-dim tensor of out_dtype, summed in
  // a fixed order whatever the thread count.
  static at::Tensor sum_rows(const at::Tensor& rows, const at::Tensor& scale,
                             at::ScalarType out_dtype);
  static void softmax_rows(const RowArgs& a);
  static int64_t sigmoid_focal_partials(int64_t n);
  static void sigmoid_focal(const SigmoidFocalArgs& a);
  static int64_t info_nce_workspace(int64_t block_rows, int64_t M);
  static void info_nce_rows_fwd(const InfoNceBlockArgs& a);
  static void info_nce_cols_fwd(const InfoNceBlockArgs& a);
  static void info_nce_rows_bwd(const InfoNceBlockArgs& a);
};

}  // namespace cpu
}  // namespace fusedloss
