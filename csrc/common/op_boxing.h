// The C++ side of an op: a kernel reads the op's arguments by name.
//
// Every op schema is written once, in Python (fusedloss/_library.py and the loss modules
// beside it). At build time setup.py generates fusedloss_schemas.h from those schemas:
// per op a struct schema::<op> with one typed member per argument, filled from the
// dispatcher's boxed stack. A kernel is a function `std::tuple<at::Tensor...> fn(const
// schema::<op>& a)` reading a.x, a.label_smoothing, ...: an argument the schema lacks, or
// one read as the wrong type, does not compile, and a wrong number of outputs neither.
//
// Each common/<loss>_ops.h registers its own ops at its end (FUSEDLOSS_REGISTER_OPS
// below); csrc/<device>/register.cpp names its device and includes every *_ops.h through
// the list setup.py generates (fusedloss_ops.h), so no hand-kept list of ops exists.
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

// The registration at the end of each common/<loss>_ops.h:
//   FUSEDLOSS_REGISTER_OPS(softmax_rows, m, Device) {
//     FUSEDLOSS_IMPL(m, cross_entropy, &cross_entropy<Device>);
//   }
// defines register_softmax_rows<Device>(torch::Library& m) with that body and registers it
// for the device whose register.cpp is being compiled: that unit defines
// FUSEDLOSS_REGISTERING_CPU or FUSEDLOSS_REGISTERING_CUDA before any include.
// FUSEDLOSS_REGISTER_CPU_OPS does the same on the CPU only: the ops whose only C++ kernel
// is a CPU one (on a GPU they run their Triton kernels). Where neither is defined the body
// is an unused template. TORCH_LIBRARY_IMPL may appear any number of times per key.
#define FUSEDLOSS_REGISTER_OPS(family, m, Device) \
  FUSEDLOSS_REGISTER_(family, m, Device, FUSEDLOSS_REGISTER_ON_DEVICE_)
#define FUSEDLOSS_REGISTER_CPU_OPS(family, m, Device) \
  FUSEDLOSS_REGISTER_(family, m, Device, FUSEDLOSS_REGISTER_ON_CPU_)

// Declares the function, registers it where `on_device` says, and opens its definition.
#define FUSEDLOSS_REGISTER_(family, m, Device, on_device)                                \
  template <class Device>                                                                \
  void register_##family(torch::Library& m);                                             \
  on_device(register_##family)                                                           \
  template <class Device>                                                                \
  void register_##family(torch::Library& m)

#define FUSEDLOSS_LIBRARY_IMPL_(fn, key)                                                 \
  TORCH_LIBRARY_IMPL(fusedloss, key, m) {                                                \
    fn<::fusedloss::Device<c10::DeviceType::key>>(m);                                    \
  }

#if defined(FUSEDLOSS_REGISTERING_CPU)
#include "common/device.h"
#define FUSEDLOSS_REGISTER_ON_DEVICE_(fn) FUSEDLOSS_LIBRARY_IMPL_(fn, CPU)
#define FUSEDLOSS_REGISTER_ON_CPU_(fn) FUSEDLOSS_LIBRARY_IMPL_(fn, CPU)
#elif defined(FUSEDLOSS_REGISTERING_CUDA)
#include "common/device.h"
#define FUSEDLOSS_REGISTER_ON_DEVICE_(fn) FUSEDLOSS_LIBRARY_IMPL_(fn, CUDA)
#define FUSEDLOSS_REGISTER_ON_CPU_(fn)
#else
#define FUSEDLOSS_REGISTER_ON_DEVICE_(fn)
#define FUSEDLOSS_REGISTER_ON_CPU_(fn)
#endif

// The init function of a Python extension module that only has to load this library, so
// that its kernel registrations run (`import fusedloss._C`).
#define FUSEDLOSS_PYTHON_MODULE(name)                                                    \
  PyMODINIT_FUNC PyInit_##name(void) {                                                   \
    static PyModuleDef module = {PyModuleDef_HEAD_INIT, #name, nullptr, -1, nullptr};    \
    return PyModule_Create(&module);                                                     \
  }
