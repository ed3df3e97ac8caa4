// What the host code of csrc/common/*_ops.h asks of a device: its buffers and sums, and
// the launches of the families with kernels on both devices, declared once here for both
// (a CPU-only family launches its kernel through cpu/launch.h instead). The members of
// Device<kCPU> are defined in csrc/cpu/device.cpp, those of Device<kCUDA> in the .cu files
// of csrc/cuda, with the same names, so the two read side by side. A CUDA launch goes to
// the current stream of the current device (the host code sets it to the tensors'), and
// none reads a device value on the host.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "common/kernel_args.h"

namespace fusedloss {

constexpr c10::DeviceType kCPU = c10::DeviceType::CPU;
constexpr c10::DeviceType kCUDA = c10::DeviceType::CUDA;

template <c10::DeviceType kDevice>
struct Device {
  static constexpr c10::DeviceType kType = kDevice;
  // Class indices are checked on the host (an IndexError) where reading them costs no
  // synchronisation: on the CPU. On a GPU an index outside [0, C) that is not
  // ignore_index gives its row a NaN loss and gradient instead.
  static constexpr bool kChecksTargets = kDevice == kCPU;
  // InfoNCE: similarities per block (float32: ~16 MiB on the CPU, ~128 MiB on a GPU).
  static constexpr int64_t kInfoNceBlockValues = int64_t(1) << (kDevice == kCPU ? 22 : 25);

  // A gradient buffer like x, contiguous.
  static at::Tensor new_grad(const at::Tensor& x);
  // (sum of rows) * scale (undefined scale: 1) as a 0-dim tensor of out_dtype, summed in
  // a fixed order (independent of threads and timing).
  static at::Tensor sum_rows(const at::Tensor& rows, const at::Tensor& scale,
                             at::ScalarType out_dtype);
  static void softmax_rows(const RowArgs& a);
  // How many partial sums sigmoid_focal writes with a reduction.
  static int64_t sigmoid_focal_partials(int64_t n);
  static void sigmoid_focal(const SigmoidFocalArgs& a);
  // Values of InfoNceBlockArgs::workspace that info_nce_cols_fwd needs (0: none).
  static int64_t info_nce_workspace(int64_t block_rows, int64_t M);
  static void info_nce_rows_fwd(const InfoNceBlockArgs& a);
  static void info_nce_cols_fwd(const InfoNceBlockArgs& a);
  static void info_nce_rows_bwd(const InfoNceBlockArgs& a);
};

}  // namespace fusedloss
