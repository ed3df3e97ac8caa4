"""Which backend runs an op: what this machine has, what each op implements, and `auto`.

Backends:
  reference  plain PyTorch (fusedloss.reference), any device; every loss has it
  triton     Triton kernels (fusedloss.kernels) on CUDA tensors; on CPU tensors only under
             TRITON_INTERPRET=1 (the interpreter, used by the tests)
  cuda       the CUDA C++ extension fusedloss._C_cuda, on CUDA tensors
  cpu        the CPU C++ extension fusedloss._C, on CPU tensors

An op (fusedloss._library.Op) names the kernel backends it implements; a backend runs a
call when the op implements it and the machine can run it for the tensors' device.
"""
import functools
import importlib
import importlib.util
import os
import warnings
from pathlib import Path

import torch

from . import _library

BACKENDS = ("reference", "triton", "cuda", "cpu")
# backend="auto": per device, the first backend the op implements and the machine runs.
# CPU: the C++ kernels, measured faster than eager and torch.compile by the benchmark
# runner. CUDA: Triton first, until GPU measurements decide per op and shape class.
AUTO_ORDER = {"cpu": ("cpu", "reference"), "cuda": ("triton", "cuda", "reference")}
EXTENSIONS = {"cpu": "_C", "cuda": "_C_cuda"}
DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}
FIX = ("reinstall with `pip install --no-build-isolation -e .` (or `pip install .`) and "
       "read the [fusedloss setup] lines it prints")


@functools.lru_cache(maxsize=None)
def _load_extension(name):
    """Import fusedloss.<name>; return the reason it is unavailable, or None."""
    try:
        importlib.import_module(f"fusedloss.{name}")
    except ImportError as exc:
        return f"the C++ extension fusedloss.{name} is not built or failed to load ({exc}); {FIX}"
    return None


@functools.lru_cache(maxsize=None)
def _triton_missing():
    try:
        importlib.import_module("triton")
    except ImportError as exc:
        return f"Triton is not importable ({exc})"
    return None


def triton_interpret():
    return os.environ.get("TRITON_INTERPRET") == "1"


def _machine_reason(backend, device_type):
    """None when this machine can run `backend` on tensors of `device_type`."""
    if backend == "reference":
        return None
    if backend == "cpu":
        if device_type != "cpu":
            return f"it runs on CPU tensors only and the input is on {device_type}"
        return _load_extension("_C")
    if device_type == "cuda" and not torch.cuda.is_available():
        return "CUDA is not available on this machine (no GPU or no driver)"
    if backend == "cuda":
        if device_type != "cuda":
            return f"it runs on CUDA tensors only and the input is on {device_type}"
        return _load_extension("_C_cuda")
    if backend == "triton":
        if device_type == "cpu" and not triton_interpret():
            return "on CPU tensors Triton runs only under TRITON_INTERPRET=1"
        if device_type not in ("cpu", "cuda"):
            return f"it runs on CUDA tensors and the input is on {device_type}"
        return _triton_missing()
    return f"there is no backend named {backend!r}"


def _op_reason(op_name, backend):
    """None when op `op_name` has a `backend` implementation (and, for C++, it is loaded)."""
    if backend == "reference":
        return None
    op = _library.OPS[op_name]
    if backend not in op.backends:
        return f"fusedloss has no {backend} kernel for {op_name}"
    if backend in EXTENSIONS and not torch._C._dispatch_has_kernel_for_dispatch_key(
            f"{_library.CPP_NS}::{op.kernel_op}", DISPATCH_KEYS[backend]):
        return (f"the loaded fusedloss.{EXTENSIONS[backend]} registers no {op.kernel_op} "
                f"kernel (a stale build?); {FIX}")
    return None


# A constant for torch.compile: it is evaluated once, eagerly, while tracing (dynamo
# cannot trace the imports behind it).
@torch.compiler.assume_constant_result
def _unavailable_reason(op_name, backend, device_type):
    return _machine_reason(backend, device_type) or (
        _op_reason(op_name, backend) if op_name else None)


def unavailable_reason(backend, device, op=None):
    """None when `backend` can run `op` (an Op, or None: any op) on tensors of `device`,
    else a sentence saying why not."""
    return _unavailable_reason(op.name if op is not None else "", backend,
                               torch.device(device).type)


def available_backends(device, op=None):
    return [b for b in BACKENDS if unavailable_reason(b, device, op) is None]


def implementations(op):
    """The backends that implement `op`, whatever this machine has."""
    return ["reference", *op.backends]


def reference_required(device):
    """Why every backend runs the reference (torch ops) here, or None: on meta tensors
    (only shapes exist, and the reference computes them), under a torch.func transform
    (the kernel ops have no batching rule, and torch's autograd wrapper of a custom op
    refuses functorch) and under torch.jit.trace (it would record the Python around the
    ops, compute_grad included, as constants)."""
    if torch.compiler.is_compiling():  # torch.compile traces the ops and their fakes
        return None
    if torch.device(device).type == "meta":
        return "meta tensors"
    if _library.functorch_active():
        return "a torch.func transform"
    if torch.jit.is_tracing():
        return "torch.jit.trace"
    return None


def resolve(op, backend, device, needs_reference=None):
    """Map a user's `backend` argument to a concrete backend that runs `op` on `device`.

    needs_reference: a reason string when the call needs something only the reference
    path provides (e.g. a gradient for the target); "auto" then picks the reference and an
    explicit kernel backend raises. Every backend runs the reference where
    reference_required says so (meta tensors, torch.func transforms, torch.jit.trace).
    """
    device = torch.device(device)
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {list(BACKENDS)}, got {backend!r}")
    if reference_required(device):
        return "reference"
    if backend == "auto":
        if needs_reference:
            return "reference"
        for name in AUTO_ORDER.get(device.type, ("reference",)):
            if unavailable_reason(name, device, op) is None:
                return name
        return "reference"
    why = unavailable_reason(backend, device, op)
    if why is not None:
        raise RuntimeError(
            f"fusedloss.{op.name}: backend={backend!r} is not available: {why}. Available "
            f"for {device.type} tensors here: {available_backends(device, op)} (of the "
            f"backends that implement {op.name}: {implementations(op)})")
    if needs_reference and backend != "reference":
        raise ValueError(f"backend={backend!r} does not support {needs_reference}; "
                         "use backend='reference' (or 'auto')")
    return backend


def warn_if_extension_missing():
    """Warn once, at import, where the C++ sources are present but the CPU extension is not
    built: without it `auto` silently falls back to the slow reference path."""
    if os.environ.get("FUSEDLOSS_NO_EXT") == "1" or os.environ.get("FUSEDLOSS_BUILDING"):
        return
    sources = Path(__file__).resolve().parent.parent / "csrc"
    if sources.is_dir() and importlib.util.find_spec("fusedloss._C") is None:
        warnings.warn(f"fusedloss: the CPU C++ extension fusedloss._C is not built, so "
                      f"backend='auto' uses the slow reference path on CPU tensors; {FIX}",
                      RuntimeWarning, stacklevel=3)
