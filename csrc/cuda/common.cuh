// Helpers shared by the CUDA kernels: dtype dispatch, group reductions over the threads
// that own one row (a warp or a whole block), 16-byte vector access, and online softmax
// (max, sum-exp) pairs.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#include "common/kernel_args.h"
#include "common/loss_math.h"

namespace fusedloss {
namespace cuda {

using math::acc_of;

// Calls f(T{}) with T the C++ type of d (the host side of a launch).
template <class F>
void visit_dtype(DType d, F&& f) {
  switch (d) {
    case DType::kFloat: f(float{}); break;
    case DType::kDouble: f(double{}); break;
    case DType::kBFloat16: f(c10::BFloat16{}); break;
    case DType::kHalf: f(c10::Half{}); break;
  }
}

inline cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream(); }

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
// and a +inf one makes m infinite; math::row_lse then makes the row NaN.
template <class T>
__device__ __forceinline__ void online_add(T& m, T& s, T z) {
  if (z > m) {
    s = s * math::fl_exp(m - z) + T(1);
    m = z;
  } else if (z != -INFINITY) {  // a masked logit met while m is still -inf: not exp(NaN)
    s += math::fl_exp(z - m);
  }
}

// Merge (m2, s2) into (m, s). A side whose max equals the merged max keeps factor 1, so
// two empty sides (-inf, 0) stay (-inf, 0) instead of 0 * exp(NaN).
template <class T>
__device__ __forceinline__ void online_merge(T& m, T& s, T m2, T s2) {
  const T nm = m2 > m ? m2 : m;
  s = (m == nm ? s : s * math::fl_exp(m - nm)) + (m2 == nm ? s2 : s2 * math::fl_exp(m2 - nm));
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

}  // namespace cuda
}  // namespace fusedloss
