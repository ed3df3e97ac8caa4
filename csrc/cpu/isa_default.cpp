// The CPU kernels built for the baseline instruction set of the compiler flags (any CPU).
// Named to sort before the x86 variants: the linker keeps the first copy of an inline
// function it meets, and this is the copy that must run everywhere.
#define CPU_CAPABILITY DEFAULT
#include "cpu/isa_kernels.h"

namespace fusedloss {
namespace cpu {

const KernelTable& kernel_table_default() {
  static const KernelTable table = DEFAULT::make_table("DEFAULT");
  return table;
}

}  // namespace cpu
}  // namespace fusedloss
