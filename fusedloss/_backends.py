"""What this machine can run, and the one table that maps a backend name to it.

Backends:
  reference  plain PyTorch (fusedloss.reference), any device, always available
  triton     Triton kernels (fusedloss.kernels) on CUDA tensors; on CPU tensors only under
             TRITON_INTERPRET=1 (the interpreter, used by the tests)
  cuda       the CUDA C++ extension fusedloss._C_cuda, on CUDA tensors
  cpu        the CPU C++ extension fusedloss._C, on CPU tensors
"""
import functools
import importlib
import os

import torch

BACKENDS = ("reference", "triton", "cuda", "cpu")


@functools.lru_cache(maxsize=None)
def _load_extension(name):
    """Import fusedloss.<name>; return the reason it is unavailable, or None."""
    try:
        importlib.import_module(f"fusedloss.{name}")
    except ImportError as exc:
        return (f"the C++ extension fusedloss.{name} is not built or failed to load ({exc}); "
                "reinstall with `pip install --no-build-isolation -e .` and read the "
                "[fusedloss setup] lines it prints")
    if name == "_C":  # it defines the fusedloss:: ops: give them fake kernels and autograd
        from . import ops
        ops.register_cpp_ops()
    return None


@functools.lru_cache(maxsize=None)
def _triton_missing():
    try:
        importlib.import_module("triton")
        importlib.import_module("fusedloss._triton")
    except ImportError as exc:
        return f"Triton or the fusedloss Triton kernels failed to import ({exc})"
    return None


def triton_interpret():
    return os.environ.get("TRITON_INTERPRET") == "1"


def unavailable_reason(backend, device):
    """None when `backend` can run on tensors of `device`, else a sentence saying why not."""
    return _unavailable_reason(backend, torch.device(device).type)


# A constant for torch.compile: it is evaluated once, eagerly, while tracing (dynamo
# cannot trace the imports behind it).
@torch.compiler.assume_constant_result
def _unavailable_reason(backend, device_type):
    device = torch.device(device_type)
    if backend == "reference":
        return None
    if backend == "cpu":
        if device.type != "cpu":
            return f"it runs on CPU tensors only and the input is on {device}"
        return _load_extension("_C")
    if device.type == "cuda" and not torch.cuda.is_available():
        return "CUDA is not available on this machine (no GPU or no driver)"
    if backend == "cuda":
        if device.type != "cuda":
            return f"it runs on CUDA tensors only and the input is on {device}"
        return _load_extension("_C") or _load_extension("_C_cuda")
    if backend == "triton":
        if device.type == "cpu" and not triton_interpret():
            return "on CPU tensors Triton runs only under TRITON_INTERPRET=1"
        if device.type not in ("cpu", "cuda"):
            return f"it runs on CUDA tensors and the input is on {device}"
        return _triton_missing()
    return f"there is no backend named {backend!r}"


def available_backends(device):
    return [b for b in BACKENDS if unavailable_reason(b, device) is None]


# backend="auto": the first available entry for the device. CPU: the C++ kernel, which
# the benchmark runner measures faster than eager and torch.compile. CUDA: Triton first
# until GPU measurements (benchmarks/NOTES.md) decide per loss and shape class.
AUTO_ORDER = {"cpu": ("cpu", "reference"), "cuda": ("triton", "cuda", "reference")}


def resolve(backend, device, needs_reference=None):
    """Map a user's `backend` argument to a concrete available backend name.

    needs_reference: a reason string when the call needs something only the reference
    path provides (e.g. a gradient for the target); "auto" then picks the reference and an
    explicit kernel backend raises.
    """
    device = torch.device(device)
    if backend == "auto":
        if needs_reference:
            return "reference"
        for name in AUTO_ORDER.get(device.type, ("reference",)):
            if unavailable_reason(name, device) is None:
                return name
        return "reference"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {list(BACKENDS)}, got {backend!r}")
    why = unavailable_reason(backend, device)
    if why is not None:
        raise RuntimeError(
            f"backend={backend!r} is not available: {why}. Available for {device.type} "
            f"tensors here: {available_backends(device)}")
    if needs_reference and backend != "reference":
        raise ValueError(f"backend={backend!r} does not support {needs_reference}; "
                         "use backend='reference' (or 'auto')")
    return backend
