"""SigLIP: the sigmoid loss of image-text pairs (Zhai et al. 2023), as open_clip's
SigLipLoss, without the N x N logits on the kernel backends.

The algebra (N images x_i, M texts y_j, everything in acc: float32 for half inputs):

    l_ij = s <x_i, y_j> + b          s = logit_scale (already exponentiated), b = logit_bias
    z_ij = +1 for j = i + diagonal (image i's own text; diagonal 0 on one device), else -1
    loss_ij = -log sigmoid(z_ij l_ij) = softplus(u_ij),  u_ij = -z_ij l_ij
    row_i = sum_j loss_ij;  mean = sum_i row_i / N (open_clip's: per image), sum, none = row
    G_ij = w_i dloss_ij/dl_ij = -w_i z_ij sigmoid(u_ij),  w_i = loss_scale * row_weight_i
    grad_image = s G @ Y,  grad_text = s G^T @ X,  grad_s = sum_ij G_ij <x_i, y_j>,
    grad_b = sum_ij G_ij

How it runs (every kernel backend, the same loop through its own siglip_tile op): the
logits go in tiles of bi x bj (TILE_ELEMENTS values, a few MiB), each

    dots = X[i-block] @ Y[j-block]^T            one GEMM (ATen: BLAS, cuBLAS)
    siglip_tile(dots)                           row losses, sum G * dots, sum G per row;
                                                s G written over the dots (in place)
    grad_image[i-block] += (s G) @ Y[j-block]   two more GEMMs
    grad_text[j-block] += (s G)^T @ X[i-block]

so fwd+bwd is three GEMMs, the floor, and memory beyond the inputs and the gradients is
one tile plus O(N). The gradients are computed in the forward when the loss is reduced
(the backward only scales them by the incoming gradient); for reduction "none" the
backward runs the tiles again, each row's incoming gradient as its row_weight. The
siglip_tile kernels: C++ on the CPU, Triton on CUDA (there is no CUDA C++ kernel: the
"cuda" backend does not serve this loss; "auto" picks Triton).
"""
import math

import torch
import torch.distributed as dist

from . import _backends, _checks, _collectives, _library, reference
from ._library import Op, acc_dtype
from ._module import LossModule
from .cross_entropy import mean_scale

# Values of one tile of logits (acc dtype). CPU: 1 Mi values (4 MiB in float32), 1024 x
# 1024 at N >= 1024, keeps the GEMMs near their full speed; bigger tiles gained nothing
# measurable (benchmarks, N=8192, D=512). GPU: large enough for cuBLAS (not yet timed).
# Tests shrink it to force many tiles.
TILE_ELEMENTS = {"cpu": 1 << 20, "cuda": 1 << 24}


def tile_shape(n, m, device_type):
    """(rows, columns) of a tile for N images against M texts: square-ish within
    TILE_ELEMENTS, at least 1 x 1."""
    budget = TILE_ELEMENTS.get(device_type, TILE_ELEMENTS["cuda"])
    if torch.compiler.is_compiling():  # the bounds alone (the tile loop clamps them):
        n = m = budget                  # min(N, ...) would make a dynamic N a constant
    cols = max(1, min(m, math.isqrt(budget)))
    return max(1, min(n, budget // cols)), cols


# ------------------------------------------------------------------------------ the tile op
def _tile_outputs(a):
    rows = a.dots.shape[0]
    new = lambda size: a.dots.new_empty((size,))  # noqa: E731
    return new(rows), new(rows if a.compute_grad else 0), new(rows if a.compute_grad else 0)


# (R, C) dot products in the accumulation dtype -> each row's loss and, with
# compute_grad, per row sum G * dots and sum G, logit_scale * G written over the dots.
# Row r's positive is column r + diagonal (none where that is outside [0, C)).
SIGLIP_TILE = Op(
    "siglip_tile",
    "(Tensor(a!) dots, Tensor logit_scale, Tensor logit_bias, Tensor? row_weight, "
    "Tensor loss_scale, int diagonal, bool compute_grad) "
    "-> (Tensor row_loss, Tensor scale_rows, Tensor bias_rows)",
    outputs=_tile_outputs, backends=("triton", "cpu"), kernels="siglip").define()


# ------------------------------------------------------------------------------ the op
_GRADS = ("image", "text", "logit_scale", "logit_bias")


def _wanted(a):
    return (a.grad_image, a.grad_text, a.grad_logit_scale, a.grad_logit_bias)


def _outputs(a):
    acc = acc_dtype(a.image.dtype)
    loss = a.image.new_empty((a.image.shape[0],) if a.reduction == 0 else (), dtype=acc)
    grads = tuple(t.new_empty(t.shape if want else (0,))
                  for t, want in zip((a.image, a.text, a.logit_scale, a.logit_bias),
                                     _wanted(a)))
    return (loss, *grads)


def _run(a, ns):
    """The tile loop, for every backend: `ns` names the siglip_tile op it runs."""
    (n, _), m = a.image.shape, a.text.shape[0]
    acc = acc_dtype(a.image.dtype)
    want = _wanted(a)
    grads = any(want)
    x, y = a.image.to(acc).contiguous(), a.text.to(acc).contiguous()
    scale = a.logit_scale.to(acc).reshape(())
    bias = a.logit_bias.to(acc).reshape(())
    row_weight = a.row_weight.to(acc) if a.row_weight is not None else None
    loss, *out = _outputs(a)
    rows = loss if a.reduction == 0 else x.new_empty(n)
    rows.zero_()
    param_rows = x.new_zeros((2, n)) if grads else None  # sum G * dots, sum G per row
    # Gradient accumulators: the outputs themselves, or float32 ones for half features.
    gx, gy = ((o.zero_() if o.dtype == acc else torch.zeros_like(t)) if w else None
              for o, t, w in zip(out, (x, y), want))
    bi, bj = max(1, min(n, a.block_rows)), max(1, min(m, a.block_cols))
    # One buffer for every tile: a new one per tile would pay its first-touch page faults
    # each time on a CPU.
    buf = x.new_empty(min(n, bi) * min(m, bj))
    for i0 in range(0, n, bi):
        xi = x[i0:i0 + bi]
        ri = xi.shape[0]
        for j0 in range(0, m, bj):
            yj = y[j0:j0 + bj]
            dots = buf[:ri * yj.shape[0]].view(ri, yj.shape[0])
            torch.mm(xi, yj.t(), out=dots)
            row_loss, scale_rows, bias_rows = SIGLIP_TILE.call(
                ns, dots=dots, logit_scale=scale, logit_bias=bias,
                row_weight=row_weight[i0:i0 + ri] if row_weight is not None else None,
                loss_scale=a.loss_scale, diagonal=i0 + a.diagonal - j0, compute_grad=grads)
            rows[i0:i0 + ri] += row_loss
            if grads:  # dots now holds s G
                param_rows[0, i0:i0 + ri] += scale_rows
                param_rows[1, i0:i0 + ri] += bias_rows
            if gx is not None:
                gx[i0:i0 + ri].addmm_(dots, yj)
            if gy is not None:
                gy[j0:j0 + yj.shape[0]].addmm_(dots.t(), xi)
    if a.reduction != 0:
        loss.copy_(rows.sum() * a.loss_scale)
    param_grads = param_rows.sum(1) if grads else (None, None)
    for o, g, w in zip(out, (gx, gy, *param_grads), want):
        if w and g is not o:
            o.copy_(g.reshape(o.shape))
    return (loss, *out)


_run.builds_on = "siglip_tile"


def _reference(a):
    """The op's loss output in torch ops (for higher-order gradients)."""
    rows = reference.siglip_rows(a.image, a.text, a.logit_scale, a.logit_bias, a.diagonal)
    if a.row_weight is not None:
        rows = rows * a.row_weight
    return (_library.reduce_reference_rows(rows, a, acc_dtype(a.image.dtype)),)


# Image i's positive is text i + diagonal. The loss is each image's row (reduction
# "none", unweighted) or sum_i row_i * loss_scale; the gradients requested by the grad_*
# flags are those of sum_i row_weight_i * loss_scale * row_i (row_weight None: 1).
SIGLIP = Op(
    "siglip",
    "(Tensor image, Tensor text, Tensor logit_scale, Tensor logit_bias, Tensor? row_weight, "
    "Tensor loss_scale, int diagonal, int reduction, int block_rows, int block_cols, "
    "bool grad_image, bool grad_text, bool grad_logit_scale, bool grad_logit_bias) "
    "-> (Tensor loss, Tensor grad_image, Tensor grad_text, Tensor grad_logit_scale, "
    "Tensor grad_logit_bias)",
    outputs=_outputs, backends=("triton", "cpu"), composite=_run, reference=_reference,
    **_library.ForwardGradients("siglip", _GRADS, tuple(f"grad_{g}" for g in _GRADS),
                                lambda a: a.image.shape[0]).op_kwargs()).define()


# ------------------------------------------------------------------------------ the loss
def _check_param(name, value, like):
    """logit_scale / logit_bias: a floating tensor of shape () or (1,) (open_clip's and
    big_vision's), or a Python number (then no gradient). Returned as a tensor."""
    if not isinstance(value, torch.Tensor):
        return torch.full((), _checks.number(name, value), dtype=acc_dtype(like.dtype),
                          device=like.device)
    _checks.floating(name, value)
    if value.shape not in ((), (1,)):
        raise ValueError(f"{name} must be one value, a tensor of shape () or (1,), got "
                         f"shape {tuple(value.shape)}")
    _checks.same_device(name, value, like)
    return value


def siglip_loss(image_features, text_features, logit_scale, logit_bias, *, reduction="mean",
                process_group=None, exchange="all_gather", backend="auto"):
    """SigLIP's sigmoid loss over every image-text pair, as open_clip's SigLipLoss.

    image_features, text_features: (N, D), pair i = (image i, text i); use them as the
    model gives them (SigLIP normalises them first). logit_scale: the multiplier itself
    (open_clip passes logit_scale.exp()), logit_bias: the bias; each a tensor of shape ()
    or (1,), which receives a gradient, or a Python number. With l = logit_scale
    <image_i, text_j> + logit_bias, the loss is -(1/N) sum_ij log sigmoid(z_ij l_ij),
    z_ij = 1 for i == j and -1 otherwise: reduction "mean" (default) divides by the number
    of images, as open_clip; "sum" does not; "none" returns each image's sum over the
    texts, shape (N,). Memory beyond the inputs and their gradients: one tile of logits
    (TILE_ELEMENTS) and O(N), never N x N (the reference backend: a few chunks of
    reference.SIGLIP_CHUNK_PAIRS pairs).

    process_group: SigLIP over every rank's batch (torch.distributed). Each rank passes its
    own N pairs (every rank the same N and D) and replicated logit_scale / logit_bias;
    each rank's images are scored against every rank's texts. The loss is this rank's
    share: its images' rows over the global texts ("mean" divides by its own N, as
    open_clip's SigLipLoss with world_size > 1), and the features' gradients come from
    every rank's loss (text gradients travel back to their owner), those of logit_scale
    and logit_bias from this rank's loss only. So with reduction "mean", DDP's averaging
    of the gradients over the P ranks gives exactly the single-process gradients of the
    loss on the concatenated P N pairs, logit_scale and logit_bias included. exchange:
    "all_gather" gathers the texts (with their gradients) and runs this backend's
    kernels, memory O(P N D); "ring" passes text blocks around the ring (P - 1 steps, each
    block's gradient travelling with it back to its owner), memory O(N D) whatever P, at
    the cost of recomputing the tiles in the backward (four GEMMs instead of three).
    Higher-order gradients are not available with a process_group.
    """
    _checks.reduction_code(reduction)
    # Under autocast the dot products are a product in autocast's dtype, as torch's matmul;
    # the loss comes out in float32.
    image_features, text_features = _library.autocast_operands(image_features, text_features)
    _checks.feature_rows([("image_features", image_features),
                          ("text_features", text_features)])
    scale = _check_param("logit_scale", logit_scale, image_features)
    bias = _check_param("logit_bias", logit_bias, image_features)
    if exchange not in ("all_gather", "ring"):
        raise ValueError(f"exchange must be 'all_gather' or 'ring', got {exchange!r}")
    n, m = image_features.shape[0], text_features.shape[0]
    if n != m:
        raise ValueError(f"image_features has N={n} rows but text_features has {m}: SigLIP "
                         "pairs image i with text i")
    if process_group is not None:
        return _across_ranks(image_features, text_features, scale, bias, reduction, exchange,
                             process_group, backend)
    return local_loss(image_features, text_features, scale, bias, reduction, 0, backend)


def local_loss(image, text, scale, bias, reduction, diagonal, backend):
    """The loss of these images against these texts (image i's positive: text i +
    diagonal), with autograd: the reference, or the op on a kernel backend."""
    name = _backends.resolve(SIGLIP, backend, image.device)
    if name == "reference":
        return reference.siglip_loss(image, text, scale, bias, reduction, diagonal)
    red = _checks.reduction_code(reduction)
    grads = torch.is_grad_enabled() and red != 0
    loss, *computed = SIGLIP.call(
        name, **_op_args(image, text, scale, bias, None, red, diagonal,
                         [grads and t.requires_grad for t in (image, text, scale, bias)]))
    for g in computed:
        _library.owned(g)
    return loss.to(_library.loss_dtype(image))


def _op_args(image, text, scale, bias, row_weight, red, diagonal, want):
    acc = acc_dtype(image.dtype)
    block_rows, block_cols = tile_shape(image.shape[0], text.shape[0], image.device.type)
    return dict(image=image, text=text, logit_scale=scale, logit_bias=bias,
                row_weight=row_weight,
                loss_scale=mean_scale(image.shape[0], red, acc, image.device),
                diagonal=diagonal, reduction=red, block_rows=block_rows,
                block_cols=block_cols,
                **{f"grad_{name}": bool(w) for name, w in zip(_GRADS, want)})


def pair_terms(backend, image, text, scale, bias, diagonal, row_weight=None,
               want=(False,) * 4):
    """Without autograd: each image's row against these texts (acc dtype), and the
    gradients flagged in `want` (image, text, logit_scale, logit_bias) of
    sum_i row_weight_i row_i, None for the others. For the ring across ranks (below)."""
    if backend == "reference":
        leaves = [t.detach().requires_grad_(w) for t, w in zip((image, text, scale, bias),
                                                               want)]
        with torch.enable_grad():
            rows = reference.siglip_rows(*leaves, diagonal)
            wanted = [t for t, w in zip(leaves, want) if w]
            got = iter(torch.autograd.grad((rows * row_weight).sum(), wanted)
                       if wanted else ())
        return (rows.detach(), *(next(got) if w else None for w in want))
    loss, *grads = SIGLIP.call(backend, **_op_args(image, text, scale, bias, row_weight, 0,
                                                   diagonal, want))
    return (loss, *(g if w else None for g, w in zip(grads, want)))


# ------------------------------------------------------------------------------ across ranks
class _RingSigLip(torch.autograd.Function):
    """SigLIP with the text blocks passed around the ring. The forward adds up this
    rank's image rows against each visiting block; the backward passes the blocks around
    again, each with the accumulator of its gradient from the images it met, which is
    home after a full turn (the incoming gradient of each rank's loss is only known then,
    so the tiles are computed again). A rank holds its own features, the block it works on
    and the one arriving: memory O(N x D) whatever the number of ranks. Each step runs the
    backend's tiles (pair_terms)."""

    @staticmethod
    def forward(ctx, image, text, scale, bias, group, reduction, backend):
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        n = image.shape[0]
        rows, block = None, text
        for step in range(world):
            # Only this rank's own block holds its images' positives (diagonal 0); for the
            # others, diagonal n puts every positive past the last column.
            diagonal = 0 if (rank - step) % world == rank else n
            r = pair_terms(backend, image, block, scale, bias, diagonal)[0]
            rows = r if rows is None else rows + r
            if step < world - 1:
                (block,) = _collectives.ring_step([block], group, rank, world)
        ctx.save_for_backward(image, text, scale, bias)
        ctx.group, ctx.reduction, ctx.backend = group, reduction, backend
        return rows if reduction == 0 else rows.sum() / (n if reduction == 1 else 1)

    @staticmethod
    def backward(ctx, grad):
        _collectives.first_order_only()
        image, text, scale, bias = ctx.saved_tensors
        group = ctx.group
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        n, acc = image.shape[0], acc_dtype(image.dtype)
        row_weight = grad.to(acc)
        if ctx.reduction != 0:
            row_weight = (row_weight / n if ctx.reduction == 1 else row_weight).expand(n)
        want = ctx.needs_input_grad[:4]
        total = [None] * 4  # image, text (the visiting block's), logit_scale, logit_bias
        block = text
        for step in range(world):
            diagonal = 0 if (rank - step) % world == rank else n
            got = pair_terms(ctx.backend, image, block, scale, bias, diagonal,
                             row_weight.contiguous(), want)[1:]
            for i, g in enumerate(got):
                if g is not None:
                    total[i] = g.to(acc) if total[i] is None else total[i] + g.to(acc)
            # The block moves on with the gradient it has gathered; after the last step
            # only the gradient, which then arrives home.
            moving = ([block] if step < world - 1 else []) + ([total[1]] if want[1] else [])
            if moving:
                moved = _collectives.ring_step(moving, group, rank, world)
                if step < world - 1:
                    block = moved.pop(0)
                if want[1]:
                    total[1] = moved[0]
        return (*(t.to(x.dtype).reshape(x.shape) if t is not None else None
                  for t, x in zip(total, (image, text, scale, bias))), None, None, None)


def _across_ranks(image, text, scale, bias, reduction, mode, group, backend):
    """SigLIP of this rank's images against every rank's texts: this rank's loss (see
    fusedloss.siglip_loss). mode: "all_gather" (the texts gathered with their gradients,
    then this backend's single-device loss) or "ring"."""
    _, rank = _collectives.check_group(group, image, "siglip_loss")
    n = image.shape[0]
    meta = _collectives.exchange([n, image.shape[1]], group, image.device)
    _collectives.check_agree(meta, ["the number of pairs N", "the feature dimension D"], "siglip_loss")
    if mode == "ring":
        name = _backends.resolve(SIGLIP, backend, image.device)
        return _RingSigLip.apply(image, text, scale, bias, group,
                                 _checks.reduction_code(reduction), name) \
            .to(_library.loss_dtype(image))
    texts = _collectives.AllGather.apply(text, group)
    return local_loss(image, texts, scale, bias, reduction, rank * n, backend)


class SigLipLoss(LossModule):
    """Module form of fusedloss.siglip_loss; forward(image_features, text_features,
    logit_scale, logit_bias), the two scalars being the model's (as in open_clip, where
    the model owns them and passes logit_scale.exp())."""

    def __init__(self, *, reduction="mean", process_group=None, exchange="all_gather",
                 backend="auto"):
        super().__init__(reduction=reduction, process_group=process_group,
                         exchange=exchange, backend=backend)

    def forward(self, image_features, text_features, logit_scale, logit_bias):
        return siglip_loss(image_features, text_features, logit_scale, logit_bias,
                           **self.loss_options())
