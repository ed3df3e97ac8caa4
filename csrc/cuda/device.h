// The CUDA launches behind the host code of csrc/common/*_ops.h: the same names as
// csrc/cpu/device.h, so the two read side by side. Every launch goes to the current
// stream of the current device (the host code sets it to the tensors' device), and none
// reads a device value on the host. Definitions in the .cu files of this folder.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "common/kernel_args.h"

namespace fusedloss {
namespace cuda {

struct Device {
  static constexpr c10::DeviceType kType = c10::DeviceType::CUDA;
  // Class indices are not checked on the host (that would synchronise): an index
  // outside [0, C) that is not ignore_index gives its row a NaN loss and gradient.
  static constexpr bool kChecksTargets = false;
  // InfoNCE: similarities per block, ~128 MiB of float32.
  static constexpr int64_t kInfoNceBlockValues = int64_t(1) << 25;

  static at::Tensor new_grad(const at::Tensor& x);                       // device.cu
  static at::Tensor sum_rows(const at::Tensor& rows, const at::Tensor& scale,
                             at::ScalarType out_dtype);                  // device.cu
  static void softmax_rows(const RowArgs& a);                            // softmax_rows.cu
  static int64_t sigmoid_focal_partials(int64_t n);                      // sigmoid_focal.cu
  static void sigmoid_focal(const SigmoidFocalArgs& a);                  // sigmoid_focal.cu
  static int64_t info_nce_workspace(int64_t block_rows, int64_t M);      // info_nce.cu
  static void info_nce_rows_fwd(const InfoNceBlockArgs& a);              // info_nce.cu
  static void info_nce_cols_fwd(const InfoNceBlockArgs& a);              // info_nce.cu
  static void info_nce_rows_bwd(const InfoNceBlockArgs& a);              // info_nce.cu
};

}  // namespace cuda
}  // namespace fusedloss
