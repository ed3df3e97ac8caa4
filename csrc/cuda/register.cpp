// The CUDA kernels of every op (module fusedloss._C_cuda).
#include "common/device.h"
#include "common/ops.h"

TORCH_LIBRARY_IMPL(fusedloss, CUDA, m) {
  fusedloss::register_ops<fusedloss::Device<fusedloss::kCUDA>>(m);
}

FUSEDLOSS_PYTHON_MODULE(_C_cuda)
