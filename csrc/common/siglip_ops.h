// The host side of siglip_tile: checks, outputs, packing, and the launch of the CPU kernel
// (cpu/siglip.h). The tile comes from a GEMM in fusedloss/siglip.py (the composite op
// `siglip` loops over tiles); the kernel writes one value per row of each output, so the
// sums over a row's columns stay in one thread, in a fixed order.
#pragma once

#include <c10/core/DeviceGuard.h>

#include <tuple>

#include "common/device.h"
#include "common/host.h"
#include "common/op_boxing.h"
#include "cpu/launch.h"
#include "cpu/siglip.h"

namespace fusedloss {

template <class Device>
std::tuple<at::Tensor, at::Tensor, at::Tensor> siglip_tile(const schema::siglip_tile& a) {
  static_assert(Device::kType == kCPU,
                "siglip_tile has a CPU kernel only (FUSEDLOSS_REGISTER_CPU_OPS)");
  constexpr const char* op = "siglip_tile";
  const at::Tensor& dots = a.dots;
  TORCH_CHECK(dots.device().type() == Device::kType, "fusedloss.", op, ": expected ",
              Device::kType, " tensors, got dots on ", dots.device());
  TORCH_CHECK(dots.dim() == 2 && dots.is_contiguous(), "fusedloss.", op,
              ": dots must be a contiguous (rows, cols) tile (the gradient is written over "
              "it), got shape ", dots.sizes());
  TORCH_CHECK(dots.scalar_type() == at::kFloat || dots.scalar_type() == at::kDouble,
              "fusedloss.", op, ": dots must be float32 or float64 (the accumulation "
              "type), got ", dots.scalar_type());
  const c10::DeviceGuard device_guard(dots.device());
  const at::ScalarType acc = dots.scalar_type();
  const int64_t R = dots.size(0), C = dots.size(1);
  const at::Tensor scale = device_scalar(a.logit_scale, acc, dots, op, "logit_scale");
  const at::Tensor bias = device_scalar(a.logit_bias, acc, dots, op, "logit_bias");
  const at::Tensor loss_scale = device_scalar(a.loss_scale, acc, dots, op, "loss_scale");
  const at::Tensor row_weight = row_vector(a.row_weight, R, acc, dots, op, "row_weight");
  const auto opts = dots.options();
  at::Tensor row_loss = at::empty({R}, opts);
  at::Tensor scale_rows = at::empty({a.compute_grad ? R : 0}, opts);
  at::Tensor bias_rows = at::empty({a.compute_grad ? R : 0}, opts);

  SiglipTileArgs s{};
  s.acc = acc == at::kDouble ? DType::kDouble : DType::kFloat;
  s.dots = dots.mutable_data_ptr();
  s.R = R;
  s.C = C;
  s.diagonal = a.diagonal;
  s.scale = scale.const_data_ptr();
  s.bias = bias.const_data_ptr();
  s.loss_scale = loss_scale.const_data_ptr();
  s.row_weight = row_weight.defined() ? row_weight.const_data_ptr() : nullptr;
  s.compute_grad = a.compute_grad;
  s.row_loss = row_loss.mutable_data_ptr();
  s.scale_rows = a.compute_grad ? scale_rows.mutable_data_ptr() : nullptr;
  s.bias_rows = a.compute_grad ? bias_rows.mutable_data_ptr() : nullptr;
  if (R > 0) cpu::launch<SiglipTileArgs>(s.acc, s, R, cpu::grain_for(C));
  return {row_loss, scale_rows, bias_rows};
}

// A CPU kernel only: on a GPU the op runs its Triton kernel.
FUSEDLOSS_REGISTER_CPU_OPS(siglip_tile, m, Device) {
  FUSEDLOSS_IMPL(m, siglip_tile, &siglip_tile<Device>);
}

}  // namespace fusedloss
