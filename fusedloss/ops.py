"""The op layer: torch.library ops, their fake kernels and their autograd.

Two namespaces carry the same ops with the same schemas:
  torch.ops.fusedloss.*         C++ kernels (schemas in csrc/fusedloss.cpp; CPU impls in
                                fusedloss._C, CUDA impls in fusedloss._C_cuda)
  torch.ops.fusedloss_triton.*  Triton kernels (launchers in fusedloss/_triton.py)
The fake kernels and the autograd formulas below are registered once for both, so
torch.compile(fullgraph=True) traces through every backend and opcheck passes.

The contract every backend implements (x is (B, C, S) contiguous: row r = b*S + s holds
x[b, :, s], so (N, C) inputs have S = 1 and (N, C, d1..dK) inputs are read strided, with
no transposed copy; "acc" is float64 for float64 inputs and float32 otherwise):

cross_entropy(x, target, weight, loss_scale, ignore_index, label_smoothing, logit_scale,
              softcap, z_loss, reduction, compute_grad) -> (loss, lse, grad)
    z = logit_scale * x, then z = softcap * tanh(z / softcap) when softcap > 0.
    lse_r = logsumexp_c z[r, c]                                        (B*S,) acc
    class-index target (int64, (B*S,)), t = target[r], w = weight or ones (C,) acc:
      t == ignore_index -> loss_r = 0, grad row = 0
      t outside [0, C)  -> loss_r = NaN, grad row = NaN (never read out of bounds)
      else loss_r = (1-eps) w_t (lse - z_t) + eps/C sum_c w_c (lse - z_c) + z_loss w_t lse^2
           dloss_r/dz_c = (1-eps) w_t (p_c - [c==t]) + eps/C (W p_c - w_c) + 2 z_loss w_t lse p_c
           with p = softmax(z), W = sum_c w_c
    probability target (floating, (B, C, S) like x): t' = (1-eps) t + eps/C, T = sum_c w_c t'_c
      loss_r = T lse - sum_c w_c t'_c z_c + z_loss lse^2
      dloss_r/dz_c = T p_c - w_c t'_c + 2 z_loss lse p_c
    grad = dloss_r/dx * loss_scale, dtype of x, layout of x; an empty (0,) tensor when
      compute_grad is False. loss_scale is a 0-dim acc tensor: 1/denominator for mean, 1
      otherwise (computed by the caller, so no backend needs a host sync).
    loss: reduction 0 (none) -> loss_r as (B*S,) in x.dtype;
          1 (mean), 2 (sum) -> (sum_r loss_r) * loss_scale, 0-dim, x.dtype.
cross_entropy_inplace(x!, ...same but no compute_grad) -> (loss, lse)
    As cross_entropy, with the gradient written over x.
focal_loss(x, target, alpha, weight, loss_scale, gamma, ignore_index, reduction,
           compute_grad) -> (loss, grad)
    Class-index targets only. logp_t = z_t - lse, p_t = exp(logp_t), q = 1 - p_t,
    a = alpha[t] or 1, w = weight[t] or 1:
      loss_r = -w a q^gamma logp_t
      dloss_r/dx_c = w a q^gamma (1 - gamma p_t logp_t / q) (p_c - [c==t]),
      with logp_t / q -> -1 where q == 0 (finite for every gamma >= 0).
    Ignored and out-of-range targets as in cross_entropy; reductions as there.
sigmoid_focal_loss(x, target, loss_scale, alpha, gamma, reduction, compute_grad)
    -> (loss, grad), elementwise over x.reshape(-1) and a same-shape float target:
      p = sigmoid(x), ce = max(x,0) - x t + log1p(exp(-|x|)), m = p (1-t) + (1-p) t
      a_t = alpha t + (1-alpha)(1-t) if alpha >= 0 else 1
      loss = a_t ce m^gamma;  dloss/dx = a_t m^gamma ((p - t) + gamma ce r),
      r = p (1-p) (1-2t) / m (0 where m == 0).
info_nce(query, key, negatives, labels, scale, symmetric)
    -> (row_loss, col_loss, row_lse, col_lse), all acc (float32 for half inputs)
    logits[i, j] = scale * <query_i, [key; negatives]_j>; positive of row i is labels[i]
    (i when labels is None); row_loss_i = row_lse_i - logits[i, pos_i] (NaN if pos_i is out
    of range). symmetric (labels None, N == M): col_lse_j = logsumexp_i logits[i, j] for
    j < M, col_loss_j = col_lse_j - logits[j, j]; otherwise col_* are empty (0,).
info_nce_backward(grad_row, grad_col, query, key, negatives, labels, scale, row_lse,
                  col_lse, symmetric) -> (grad_query, grad_key, grad_negatives, grad_scale)
    dlogits[i, j] = grad_row_i (P[i, j] - [j == pos_i])
                    + [symmetric, j < M] grad_col_j (Pc[i, j] - [i == j])
    with P = exp(logits - row_lse[:, None]), Pc = exp(logits - col_lse[None, :]);
    grad_query = scale dlogits @ [key; negatives], grad_key = scale dlogits[:, :M]^T query,
    grad_negatives = scale dlogits[:, M:]^T query (empty (0,) when negatives is None),
    grad_scale = sum_ij dlogits[i, j] <query_i, keys_j> (0-dim, scale's dtype).
"""
import contextlib
import contextvars

import torch

from . import _backends

REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}

SCHEMAS = {
    "cross_entropy": (
        "(Tensor x, Tensor target, Tensor? weight, Tensor loss_scale, int ignore_index, "
        "float label_smoothing, float logit_scale, float softcap, float z_loss, "
        "int reduction, bool compute_grad) -> (Tensor, Tensor, Tensor)"),
    "cross_entropy_inplace": (
        "(Tensor(a!) x, Tensor target, Tensor? weight, Tensor loss_scale, int ignore_index, "
        "float label_smoothing, float logit_scale, float softcap, float z_loss, "
        "int reduction) -> (Tensor, Tensor)"),
    "focal_loss": (
        "(Tensor x, Tensor target, Tensor? alpha, Tensor? weight, Tensor loss_scale, "
        "float gamma, int ignore_index, int reduction, bool compute_grad) -> (Tensor, Tensor)"),
    "sigmoid_focal_loss": (
        "(Tensor x, Tensor target, Tensor loss_scale, float alpha, float gamma, "
        "int reduction, bool compute_grad) -> (Tensor, Tensor)"),
    "info_nce": (
        "(Tensor query, Tensor key, Tensor? negatives, Tensor? labels, Tensor scale, "
        "bool symmetric) -> (Tensor, Tensor, Tensor, Tensor)"),
    "info_nce_backward": (
        "(Tensor grad_row, Tensor grad_col, Tensor query, Tensor key, Tensor? negatives, "
        "Tensor? labels, Tensor scale, Tensor row_lse, Tensor col_lse, bool symmetric) "
        "-> (Tensor, Tensor, Tensor, Tensor)"),
}

TRITON_NS = "fusedloss_triton"
CPP_NS = "fusedloss"


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------- fake kernels
def _rows(x):
    return x.shape[0] * x.shape[2]


def _loss_like(x, rows, reduction):
    return x.new_empty((rows,) if reduction == 0 else ())


def _grad_like(x, compute_grad):
    return torch.empty_like(x) if compute_grad else x.new_empty((0,))


def _fake_cross_entropy(x, target, weight, loss_scale, ignore_index, label_smoothing,
                        logit_scale, softcap, z_loss, reduction, compute_grad):
    lse = x.new_empty((_rows(x),), dtype=acc_dtype(x.dtype))
    return _loss_like(x, _rows(x), reduction), lse, _grad_like(x, compute_grad)


def _fake_cross_entropy_inplace(x, target, weight, loss_scale, ignore_index,
                                label_smoothing, logit_scale, softcap, z_loss, reduction):
    lse = x.new_empty((_rows(x),), dtype=acc_dtype(x.dtype))
    return _loss_like(x, _rows(x), reduction), lse


def _fake_focal_loss(x, target, alpha, weight, loss_scale, gamma, ignore_index, reduction,
                     compute_grad):
    return _loss_like(x, _rows(x), reduction), _grad_like(x, compute_grad)


def _fake_sigmoid_focal_loss(x, target, loss_scale, alpha, gamma, reduction, compute_grad):
    return _loss_like(x, x.numel(), reduction), _grad_like(x, compute_grad)


def _fake_info_nce(query, key, negatives, labels, scale, symmetric):
    acc = acc_dtype(query.dtype)
    n, m = query.shape[0], key.shape[0]
    cols = m if symmetric else 0
    return (query.new_empty((n,), dtype=acc), query.new_empty((cols,), dtype=acc),
            query.new_empty((n,), dtype=acc), query.new_empty((cols,), dtype=acc))


def _fake_info_nce_backward(grad_row, grad_col, query, key, negatives, labels, scale,
                            row_lse, col_lse, symmetric):
    grad_neg = torch.empty_like(negatives) if negatives is not None else query.new_empty((0,))
    return (torch.empty_like(query), torch.empty_like(key), grad_neg, torch.empty_like(scale))


_FAKES = {name: globals()[f"_fake_{name}"] for name in SCHEMAS}


# ---------------------------------------------------------------- autograd
_keep_gradient_buffers = contextvars.ContextVar("fusedloss_keep_gradient_buffers",
                                                default=False)


@contextlib.contextmanager
def reusable_graph():
    """Build losses whose autograd graph can be run backward more than once.

    By default a kernel backend keeps one gradient buffer per loss and its backward scales
    that buffer in place, so fwd+bwd never holds more than the logits and one gradient.
    That consumes the buffer: a second backward through the same graph (retain_graph=True,
    torch.autograd.gradcheck) raises. Losses computed inside this context keep the buffer
    intact instead, at the cost of one more gradient-sized buffer during the backward.
    """
    token = _keep_gradient_buffers.set(True)
    try:
        yield
    finally:
        _keep_gradient_buffers.reset(token)


def reusable_graph_active():
    return _keep_gradient_buffers.get()


def owned(grad):
    """Hand an op's gradient output over to the autograd graph: the backward may scale it
    in place (the functional layer drops its own reference right after)."""
    if not torch.compiler.is_compiling() and not _keep_gradient_buffers.get():
        grad._fusedloss_owned = True
    return grad


CONSUMED = ("fusedloss: this loss's gradient buffer was already scaled in place by an "
            "earlier backward through the same graph; to run backward more than once "
            "(retain_graph=True, gradcheck), compute the loss inside "
            "`with fusedloss.reusable_graph():`")


def scale_grad(grad, grad_out, reduction, row_shape, in_place):
    """d loss / d x = (saved per-row gradient) * grad_out, broadcast over each row."""
    if reduction == 0:
        grad_out = grad_out.reshape(row_shape)
    if not in_place:
        return grad * grad_out
    # A loss that ends the graph gets grad_out == 1: skip that pass over the buffer where
    # reading the value is free (a CPU scalar; on CUDA it would be a host sync).
    if grad_out.device.type == "cpu" and grad_out.numel() == 1 and float(grad_out) == 1.0:
        return grad
    return grad.mul_(grad_out)


def _scale_saved_grad(ctx, grad_out):
    """Scale the saved buffer in place when the graph owns it (see reusable_graph); under
    tracing, or when a caller of the raw op still holds the buffer (opcheck does), out of
    place."""
    grad = ctx.grad
    if grad is None:
        raise RuntimeError(CONSUMED)
    in_place = (getattr(grad, "_fusedloss_owned", False) and type(grad) is torch.Tensor
                and not torch.compiler.is_compiling())
    if in_place:
        ctx.grad = None
    return scale_grad(grad, grad_out, ctx.reduction, ctx.row_shape, in_place)


def _setup_rowwise(ctx, x, reduction, outputs, row_shape):
    ctx.mark_non_differentiable(*outputs[1:])
    # The unused outputs (lse, grad) must not get zero-filled gradients: for grad that
    # would be one more N x C buffer and pass per backward.
    ctx.set_materialize_grads(False)
    ctx.grad = outputs[-1]
    ctx.x_numel = x.numel()
    ctx.reduction = reduction
    ctx.row_shape = row_shape


def _setup_cross_entropy(ctx, inputs, output):
    x, reduction = inputs[0], inputs[9]
    _setup_rowwise(ctx, x, reduction, output, (x.shape[0], 1, x.shape[2]))


def _setup_focal_loss(ctx, inputs, output):
    x, reduction = inputs[0], inputs[7]
    _setup_rowwise(ctx, x, reduction, output, (x.shape[0], 1, x.shape[2]))


def _setup_sigmoid_focal_loss(ctx, inputs, output):
    x, reduction = inputs[0], inputs[5]
    _setup_rowwise(ctx, x, reduction, output, x.shape)


def _backward_rowwise(n_inputs):
    def backward(ctx, grad_loss, *unused):
        if grad_loss is None:  # the loss itself did not reach the output
            return (None,) * n_inputs
        if ctx.grad is not None and ctx.grad.numel() != ctx.x_numel:
            raise RuntimeError("fusedloss: a gradient was requested from an op call made "
                               "with compute_grad=False")
        return (_scale_saved_grad(ctx, grad_loss),) + (None,) * (n_inputs - 1)
    return backward


def _setup_info_nce(ctx, inputs, output):
    query, key, negatives, labels, scale, symmetric = inputs
    row_loss, col_loss, row_lse, col_lse = output
    ctx.mark_non_differentiable(row_lse, col_lse)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(query, key, negatives, labels, scale, row_lse, col_lse)
    ctx.symmetric = symmetric


def _make_backward_info_nce(ns):
    def backward(ctx, grad_row, grad_col, grad_row_lse, grad_col_lse):
        query, key, negatives, labels, scale, row_lse, col_lse = ctx.saved_tensors
        if grad_row is None and grad_col is None:
            return None, None, None, None, None, None
        grad_row = torch.zeros_like(row_lse) if grad_row is None else grad_row
        grad_col = torch.zeros_like(col_lse) if grad_col is None else grad_col
        gq, gk, gn, gs = getattr(torch.ops, ns).info_nce_backward(
            grad_row, grad_col, query, key, negatives, labels, scale, row_lse, col_lse,
            ctx.symmetric)
        return gq, gk, (gn if negatives is not None else None), None, gs, None
    return backward


def _register(ns):
    for name, fake in _FAKES.items():
        torch.library.register_fake(f"{ns}::{name}", fake)
    torch.library.register_autograd(f"{ns}::cross_entropy", _backward_rowwise(11),
                                    setup_context=_setup_cross_entropy)
    torch.library.register_autograd(f"{ns}::focal_loss", _backward_rowwise(9),
                                    setup_context=_setup_focal_loss)
    torch.library.register_autograd(f"{ns}::sigmoid_focal_loss", _backward_rowwise(7),
                                    setup_context=_setup_sigmoid_focal_loss)
    torch.library.register_autograd(f"{ns}::info_nce", _make_backward_info_nce(ns),
                                    setup_context=_setup_info_nce)


# The Triton namespace is defined here; its implementations import the kernels lazily so
# that the package imports where Triton does not.
_triton_lib = torch.library.Library(TRITON_NS, "DEF")


def _triton_impl(name):
    def impl(*args):
        from . import _triton
        return getattr(_triton, name)(*args)
    impl.__name__ = f"{TRITON_NS}_{name}"
    return impl


for _name, _schema in SCHEMAS.items():
    _triton_lib.define(_name + _schema)
    _triton_lib.impl(_name, _triton_impl(_name), "CompositeExplicitAutograd")
_register(TRITON_NS)

def register_cpp_ops():
    """Register the fake kernels and autograd of the C++ ops; called once, by
    fusedloss._backends, right after fusedloss._C (which defines them) has loaded."""
    _register(CPP_NS)


def namespace(backend):
    """The torch.ops namespace that carries `backend`'s kernels."""
    if backend == "triton":
        return torch.ops.fusedloss_triton
    if backend in ("cpu", "cuda"):
        _backends.unavailable_reason("cpu", "cpu")  # loads fusedloss._C once
        return torch.ops.fusedloss
    raise ValueError(f"backend {backend!r} has no op namespace")
