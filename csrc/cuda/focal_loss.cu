// CUDA implementations of fusedloss::focal_loss (the softmax row kernel of rowwise.cuh in
// its focal mode) and fusedloss::sigmoid_focal_loss (element-wise, below). No host
// synchronisation; targets outside [0, C) give NaN rows, as in cross_entropy.cu.
#include <torch/library.h>

#include "cuda/rowwise.cuh"

namespace fusedloss {
namespace cuda {
namespace {

constexpr int kSigmoidThreads = 256;
constexpr int64_t kSigmoidMaxBlocks = 2048;  // fixed: the partial sums do not depend on the GPU

// Grid: min(ceil(n / 256), 2048) blocks of 256 threads, a grid-stride loop over the n
// elements; each thread owns elements i = tid + k * (grid size). One pass: reads x and
// the target once, writes the gradient (and the per-element loss for reduction none)
// once: n * (2 * sizeof(x) + sizeof(target)) bytes. With a reduction every block writes
// one partial sum (fixed order, no atomics) that sum_rows_kernel then adds up.
template <class scalar_t, class tgt_t>
__global__ void __launch_bounds__(kSigmoidThreads)
    sigmoid_focal_kernel(const scalar_t* __restrict__ x, const tgt_t* __restrict__ target,
                         int64_t n, acc_of<scalar_t> alpha, acc_of<scalar_t> gamma,
                         const acc_of<scalar_t>* __restrict__ loss_scale,
                         scalar_t* __restrict__ loss, acc_of<scalar_t>* __restrict__ partials,
                         scalar_t* __restrict__ grad) {
  using acc_t = acc_of<scalar_t>;
  __shared__ acc_t smem[3 * (kSigmoidThreads / 32)];
  const acc_t ls = *loss_scale;
  acc_t sum = acc_t(0);
  for (int64_t i = int64_t(blockIdx.x) * kSigmoidThreads + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * kSigmoidThreads) {
    acc_t l, d;
    fm::sigmoid_focal_terms(static_cast<acc_t>(x[i]), static_cast<acc_t>(target[i]), alpha,
                            gamma, l, d);
    if (loss) loss[i] = static_cast<scalar_t>(l);
    sum += l;
    if (grad) grad[i] = static_cast<scalar_t>(d * ls);
  }
  if (partials) {
    sum = Group<kSigmoidThreads>::sum(sum, smem);
    if (threadIdx.x == 0) partials[blockIdx.x] = sum;
  }
}

std::tuple<at::Tensor, at::Tensor> focal_loss_cuda(
    const at::Tensor& x_in, const at::Tensor& target, const std::optional<at::Tensor>& alpha,
    const std::optional<at::Tensor>& weight, const at::Tensor& loss_scale, double gamma,
    int64_t ignore_index, int64_t reduction, bool compute_grad) {
  constexpr const char* op = "focal_loss";
  at::AutoDispatchBelowADInplaceOrView guard;
  TORCH_CHECK(x_in.is_cuda(), "fusedloss.", op, ": expected CUDA tensors");
  TORCH_CHECK(x_in.dim() == 3, "fusedloss.", op, ": x must be (B, C, S), got shape ",
              x_in.sizes());
  TORCH_CHECK(reduction >= 0 && reduction <= 2, "fusedloss.", op,
              ": reduction must be 0 (none), 1 (mean) or 2 (sum), got ", reduction);
  TORCH_CHECK(gamma >= 0.0, "fusedloss.", op, ": gamma must be >= 0, got ", gamma);
  TORCH_CHECK(!target.is_floating_point() && target.device() == x_in.device(), "fusedloss.",
              op, ": target must hold class indices on the device of x");
  const c10::cuda::CUDAGuard device_guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const auto dt = x.scalar_type();
  const at::ScalarType acc = acc_type_of(dt);
  const int64_t B = x.size(0), C = x.size(1), S = x.size(2), N = B * S;
  TORCH_CHECK(C > 0, "fusedloss.", op, ": there must be at least one class");
  TORCH_CHECK(target.numel() == N, "fusedloss.", op, ": target must have ", N,
              " entries (B*S), got shape ", target.sizes());
  const at::Tensor target_c = target.to(at::kLong).contiguous();
  const at::Tensor w = class_vector(weight, C, acc, x, op, "weight");
  const at::Tensor al = class_vector(alpha, C, acc, x, op, "alpha");
  const at::Tensor ls = device_scalar(loss_scale, acc, x, op, "loss_scale");
  at::Tensor grad = compute_grad ? at::empty_like(x) : x.new_empty({0});
  at::Tensor lse = at::empty({N}, x.options().dtype(acc));
  at::Tensor rows = at::empty({N}, x.options().dtype(reduction == 0 ? dt : acc));

  RowPtrs p{};
  p.x = x.const_data_ptr();
  p.grad = compute_grad ? grad.mutable_data_ptr() : nullptr;
  p.target = target_c.const_data_ptr<int64_t>();
  p.weight = w.defined() ? w.const_data_ptr() : nullptr;
  p.alpha = al.defined() ? al.const_data_ptr() : nullptr;
  p.loss_scale = ls.const_data_ptr();
  p.loss_rows = rows.mutable_data_ptr();
  p.loss_rows_acc = reduction != 0;
  p.lse = lse.mutable_data_ptr();
  p.C = C;
  p.S = S;
  p.N = N;
  p.ignore_index = ignore_index;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dt, "fusedloss_focal_loss", [&] {
    using acc_t = acc_of<scalar_t>;
    const auto o = make_row_opts<acc_t>(C, 0.0, 1.0, 0.0, 0.0, gamma);
    launch_softmax_rows<scalar_t, scalar_t, RowMode::kFocal>(p, o);
  });
  return {reduction == 0 ? rows : sum_rows(rows, ls, dt), grad};
}

std::tuple<at::Tensor, at::Tensor> sigmoid_focal_loss_cuda(
    const at::Tensor& x_in, const at::Tensor& target, const at::Tensor& loss_scale,
    double alpha, double gamma, int64_t reduction, bool compute_grad) {
  constexpr const char* op = "sigmoid_focal_loss";
  at::AutoDispatchBelowADInplaceOrView guard;
  TORCH_CHECK(x_in.is_cuda(), "fusedloss.", op, ": expected CUDA tensors");
  TORCH_CHECK(reduction >= 0 && reduction <= 2, "fusedloss.", op,
              ": reduction must be 0 (none), 1 (mean) or 2 (sum), got ", reduction);
  TORCH_CHECK(gamma >= 0.0, "fusedloss.", op, ": gamma must be >= 0, got ", gamma);
  TORCH_CHECK(target.is_floating_point() && target.numel() == x_in.numel() &&
                  target.device() == x_in.device(),
              "fusedloss.", op, ": target must be a floating tensor shaped like x, on its device");
  const c10::cuda::CUDAGuard device_guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const auto dt = x.scalar_type();
  const at::ScalarType acc = acc_type_of(dt);
  const at::Tensor t =
      target.scalar_type() == dt ? target.contiguous() : target.to(acc).contiguous();
  const at::Tensor ls = device_scalar(loss_scale, acc, x, op, "loss_scale");
  const int64_t n = x.numel();
  const int64_t blocks =
      std::max<int64_t>(1, std::min<int64_t>((n + kSigmoidThreads - 1) / kSigmoidThreads,
                                             kSigmoidMaxBlocks));
  at::Tensor grad = compute_grad ? at::empty_like(x) : x.new_empty({0});
  at::Tensor loss = reduction == 0 ? at::empty({n}, x.options()) : at::Tensor();
  at::Tensor partials = reduction == 0 ? at::Tensor() : at::empty({blocks}, x.options().dtype(acc));
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dt, "fusedloss_sigmoid_focal", [&] {
    using acc_t = acc_of<scalar_t>;
    scalar_t* loss_ptr = reduction == 0 ? loss.mutable_data_ptr<scalar_t>() : nullptr;
    acc_t* part_ptr = reduction == 0 ? nullptr : partials.mutable_data_ptr<acc_t>();
    scalar_t* grad_ptr = compute_grad ? grad.mutable_data_ptr<scalar_t>() : nullptr;
    if (n > 0) {
      if (t.scalar_type() == dt) {
        sigmoid_focal_kernel<scalar_t, scalar_t><<<blocks, kSigmoidThreads, 0, stream>>>(
            x.const_data_ptr<scalar_t>(), t.const_data_ptr<scalar_t>(), n, acc_t(alpha),
            acc_t(gamma), ls.const_data_ptr<acc_t>(), loss_ptr, part_ptr, grad_ptr);
      } else {
        sigmoid_focal_kernel<scalar_t, acc_t><<<blocks, kSigmoidThreads, 0, stream>>>(
            x.const_data_ptr<scalar_t>(), t.const_data_ptr<acc_t>(), n, acc_t(alpha),
            acc_t(gamma), ls.const_data_ptr<acc_t>(), loss_ptr, part_ptr, grad_ptr);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else if (part_ptr) {
      partials.zero_();
    }
  });
  if (reduction != 0) loss = sum_rows(partials, ls, dt);
  return {loss, grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedloss, CUDA, m) {
  m.impl("focal_loss", &focal_loss_cuda);
  m.impl("sigmoid_focal_loss", &sigmoid_focal_loss_cuda);
}

}  // namespace cuda
}  // namespace fusedloss
