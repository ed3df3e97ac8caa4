"""Softmax cross-entropy: loss, log-sum-exp and gradient of each row in one kernel, and the
launchers of the cross_entropy and cross_entropy_inplace ops. The algebra and its names
(m, s, lse, p_coef, w_coef, t_coef) are those of fusedloss/cross_entropy.py."""
import triton
import triton.language as tl

from fusedloss.kernels._launch import class_blocks, reduce_rows_into, tl_acc
from fusedloss.kernels._math import (class_rows_tile, class_target_state, class_tile,
                                     online_lse_update, scalar_arg, softcap_logits,
                                     softcap_logits_grad)


@triton.jit
def _w_term_tile(target_ptr, weight_ptr, offs, c, mask, eps, C,
                 PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr, ACC: tl.constexpr):
    """The gradient's w_c * w_coef term of a tile: w_c ((1 - eps) q_c + eps / C) for
    probability targets q, w_c eps / C for class-index targets; 0 off the mask."""
    if HAS_WEIGHT:
        w_term = tl.load(weight_ptr + c, mask=c < C, other=0.0).to(ACC)[None, :]
    else:
        w_term = tl.full([1, c.shape[0]], 1.0, ACC)
    if PROB_TARGET:
        q = tl.load(target_ptr + offs, mask=mask, other=0.0).to(ACC)
        w_term = w_term * ((1.0 - eps) * q + eps / C)
    else:
        w_term = w_term * (eps / C)
    return tl.where(mask, w_term, 0.0)


@triton.jit
def _ce_fwd_bwd_kernel(
    x_ptr, target_ptr, weight_ptr, row_weight_ptr, loss_scale_ptr,
    loss_ptr, lse_ptr, entropy_ptr, grad_ptr,
    B, C, S, ignore_index,
    label_smoothing: tl.float64, logit_scale: tl.float64, softcap: tl.float64,
    z_loss: tl.float64,
    PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_ROW_WEIGHT: tl.constexpr,
    SMOOTHING: tl.constexpr, HAS_SOFTCAP: tl.constexpr, ENTROPY: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr, STRIDED: tl.constexpr,
    ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr,
):
    # Grid: cdiv(B, BLOCK_R) when S == 1, B * cdiv(S, BLOCK_R) when S > 1.
    # Each program owns BLOCK_R whole rows of the (B, C, S) input (see class_rows_tile) and
    # walks their C classes in [BLOCK_R, BLOCK_V] tiles, so any C (256k+) fits.
    # Passes: sweep 1 reads x (and a probability target) for an online log-sum-exp plus the
    # w_term sums; sweep 2 (COMPUTE_GRAD or ENTROPY) reads them again, writes the gradient
    # and sums the entropy.
    # Bytes: ~(2 reads + 1 write) * N*C*sizeof(x) (one read without the gradient), plus
    # 2 * N*C*sizeof(target) for probability targets; the second read of a row is often an
    # L2 hit. The gradient may alias x (grad_ptr == x_ptr, the in-place op): sweep 2 reads
    # each element before it writes it, and no program touches another's rows.
    pid = tl.program_id(0)
    rows, row_base, row_mask = class_rows_tile(pid, B, C, S, BLOCK_R, STRIDED)
    cols = tl.arange(0, BLOCK_V)
    eps = scalar_arg(label_smoothing, ACC)
    logit_scale = scalar_arg(logit_scale, ACC)
    softcap = scalar_arg(softcap, ACC)
    z_loss = scalar_arg(z_loss, ACC)

    # loss = t_coef (lse - z_t) + sum_c w_term_c (lse - z_c) + z_loss w_t lse^2
    if PROB_TARGET:
        ignored = rows < 0  # no row is ignored or invalid: both masks are constant
        valid = rows >= 0
        t_coef = tl.zeros([BLOCK_R], ACC)
        z_t = t_coef
        w_t = tl.full([BLOCK_R], 1.0, ACC)
    else:
        t = tl.load(target_ptr + rows, mask=row_mask, other=0)
        ignored, valid, t_safe = class_target_state(t, C, ignore_index)
        # The target logit is gathered directly rather than picked out of the sweep.
        x_t = tl.load(x_ptr + row_base + t_safe * S, mask=row_mask, other=0.0).to(ACC)
        z_t = softcap_logits(x_t, logit_scale, softcap, HAS_SOFTCAP)
        if HAS_WEIGHT:
            w_t = tl.load(weight_ptr + t_safe, mask=row_mask, other=0.0).to(ACC)
        else:
            w_t = tl.full([BLOCK_R], 1.0, ACC)
        t_coef = (1.0 - eps) * w_t
    if HAS_ROW_WEIGHT:  # multiplies the whole row: its loss and its three coefficients
        r_w = tl.load(row_weight_ptr + rows, mask=row_mask, other=0.0).to(ACC)
    else:
        r_w = tl.full([BLOCK_R], 1.0, ACC)

    # Sweep 1. The w_term sums stay per lane until after the loop: one reduction, not one
    # per tile.
    m = tl.full([BLOCK_R], float("-inf"), ACC)
    s = tl.zeros([BLOCK_R], ACC)
    w_term_sum = tl.zeros([BLOCK_R, BLOCK_V], ACC)
    w_term_z_sum = tl.zeros([BLOCK_R, BLOCK_V], ACC)
    for start in range(0, C, BLOCK_V):
        c, mask, offs = class_tile(start, cols, row_base, row_mask, C, S)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        z = softcap_logits(x, logit_scale, softcap, HAS_SOFTCAP)
        if PROB_TARGET or SMOOTHING:
            w_term = _w_term_tile(target_ptr, weight_ptr, offs, c, mask, eps, C,
                                  PROB_TARGET, HAS_WEIGHT, ACC)
            w_term_sum += w_term
            w_term_z_sum += w_term * z
        m, s = online_lse_update(m, s, tl.where(mask, z, float("-inf")))
    lse = m + tl.log(s)
    # p = exp(z - m) / s, not exp(z - lse): z - m is exact near the max, where p is large.
    inv_s = 1.0 / s

    loss = t_coef * (lse - z_t) + z_loss * w_t * lse * lse
    p_coef = t_coef + 2.0 * z_loss * w_t * lse
    if PROB_TARGET or SMOOTHING:
        w_total = tl.sum(w_term_sum, axis=1)
        loss += w_total * lse - tl.sum(w_term_z_sum, axis=1)
        p_coef += w_total
    loss = tl.where(valid, loss * r_w, tl.where(ignored, 0.0, float("nan")))
    tl.store(loss_ptr + rows, loss, mask=row_mask)
    tl.store(lse_ptr + rows, lse, mask=row_mask)

    if COMPUTE_GRAD or ENTROPY:
        # The row weight and the caller's scale fold into the coefficients once.
        loss_scale = tl.load(loss_scale_ptr).to(ACC)
        r_scale = r_w * loss_scale
        p_scaled = (inv_s * p_coef * r_scale)[:, None]
        t_scaled = (t_coef * r_scale)[:, None]
        entropy = tl.zeros([BLOCK_R, BLOCK_V], ACC)
        for start in range(0, C, BLOCK_V):
            c, mask, offs = class_tile(start, cols, row_base, row_mask, C, S)
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
            z = softcap_logits(x, logit_scale, softcap, HAS_SOFTCAP)
            e = tl.exp(z - m[:, None])
            if ENTROPY:  # sum_c p_c d_c, d_c = m - z_c; 0 where p_c is (a -inf logit)
                entropy += tl.where(mask & (e > 0), e * (m[:, None] - z), 0.0)
            if COMPUTE_GRAD:
                dz = e * p_scaled
                if PROB_TARGET or SMOOTHING:
                    dz -= _w_term_tile(target_ptr, weight_ptr, offs, c, mask, eps, C,
                                       PROB_TARGET, HAS_WEIGHT, ACC) * r_scale[:, None]
                if not PROB_TARGET:
                    is_t = c.to(tl.int64)[None, :] == t_safe[:, None]
                    dz -= tl.where(is_t, t_scaled, 0.0)
                dx = dz * softcap_logits_grad(z, logit_scale, softcap, HAS_SOFTCAP)
                # Ignored rows are exactly 0 even for non-finite logits; bad targets NaN.
                dx = tl.where(valid[:, None], dx,
                              tl.where(ignored[:, None], 0.0, float("nan")))
                tl.store(grad_ptr + offs, dx.to(grad_ptr.dtype.element_ty), mask=mask)
        if ENTROPY:  # H = log s + sum_c p_c d_c
            tl.store(entropy_ptr + rows, tl.log(s) + tl.sum(entropy, axis=1) * inv_s,
                     mask=row_mask)


# ------------------------------------------------------------------------------ launchers
def _launch(a, x, loss, lse, entropy, grad):
    """Run _ce_fwd_bwd_kernel over x into the outputs; grad: a buffer, x itself or None."""
    B, C, S = x.shape
    loss_rows = lse.new_empty(lse.shape)
    if C == 0:
        loss_rows.fill_(float("nan"))
        lse.fill_(float("-inf"))
        entropy.fill_(float("nan"))
    elif B * S > 0:
        prob_target = a.target.is_floating_point()
        smoothing = a.label_smoothing > 0
        grid, meta = class_blocks(B, C, S, wide=prob_target or smoothing or x.dtype.itemsize == 8)
        _ce_fwd_bwd_kernel[grid](
            x, a.target.contiguous(), a.weight.contiguous() if a.weight is not None else x,
            a.row_weight.contiguous() if a.row_weight is not None else x, a.loss_scale,
            loss_rows, lse, entropy, grad if grad is not None else x,
            B, C, S, a.ignore_index,
            float(a.label_smoothing), float(a.logit_scale), float(a.softcap), float(a.z_loss),
            PROB_TARGET=prob_target, HAS_WEIGHT=a.weight is not None,
            HAS_ROW_WEIGHT=a.row_weight is not None, SMOOTHING=smoothing,
            HAS_SOFTCAP=a.softcap > 0, ENTROPY=a.compute_entropy,
            COMPUTE_GRAD=grad is not None, ACC=tl_acc(x.dtype), **meta)
    reduce_rows_into(loss, loss_rows, a.reduction, a.loss_scale)


def cross_entropy(a, loss, lse, entropy, grad):
    _launch(a, a.x.contiguous(), loss, lse, entropy, grad if a.compute_grad else None)
    return loss, lse, entropy, grad


def cross_entropy_inplace(a, loss, lse, entropy):
    if not a.x.is_contiguous():
        raise ValueError("fusedloss: cross_entropy_inplace needs a contiguous x "
                         "(the gradient is written over it)")
    _launch(a, a.x, loss, lse, entropy, grad=a.x)
    return loss, lse, entropy
