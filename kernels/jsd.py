"""JSD / KL between two softmaxes: each row's divergence and both gradients in one kernel,
and the launcher of the jsd op. The algebra and its names (K_s, K_t, D, coef) are those of
fusedloss/jsd.py."""
import torch
import triton
import triton.language as tl

from fusedloss.kernels._launch import class_blocks, reduce_rows_into, tl_acc
from fusedloss.kernels._math import class_rows_tile, class_tile, online_lse_update


@triton.jit
def _log_mix(p_t, p_s, beta):
    """log(beta p_t + (1 - beta) p_s): one log from the probabilities at hand. Where the
    mixture underflows it is clamped to ~ the smallest normal float32, so a class whose p
    did not underflow adds ~p (lp - log tiny) ~ 0, never p * inf."""
    return tl.log(tl.maximum(beta * p_t + (1.0 - beta) * p_s, 1.1754944e-38))


@triton.jit
def _jsd_kernel(
    s_ptr, t_ptr, target_ptr, row_weight_ptr, loss_scale_ptr, loss_ptr, gs_ptr, gt_ptr,
    N, V, ignore_index, beta: tl.float64, inv_temperature: tl.float64,
    MIXTURE: tl.constexpr, HAS_TARGET: tl.constexpr, HAS_ROW_WEIGHT: tl.constexpr,
    GRAD_S: tl.constexpr, GRAD_T: tl.constexpr,
    ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr,
):
    # Grid: cdiv(N, BLOCK_R); each program owns BLOCK_R whole rows of both (N, V) logits.
    # Sweep 1: online log-sum-exp of both; sweep 2: the loss sums (one log per class for
    # the mixture); sweep 3 (a gradient asked for): the gradients. Bytes: 3 reads of both
    # rows (the later ones often L2 hits) and one write per gradient.
    pid = tl.program_id(0)
    rows, row_base, row_mask = class_rows_tile(pid, N, V, 1, BLOCK_R, False)
    cols = tl.arange(0, BLOCK_V)
    inv_t = tl.full([], inv_temperature, ACC)
    beta = tl.full([], beta, ACC)
    if HAS_TARGET:
        t = tl.load(target_ptr + rows, mask=row_mask, other=0)
        counted = t != ignore_index
    else:
        counted = rows >= 0

    m_s = tl.full([BLOCK_R], float("-inf"), ACC)
    s_s = tl.zeros([BLOCK_R], ACC)
    m_t = tl.full([BLOCK_R], float("-inf"), ACC)
    s_t = tl.zeros([BLOCK_R], ACC)
    for start in range(0, V, BLOCK_V):
        c, mask, offs = class_tile(start, cols, row_base, row_mask, V, 1)
        z_s = tl.load(s_ptr + offs, mask=mask, other=float("-inf")).to(ACC) * inv_t
        z_t = tl.load(t_ptr + offs, mask=mask, other=float("-inf")).to(ACC) * inv_t
        m_s, s_s = online_lse_update(m_s, s_s, z_s)
        m_t, s_t = online_lse_update(m_t, s_t, z_t)
    lse_s = m_s + tl.log(s_s)
    lse_t = m_t + tl.log(s_t)
    # No softmax (a NaN or +inf logit, or only -inf ones): NaN, as torch's log_softmax.
    # (A NaN logit may escape tl.max but not the sum: lse, not the max, tells.)
    finite = (tl.abs(lse_s) < float("inf")) & (tl.abs(lse_t) < float("inf"))

    k_s = tl.zeros([BLOCK_R, BLOCK_V], ACC)
    k_t = tl.zeros([BLOCK_R, BLOCK_V], ACC)
    for start in range(0, V, BLOCK_V):
        c, mask, offs = class_tile(start, cols, row_base, row_mask, V, 1)
        lp_s = tl.load(s_ptr + offs, mask=mask, other=0.0).to(ACC) * inv_t - lse_s[:, None]
        lp_t = tl.load(t_ptr + offs, mask=mask, other=0.0).to(ACC) * inv_t - lse_t[:, None]
        p_t = tl.exp(lp_t)
        if MIXTURE:
            p_s = tl.exp(lp_s)
            lm = _log_mix(p_t, p_s, beta)
            k_s += tl.where(mask & (p_s > 0), p_s * (lp_s - lm), 0.0)
            k_t += tl.where(mask & (p_t > 0), p_t * (lp_t - lm), 0.0)
        else:
            k_t += tl.where(mask & (p_t > 0), p_t * (lp_t - lp_s), 0.0)
    k_s_row = tl.sum(k_s, axis=1)
    k_t_row = tl.sum(k_t, axis=1)
    if MIXTURE:
        loss = beta * k_t_row + (1.0 - beta) * k_s_row
    else:
        loss = k_t_row
    if HAS_ROW_WEIGHT:
        r_w = tl.load(row_weight_ptr + rows, mask=row_mask, other=0.0).to(ACC)
    else:
        r_w = tl.full([BLOCK_R], 1.0, ACC)
    loss = tl.where(finite, loss * r_w, float("nan"))
    tl.store(loss_ptr + rows, tl.where(counted, loss, 0.0), mask=row_mask)

    if GRAD_S or GRAD_T:
        coef = tl.load(loss_scale_ptr).to(ACC) * r_w * inv_t
        coef = tl.where(finite, coef, float("nan"))[:, None]
        if MIXTURE:
            c_s = coef * (1.0 - beta)
            c_t = coef * beta
        else:
            c_s = coef
            c_t = coef
        for start in range(0, V, BLOCK_V):
            c, mask, offs = class_tile(start, cols, row_base, row_mask, V, 1)
            lp_s = tl.load(s_ptr + offs, mask=mask, other=0.0).to(ACC) * inv_t - lse_s[:, None]
            lp_t = tl.load(t_ptr + offs, mask=mask, other=0.0).to(ACC) * inv_t - lse_t[:, None]
            p_s = tl.exp(lp_s)
            p_t = tl.exp(lp_t)
            if MIXTURE:
                lm = _log_mix(p_t, p_s, beta)
                g_s = tl.where(p_s > 0, p_s * (lp_s - lm - k_s_row[:, None]), 0.0)
                g_t = tl.where(p_t > 0, p_t * (lp_t - lm - k_t_row[:, None]), 0.0)
            else:
                g_s = p_s - p_t
                g_t = tl.where(p_t > 0, p_t * (lp_t - lp_s - k_t_row[:, None]), 0.0)
            # Rows left out are exactly 0, whatever their logits.
            if GRAD_S:
                g_s = tl.where(counted[:, None], g_s * c_s, 0.0)
                tl.store(gs_ptr + offs, g_s.to(gs_ptr.dtype.element_ty), mask=mask)
            if GRAD_T:
                g_t = tl.where(counted[:, None], g_t * c_t, 0.0)
                tl.store(gt_ptr + offs, g_t.to(gt_ptr.dtype.element_ty), mask=mask)


def jsd(a, loss, grad_student, grad_teacher):
    student, teacher = a.student.contiguous(), a.teacher.contiguous()
    N, V = student.shape
    rows = torch.empty(N, dtype=loss.dtype, device=student.device)
    # The kernel knows KL(teacher || student) (beta 0) and the mixture; reverse KL (beta 1)
    # is the former with the two sides swapped.
    swap = a.beta == 1.0
    s, t = (teacher, student) if swap else (student, teacher)
    gs, gt = (grad_teacher, grad_student) if swap else (grad_student, grad_teacher)
    want_s, want_t = (a.grad_teacher, a.grad_student) if swap else (a.grad_student,
                                                                     a.grad_teacher)
    if N > 0:
        grid, meta = class_blocks(N, V, 1, wide=True)
        meta.pop("STRIDED")
        _jsd_kernel[grid](
            s, t, a.target if a.target is not None else s,
            a.row_weight.contiguous() if a.row_weight is not None else s, a.loss_scale,
            rows, gs if want_s else s, gt if want_t else s,
            N, V, a.ignore_index, 0.0 if swap else float(a.beta), 1.0 / a.temperature,
            MIXTURE=0.0 < a.beta < 1.0, HAS_TARGET=a.target is not None,
            HAS_ROW_WEIGHT=a.row_weight is not None, GRAD_S=want_s, GRAD_T=want_t,
            ACC=tl_acc(student.dtype), **meta)
    reduce_rows_into(loss, rows, a.reduction, a.loss_scale)
    return loss, grad_student, grad_teacher
