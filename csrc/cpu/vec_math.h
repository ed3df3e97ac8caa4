// at::vec::Vectorized overloads of the primitives of csrc/common/loss_math.h, so that its
// element-wise templates (softcap, sigmoid focal) run on whole vectors in the CPU loops.
// Include this before common/loss_math.h (see the note at the top of that header).
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

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
