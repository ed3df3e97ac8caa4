// The CUDA kernels of every op (module fusedloss._C_cuda).
#include "common/ops.h"
#include "cuda/device.h"

TORCH_LIBRARY_IMPL(fusedloss, CUDA, m) { fusedloss::register_ops<fusedloss::cuda::Device>(m); }

FUSEDLOSS_PYTHON_MODULE(_C_cuda)
