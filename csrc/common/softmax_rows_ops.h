// The host side of cross_entropy, cross_entropy_inplace and focal_loss, for both devices:
// argument checks, outputs, RowArgs packing; `Device` (cpu::Device or cuda::Device) only
// launches. Nothing here reads a device value on the host: the loss scale and the weight
// sum stay on the tensors' device and the kernels read them, so a CUDA call never
// synchronises. A class index outside [0, C) that is not ignore_index makes its row NaN
// (checked up front, with an IndexError, where that costs nothing: Device::kChecksTargets).
#pragma once

#include <c10/core/DeviceGuard.h>

#include <tuple>
#include <utility>

#include "common/host.h"
#include "common/op_boxing.h"

namespace fusedloss {

struct SoftmaxRowsOutputs {
  at::Tensor rows, lse, entropy;  // (N,) accumulation type; lse, entropy may be undefined
  at::Tensor loss_scale;          // 0-dim accumulation type, on the rows' device
};

// The checks, outputs and launch shared by the three ops. `a` is any of their schemas
// (they share the argument names); x is a.x made contiguous, grad the gradient buffer (x
// itself in place), or undefined. Returns the unscaled loss rows, lse and entropy.
template <class Device, class A>
SoftmaxRowsOutputs run_softmax_rows(const A& a, RowMode mode, const at::Tensor& x,
                                    const at::Tensor& grad, const char* op) {
  TORCH_CHECK(x.device().type() == Device::kType, "fusedloss.", op, ": expected ",
              Device::kType, " tensors, got x on ", x.device());
  TORCH_CHECK(x.dim() == 3, "fusedloss.", op, ": x must be (B, C, S), got shape ", x.sizes());
  check_reduction(a.reduction, op);
  check_device(a.target, x, op, "target");
  check_device(a.loss_scale, x, op, "loss_scale");
  const c10::DeviceGuard device_guard(x.device());
  const at::ScalarType acc = acc_type_of(x.scalar_type());
  const int64_t B = x.size(0), C = x.size(1), S = x.size(2), N = B * S;
  TORCH_CHECK(C > 0, "fusedloss.", op, ": there must be at least one class");

  RowArgs r{};
  r.mode = mode;
  r.dtype = dtype_of(x, op, "x");
  r.x = x.const_data_ptr();
  r.grad = grad.defined() ? grad.mutable_data_ptr() : nullptr;
  r.B = B;
  r.C = C;
  r.S = S;
  r.N = N;
  r.ignore_index = a.ignore_index;

  at::Tensor target;
  if (mode == RowMode::kCrossEntropyProb) {
    TORCH_CHECK(a.target.sizes() == x.sizes(), "fusedloss.", op,
                ": a probability target must have the shape of x ", x.sizes(), ", got ",
                a.target.sizes());
    target = as_x_or_acc(a.target, x.scalar_type(), &r.target_prob_is_acc);
    r.target_prob = target.const_data_ptr();
  } else {
    TORCH_CHECK(!a.target.is_floating_point() && !a.target.is_complex() &&
                    a.target.scalar_type() != at::kBool,
                "fusedloss.", op, ": target must hold class indices (integer) or, for "
                "cross_entropy, probabilities (floating)");
    TORCH_CHECK(a.target.numel() == N, "fusedloss.", op, ": a class-index target must have ",
                N, " entries (B*S), got shape ", a.target.sizes());
    target = a.target.to(at::kLong).contiguous();
    if constexpr (Device::kChecksTargets) check_class_targets(target, C, a.ignore_index, op);
    r.target = target.const_data_ptr<int64_t>();
  }
  const at::Tensor weight = class_vector(a.weight, C, acc, x, op, "weight");
  r.weight = weight.defined() ? weight.const_data_ptr() : nullptr;

  SoftmaxRowsOutputs out;
  out.loss_scale = device_scalar(a.loss_scale, acc, x, op, "loss_scale");
  r.loss_scale = out.loss_scale.const_data_ptr();
  out.rows = at::empty({N}, x.options().dtype(acc));
  r.loss_rows = out.rows.mutable_data_ptr();
  at::Tensor alpha, row_weight;
  if constexpr (requires { a.alpha; }) {
    alpha = class_vector(a.alpha, C, acc, x, op, "alpha");
    r.alpha = alpha.defined() ? alpha.const_data_ptr() : nullptr;
    TORCH_CHECK(a.gamma >= 0.0, "fusedloss.", op, ": gamma must be >= 0, got ", a.gamma);
    r.gamma = a.gamma;
    r.logit_scale = 1.0;
  } else {
    TORCH_CHECK(a.label_smoothing >= 0.0 && a.label_smoothing <= 1.0, "fusedloss.", op,
                ": label_smoothing must be in [0, 1], got ", a.label_smoothing);
    TORCH_CHECK(a.softcap >= 0.0, "fusedloss.", op, ": softcap must be >= 0 (0: off), got ",
                a.softcap);
    r.label_smoothing = a.label_smoothing;
    r.logit_scale = a.logit_scale;
    r.softcap = a.softcap;
    r.z_loss = a.z_loss;
    out.lse = at::empty({N}, x.options().dtype(acc));
    r.lse = out.lse.mutable_data_ptr();
    out.entropy = at::empty({a.compute_entropy ? N : 0}, x.options().dtype(acc));
    r.entropy = a.compute_entropy ? out.entropy.mutable_data_ptr() : nullptr;
    row_weight = row_vector(a.row_weight, N, acc, x, op, "row_weight");
    r.row_weight = row_weight.defined() ? row_weight.const_data_ptr() : nullptr;
  }
  // Only label smoothing reads sum_c w_c (W in the algebra).
  const at::Tensor weight_sum =
      weight.defined() && r.label_smoothing > 0 ? weight.sum() : at::Tensor();
  r.weight_sum = weight_sum.defined() ? weight_sum.const_data_ptr() : nullptr;
  Device::softmax_rows(r);
  return out;
}

// The loss output, in the accumulation type: the rows themselves (reduction none) or
// their sum times loss_scale.
template <class Device>
at::Tensor reduce_loss(int64_t reduction, const SoftmaxRowsOutputs& o) {
  if (reduction == 0) return o.rows;
  return Device::sum_rows(o.rows, o.loss_scale, o.rows.scalar_type());
}

inline RowMode cross_entropy_mode(const at::Tensor& target) {
  return target.is_floating_point() ? RowMode::kCrossEntropyProb
                                    : RowMode::kCrossEntropyClass;
}

// The three ops return the loss in the accumulation type: linear_cross_entropy sums
// chunks of it, and the functions round it to the input's dtype (not under autocast).
template <class Device>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cross_entropy(
    const schema::cross_entropy& a) {
  const at::Tensor x = a.x.contiguous();
  const at::Tensor grad = a.compute_grad ? Device::new_grad(x) : at::Tensor();
  SoftmaxRowsOutputs o = run_softmax_rows<Device>(a, cross_entropy_mode(a.target), x, grad,
                                                  "cross_entropy");
  return {reduce_loss<Device>(a.reduction, o), o.lse, o.entropy,
          a.compute_grad ? grad : x.new_empty({0})};
}

template <class Device>
std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_inplace(
    const schema::cross_entropy_inplace& a) {
  TORCH_CHECK(a.x.is_contiguous(), "fusedloss.cross_entropy_inplace: x must be contiguous "
              "(the gradient is written over it)");
  SoftmaxRowsOutputs o = run_softmax_rows<Device>(a, cross_entropy_mode(a.target), a.x, a.x,
                                                  "cross_entropy_inplace");
  return {reduce_loss<Device>(a.reduction, o), o.lse, o.entropy};
}

template <class Device>
std::tuple<at::Tensor, at::Tensor> focal_loss(const schema::focal_loss& a) {
  const at::Tensor x = a.x.contiguous();
  const at::Tensor grad = a.compute_grad ? Device::new_grad(x) : at::Tensor();
  SoftmaxRowsOutputs o = run_softmax_rows<Device>(a, RowMode::kFocal, x, grad, "focal_loss");
  return {reduce_loss<Device>(a.reduction, o),
          a.compute_grad ? grad : x.new_empty({0})};
}

FUSEDLOSS_REGISTER_OPS(softmax_rows, m, Device) {
  FUSEDLOSS_IMPL(m, cross_entropy, &cross_entropy<Device>);
  FUSEDLOSS_IMPL(m, cross_entropy_inplace, &cross_entropy_inplace<Device>);
  FUSEDLOSS_IMPL(m, focal_loss, &focal_loss<Device>);
}

}  // namespace fusedloss
