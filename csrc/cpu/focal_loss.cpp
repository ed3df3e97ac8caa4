// CPU implementations of fusedloss::focal_loss (softmax focal, class-index targets) and
// fusedloss::sigmoid_focal_loss (element-wise); the math is in rowwise_impl.h and
// common/loss_math.h. Threading and determinism as in cross_entropy.cpp.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu/kernels.h"
#include "cpu/ops_common.h"

namespace fusedloss {
namespace cpu {
namespace {

std::tuple<at::Tensor, at::Tensor> focal_loss_cpu(
    const at::Tensor& x_in, const at::Tensor& target, const std::optional<at::Tensor>& alpha,
    const std::optional<at::Tensor>& weight, const at::Tensor& loss_scale, double gamma,
    int64_t ignore_index, int64_t reduction, bool compute_grad) {
  constexpr const char* op = "focal_loss";
  // Kernel level: the tensor ops below must not record autograd history.
  at::AutoDispatchBelowADInplaceOrView guard;
  TORCH_CHECK(x_in.device().is_cpu(), "fusedloss.", op, ": expected CPU tensors");
  TORCH_CHECK(x_in.dim() == 3, "fusedloss.", op, ": x must be (B, C, S), got shape ",
              x_in.sizes());
  check_reduction(reduction, op);
  TORCH_CHECK(gamma >= 0.0, "fusedloss.", op, ": gamma must be >= 0, got ", gamma);
  TORCH_CHECK(!target.is_floating_point() && !target.is_complex() &&
                  target.scalar_type() != at::kBool,
              "fusedloss.", op, ": target must hold class indices (integer)");
  const at::Tensor x = x_in.contiguous();
  const DType dt = dtype_of(x, op);
  const at::ScalarType acc = acc_type_of(x.scalar_type());
  const int64_t B = x.size(0), C = x.size(1), S = x.size(2), N = B * S;
  TORCH_CHECK(C > 0, "fusedloss.", op, ": there must be at least one class");
  TORCH_CHECK(target.numel() == N, "fusedloss.", op, ": target must have ", N,
              " entries (B*S), got shape ", target.sizes());
  const at::Tensor target_c = target.to(at::kLong).contiguous();
  check_class_targets(target_c, C, ignore_index, op);
  const at::Tensor w = class_vector(weight, C, acc, op, "weight");
  const at::Tensor al = class_vector(alpha, C, acc, op, "alpha");

  RowLossArgs a{};
  a.mode = RowMode::kFocal;
  a.x = x.const_data_ptr();
  a.target = target_c.const_data_ptr<int64_t>();
  a.weight = w.defined() ? w.const_data_ptr() : nullptr;
  a.alpha = al.defined() ? al.const_data_ptr() : nullptr;
  a.B = B;
  a.C = C;
  a.S = S;
  a.ignore_index = ignore_index;
  a.logit_scale = 1.0;
  a.gamma = gamma;
  a.loss_scale = scalar_value(loss_scale, op, "loss_scale");
  a.weight_sum = double(C);

  at::Tensor loss_rows = at::empty({N}, x.options().dtype(acc));
  at::Tensor grad = compute_grad ? empty_for_first_touch(x) : x.new_empty({0});
  a.loss_rows = loss_rows.mutable_data_ptr();
  a.grad = compute_grad ? grad.mutable_data_ptr() : nullptr;

  const KernelTable& k = kernel_table();
  const int64_t lanes = S > 1 ? k.lanes[int(dt)] : 1;
  const int64_t items = S > 1 ? B * ((S + lanes - 1) / lanes) : N;
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 15) / (C * lanes));
  const RowLossFn fn = k.row_loss[int(dt)];
  at::parallel_for(0, items, grain, [&](int64_t begin, int64_t end) { fn(a, begin, end); });
  return {reduce_rows(loss_rows, reduction, a.loss_scale, x.scalar_type()), grad};
}

std::tuple<at::Tensor, at::Tensor> sigmoid_focal_loss_cpu(
    const at::Tensor& x_in, const at::Tensor& target, const at::Tensor& loss_scale,
    double alpha, double gamma, int64_t reduction, bool compute_grad) {
  constexpr const char* op = "sigmoid_focal_loss";
  // Kernel level: the tensor ops below must not record autograd history.
  at::AutoDispatchBelowADInplaceOrView guard;
  TORCH_CHECK(x_in.device().is_cpu(), "fusedloss.", op, ": expected CPU tensors");
  check_reduction(reduction, op);
  TORCH_CHECK(gamma >= 0.0, "fusedloss.", op, ": gamma must be >= 0, got ", gamma);
  TORCH_CHECK(target.is_floating_point(), "fusedloss.", op,
              ": target must be a floating tensor of 0/1 (or soft) labels");
  TORCH_CHECK(target.numel() == x_in.numel(), "fusedloss.", op,
              ": target must have the shape of x ", x_in.sizes(), ", got ", target.sizes());
  const at::Tensor x = x_in.contiguous();
  const DType dt = dtype_of(x, op);
  const at::ScalarType acc = acc_type_of(x.scalar_type());
  const at::Tensor t = target.scalar_type() == x.scalar_type() ? target.contiguous()
                                                               : target.to(acc).contiguous();
  const int64_t n = x.numel();
  const int64_t chunks = (n + kSigmoidFocalChunk - 1) / kSigmoidFocalChunk;

  SigmoidFocalArgs a{};
  a.x = x.const_data_ptr();
  a.target = t.const_data_ptr();
  a.target_is_acc = t.scalar_type() != x.scalar_type();
  a.n = n;
  a.alpha = alpha;
  a.gamma = gamma;
  a.loss_scale = scalar_value(loss_scale, op, "loss_scale");

  at::Tensor grad = compute_grad ? empty_for_first_touch(x) : x.new_empty({0});
  a.grad = compute_grad ? grad.mutable_data_ptr() : nullptr;
  at::Tensor loss, partials;
  if (reduction == 0) {
    loss = at::empty({n}, x.options());
    a.loss = loss.mutable_data_ptr();
  } else {
    partials = at::empty({chunks}, x.options().dtype(acc));
    a.partials = partials.mutable_data_ptr();
  }
  const SigmoidFocalFn fn = kernel_table().sigmoid_focal[int(dt)];
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) { fn(a, begin, end); });
  if (reduction != 0) loss = reduce_rows(partials, reduction, a.loss_scale, x.scalar_type());
  return {loss, grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedloss, CPU, m) {
  m.impl("focal_loss", &focal_loss_cpu);
  m.impl("sigmoid_focal_loss", &sigmoid_focal_loss_cpu);
}

}  // namespace cpu
}  // namespace fusedloss
