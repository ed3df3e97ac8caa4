// Helpers shared by the CUDA kernels: accumulation types, group reductions over the
// threads that own one row (a warp or a whole block), 16-byte vector access, and the
// deterministic final sum of per-row losses.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdint>

#include "common/loss_math.h"

namespace fusedloss {
namespace cuda {

namespace fm = fusedloss::math;

using fm::acc_of;

// ---------------------------------------------------------------- 16-byte vectors
template <class T>
struct VecWidth { static constexpr int value = 16 / sizeof(T); };

template <class T, int N>
struct alignas(sizeof(T) * N) VecOf {
  T v[N];
};

__host__ __device__ inline bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

// ---------------------------------------------------------------- (max, sum-exp) pairs
// Online softmax: m is the running max, s = sum exp(z - m). A NaN logit turns s into NaN
// and a +inf one makes m infinite; fm::row_lse then makes the row NaN.
template <class T>
__device__ __forceinline__ void online_add(T& m, T& s, T z) {
  if (z > m) {
    s = s * fm::fl_exp(m - z) + T(1);
    m = z;
  } else if (z != -INFINITY) {  // a masked logit met while m is still -inf: not exp(NaN)
    s += fm::fl_exp(z - m);
  }
}

// Merge (m2, s2) into (m, s). A side whose max equals the merged max keeps factor 1, so
// two empty sides (-inf, 0) stay (-inf, 0) instead of 0 * exp(NaN).
template <class T>
__device__ __forceinline__ void online_merge(T& m, T& s, T m2, T s2) {
  const T nm = m2 > m ? m2 : m;
  s = (m == nm ? s : s * fm::fl_exp(m - nm)) + (m2 == nm ? s2 : s2 * fm::fl_exp(m2 - nm));
  m = nm;
}

// ---------------------------------------------------------------- group reductions
// The threads of one row: a warp (kThreads == 32) or a whole block (kThreads ==
// blockDim.x, a multiple of 32). Every thread of the group gets the result. The block
// form uses `smem` (kThreads / 32 slots per value) and synchronises the block, so all
// of its threads must call it.
template <int kThreads>
struct Group {
  static_assert(kThreads == 32 || (kThreads % 32 == 0 && kThreads <= 1024), "bad group");
  static constexpr int kWarps = kThreads / 32;

  template <class T>
  __device__ static T warp_sum(T v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
  }

  template <class T>
  __device__ static void warp_merge(T& m, T& s) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const T m2 = __shfl_xor_sync(0xffffffffu, m, o);
      const T s2 = __shfl_xor_sync(0xffffffffu, s, o);
      online_merge(m, s, m2, s2);
    }
  }

  // Up to three plain sums at once (one block synchronisation for all of them).
  template <class T>
  __device__ static void sum3(T& a, T& b, T& c, T* smem) {
    a = warp_sum(a);
    b = warp_sum(b);
    c = warp_sum(c);
    if constexpr (kWarps > 1) {
      const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
      __syncthreads();  // smem may still be read by a previous reduction
      if (lane == 0) {
        smem[warp] = a;
        smem[kWarps + warp] = b;
        smem[2 * kWarps + warp] = c;
      }
      __syncthreads();
      a = b = c = T(0);
      // Fixed order: every thread sums the warps' partials 0, 1, ... itself.
      for (int w = 0; w < kWarps; ++w) {
        a += smem[w];
        b += smem[kWarps + w];
        c += smem[2 * kWarps + w];
      }
    }
  }

  template <class T>
  __device__ static T sum(T a, T* smem) {
    T b = T(0), c = T(0);
    sum3(a, b, c, smem);
    return a;
  }

  template <class T>
  __device__ static void merge(T& m, T& s, T* smem) {
    warp_merge(m, s);
    if constexpr (kWarps > 1) {
      const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
      __syncthreads();
      if (lane == 0) {
        smem[warp] = m;
        smem[kWarps + warp] = s;
      }
      __syncthreads();
      m = smem[0];
      s = smem[kWarps];
      for (int w = 1; w < kWarps; ++w) online_merge(m, s, smem[w], smem[kWarps + w]);
    }
  }
};

// ---------------------------------------------------------------- final sums
// One block of kSumThreads threads: out[0] = (sum_i rows[i]) * loss_scale[0].
// Reads n accumulation-type values once; a fixed assignment of rows to threads and a
// fixed tree make the result independent of timing (no atomics).
constexpr int kSumThreads = 1024;

template <class acc_t, class out_t>
__global__ void __launch_bounds__(kSumThreads)
    sum_rows_kernel(const acc_t* __restrict__ rows, int64_t n,
                    const acc_t* __restrict__ loss_scale, out_t* __restrict__ out) {
  __shared__ acc_t smem[3 * (kSumThreads / 32)];
  acc_t v = acc_t(0);
  for (int64_t i = threadIdx.x; i < n; i += kSumThreads) v += rows[i];
  v = Group<kSumThreads>::sum(v, smem);
  if (threadIdx.x == 0) out[0] = static_cast<out_t>(v * loss_scale[0]);
}

// (sum of rows) * loss_scale as a 0-dim tensor of out_dtype, on the current stream.
inline at::Tensor sum_rows(const at::Tensor& rows, const at::Tensor& loss_scale,
                           at::ScalarType out_dtype) {
  at::Tensor out = at::empty({}, rows.options().dtype(out_dtype));
  const int64_t n = rows.numel();
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out_dtype, "fusedloss_sum_rows",
                                  [&] {
    if (rows.scalar_type() == at::kDouble) {
      sum_rows_kernel<double, scalar_t><<<1, kSumThreads, 0, stream>>>(
          rows.const_data_ptr<double>(), n, loss_scale.const_data_ptr<double>(),
          out.mutable_data_ptr<scalar_t>());
    } else {
      sum_rows_kernel<float, scalar_t><<<1, kSumThreads, 0, stream>>>(
          rows.const_data_ptr<float>(), n, loss_scale.const_data_ptr<float>(),
          out.mutable_data_ptr<scalar_t>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

inline at::ScalarType acc_type_of(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// A 0-dim (or 1-element) factor as a contiguous tensor of `acc` on x's device: an
// asynchronous device copy at most, never a host read.
inline at::Tensor device_scalar(const at::Tensor& v, at::ScalarType acc, const at::Tensor& x,
                                const char* op, const char* name) {
  TORCH_CHECK(v.numel() == 1, "fusedloss.", op, ": ", name, " must hold one value, got shape ",
              v.sizes());
  return v.to(x.device(), acc).reshape({}).contiguous();
}

inline at::Tensor class_vector(const std::optional<at::Tensor>& v, int64_t C,
                               at::ScalarType acc, const at::Tensor& x, const char* op,
                               const char* name) {
  if (!v.has_value() || !v->defined()) return at::Tensor();
  TORCH_CHECK(v->numel() == C || v->numel() == 1, "fusedloss.", op, ": ", name,
              " must have one entry per class (", C, "), got shape ", v->sizes());
  at::Tensor out = v->to(x.device(), acc).reshape({-1}).contiguous();
  return out.numel() == C ? out : out.expand({C}).contiguous();
}

}  // namespace cuda
}  // namespace fusedloss
