"""Fused linear + cross-entropy: the LM head and its loss without ever holding the logits.

A drop-in for torch.nn.functional.linear_cross_entropy and torch.nn.LinearCrossEntropyLoss
(torch 2.14), with everything fusedloss.cross_entropy adds.

How it runs (every kernel backend, through its own cross-entropy op; the reference is the
same loop in autograd-checkpointed torch ops). The N rows of `input` go in chunks of R:

    logits = input[chunk] @ W^T (+ b)              one matmul, (R, V) in input's dtype
    cross_entropy_inplace(logits)                  the row kernel: loss, lse (and entropy)
                                                   of each row, the gradient written over
                                                   the logits (no second buffer)
    grad_input[chunk] = grad_logits @ W            exact per chunk
    grad_weight += grad_logits^T @ input[chunk]    float32 accumulation for half inputs
    grad_bias += sum of grad_logits rows

so fwd+bwd is three matmuls, the floor, and the logits never exist beyond one chunk. The
gradients are computed in the forward when the loss is reduced (their scale is then the
one scalar the backward multiplies by) and in the backward otherwise (reduction "none":
each row's incoming gradient becomes its row weight; the chunk's logits are computed once
more). Memory beyond the outputs and the gradients is O(R x V); R comes from N, D, V and
the dtype (chunk_size overrides it).
"""
import math

import torch

from . import _backends, _checks, _dtensor, _library, reference, vocab_parallel
from ._library import Op, acc_dtype
from ._linear import HeadGradients, default_chunk_size, in_forward_of, row_chunks
from .log_probs import LinearEntropy
from ._module import LossModule
from .cross_entropy import (CROSS_ENTROPY, CROSS_ENTROPY_INPLACE, check_options,
                            kernel_args, with_extras)

# ------------------------------------------------------------------------------ the op
def _n_rows(a):
    """Rows of the row kernel: one per (input row, position of a K-dimensional loss)."""
    return a.input.shape[0] * (a.linear_weight.shape[0] // a.num_classes)


def _outputs(a):
    x, w = a.input, a.linear_weight
    acc, rows = acc_dtype(x.dtype), _n_rows(a)
    new = lambda shape, like=x, dtype=None: like.new_empty(shape, dtype=dtype)  # noqa: E731
    return (new((rows,) if a.reduction == 0 else (), dtype=acc),
            new((rows,) if a.compute_lse else (0,), dtype=acc),
            new((rows,) if a.compute_entropy else (0,), dtype=acc),
            new(x.shape if a.grad_input else (0,)), new(w.shape if a.grad_weight else (0,), w),
            new((w.shape[0],) if a.grad_bias and a.linear_bias is not None else (0,), w))


def _run(a, ns):
    """The chunk loop, for every backend: `ns` names the cross-entropy ops it runs."""
    x, w, b = a.input, a.linear_weight, a.linear_bias
    (n, d), v = x.shape, w.shape[0]
    classes, positions = a.num_classes, v // a.num_classes
    loss, lse, entropy, grad_x, grad_w, grad_b = _outputs(a)
    rows = loss if a.reduction == 0 else loss.new_empty(_n_rows(a))
    want = (a.grad_input, a.grad_weight, a.grad_bias and b is not None)
    # Rows with an ignored target add 0 to the loss and the gradients, but not to lse
    # or the entropy.
    chunks, gathered = row_chunks(x, a.target, a.ignore_index, a.chunk_size, positions,
                                  skip_ignored=not (a.compute_lse or a.compute_entropy))
    if gathered:  # the rows left out are exactly 0
        rows.zero_()
        if want[0]:
            grad_x.zero_()
    grads = HeadGradients(w, (grad_x, grad_w, grad_b), want, min(n, a.chunk_size))
    # One buffer for every chunk's logits (and then their gradient): a new one per chunk
    # would pay its first-touch page faults each time on a CPU.
    buf = x.new_empty((min(n, a.chunk_size), v))
    prob_target = a.target.is_floating_point()
    per_row = lambda t: t.view(n, positions) if t is not None else None  # noqa: E731
    target, row_weight = a.target if prob_target else per_row(a.target), per_row(a.row_weight)
    # Gathered rows are copied into one buffer, which then takes their grad_input.
    xbuf = x.new_empty((min(n, a.chunk_size), d)) if gathered else None
    for sel in chunks:
        xc = torch.index_select(x, 0, sel, out=xbuf[:sel.numel()]) if gathered else x[sel]
        logits = buf[:xc.shape[0]]
        torch.mm(xc, w.t(), out=logits) if b is None else torch.addmm(b, xc, w.t(), out=logits)
        kwargs = dict(
            x=logits.view(-1, classes, positions),
            target=target[sel] if prob_target else target[sel].reshape(-1), weight=a.weight,
            row_weight=row_weight[sel].reshape(-1) if row_weight is not None else None,
            loss_scale=a.loss_scale, ignore_index=a.ignore_index,
            label_smoothing=a.label_smoothing, logit_scale=a.logit_scale, softcap=a.softcap,
            z_loss=a.z_loss, reduction=0, compute_entropy=a.compute_entropy)
        if any(want):  # the gradient of the chunk's logits, written over them
            out = CROSS_ENTROPY_INPLACE.call(ns, **kwargs)
        else:
            out = CROSS_ENTROPY.call(ns, compute_grad=False, **kwargs)[:3]
        rows.view(n, positions)[sel] = out[0].view(-1, positions)
        if a.compute_lse:
            lse.view(n, positions)[sel] = out[1].view(-1, positions)
        if a.compute_entropy:
            entropy.view(n, positions)[sel] = out[2].view(-1, positions)
        grads.add(logits, xc, sel, gathered)  # logits: now d loss / d logits
    if a.reduction != 0:
        loss.copy_(rows.sum() * a.loss_scale)
    grads.finish()
    return loss, lse, entropy, grad_x, grad_w, grad_b


_run.builds_on = "cross_entropy_inplace"

def _reference(a):
    """The op's loss output in torch ops (for higher-order gradients)."""
    logits = torch.nn.functional.linear(a.input, a.linear_weight, a.linear_bias)
    n, classes = a.input.shape[0], a.num_classes
    logits = logits.view(n, classes, -1)
    target = a.target if a.target.is_floating_point() else a.target.view(n, -1)
    rows, _ = reference.cross_entropy(
        logits, target, a.weight, a.ignore_index, "none", a.label_smoothing, a.z_loss,
        a.softcap or None, a.logit_scale,
        token_weight=a.row_weight.view(n, -1) if a.row_weight is not None else None)
    return (_library.reduce_reference_rows(rows, a, acc_dtype(a.input.dtype)),)


LINEAR_CROSS_ENTROPY = Op(
    "linear_cross_entropy",
    "(Tensor input, Tensor linear_weight, Tensor? linear_bias, Tensor target, Tensor? weight, "
    "Tensor? row_weight, Tensor loss_scale, int num_classes, int ignore_index, "
    "float label_smoothing, float logit_scale, float softcap, float z_loss, int reduction, "
    "bool compute_lse, bool compute_entropy, int chunk_size, bool grad_input, bool grad_weight, bool grad_bias) "
    "-> (Tensor loss, Tensor lse, Tensor entropy, Tensor grad_input, Tensor grad_weight, "
    "Tensor grad_bias)",
    outputs=_outputs, backends=("triton", "cpu", "cuda"), composite=_run, reference=_reference,
    **_library.ForwardGradients(
        "linear_cross_entropy", ("input", "linear_weight", "linear_bias"),
        ("grad_input", "grad_weight", "grad_bias"), _n_rows,
        rerun={"compute_lse": False, "compute_entropy": False}).op_kwargs()).define()


# ------------------------------------------------------------------------------ the loss
def _check_linear(input, linear_weight, linear_bias):
    """torch's shape rules: input (in_features) or (N, in_features); linear_weight
    (C, in_features) or (C, d1..dK, in_features) (K-dimensional loss, batched input only);
    linear_bias (C, d1..dK). Returns the logits' shape."""
    _checks.floating("input", input)
    _checks.floating("linear_weight", linear_weight)
    if input.dim() not in (1, 2):
        raise ValueError(f"input must be (in_features) or (N, in_features), got shape "
                         f"{tuple(input.shape)}; flatten leading dimensions first: "
                         "hidden.flatten(0, -2) with target.flatten()")
    if linear_weight.dim() < 2:
        raise ValueError(f"linear_weight must be (C, in_features) or (C, d1, ..., dK, "
                         f"in_features), got shape {tuple(linear_weight.shape)}")
    if linear_weight.shape[-1] != input.shape[-1]:
        raise ValueError(f"linear_weight has in_features={linear_weight.shape[-1]} but input "
                         f"has {input.shape[-1]}")
    _checks.same_dtype("linear_weight", linear_weight, input, why="they must match (F.linear)")
    _checks.same_device("linear_weight", linear_weight, input)
    out_features = tuple(linear_weight.shape[1:-1])
    if out_features and input.dim() == 1:
        raise ValueError("a K-dimensional loss (linear_weight of shape (C, d1, ..., dK, "
                         "in_features)) needs a batched input (N, in_features)")
    if linear_bias is not None:
        _checks.tensor("linear_bias", linear_bias)
        if tuple(linear_bias.shape) != tuple(linear_weight.shape[:-1]):
            raise ValueError(f"linear_bias must have shape {tuple(linear_weight.shape[:-1])}, "
                             f"got {tuple(linear_bias.shape)}")
        _checks.same_dtype("linear_bias", linear_bias, input)
        _checks.same_device("linear_bias", linear_bias, input)
    return (*input.shape[:-1], linear_weight.shape[0], *out_features)


def _chunk_size(chunk_size, options):
    if chunk_size is None and options is not None:
        chunk_size = getattr(options, "batch_chunk_size", None)
    if chunk_size is None:
        return None
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    return chunk_size


def linear_cross_entropy(input, linear_weight, target, *, linear_bias=None, weight=None,
                         reduction="mean", ignore_index=-100, label_smoothing=0.0,
                         z_loss=0.0, softcap=None, logit_scale=1.0, token_weight=None,
                         return_lse=False, return_entropy=False, chunk_size=None,
                         options=None, process_group=None, backend="auto"):
    """cross_entropy(F.linear(input, linear_weight, linear_bias), target, ...) without the
    logits: a drop-in for torch.nn.functional.linear_cross_entropy.

    input (in_features) or (N, in_features); for a (B, T, D) hidden state pass
    hidden.flatten(0, -2) and target.flatten(). linear_weight (C, in_features), or
    (C, d1, ..., dK, in_features) for a K-dimensional loss; linear_bias (C, d1, ..., dK).
    target: class indices of shape (), (N) or (N, d1, ..., dK), or probabilities of the
    logits' shape. weight, reduction, ignore_index (None means -100, as torch's),
    label_smoothing, z_loss, softcap, logit_scale, token_weight, return_lse and
    return_entropy: as in fusedloss.cross_entropy. options: torch's
    LinearCrossEntropyOptions, accepted for compatibility (its batch_chunk_size is the
    chunk size; fusedloss always chunks).

    chunk_size: rows per chunk (default from N, D, V and the dtype, see
    default_chunk_size). Memory beyond the outputs: one chunk of logits, R x V x (the
    input's itemsize), which the row kernel overwrites with its gradient; with a gradient,
    grad_input (N x D, input's dtype), grad_weight (V x D: accumulated in float32 for half
    weights, so 4 V D bytes during the loop, then V x D in the weight's dtype) and
    grad_bias (V); for half inputs on a CPU the chunk's gradient is also upcast for the
    grad_weight matmul (R x V x 4 bytes). For reduced losses the gradients are computed in
    the forward; for reduction "none" the backward runs the chunks again.

    process_group: vocab-parallel over a torch.distributed group (tensor-parallel LM heads):
    linear_weight and linear_bias hold this rank's contiguous slice of the classes, in rank
    order, input is the same on every rank, target holds global class indices; every rank
    returns the same loss, and the backward all-reduces grad_input so that each rank gets
    the whole gradient of the replicated input (as Megatron's column-parallel head). The
    logits stay chunked on each rank, which runs the chosen backend's log-probs kernels
    over its rows of the head (one pass for the statistics, one for the gradients); a few
    numbers per row cross ranks, once for all the chunks (fusedloss/vocab_parallel.py); a
    K-dimensional head runs position by position.

    DTensor head (tensor parallel): linear_weight (and linear_bias) Shard(0) along one mesh
    dimension is vocab-parallel on that dimension's group; replicated, a local head. input
    must then be a DTensor on the same mesh, replicated or sharded on its rows (sequence
    parallel: gathered, its gradient returned sharded as it was); a plain input with a
    DTensor weight is refused (an FSDP-sharded weight looks like a vocab-sharded one).
    The outputs are replicated DTensors.

    Returns the loss, plus lse (detached) and the entropy (with its gradient: the backward
    then runs the chunks again for it, if it reaches the loss; detached for a K-dimensional
    loss or with a process_group), one per position, when asked, as
    fusedloss.cross_entropy does.
    """
    if _dtensor.is_dtensor(input, linear_weight, linear_bias):
        return _dtensor.call_head(
            linear_cross_entropy, input, linear_weight, linear_bias, "linear_cross_entropy",
            dict(target=target, weight=weight, token_weight=token_weight),
            dict(reduction=reduction, ignore_index=ignore_index,
                 label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
                 logit_scale=logit_scale, return_lse=return_lse, return_entropy=return_entropy,
                 chunk_size=chunk_size, options=options, process_group=process_group,
                 backend=backend))
    # Under autocast the product runs in autocast's dtype, as F.linear's; the loss in float32.
    input, linear_weight, linear_bias = _library.autocast_operands(input, linear_weight,
                                                                   linear_bias)
    logits_shape = _check_linear(input, linear_weight, linear_bias)
    o = check_options(input, target, weight, token_weight, logits_shape,
                      0 if input.dim() == 1 else 1, reduction, ignore_index, label_smoothing,
                      logit_scale, softcap, z_loss, vocab_parallel=process_group is not None)
    chunk_size = _chunk_size(chunk_size, options)
    if process_group is not None:
        return _vocab_parallel(input, linear_weight, linear_bias, target, weight,
                               token_weight, o, chunk_size, return_lse, return_entropy,
                               backend, process_group)
    name = _backends.resolve(LINEAR_CROSS_ENTROPY, backend, input.device, o.needs_reference)

    x = input.reshape(-1, input.shape[-1])
    n_classes = linear_weight.shape[0]
    w = linear_weight.reshape(-1, input.shape[-1])
    b = linear_bias.reshape(-1) if linear_bias is not None else None
    chunk_size = chunk_size or default_chunk_size(x.shape[0], x.shape[1], w.shape[0],
                                                  input.dtype, input.device.type)
    if name == "reference":
        loss, lse, entropy = reference.linear_cross_entropy(
            x, w, b, target, n_classes, weight, o.ignore_index, reduction, o.label_smoothing,
            o.z_loss, o.softcap, o.logit_scale, token_weight, chunk_size, return_entropy)
        return with_extras(loss, lse, entropy, o, return_lse, return_entropy)

    target_k = target.reshape(x.shape[0], n_classes, -1).to(input.dtype) if o.prob_target \
        else target.reshape(-1).long()
    grads = torch.is_grad_enabled() and o.reduction != 0
    # The entropy's gradient (one position per row: not a K-dimensional loss) needs lse.
    entropy_grad = return_entropy and torch.is_grad_enabled() and w.shape[0] == n_classes \
        and any(t is not None and t.requires_grad for t in (input, linear_weight, b))
    loss, lse, entropy, *computed = LINEAR_CROSS_ENTROPY.call(
        name, input=x, linear_weight=w, linear_bias=b, num_classes=n_classes,
        compute_lse=return_lse or entropy_grad, compute_entropy=return_entropy,
        chunk_size=chunk_size, grad_input=grads and input.requires_grad,
        grad_weight=grads and linear_weight.requires_grad,
        grad_bias=grads and b is not None and b.requires_grad,
        **kernel_args(o, target_k, weight, token_weight, input))
    for g in computed:
        _library.owned(g)
    if entropy_grad:
        entropy = LinearEntropy.apply(x, w, b, entropy, lse, o.logit_scale, o.softcap,
                                      chunk_size)
    return with_extras(loss.to(_library.loss_dtype(input)), lse, entropy, o, return_lse,
                       return_entropy)


def lm_head_cross_entropy(head, input, target, **options):
    """linear_cross_entropy(input, head.weight, target, linear_bias=head.bias, **options)
    computed inside `head`'s forward (head(input) runs it), so that FSDP2 (fully_shard),
    DeepSpeed ZeRO-3 and accelerate gather the head's weight as they would for
    head(input), and reduce its gradient as they would. Works for a plain nn.Linear too.

    With FSDP2, reduced losses compute the head's gradients in the forward, so the
    backward does not need the weight: reshard_after_forward=True frees it after the loss
    at the cost of the all-gather FSDP2's pre-backward hook makes anyway; False keeps the
    unsharded V x D weight alive until the backward (no second all-gather). reduction
    "none" and a differentiated entropy recompute the chunks in the backward, which then
    reads the weight FSDP2 gathered again.
    """
    return in_forward_of(head, lambda x, w, b: linear_cross_entropy(
        x, w, target, linear_bias=b, **options), input)


def _vocab_parallel(input, linear_weight, linear_bias, target, weight, token_weight, o,
                    chunk_size, return_lse, return_entropy, backend, group):
    """The vocab-parallel loss, position by position for a K-dimensional head (each
    position's rows of the head are a head of their own over the same input)."""
    if o.needs_reference:
        raise ValueError(f"{o.needs_reference} is not available with a process_group")
    x = input.reshape(-1, input.shape[-1])
    n, c = x.shape[0], linear_weight.shape[0]
    s = math.prod(linear_weight.shape[1:-1])
    target_k = target.to(input.dtype) if o.prob_target else target.reshape(-1).long()
    k = kernel_args(o, target_k, weight, token_weight, input)
    w = linear_weight.reshape(c, s, x.shape[1])
    b = linear_bias.reshape(c, s) if linear_bias is not None else None
    t = target_k.reshape(n, c, s) if o.prob_target else target_k.view(n, s)
    rw = k["row_weight"].view(n, s) if k["row_weight"] is not None else None
    chunk_size = chunk_size or default_chunk_size(n, x.shape[1], c, input.dtype,
                                                  input.device.type)
    group = vocab_parallel.Slice.of(group, x, c, n * s, "linear_cross_entropy")  # once
    outs = [vocab_parallel.linear_cross_entropy(
        x, w[:, i].contiguous(), b[:, i].contiguous() if b is not None else None, t[..., i],
        weight, rw[:, i].contiguous() if rw is not None else None, k["loss_scale"], o,
        chunk_size, return_entropy, group, backend=backend) for i in range(s)]
    loss, lse, entropy = (
        None if outs[0][j] is None else
        torch.stack([out[j] for out in outs], 1).reshape(-1) if j or o.reduction == 0
        else sum(out[j] for out in outs) for j in range(3))
    return with_extras(loss.to(_library.loss_dtype(input)), lse, entropy, o, return_lse,
                       return_entropy)


class LinearCrossEntropyLoss(LossModule):
    """Drop-in for torch.nn.LinearCrossEntropyLoss: it owns the linear layer as torch's
    does (same constructor arguments, same state_dict keys: linear.weight, linear.bias,
    weight), plus fusedloss's extras. forward(input, target, token_weight=None).
    With a process_group, num_classes is this rank's slice (see linear_cross_entropy)."""

    def __init__(self, in_features, num_classes, *, out_features=(), bias=False, device=None,
                 dtype=None, reduction="mean", weight=None, ignore_index=None,
                 label_smoothing=0.0, options=None, z_loss=0.0, softcap=None, logit_scale=1.0,
                 return_lse=False, return_entropy=False, chunk_size=None, process_group=None,
                 backend="auto"):
        if weight is not None and tuple(weight.shape) != (num_classes,):
            raise ValueError(f"weight must have shape ({num_classes},), got "
                             f"{tuple(weight.shape)}")
        _checks.number("label_smoothing", label_smoothing, low=0.0, high=1.0)
        super().__init__(weight=weight, reduction=reduction, ignore_index=ignore_index,
                         label_smoothing=label_smoothing, options=options, z_loss=z_loss,
                         softcap=softcap, logit_scale=logit_scale, return_lse=return_lse,
                         return_entropy=return_entropy, chunk_size=chunk_size,
                         process_group=process_group, backend=backend)
        self.num_classes = num_classes
        self.out_features = tuple(out_features)
        # torch.nn.Linear cannot hold a multi-dimensional weight: it is stored flat, as in
        # torch's module, and reshaped in forward.
        self.linear = torch.nn.Linear(in_features, math.prod(self.out_features, start=num_classes),
                                      bias=bias, device=device, dtype=dtype)

    def forward(self, input, target, token_weight=None):
        shape = (self.num_classes, *self.out_features)
        bias = self.linear.bias.reshape(shape) if self.linear.bias is not None else None
        return linear_cross_entropy(
            input, self.linear.weight.reshape(*shape, self.linear.in_features), target,
            linear_bias=bias, token_weight=token_weight, **self.loss_options())

    def extra_repr(self):
        return ", ".join(filter(None, (
            f"in_features={self.linear.in_features}, num_classes={self.num_classes}",
            f"out_features={self.out_features}" if self.out_features else "",
            "bias=True" if self.linear.bias is not None else "", super().extra_repr())))
