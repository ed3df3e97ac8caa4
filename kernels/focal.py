"""Focal losses: softmax focal (per row, like cross-entropy) and sigmoid focal (elementwise)."""
import triton
import triton.language as tl

from fusedloss.kernels._math import (class_rows_tile, class_target_state, focal_factors,
                                     online_lse_update, scalar_arg, sigmoid_focal_terms)


@triton.jit
def _focal_fwd_bwd_kernel(
    x_ptr, target_ptr, alpha_ptr, weight_ptr, loss_scale_ptr,
    loss_ptr, grad_ptr,
    B, C, S, ignore_index, gamma: tl.float64,
    HAS_ALPHA: tl.constexpr, HAS_WEIGHT: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
    STRIDED: tl.constexpr, ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr,
):
    # Grid and row ownership as _ce_fwd_bwd_kernel: BLOCK_R whole rows of the (B, C, S)
    # input per program, classes walked in [BLOCK_R, BLOCK_V] tiles.
    # Passes: sweep 1 reads x for the online log-sum-exp; the focal factors need only lse
    # and the target logit, so sweep 2 (COMPUTE_GRAD) reads x again and writes
    # coef * (p_c - [c == t]). Bytes: ~(2 reads + 1 write) * N*C*sizeof(x).
    pid = tl.program_id(0)
    rows, row_base, row_mask = class_rows_tile(pid, B, C, S, BLOCK_R, STRIDED)
    cols = tl.arange(0, BLOCK_V)
    gamma = scalar_arg(gamma, ACC)

    t = tl.load(target_ptr + rows, mask=row_mask, other=0)
    ignored, valid, t_safe = class_target_state(t, C, ignore_index)
    z_t = tl.load(x_ptr + row_base + t_safe * S, mask=row_mask, other=0.0).to(ACC)
    aw = tl.full([BLOCK_R], 1.0, ACC)
    if HAS_ALPHA:
        aw *= tl.load(alpha_ptr + t_safe, mask=row_mask, other=0.0).to(ACC)
    if HAS_WEIGHT:
        aw *= tl.load(weight_ptr + t_safe, mask=row_mask, other=0.0).to(ACC)

    m = tl.full([BLOCK_R], float("-inf"), ACC)
    l = tl.zeros([BLOCK_R], ACC)
    for start in range(0, C, BLOCK_V):
        c = start + cols
        mask = row_mask[:, None] & (c < C)[None, :]
        offs = row_base[:, None] + c.to(tl.int64)[None, :] * S
        z = tl.load(x_ptr + offs, mask=mask, other=float("-inf")).to(ACC)
        m, l = online_lse_update(m, l, z)
    lse = m + tl.log(l)
    # p = exp(z - m) / l, not exp(z - lse): z - m is exact near the max, where p is large.
    inv_l = 1.0 / l

    logp_t = z_t - lse
    q_gamma, grad_factor = focal_factors(logp_t, gamma)
    loss = tl.where(valid, -aw * q_gamma * logp_t, tl.where(ignored, 0.0, float("nan")))
    tl.store(loss_ptr + rows, loss, mask=row_mask)

    if COMPUTE_GRAD:
        loss_scale = tl.load(loss_scale_ptr).to(ACC)
        coef = tl.where(valid, aw * grad_factor * loss_scale,
                        tl.where(ignored, 0.0, float("nan")))
        for start in range(0, C, BLOCK_V):
            c = start + cols
            mask = row_mask[:, None] & (c < C)[None, :]
            offs = row_base[:, None] + c.to(tl.int64)[None, :] * S
            z = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
            p = tl.exp(z - m[:, None]) * inv_l[:, None]
            is_t = c.to(tl.int64)[None, :] == t_safe[:, None]
            dx = coef[:, None] * (p - tl.where(is_t, 1.0, 0.0))
            # coef = 0 alone would leave NaN for ignored rows with non-finite logits.
            dx = tl.where(ignored[:, None], 0.0, dx)
            tl.store(grad_ptr + offs, dx.to(grad_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _sigmoid_focal_kernel(
    x_ptr, target_ptr, loss_scale_ptr, loss_ptr, grad_ptr,
    n, alpha: tl.float64, gamma: tl.float64,
    REDUCE: tl.constexpr, COMPUTE_GRAD: tl.constexpr, ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # Grid: cdiv(n, BLOCK); each program owns BLOCK consecutive elements of x.reshape(-1).
    # One pass: reads x and target, writes the gradient and either each element's loss
    # (REDUCE False) or the program's partial sum (REDUCE True: the launcher sums the
    # cdiv(n, BLOCK) partials in a fixed order, so the reduction is deterministic).
    # Bytes: n * (sizeof(x) + sizeof(target) + sizeof(x) for the gradient + loss if kept).
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
    t = tl.load(target_ptr + offs, mask=mask, other=0.0).to(ACC)
    loss, dx = sigmoid_focal_terms(x, t, scalar_arg(alpha, ACC), scalar_arg(gamma, ACC))
    if REDUCE:
        tl.store(loss_ptr + pid, tl.sum(tl.where(mask, loss, 0.0), axis=0))
    else:
        tl.store(loss_ptr + offs, loss, mask=mask)
    if COMPUTE_GRAD:
        dx *= tl.load(loss_scale_ptr).to(ACC)
        tl.store(grad_ptr + offs, dx.to(grad_ptr.dtype.element_ty), mask=mask)
