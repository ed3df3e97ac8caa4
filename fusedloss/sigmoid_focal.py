"""Sigmoid (binary, multi-label) focal loss with torchvision.ops.sigmoid_focal_loss semantics.

The op is element-wise over x.reshape(-1) and a same-shape float target t:

    p = sigmoid(x),  ce = max(x, 0) - x t + log1p(exp(-|x|)),  m = p (1-t) + (1-p) t
    a_t  = alpha t + (1 - alpha)(1 - t)  (1 when alpha < 0)
    loss = a_t ce m^gamma
    dloss/dx = a_t m^gamma ((p - t) + gamma ce r),  r = p (1-p) (1-2t) / m  (0 where m == 0)

p and 1 - p both come from e = exp(-|x|), so neither rounds to 0 or 1 for large |x|.
Gradient scaling and reductions as in cross_entropy's ops (loss_scale). The loss output
is as large as x for reduction "none", so the op writes it in x's dtype, or in acc with
acc_loss (under autocast), without a second pass to convert it.
"""
import torch

from . import _backends, _checks, _library, reference
from ._library import Op, acc_dtype, grad_output, loss_output
from ._module import LossModule
from .cross_entropy import mean_scale


def _reference(a):
    rows = reference.sigmoid_focal_loss(a.x, a.target, a.alpha, a.gamma, "none")
    return (_library.reduce_reference_rows(rows, a, acc_dtype(a.x.dtype) if a.acc_loss
                                           else a.x.dtype),)


SIGMOID_FOCAL_LOSS = Op(
    "sigmoid_focal_loss",
    "(Tensor x, Tensor target, Tensor loss_scale, float alpha, float gamma, int reduction, "
    "bool acc_loss, bool compute_grad) -> (Tensor loss, Tensor grad)",
    outputs=lambda a: (loss_output(a.x, a.x.numel(), a.reduction, a.acc_loss),
                       grad_output(a.x, a.compute_grad)),
    backends=("triton", "cpu", "cuda"), kernels="focal", reference=_reference,
    **_library.SavedGradient(lambda x: x.shape).op_kwargs()).define()


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
    name = _backends.resolve(SIGMOID_FOCAL_LOSS, backend, inputs.device, needs_reference)

    if name == "reference":
        return reference.sigmoid_focal_loss(inputs, targets, alpha, gamma, reduction)

    x = inputs.contiguous().view(-1)
    loss, grad = SIGMOID_FOCAL_LOSS.call(
        name, x=x, target=targets.to(inputs.dtype).contiguous().view(-1),
        loss_scale=mean_scale(x.numel(), red, acc_dtype(inputs.dtype), inputs.device),
        alpha=alpha, gamma=gamma, reduction=red, acc_loss=_library.autocast_on(inputs.device),
        compute_grad=inputs.requires_grad and torch.is_grad_enabled())
    _library.owned(grad)
    return loss.view(inputs.shape) if red == 0 else loss


class SigmoidFocalLoss(LossModule):
    """Module form of fusedloss.sigmoid_focal_loss (same arguments)."""

    def __init__(self, alpha=0.25, gamma=2.0, reduction="none", *, backend="auto"):
        super().__init__(alpha=alpha, gamma=gamma, reduction=reduction, backend=backend)

    def forward(self, inputs, targets):
        return sigmoid_focal_loss(inputs, targets, **self.loss_options())
