// The row kernels built for AVX-512 (F, BW, VL, DQ), selected at run time on CPUs that
// have them. The instruction set is set here, before any header, with the GCC target
// pragma: setup.py compiles every CPU source with the same flags, and the pragma has the
// effect of -mavx512f -mavx512bw -mavx512vl -mavx512dq -mfma on this file alone.
// CPU_CAPABILITY_AVX512 makes at::vec use its AVX-512 Vectorized and Sleef.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
// In C++, GCC's target pragma changes code generation but not the feature macros;
// sleef.h declares its vector functions only under them, so they are set by hand.
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __F16C__
#define __F16C__ 1
#endif
#ifndef __AVX512F__
#define __AVX512F__ 1
#endif
#ifndef __AVX512BW__
#define __AVX512BW__ 1
#endif
#ifndef __AVX512VL__
#define __AVX512VL__ 1
#endif
#ifndef __AVX512DQ__
#define __AVX512DQ__ 1
#endif
// ATen builds with -Wno-psabi: the warning is about lambdas of its own vector headers.
#pragma GCC diagnostic ignored "-Wpsabi"
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#include "cpu/rowwise_impl.h"

namespace fusedloss {
namespace cpu {
const KernelTable& kernel_table_avx512() {
  static const KernelTable table = AVX512::make_table("AVX512");
  return table;
}
}  // namespace cpu
}  // namespace fusedloss

#else
#include "cpu/kernels.h"

namespace fusedloss {
namespace cpu {
const KernelTable& kernel_table_avx512() {
  static const KernelTable table{};  // not built: the dispatcher falls back to DEFAULT
  return table;
}
}  // namespace cpu
}  // namespace fusedloss
#endif
