"""Softmax cross-entropy: a drop-in for torch.nn.functional.cross_entropy and
torch.nn.CrossEntropyLoss, plus logit_scale, softcap, z_loss and the per-row log-sum-exp."""
import math

import torch

from . import _backends, _checks, ops, reference


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
    targets) for mean, else 1. Computed on the device: no host synchronisation."""
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
    def forward(ctx, x, ns, target, weight, loss_scale, ignore_index, label_smoothing,
                logit_scale, softcap, z_loss, reduction):
        loss, lse = ns.cross_entropy_inplace(x, target, weight, loss_scale, ignore_index,
                                             label_smoothing, logit_scale, softcap, z_loss,
                                             reduction)
        torch.autograd.graph.increment_version(x)
        ctx.mark_non_differentiable(lse)
        ctx.grad, ctx.reduction = x, reduction
        ctx.row_shape = (x.shape[0], 1, x.shape[2])
        return loss, lse

    @staticmethod
    def backward(ctx, grad_loss, grad_lse):
        if ctx.grad is None:
            raise RuntimeError(ops.CONSUMED)
        grad, ctx.grad = ctx.grad, None
        return (ops.scale_grad(grad, grad_loss, ctx.reduction, ctx.row_shape, True),) + \
            (None,) * 10


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
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
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
    name = _backends.resolve(backend, input.device, needs_reference)

    if name == "reference":
        loss, lse = reference.cross_entropy(input, target, weight, ignore_index, reduction,
                                            label_smoothing, z_loss, softcap, logit_scale)
        return (loss, lse.detach()) if return_lse else loss

    acc = ops.acc_dtype(input.dtype)
    x = as_bcs(input, class_dim)
    if prob_target:
        target_k = as_bcs(target.to(input.dtype), class_dim)
        loss_scale = count_loss_scale(x.shape[0] * x.shape[2], red, acc, input.device)
    else:
        target_k = target.reshape(-1).long()
        loss_scale = class_index_loss_scale(target_k, weight, ignore_index, red, acc)
    weight_k = weight.to(acc).contiguous() if weight is not None else None
    args = (target_k, weight_k, loss_scale, ignore_index, label_smoothing, logit_scale,
            softcap or 0.0, z_loss, red)
    ns = ops.namespace(name)
    compute_grad = input.requires_grad and torch.is_grad_enabled()
    if inplace_backward and compute_grad and not torch.compiler.is_compiling() \
            and not ops.reusable_graph_active():
        loss, lse = _InplaceCrossEntropy.apply(x, ns, *args)
    else:
        loss, lse, grad = ns.cross_entropy(x, *args, compute_grad)
        ops.owned(grad)
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
