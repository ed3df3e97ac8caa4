"""Fused linear + JSD: distillation through two LM heads without either model's logits.

The N rows of both models' hidden states go in chunks of R (every kernel backend, through
its own jsd op; the reference is the same divergence in autograd-checkpointed chunks):

    student = student_input[chunk] @ Ws^T (+ bs)       (R, V)
    teacher = teacher_input[chunk] @ Wt^T (+ bt)       (R, V)
    jsd(student, teacher)                              the row kernel: loss rows and
                                                       d loss / d student (fusedloss/jsd.py)
    grad_input[chunk] = g @ Ws,  grad_weight += g^T @ student_input[chunk],  grad_bias += sum g

so memory beyond the inputs and the student's gradients is O(R x V): the two chunks of
logits and the chunk's gradient. Gradients are computed in the forward for reduced losses
(the backward scales them) and by running the chunks again for reduction "none". The
teacher is a constant: no gradient reaches it.
"""
import torch

from . import _backends, _checks, _library, reference
from ._library import Op, acc_dtype
from ._module import LossModule
from .jsd import JSD, check_options, check_target, loss_scale, masked_rows
from ._linear import HeadGradients, default_chunk_size


def _outputs(a):
    x, w = a.student_input, a.student_weight
    n, acc = x.shape[0], acc_dtype(x.dtype)
    new = lambda shape, like: like.new_empty(shape)  # noqa: E731
    return (x.new_empty((n,) if a.reduction == 0 else (), dtype=acc),
            new(x.shape if a.grad_input else (0,), x), new(w.shape if a.grad_weight else (0,), w),
            new((w.shape[0],) if a.grad_bias and a.student_bias is not None else (0,), w))


def _linear(x, w, b, out):
    return torch.mm(x, w.t(), out=out) if b is None else torch.addmm(b, x, w.t(), out=out)


def _run(a, ns):
    """The chunk loop, for every backend: `ns` names the jsd op it runs."""
    x, w, b = a.student_input, a.student_weight, a.student_bias
    (n, d), v = x.shape, w.shape[0]
    loss, grad_x, grad_w, grad_b = _outputs(a)
    rows = loss if a.reduction == 0 else loss.new_empty(n)
    want = (a.grad_input, a.grad_weight, a.grad_bias and b is not None)
    r = min(n, a.chunk_size)
    grads = HeadGradients(w, (grad_x, grad_w, grad_b), want, r)
    # One buffer per model for every chunk's logits: a new one per chunk would pay its
    # first-touch page faults each time on a CPU.
    buf_s, buf_t = x.new_empty((r, v)), a.teacher_input.new_empty((r, v))
    for i0 in range(0, n, a.chunk_size):
        sel = slice(i0, min(n, i0 + a.chunk_size))
        xc = x[sel]
        student = _linear(xc, w, b, buf_s[:xc.shape[0]])
        teacher = _linear(a.teacher_input[sel], a.teacher_weight, a.teacher_bias,
                          buf_t[:xc.shape[0]])
        out, g, _ = JSD.call(
            ns, student=student, teacher=teacher,
            target=a.target[sel] if a.target is not None else None,
            row_weight=a.row_weight[sel] if a.row_weight is not None else None,
            loss_scale=a.loss_scale, beta=a.beta, temperature=a.temperature,
            ignore_index=a.ignore_index, reduction=0, grad_student=any(want),
            grad_teacher=False)
        rows[sel] = out
        if any(want):
            grads.add(g, xc, sel)
    if a.reduction != 0:
        loss.copy_(rows.sum() * a.loss_scale)
    grads.finish()
    return loss, grad_x, grad_w, grad_b


_run.builds_on = "jsd"


def _reference(a):
    """The op's loss output in torch ops (for higher-order gradients), chunked as the op."""
    rows = masked_rows(reference.linear_jsd_rows(
        a.student_input, a.student_weight, a.student_bias, a.teacher_input, a.teacher_weight,
        a.teacher_bias, a.beta, a.temperature, a.chunk_size), a)
    return (_library.reduce_reference_rows(rows, a, acc_dtype(a.student_input.dtype)),)


LINEAR_JSD = Op(
    "linear_jsd",
    "(Tensor student_input, Tensor student_weight, Tensor? student_bias, Tensor teacher_input, "
    "Tensor teacher_weight, Tensor? teacher_bias, Tensor? target, Tensor? row_weight, "
    "Tensor loss_scale, float beta, float temperature, int ignore_index, int reduction, "
    "int chunk_size, bool grad_input, bool grad_weight, bool grad_bias) "
    "-> (Tensor loss, Tensor grad_input, Tensor grad_weight, Tensor grad_bias)",
    outputs=_outputs, backends=("triton", "cpu"), composite=_run, reference=_reference,
    **_library.ForwardGradients(
        "linear_jsd", ("student_input", "student_weight", "student_bias"),
        ("grad_input", "grad_weight", "grad_bias"), lambda a: a.student_input.shape[0]
    ).op_kwargs()).define()


# ------------------------------------------------------------------------------ the loss
def _check_head(prefix, input, weight, bias, ref=None):
    """input (N, D), weight (V, D), bias (V,) or None, floating, on one device."""
    _checks.floating(f"{prefix}_input", input)
    _checks.floating(f"{prefix}_weight", weight)
    if input.dim() != 2:
        raise ValueError(f"{prefix}_input must be (N, hidden), got shape {tuple(input.shape)}; "
                         "flatten leading dimensions first: hidden.flatten(0, -2)")
    if weight.dim() != 2 or weight.shape[1] != input.shape[1]:
        raise ValueError(f"{prefix}_weight must be (V, {input.shape[1]}) for a "
                         f"{prefix}_input of hidden size {input.shape[1]}, got shape "
                         f"{tuple(weight.shape)}")
    _checks.same_dtype(f"{prefix}_weight", weight, input, f"{prefix}_input")
    _checks.same_device(f"{prefix}_weight", weight, input)
    if bias is not None:
        _checks.floating(f"{prefix}_bias", bias)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"{prefix}_bias must have shape ({weight.shape[0]},), got "
                             f"{tuple(bias.shape)}")
        _checks.same_dtype(f"{prefix}_bias", bias, input, f"{prefix}_input")
        _checks.same_device(f"{prefix}_bias", bias, input)
    if ref is not None:  # the teacher against the student
        if input.shape[0] != ref[0].shape[0]:
            raise ValueError(f"teacher_input has {input.shape[0]} rows but student_input has "
                             f"{ref[0].shape[0]}")
        if weight.shape[0] != ref[1].shape[0]:
            raise ValueError(f"teacher_weight has V={weight.shape[0]} classes but "
                             f"student_weight has V={ref[1].shape[0]}")
        _checks.same_dtype("teacher_input", input, ref[0], "student_input")
        _checks.same_device("teacher_input", input, ref[0])
        for name, t in (("teacher_input", input), ("teacher_weight", weight),
                        ("teacher_bias", bias)):
            if t is not None and t.requires_grad and torch.is_grad_enabled():
                raise ValueError(f"{name} requires grad, but linear_jsd treats the teacher as "
                                 "a constant (no gradient reaches it): pass it detached, or "
                                 "freeze the teacher (requires_grad_(False))")


def linear_jsd(student_input, student_weight, teacher_input, teacher_weight, target=None, *,
               student_bias=None, teacher_bias=None, beta=0.5, temperature=1.0,
               ignore_index=-100, reduction="mean", chunk_size=None, backend="auto"):
    """fusedloss.jsd(F.linear(student_input, student_weight, student_bias),
    F.linear(teacher_input, teacher_weight, teacher_bias), target, ...) without either
    model's logits: both LM heads run chunk by chunk.

    student_input (N, Ds), student_weight (V, Ds), student_bias (V,); the teacher's the
    same with its own hidden size Dt and the same N and V. For (B, T, D) hidden states
    pass hidden.flatten(0, -2) and target.flatten(). beta, temperature, ignore_index,
    reduction: as in fusedloss.jsd (no T^2 factor). Gradients go to the student's input,
    weight and bias; the teacher is a constant (its tensors must not require grad).

    chunk_size: rows per chunk (default from N, the hidden size, V and the dtype, as in
    linear_cross_entropy). Memory beyond the outputs and the gradients: two chunks of
    logits and one chunk of gradient, 3 x R x V x (the input's itemsize); grad_weight is
    accumulated in float32 for half weights.
    """
    beta, temperature, ignore_index, red = check_options(beta, temperature, ignore_index,
                                                         reduction)
    # Under autocast the heads run in autocast's dtype, as F.linear's; the loss in float32.
    student_input, student_weight, student_bias, teacher_input, teacher_weight, \
        teacher_bias = _library.autocast_operands(student_input, student_weight, student_bias,
                                                  teacher_input, teacher_weight, teacher_bias)
    _check_head("student", student_input, student_weight, student_bias)
    _check_head("teacher", teacher_input, teacher_weight, teacher_bias,
                ref=(student_input, student_weight))
    n = student_input.shape[0]
    check_target(target, (n,), student_input.device)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    name = _backends.resolve(LINEAR_JSD, backend, student_input.device, None)
    chunk_size = chunk_size or default_chunk_size(n, student_input.shape[1],
                                                  student_weight.shape[0],
                                                  student_input.dtype,
                                                  student_input.device.type)
    tgt = target.long() if target is not None else None
    if name == "reference":
        return reference.linear_jsd(student_input, student_weight, student_bias, teacher_input,
                                    teacher_weight, teacher_bias, tgt, beta, temperature,
                                    ignore_index, reduction, chunk_size)
    grads = torch.is_grad_enabled() and red != 0
    loss, *computed = LINEAR_JSD.call(
        name, student_input=student_input, student_weight=student_weight,
        student_bias=student_bias, teacher_input=teacher_input, teacher_weight=teacher_weight,
        teacher_bias=teacher_bias, target=tgt, row_weight=None,
        loss_scale=loss_scale(tgt, n, ignore_index, red, student_input.dtype,
                              student_input.device),
        beta=beta, temperature=temperature, ignore_index=ignore_index, reduction=red,
        chunk_size=chunk_size, grad_input=grads and student_input.requires_grad,
        grad_weight=grads and student_weight.requires_grad,
        grad_bias=grads and student_bias is not None and student_bias.requires_grad)
    for g in computed:
        _library.owned(g)
    return loss.to(_library.loss_dtype(student_input))


class LinearJSDLoss(LossModule):
    """Module form of fusedloss.linear_jsd: forward(student_input, student_weight,
    teacher_input, teacher_weight, target=None, student_bias=None, teacher_bias=None),
    the heads' weights passed in (they belong to the two models)."""

    BUFFERS = ()

    def __init__(self, beta=0.5, temperature=1.0, ignore_index=-100, reduction="mean", *,
                 chunk_size=None, backend="auto"):
        check_options(beta, temperature, ignore_index, reduction)
        super().__init__(beta=beta, temperature=temperature, ignore_index=ignore_index,
                         reduction=reduction, chunk_size=chunk_size, backend=backend)

    def forward(self, student_input, student_weight, teacher_input, teacher_weight,
                target=None, student_bias=None, teacher_bias=None):
        return linear_jsd(student_input, student_weight, teacher_input, teacher_weight, target,
                          student_bias=student_bias, teacher_bias=teacher_bias,
                          **self.loss_options())
