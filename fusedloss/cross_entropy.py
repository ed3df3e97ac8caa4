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

  A per-row weight r_w (token_weight; 1 without) multiplies the row's loss and, so, its
  three coefficients. The entropy of the row's softmax, when asked for, is
    H = sum_c p_c (lse - z_c) = log s + sum_c p_c d_c,   d_c = m - z_c >= 0.

  The ops scale the gradient by loss_scale, a 0-dim acc tensor (1/denominator for the
  mean, 1 otherwise, computed on the device so no backend synchronises), and return the
  loss in acc: the rows for reduction "none" (0), else sum_r loss_r * loss_scale.
"""
import math
import typing

import torch

from . import _backends, _checks, _dtensor, _library, reference, vocab_parallel
from ._library import Op, acc_dtype, grad_output, rows_of
from .log_probs import RowEntropy
from ._module import LossModule


# ------------------------------------------------------------------------------ ops
def _inplace_outputs(a):
    x, acc = a.x, acc_dtype(a.x.dtype)
    rows = rows_of(x)
    return (x.new_empty((rows,) if a.reduction == 0 else (), dtype=acc),
            x.new_empty((rows,), dtype=acc),
            x.new_empty((rows,) if a.compute_entropy else (0,), dtype=acc))


def _outputs(a):
    return (*_inplace_outputs(a), grad_output(a.x, a.compute_grad))


def _reference(a):
    """The op's loss output in torch ops (for higher-order gradients)."""
    B, C, S = a.x.shape
    target = a.target if a.target.is_floating_point() else a.target.view(B, S)
    rows, _ = reference.cross_entropy(
        a.x, target, a.weight, a.ignore_index, "none", a.label_smoothing, a.z_loss,
        a.softcap or None, a.logit_scale,
        token_weight=a.row_weight.view(B, S) if a.row_weight is not None else None)
    return (_library.reduce_reference_rows(rows, a, acc_dtype(a.x.dtype)),)


_ARGS = ("Tensor target, Tensor? weight, Tensor? row_weight, Tensor loss_scale, "
         "int ignore_index, float label_smoothing, float logit_scale, float softcap, "
         "float z_loss, int reduction, bool compute_entropy")

CROSS_ENTROPY = Op(
    "cross_entropy",
    f"(Tensor x, {_ARGS}, bool compute_grad) "
    "-> (Tensor loss, Tensor lse, Tensor entropy, Tensor grad)",
    outputs=_outputs, backends=("triton", "cpu", "cuda"), kernels="cross_entropy",
    reference=_reference,
    **_library.SavedGradient(lambda x: (x.shape[0], 1, x.shape[2])).op_kwargs()).define()

# The same, with the gradient written over x (inplace_backward=True, and the chunks of
# linear_cross_entropy).
CROSS_ENTROPY_INPLACE = Op(
    "cross_entropy_inplace",
    f"(Tensor(a!) x, {_ARGS}) -> (Tensor loss, Tensor lse, Tensor entropy)",
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


def mean_scale(counted_weight, reduction, acc, device):
    """The 0-dim factor for every row's loss and gradient: 1 / sum(counted_weight) for the
    mean, else 1. counted_weight is a tensor (computed on the device: no host sync) or a
    Python count. A total of 0 gives inf, so the mean is NaN as torch's; a negative one
    divides, as torch's does."""
    if reduction != 1:
        return torch.ones((), dtype=acc, device=device)
    if isinstance(counted_weight, torch.Tensor):
        return 1.0 / counted_weight.sum(dtype=acc)
    return torch.full((), 1.0 / counted_weight if counted_weight else float("inf"),
                      dtype=acc, device=device)


def class_index_weights(target_rows, weight, ignore_index, token_weight=None):
    """Each position's weight in the mean's denominator: weight[t] (1 without) times its
    token weight, 0 where ignored. A Python count when there are neither."""
    counted = target_rows != ignore_index
    if weight is None and token_weight is None:
        return counted
    w = counted.to(weight.dtype if weight is not None else token_weight.dtype)
    if weight is not None:
        in_range = counted & (target_rows >= 0) & (target_rows < weight.shape[0])
        w = w * weight[torch.where(in_range, target_rows, torch.zeros_like(target_rows))]
    return w * token_weight if token_weight is not None else w


def mean_denominator(target, weight, token_weight, ignore_index):
    """The mean's denominator over these positions, as cross_entropy divides by it: the
    counted positions' class weights (and token weights); for probability targets the
    positions (or their token weights)."""
    if target.is_floating_point():  # classes on dimension 1 (0 for one position)
        shape = target.shape[1:] if target.dim() == 1 else target.shape[:1] + target.shape[2:]
        return token_weight.sum() if token_weight is not None else math.prod(shape)
    counted = class_index_weights(target, weight, -100 if ignore_index is None else ignore_index,
                                  token_weight)
    return counted.sum()


class _InplaceCrossEntropy(torch.autograd.Function):
    """inplace_backward=True: the op writes the gradient over the logits buffer, so fwd+bwd
    needs no memory beyond the logits. The version counter is bumped, so any earlier op
    that saved the logits for its own backward raises instead of using the overwritten data."""

    @staticmethod
    def forward(ctx, x, kwargs, backend):
        loss, lse, entropy = CROSS_ENTROPY_INPLACE.call(backend, x=x, **kwargs)
        torch.autograd.graph.increment_version(x)
        ctx.mark_non_differentiable(lse, entropy)
        ctx.grad, ctx.reduction = x, kwargs["reduction"]
        ctx.row_shape = (x.shape[0], 1, x.shape[2])
        return loss, lse, entropy

    @staticmethod
    def backward(ctx, grad_loss, grad_lse, grad_entropy):
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
class Options(typing.NamedTuple):
    reduction: int
    ignore_index: int
    label_smoothing: float
    logit_scale: float
    softcap: typing.Optional[float]
    z_loss: float
    positions: tuple
    prob_target: bool
    needs_reference: typing.Optional[str]


def check_options(input, target, weight, token_weight, logits_shape, class_dim, reduction,
                  ignore_index, label_smoothing, logit_scale, softcap, z_loss,
                  vocab_parallel=False):
    """The checks of every cross-entropy argument but the logits themselves (shared with
    linear_cross_entropy, whose logits exist only as `logits_shape`). Returns the options,
    normalised, with the reduction code, whether the target holds probabilities, the
    positions' shape, and why the call needs the reference path (or None).
    vocab_parallel: the logits hold this rank's slice of the classes, so class indices
    and the class weight are global (fusedloss/vocab_parallel.py checks them against all the
    ranks' classes)."""
    _checks.tensor("target", target)
    ignore_index = _checks.integer("ignore_index", -100 if ignore_index is None else ignore_index)
    positions = logits_shape[:class_dim] + logits_shape[class_dim + 1:]
    prob_target = check_target_and_weight(target, weight, logits_shape, class_dim,
                                          ignore_index, input, vocab_parallel)
    check_token_weight(token_weight, positions, input)
    return Options(
        _checks.reduction_code(reduction), ignore_index,
        _checks.number("label_smoothing", label_smoothing, low=0.0, high=1.0),
        _checks.number("logit_scale", logit_scale, low=0.0, low_open=True),
        _checks.number("softcap", softcap, low=0.0, low_open=True, allow_none=True),
        _checks.number("z_loss", z_loss, low=0.0), positions, prob_target,
        "a gradient for probability targets" if prob_target and target.requires_grad else
        "a gradient for token_weight" if token_weight is not None and token_weight.requires_grad
        else None)


def kernel_args(o, target_k, weight, token_weight, input):
    """The cross-entropy op arguments every kernel path shares: the target as the kernels
    read it (target_k: class indices (rows,) or probabilities), the class and row weights
    in the accumulation dtype, and the mean's scale."""
    acc = acc_dtype(input.dtype)
    row_weight = token_weight.reshape(-1).to(acc) if token_weight is not None else None
    weight = weight.to(acc).contiguous() if weight is not None else None
    if o.prob_target:
        counted = row_weight if row_weight is not None else math.prod(o.positions)
    else:
        counted = class_index_weights(target_k, weight, o.ignore_index,
                                      row_weight.view(target_k.shape)
                                      if row_weight is not None else None)
    return dict(target=target_k, weight=weight, row_weight=row_weight,
                loss_scale=mean_scale(counted, o.reduction, acc, input.device),
                ignore_index=o.ignore_index, label_smoothing=o.label_smoothing,
                logit_scale=o.logit_scale, softcap=o.softcap or 0.0, z_loss=o.z_loss,
                reduction=o.reduction)


def with_extras(loss, lse, entropy, o, return_lse, return_entropy):
    """The loss (per position for reduction "none"), then lse (detached) and entropy (with
    its gradient where the path gives one) when asked for, one per position."""
    if o.reduction == 0:
        loss = loss.view(o.positions)
    extras = ([lse.detach().view(o.positions)] if return_lse else []) + \
        ([entropy.view(o.positions)] if return_entropy else [])
    return (loss, *extras) if extras else loss


def check_target_and_weight(target, weight, logits_shape, class_dim, ignore_index, input,
                            vocab_parallel=False):
    """The target (class indices, or probabilities of the logits' shape) and the class
    weight of logits of `logits_shape`; returns whether the target holds probabilities."""
    n_classes = None if vocab_parallel else logits_shape[class_dim]
    if target.is_floating_point():
        _checks.probability_target(target, logits_shape, ignore_index, input.device)
    else:
        positions = logits_shape[:class_dim] + logits_shape[class_dim + 1:]
        _checks.class_index_target(target, positions, n_classes, ignore_index, input.device)
    if weight is not None:
        _checks.class_vector("weight", weight, n_classes, input)
        _checks.same_dtype("weight", weight, input, why="torch requires them to match",
                           autocast=True)
    return target.is_floating_point()


def check_token_weight(token_weight, positions, input):
    """token_weight: None, or a floating tensor with one weight per position."""
    if token_weight is None:
        return None
    _checks.floating("token_weight", token_weight)
    if token_weight.shape != positions:
        raise ValueError(f"token_weight must have one weight per position, shape "
                         f"{tuple(positions)}, got {tuple(token_weight.shape)}")
    _checks.same_device("token_weight", token_weight, input)
    return token_weight


def cross_entropy(input, target, weight=None, ignore_index=-100, reduction="mean",
                  label_smoothing=0.0, *, z_loss=0.0, softcap=None, logit_scale=1.0,
                  token_weight=None, return_lse=False, return_entropy=False,
                  inplace_backward=False, process_group=None, backend="auto"):
    """Softmax cross-entropy with the semantics of torch.nn.functional.cross_entropy.

    input: (C), (N, C) or (N, C, d1, ..., dK) logits. target: class indices (int64) of
    shape (), (N) or (N, d1, ..., dK), or class probabilities of input's shape.
    weight, ignore_index, reduction, label_smoothing: as in torch, alone or together.

    Extras (all off by default):
      logit_scale  multiplies the logits before the softmax (an inverse temperature).
      softcap      softcap * tanh(logits / softcap) before the softmax (Gemma 2).
      z_loss       adds z_loss * lse^2 for each counted position (PaLM), weighted and
                   reduced like the loss (unweighted for probability targets).
      token_weight a floating tensor with one weight per position (the target's shape for
                   class indices): it multiplies that position's loss and gradient, and
                   the mean divides by the sum over counted positions of token_weight x
                   weight[target] (of token_weight alone for probability targets).
      return_lse   also return the per-position log-sum-exp of the transformed logits
                   (shape of the positions, float32 or float64), detached: no gradient
                   flows through it (use z_loss for a penalty on it).
      return_entropy  also return each position's softmax entropy (nats), with its
                   gradient (an entropy bonus or penalty: the backward adds d H / d input,
                   at no cost unless the entropy reaches the loss; see fusedloss.log_probs
                   for the algebra). Detached with inplace_backward or a process_group.
      inplace_backward  write the gradient over `input`'s buffer (kernel backends, eager
                   mode): the logits are overwritten by the forward, so use it only when
                   nothing else needs them; misuse raises through autograd's version check.
      process_group  vocab-parallel cross-entropy over a torch.distributed group: `input`'s
                   class dimension holds this rank's contiguous slice of the classes, in
                   rank order (slices may differ in size); target (global class indices,
                   or this slice's probabilities), weight (all the classes') and the rest
                   keep their meaning. Every rank returns the same loss, and the gradient of
                   its slice; per row only a few numbers cross ranks, and each rank runs
                   the chosen backend's kernels on its slice: one pass for the statistics,
                   one for the gradient (fusedloss/vocab_parallel.py). No higher-order
                   gradients there.
      backend      "auto", "reference", "triton", "cuda" or "cpu".

    DTensor input (tensor parallel, e.g. a ColwiseParallel LM head's logits): sharded on
    the class dimension along one mesh dimension, it runs the vocab-parallel path above on
    that dimension's group (the slices are the local tensors, in rank order: uneven and
    empty ones work); replicated, the local kernels. target, weight and token_weight may
    be plain tensors or replicated DTensors. Other mesh dimensions may shard the batch
    (dimension 0; target and token_weight then placed as the batch): the mean divides by
    the global denominator, whatever the mesh's dimensions. A reduced loss comes back as a
    replicated DTensor, per-position outputs sharded as the batch. Partial logits, classes
    sharded on two mesh dimensions, and other sharded dimensions are refused.

    Returns the loss, or (loss, lse), (loss, entropy) or (loss, lse, entropy) as asked.
    """
    if _dtensor.is_dtensor(input, target, weight, token_weight):
        return _dtensor.call(
            cross_entropy, input, 0 if input.dim() == 1 else 1, "cross_entropy",
            dict(target=target, weight=weight, token_weight=token_weight),
            dict(ignore_index=ignore_index, reduction=reduction,
                 label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
                 logit_scale=logit_scale, return_lse=return_lse, return_entropy=return_entropy,
                 inplace_backward=inplace_backward, process_group=process_group,
                 backend=backend),
            per_position=("target", "token_weight"),
            denominator=lambda target, weight, token_weight: mean_denominator(
                target, weight, token_weight, ignore_index))
    class_dim, _ = _checks.class_input(input)
    o = check_options(input, target, weight, token_weight, input.shape, class_dim, reduction,
                      ignore_index, label_smoothing, logit_scale, softcap, z_loss,
                      vocab_parallel=process_group is not None)
    if process_group is not None:
        return _vocab_parallel(input, target, weight, token_weight, class_dim, o, return_lse,
                               return_entropy, inplace_backward, backend, process_group)
    name = _backends.resolve(CROSS_ENTROPY, backend, input.device, o.needs_reference)

    if name == "reference":
        loss, lse = reference.cross_entropy(input, target, weight, o.ignore_index, reduction,
                                            o.label_smoothing, o.z_loss, o.softcap,
                                            o.logit_scale, token_weight=token_weight)
        entropy = reference.softmax_entropy(input, o.logit_scale, o.softcap) \
            if return_entropy else None
        return with_extras(loss, lse, entropy, o, return_lse, return_entropy)

    x = as_bcs(input, class_dim)
    target_k = as_bcs(target.to(input.dtype), class_dim) if o.prob_target \
        else target.reshape(-1).long()
    kwargs = {**kernel_args(o, target_k, weight, token_weight, input),
              "compute_entropy": return_entropy}
    compute_grad = input.requires_grad and torch.is_grad_enabled()
    if inplace_backward and compute_grad and not torch.compiler.is_compiling() \
            and not _library.reusable_graph_active():
        loss, lse, entropy = _InplaceCrossEntropy.apply(x, kwargs, name)
    else:
        loss, lse, entropy, grad = CROSS_ENTROPY.call(name, x=x, compute_grad=compute_grad,
                                                      **kwargs)
        _library.owned(grad)
        if return_entropy and compute_grad:  # its gradient too, when it reaches a loss
            entropy = RowEntropy.apply(x, entropy, lse, o.logit_scale, o.softcap)
    return with_extras(loss.to(_library.loss_dtype(input)), lse, entropy, o, return_lse,
                       return_entropy)


def _vocab_parallel(input, target, weight, token_weight, class_dim, o, return_lse,
                    return_entropy, inplace_backward, backend, group):
    if o.needs_reference:
        raise ValueError(f"{o.needs_reference} is not available with a process_group")
    x = as_bcs(input, class_dim)
    target_k = as_bcs(target.to(input.dtype), class_dim) if o.prob_target \
        else target.reshape(x.shape[0], x.shape[2]).long()
    k = kernel_args(o, target_k, weight, token_weight, input)
    inplace = inplace_backward and input.requires_grad and torch.is_grad_enabled() and \
        not torch.compiler.is_compiling() and not _library.reusable_graph_active()
    loss, lse, entropy = vocab_parallel.cross_entropy(
        x, target_k, weight, k["row_weight"], k["loss_scale"], o, return_entropy, group,
        inplace=inplace, backend=backend)
    return with_extras(loss.to(_library.loss_dtype(input)), lse, entropy, o, return_lse,
                       return_entropy)


class CrossEntropyLoss(LossModule):
    """Drop-in for torch.nn.CrossEntropyLoss; see fusedloss.cross_entropy for the extras.
    forward(input, target, token_weight=None)."""

    def __init__(self, weight=None, ignore_index=-100, reduction="mean",
                 label_smoothing=0.0, *, z_loss=0.0, softcap=None, logit_scale=1.0,
                 return_lse=False, return_entropy=False, inplace_backward=False,
                 process_group=None, backend="auto"):
        super().__init__(weight=weight, ignore_index=ignore_index, reduction=reduction,
                         label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
                         logit_scale=logit_scale, return_lse=return_lse,
                         return_entropy=return_entropy, inplace_backward=inplace_backward,
                         process_group=process_group, backend=backend)

    def forward(self, input, target, token_weight=None):
        return cross_entropy(input, target, token_weight=token_weight, **self.loss_options())
