"""Softmax (multi-class) focal loss: FL = -alpha_t (1 - p_t)^gamma log p_t."""
import torch

from . import _backends, _checks, ops, reference
from .cross_entropy import as_bcs, class_index_loss_scale


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
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if target.is_floating_point():
        raise TypeError("focal_loss takes class-index targets (int64); got a floating target")
    _checks.class_index_target(target, input, class_dim, n_classes, ignore_index)
    if isinstance(alpha, torch.Tensor):
        _checks.class_vector("alpha", alpha, n_classes, input)
    else:
        alpha = _checks.number("alpha", alpha, allow_none=True)
    if weight is not None:
        _checks.class_vector("weight", weight, n_classes, input)
    name = _backends.resolve(backend, input.device)

    if name == "reference":
        return reference.focal_loss(input, target, gamma, alpha, weight, ignore_index,
                                    reduction)

    acc = ops.acc_dtype(input.dtype)
    x = as_bcs(input, class_dim)
    target_k = target.reshape(-1).long()
    if alpha is not None and not isinstance(alpha, torch.Tensor):
        alpha = torch.full((n_classes,), alpha, dtype=acc, device=input.device)
    alpha_k = alpha.to(acc).contiguous() if alpha is not None else None
    weight_k = weight.to(acc).contiguous() if weight is not None else None
    loss_scale = class_index_loss_scale(target_k, weight, ignore_index, red, acc)
    compute_grad = input.requires_grad and torch.is_grad_enabled()
    loss, grad = ops.namespace(name).focal_loss(x, target_k, alpha_k, weight_k, loss_scale,
                                                gamma, ignore_index, red, compute_grad)
    ops.owned(grad)
    return loss.view(target.shape) if red == 0 else loss


class FocalLoss(torch.nn.Module):
    """Module form of fusedloss.focal_loss (same arguments)."""

    def __init__(self, gamma=2.0, alpha=None, weight=None, ignore_index=-100,
                 reduction="mean", *, backend="auto"):
        super().__init__()
        _checks.reduction_code(reduction)
        self.gamma = gamma
        if isinstance(alpha, torch.Tensor):
            self.register_buffer("alpha", alpha)
        else:
            self.alpha = alpha
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.backend = backend

    def forward(self, input, target):
        return focal_loss(input, target, self.gamma, self.alpha, self.weight,
                          self.ignore_index, self.reduction, backend=self.backend)

    def extra_repr(self):
        return f"gamma={self.gamma}, reduction={self.reduction!r}, backend={self.backend!r}"
