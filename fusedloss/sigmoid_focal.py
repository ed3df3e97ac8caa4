"""Sigmoid (binary, multi-label) focal loss with torchvision.ops.sigmoid_focal_loss semantics."""
import torch

from . import _backends, _checks, ops, reference
from .cross_entropy import count_loss_scale


def sigmoid_focal_loss(inputs, targets, alpha=0.25, gamma=2.0, reduction="none", *,
                       backend="auto"):
    """Focal loss on independent sigmoids (RetinaNet), computed stably from the logits.

    inputs: logits of any shape; targets: same shape, in [0, 1] (soft targets allowed).
    alpha in [0, 1] weights positives against negatives; alpha < 0 disables the
    weighting. gamma >= 0. reduction "none" (the default, as torchvision), "mean" or "sum".
    The gradient is finite for every gamma >= 0.
    """
    red = _checks.reduction_code(reduction)
    _checks.floating("inputs", inputs)
    _checks.floating("targets", targets)
    if targets.shape != inputs.shape:
        raise ValueError(f"targets must have inputs' shape {tuple(inputs.shape)}, got "
                         f"{tuple(targets.shape)}")
    _checks.same_device("targets", targets, inputs)
    alpha = _checks.number("alpha", alpha, high=1.0)
    gamma = _checks.number("gamma", gamma, low=0.0)
    needs_reference = "a gradient for targets" if targets.requires_grad else None
    name = _backends.resolve(backend, inputs.device, needs_reference)

    if name == "reference":
        return reference.sigmoid_focal_loss(inputs, targets, alpha, gamma, reduction)

    acc = ops.acc_dtype(inputs.dtype)
    x = inputs.contiguous().view(-1)
    t = targets.to(inputs.dtype).contiguous().view(-1)
    loss_scale = count_loss_scale(x.numel(), red, acc, inputs.device)
    compute_grad = inputs.requires_grad and torch.is_grad_enabled()
    loss, grad = ops.namespace(name).sigmoid_focal_loss(x, t, loss_scale, alpha, gamma, red,
                                                        compute_grad)
    ops.owned(grad)
    return loss.view(inputs.shape) if red == 0 else loss


class SigmoidFocalLoss(torch.nn.Module):
    """Module form of fusedloss.sigmoid_focal_loss (same arguments)."""

    def __init__(self, alpha=0.25, gamma=2.0, reduction="none", *, backend="auto"):
        super().__init__()
        _checks.reduction_code(reduction)
        self.alpha = alpha
        self.gamma = gamma
        self.reduction = reduction
        self.backend = backend

    def forward(self, inputs, targets):
        return sigmoid_focal_loss(inputs, targets, self.alpha, self.gamma, self.reduction,
                                  backend=self.backend)

    def extra_repr(self):
        return (f"alpha={self.alpha}, gamma={self.gamma}, reduction={self.reduction!r}, "
                f"backend={self.backend!r}")
