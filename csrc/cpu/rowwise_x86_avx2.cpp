// The row kernels built for AVX2 + FMA, selected at run time on CPUs that have them.
// setup.py compiles every CPU source with the same flags, so the instruction set is set
// here, before any header, with the GCC target pragma (the same effect as -mavx2 -mfma on
// this file alone); CPU_CAPABILITY_AVX2 makes at::vec use its AVX2 Vectorized and Sleef.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
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
// ATen builds with -Wno-psabi: the warning is about lambdas of its own vector headers.
#pragma GCC diagnostic ignored "-Wpsabi"
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "cpu/rowwise_impl.h"

namespace fusedloss {
namespace cpu {
const KernelTable& kernel_table_avx2() {
  static const KernelTable table = AVX2::make_table("AVX2");
  return table;
}
}  // namespace cpu
}  // namespace fusedloss

#else
#include "cpu/kernels.h"

namespace fusedloss {
namespace cpu {
const KernelTable& kernel_table_avx2() {
  static const KernelTable table{};  // not built: the dispatcher falls back to DEFAULT
  return table;
}
}  // namespace cpu
}  // namespace fusedloss
#endif
