"""Softmax cross-entropy: loss, log-sum-exp and gradient of each row in one kernel."""
import triton
import triton.language as tl

from fusedloss.kernels._math import (class_rows_tile, class_target_state, online_lse_update,
                                     scalar_arg, softcap_logits, softcap_logits_grad)


@triton.jit
def _soft_target_tile(target_ptr, weight_ptr, offs, c, mask, eps, C,
                      PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr, ACC: tl.constexpr):
    """tw_c, the target mass on class c that is not a single hard class, times w_c:
    w_c ((1 - eps) t_c + eps / C) for probability targets; w_c eps / C for class-index
    targets with label smoothing (their (1 - eps) w_t on class t is kept apart). 0 off mask."""
    if HAS_WEIGHT:
        tw = tl.load(weight_ptr + c, mask=c < C, other=0.0).to(ACC)[None, :]
    else:
        tw = tl.full([1, c.shape[0]], 1.0, ACC)
    if PROB_TARGET:
        tt = tl.load(target_ptr + offs, mask=mask, other=0.0).to(ACC)
        tw = tw * ((1.0 - eps) * tt + eps / C)
    else:
        tw = tw * (eps / C)
    return tl.where(mask, tw, 0.0)


@triton.jit
def _ce_fwd_bwd_kernel(
    x_ptr, target_ptr, weight_ptr, loss_scale_ptr,
    loss_ptr, lse_ptr, grad_ptr,
    B, C, S, ignore_index,
    label_smoothing: tl.float64, logit_scale: tl.float64, softcap: tl.float64,
    z_loss: tl.float64,
    PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr, SMOOTHING: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, COMPUTE_GRAD: tl.constexpr, STRIDED: tl.constexpr,
    ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr,
):
    # Grid: cdiv(B, BLOCK_R) when S == 1, B * cdiv(S, BLOCK_R) when S > 1.
    # Each program owns BLOCK_R whole rows of the (B, C, S) input (see class_rows_tile) and
    # walks their C classes in [BLOCK_R, BLOCK_V] tiles, so any C (256k+) fits.
    # Passes: sweep 1 reads x (and a probability target) for an online log-sum-exp plus the
    # target sums; sweep 2 (COMPUTE_GRAD) reads them again and writes the gradient.
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

    # Per row: the loss is hard_w (lse - z_t) + z_loss zl_w lse^2 + sum_c tw_c (lse - z_c),
    # and the gradient dz_c = p_c p_coef - tw_c - [c == t] hard_w, where tw_c is the soft
    # target mass of class c (see _soft_target_tile) and hard_w the class target's weight.
    if PROB_TARGET:
        ignored = rows < 0  # no row is ignored or invalid: both masks are constant
        valid = rows >= 0
        hard_w = tl.zeros([BLOCK_R], ACC)
        z_t = hard_w
        zl_w = tl.full([BLOCK_R], 1.0, ACC)
    else:
        t = tl.load(target_ptr + rows, mask=row_mask, other=0)
        ignored, valid, t_safe = class_target_state(t, C, ignore_index)
        # The target logit is gathered directly rather than picked out of the sweep.
        x_t = tl.load(x_ptr + row_base + t_safe * S, mask=row_mask, other=0.0).to(ACC)
        z_t = softcap_logits(x_t, logit_scale, softcap, HAS_SOFTCAP)
        if HAS_WEIGHT:
            zl_w = tl.load(weight_ptr + t_safe, mask=row_mask, other=0.0).to(ACC)
        else:
            zl_w = tl.full([BLOCK_R], 1.0, ACC)
        hard_w = (1.0 - eps) * zl_w

    # Sweep 1. The soft-target sums stay per lane until after the loop: one reduction,
    # not one per tile.
    m = tl.full([BLOCK_R], float("-inf"), ACC)
    l = tl.zeros([BLOCK_R], ACC)
    tw_sum = tl.zeros([BLOCK_R, BLOCK_V], ACC)
    twz_sum = tl.zeros([BLOCK_R, BLOCK_V], ACC)
    for start in range(0, C, BLOCK_V):
        c = start + cols
        mask = row_mask[:, None] & (c < C)[None, :]
        offs = row_base[:, None] + c.to(tl.int64)[None, :] * S
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        z = softcap_logits(x, logit_scale, softcap, HAS_SOFTCAP)
        if PROB_TARGET or SMOOTHING:
            tw = _soft_target_tile(target_ptr, weight_ptr, offs, c, mask, eps, C,
                                   PROB_TARGET, HAS_WEIGHT, ACC)
            tw_sum += tw
            twz_sum += tw * z
        m, l = online_lse_update(m, l, tl.where(mask, z, float("-inf")))
    lse = m + tl.log(l)
    # p = exp(z - m) / l, not exp(z - lse): z - m is exact near the max, where p is large.
    inv_l = 1.0 / l

    loss = hard_w * (lse - z_t) + z_loss * zl_w * lse * lse
    p_coef = hard_w + 2.0 * z_loss * zl_w * lse
    if PROB_TARGET or SMOOTHING:
        soft_total = tl.sum(tw_sum, axis=1)
        loss += soft_total * lse - tl.sum(twz_sum, axis=1)
        p_coef += soft_total
    loss = tl.where(valid, loss, tl.where(ignored, 0.0, float("nan")))
    tl.store(loss_ptr + rows, loss, mask=row_mask)
    tl.store(lse_ptr + rows, lse, mask=row_mask)

    if COMPUTE_GRAD:
        loss_scale = tl.load(loss_scale_ptr).to(ACC)
        for start in range(0, C, BLOCK_V):
            c = start + cols
            mask = row_mask[:, None] & (c < C)[None, :]
            offs = row_base[:, None] + c.to(tl.int64)[None, :] * S
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
            z = softcap_logits(x, logit_scale, softcap, HAS_SOFTCAP)
            dz = tl.exp(z - m[:, None]) * (inv_l * p_coef)[:, None]
            if PROB_TARGET or SMOOTHING:
                dz -= _soft_target_tile(target_ptr, weight_ptr, offs, c, mask, eps, C,
                                        PROB_TARGET, HAS_WEIGHT, ACC)
            if not PROB_TARGET:
                is_t = c.to(tl.int64)[None, :] == t_safe[:, None]
                dz -= tl.where(is_t, hard_w[:, None], 0.0)
            dx = dz * softcap_logits_grad(z, logit_scale, softcap, HAS_SOFTCAP) * loss_scale
            # Ignored rows are exactly 0 even for non-finite logits; bad targets are NaN.
            dx = tl.where(valid[:, None], dx,
                          tl.where(ignored[:, None], 0.0, float("nan")))
            tl.store(grad_ptr + offs, dx.to(grad_ptr.dtype.element_ty), mask=mask)
