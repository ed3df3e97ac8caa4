// The host side of the token log-probs ops: checks, outputs, LogProbsArgs packing, and
// the launches of the CPU kernels (cpu/log_probs.h) and the CUDA ones (cuda/log_probs.cu).
// Outputs are in the accumulation type.
#pragma once

#include <c10/core/DeviceGuard.h>

#include <tuple>
#include <vector>

#include "common/device.h"
#include "common/host.h"
#include "common/op_boxing.h"
#include "cpu/launch.h"
#include "cpu/log_probs.h"

namespace fusedloss {

// The CUDA launches (cuda/log_probs.cu), on the current stream.
void log_probs_forward_cuda(const LogProbsArgs& a);
void log_probs_backward_cuda(const LogProbsArgs& a);

// The arguments every log-probs op shares (the schema's _ROW_ARGS), checked and packed;
// `keep` holds the tensors the pointers read.
template <class Device, class A>
LogProbsArgs log_probs_args(const A& a, const at::Tensor& x, const char* op,
                            std::vector<at::Tensor>& keep) {
  TORCH_CHECK(x.device().type() == Device::kType, "fusedloss.", op, ": expected ",
              Device::kType, " tensors, got x on ", x.device());
  TORCH_CHECK(x.dim() == 2 && x.size(1) > 0, "fusedloss.", op,
              ": x must be (N, V) with V >= 1, got shape ", x.sizes());
  TORCH_CHECK(x.is_contiguous(), "fusedloss.", op, ": x must be contiguous");
  const int64_t N = x.size(0), V = x.size(1);
  const at::ScalarType acc = acc_type_of(x.scalar_type());
  check_device(a.target, x, op, "target");
  TORCH_CHECK(a.target.scalar_type() == at::kLong && a.target.numel() == N, "fusedloss.", op,
              ": target must hold ", N, " int64 entries, got ", a.target.scalar_type(),
              " of shape ", a.target.sizes());
  keep.push_back(a.target.contiguous());
  // On a GPU that check would read the targets on the host: a bad one gives NaN instead.
  if constexpr (Device::kChecksTargets) check_class_targets(keep.back(), V, a.ignore_index, op);
  LogProbsArgs l{};
  l.dtype = dtype_of(x, op, "x");
  l.N = N;
  l.V = V;
  l.ignore_index = a.ignore_index;
  l.inv_temperature = a.inv_temperature;
  l.logit_scale = a.logit_scale;
  l.softcap = a.softcap;
  l.target = keep.back().template const_data_ptr<int64_t>();
  const at::Tensor row_t = row_vector(a.row_inv_temperature, N, acc, x, op,
                                      "row_inv_temperature");
  if (row_t.defined()) {
    keep.push_back(row_t);
    l.row_inv_temperature = row_t.const_data_ptr();
  }
  return l;
}

template <class Device>
void launch_log_probs(const LogProbsArgs& l, bool forward) {
  if (l.N == 0) return;
  if constexpr (Device::kType == kCPU) {
    if (forward) cpu::launch<LogProbsForward>(l.dtype, l, l.N, cpu::grain_for(2 * l.V));
    else cpu::launch<LogProbsBackward>(l.dtype, l, l.N, cpu::grain_for(l.V));
  } else {
    if (forward) log_probs_forward_cuda(l);
    else log_probs_backward_cuda(l);
  }
}

template <class Device>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> log_probs(
    const schema::log_probs& a) {
  constexpr const char* op = "log_probs";
  const c10::DeviceGuard device_guard(a.x.device());
  std::vector<at::Tensor> keep;
  LogProbsArgs l = log_probs_args<Device>(a, a.x, op, keep);
  l.x = a.x.const_data_ptr();
  const auto acc = a.x.options().dtype(acc_type_of(a.x.scalar_type()));
  auto rows = [&](bool want, at::TensorOptions o) { return at::empty({want ? l.N : 0}, o); };
  at::Tensor lp = rows(true, acc), ent = rows(a.compute_entropy, acc), lse = rows(true, acc),
             lsq = rows(a.compute_log_sum_sq, acc), mean = rows(a.compute_mean, acc),
             top1 = rows(a.compute_top1, acc.dtype(at::kBool));
  auto ptr = [](at::Tensor& t) { return t.numel() ? t.mutable_data_ptr() : nullptr; };
  l.log_probs = ptr(lp);
  l.entropy = ptr(ent);
  l.lse = ptr(lse);
  l.log_sum_sq = ptr(lsq);
  l.mean = ptr(mean);
  l.is_top1 = top1.numel() ? top1.mutable_data_ptr<bool>() : nullptr;
  launch_log_probs<Device>(l, true);
  return {lp, ent, lse, lsq, mean, top1};
}

// d (sum g log_probs + h entropy) / d x into `grad` (a new buffer, or x itself).
template <class Device, class A>
void log_probs_grad_into(const A& a, const at::Tensor& grad, const char* op) {
  const c10::DeviceGuard device_guard(a.x.device());
  std::vector<at::Tensor> keep;
  LogProbsArgs l = log_probs_args<Device>(a, a.x, op, keep);
  const at::ScalarType acc = acc_type_of(a.x.scalar_type());
  auto row = [&](const std::optional<at::Tensor>& v, const char* name) -> const void* {
    const at::Tensor t = row_vector(v, l.N, acc, a.x, op, name);
    if (!t.defined()) return nullptr;
    keep.push_back(t);
    return t.const_data_ptr();
  };
  l.x = a.x.const_data_ptr();
  l.grad = grad.mutable_data_ptr();
  l.lse_in = row(a.lse, "lse");
  l.grad_log_probs = row(a.grad_log_probs, "grad_log_probs");
  l.grad_entropy = row(a.grad_entropy, "grad_entropy");
  l.entropy_in = row(a.entropy, "entropy");
  l.grad_lse = row(a.grad_lse, "grad_lse");
  l.grad_mean = row(a.grad_mean_logits, "grad_mean_logits");
  TORCH_CHECK(l.lse_in != nullptr, "fusedloss.", op, ": lse must hold one value per row");
  TORCH_CHECK(l.grad_entropy == nullptr || l.entropy_in != nullptr, "fusedloss.", op,
              ": a gradient for the entropy needs the entropy");
  launch_log_probs<Device>(l, false);
}

template <class Device>
std::tuple<at::Tensor> log_probs_grad(const schema::log_probs_grad& a) {
  at::Tensor grad = at::empty_like(a.x, at::MemoryFormat::Contiguous);
  log_probs_grad_into<Device>(a, grad, "log_probs_grad");
  return {grad};
}

template <class Device>
std::tuple<> log_probs_grad_inplace(const schema::log_probs_grad_inplace& a) {
  log_probs_grad_into<Device>(a, a.x, "log_probs_grad_inplace");
  return {};
}

FUSEDLOSS_REGISTER_OPS(log_probs, m, Device) {
  FUSEDLOSS_IMPL(m, log_probs, &log_probs<Device>);
  FUSEDLOSS_IMPL(m, log_probs_grad, &log_probs_grad<Device>);
  FUSEDLOSS_IMPL(m, log_probs_grad_inplace, &log_probs_grad_inplace<Device>);
}

}  // namespace fusedloss
