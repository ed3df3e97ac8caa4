// The CPU launches (Device<kCPU>, declared in common/device.h) of the families shared with
// CUDA, the choice of instruction set (cpu::isa), and the deterministic sums. The
// kernels are found in the registry (cpu/launch.h); CPU-only families launch from their
// host code directly.
//
// Partial results are summed by a fixed pairwise tree afterwards, so results do not
// depend on the number of threads.
#include "common/device.h"

#include <ATen/Version.h>

#include <algorithm>
#include <cstdlib>
#include <string>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "cpu/info_nce.h"
#include "cpu/launch.h"
#include "cpu/sigmoid_focal.h"
#include "cpu/softmax_rows.h"

namespace fusedloss {
namespace cpu {

Isa isa() {
  static const Isa chosen = [] {
    // ATen's choice honours ATEN_CPU_CAPABILITY; the CPUID check guards against a
    // libtorch that reports more than this CPU has. The x86 kernels are only touched
    // after both agree (their code uses the instructions they are built for).
    const std::string cap = at::get_cpu_capability();
#if FUSEDLOSS_CPU_X86_ISAS
    __builtin_cpu_init();
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") &&
                        __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512vl") &&
                        __builtin_cpu_supports("avx512dq");
    if (cap == "AVX512" && avx512) return Isa::AVX512;
    if ((cap == "AVX512" || cap == "AVX2") && avx2) return Isa::AVX2;
#endif
    return Isa::DEFAULT;
  }();
  return chosen;
}

namespace {

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

}  // namespace
}  // namespace cpu

template <>
at::Tensor Device<kCPU>::sum_rows(const at::Tensor& rows, const at::Tensor& scale,
                                  at::ScalarType out_dtype) {
  at::Tensor total = at::empty({}, rows.options());
  const at::Tensor r = rows.contiguous();
  if (r.scalar_type() == at::kDouble) {
    double s = cpu::pairwise_sum(r.const_data_ptr<double>(), r.numel());
    if (scale.defined()) s *= scale.item<double>();  // a CPU tensor: no synchronisation
    total.fill_(s);
  } else {
    float s = cpu::pairwise_sum(r.const_data_ptr<float>(), r.numel());
    if (scale.defined()) s *= scale.item<float>();
    total.fill_(static_cast<double>(s));
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
template <>
at::Tensor Device<kCPU>::new_grad(const at::Tensor& x) {
  at::Tensor t = at::empty_like(x, at::MemoryFormat::Contiguous);
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

template <>
void Device<kCPU>::softmax_rows(const RowArgs& a) {
  const int64_t lanes = a.S > 1 ? cpu::kernels<RowArgs>()[a.dtype].lanes : 1;
  const int64_t items = a.S > 1 ? a.B * ((a.S + lanes - 1) / lanes) : a.N;
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 15) / (a.C * lanes));
  cpu::launch<RowArgs>(a.dtype, a, items, grain);
}

template <>
int64_t Device<kCPU>::sigmoid_focal_partials(int64_t n) {
  return std::max<int64_t>(1, (n + cpu::kSigmoidFocalChunk - 1) / cpu::kSigmoidFocalChunk);
}

template <>
void Device<kCPU>::sigmoid_focal(const SigmoidFocalArgs& a) {
  const int64_t chunks = (a.n + cpu::kSigmoidFocalChunk - 1) / cpu::kSigmoidFocalChunk;
  cpu::launch<SigmoidFocalArgs>(a.dtype, a, chunks, 1);
}

template <>
int64_t Device<kCPU>::info_nce_workspace(int64_t, int64_t) { return 0; }

template <>
void Device<kCPU>::info_nce_rows_fwd(const InfoNceBlockArgs& a) {
  cpu::launch<cpu::InfoNceRowsFwd>(a.acc, a, a.nb, cpu::grain_for(a.K));
}

template <>
void Device<kCPU>::info_nce_cols_fwd(const InfoNceBlockArgs& a) {
  cpu::launch<cpu::InfoNceColsFwd>(a.acc, a, a.M, cpu::grain_for(a.nb));
}

template <>
void Device<kCPU>::info_nce_rows_bwd(const InfoNceBlockArgs& a) {
  cpu::launch<cpu::InfoNceRowsBwd>(a.acc, a, a.nb, cpu::grain_for(a.K));
}

}  // namespace fusedloss
