// The CPU kernels of every op (module fusedloss._C).
#include "common/device.h"
#include "common/ops.h"

TORCH_LIBRARY_IMPL(fusedloss, CPU, m) {
  fusedloss::register_ops<fusedloss::Device<fusedloss::kCPU>>(m);
}

FUSEDLOSS_PYTHON_MODULE(_C)
