// at::vec helpers of the CPU kernels: the Vectorized overloads of the primitives of
// common/loss_math.h (so its element-wise templates run on whole vectors), loads and
// stores in the accumulation type, horizontal reductions, the softmax exp, scratch rows.
// Included (through cpu/isa_kernels.h) by the per-ISA translation units after they define
// CPU_CAPABILITY, which names the at::vec namespace in use.
#pragma once

#ifndef CPU_CAPABILITY
#error "define CPU_CAPABILITY before including cpu/vec.h"
#endif

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

namespace fusedloss {
namespace math {

template <class T>
using Vec = at::vec::Vectorized<T>;

template <class T>
inline Vec<T> fl_exp(Vec<T> x) { return x.exp(); }
template <class T>
inline Vec<T> fl_log(Vec<T> x) { return x.log(); }
template <class T>
inline Vec<T> fl_log1p(Vec<T> x) { return x.log1p(); }
template <class T>
inline Vec<T> fl_expm1(Vec<T> x) { return x.expm1(); }
template <class T>
inline Vec<T> fl_tanh(Vec<T> x) { return x.tanh(); }
template <class T>
inline Vec<T> fl_abs(Vec<T> x) { return x.abs(); }
template <class T>
inline Vec<T> fl_pow(Vec<T> x, Vec<T> y) { return x.pow(y); }
// `mask` is a comparison result: all bits set in the lanes where it holds.
template <class T>
inline Vec<T> fl_select(Vec<T> mask, Vec<T> a, Vec<T> b) { return Vec<T>::blendv(b, a, mask); }
template <class T>
inline Vec<T> fl_relu(Vec<T> x) { return at::vec::maximum(x, Vec<T>(T(0))); }

}  // namespace math
}  // namespace fusedloss

// After the overloads: unqualified calls in its templates see those declared before them.
#include "common/loss_math.h"

namespace fusedloss {
namespace cpu {
namespace CPU_CAPABILITY {

using at::vec::Vectorized;
using math::acc_of;

template <class T>
constexpr bool is_reduced_v = std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, c10::Half>;

// A scratch array owned by one call of a kernel (one chunk of rows of one thread).
template <class T>
struct Scratch {
  T* p = nullptr;
  explicit Scratch(int64_t n) { if (n > 0) p = new T[n]; }
  ~Scratch() { delete[] p; }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
};

// Vectorized<acc>::size() elements of scalar_t as one accumulation-type vector; the
// `n`-element forms handle row tails (missing lanes read as 0 and are never stored).
template <class scalar_t>
inline Vectorized<acc_of<scalar_t>> load_acc(const scalar_t* p) {
  if constexpr (is_reduced_v<scalar_t>) {
    Vectorized<float> out;
    at::vec::load_to_float<scalar_t>(p, out);
    return out;
  } else {
    return Vectorized<scalar_t>::loadu(p);
  }
}

template <class scalar_t>
inline Vectorized<acc_of<scalar_t>> load_acc(const scalar_t* p, int64_t n) {
  using acc_t = acc_of<scalar_t>;
  if constexpr (is_reduced_v<scalar_t>) {
    __at_align__ acc_t buf[Vectorized<acc_t>::size()];
    for (int64_t i = 0; i < Vectorized<acc_t>::size(); ++i)
      buf[i] = i < n ? static_cast<acc_t>(p[i]) : acc_t(0);
    return Vectorized<acc_t>::loadu(buf);
  } else {
    return Vectorized<scalar_t>::loadu(p, n);
  }
}

template <class scalar_t>
inline void store_acc(scalar_t* p, Vectorized<acc_of<scalar_t>> v) {
  if constexpr (is_reduced_v<scalar_t>) {
    at::vec::convert_from_float<scalar_t>(v, v).store(p, Vectorized<float>::size());
  } else {
    v.store(p);
  }
}

template <class scalar_t>
inline void store_acc(scalar_t* p, Vectorized<acc_of<scalar_t>> v, int64_t n) {
  using acc_t = acc_of<scalar_t>;
  if constexpr (is_reduced_v<scalar_t>) {
    __at_align__ acc_t buf[Vectorized<acc_t>::size()];
    v.store(buf);
    for (int64_t i = 0; i < n; ++i) p[i] = static_cast<scalar_t>(buf[i]);
  } else {
    v.store(p, n);
  }
}

template <class T>
inline T hsum(Vectorized<T> v) {
  __at_align__ T b[Vectorized<T>::size()];
  v.store(b);
  T s = T(0);
  for (int64_t i = 0; i < Vectorized<T>::size(); ++i) s += b[i];
  return s;
}

template <class T>
inline T hmax(Vectorized<T> v) {
  __at_align__ T b[Vectorized<T>::size()];
  v.store(b);
  T m = b[0];
  for (int64_t i = 1; i < Vectorized<T>::size(); ++i)
    m = (b[i] > m || std::isnan(b[i])) ? b[i] : m;  // a NaN logit makes the row NaN
  return m;
}

// exp for the softmax sweeps: for float ATen's exp_u20, the polynomial its own softmax
// kernels use (a few ulp instead of Sleef's 1, and cheaper); the accurate exp for double.
template <class T>
inline Vectorized<T> softmax_exp(Vectorized<T> v) {
  if constexpr (std::is_same_v<T, float>) {
    return v.exp_u20();
  } else {
    return v.exp();
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace fusedloss
