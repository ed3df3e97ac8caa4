"""Focal losses: softmax focal (per row, like cross-entropy) and sigmoid focal (elementwise),
and the launchers of their ops. The algebra is in fusedloss/focal.py and sigmoid_focal.py."""
import triton
import triton.language as tl

from fusedloss import _backends
from fusedloss.kernels._launch import (INTERPRET_BLOCK_ELEMS, class_blocks, reduce_rows_into,
                                       tl_acc)
from fusedloss.kernels._math import (class_rows_tile, class_target_state, class_tile,
                                     focal_factors, online_lse_update, scalar_arg,
                                     sigmoid_focal_terms)


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
    wa_t = tl.full([BLOCK_R], 1.0, ACC)  # w_t a_t
    if HAS_ALPHA:
        wa_t *= tl.load(alpha_ptr + t_safe, mask=row_mask, other=0.0).to(ACC)
    if HAS_WEIGHT:
        wa_t *= tl.load(weight_ptr + t_safe, mask=row_mask, other=0.0).to(ACC)

    m = tl.full([BLOCK_R], float("-inf"), ACC)
    s = tl.zeros([BLOCK_R], ACC)
    for start in range(0, C, BLOCK_V):
        c, mask, offs = class_tile(start, cols, row_base, row_mask, C, S)
        z = tl.load(x_ptr + offs, mask=mask, other=float("-inf")).to(ACC)
        m, s = online_lse_update(m, s, z)
    lse = m + tl.log(s)
    # p = exp(z - m) / s, not exp(z - lse): z - m is exact near the max, where p is large.
    inv_s = 1.0 / s

    logp_t = z_t - lse
    q_gamma, grad_factor = focal_factors(logp_t, gamma)
    loss = tl.where(valid, -wa_t * q_gamma * logp_t, tl.where(ignored, 0.0, float("nan")))
    tl.store(loss_ptr + rows, loss, mask=row_mask)

    if COMPUTE_GRAD:
        loss_scale = tl.load(loss_scale_ptr).to(ACC)
        coef = tl.where(valid, wa_t * grad_factor * loss_scale,
                        tl.where(ignored, 0.0, float("nan")))
        for start in range(0, C, BLOCK_V):
            c, mask, offs = class_tile(start, cols, row_base, row_mask, C, S)
            z = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
            p = tl.exp(z - m[:, None]) * inv_s[:, None]
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


# ------------------------------------------------------------------------------ launchers
def focal_loss(a, loss, grad):
    x = a.x.contiguous()
    B, C, S = x.shape
    loss_rows = loss.new_empty((B * S,), dtype=a.loss_scale.dtype)
    if C == 0:
        loss_rows.fill_(float("nan"))
    elif B * S > 0:
        grid, meta = class_blocks(B, C, S, wide=x.dtype.itemsize == 8)
        _focal_fwd_bwd_kernel[grid](
            x, a.target.contiguous(), a.alpha.contiguous() if a.alpha is not None else x,
            a.weight.contiguous() if a.weight is not None else x, a.loss_scale,
            loss_rows, grad if a.compute_grad else x,
            B, C, S, a.ignore_index, float(a.gamma),
            HAS_ALPHA=a.alpha is not None, HAS_WEIGHT=a.weight is not None,
            COMPUTE_GRAD=a.compute_grad, ACC=tl_acc(x.dtype), **meta)
    reduce_rows_into(loss, loss_rows, a.reduction, a.loss_scale)
    return loss, grad


def sigmoid_focal_loss(a, loss, grad):
    x = a.x.contiguous().view(-1)
    n = x.numel()
    block = INTERPRET_BLOCK_ELEMS if _backends.triton_interpret() else 1024
    n_programs = triton.cdiv(n, block)
    loss_buf = x.new_empty((n_programs if a.reduction else n,), dtype=a.loss_scale.dtype)
    if n > 0:
        _sigmoid_focal_kernel[(n_programs,)](
            x, a.target.contiguous().view(-1), a.loss_scale, loss_buf,
            grad if a.compute_grad else x, n, float(a.alpha), float(a.gamma),
            REDUCE=a.reduction != 0, COMPUTE_GRAD=a.compute_grad, ACC=tl_acc(x.dtype),
            BLOCK=block, num_warps=4)
    reduce_rows_into(loss, loss_buf, a.reduction, a.loss_scale)
    return loss, grad
