"""Launchers of the Triton kernels (the kernels themselves are in fusedloss.kernels).

Each function takes exactly its op's schema arguments (fusedloss.ops.SCHEMAS), allocates
the outputs, picks block sizes from the shapes, launches, and returns the contract's
outputs. Nothing here reads tensor data on the host: block sizes depend on shapes only,
and reductions are torch.sum over per-row (or per-program) buffers, deterministic.

Under TRITON_INTERPRET=1 the class block is capped small on purpose, so that rows of a
hundred classes already span several blocks and the tests exercise the multi-block online
softmax and every tile tail. Set INTERPRET_BLOCK_V (and friends) to change that.
"""
import contextlib
import functools

import torch
import triton
import triton.language as tl

from fusedloss import _backends
from fusedloss.kernels import cross_entropy as _ce
from fusedloss.kernels import focal as _focal
from fusedloss.kernels import info_nce as _nce

# GPU: elements of one [BLOCK_R, BLOCK_V] class tile (half for "wide" kernels, see
# _class_blocks). Checked by compiling for sm_90: no register spills; not yet timed.
MAX_CLASS_TILE = 4096
# Interpreter (tests): small blocks, so small shapes still take the multi-block paths.
INTERPRET_BLOCK_V = 32
INTERPRET_BLOCK_R = 8
INTERPRET_BLOCK_ELEMS = 256
INTERPRET_BLOCK_NCE = 16


def _on_input_device(launcher):
    """Launch on the first argument's GPU: Triton launches on the current CUDA device."""
    @functools.wraps(launcher)
    def wrapper(*args):
        device = args[0].device
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            return launcher(*args)
    return wrapper


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tl_acc(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _np2(n):
    return triton.next_power_of_2(max(int(n), 1))


def _class_blocks(B, C, S, wide):
    """(grid, meta) for the per-row kernels on a (B, C, S) input.

    wide: the kernel keeps two extra per-lane accumulators (label smoothing, probability
    targets) or computes in float64; its tile is halved to stay clear of register spills.
    """
    strided = S > 1
    n_r = S if strided else B  # the run of rows one program can take
    if _backends.triton_interpret():
        block_v = min(_np2(C), INTERPRET_BLOCK_V)
        block_r = min(_np2(n_r), INTERPRET_BLOCK_R)
        return _class_grid(B, S, block_r, strided), dict(
            STRIDED=strided, BLOCK_R=block_r, BLOCK_V=block_v, num_warps=1)
    tile = MAX_CLASS_TILE // 2 if wide else MAX_CLASS_TILE
    if strided:
        # Rows are consecutive s: a run of them per class is one coalesced load.
        block_r = min(_np2(n_r), 64)
        block_v = min(_np2(C), max(16, tile // block_r))
    else:
        # Long rows: one row per program; short rows: pack rows to fill the tile.
        block_v = min(_np2(C), tile)
        block_r = min(_np2(n_r), max(1, tile // block_v))
    num_warps = max(4, min(16, block_r * block_v // (256 if wide else 512)))
    return _class_grid(B, S, block_r, strided), dict(
        STRIDED=strided, BLOCK_R=block_r, BLOCK_V=block_v, num_warps=num_warps)


def _class_grid(B, S, block_r, strided):
    return (B * triton.cdiv(S, block_r),) if strided else (triton.cdiv(B, block_r),)


def _reduce_rows(loss_rows, reduction, loss_scale, dtype):
    """Reduction 0 keeps the rows; 1 and 2 are sum * loss_scale (1/denominator for mean)."""
    if reduction == 0:
        return loss_rows.to(dtype)
    return (loss_rows.sum() * loss_scale.to(loss_rows.dtype)).to(dtype)


# ------------------------------------------------------------------ cross-entropy
def _cross_entropy(x, target, weight, loss_scale, ignore_index, label_smoothing, logit_scale,
                   softcap, z_loss, reduction, grad):
    """Launch _ce_fwd_bwd_kernel; grad is the output buffer, x itself, or None."""
    B, C, S = x.shape
    acc = _acc(x.dtype)
    loss_rows = torch.empty(B * S, dtype=acc, device=x.device)
    lse = torch.empty(B * S, dtype=acc, device=x.device)
    if C == 0:
        loss_rows.fill_(float("nan"))
        lse.fill_(float("-inf"))
    elif B * S > 0:
        prob_target = target.is_floating_point()
        wide = prob_target or label_smoothing > 0 or x.dtype == torch.float64
        grid, meta = _class_blocks(B, C, S, wide)
        _ce._ce_fwd_bwd_kernel[grid](
            x, target.contiguous(), weight.contiguous() if weight is not None else x,
            loss_scale, loss_rows, lse, grad if grad is not None else x,
            B, C, S, ignore_index,
            float(label_smoothing), float(logit_scale), float(softcap), float(z_loss),
            PROB_TARGET=prob_target, HAS_WEIGHT=weight is not None,
            SMOOTHING=label_smoothing > 0, HAS_SOFTCAP=softcap > 0,
            COMPUTE_GRAD=grad is not None, ACC=_tl_acc(x.dtype), **meta)
    return _reduce_rows(loss_rows, reduction, loss_scale, x.dtype), lse


@_on_input_device
def cross_entropy(x, target, weight, loss_scale, ignore_index, label_smoothing, logit_scale,
                  softcap, z_loss, reduction, compute_grad):
    x = x.contiguous()
    grad = torch.empty(x.shape, dtype=x.dtype, device=x.device) if compute_grad else None
    loss, lse = _cross_entropy(x, target, weight, loss_scale, ignore_index, label_smoothing,
                               logit_scale, softcap, z_loss, reduction, grad)
    return loss, lse, grad if grad is not None else x.new_empty((0,))


@_on_input_device
def cross_entropy_inplace(x, target, weight, loss_scale, ignore_index, label_smoothing,
                          logit_scale, softcap, z_loss, reduction):
    if not x.is_contiguous():
        raise ValueError("fusedloss: cross_entropy_inplace needs a contiguous x "
                         "(the gradient is written over it)")
    return _cross_entropy(x, target, weight, loss_scale, ignore_index, label_smoothing,
                          logit_scale, softcap, z_loss, reduction, grad=x)


# ------------------------------------------------------------------ focal losses
@_on_input_device
def focal_loss(x, target, alpha, weight, loss_scale, gamma, ignore_index, reduction,
               compute_grad):
    x = x.contiguous()
    B, C, S = x.shape
    acc = _acc(x.dtype)
    loss_rows = torch.empty(B * S, dtype=acc, device=x.device)
    grad = torch.empty(x.shape, dtype=x.dtype, device=x.device) if compute_grad else None
    if C == 0:
        loss_rows.fill_(float("nan"))
    elif B * S > 0:
        grid, meta = _class_blocks(B, C, S, wide=x.dtype == torch.float64)
        _focal._focal_fwd_bwd_kernel[grid](
            x, target.contiguous(), alpha.contiguous() if alpha is not None else x,
            weight.contiguous() if weight is not None else x, loss_scale,
            loss_rows, grad if grad is not None else x,
            B, C, S, ignore_index, float(gamma),
            HAS_ALPHA=alpha is not None, HAS_WEIGHT=weight is not None,
            COMPUTE_GRAD=compute_grad, ACC=_tl_acc(x.dtype), **meta)
    loss = _reduce_rows(loss_rows, reduction, loss_scale, x.dtype)
    return loss, grad if grad is not None else x.new_empty((0,))


@_on_input_device
def sigmoid_focal_loss(x, target, loss_scale, alpha, gamma, reduction, compute_grad):
    x_flat = x.contiguous().view(-1)
    t_flat = target.contiguous().view(-1)
    n = x_flat.numel()
    acc = _acc(x.dtype)
    block = INTERPRET_BLOCK_ELEMS if _backends.triton_interpret() else 1024
    n_programs = triton.cdiv(n, block)
    loss_buf = torch.empty(n_programs if reduction else n, dtype=acc, device=x.device)
    grad = torch.empty(x.shape, dtype=x.dtype, device=x.device) if compute_grad else None
    if n > 0:
        _focal._sigmoid_focal_kernel[(n_programs,)](
            x_flat, t_flat, loss_scale, loss_buf, grad if grad is not None else x_flat,
            n, float(alpha), float(gamma),
            REDUCE=reduction != 0, COMPUTE_GRAD=compute_grad, ACC=_tl_acc(x.dtype),
            BLOCK=block, num_warps=4)
    loss = _reduce_rows(loss_buf, reduction, loss_scale, x.dtype)
    return loss, grad if grad is not None else x.new_empty((0,))


# ------------------------------------------------------------------ InfoNCE
def _nce_meta(dtype, D):
    """Tile sizes for the InfoNCE kernels; tl.dot needs every dimension >= 16.

    GPU choices were checked by compiling for sm_90 (no spills at these sizes); they are
    not yet tuned by measurement.
    """
    d = max(16, _np2(D))
    if _backends.triton_interpret():
        b = INTERPRET_BLOCK_NCE
        return dict(BLOCK_N=b, BLOCK_M=b, BLOCK_D=min(d, b), BLOCK_DOUT=min(d, b),
                    num_warps=1)
    if dtype == torch.float64:
        return dict(BLOCK_N=32, BLOCK_M=32, BLOCK_D=min(d, 32), BLOCK_DOUT=min(d, 32),
                    num_warps=4)
    block_d = 32 if dtype == torch.float32 else 64
    return dict(BLOCK_N=64, BLOCK_M=64, BLOCK_D=min(d, block_d), BLOCK_DOUT=min(d, 64),
                num_warps=8)


_TL_DTYPE = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16,
             torch.float32: tl.float32, torch.float64: tl.float64}


def _dot_meta(dtype):
    """DOT_DTYPE and DOT_PRECISION of the InfoNCE kernels (see _sim_tile)."""
    dot_dtype = _TL_DTYPE[dtype]
    if dtype == torch.bfloat16 and _backends.triton_interpret():
        dot_dtype = tl.float32  # the interpreter's dot is wrong on bf16 operands
    # IEEE for float32 (TF32 would round the inputs to 10 mantissa bits) and float64.
    precision = "ieee" if dtype in (torch.float32, torch.float64) else "tf32"
    return dict(DOT_DTYPE=dot_dtype, DOT_PRECISION=precision)


def _nce_inputs(query, key, negatives):
    q = query.contiguous()
    k = key.to(q.dtype).contiguous()
    neg = negatives.to(q.dtype).contiguous() if negatives is not None else None
    return q, k, neg


@_on_input_device
def info_nce(query, key, negatives, labels, scale, symmetric):
    q, k, neg = _nce_inputs(query, key, negatives)
    (N, D), M = q.shape, k.shape[0]
    E = neg.shape[0] if neg is not None else 0
    acc = _acc(q.dtype)
    meta = _nce_meta(q.dtype, D)
    blocks = dict(ACC=_tl_acc(q.dtype), **_dot_meta(q.dtype),
                  BLOCK_A=meta["BLOCK_N"], BLOCK_B=meta["BLOCK_M"], BLOCK_D=meta["BLOCK_D"],
                  num_warps=meta["num_warps"])

    def lse_and_loss(a, b, extra, lab, n_a, n_b, n_extra):
        lse = torch.empty(n_a, dtype=acc, device=q.device)
        loss = torch.empty(n_a, dtype=acc, device=q.device)
        if n_a > 0:
            _nce._info_nce_fwd_kernel[(triton.cdiv(n_a, blocks["BLOCK_A"]),)](
                a, b, extra if extra is not None else b,
                lab.contiguous() if lab is not None else lse, scale, lse, loss,
                n_a, n_b, n_extra, D, HAS_EXTRA=extra is not None and n_extra > 0,
                HAS_LABELS=lab is not None, **blocks)
        return lse, loss

    row_lse, row_loss = lse_and_loss(q, k, neg, labels, N, M, E)
    if symmetric:
        col_lse, col_loss = lse_and_loss(k, q, None, None, M, N, 0)
    else:
        col_lse, col_loss = row_lse.new_empty((0,)), row_lse.new_empty((0,))
    return row_loss, col_loss, row_lse, col_lse


@_on_input_device
def info_nce_backward(grad_row, grad_col, query, key, negatives, labels, scale, row_lse,
                      col_lse, symmetric):
    q, k, neg = _nce_inputs(query, key, negatives)
    (N, D), M = q.shape, k.shape[0]
    E = neg.shape[0] if neg is not None else 0
    acc = _acc(q.dtype)
    meta = _nce_meta(q.dtype, D)
    has_col = bool(symmetric) and grad_col.numel() > 0
    grad_row = grad_row.to(acc).contiguous()
    grad_col = grad_col.to(acc).contiguous() if has_col else grad_row
    col_lse = col_lse.contiguous() if has_col else row_lse
    lab = labels.contiguous() if labels is not None else grad_row
    common = dict(ACC=_tl_acc(q.dtype), **_dot_meta(q.dtype), **meta)
    n_dout = triton.cdiv(D, meta["BLOCK_DOUT"])

    grad_q = torch.empty((N, D), dtype=q.dtype, device=q.device)
    n_qblocks = triton.cdiv(N, meta["BLOCK_N"])
    scale_partials = torch.zeros(n_qblocks, dtype=acc, device=q.device)
    if N > 0 and D > 0:
        _nce._info_nce_bwd_dq_kernel[(n_qblocks, n_dout)](
            q, k, neg if neg is not None else k, lab, scale, grad_row, grad_col,
            row_lse.contiguous(), col_lse, grad_q, scale_partials, N, M, E, D,
            HAS_NEG=E > 0, HAS_LABELS=labels is not None, HAS_COL=has_col, **common)

    def grad_of(b, n_b, col_offset, with_col):
        db = torch.empty((n_b, D), dtype=q.dtype, device=q.device)
        if n_b > 0 and D > 0:
            _nce._info_nce_bwd_dk_kernel[(triton.cdiv(n_b, meta["BLOCK_M"]), n_dout)](
                q, b, lab, scale, grad_row, grad_col, row_lse.contiguous(), col_lse, db,
                N, n_b, col_offset, D, HAS_LABELS=labels is not None, HAS_COL=with_col,
                **common)
        return db

    grad_k = grad_of(k, M, 0, has_col).to(key.dtype)
    if neg is not None:
        grad_neg = grad_of(neg, E, M, False).to(negatives.dtype)
    else:
        grad_neg = query.new_empty((0,))
    grad_scale = scale_partials.sum().to(scale.dtype).reshape(scale.shape)
    return grad_q.to(query.dtype), grad_k, grad_neg, grad_scale
