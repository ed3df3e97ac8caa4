// Helpers shared by the CPU op implementations (tensor side: checks, dtypes, reductions).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <cstdlib>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "cpu/kernels.h"

namespace fusedloss {
namespace cpu {

inline DType dtype_of(const at::Tensor& x, const char* op) {
  switch (x.scalar_type()) {
    case at::kFloat: return DType::kFloat;
    case at::kDouble: return DType::kDouble;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kHalf;
    default:
      TORCH_CHECK(false, "fusedloss.", op, ": the input must be float32, float64, bfloat16 "
                  "or float16, got ", x.scalar_type());
  }
}

// float64 for float64 inputs, float32 otherwise (the contract's "acc").
inline at::ScalarType acc_type_of(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// A (C,) per-class vector in the accumulation type, contiguous; a 1-element tensor is
// broadcast to all classes.
inline at::Tensor class_vector(const std::optional<at::Tensor>& v, int64_t C,
                               at::ScalarType acc, const char* op, const char* name) {
  if (!v.has_value() || !v->defined()) return at::Tensor();
  TORCH_CHECK(v->device().is_cpu(), "fusedloss.", op, ": ", name, " must be a CPU tensor");
  TORCH_CHECK(v->numel() == C || v->numel() == 1, "fusedloss.", op, ": ", name,
              " must have one entry per class (", C, "), got shape ", v->sizes());
  at::Tensor out = v->to(acc).reshape({-1}).contiguous();
  return out.numel() == C ? out : out.expand({C}).contiguous();
}

inline double scalar_value(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.numel() == 1, "fusedloss.", op, ": ", name, " must hold one value, got shape ",
              t.sizes());
  return t.item<double>();  // CPU tensor: no device synchronisation involved
}

// Deterministic sum: a fixed pairwise tree over the index range, independent of the
// number of threads, in the accumulation type.
template <class T>
T pairwise_sum(const T* p, int64_t n) {
  if (n <= 256) {
    T s = T(0);
    for (int64_t i = 0; i < n; ++i) s += p[i];
    return s;
  }
  const int64_t h = n / 2;
  return pairwise_sum(p, h) + pairwise_sum(p + h, n - h);
}

// reduction 0: the rows in `out_dtype`; 1, 2: (sum of rows) * loss_scale, 0-dim.
inline at::Tensor reduce_rows(const at::Tensor& rows, int64_t reduction, double loss_scale,
                              at::ScalarType out_dtype) {
  if (reduction == 0) return rows.to(out_dtype);
  at::Tensor total = at::empty({}, rows.options());
  if (rows.scalar_type() == at::kDouble) {
    total.fill_(pairwise_sum(rows.const_data_ptr<double>(), rows.numel()) * loss_scale);
  } else {
    const float s = pairwise_sum(rows.const_data_ptr<float>(), rows.numel());
    total.fill_(static_cast<double>(s * static_cast<float>(loss_scale)));
  }
  return total.to(out_dtype);
}

// A new gradient buffer (N x V floats: hundreds of MiB for a language-model vocabulary)
// is first touched by the kernel that writes it, one page fault per 4 KiB page; for
// 4096 x 32000 float32 on a 2-core VM that costs ~150-190 ms, several times the kernel's
// own ~30 ms. FUSEDLOSS_CPU_HUGEPAGES=1 asks for transparent huge pages on the buffer's
// untouched, 2 MiB-aligned interior (one fault per 2 MiB; measured ~5x less there). It is
// opt-in because on that VM a call made a second or more after the previous buffer was
// freed sometimes paid far more instead (0.5-1.5 s; likely the hypervisor reclaiming
// freed 2 MiB blocks of guest memory). Only advice: with THP off, nothing changes.
inline at::Tensor empty_for_first_touch(const at::Tensor& like) {
  at::Tensor t = at::empty_like(like, at::MemoryFormat::Contiguous);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t end = begin + t.nbytes();
  const uintptr_t lo = (begin + kHuge - 1) & ~(kHuge - 1), hi = end & ~(kHuge - 1);
  static const bool enabled = [] {
    const char* v = std::getenv("FUSEDLOSS_CPU_HUGEPAGES");
    return v != nullptr && v[0] == '1';
  }();
  if (enabled && t.nbytes() >= 4 * kHuge && hi > lo) {
    madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);  // failure: keep 4 KiB
  }
#endif
  return t;
}

inline void check_reduction(int64_t reduction, const char* op) {
  TORCH_CHECK(reduction >= 0 && reduction <= 2, "fusedloss.", op,
              ": reduction must be 0 (none), 1 (mean) or 2 (sum), got ", reduction);
}

// Raise on the first class index that is neither ignore_index nor in [0, C): the kernels
// never read out of bounds anyway (they write NaN), but on the CPU a clear error costs
// one pass over N integers.
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

}  // namespace cpu
}  // namespace fusedloss
