// The C++ side of an op: a kernel reads the op's arguments by name.
//
// Every op schema is written once, in Python (fusedloss/_library.py and the loss modules
// beside it). At build time setup.py generates fusedloss_schemas.h from those schemas:
// per op a struct schema::<op> with one typed member per argument, filled from the
// dispatcher's boxed stack. A kernel is a function `std::tuple<at::Tensor...> fn(const
// schema::<op>& a)` reading a.x, a.label_smoothing, ...: an argument the schema lacks, or
// one read as the wrong type, does not compile, and a wrong number of outputs neither.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <Python.h>
#include <torch/library.h>

#include <tuple>
#include <type_traits>
#include <utility>

#include "fusedloss_schemas.h"

namespace fusedloss {

template <class Args, auto Fn>
void boxed_kernel(const c10::OperatorHandle&, torch::jit::Stack* stack) {
  using Outputs = std::invoke_result_t<decltype(Fn), const Args&>;
  static_assert(std::tuple_size_v<Outputs> == Args::kNumReturns,
                "a kernel must return as many tensors as its schema");
  // Kernel level: the tensor ops inside must not record autograd history.
  at::AutoDispatchBelowADInplaceOrView guard;
  Outputs outputs = Fn(Args(*stack));
  torch::jit::drop(*stack, Args::kNumArgs);
  std::apply([&](auto&... t) { (torch::jit::push(*stack, std::move(t)), ...); }, outputs);
}

}  // namespace fusedloss

// Registers `fn`, a function of schema::op, as the kernel of fusedloss::op.
#define FUSEDLOSS_IMPL(m, op, fn)                                                        \
  m.impl(#op, torch::CppFunction::makeFromBoxedFunction<                                 \
                  &::fusedloss::boxed_kernel<::fusedloss::schema::op, fn>>())

// The init function of a Python extension module that only has to load this library, so
// that its kernel registrations run (`import fusedloss._C`).
#define FUSEDLOSS_PYTHON_MODULE(name)                                                    \
  PyMODINIT_FUNC PyInit_##name(void) {                                                   \
    static PyModuleDef module = {PyModuleDef_HEAD_INIT, #name, nullptr, -1, nullptr};    \
    return PyModule_Create(&module);                                                     \
  }
