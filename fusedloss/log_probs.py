"""Token log-probabilities and the entropy of the next-token softmax, with gradients for
any per-token upstream gradients: what RL post-training (GRPO, PPO, RLOO, DPO, KTO) needs
per generated token, from the logits (log_probs) or from the LM head's hidden states
without the logits ever whole (linear_log_probs).

The algebra every backend computes ("acc" is float64 for float64 inputs, float32
otherwise). Per row r of the (N, V) logits x (linear_log_probs: x = input @ W^T + b, a
chunk of rows at a time), with the row's inverse temperature a = 1 / T_r:

    u_c = logit_scale x_c,   y_c = softcap tanh(u_c / softcap)   (y = u without softcap)
    z_c = a y_c,   m = max_c z_c,   s = sum_c exp(z_c - m),   lse = m + log s
    p_c = exp(z_c - lse),   t = target[r]
    log_probs        = z_t - lse
    entropy          = -sum_c p_c log p_c = log s + d / s,   d = sum_c exp(z_c - m) (m - z_c)
                       (every term of d is >= 0: no cancellation)
    lse              = logsumexp_c z_c
    log_sum_sq_probs = log sum_c p_c^2 = log q - 2 log s,    q = sum_c exp(2 (z_c - m))
    mean_logits      = sum_c z_c / V
    is_top1          = t is the first index of max_c z_c

  backward, with g and h the upstream gradients of log_probs and entropy (each absent
  term costs nothing), H the entropy, and (internal: the vocab-parallel losses) k and u
  those of lse and mean_logits:
    dz_c = g ([c == t] - p_c) - h p_c (z_c - lse + H) + k p_c + u / V
    dx_c = dz_c a logit_scale (1 - (y_c / softcap)^2)       (the last factor: softcap only)

A row whose target is ignore_index has every output 0 (is_top1 False) and a zero
gradient, and no pass is made over its logits. A target outside [0, V) that is not
ignore_index raises on CPU tensors; on a GPU (where that check would synchronise the
host) its row's outputs and gradient are NaN, never an out-of-bounds read. The same for
a temperature <= 0.

The kernels make one pass over a row in the forward (online max, sums rescaled as the
max grows) and one in the backward, which recomputes p from the saved lse: the upstream
gradients are unknown at forward time, so nothing of the size of the logits is kept.
linear_log_probs therefore runs four matrix products in all (the floor): the chunk's
logits in the forward, again in the backward, and the two gradient products.
"""
import typing

import torch

from . import _backends, _checks, _dtensor, _library, reference, vocab_parallel
from ._library import Op, acc_dtype
from ._module import LossModule
from ._linear import HeadGradients, default_chunk_size, in_forward_of, row_chunks

EXTRAS = ("lse", "log_sum_sq_probs", "mean_logits", "is_top1")
# Bytes of one chunk of logits for linear_log_probs. Its four products per step dominate,
# and on a CPU a product of a few hundred rows runs well below a large one's speed (2
# cores, N=4096 D=512 V=32000 float32: 34 products of 120 rows 1.40 s, one of 4096 rows
# 0.84 s; fwd+bwd 4.38 s at 120-row chunks (15 MiB), 3.22 s at 512 (64 MiB), 3.09 s at
# 1024): 64 MiB, still O(chunk x V) and far below the whole logits. On a GPU the chunk
# only has to keep the products large.
CHUNK_BYTES = {"cpu": 64 << 20, "cuda": 1 << 30}
_BACKENDS = ("triton", "cpu", "cuda")


class LogProbs(typing.NamedTuple):
    """What log_probs and linear_log_probs return when the entropy or an extra is asked
    for; a field not asked for is None. log_probs and entropy carry gradients."""
    log_probs: torch.Tensor
    entropy: typing.Optional[torch.Tensor] = None
    lse: typing.Optional[torch.Tensor] = None
    log_sum_sq_probs: typing.Optional[torch.Tensor] = None
    mean_logits: typing.Optional[torch.Tensor] = None
    is_top1: typing.Optional[torch.Tensor] = None


# ------------------------------------------------------------------------------ row ops
# The arguments every row op shares: the rows' targets and how their logits are
# transformed (row_inv_temperature, (N,) acc, overrides inv_temperature when given).
_ROW_ARGS = ("Tensor target, Tensor? row_inv_temperature, float inv_temperature, "
             "float logit_scale, float softcap, int ignore_index")
_WANT_NAMES = ("compute_entropy", "compute_log_sum_sq", "compute_mean", "compute_top1")
_WANT = ", ".join(f"bool {name}" for name in _WANT_NAMES)
_OUTPUTS = ("Tensor log_probs, Tensor entropy, Tensor lse, Tensor log_sum_sq_probs, "
            "Tensor mean_logits, Tensor is_top1")
# grad_lse and grad_mean_logits: upstream gradients of lse (d lse / d z_c = p_c) and of
# mean_logits (1 / V), which the vocab-parallel losses (fusedloss/vocab_parallel.py) use.
_GRADS = ("Tensor lse, Tensor? entropy, Tensor? grad_log_probs, Tensor? grad_entropy, "
          "Tensor? grad_lse, Tensor? grad_mean_logits")


def _row_outputs(a, n, like):
    """The six per-row outputs: (n,) where computed (log_probs and lse always: the
    backward reads lse), else (0,)."""
    acc = acc_dtype(like.dtype)
    new = lambda want, dtype=acc: like.new_empty((n,) if want else (0,), dtype=dtype)  # noqa: E731
    return (new(True), new(a.compute_entropy), new(True), new(a.compute_log_sum_sq),
            new(a.compute_mean), new(a.compute_top1, torch.bool))


def _inv_temperature(a):
    """Each row's 1 / T: the per-row tensor, or the scalar (a: the ops' arguments)."""
    return a["row_inv_temperature"] if a["row_inv_temperature"] is not None \
        else a["inv_temperature"]


def _reference_rows(a, x):
    """The outputs of the logits x for the op arguments a, in torch ops."""
    return reference.log_probs_rows(x, a.target, _inv_temperature(vars(a)), a.logit_scale,
                                    a.softcap or None, a.ignore_index)


def _reference(a):
    """The differentiable outputs (log_probs, entropy) in torch ops: higher-order gradients."""
    return _reference_rows(a, a.x)[:2]


def _setup(ctx, a, outputs):
    ctx.mark_non_differentiable(*outputs[2:])
    ctx.set_materialize_grads(False)  # an unused output's gradient stays None: no work


def _backward(ctx, grad_log_probs, grad_entropy, *unused):
    if "x" not in _library.needed_inputs(ctx) or (grad_log_probs is None and
                                                  grad_entropy is None):
        return {}
    a = LOG_PROBS.saved_args(ctx)
    grad = LOG_PROBS_GRAD.call(ctx.fusedloss_backend, x=a.x,
                               **_grad_args(a, grad_log_probs, grad_entropy))
    return {"x": grad}


def _grad_args(a, grad_log_probs, grad_entropy, rows=slice(None), grad_lse=None,
               grad_mean_logits=None):
    """The row ops' backward arguments from the forward's (of `rows`)."""
    acc = a.lse.dtype
    if a.entropy is None or a.entropy.numel() != a.lse.numel():  # none: no gradient for it
        grad_entropy = None
    pick = lambda t: t[rows].to(acc).contiguous() if t is not None else None  # noqa: E731
    return dict(target=a.target[rows], row_inv_temperature=pick(a.row_inv_temperature),
                inv_temperature=a.inv_temperature, logit_scale=a.logit_scale,
                softcap=a.softcap, ignore_index=a.ignore_index, lse=a.lse[rows],
                entropy=a.entropy[rows] if grad_entropy is not None else None,
                grad_log_probs=pick(grad_log_probs), grad_entropy=pick(grad_entropy),
                grad_lse=pick(grad_lse), grad_mean_logits=pick(grad_mean_logits))


LOG_PROBS = Op(
    "log_probs", f"(Tensor x, {_ROW_ARGS}, {_WANT}) -> ({_OUTPUTS})",
    outputs=lambda a: _row_outputs(a, a.x.shape[0], a.x), backends=_BACKENDS,
    kernels="log_probs", reference=_reference, differentiable=(0, 1),
    saved_outputs=("entropy", "lse"), setup_context=_setup, backward=_backward).define()

# d (sum_r g_r log_probs_r + h_r entropy_r) / d x: into a new buffer, or over x itself
# (the chunks of linear_log_probs).
LOG_PROBS_GRAD = Op(
    "log_probs_grad", f"(Tensor x, {_ROW_ARGS}, {_GRADS}) -> Tensor grad",
    outputs=lambda a: a.x.new_empty(a.x.shape), backends=_BACKENDS,
    kernels="log_probs").define()
LOG_PROBS_GRAD_INPLACE = Op(
    "log_probs_grad_inplace", f"(Tensor(a!) x, {_ROW_ARGS}, {_GRADS}) -> ()",
    outputs=lambda a: None, backends=_BACKENDS, kernels="log_probs").define()


# ------------------------------------------------------------------------------ linear ops
def _row_args(a, sel):
    """The row ops' arguments for the rows `sel` of a linear op."""
    return dict(target=a.target[sel],
                row_inv_temperature=a.row_inv_temperature[sel]
                if a.row_inv_temperature is not None else None,
                inv_temperature=a.inv_temperature, logit_scale=a.logit_scale,
                softcap=a.softcap, ignore_index=a.ignore_index)


def _logit_chunks(a, ns):
    """(rows, their input rows, their logits) chunk by chunk, in one reused buffer; on
    CPU tensors only the rows with a counted target (the others' outputs and gradients
    are 0). Also returns whether rows were left out."""
    x, w, b = a.input, a.linear_weight, a.linear_bias
    n = x.shape[0]
    chunks, gathered = row_chunks(x, a.target, a.ignore_index, a.chunk_size)
    buf = x.new_empty((min(n, a.chunk_size), w.shape[0]))
    xbuf = x.new_empty((min(n, a.chunk_size), x.shape[1])) if gathered else None

    def run():
        for sel in chunks:
            xc = torch.index_select(x, 0, sel, out=xbuf[:sel.numel()]) if gathered \
                else x[sel]
            logits = buf[:xc.shape[0]]
            if b is None:
                torch.mm(xc, w.t(), out=logits)
            else:
                torch.addmm(b, xc, w.t(), out=logits)
            yield sel, xc, logits
    return run(), gathered


def _linear_run(a, ns):
    """The forward chunk loop, for every backend (`ns` names the row op it runs)."""
    outs = _row_outputs(a, a.input.shape[0], a.input)
    chunks, gathered = _logit_chunks(a, ns)
    if gathered:  # the rows left out are exactly 0
        for out in outs:
            out.zero_()
    for sel, _, logits in chunks:
        got = LOG_PROBS.call(ns, x=logits, **_row_args(a, sel),
                             **{k: getattr(a, k) for k in _WANT_NAMES})
        for out, piece in zip(outs, got):
            if out.numel():
                out[sel] = piece
    return outs


_linear_run.builds_on = "log_probs"


def _linear_grad_run(a, ns):
    """The backward chunk loop: the chunk's logits again, their gradient written over
    them, then the head's gradients (grad_weight accumulated in float32 for half)."""
    x, w, b = a.input, a.linear_weight, a.linear_bias
    want = (a.grad_input, a.grad_weight, a.grad_bias and b is not None)
    outputs = _linear_grad_outputs(a)
    chunks, gathered = _logit_chunks(a, ns)
    if gathered and want[0]:
        outputs[0].zero_()
    grads = HeadGradients(w, outputs, want, min(x.shape[0], a.chunk_size))
    for sel, xc, logits in chunks:
        LOG_PROBS_GRAD_INPLACE.call(ns, x=logits, **_grad_args(
            a, a.grad_log_probs, a.grad_entropy, sel, a.grad_lse, a.grad_mean_logits))
        grads.add(logits, xc, sel, gathered)
    grads.finish()
    return outputs


_linear_grad_run.builds_on = "log_probs_grad_inplace"


def _linear_grad_outputs(a):
    x, w = a.input, a.linear_weight
    return (x.new_empty(x.shape if a.grad_input else (0,)),
            w.new_empty(w.shape if a.grad_weight else (0,)),
            w.new_empty((w.shape[0],) if a.grad_bias and a.linear_bias is not None else (0,)))


def _linear_reference(a):
    logits = torch.nn.functional.linear(a.input, a.linear_weight, a.linear_bias)
    return _reference_rows(a, logits)[:2]


def _linear_backward(ctx, grad_log_probs, grad_entropy, *unused):
    needed = _library.needed_inputs(ctx) & {"input", "linear_weight", "linear_bias"}
    if not needed or (grad_log_probs is None and grad_entropy is None):
        return {}
    a = LINEAR_LOG_PROBS.saved_args(ctx)
    got = LINEAR_LOG_PROBS_GRAD.call(
        ctx.fusedloss_backend, input=a.input, linear_weight=a.linear_weight,
        linear_bias=a.linear_bias, chunk_size=a.chunk_size,
        grad_input="input" in needed, grad_weight="linear_weight" in needed,
        grad_bias="linear_bias" in needed, **_grad_args(a, grad_log_probs, grad_entropy))
    return {name: g for name, g in zip(("input", "linear_weight", "linear_bias"), got)
            if name in needed}


_LINEAR = "Tensor input, Tensor linear_weight, Tensor? linear_bias"
LINEAR_LOG_PROBS = Op(
    "linear_log_probs", f"({_LINEAR}, {_ROW_ARGS}, {_WANT}, int chunk_size) -> ({_OUTPUTS})",
    outputs=lambda a: _row_outputs(a, a.input.shape[0], a.input),
    backends=_BACKENDS, composite=_linear_run, reference=_linear_reference,
    differentiable=(0, 1), saved_outputs=("entropy", "lse"), setup_context=_setup,
    backward=_linear_backward).define()
LINEAR_LOG_PROBS_GRAD = Op(
    "linear_log_probs_grad",
    f"({_LINEAR}, {_ROW_ARGS}, {_GRADS}, int chunk_size, bool grad_input, bool grad_weight, "
    "bool grad_bias) -> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)",
    outputs=_linear_grad_outputs, backends=_BACKENDS,
    composite=_linear_grad_run).define()


# ------------------------------------------------------------------------------ checks
class Options(typing.NamedTuple):
    positions: tuple
    temperature: typing.Union[float, torch.Tensor]
    logit_scale: float
    softcap: typing.Optional[float]
    ignore_index: int
    return_entropy: bool
    extras: tuple


def check_options(target, positions, n_classes, device, temperature, logit_scale, softcap,
                  ignore_index, return_entropy, extras):
    """Every argument but the logits (or the head), checked; target of shape `positions`."""
    ignore_index = _checks.integer("ignore_index", ignore_index)
    _checks.tensor("target", target)
    if target.dtype not in (torch.int64, torch.int32, torch.uint8):
        raise TypeError(f"target must hold class indices (int64, int32 or uint8), got "
                        f"{target.dtype}")
    _checks.class_index_target(target.long(), positions, n_classes, ignore_index, device)
    if isinstance(temperature, torch.Tensor):
        _checks.floating("temperature", temperature)
        _checks.same_device("temperature", temperature, target)
        if temperature.requires_grad:
            raise ValueError("temperature must not require grad: no gradient flows to it "
                             "(pass temperature.detach())")
        try:
            torch.broadcast_shapes(temperature.shape, positions)
        except RuntimeError:
            raise ValueError(f"temperature of shape {tuple(temperature.shape)} does not "
                             f"broadcast to the target's shape {tuple(positions)}") from None
        if _checks.data_checks(temperature) and bool((temperature <= 0).any()):
            raise ValueError("temperature must be > 0 everywhere, got "
                             f"{float(temperature.min())}")
    else:
        temperature = _checks.number("temperature", temperature, low=0.0, low_open=True)
    extras = tuple(extras)
    unknown = [e for e in extras if e not in EXTRAS]
    if unknown:
        raise ValueError(f"extras: unknown {unknown}; the extras are {list(EXTRAS)}")
    return Options(tuple(positions), temperature,
                   _checks.number("logit_scale", logit_scale, low=0.0, low_open=True),
                   _checks.number("softcap", softcap, low=0.0, low_open=True,
                                  allow_none=True),
                   ignore_index, bool(return_entropy), extras)


def _op_args(o, target, acc, device):
    """The row arguments of the ops, from checked options: rows' targets flattened, the
    temperature as a scalar or as one inverse per row (NaN where it is not > 0)."""
    n = target.numel()
    row_inv = None
    if isinstance(o.temperature, torch.Tensor):
        t = o.temperature.to(device=device, dtype=acc).broadcast_to(o.positions).reshape(n)
        row_inv = torch.where(t > 0, 1.0 / t, torch.full_like(t, float("nan"))).contiguous()
    return dict(target=target.reshape(n).long(), row_inv_temperature=row_inv,
                inv_temperature=1.0 / o.temperature if row_inv is None else 1.0,
                logit_scale=o.logit_scale, softcap=o.softcap or 0.0,
                ignore_index=o.ignore_index, compute_entropy=o.return_entropy,
                compute_log_sum_sq="log_sum_sq_probs" in o.extras,
                compute_mean="mean_logits" in o.extras, compute_top1="is_top1" in o.extras)


def _result(outs, o):
    """The log-probs tensor, or LogProbs with what was asked for, one value per position."""
    if not o.return_entropy and not o.extras:
        return outs[0].view(o.positions)
    keep = (True, o.return_entropy, *(e in o.extras for e in EXTRAS))
    return LogProbs(*(t.view(o.positions) if k else None for t, k in zip(outs, keep)))


# ------------------------------------------------------------------------------ functions
def log_probs(logits, target, *, temperature=1.0, logit_scale=1.0, softcap=None,
              ignore_index=-100, return_entropy=False, extras=(), process_group=None,
              backend="auto"):
    """log softmax(z)[target] per position, z = softcap(logit_scale * logits) / temperature.

    logits: (..., V), any float dtype. target: class indices of shape logits.shape[:-1].
    temperature: a number > 0, or a floating tensor (no grad) broadcastable to target's
    shape: one per sequence or per token. softcap c: c * tanh(u / c) before the
    temperature (Gemma 2). Positions whose target is ignore_index get 0 everywhere (and
    no gradient). return_entropy: also the entropy of each position's softmax, with a
    gradient. extras: any of "lse", "log_sum_sq_probs", "mean_logits", "is_top1" (no
    gradient). Outputs are float32 (float64 for float64 logits), target's shape.

    process_group: vocab-parallel over a torch.distributed group: logits (..., V_local)
    hold this rank's contiguous slice of the classes, in rank order (slices may differ in
    size, or be empty); target holds global class indices, the same on every rank, and
    every rank gets the same outputs (fusedloss/vocab_parallel.py: the chosen backend's
    kernels on the slice, a few numbers per row across ranks). A DTensor `logits` sharded
    on its last dimension along one mesh dimension runs that on the dimension's group;
    replicated, the local kernels; the outputs are then replicated DTensors.

    Returns the log-probs tensor, or with return_entropy or extras a fusedloss.LogProbs.
    The backward accepts upstream gradients on both log_probs and entropy, together or
    alone; the algebra is in this module's docstring.
    """
    if _dtensor.is_dtensor(logits, target, temperature):
        return _dtensor.call(
            log_probs, logits, logits.dim() - 1, "log_probs",
            dict(target=target, temperature=temperature),
            dict(logit_scale=logit_scale, softcap=softcap, ignore_index=ignore_index,
                 return_entropy=return_entropy, extras=extras, process_group=process_group,
                 backend=backend))
    _checks.floating("logits", logits)
    if logits.dim() == 0 or (logits.shape[-1] == 0 and process_group is None):
        raise ValueError(f"logits must be (..., V) with V >= 1 classes, got shape "
                         f"{tuple(logits.shape)}")
    o = check_options(target, logits.shape[:-1],
                      logits.shape[-1] if process_group is None else None, logits.device,
                      temperature, logit_scale, softcap, ignore_index, return_entropy,
                      extras)
    x = logits.reshape(target.numel(), logits.shape[-1])  # V may be 0 (an empty slice)
    args = _op_args(o, target, acc_dtype(logits.dtype), logits.device)
    if process_group is not None:
        return _vocab_parallel(x, None, None, args, o, None, backend, process_group)
    name = _backends.resolve(LOG_PROBS, backend, logits.device)
    if name == "reference":
        return _result(reference.log_probs_rows(
            x, args["target"], _inv_temperature(args), o.logit_scale, o.softcap,
            o.ignore_index), o)
    return _result(LOG_PROBS.call(name, x=x.contiguous(), **args), o)


def linear_log_probs(input, linear_weight, target, *, linear_bias=None, temperature=1.0,
                     logit_scale=1.0, softcap=None, ignore_index=-100, return_entropy=False,
                     extras=(), chunk_size=None, process_group=None, backend="auto"):
    """log_probs(F.linear(input, linear_weight, linear_bias), target, ...) without the
    logits: the LM head's hidden states go in chunks of rows, so memory beyond the
    inputs, outputs and gradients is one chunk of logits (chunk_size x V).

    input: (..., D), any leading shape; target: input.shape[:-1]; linear_weight (V, D),
    linear_bias (V,). The other arguments and the return value are log_probs'. Under
    autocast the products run in autocast's dtype, as F.linear's; the outputs are
    float32. The backward recomputes each chunk's logits (upstream gradients are unknown
    at forward time): four matrix products in all; grad_weight accumulates in float32
    for half weights. chunk_size: rows per chunk (default from N, D, V and the dtype).

    process_group: vocab-parallel over a torch.distributed group (a tensor-parallel LM
    head), as linear_cross_entropy's: linear_weight and linear_bias hold this rank's
    contiguous slice of the vocabulary, in rank order (slices may differ in size, or be
    empty); input and target (global class indices) are the same on every rank, and every
    rank gets the same outputs. Per row only a few numbers cross ranks (two all-reduces;
    is_top1 adds a torch pass over the slice and one more), never the logits; each rank runs the chosen
    backend's kernels on its rows of the head; the backward all-reduces grad_input.
    Higher-order gradients are not available there. A DTensor head
    (linear_weight Shard(0) or replicated, input a DTensor on its mesh) works as in
    linear_cross_entropy; the outputs are then replicated DTensors.
    """
    if _dtensor.is_dtensor(input, linear_weight, linear_bias):  # as linear_cross_entropy's
        return _dtensor.call_head(
            linear_log_probs, input, linear_weight, linear_bias, "linear_log_probs",
            dict(target=target, temperature=temperature),
            dict(logit_scale=logit_scale, softcap=softcap, ignore_index=ignore_index,
                 return_entropy=return_entropy, extras=extras, chunk_size=chunk_size,
                 process_group=process_group, backend=backend))
    input, linear_weight, linear_bias = _library.autocast_operands(input, linear_weight,
                                                                   linear_bias)
    _checks.floating("input", input)
    _checks.floating("linear_weight", linear_weight)
    if input.dim() == 0:
        raise ValueError("input must be (..., D), got a 0-dim tensor")
    if linear_weight.dim() != 2 or linear_weight.shape[1] != input.shape[-1]:
        raise ValueError(f"linear_weight must be (V, D) with D = input.shape[-1] = "
                         f"{input.shape[-1]}, got shape {tuple(linear_weight.shape)}")
    _checks.same_dtype("linear_weight", linear_weight, input, why="they must match (F.linear)")
    _checks.same_device("linear_weight", linear_weight, input)
    if linear_bias is not None:
        _checks.tensor("linear_bias", linear_bias)
        if tuple(linear_bias.shape) != (linear_weight.shape[0],):
            raise ValueError(f"linear_bias must have shape ({linear_weight.shape[0]},), got "
                             f"{tuple(linear_bias.shape)}")
        _checks.same_dtype("linear_bias", linear_bias, input)
        _checks.same_device("linear_bias", linear_bias, input)
    if chunk_size is not None and (isinstance(chunk_size, bool) or
                                   not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    # With a process_group the target holds global class indices, checked against every
    # rank's classes once they are known.
    o = check_options(target, input.shape[:-1],
                      linear_weight.shape[0] if process_group is None else None,
                      input.device, temperature, logit_scale, softcap, ignore_index,
                      return_entropy, extras)
    x = input.reshape(-1, input.shape[-1])
    default_chunk = default_chunk_size(x.shape[0], x.shape[1], linear_weight.shape[0],
                                       input.dtype, input.device.type, CHUNK_BYTES)
    args = _op_args(o, target, acc_dtype(input.dtype), input.device)
    if process_group is not None:
        return _vocab_parallel(x, linear_weight, linear_bias, args, o,
                               chunk_size or default_chunk, backend, process_group)
    name = _backends.resolve(LINEAR_LOG_PROBS, backend, input.device)
    chunk_size = chunk_size or default_chunk
    if name == "reference":
        return _result(reference.linear_log_probs(
            x, linear_weight, linear_bias, args["target"], _inv_temperature(args),
            o.logit_scale, o.softcap, o.ignore_index, chunk_size), o)
    return _result(LINEAR_LOG_PROBS.call(
        name, input=x.contiguous(), linear_weight=linear_weight.contiguous(),
        linear_bias=linear_bias.contiguous() if linear_bias is not None else None,
        chunk_size=chunk_size, **args), o)


def lm_head_log_probs(head, input, target, **options):
    """linear_log_probs(input, head.weight, target, linear_bias=head.bias, **options)
    computed inside `head`'s forward, as fusedloss.lm_head_cross_entropy: FSDP2, DeepSpeed
    ZeRO-3 and accelerate gather the weight and reduce its gradient as for head(input).
    The backward recomputes the chunks, so it reads the weight FSDP2 gathers again before
    it (reshard_after_forward=True: a second all-gather; False: the unsharded weight
    stays alive from the forward to the backward)."""
    return in_forward_of(head, lambda x, w, b: linear_log_probs(
        x, w, target, linear_bias=b, **options), input)


def _vocab_parallel(x, w, b, args, o, chunk_size, backend, group):
    """log_probs (w None: x the slice's logits) or linear_log_probs over a vocab-parallel
    slice (fusedloss/vocab_parallel.py)."""
    inv_t = args["row_inv_temperature"]
    if inv_t is None:
        inv_t = torch.full(args["target"].shape, args["inv_temperature"], device=x.device,
                           dtype=acc_dtype(x.dtype))
    common = dict(logit_scale=o.logit_scale, softcap=o.softcap,
                  ignore_index=o.ignore_index, entropy=o.return_entropy, extras=o.extras,
                  group=group, backend=backend)
    if w is None:
        outs = vocab_parallel.log_probs(x, args["target"], inv_t, **common)
    else:
        outs = vocab_parallel.linear_log_probs(x, w, b, args["target"], inv_t,
                                               chunk_size=chunk_size, **common)
    return _result(outs, o)


# ------------------------------------------------------------------------------ modules
class TokenLogProbs(LossModule):
    """Module form of fusedloss.log_probs: forward(logits, target)."""

    BUFFERS = ()

    def __init__(self, *, temperature=1.0, logit_scale=1.0, softcap=None, ignore_index=-100,
                 return_entropy=False, extras=(), backend="auto"):
        super().__init__(temperature=temperature, logit_scale=logit_scale, softcap=softcap,
                         ignore_index=ignore_index, return_entropy=return_entropy,
                         extras=tuple(extras), backend=backend)

    def forward(self, logits, target):
        return log_probs(logits, target, **self.loss_options())


class LinearTokenLogProbs(LossModule):
    """Module form of fusedloss.linear_log_probs, given the head's weight (and bias):
    forward(input, linear_weight, target, linear_bias=None)."""

    BUFFERS = ()

    def __init__(self, *, temperature=1.0, logit_scale=1.0, softcap=None, ignore_index=-100,
                 return_entropy=False, extras=(), chunk_size=None, backend="auto"):
        super().__init__(temperature=temperature, logit_scale=logit_scale, softcap=softcap,
                         ignore_index=ignore_index, return_entropy=return_entropy,
                         extras=tuple(extras), chunk_size=chunk_size, backend=backend)

    def forward(self, input, linear_weight, target, linear_bias=None):
        return linear_log_probs(input, linear_weight, target, linear_bias=linear_bias,
                                **self.loss_options())


# ------------------------------------------------------------------------------ entropy
# The entropy that cross_entropy and linear_cross_entropy return (return_entropy=True),
# computed by their row kernels in the forward, gets its gradient here: the same backward
# as log_probs' with no log-probs term, from the saved lse and entropy. It costs nothing
# unless the entropy reaches the loss; a backward with create_graph=True differentiates
# the reference recomputation instead (exact higher-order gradients).
_ROW_GRAD_ARGS = dict(row_inv_temperature=None, inv_temperature=1.0, ignore_index=-100,
                      grad_log_probs=None, grad_lse=None, grad_mean_logits=None)


def _reference_entropy_grad(leaves, entropy_of, grad, create_graph):
    with torch.enable_grad():
        wanted = [t for t in leaves if t is not None and t.requires_grad]
        got = iter(torch.autograd.grad(entropy_of(*leaves), wanted, grad,
                                       create_graph=create_graph))
    return [next(got) if t is not None and t.requires_grad else None for t in leaves]


class RowEntropy(torch.autograd.Function):
    """entropy (rows of a cross-entropy op's (B, C, S) logits x, detached) with its
    gradient: apply(x, entropy, lse, logit_scale, softcap)."""

    @staticmethod
    def forward(ctx, x, entropy, lse, logit_scale, softcap):
        ctx.save_for_backward(x, entropy, lse)
        ctx.transform = (logit_scale, softcap)
        return entropy.clone()

    @staticmethod
    def backward(ctx, grad):
        x, entropy, lse = ctx.saved_tensors
        logit_scale, softcap = ctx.transform
        B, C, S = x.shape
        # Rows of the logits: (B, C) as they are; a K-dimensional loss's transposed.
        rows = x.view(B, C) if S == 1 else x.movedim(1, 2).reshape(B * S, C)
        name = _backends.resolve(LOG_PROBS_GRAD, "auto", x.device)
        if torch.is_grad_enabled() or name == "reference":
            def entropy_of(r):
                return reference.log_probs_rows(r, torch.zeros_like(lse, dtype=torch.long),
                                                1.0, logit_scale, softcap)[1]
            (g,) = _reference_entropy_grad([rows.detach().requires_grad_()], entropy_of,
                                           grad, torch.is_grad_enabled())
        else:
            g = LOG_PROBS_GRAD.call(
                name, x=rows.contiguous(), target=torch.zeros_like(lse, dtype=torch.long),
                logit_scale=logit_scale, softcap=softcap or 0.0, lse=lse, entropy=entropy,
                grad_entropy=grad.to(lse.dtype).contiguous(), **_ROW_GRAD_ARGS)
        g = g.view(B, C, 1) if S == 1 else g.view(B, S, C).movedim(2, 1)
        return g, None, None, None, None


class LinearEntropy(torch.autograd.Function):
    """The entropy of the rows of input @ W^T + b (linear_cross_entropy's, detached) with
    its gradients: apply(input, linear_weight, linear_bias, entropy, lse, logit_scale,
    softcap, chunk_size); the backward runs linear_log_probs' chunk loop."""

    @staticmethod
    def forward(ctx, x, w, b, entropy, lse, logit_scale, softcap, chunk_size):
        ctx.save_for_backward(x, w, b, entropy, lse)
        ctx.options = (logit_scale, softcap, chunk_size)
        return entropy.clone()

    @staticmethod
    def backward(ctx, grad):
        x, w, b, entropy, lse = ctx.saved_tensors
        logit_scale, softcap, chunk_size = ctx.options
        need = ctx.needs_input_grad[:3]
        target = torch.zeros_like(lse, dtype=torch.long)
        name = _backends.resolve(LINEAR_LOG_PROBS_GRAD, "auto", x.device)
        if torch.is_grad_enabled() or name == "reference":
            def entropy_of(xx, ww, bb):
                logits = torch.nn.functional.linear(xx, ww, bb)
                return reference.log_probs_rows(logits, target, 1.0, logit_scale, softcap)[1]
            leaves = [t.detach().requires_grad_(n) if t is not None else None
                      for t, n in zip((x, w, b), need)]
            grads = _reference_entropy_grad(leaves, entropy_of, grad, torch.is_grad_enabled())
        else:
            grads = LINEAR_LOG_PROBS_GRAD.call(
                name, input=x, linear_weight=w, linear_bias=b, target=target,
                logit_scale=logit_scale, softcap=softcap or 0.0, lse=lse, entropy=entropy,
                grad_entropy=grad.to(lse.dtype).contiguous(), chunk_size=chunk_size,
                grad_input=need[0], grad_weight=need[1], grad_bias=need[2] and b is not None,
                **_ROW_GRAD_ARGS)
            grads = [g if n else None for g, n in zip(grads, need)]
        return (*grads, None, None, None, None, None)
