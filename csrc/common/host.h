// Host-side helpers shared by every op and both devices: dtypes, argument checks, and the
// conversions that turn op arguments into the plain data the kernels read.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>

#include "common/kernel_args.h"

namespace fusedloss {

inline DType dtype_of(const at::Tensor& x, const char* op, const char* name) {
  switch (x.scalar_type()) {
    case at::kFloat: return DType::kFloat;
    case at::kDouble: return DType::kDouble;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kHalf;
    default:
      TORCH_CHECK(false, "fusedloss.", op, ": ", name, " must be float32, float64, bfloat16 "
                  "or float16, got ", x.scalar_type());
  }
}

// The accumulation type: float64 for float64, float32 for the rest.
inline at::ScalarType acc_type_of(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_reduction(int64_t reduction, const char* op) {
  TORCH_CHECK(reduction >= 0 && reduction <= 2, "fusedloss.", op,
              ": reduction must be 0 (none), 1 (mean) or 2 (sum), got ", reduction);
}

inline void check_device(const at::Tensor& t, const at::Tensor& x, const char* op,
                         const char* name) {
  TORCH_CHECK(t.device() == x.device(), "fusedloss.", op, ": ", name, " is on ", t.device(),
              " but x is on ", x.device());
}

// A 0-dim (or 1-element) factor in `acc` on x's device: an asynchronous copy at most,
// never a host read.
inline at::Tensor device_scalar(const at::Tensor& v, at::ScalarType acc, const at::Tensor& x,
                                const char* op, const char* name) {
  TORCH_CHECK(v.numel() == 1, "fusedloss.", op, ": ", name, " must hold one value, got shape ",
              v.sizes());
  return v.to(x.device(), acc).reshape({}).contiguous();
}

// An (N,) per-row vector (row_weight) in the accumulation type, contiguous; undefined
// when absent.
inline at::Tensor row_vector(const std::optional<at::Tensor>& v, int64_t N,
                             at::ScalarType acc, const at::Tensor& x, const char* op,
                             const char* name) {
  if (!v.has_value() || !v->defined()) return at::Tensor();
  check_device(*v, x, op, name);
  TORCH_CHECK(v->numel() == N, "fusedloss.", op, ": ", name, " must have one entry per row (",
              N, "), got shape ", v->sizes());
  return v->to(acc).reshape({-1}).contiguous();
}

// A (C,) per-class vector in the accumulation type on x's device, contiguous; a
// 1-element tensor is broadcast to all classes. Undefined when absent.
inline at::Tensor class_vector(const std::optional<at::Tensor>& v, int64_t C,
                               at::ScalarType acc, const at::Tensor& x, const char* op,
                               const char* name) {
  if (!v.has_value() || !v->defined()) return at::Tensor();
  check_device(*v, x, op, name);
  TORCH_CHECK(v->numel() == C || v->numel() == 1, "fusedloss.", op, ": ", name,
              " must have one entry per class (", C, "), got shape ", v->sizes());
  at::Tensor out = v->to(acc).reshape({-1}).contiguous();
  return out.numel() == C ? out : out.expand({C}).contiguous();
}

// Raise on the first class index that is neither ignore_index nor in [0, C). The kernels
// never read out of bounds anyway (they write NaN); where reading the indices costs no
// synchronisation (CPU tensors) a clear error costs one pass over N integers.
inline void check_class_targets(const at::Tensor& target, int64_t C, int64_t ignore_index,
                                const char* op) {
  const int64_t* t = target.const_data_ptr<int64_t>();
  const int64_t n = target.numel();
  for (int64_t i = 0; i < n; ++i) {
    const int64_t v = t[i];
    if (v != ignore_index && (v < 0 || v >= C)) {
      TORCH_CHECK_INDEX(false, "fusedloss.", op, ": target[", i, "] = ", v,
                        " is out of range: class indices must be in [0, ", C,
                        ") or equal ignore_index (", ignore_index, ")");
    }
  }
}

// A tensor the kernels read as `x_dtype` or as the accumulation type: kept as it is when
// it has x's dtype, else converted to the accumulation type. *is_acc tells which.
inline at::Tensor as_x_or_acc(const at::Tensor& t, at::ScalarType x_dtype, bool* is_acc) {
  *is_acc = t.scalar_type() != x_dtype;
  return *is_acc ? t.to(acc_type_of(x_dtype)).contiguous() : t.contiguous();
}

}  // namespace fusedloss
