// The host side of sigmoid_focal_loss, for both devices: checks, outputs, packing; the
// Device launches. With a reduction the kernel writes Device::sigmoid_focal_partials(n)
// partial sums in a fixed order, and Device::sum_rows adds them up: no atomics.
#pragma once

#include <c10/core/DeviceGuard.h>

#include <tuple>

#include "common/host.h"
#include "common/op_boxing.h"

namespace fusedloss {

template <class Device>
std::tuple<at::Tensor, at::Tensor> sigmoid_focal_loss(const schema::sigmoid_focal_loss& a) {
  constexpr const char* op = "sigmoid_focal_loss";
  TORCH_CHECK(a.x.device().type() == Device::kType, "fusedloss.", op, ": expected ",
              Device::kType, " tensors, got x on ", a.x.device());
  check_reduction(a.reduction, op);
  TORCH_CHECK(a.gamma >= 0.0, "fusedloss.", op, ": gamma must be >= 0, got ", a.gamma);
  TORCH_CHECK(a.target.is_floating_point(), "fusedloss.", op,
              ": target must be a floating tensor of 0/1 (or soft) labels");
  TORCH_CHECK(a.target.numel() == a.x.numel(), "fusedloss.", op,
              ": target must have the shape of x ", a.x.sizes(), ", got ", a.target.sizes());
  check_device(a.target, a.x, op, "target");
  const c10::DeviceGuard device_guard(a.x.device());
  const at::Tensor x = a.x.contiguous();
  const at::ScalarType acc = acc_type_of(x.scalar_type());
  const int64_t n = x.numel();

  SigmoidFocalArgs s{};
  s.dtype = dtype_of(x, op, "x");
  s.x = x.const_data_ptr();
  const at::Tensor target = as_x_or_acc(a.target, x.scalar_type(), &s.target_is_acc);
  s.target = target.const_data_ptr();
  s.n = n;
  s.alpha = a.alpha;
  s.gamma = a.gamma;
  const at::Tensor loss_scale = device_scalar(a.loss_scale, acc, x, op, "loss_scale");
  s.loss_scale = loss_scale.const_data_ptr();

  at::Tensor grad = a.compute_grad ? Device::new_grad(x) : x.new_empty({0});
  s.grad = a.compute_grad ? grad.mutable_data_ptr() : nullptr;
  at::Tensor loss, partials;
  const at::ScalarType loss_dtype = a.acc_loss ? acc : x.scalar_type();
  if (a.reduction == 0) {
    loss = at::empty({n}, x.options().dtype(loss_dtype));
    s.loss = loss.mutable_data_ptr();
    s.loss_is_acc = a.acc_loss;
  } else {
    s.n_partials = Device::sigmoid_focal_partials(n);
    partials = at::zeros({s.n_partials}, x.options().dtype(acc));
    s.partials = partials.mutable_data_ptr();
  }
  if (n > 0) Device::sigmoid_focal(s);
  if (a.reduction != 0) loss = Device::sum_rows(partials, loss_scale, loss_dtype);
  return {loss, grad};
}

FUSEDLOSS_REGISTER_OPS(sigmoid_focal, m, Device) {
  FUSEDLOSS_IMPL(m, sigmoid_focal_loss, &sigmoid_focal_loss<Device>);
}

}  // namespace fusedloss
