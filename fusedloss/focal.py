"""Softmax (multi-class) focal loss: FL = -alpha_t (1 - p_t)^gamma log p_t.

The op reads x as cross_entropy's ops do ((B, C, S), class-index targets only; ignored
and out-of-range targets alike), uses the same row statistics m, s, lse, p_c and returns
the loss in acc as they do (see fusedloss/cross_entropy.py). Per row, with a_t = alpha[t] (1 without), w_t = weight[t]:

    logp_t = z_t - lse,   p_t = exp(logp_t),   q = 1 - p_t = -expm1(logp_t)
    loss   = -w_t a_t q^gamma logp_t
    dloss/dz_c = coef (p_c - [c == t]),   coef = w_t a_t q^gamma (1 - gamma p_t logp_t / q)

i.e. p_coef = t_coef = coef and w_coef = 0 in cross-entropy's form. logp_t / q -> -1 as
q -> 0 (p_t -> 1), so coef stays finite for every gamma >= 0.
"""
import torch

from . import _backends, _checks, _library, reference
from ._library import Op, acc_dtype, grad_output, loss_output, rows_of
from ._module import LossModule
from .cross_entropy import as_bcs, class_index_weights, mean_scale


def _reference(a):
    B, C, S = a.x.shape
    rows = reference.focal_loss(a.x, a.target.view(B, S), a.gamma, a.alpha, a.weight,
                                a.ignore_index, "none")
    return (_library.reduce_reference_rows(rows, a, acc_dtype(a.x.dtype)),)


FOCAL_LOSS = Op(
    "focal_loss",
    "(Tensor x, Tensor target, Tensor? alpha, Tensor? weight, Tensor loss_scale, "
    "float gamma, int ignore_index, int reduction, bool compute_grad) "
    "-> (Tensor loss, Tensor grad)",
    outputs=lambda a: (loss_output(a.x, rows_of(a.x), a.reduction, acc=True),
                       grad_output(a.x, a.compute_grad)),
    backends=("triton", "cpu", "cuda"), kernels="focal", reference=_reference,
    **_library.SavedGradient(lambda x: (x.shape[0], 1, x.shape[2])).op_kwargs()).define()


def focal_loss(input, target, gamma=2.0, alpha=None, weight=None, ignore_index=-100,
               reduction="mean", *, backend="auto"):
    """Softmax focal loss over the input/target shapes of cross_entropy (class indices).

    gamma >= 0 focuses on hard examples; gamma = 0 with alpha=None equals cross_entropy.
    alpha: None, a float (multiplies every term) or a (C,) tensor (alpha_t = alpha[target]).
    weight: as in cross_entropy; the mean divides by the summed weights of the counted
    targets (alpha does not enter the denominator). The gradient is finite for every
    gamma >= 0, including 0 < gamma < 1 as p_t -> 1.
    """
    red = _checks.reduction_code(reduction)
    class_dim, n_classes = _checks.class_input(input)
    _checks.tensor("target", target)
    gamma = _checks.number("gamma", gamma, low=0.0)
    _checks.integer("ignore_index", ignore_index)
    if target.is_floating_point():
        raise TypeError("focal_loss takes class-index targets (int64); got a floating target")
    _checks.class_index_target(target, input.shape[:class_dim] + input.shape[class_dim + 1:],
                               n_classes, ignore_index, input.device)
    if isinstance(alpha, torch.Tensor):
        _checks.class_vector("alpha", alpha, n_classes, input)
    else:
        alpha = _checks.number("alpha", alpha, allow_none=True)
    if weight is not None:
        _checks.class_vector("weight", weight, n_classes, input)
    name = _backends.resolve(FOCAL_LOSS, backend, input.device)

    if name == "reference":
        return reference.focal_loss(input, target, gamma, alpha, weight, ignore_index,
                                    reduction)

    acc = acc_dtype(input.dtype)
    target_k = target.reshape(-1).long()
    if alpha is not None and not isinstance(alpha, torch.Tensor):
        alpha = torch.full((n_classes,), alpha, dtype=acc, device=input.device)
    loss, grad = FOCAL_LOSS.call(
        name, x=as_bcs(input, class_dim), target=target_k,
        alpha=alpha.to(acc).contiguous() if alpha is not None else None,
        weight=weight.to(acc).contiguous() if weight is not None else None,
        loss_scale=mean_scale(class_index_weights(
            target_k, weight.to(acc) if weight is not None else None, ignore_index), red, acc,
            input.device),
        gamma=gamma, ignore_index=ignore_index, reduction=red,
        compute_grad=input.requires_grad and torch.is_grad_enabled())
    _library.owned(grad)
    loss = loss.to(_library.loss_dtype(input))
    return loss.view(target.shape) if red == 0 else loss


class FocalLoss(LossModule):
    """Module form of fusedloss.focal_loss (same arguments)."""

    def __init__(self, gamma=2.0, alpha=None, weight=None, ignore_index=-100,
                 reduction="mean", *, backend="auto"):
        super().__init__(gamma=gamma, alpha=alpha, weight=weight, ignore_index=ignore_index,
                         reduction=reduction, backend=backend)

    def forward(self, input, target):
        return focal_loss(input, target, **self.loss_options())
