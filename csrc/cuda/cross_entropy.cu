// CUDA implementations of fusedloss::cross_entropy and fusedloss::cross_entropy_inplace
// (kernels in rowwise.cuh), and the init function of the fusedloss._C_cuda module.
//
// Nothing here reads a device value on the host: the loss scale and the weight sum stay
// on the device and are read by the kernels, so a call never synchronises the stream.
// A target outside [0, C) that is not ignore_index yields NaN for its row (checking it
// on the host would need a synchronisation); it is never used as an index.
#include <Python.h>
#include <torch/library.h>

#include "cuda/rowwise.cuh"

namespace fusedloss {
namespace cuda {
namespace {

struct Outputs {
  at::Tensor loss, lse;
};

Outputs run_cross_entropy(const at::Tensor& x, const at::Tensor& target,
                          const std::optional<at::Tensor>& weight,
                          const at::Tensor& loss_scale, int64_t ignore_index,
                          double label_smoothing, double logit_scale, double softcap,
                          double z_loss, int64_t reduction, const at::Tensor& grad,
                          const char* op) {
  // Kernel level: the tensor ops below must not record autograd history.
  at::AutoDispatchBelowADInplaceOrView guard;
  TORCH_CHECK(x.is_cuda(), "fusedloss.", op, ": expected CUDA tensors");
  TORCH_CHECK(x.dim() == 3, "fusedloss.", op, ": x must be (B, C, S), got shape ", x.sizes());
  TORCH_CHECK(x.is_contiguous(), "fusedloss.", op, ": x must be contiguous");
  TORCH_CHECK(reduction >= 0 && reduction <= 2, "fusedloss.", op,
              ": reduction must be 0 (none), 1 (mean) or 2 (sum), got ", reduction);
  TORCH_CHECK(softcap >= 0.0, "fusedloss.", op, ": softcap must be >= 0 (0: off)");
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
              "fusedloss.", op, ": x must be float32, float64, bfloat16 or float16, got ", dt);
  TORCH_CHECK(target.device() == x.device(), "fusedloss.", op, ": target is on ",
              target.device(), " but x is on ", x.device());
  const c10::cuda::CUDAGuard device_guard(x.device());
  const at::ScalarType acc = acc_type_of(dt);
  const int64_t B = x.size(0), C = x.size(1), S = x.size(2), N = B * S;
  TORCH_CHECK(C > 0, "fusedloss.", op, ": there must be at least one class");

  RowPtrs p{};
  p.x = x.const_data_ptr();
  p.grad = grad.defined() ? grad.mutable_data_ptr() : nullptr;
  p.C = C;
  p.S = S;
  p.N = N;
  p.ignore_index = ignore_index;

  const bool prob = target.is_floating_point();
  at::Tensor target_c;
  if (prob) {
    TORCH_CHECK(target.sizes() == x.sizes(), "fusedloss.", op,
                ": a probability target must have the shape of x ", x.sizes(), ", got ",
                target.sizes());
    target_c = target.scalar_type() == dt ? target.contiguous() : target.to(acc).contiguous();
    p.target_prob = target_c.const_data_ptr();
  } else {
    TORCH_CHECK(target.numel() == N, "fusedloss.", op, ": a class-index target must have ", N,
                " entries (B*S), got shape ", target.sizes());
    target_c = target.to(at::kLong).contiguous();
    p.target = target_c.const_data_ptr<int64_t>();
  }
  const at::Tensor w = class_vector(weight, C, acc, x, op, "weight");
  const at::Tensor w_sum = w.defined() ? w.sum() : at::Tensor();
  p.weight = w.defined() ? w.const_data_ptr() : nullptr;
  p.weight_sum = w.defined() ? w_sum.const_data_ptr() : nullptr;
  const at::Tensor ls = device_scalar(loss_scale, acc, x, op, "loss_scale");
  p.loss_scale = ls.const_data_ptr();

  Outputs out;
  out.lse = at::empty({N}, x.options().dtype(acc));
  at::Tensor rows = at::empty({N}, x.options().dtype(reduction == 0 ? dt : acc));
  p.lse = out.lse.mutable_data_ptr();
  p.loss_rows = rows.mutable_data_ptr();
  p.loss_rows_acc = reduction != 0;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dt, "fusedloss_cross_entropy", [&] {
    using acc_t = acc_of<scalar_t>;
    const auto o = make_row_opts<acc_t>(C, label_smoothing, logit_scale, softcap, z_loss, 0.0);
    if (!prob) {
      launch_softmax_rows<scalar_t, scalar_t, RowMode::kCrossEntropyClass>(p, o);
    } else if (target_c.scalar_type() == dt) {
      launch_softmax_rows<scalar_t, scalar_t, RowMode::kCrossEntropyProb>(p, o);
    } else {
      launch_softmax_rows<scalar_t, acc_t, RowMode::kCrossEntropyProb>(p, o);
    }
  });
  out.loss = reduction == 0 ? rows : sum_rows(rows, ls, dt);
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_cuda(
    const at::Tensor& x, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    const at::Tensor& loss_scale, int64_t ignore_index, double label_smoothing,
    double logit_scale, double softcap, double z_loss, int64_t reduction, bool compute_grad) {
  const at::Tensor xc = x.contiguous();
  const at::Tensor grad = compute_grad ? at::empty_like(xc) : at::Tensor();
  Outputs o = run_cross_entropy(xc, target, weight, loss_scale, ignore_index,
                                label_smoothing, logit_scale, softcap, z_loss, reduction,
                                grad, "cross_entropy");
  return {o.loss, o.lse, compute_grad ? grad : x.new_empty({0})};
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_inplace_cuda(
    at::Tensor& x, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    const at::Tensor& loss_scale, int64_t ignore_index, double label_smoothing,
    double logit_scale, double softcap, double z_loss, int64_t reduction) {
  Outputs o = run_cross_entropy(x, target, weight, loss_scale, ignore_index,
                                label_smoothing, logit_scale, softcap, z_loss, reduction, x,
                                "cross_entropy_inplace");
  return {o.loss, o.lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedloss, CUDA, m) {
  m.impl("cross_entropy", &cross_entropy_cuda);
  m.impl("cross_entropy_inplace", &cross_entropy_inplace_cuda);
}

}  // namespace cuda
}  // namespace fusedloss

// `import fusedloss._C_cuda` only has to load this library so that the CUDA kernels
// register; the schemas come from fusedloss._C.
PyMODINIT_FUNC PyInit__C_cuda(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C_cuda", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
