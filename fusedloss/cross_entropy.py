"""Softmax cross-entropy: a drop-in for torch.nn.functional.cross_entropy and
torch.nn.CrossEntropyLoss, plus logit_scale, softcap, z_loss and the per-row log-sum-exp.

The algebra every backend computes, with the names the kernels use (Triton, CPU and CUDA
alike). The ops take x as (B, C, S), contiguous: row r = b*S + s holds x[b, :, s], so
(N, C) inputs have S = 1 and (N, C, d1..dK) inputs are read strided, never transposed.
"acc" is float64 for float64 inputs and float32 otherwise. Per row:

    z_c    = logit_scale * x_c, then softcap * tanh(z_c / softcap) when softcap > 0
    m      = max_c z_c,   s = sum_c exp(z_c - m),   lse = m + log s,   p_c = exp(z_c - m) / s
    w_c    = weight[c] (1 without weights),   W = sum_c w_c,   eps = label_smoothing

  class-index target t (t == ignore_index: loss and gradient 0; t outside [0, C): NaN,
  never an out-of-bounds read):
    loss   = (1 - eps) w_t (lse - z_t) + eps/C sum_c w_c (lse - z_c) + z_loss w_t lse^2
  probability target q (B, C, S): t'_c = (1 - eps) q_c + eps/C,  T = sum_c w_c t'_c
    loss   = T lse - sum_c w_c t'_c z_c + z_loss lse^2

  and in both cases the gradient is one affine function of p:
    dloss/dz_c = p_c * p_coef - w_c * w_coef - [c == t] * t_coef
      class index:  p_coef = (1-eps) w_t + eps W/C + 2 z_loss w_t lse,  w_coef = eps/C,
                    t_coef = (1-eps) w_t
      probability:  p_coef = T + 2 z_loss lse,  w_coef * w_c = w_c t'_c,  t_coef = 0
    dloss/dx_c = dloss/dz_c * dz_c/dx_c,  dz/dx = logit_scale (1 - (z / softcap)^2)

  The ops scale the gradient by loss_scale, a 0-dim acc tensor (1/denominator for the
  mean, 1 otherwise, computed on the device so no backend synchronises), and reduce the
  loss to sum_r loss_r * loss_scale unless reduction is "none" (0).
"""
import math

import torch

from . import _backends, _checks, _library, reference
from ._library import Op, acc_dtype, grad_output, loss_output, rows_of


# ------------------------------------------------------------------------------ ops
def _inplace_outputs(a):
    lse = a.x.new_empty((rows_of(a.x),), dtype=acc_dtype(a.x.dtype))
    return loss_output(a.x, rows_of(a.x), a.reduction), lse


def _outputs(a):
    return (*_inplace_outputs(a), grad_output(a.x, a.compute_grad))


def _reference(a):
    """The op's loss output in torch ops (for higher-order gradients)."""
    B, C, S = a.x.shape
    target = a.target if a.target.is_floating_point() else a.target.view(B, S)
    rows, _ = reference.cross_entropy(a.x, target, a.weight, a.ignore_index, "none",
                                      a.label_smoothing, a.z_loss, a.softcap or None,
                                      a.logit_scale)
    return (_library.reduce_reference_rows(rows, a, a.x.dtype),)


_ARGS = ("Tensor target, Tensor? weight, Tensor loss_scale, int ignore_index, "
         "float label_smoothing, float logit_scale, float softcap, float z_loss, "
         "int reduction")

CROSS_ENTROPY = Op(
    "cross_entropy",
    f"(Tensor x, {_ARGS}, bool compute_grad) -> (Tensor loss, Tensor lse, Tensor grad)",
    outputs=_outputs, backends=("triton", "cpu", "cuda"), kernels="cross_entropy",
    reference=_reference,
    **_library.SavedGradient(lambda x: (x.shape[0], 1, x.shape[2])).op_kwargs()).define()

# The same, with the gradient written over x (inplace_backward=True).
CROSS_ENTROPY_INPLACE = Op(
    "cross_entropy_inplace", f"(Tensor(a!) x, {_ARGS}) -> (Tensor loss, Tensor lse)",
    outputs=_inplace_outputs, backends=("triton", "cpu", "cuda"),
    kernels="cross_entropy").define()


# ------------------------------------------------------------------------------ helpers
def as_bcs(input, class_dim):
    """View input ((C), (N, C) or (N, C, d...)) as the ops' (B, C, S) layout.

    A contiguous input is only reshaped, never copied: row r = b*S + s of the ops is
    input[b, :, s...], read with class stride S.
    """
    if class_dim == 0:
        shape = (1, input.shape[0], 1)
    else:
        shape = (input.shape[0], input.shape[1], math.prod(input.shape[2:]))
    return input.contiguous().view(shape)


def class_index_loss_scale(target_rows, weight, ignore_index, reduction, acc):
    """The 0-dim factor for every row's loss and gradient: 1/(summed weights of counted
    targets) for mean, else 1. Computed on the device: no host synchronisation. A total
    weight of 0 gives inf (the mean is then NaN, as torch's); a negative one divides."""
    if reduction != 1:
        return torch.ones((), dtype=acc, device=target_rows.device)
    counted = target_rows != ignore_index
    if weight is None:
        denominator = counted.sum(dtype=acc)
    else:
        in_range = counted & (target_rows >= 0) & (target_rows < weight.shape[0])
        safe = torch.where(in_range, target_rows, torch.zeros_like(target_rows))
        denominator = (weight.to(acc)[safe] * counted).sum()
    return 1.0 / denominator


def count_loss_scale(count, reduction, acc, device):
    """1/count for mean (inf for an empty batch, so the mean is NaN as in torch), else 1."""
    value = (1.0 / count if count else float("inf")) if reduction == 1 else 1.0
    return torch.full((), value, dtype=acc, device=device)


class _InplaceCrossEntropy(torch.autograd.Function):
    """inplace_backward=True: the op writes the gradient over the logits buffer, so fwd+bwd
    needs no memory beyond the logits. The version counter is bumped, so any earlier op
    that saved the logits for its own backward raises instead of using the overwritten data."""

    @staticmethod
    def forward(ctx, x, kwargs, backend):
        loss, lse = CROSS_ENTROPY_INPLACE.call(backend, x=x, **kwargs)
        torch.autograd.graph.increment_version(x)
        ctx.mark_non_differentiable(lse)
        ctx.grad, ctx.reduction = x, kwargs["reduction"]
        ctx.row_shape = (x.shape[0], 1, x.shape[2])
        return loss, lse

    @staticmethod
    def backward(ctx, grad_loss, grad_lse):
        if torch.is_grad_enabled():
            raise RuntimeError("fusedloss.cross_entropy: inplace_backward=True overwrites the "
                               "logits with the gradient, so there is nothing to take a "
                               "higher-order gradient of; use inplace_backward=False")
        if ctx.grad is None:
            raise RuntimeError(_library.CONSUMED)
        grad, ctx.grad = ctx.grad, None
        return _library.scale_grad(grad, grad_loss, ctx.reduction, ctx.row_shape, True), \
            None, None


# ------------------------------------------------------------------------------ the loss
def cross_entropy(input, target, weight=None, ignore_index=-100, reduction="mean",
                  label_smoothing=0.0, *, z_loss=0.0, softcap=None, logit_scale=1.0,
                  return_lse=False, inplace_backward=False, backend="auto"):
    """Softmax cross-entropy with the semantics of torch.nn.functional.cross_entropy.

    input: (C), (N, C) or (N, C, d1, ..., dK) logits. target: class indices (int64) of
    shape (), (N) or (N, d1, ..., dK), or class probabilities of input's shape.
    weight, ignore_index, reduction, label_smoothing: as in torch, alone or together.

    Extras (all off by default):
      logit_scale  multiplies the logits before the softmax (an inverse temperature).
      softcap      softcap * tanh(logits / softcap) before the softmax (Gemma 2).
      z_loss       adds z_loss * lse^2 for each counted position (PaLM), weighted and
                   reduced like the loss (unweighted for probability targets).
      return_lse   also return the per-position log-sum-exp of the transformed logits
                   (shape of the target positions, float32 or float64). It is returned
                   detached: no gradient flows through it (use z_loss for a penalty on it).
      inplace_backward  write the gradient over `input`'s buffer (kernel backends, eager
                   mode): the logits are overwritten by the forward, so use it only when
                   nothing else needs them; misuse raises through autograd's version check.
      backend      "auto", "reference", "triton", "cuda" or "cpu".
    """
    red = _checks.reduction_code(reduction)
    class_dim, n_classes = _checks.class_input(input)
    _checks.tensor("target", target)
    label_smoothing = _checks.number("label_smoothing", label_smoothing, low=0.0, high=1.0)
    logit_scale = _checks.number("logit_scale", logit_scale, low=0.0, low_open=True)
    softcap = _checks.number("softcap", softcap, low=0.0, low_open=True, allow_none=True)
    z_loss = _checks.number("z_loss", z_loss, low=0.0)
    _checks.integer("ignore_index", ignore_index)
    prob_target = target.is_floating_point()
    if prob_target:
        _checks.probability_target(target, input, ignore_index)
    else:
        _checks.class_index_target(target, input, class_dim, n_classes, ignore_index)
    if weight is not None:
        _checks.class_vector("weight", weight, n_classes, input)
        if weight.dtype != input.dtype:
            raise TypeError(f"weight has dtype {weight.dtype} but input has {input.dtype}; "
                            "torch requires them to match")
    needs_reference = ("a gradient for probability targets"
                       if prob_target and target.requires_grad else None)
    name = _backends.resolve(CROSS_ENTROPY, backend, input.device, needs_reference)

    if name == "reference":
        loss, lse = reference.cross_entropy(input, target, weight, ignore_index, reduction,
                                            label_smoothing, z_loss, softcap, logit_scale)
        return (loss, lse.detach()) if return_lse else loss

    acc = acc_dtype(input.dtype)
    x = as_bcs(input, class_dim)
    if prob_target:
        target_k = as_bcs(target.to(input.dtype), class_dim)
        loss_scale = count_loss_scale(x.shape[0] * x.shape[2], red, acc, input.device)
    else:
        target_k = target.reshape(-1).long()
        loss_scale = class_index_loss_scale(target_k, weight, ignore_index, red, acc)
    kwargs = dict(target=target_k, weight=weight.to(acc).contiguous() if weight is not None
                  else None, loss_scale=loss_scale, ignore_index=ignore_index,
                  label_smoothing=label_smoothing, logit_scale=logit_scale,
                  softcap=softcap or 0.0, z_loss=z_loss, reduction=red)
    compute_grad = input.requires_grad and torch.is_grad_enabled()
    if inplace_backward and compute_grad and not torch.compiler.is_compiling() \
            and not _library.reusable_graph_active():
        loss, lse = _InplaceCrossEntropy.apply(x, kwargs, name)
    else:
        loss, lse, grad = CROSS_ENTROPY.call(name, x=x, compute_grad=compute_grad, **kwargs)
        _library.owned(grad)
    positions = target.shape if not prob_target else (
        input.shape[:class_dim] + input.shape[class_dim + 1:])
    if red == 0:
        loss = loss.view(positions)
    return (loss, lse.view(positions)) if return_lse else loss


class CrossEntropyLoss(torch.nn.Module):
    """Drop-in for torch.nn.CrossEntropyLoss; see fusedloss.cross_entropy for the extras."""

    def __init__(self, weight=None, ignore_index=-100, reduction="mean",
                 label_smoothing=0.0, *, z_loss=0.0, softcap=None, logit_scale=1.0,
                 return_lse=False, inplace_backward=False, backend="auto"):
        super().__init__()
        _checks.reduction_code(reduction)
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap
        self.logit_scale = logit_scale
        self.return_lse = return_lse
        self.inplace_backward = inplace_backward
        self.backend = backend

    def forward(self, input, target):
        return cross_entropy(input, target, self.weight, self.ignore_index, self.reduction,
                             self.label_smoothing, z_loss=self.z_loss, softcap=self.softcap,
                             logit_scale=self.logit_scale, return_lse=self.return_lse,
                             inplace_backward=self.inplace_backward, backend=self.backend)

    def extra_repr(self):
        return (f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
                f"label_smoothing={self.label_smoothing}, backend={self.backend!r}")
