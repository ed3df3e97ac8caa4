// The CPU kernels built for AVX2 + FMA, selected at run time on CPUs that have them.
// setup.py compiles every CPU source with the same flags, so the instruction set is set
// here, before any header, with the GCC target pragma (the effect of -mavx2 -mfma on this
// file alone); CPU_CAPABILITY_AVX2 makes at::vec use its AVX2 Vectorized and Sleef.
#include "cpu/kernel_table.h"
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
#include "cpu/isa_x86.h"
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "cpu/isa_kernels.h"

const fusedloss::cpu::KernelTable& fusedloss::cpu::kernel_table_avx2() {
  static const KernelTable table = AVX2::make_table("AVX2");
  return table;
}
#else
const fusedloss::cpu::KernelTable& fusedloss::cpu::kernel_table_avx2() {
  static const KernelTable table{};  // not built: the dispatcher falls back to DEFAULT
  return table;
}
#endif
