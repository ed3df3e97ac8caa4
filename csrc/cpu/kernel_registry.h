// Which compiled CPU kernel runs a launch: found by a key type (a family's launch-argument
// struct, or a tag naming one of several kernels over one struct), a dtype, and the best
// instruction set this CPU has.
//
// Each kernel header csrc/cpu/<loss>.h is compiled once per instruction set: isa_default.cpp,
// isa_x86_avx2.cpp and isa_x86_avx512.cpp each include every one of them through
// fusedloss_cpu_kernels.h, the list setup.py generates from the headers that register a
// kernel. A header registers its kernel with one line beside it,
//   FUSEDLOSS_CPU_KERNEL(JsdArgs, jsd_rows, float, double, c10::BFloat16, c10::Half)
// which defines kernel_set<JsdArgs, Isa::<that unit's instruction set>>() over constant data:
// no registration code runs at load time, so nothing compiled for AVX-512 runs before the
// CPU is known to have it. The host picks the set through cpu::kernels<Key>() (cpu/launch.h).
//
// Included by the per-ISA units, so plain data only: no ATen header (an inline ATen
// function compiled there with AVX-512 could be the copy the linker keeps).
#pragma once

#include <cstdint>
#include <type_traits>

#include "common/kernel_args.h"

// The x86 instruction-set builds use GCC's target pragma (isa_x86_*.cpp); elsewhere only
// the DEFAULT kernels exist.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FUSEDLOSS_CPU_X86_ISAS 1
#else
#define FUSEDLOSS_CPU_X86_ISAS 0
#endif

namespace c10 {
struct BFloat16;
struct Half;
}  // namespace c10

namespace fusedloss {
namespace cpu {

// Named as the CPU_CAPABILITY namespaces, so a unit's registration names its own.
enum class Isa : int { DEFAULT = 0, AVX2 = 1, AVX512 = 2 };

// The launch arguments a key's kernel reads: Key::Args for a tag, else the key itself.
template <class Key, class = void>
struct ArgsOfKey { using type = Key; };
template <class Key>
struct ArgsOfKey<Key, std::void_t<typename Key::Args>> { using type = typename Key::Args; };
template <class Key>
using ArgsOf = typename ArgsOfKey<Key>::type;

// The DType a kernel instantiated for T serves.
template <class T>
consteval DType dtype_for() {
  if constexpr (std::is_same_v<T, float>) return DType::kFloat;
  else if constexpr (std::is_same_v<T, double>) return DType::kDouble;
  else if constexpr (std::is_same_v<T, c10::BFloat16>) return DType::kBFloat16;
  else {
    static_assert(std::is_same_v<T, c10::Half>, "a CPU kernel is registered for float, "
                  "double, c10::BFloat16 or c10::Half");
    return DType::kHalf;
  }
}

// One key's kernels of one instruction set, per dtype (constant data, see above).
template <class Key>
struct KernelSet {
  struct Entry {
    // Items [begin, end) of a launch (rows, chunks, columns: the kernel's header says).
    void (*fn)(const ArgsOf<Key>&, int64_t begin, int64_t end) = nullptr;  // null: no kernel
    // Vector width of the accumulation type: the launches whose items are tiles across
    // lanes (softmax rows with S > 1) size them by it.
    int64_t lanes = 0;
  };
  Entry by_dtype[kNumDTypes];
  const Entry& operator[](DType d) const { return by_dtype[int(d)]; }
};

// Defined by FUSEDLOSS_CPU_KERNEL in the unit built for `isa`.
template <class Key, Isa isa>
const KernelSet<Key>& kernel_set();

// The set of entry_of(type_identity<T>) for each T (FUSEDLOSS_CPU_KERNEL's list).
template <class Key, class... Ts, class EntryOf>
constexpr KernelSet<Key> make_kernel_set(EntryOf entry_of) {
  KernelSet<Key> set{};
  ((set.by_dtype[int(dtype_for<Ts>())] = entry_of(std::type_identity<Ts>{})), ...);
  return set;
}

}  // namespace cpu
}  // namespace fusedloss

// Registers CPU_CAPABILITY::kernel<T> for each listed T as Key's kernel of the unit's
// instruction set. At global scope, after the kernel, inside the header's CPU_CAPABILITY
// part (only the per-ISA units expand it).
#define FUSEDLOSS_CPU_KERNEL(Key, kernel, ...)                                           \
  namespace fusedloss::cpu {                                                             \
  template <>                                                                            \
  const KernelSet<Key>& kernel_set<Key, Isa::CPU_CAPABILITY>() {                         \
    static constexpr KernelSet<Key> set = make_kernel_set<Key, __VA_ARGS__>(             \
        []<class T>(std::type_identity<T>) -> KernelSet<Key>::Entry {                    \
          return {&CPU_CAPABILITY::kernel<T>,                                            \
                  at::vec::Vectorized<math::acc_of<T>>::size()};                         \
        });                                                                              \
    return set;                                                                          \
  }                                                                                      \
  }
