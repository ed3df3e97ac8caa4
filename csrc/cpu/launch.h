// The host side of a CPU kernel launch: the registered kernel set of the instruction set
// this CPU runs (cpu/kernel_registry.h), and at::parallel_for over a launch's items.
//
// Threads split the items into contiguous ranges; every item (row, chunk, column) is
// computed by one thread in a fixed order, so a kernel that writes per-item results gives
// the same bits whatever the number of threads.
//
// Host code only (ATen headers): never included by the per-ISA units.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>

#include "cpu/kernel_registry.h"

namespace fusedloss {
namespace cpu {

// The instruction set whose kernels run on this CPU, decided once (cpu/device.cpp).
Isa isa();

template <class Key>
const KernelSet<Key>& kernels() {
  static const KernelSet<Key>& set = []() -> const KernelSet<Key>& {
    switch (isa()) {
#if FUSEDLOSS_CPU_X86_ISAS
      case Isa::AVX512: return kernel_set<Key, Isa::AVX512>();
      case Isa::AVX2: return kernel_set<Key, Isa::AVX2>();
#endif
      default: return kernel_set<Key, Isa::DEFAULT>();
    }
  }();
  return set;
}

// Items per task for at::parallel_for, ~16K values of work per task.
inline int64_t grain_for(int64_t work_per_item) {
  return std::max<int64_t>(1, (int64_t(1) << 14) / std::max<int64_t>(work_per_item, 1));
}

// Runs Key's kernel for `dtype` over items [0, items).
template <class Key>
void launch(DType dtype, const ArgsOf<Key>& a, int64_t items, int64_t grain) {
  const auto fn = kernels<Key>()[dtype].fn;
  TORCH_INTERNAL_ASSERT(fn != nullptr, "fusedloss: no CPU kernel registered for dtype ",
                        int(dtype));
  at::parallel_for(0, items, grain, [&](int64_t begin, int64_t end) { fn(a, begin, end); });
}

}  // namespace cpu
}  // namespace fusedloss
