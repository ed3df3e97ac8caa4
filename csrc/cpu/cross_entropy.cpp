// CPU implementations of fusedloss::cross_entropy and fusedloss::cross_entropy_inplace:
// argument checks, output allocation and threading; the row math is in rowwise_impl.h.
//
// Threads split the rows (tiles of rows when S > 1) with at::parallel_for; every row is
// computed by one thread in a fixed order and the loss rows are summed by a fixed
// pairwise tree afterwards, so results do not depend on the number of threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include <string>

#include "cpu/kernels.h"
#include "cpu/ops_common.h"

namespace fusedloss {
namespace cpu {

const KernelTable& kernel_table() {
  static const KernelTable* table = [] {
    // ATen's choice honours ATEN_CPU_CAPABILITY; the CPUID check guards against a
    // libtorch that reports more than this CPU has. The x86 tables are only touched
    // after both agree (their code uses the instructions they are built for).
    const std::string cap = at::get_cpu_capability();
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
    __builtin_cpu_init();
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") &&
                        __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512vl") &&
                        __builtin_cpu_supports("avx512dq");
    if (cap == "AVX512" && avx512 && kernel_table_avx512().row_loss[0])
      return &kernel_table_avx512();
    if ((cap == "AVX512" || cap == "AVX2") && avx2 && kernel_table_avx2().row_loss[0])
      return &kernel_table_avx2();
#endif
    return &kernel_table_default();
  }();
  return *table;
}

namespace {

constexpr const char* kOp = "cross_entropy";

struct Outputs {
  at::Tensor loss, lse, grad;
};

// x: (B, C, S) contiguous; grad: the tensor the gradient goes to (may be x), or undefined.
Outputs run_cross_entropy(const at::Tensor& x, const at::Tensor& target,
                          const std::optional<at::Tensor>& weight,
                          const at::Tensor& loss_scale, int64_t ignore_index,
                          double label_smoothing, double logit_scale, double softcap,
                          double z_loss, int64_t reduction, const at::Tensor& grad,
                          const char* op) {
  // Kernel level: the tensor ops below must not record autograd history.
  at::AutoDispatchBelowADInplaceOrView guard;
  TORCH_CHECK(x.device().is_cpu(), "fusedloss.", op, ": expected CPU tensors");
  TORCH_CHECK(x.dim() == 3, "fusedloss.", op, ": x must be (B, C, S), got shape ", x.sizes());
  TORCH_CHECK(x.is_contiguous(), "fusedloss.", op, ": x must be contiguous");
  check_reduction(reduction, op);
  TORCH_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0, "fusedloss.", op,
              ": label_smoothing must be in [0, 1], got ", label_smoothing);
  TORCH_CHECK(softcap >= 0.0, "fusedloss.", op, ": softcap must be >= 0 (0: off), got ",
              softcap);
  const DType dt = dtype_of(x, op);
  const at::ScalarType acc = acc_type_of(x.scalar_type());
  const int64_t B = x.size(0), C = x.size(1), S = x.size(2), N = B * S;
  TORCH_CHECK(C > 0, "fusedloss.", op, ": there must be at least one class");

  RowLossArgs a{};
  a.x = x.const_data_ptr();
  a.B = B;
  a.C = C;
  a.S = S;
  a.ignore_index = ignore_index;
  a.label_smoothing = label_smoothing;
  a.logit_scale = logit_scale;
  a.softcap = softcap;
  a.z_loss = z_loss;
  a.loss_scale = scalar_value(loss_scale, op, "loss_scale");

  at::Tensor target_c;
  if (target.is_floating_point()) {
    TORCH_CHECK(target.sizes() == x.sizes(), "fusedloss.", op,
                ": a probability target must have the shape of x ", x.sizes(), ", got ",
                target.sizes());
    a.mode = RowMode::kCrossEntropyProb;
    // The kernel reads x's dtype or the accumulation type; anything else is converted.
    target_c = target.scalar_type() == x.scalar_type() ? target.contiguous()
                                                       : target.to(acc).contiguous();
    a.target_prob = target_c.const_data_ptr();
    a.target_prob_is_acc = target_c.scalar_type() != x.scalar_type();
  } else {
    TORCH_CHECK(!target.is_complex() && target.scalar_type() != at::kBool, "fusedloss.", op,
                ": target must hold class indices (integer) or probabilities (floating)");
    TORCH_CHECK(target.numel() == N, "fusedloss.", op, ": a class-index target must have ",
                N, " entries (B*S), got shape ", target.sizes());
    a.mode = RowMode::kCrossEntropyClass;
    target_c = target.to(at::kLong).contiguous();
    check_class_targets(target_c, C, ignore_index, op);
    a.target = target_c.const_data_ptr<int64_t>();
  }

  const at::Tensor w = class_vector(weight, C, acc, op, "weight");
  a.weight = w.defined() ? w.const_data_ptr() : nullptr;
  a.weight_sum = w.defined() ? w.to(at::kDouble).sum().item<double>() : double(C);

  Outputs out;
  at::Tensor loss_rows = at::empty({N}, x.options().dtype(acc));
  out.lse = at::empty({N}, x.options().dtype(acc));
  a.loss_rows = loss_rows.mutable_data_ptr();
  a.lse = out.lse.mutable_data_ptr();
  a.grad = grad.defined() ? grad.mutable_data_ptr() : nullptr;

  const KernelTable& k = kernel_table();
  const int64_t lanes = S > 1 ? k.lanes[int(dt)] : 1;
  const int64_t items = S > 1 ? B * ((S + lanes - 1) / lanes) : N;
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 15) / (C * lanes));
  const RowLossFn fn = k.row_loss[int(dt)];
  at::parallel_for(0, items, grain, [&](int64_t begin, int64_t end) { fn(a, begin, end); });

  out.loss = reduce_rows(loss_rows, reduction, a.loss_scale, x.scalar_type());
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_cpu(
    const at::Tensor& x, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    const at::Tensor& loss_scale, int64_t ignore_index, double label_smoothing,
    double logit_scale, double softcap, double z_loss, int64_t reduction, bool compute_grad) {
  const at::Tensor xc = x.contiguous();
  const at::Tensor grad = compute_grad ? empty_for_first_touch(xc) : at::Tensor();
  Outputs o = run_cross_entropy(xc, target, weight, loss_scale, ignore_index,
                                label_smoothing, logit_scale, softcap, z_loss, reduction,
                                grad, kOp);
  return {o.loss, o.lse, compute_grad ? grad : x.new_empty({0})};
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_inplace_cpu(
    at::Tensor& x, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    const at::Tensor& loss_scale, int64_t ignore_index, double label_smoothing,
    double logit_scale, double softcap, double z_loss, int64_t reduction) {
  Outputs o = run_cross_entropy(x, target, weight, loss_scale, ignore_index,
                                label_smoothing, logit_scale, softcap, z_loss, reduction, x,
                                "cross_entropy_inplace");
  return {o.loss, o.lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedloss, CPU, m) {
  m.impl("cross_entropy", &cross_entropy_cpu);
  m.impl("cross_entropy_inplace", &cross_entropy_inplace_cpu);
}

}  // namespace cpu
}  // namespace fusedloss
