// Every op's kernel for one device, registered from that device's TORCH_LIBRARY_IMPL
// (csrc/cpu/register.cpp, csrc/cuda/register.cpp).
#pragma once

#include "common/info_nce_ops.h"
#include "common/jsd_ops.h"
#include "common/sigmoid_focal_ops.h"
#include "common/siglip_ops.h"
#include "common/softmax_rows_ops.h"

namespace fusedloss {

template <class Device>
void register_ops(torch::Library& m) {
  FUSEDLOSS_IMPL(m, cross_entropy, &cross_entropy<Device>);
  FUSEDLOSS_IMPL(m, cross_entropy_inplace, &cross_entropy_inplace<Device>);
  FUSEDLOSS_IMPL(m, focal_loss, &focal_loss<Device>);
  FUSEDLOSS_IMPL(m, sigmoid_focal_loss, &sigmoid_focal_loss<Device>);
  FUSEDLOSS_IMPL(m, info_nce, &info_nce<Device>);
  FUSEDLOSS_IMPL(m, info_nce_backward, &info_nce_backward<Device>);
  // CPU-only kernels (on a GPU these ops run their Triton kernels).
  if constexpr (Device::kType == kCPU) {
    FUSEDLOSS_IMPL(m, jsd, &jsd<Device>);
    FUSEDLOSS_IMPL(m, siglip_tile, &siglip_tile<Device>);
  }
}

}  // namespace fusedloss
