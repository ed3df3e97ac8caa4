// The CPU kernels of every op (module fusedloss._C).
#include "common/ops.h"
#include "cpu/device.h"

TORCH_LIBRARY_IMPL(fusedloss, CPU, m) { fusedloss::register_ops<fusedloss::cpu::Device>(m); }

FUSEDLOSS_PYTHON_MODULE(_C)
