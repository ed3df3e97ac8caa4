// Every op of the fusedloss library, in one place. The schemas are the contract of
// fusedloss/ops.py (ops.SCHEMAS holds the same strings and a test compares them); the
// kernels register against them from csrc/cpu/*.cpp (CPU, module fusedloss._C) and
// csrc/cuda/*.cu (CUDA, module fusedloss._C_cuda); fake kernels and autograd are
// registered from Python.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(fusedloss, m) {
  m.def(
      "cross_entropy(Tensor x, Tensor target, Tensor? weight, Tensor loss_scale, "
      "int ignore_index, float label_smoothing, float logit_scale, float softcap, "
      "float z_loss, int reduction, bool compute_grad) -> (Tensor, Tensor, Tensor)");
  m.def(
      "cross_entropy_inplace(Tensor(a!) x, Tensor target, Tensor? weight, "
      "Tensor loss_scale, int ignore_index, float label_smoothing, float logit_scale, "
      "float softcap, float z_loss, int reduction) -> (Tensor, Tensor)");
  m.def(
      "focal_loss(Tensor x, Tensor target, Tensor? alpha, Tensor? weight, "
      "Tensor loss_scale, float gamma, int ignore_index, int reduction, "
      "bool compute_grad) -> (Tensor, Tensor)");
  m.def(
      "sigmoid_focal_loss(Tensor x, Tensor target, Tensor loss_scale, float alpha, "
      "float gamma, int reduction, bool compute_grad) -> (Tensor, Tensor)");
  m.def(
      "info_nce(Tensor query, Tensor key, Tensor? negatives, Tensor? labels, "
      "Tensor scale, bool symmetric) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "info_nce_backward(Tensor grad_row, Tensor grad_col, Tensor query, Tensor key, "
      "Tensor? negatives, Tensor? labels, Tensor scale, Tensor row_lse, Tensor col_lse, "
      "bool symmetric) -> (Tensor, Tensor, Tensor, Tensor)");
}

// `import fusedloss._C` only has to load this library so that the registrations above
// (and the CPU kernels') run; the module itself exposes nothing.
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
