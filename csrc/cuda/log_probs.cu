// The CUDA token log-probs rows: the forward (log_probs, entropy and the extras of each
// row) and the backward (d / d x for per-row upstream gradients of log_probs and entropy).
// The algebra and its names (z, m, s, d, q, g, h) are fusedloss/log_probs.py's; the launch
// arguments are the CPU kernels' (cpu/log_probs.h).
//
// Grid: one block of kThreads threads per row (N blocks); each thread owns the classes
// lane, lane + kThreads, ... of its row.
//   forward:  pass 1, the max of z, the first index holding it and the sum of z (block
//             reductions); pass 2, e = exp(z - m) and the sums s, d = sum e (m - z),
//             q = sum e^2 (the row, read again, mostly from L2). Bytes: the row read
//             twice, up to 6 values written.
//   backward: one pass: p from the saved lse, the gradient written (over x itself for
//             log_probs_grad_inplace: each element is read before it is written, by the
//             thread that writes it).
// A row whose target is ignore_index is not read: its outputs (or gradient) are 0.
#include <cmath>

#include "common/loss_math.h"
#include "cpu/log_probs.h"
#include "cuda/common.cuh"

namespace fusedloss {
namespace cuda {
namespace {

constexpr int kThreads = 256;
using Block = Group<kThreads>;

// The row's transform: y = softcap(logit_scale x), z = a y.
template <class acc_t>
struct Transform {
  acc_t ls, cap, inv_cap;
  bool capped;
  __device__ explicit Transform(const LogProbsArgs& p)
      : ls(acc_t(p.logit_scale)), cap(acc_t(p.softcap)),
        inv_cap(p.softcap > 0 ? acc_t(1.0 / p.softcap) : acc_t(0)), capped(p.softcap > 0) {}
  __device__ acc_t y(acc_t x) const {
    const acc_t u = x * ls;
    return capped ? math::fl_tanh(u * inv_cap) * cap : u;
  }
  __device__ acc_t dy(acc_t y) const {  // d y / d x
    if (!capped) return ls;
    const acc_t t = y * inv_cap;
    return ls * (acc_t(1) - t * t);
  }
};

template <class acc_t>
__device__ acc_t inv_temperature(const LogProbsArgs& p, int64_t r) {
  return p.row_inv_temperature ? static_cast<const acc_t*>(p.row_inv_temperature)[r]
                               : acc_t(p.inv_temperature);
}

// The block's max of m and, among the threads holding it, the smallest index.
template <class acc_t>
__device__ void max_first(acc_t& m, int64_t& at, acc_t* smem_m, int64_t* smem_at) {
  auto better = [](acc_t m2, int64_t a2, acc_t m1, int64_t a1) {
    return m2 > m1 || (m2 == m1 && a2 < a1);
  };
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const acc_t m2 = __shfl_xor_sync(0xffffffffu, m, o);
    const int64_t a2 = __shfl_xor_sync(0xffffffffu, at, o);
    if (better(m2, a2, m, at)) { m = m2; at = a2; }
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();
  if (lane == 0) { smem_m[warp] = m; smem_at[warp] = at; }
  __syncthreads();
  m = smem_m[0];
  at = smem_at[0];
  for (int w = 1; w < Block::kWarps; ++w)
    if (better(smem_m[w], smem_at[w], m, at)) { m = smem_m[w]; at = smem_at[w]; }
}

template <class scalar_t>
__global__ void __launch_bounds__(kThreads) log_probs_forward_kernel(LogProbsArgs p) {
  using acc_t = acc_of<scalar_t>;
  __shared__ acc_t smem[3 * Block::kWarps];
  __shared__ int64_t smem_at[Block::kWarps];
  const int64_t r = blockIdx.x, C = p.V;
  const int64_t t = p.target[r];
  const bool ignored = t == p.ignore_index, valid = t >= 0 && t < C;
  const acc_t inv_t = inv_temperature<acc_t>(p, r);
  auto out = [&](void* q, acc_t v) { if (q) static_cast<acc_t*>(q)[r] = v; };
  if (ignored || !valid || !(inv_t > acc_t(0))) {  // uniform over the block
    if (threadIdx.x == 0) {
      const acc_t v = ignored ? acc_t(0) : math::fl_nan<acc_t>();
      out(p.log_probs, v), out(p.entropy, v), out(p.lse, v), out(p.log_sum_sq, v);
      out(p.mean, v);
      if (p.is_top1) p.is_top1[r] = false;
    }
    return;
  }
  const scalar_t* x = static_cast<const scalar_t*>(p.x) + r * C;
  const Transform<acc_t> tf(p);
  // Pass 1: the max of z, its first index, the sum of z.
  acc_t m = -INFINITY, z_sum = acc_t(0);
  int64_t first = C;
  for (int64_t c = threadIdx.x; c < C; c += kThreads) {
    const acc_t z = tf.y(static_cast<acc_t>(x[c])) * inv_t;
    if (z > m || (z == m && c < first)) { m = z; first = c; }
    z_sum += z;
  }
  max_first(m, first, smem, smem_at);
  z_sum = Block::sum(z_sum, smem);
  const acc_t z_t = tf.y(static_cast<acc_t>(x[t])) * inv_t;
  if (!math::fl_isfinite(m)) {  // a NaN or +inf logit, or only -inf ones: NaN, as torch
    if (threadIdx.x == 0) {
      const acc_t nan = math::fl_nan<acc_t>();
      out(p.log_probs, nan), out(p.entropy, nan), out(p.lse, nan), out(p.log_sum_sq, nan);
      out(p.mean, z_sum / acc_t(C));
      if (p.is_top1) p.is_top1[r] = false;
    }
    return;
  }
  // Pass 2: e = exp(z - m), s, d and q.
  acc_t s = acc_t(0), d = acc_t(0), q = acc_t(0);
  for (int64_t c = threadIdx.x; c < C; c += kThreads) {
    const acc_t z = tf.y(static_cast<acc_t>(x[c])) * inv_t;
    const acc_t e = math::fl_exp(z - m);
    s += e;
    if (e > acc_t(0)) d += e * (m - z);
    q += e * e;
  }
  Block::sum3(s, d, q, smem);
  if (threadIdx.x == 0) {
    const acc_t log_s = math::fl_log(s), lse = m + log_s;
    out(p.log_probs, z_t - lse);
    out(p.lse, lse);
    out(p.entropy, log_s + d / s);
    out(p.log_sum_sq, math::fl_log(q) - acc_t(2) * log_s);
    out(p.mean, z_sum / acc_t(C));
    if (p.is_top1) p.is_top1[r] = first == t;
  }
}

template <class scalar_t>
__global__ void __launch_bounds__(kThreads) log_probs_backward_kernel(LogProbsArgs p) {
  using acc_t = acc_of<scalar_t>;
  const int64_t r = blockIdx.x, C = p.V;
  const int64_t t = p.target[r];
  scalar_t* gx = static_cast<scalar_t*>(p.grad) + r * C;
  if (t == p.ignore_index) {  // not read: exact zeros
    for (int64_t c = threadIdx.x; c < C; c += kThreads) gx[c] = scalar_t(0);
    return;
  }
  const scalar_t* x = static_cast<const scalar_t*>(p.x) + r * C;
  const Transform<acc_t> tf(p);
  const bool valid = t >= 0 && t < C;
  const acc_t inv_t = inv_temperature<acc_t>(p, r);
  const acc_t lse = static_cast<const acc_t*>(p.lse_in)[r];
  const acc_t g = p.grad_log_probs ? static_cast<const acc_t*>(p.grad_log_probs)[r] : acc_t(0);
  const acc_t h = p.grad_entropy ? static_cast<const acc_t*>(p.grad_entropy)[r] : acc_t(0);
  const acc_t ent = p.grad_entropy ? static_cast<const acc_t*>(p.entropy_in)[r] : acc_t(0);
  const acc_t k = p.grad_lse ? static_cast<const acc_t*>(p.grad_lse)[r] : acc_t(0);
  const acc_t u = p.grad_mean ? static_cast<const acc_t*>(p.grad_mean)[r] / acc_t(C) : acc_t(0);
  const acc_t scale = valid ? inv_t : math::fl_nan<acc_t>();  // NaN, as the outputs
  for (int64_t c = threadIdx.x; c < C; c += kThreads) {
    const acc_t y = tf.y(static_cast<acc_t>(x[c])), z = y * inv_t;
    const acc_t pc = math::fl_exp(z - lse);
    acc_t dz = g * ((c == t ? acc_t(1) : acc_t(0)) - pc) + k * pc + u;
    if (p.grad_entropy && pc > acc_t(0)) dz -= h * pc * (z - lse + ent);
    gx[c] = static_cast<scalar_t>(dz * tf.dy(y) * scale);
  }
}

template <template <class> class Kernel>
void launch(const LogProbsArgs& a) {
  if (a.N == 0) return;
  visit_dtype(a.dtype, [&](auto tag) {
    Kernel<decltype(tag)>::run(a);
  });
}

template <class scalar_t>
struct Forward {
  static void run(const LogProbsArgs& a) {
    log_probs_forward_kernel<scalar_t><<<a.N, kThreads, 0, stream()>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

template <class scalar_t>
struct Backward {
  static void run(const LogProbsArgs& a) {
    log_probs_backward_kernel<scalar_t><<<a.N, kThreads, 0, stream()>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

}  // namespace
}  // namespace cuda

void log_probs_forward_cuda(const LogProbsArgs& a) { cuda::launch<cuda::Forward>(a); }
void log_probs_backward_cuda(const LogProbsArgs& a) { cuda::launch<cuda::Backward>(a); }

}  // namespace fusedloss
