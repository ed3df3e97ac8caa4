"""Distillation losses between two softmaxes: forward KL, reverse KL and the generalized
Jensen-Shannon divergence, fused (the loss and the gradients in one pass per row).

The algebra every backend computes (Triton, CPU alike; "acc" is float64 for float64
logits, float32 otherwise). Per row of the (N, V) student logits x_s and teacher logits
x_t, with temperature T:

    lp_s = log_softmax(x_s / T),  lp_t = log_softmax(x_t / T),  p = exp(lp)
  beta = 0, forward KL(P_t || P_s):
    loss = K_t = sum_c p_t (lp_t - lp_s)
    dloss/dx_s = (p_s - p_t) / T,   dloss/dx_t = p_t (lp_t - lp_s - K_t) / T
  beta = 1, reverse KL(P_s || P_t): the same with student and teacher swapped
  0 < beta < 1, M = beta P_t + (1 - beta) P_s,  lm = log M (M clamped to the smallest
  normal float32 where it underflows), D_s = lp_s - lm,  D_t = lp_t - lm:
    K_s = sum_c p_s D_s,  K_t = sum_c p_t D_t,  loss = beta K_t + (1 - beta) K_s
    dloss/dx_s = (1 - beta) p_s (D_s - K_s) / T,   dloss/dx_t = beta p_t (D_t - K_t) / T

Classes of probability 0 add exactly 0 (p log p -> 0). A row whose target is ignore_index
has loss and gradients exactly 0; a row times its row weight (used by linear_jsd's
backward); the gradients are scaled by loss_scale (1 / counted rows for the mean).
"""
import torch

from . import _backends, _checks, _library, reference
from ._library import Op, acc_dtype
from ._module import LossModule
from .cross_entropy import mean_scale


def _outputs(a):
    s, t = a.student, a.teacher
    n = s.shape[0]
    return (s.new_empty((n,) if a.reduction == 0 else (), dtype=acc_dtype(s.dtype)),
            _library.grad_output(s, a.grad_student), _library.grad_output(t, a.grad_teacher))


def masked_rows(rows, a):
    """The op's loss rows: each times its row weight, 0 where the target is ignored."""
    if a.row_weight is not None:
        rows = rows * a.row_weight.to(rows.dtype)
    if a.target is not None:
        rows = torch.where(a.target != a.ignore_index, rows, torch.zeros_like(rows))
    return rows


def _reference(a):
    rows = reference.jsd_rows(a.student, a.teacher, a.beta, a.temperature)
    return (_library.reduce_reference_rows(masked_rows(rows, a), a, acc_dtype(a.student.dtype)),)


JSD = Op(
    "jsd",
    "(Tensor student, Tensor teacher, Tensor? target, Tensor? row_weight, Tensor loss_scale, "
    "float beta, float temperature, int ignore_index, int reduction, bool grad_student, "
    "bool grad_teacher) -> (Tensor loss, Tensor grad_student, Tensor grad_teacher)",
    outputs=_outputs, backends=("triton", "cpu"), kernels="jsd", reference=_reference,
    **_library.SavedGradient(lambda x: (x.shape[0], 1),
                             inputs=("student", "teacher")).op_kwargs()).define()


# ------------------------------------------------------------------------------ checks
def check_options(beta, temperature, ignore_index, reduction):
    """(beta, temperature, ignore_index, reduction code), checked."""
    return (_checks.number("beta", beta, low=0.0, high=1.0),
            _checks.number("temperature", temperature, low=0.0, low_open=True),
            _checks.integer("ignore_index", ignore_index), _checks.reduction_code(reduction))


def check_target(target, positions, device):
    """None, or class indices (int64) of the rows' shape: only rows equal to ignore_index
    matter (they are left out)."""
    if target is None:
        return None
    _checks.tensor("target", target)
    if target.dtype not in (torch.int64, torch.int32, torch.uint8):
        raise TypeError(f"target must hold class indices (int64, int32 or uint8), got "
                        f"{target.dtype}")
    if tuple(target.shape) != tuple(positions):
        raise ValueError(f"target must have one entry per row, shape {tuple(positions)}, "
                         f"got {tuple(target.shape)}")
    if target.device != device:
        raise ValueError(f"target is on {target.device} but the logits are on {device}")
    return target


def loss_scale(target, n_rows, ignore_index, reduction, dtype, device):
    """The mean's 1 / (counted rows), on the device (no host sync), or 1."""
    counted = (target != ignore_index) if target is not None else n_rows
    return mean_scale(counted, reduction, acc_dtype(dtype), device)


# ------------------------------------------------------------------------------ the loss
def jsd(student_logits, teacher_logits, target=None, *, beta=0.5, temperature=1.0,
        ignore_index=-100, reduction="mean", backend="auto"):
    """The generalized Jensen-Shannon divergence between P_s = softmax(student / T) and
    P_t = softmax(teacher / T), row by row over the last dimension (V classes).

    beta=0: forward KL(P_t || P_s), the usual distillation loss (what
    F.kl_div(log_softmax(student / T), log_softmax(teacher / T), log_target=True) sums per
    row); beta=1: reverse KL(P_s || P_t); otherwise beta KL(P_t || M) + (1 - beta)
    KL(P_s || M), M = beta P_t + (1 - beta) P_s (beta=0.5: the Jensen-Shannon divergence).

    The T^2 factor of Hinton et al. is NOT applied: multiply the loss by temperature**2
    yourself to keep the gradients' scale independent of T.

    student_logits, teacher_logits: (..., V), same shape, dtype and device. target: None,
    or class indices of shape (...): rows equal to ignore_index are left out (loss and
    gradients exactly 0) and the mean divides by the counted rows; other values are not
    read. reduction: "mean" (over the counted rows, as torch's kl_div "batchmean"),
    "sum" or "none" (one value per row, shape (...)). Gradients go to the student logits,
    and to the teacher's when they require grad. The loss and both gradients come from one
    pass over each row.
    """
    beta, temperature, ignore_index, red = check_options(beta, temperature, ignore_index,
                                                         reduction)
    _checks.floating("student_logits", student_logits)
    _checks.floating("teacher_logits", teacher_logits)
    if student_logits.dim() == 0 or student_logits.shape[-1] == 0:
        raise ValueError(f"student_logits must be (..., V) with V >= 1 classes, got shape "
                         f"{tuple(student_logits.shape)}")
    if teacher_logits.shape != student_logits.shape:
        what = "V classes" if teacher_logits.dim() == 0 or \
            teacher_logits.shape[-1] != student_logits.shape[-1] else "shape"
        raise ValueError(f"teacher_logits must have student_logits' shape "
                         f"{tuple(student_logits.shape)} (the same {what}), got "
                         f"{tuple(teacher_logits.shape)}")
    _checks.same_dtype("teacher_logits", teacher_logits, student_logits, "student_logits")
    _checks.same_device("teacher_logits", teacher_logits, student_logits)
    positions = student_logits.shape[:-1]
    check_target(target, positions, student_logits.device)
    name = _backends.resolve(JSD, backend, student_logits.device, None)

    v = student_logits.shape[-1]
    s, t = student_logits.reshape(-1, v), teacher_logits.reshape(-1, v)
    tgt = target.reshape(-1).long() if target is not None else None
    if name == "reference":
        loss = reference.jsd(s, t, tgt, beta, temperature, ignore_index, reduction)
        return loss.view(positions) if red == 0 else loss
    grads = torch.is_grad_enabled()
    loss, grad_s, grad_t = JSD.call(
        name, student=s.contiguous(), teacher=t.contiguous(), target=tgt, row_weight=None,
        loss_scale=loss_scale(tgt, s.shape[0], ignore_index, red, s.dtype, s.device),
        beta=beta, temperature=temperature, ignore_index=ignore_index, reduction=red,
        grad_student=grads and student_logits.requires_grad,
        grad_teacher=grads and teacher_logits.requires_grad)
    _library.owned(grad_s)
    _library.owned(grad_t)
    loss = loss.to(_library.loss_dtype(student_logits))
    return loss.view(positions) if red == 0 else loss


class JSDLoss(LossModule):
    """Module form of fusedloss.jsd. forward(student_logits, teacher_logits, target=None)."""

    BUFFERS = ()

    def __init__(self, beta=0.5, temperature=1.0, ignore_index=-100, reduction="mean", *,
                 backend="auto"):
        check_options(beta, temperature, ignore_index, reduction)
        super().__init__(beta=beta, temperature=temperature, ignore_index=ignore_index,
                         reduction=reduction, backend=backend)

    def forward(self, student_logits, teacher_logits, target=None):
        return jsd(student_logits, teacher_logits, target, **self.loss_options())
