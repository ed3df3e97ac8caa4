"""Argument checks shared by the losses: every refusal names the argument and the problem.

Value checks that need the data (class indices in range) run only where they cost no host
synchronisation, i.e. for tensors not on a CUDA device; on CUDA every backend turns an
out-of-range index into a NaN loss for that position instead of reading out of bounds.
"""
import math
import numbers

import torch

from . import _backends, _library
from ._library import acc_dtype

REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def reduction_code(reduction):
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {list(REDUCTIONS)}, got {reduction!r}")
    return REDUCTIONS[reduction]


def tensor(name, value):
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def floating(name, value):
    tensor(name, value)
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor (float16, bfloat16, float32 "
                        f"or float64), got {value.dtype}")
    return value


SYMBOLIC = (torch.SymInt, torch.SymFloat)


def number(name, value, *, low=None, high=None, low_open=False, allow_none=False):
    """A real number within [low, high] (low excluded when low_open), as a float. Under
    torch.compile with dynamic shapes a number may be symbolic (SymInt, SymFloat): it stays
    symbolic, and the range checks become guards, so they neither specialise it nor break
    the graph."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, *SYMBOLIC)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    # As a float, a SymInt as a SymFloat (value * 1.0: dynamo before torch 2.6 cannot
    # trace torch.sym_float).
    if not isinstance(value, torch.SymFloat):
        value = value * 1.0 if isinstance(value, torch.SymInt) else float(value)
    # Comparisons, not math.isnan: they hold for symbolic values too, and NaN fails them.
    if not -math.inf < value < math.inf:
        raise ValueError(f"{name} must be finite, got {value}")
    if low is not None and not (value > low if low_open else value >= low):
        bound = f"> {low}" if low_open else f">= {low}"
        raise ValueError(f"{name} must be {bound}, got {value}")
    if high is not None and not value <= high:
        raise ValueError(f"{name} must be <= {high}, got {value}")
    return value


def integer(name, value):
    """An int (not a bool), as torch's integer arguments; a SymInt under torch.compile."""
    if isinstance(value, bool) or not isinstance(value, (int, torch.SymInt)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return value


def same_dtype(name, value, ref, ref_name="input", why="they must match", autocast=False):
    """value's dtype is ref's. autocast: an operand of a float32-list op (a class weight),
    which under autocast torch computes in float32 (float64 stays): only that must match."""
    if autocast and _library.autocast_on(ref.device):
        if acc_dtype(value.dtype) != acc_dtype(ref.dtype):
            raise TypeError(f"{name} has dtype {value.dtype} but {ref_name} has {ref.dtype}; "
                            f"under autocast both are computed in float32 unless float64, "
                            f"so both or neither must be float64")
    elif value.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {value.dtype} but {ref_name} has {ref.dtype}; "
                        f"{why}")


def feature_rows(named):
    """2-D floating (rows, D) tensors, given as [(name, tensor or None: absent)], every one
    with the first one's D, dtype and device (embeddings, features)."""
    first, ref = named[0]
    for name, value in named:
        if value is None:
            continue
        floating(name, value)
        if value.dim() != 2:
            raise ValueError(f"{name} must be a 2-D (rows, D) tensor, got shape "
                             f"{tuple(value.shape)}")
        if value.shape[1] != ref.shape[1]:
            raise ValueError(f"{name} has feature dimension D={value.shape[1]} but {first} "
                             f"has D={ref.shape[1]}; they must match")
        same_dtype(name, value, ref, first)
        same_device(name, value, ref)


def same_device(name, value, ref):
    if value.device != ref.device:
        raise ValueError(f"{name} is on {value.device} but input is on {ref.device}")


def class_vector(name, value, n_classes, input):
    """A (C,) floating tensor on input's device (weight, per-class alpha); n_classes None:
    any C (the caller checks it)."""
    floating(name, value)
    if value.dim() != 1 or (n_classes is not None and value.shape[0] != n_classes):
        raise ValueError(f"{name} must have shape ({n_classes},), one entry per class, got "
                         f"{tuple(value.shape)}")
    same_device(name, value, input)
    if value.requires_grad:
        raise ValueError(f"{name} must not require grad: its derivative is not implemented "
                         "(as in torch.nn.functional.cross_entropy)")
    return value


def class_input(input):
    """input of shape (C), (N, C) or (N, C, d1, ..., dK): returns (class_dim, C)."""
    floating("input", input)
    if input.dim() == 0:
        raise ValueError("input must have shape (C), (N, C) or (N, C, d1, ..., dK); got a "
                         "0-dim tensor")
    class_dim = 0 if input.dim() == 1 else 1
    return class_dim, input.shape[class_dim]


def data_checks(value):
    """Whether checks that read tensor values may run: not on CUDA (a host sync), not
    under torch.compile (a data-dependent branch would break the graph), and only on a
    plain tensor with data (not meta, fake or functorch-wrapped: vmap batches values)."""
    return (not torch.compiler.is_compiling() and value.device.type != "cuda"
            and type(value) is torch.Tensor
            and _backends.reference_required(value.device) is None and value.numel() > 0)


def class_index_target(target, positions, n_classes, ignore_index, device):
    """Class-index targets: int64 (or uint8, as torch accepts) of the positions' shape (the
    logits' without the class dimension), every entry ignore_index or in [0, C)."""
    if target.dtype not in (torch.int64, torch.uint8):
        raise TypeError(f"target must hold class indices as int64 (or uint8), or class "
                        f"probabilities as a floating tensor; got {target.dtype}")
    if target.shape != positions:
        raise ValueError(f"target has shape {tuple(target.shape)} but the logits need class "
                         f"indices of shape {tuple(positions)}")
    if target.device != device:
        raise ValueError(f"target is on {target.device} but input is on {device}")
    if n_classes is not None and data_checks(target):  # None: only the caller knows C
        bad = (target != ignore_index) & ((target < 0) | (target >= n_classes))
        if bool(bad.any()):
            value = int(target[bad].flatten()[0])
            raise IndexError(f"target contains the class index {value}, outside [0, "
                             f"{n_classes}) and not ignore_index ({ignore_index})")


def probability_target(target, logits_shape, ignore_index, device):
    if target.shape != logits_shape:
        raise ValueError(f"target holds class probabilities (a floating tensor), so it must "
                         f"have the logits' shape {tuple(logits_shape)}; got "
                         f"{tuple(target.shape)}")
    if target.device != device:
        raise ValueError(f"target is on {target.device} but input is on {device}")
    if ignore_index != -100:
        raise ValueError("ignore_index is not supported with class-probability (floating) "
                         "targets, as in torch")
