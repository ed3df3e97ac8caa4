// The host side of jsd: checks, outputs, JsdArgs packing, and the launch of the CPU kernel
// (cpu/jsd.h). The loss is returned in the accumulation type, as cross_entropy's
// (linear_jsd sums chunks of it).
#pragma once

#include <c10/core/DeviceGuard.h>

#include <tuple>
#include <utility>

#include "common/device.h"
#include "common/host.h"
#include "common/op_boxing.h"
#include "cpu/jsd.h"
#include "cpu/launch.h"

namespace fusedloss {

template <class Device>
std::tuple<at::Tensor, at::Tensor, at::Tensor> jsd(const schema::jsd& a) {
  static_assert(Device::kType == kCPU, "jsd has a CPU kernel only (FUSEDLOSS_REGISTER_CPU_OPS)");
  constexpr const char* op = "jsd";
  TORCH_CHECK(a.student.device().type() == Device::kType, "fusedloss.", op, ": expected ",
              Device::kType, " tensors, got student on ", a.student.device());
  TORCH_CHECK(a.student.dim() == 2, "fusedloss.", op, ": student must be (N, V), got shape ",
              a.student.sizes());
  TORCH_CHECK(a.teacher.sizes() == a.student.sizes(), "fusedloss.", op,
              ": teacher must have the student's shape ", a.student.sizes(), ", got ",
              a.teacher.sizes());
  TORCH_CHECK(a.teacher.scalar_type() == a.student.scalar_type(), "fusedloss.", op,
              ": teacher has dtype ", a.teacher.scalar_type(), " but student has ",
              a.student.scalar_type());
  check_device(a.teacher, a.student, op, "teacher");
  check_reduction(a.reduction, op);
  TORCH_CHECK(a.beta >= 0.0 && a.beta <= 1.0, "fusedloss.", op, ": beta must be in [0, 1], got ",
              a.beta);
  TORCH_CHECK(a.temperature > 0.0, "fusedloss.", op, ": temperature must be > 0, got ",
              a.temperature);
  const int64_t N = a.student.size(0), V = a.student.size(1);
  TORCH_CHECK(V > 0, "fusedloss.", op, ": there must be at least one class");
  const c10::DeviceGuard device_guard(a.student.device());
  const at::Tensor student = a.student.contiguous(), teacher = a.teacher.contiguous();
  const at::ScalarType acc = acc_type_of(student.scalar_type());

  JsdArgs j{};
  j.dtype = dtype_of(student, op, "student");
  j.N = N;
  j.V = V;
  j.ignore_index = a.ignore_index;
  j.inv_temperature = 1.0 / a.temperature;
  at::Tensor target, row_weight;
  if (a.target.has_value() && a.target->defined()) {
    check_device(*a.target, student, op, "target");
    TORCH_CHECK(a.target->scalar_type() == at::kLong && a.target->numel() == N, "fusedloss.",
                op, ": target must hold ", N, " int64 entries, got ", a.target->scalar_type(),
                " of shape ", a.target->sizes());
    target = a.target->contiguous();
    j.target = target.const_data_ptr<int64_t>();
  }
  row_weight = row_vector(a.row_weight, N, acc, student, op, "row_weight");
  j.row_weight = row_weight.defined() ? row_weight.const_data_ptr() : nullptr;
  const at::Tensor loss_scale = device_scalar(a.loss_scale, acc, student, op, "loss_scale");
  j.loss_scale = loss_scale.const_data_ptr();
  at::Tensor rows = at::empty({N}, student.options().dtype(acc));
  j.loss_rows = rows.mutable_data_ptr();
  at::Tensor grad_student = a.grad_student ? Device::new_grad(student) : student.new_empty({0});
  at::Tensor grad_teacher = a.grad_teacher ? Device::new_grad(teacher) : teacher.new_empty({0});
  // The kernels know KL(teacher || student) (beta 0) and the mixture; reverse KL (beta 1)
  // is the former with the two sides swapped.
  const bool swap = a.beta == 1.0;
  j.beta = swap ? 0.0 : a.beta;
  j.student = (swap ? teacher : student).const_data_ptr();
  j.teacher = (swap ? student : teacher).const_data_ptr();
  void* gs = a.grad_student ? grad_student.mutable_data_ptr() : nullptr;
  void* gt = a.grad_teacher ? grad_teacher.mutable_data_ptr() : nullptr;
  j.grad_student = swap ? gt : gs;
  j.grad_teacher = swap ? gs : gt;
  if (N > 0) cpu::launch<JsdArgs>(j.dtype, j, N, cpu::grain_for(2 * V));
  at::Tensor loss = a.reduction == 0 ? rows : Device::sum_rows(rows, loss_scale, acc);
  return {loss, grad_student, grad_teacher};
}

// A CPU kernel only: on a GPU the op runs its Triton kernel.
FUSEDLOSS_REGISTER_CPU_OPS(jsd, m, Device) {
  FUSEDLOSS_IMPL(m, jsd, &jsd<Device>);
}

}  // namespace fusedloss
