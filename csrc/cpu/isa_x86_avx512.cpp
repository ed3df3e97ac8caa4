// The CPU kernels built for AVX-512 (F, BW, VL, DQ), selected at run time on CPUs that
// have them; as isa_x86_avx2.cpp, with CPU_CAPABILITY_AVX512.
#include "cpu/kernel_table.h"
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
#include "cpu/isa_x86.h"
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
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#include "cpu/isa_kernels.h"

const fusedloss::cpu::KernelTable& fusedloss::cpu::kernel_table_avx512() {
  static const KernelTable table = AVX512::make_table("AVX512");
  return table;
}
#else
const fusedloss::cpu::KernelTable& fusedloss::cpu::kernel_table_avx512() {
  static const KernelTable table{};  // not built: the dispatcher falls back to DEFAULT
  return table;
}
#endif
