"""Token log-probs and entropy: the forward row kernel (one online pass per row) and the
backward row kernel (one pass, p recomputed from the saved lse), with the launchers of
the log_probs, log_probs_grad and log_probs_grad_inplace ops. The algebra and its names
(z, m, s, d, q, g, h) are those of fusedloss/log_probs.py."""
import triton
import triton.language as tl

from fusedloss.kernels._launch import class_blocks, tl_acc
from fusedloss.kernels._math import (class_rows_tile, class_target_state, class_tile,
                                     scalar_arg, softcap_logits, softcap_logits_grad)


@triton.jit
def _row_state(target_ptr, row_inv_temp_ptr, N, V, ignore_index, inv_temperature,
               logit_scale, softcap, HAS_ROW_TEMP: tl.constexpr, ACC: tl.constexpr,
               BLOCK_R: tl.constexpr):
    """The program's rows (index, offset of class 0, mask), their targets (ignored, valid,
    safe index), the live rows (in the tile and not ignored: the ones read), each row's
    inverse temperature, and logit_scale and softcap as ACC scalars."""
    rows, row_base, row_mask = class_rows_tile(tl.program_id(0), N, V, 1, BLOCK_R, False)
    t = tl.load(target_ptr + rows, mask=row_mask, other=ignore_index)
    ignored, valid, t_safe = class_target_state(t, V, ignore_index)
    if HAS_ROW_TEMP:
        inv_t = tl.load(row_inv_temp_ptr + rows, mask=row_mask, other=1.0).to(ACC)
    else:
        inv_t = tl.full(t.shape, inv_temperature, ACC)
    return (rows, row_base, row_mask, t, ignored, valid, t_safe, row_mask & ~ignored, inv_t,
            scalar_arg(logit_scale, ACC), scalar_arg(softcap, ACC))


@triton.jit
def _log_probs_kernel(
    x_ptr, target_ptr, row_inv_temp_ptr, lp_ptr, ent_ptr, lse_ptr, lsq_ptr, mean_ptr,
    top1_ptr, N, V, ignore_index, inv_temperature: tl.float64, logit_scale: tl.float64,
    softcap: tl.float64, HAS_SOFTCAP: tl.constexpr, HAS_ROW_TEMP: tl.constexpr,
    ENTROPY: tl.constexpr, LOG_SUM_SQ: tl.constexpr, MEAN: tl.constexpr, TOP1: tl.constexpr,
    ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr,
):
    # Grid: cdiv(N, BLOCK_R); each program owns BLOCK_R whole rows of the (N, V) logits.
    # One pass over each row (the running max m, and s, d, q rescaled as it grows), then
    # one load of the target's logit. Bytes: one read of the live rows (ignored rows are
    # not read), 6 values written per row at most.
    rows, row_base, row_mask, t, ignored, valid, t_safe, live, inv_t, ls, cap = _row_state(
        target_ptr, row_inv_temp_ptr, N, V, ignore_index, inv_temperature, logit_scale,
        softcap, HAS_ROW_TEMP, ACC, BLOCK_R)
    cols = tl.arange(0, BLOCK_V)

    m = tl.full([BLOCK_R], float("-inf"), ACC)
    s = tl.zeros([BLOCK_R], ACC)
    d = tl.zeros([BLOCK_R], ACC)
    q = tl.zeros([BLOCK_R], ACC)
    z_sum = tl.zeros([BLOCK_R], ACC)
    best = tl.full([BLOCK_R], float("-inf"), ACC)
    best_at = tl.zeros([BLOCK_R], tl.int64)
    for start in range(0, V, BLOCK_V):
        c, mask, offs = class_tile(start, cols, row_base, live, V, 1)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        # Masked tails are -inf after the transform (softcap would map -inf to -softcap).
        z = tl.where(mask, softcap_logits(x, ls, cap, HAS_SOFTCAP) * inv_t[:, None],
                     float("-inf"))
        tile_max = tl.max(z, axis=1)
        m_new = tl.maximum(m, tile_max)
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - shift)  # 0 while no finite value was seen (m = -inf)
        e = tl.exp(z - shift[:, None])
        if ENTROPY:
            # d = sum e (shift - z): the old terms gain (shift - m) each as the max grows.
            grown = tl.where(s > 0, (shift - m) * s, 0.0)
            d = alpha * (d + grown) + tl.sum(tl.where(e > 0, e * (shift[:, None] - z), 0.0),
                                             axis=1)
        if LOG_SUM_SQ:
            q = alpha * alpha * q + tl.sum(e * e, axis=1)
        if MEAN:
            z_sum += tl.sum(tl.where(mask, z, 0.0), axis=1)
        if TOP1:
            # The first index of the row's max: the tile's first, taken only where the
            # tile's max beats every earlier one (ties keep the earlier index).
            first = tl.min(tl.where(z == tile_max[:, None], c, V), axis=1).to(tl.int64)
            better = tile_max > best
            best_at = tl.where(better, first, best_at)
            best = tl.where(better, tile_max, best)
        s = alpha * s + tl.sum(e, axis=1)
        m = m_new
    log_s = tl.log(s)
    lse = m + log_s
    x_t = tl.load(x_ptr + row_base + t_safe, mask=live, other=0.0).to(ACC)
    z_t = softcap_logits(x_t, ls, cap, HAS_SOFTCAP) * inv_t

    zero = tl.zeros([BLOCK_R], ACC)
    nan = tl.full([BLOCK_R], float("nan"), ACC)
    tl.store(lp_ptr + rows, tl.where(valid, z_t - lse, tl.where(ignored, zero, nan)),
             mask=row_mask)
    tl.store(lse_ptr + rows, tl.where(valid, lse, tl.where(ignored, zero, nan)), mask=row_mask)
    if ENTROPY:
        tl.store(ent_ptr + rows, tl.where(valid, log_s + d / s, tl.where(ignored, zero, nan)),
                 mask=row_mask)
    if LOG_SUM_SQ:
        tl.store(lsq_ptr + rows, tl.where(valid, tl.log(q) - 2.0 * log_s,
                                          tl.where(ignored, zero, nan)), mask=row_mask)
    if MEAN:
        tl.store(mean_ptr + rows, tl.where(valid, z_sum / V, tl.where(ignored, zero, nan)),
                 mask=row_mask)
    if TOP1:
        tl.store(top1_ptr + rows, (valid & (best_at == t)).to(tl.int1), mask=row_mask)


@triton.jit
def _row_or_zero(ptr, rows, live, PRESENT: tl.constexpr, ACC: tl.constexpr,
                 BLOCK_R: tl.constexpr):
    """One value per row from ptr, or 0 where the argument is absent."""
    if PRESENT:
        v = tl.load(ptr + rows, mask=live, other=0.0).to(ACC)
    else:
        v = tl.zeros([BLOCK_R], ACC)
    return v


@triton.jit
def _log_probs_grad_kernel(
    x_ptr, grad_ptr, target_ptr, row_inv_temp_ptr, lse_ptr, ent_ptr, g_ptr, h_ptr, k_ptr,
    u_ptr, N, V, ignore_index, inv_temperature: tl.float64, logit_scale: tl.float64,
    softcap: tl.float64, HAS_SOFTCAP: tl.constexpr, HAS_ROW_TEMP: tl.constexpr,
    HAS_G: tl.constexpr, HAS_H: tl.constexpr, HAS_K: tl.constexpr, HAS_U: tl.constexpr,
    ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr,
):
    # Grid: cdiv(N, BLOCK_R); each program owns BLOCK_R whole rows. One pass: read x, write
    # dx (grad may be x itself: each element is read before it is written). Ignored rows
    # are not read, only zeroed.
    rows, row_base, row_mask, t, ignored, valid, t_safe, live, inv_t, ls, cap = _row_state(
        target_ptr, row_inv_temp_ptr, N, V, ignore_index, inv_temperature, logit_scale,
        softcap, HAS_ROW_TEMP, ACC, BLOCK_R)
    cols = tl.arange(0, BLOCK_V)
    lse = tl.load(lse_ptr + rows, mask=live, other=0.0).to(ACC)
    # g, h, and k and u: the upstream gradients of log_probs, the entropy, lse and
    # mean_logits (0 where absent)
    g = _row_or_zero(g_ptr, rows, live, HAS_G, ACC, BLOCK_R)
    h = _row_or_zero(h_ptr, rows, live, HAS_H, ACC, BLOCK_R)
    ent = _row_or_zero(ent_ptr, rows, live, HAS_H, ACC, BLOCK_R)
    k = _row_or_zero(k_ptr, rows, live, HAS_K, ACC, BLOCK_R)
    u = _row_or_zero(u_ptr, rows, live, HAS_U, ACC, BLOCK_R) / V
    # A target outside [0, V) that is not ignored: NaN, as its outputs.
    bad = tl.where(valid | ignored, 1.0, float("nan"))
    for start in range(0, V, BLOCK_V):
        c, mask, offs = class_tile(start, cols, row_base, row_mask, V, 1)
        read = mask & live[:, None]
        x = tl.load(x_ptr + offs, mask=read, other=0.0).to(ACC)
        y = softcap_logits(x, ls, cap, HAS_SOFTCAP)
        z = y * inv_t[:, None]
        p = tl.exp(z - lse[:, None])
        dz = g[:, None] * (tl.where(c[None, :] == t_safe[:, None], 1.0, 0.0) - p) + \
            k[:, None] * p + u[:, None]
        if HAS_H:
            dz -= h[:, None] * tl.where(p > 0, p * (z - lse[:, None] + ent[:, None]), 0.0)
        dx = dz * inv_t[:, None] * softcap_logits_grad(y, ls, cap, HAS_SOFTCAP) * bad[:, None]
        tl.store(grad_ptr + offs, tl.where(read, dx, 0.0).to(grad_ptr.dtype.element_ty),
                 mask=mask)


def _common(a, x):
    """The kernel arguments both kernels share, and the grid and block sizes."""
    N, V = x.shape
    grid, meta = class_blocks(N, V, 1, wide=True)
    meta.pop("STRIDED")
    row_temp = a.row_inv_temperature
    return grid, meta, (N, V, a.ignore_index, float(a.inv_temperature), float(a.logit_scale),
                        float(a.softcap)), dict(
        HAS_SOFTCAP=a.softcap > 0, HAS_ROW_TEMP=row_temp is not None, ACC=tl_acc(x.dtype))


def log_probs(a, lp, ent, lse, lsq, mean, top1):
    x = a.x
    if x.shape[0] > 0:
        grid, meta, scalars, flags = _common(a, x)
        _log_probs_kernel[grid](
            x, a.target, a.row_inv_temperature if a.row_inv_temperature is not None else x,
            lp, ent if ent.numel() else lp, lse, lsq if lsq.numel() else lp,
            mean if mean.numel() else lp, top1 if top1.numel() else lp, *scalars,
            ENTROPY=ent.numel() > 0, LOG_SUM_SQ=lsq.numel() > 0, MEAN=mean.numel() > 0,
            TOP1=top1.numel() > 0, **flags, **meta)
    return lp, ent, lse, lsq, mean, top1


def _grad(a, x, grad):
    if x.shape[0] == 0:
        return
    grid, meta, scalars, flags = _common(a, x)
    g, h, k, u = a.grad_log_probs, a.grad_entropy, a.grad_lse, a.grad_mean_logits
    _log_probs_grad_kernel[grid](
        x, grad, a.target, a.row_inv_temperature if a.row_inv_temperature is not None else x,
        a.lse, a.entropy if h is not None else a.lse,
        *(v if v is not None else a.lse for v in (g, h, k, u)), *scalars,
        HAS_G=g is not None, HAS_H=h is not None, HAS_K=k is not None, HAS_U=u is not None,
        **flags, **meta)


def log_probs_grad(a, grad):
    _grad(a, a.x, grad)
    return grad


def log_probs_grad_inplace(a):
    _grad(a, a.x, a.x)
