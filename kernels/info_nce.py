"""InfoNCE in flash-attention-style tiles: logits are recomputed tile by tile and never
stored, so memory stays O((N + M) * D) for N queries against M keys (+ E negatives).
The algebra is in fusedloss/info_nce.py; the launchers of its two ops are at the end."""
import torch
import triton
import triton.language as tl

from fusedloss import _backends
from fusedloss.kernels._launch import INTERPRET_BLOCK_NCE, TL_DTYPE, np2, tl_acc
from fusedloss.kernels._math import online_lse_update

# tl.dot takes float64 operands in triton 3.6 and later (seen: 3.6 and 3.8 take them, 3.1
# refuses them); before, float64 tiles multiply through _mm's sum of products.
FLOAT64_DOT = tuple(int(v) for v in triton.__version__.split(".")[:2]) >= (3, 6)


@triton.jit
def _mm(a, b, acc, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc + a @ b. tl.dot of the operands in DOT_DTYPE, into acc's dtype (named: triton
    before 3.8 assumes float32); or, DOT_PRECISION == "sum" (float64 where triton's dot
    refuses it, before 3.6), the products summed in acc's dtype."""
    if DOT_PRECISION == "sum":
        return acc + tl.sum(a.to(acc.dtype)[:, :, None] * b.to(acc.dtype)[None, :, :], axis=1)
    else:
        return tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision=DOT_PRECISION,
                      out_dtype=acc.dtype)


@triton.jit
def _sim_tile(a_ptr, a_rows, a_mask, b_ptr, b_rows, b_mask, D,
              ACC: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
              BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    """<a_i, b_j> for a [BLOCK_A, BLOCK_B] tile of two row-major (., D) matrices.

    On the GPU the inputs go to tl.dot in their own dtype (DOT_DTYPE) with an ACC
    accumulator: bf16/fp16 on the tensor cores, float32 in IEEE precision (no TF32
    rounding), float64 as float64 (see _mm). The interpreter's dot multiplies bf16 bit
    patterns as integers, so there the launcher sets DOT_DTYPE = float32: exact products of
    the same bf16 values, the same fp32 accumulation.
    """
    d = tl.arange(0, BLOCK_D)
    a_base = a_rows.to(tl.int64)[:, None] * D
    b_base = b_rows.to(tl.int64)[:, None] * D
    acc = tl.zeros([BLOCK_A, BLOCK_B], ACC)
    for d0 in range(0, D, BLOCK_D):
        d_mask = (d0 + d < D)[None, :]
        a = tl.load(a_ptr + a_base + d0 + d[None, :], mask=a_mask[:, None] & d_mask, other=0.0)
        b = tl.load(b_ptr + b_base + d0 + d[None, :], mask=b_mask[:, None] & d_mask, other=0.0)
        acc = _mm(a, tl.trans(b), acc, DOT_DTYPE, DOT_PRECISION)
    return acc


@triton.jit
def _info_nce_lse_block(m, s, pos_logit, a_ptr, rows, row_mask, pos, b_ptr, n_b, col_offset,
                        scale, D, ACC: tl.constexpr, DOT_DTYPE: tl.constexpr,
                        DOT_PRECISION: tl.constexpr, BLOCK_A: tl.constexpr,
                        BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    """Fold the logits of rows against all n_b rows of b (global columns col_offset + j)."""
    cols = tl.arange(0, BLOCK_B)
    for start in range(0, n_b, BLOCK_B):
        c = start + cols
        c_mask = c < n_b
        logits = scale * _sim_tile(a_ptr, rows, row_mask, b_ptr, c, c_mask, D, ACC, DOT_DTYPE,
                                   DOT_PRECISION, BLOCK_A, BLOCK_B, BLOCK_D)
        # The positive logit is taken from the same tile the lse sums, so loss >= 0.
        is_pos = (col_offset + c)[None, :] == pos[:, None]
        pos_logit += tl.sum(tl.where(is_pos, logits, 0.0), axis=1)
        m, s = online_lse_update(m, s, tl.where(c_mask[None, :], logits, float("-inf")))
    return m, s, pos_logit


@triton.jit
def _info_nce_fwd_kernel(
    a_ptr, b_ptr, extra_ptr, labels_ptr, scale_ptr, lse_ptr, loss_ptr,
    n_a, n_b, n_extra, D,
    HAS_EXTRA: tl.constexpr, HAS_LABELS: tl.constexpr, ACC: tl.constexpr,
    DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Row pass: a = query, b = key, extra = negatives; logits[i, j] = scale <a_i, [b; extra]_j>.
    # Column pass (symmetric): a = key, b = query, no extra: the same kernel on the
    # transposed logits gives each key's lse over the queries.
    # Grid: cdiv(n_a, BLOCK_A); each program owns BLOCK_A rows of a and keeps only their
    # running max / sum-exp and positive logit while it walks all columns in BLOCK_B blocks.
    # Bytes: a once, [b; extra] once per program: (n_a + cdiv(n_a, BLOCK_A) * (n_b + n_extra))
    # * D * sizeof(input), the re-reads mostly L2 hits; writes 2 * n_a * sizeof(acc).
    pid = tl.program_id(0)
    rows = pid * BLOCK_A + tl.arange(0, BLOCK_A)
    row_mask = rows < n_a
    if HAS_LABELS:
        pos = tl.load(labels_ptr + rows, mask=row_mask, other=0)
    else:
        pos = rows.to(tl.int64)
    scale = tl.load(scale_ptr).to(ACC)
    m = tl.full([BLOCK_A], float("-inf"), ACC)
    s = tl.zeros([BLOCK_A], ACC)
    pos_logit = tl.zeros([BLOCK_A], ACC)
    m, s, pos_logit = _info_nce_lse_block(m, s, pos_logit, a_ptr, rows, row_mask, pos, b_ptr,
                                          n_b, 0, scale, D, ACC, DOT_DTYPE, DOT_PRECISION,
                                          BLOCK_A, BLOCK_B, BLOCK_D)
    if HAS_EXTRA:
        m, s, pos_logit = _info_nce_lse_block(m, s, pos_logit, a_ptr, rows, row_mask, pos,
                                              extra_ptr, n_extra, n_b, scale, D, ACC,
                                              DOT_DTYPE, DOT_PRECISION, BLOCK_A, BLOCK_B,
                                              BLOCK_D)
    lse = m + tl.log(s)
    pos_ok = (pos >= 0) & (pos < n_b + n_extra)
    tl.store(lse_ptr + rows, lse, mask=row_mask)
    tl.store(loss_ptr + rows, tl.where(pos_ok, lse - pos_logit, float("nan")), mask=row_mask)


@triton.jit
def _info_nce_dlogits(s, rows, row_mask, cols, col_mask, pos, grad_row, row_lse,
                      grad_col, col_lse, HAS_COL: tl.constexpr):
    """dloss/dlogits on a [rows, cols] tile (indices global; the column term is keys-only)."""
    dl = grad_row[:, None] * (tl.exp(s - row_lse[:, None])
                              - tl.where(cols[None, :] == pos[:, None], 1.0, 0.0))
    if HAS_COL:
        dl += grad_col[None, :] * (tl.exp(s - col_lse[None, :])
                                   - tl.where(rows[:, None] == cols[None, :], 1.0, 0.0))
    return tl.where(row_mask[:, None] & col_mask[None, :], dl, 0.0)


@triton.jit
def _info_nce_dq_block(dq, gs, q_ptr, rows, row_mask, pos, grad_row, row_lse, b_ptr, n_b,
                       col_offset, grad_col_ptr, col_lse_ptr, scale, D, d_out, d_out_mask,
                       HAS_COL: tl.constexpr, ACC: tl.constexpr, DOT_DTYPE: tl.constexpr,
                       DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Accumulate dq[:, d_out] += dlogits @ b[:, d_out] and gs += rowsum(dlogits * <q, b>)."""
    cols = tl.arange(0, BLOCK_M)
    for start in range(0, n_b, BLOCK_M):
        c = start + cols
        c_mask = c < n_b
        raw = _sim_tile(q_ptr, rows, row_mask, b_ptr, c, c_mask, D, ACC, DOT_DTYPE,
                        DOT_PRECISION, BLOCK_N, BLOCK_M, BLOCK_D)
        if HAS_COL:
            g_col = tl.load(grad_col_ptr + c, mask=c_mask, other=0.0).to(ACC)
            lse_c = tl.load(col_lse_ptr + c, mask=c_mask, other=0.0).to(ACC)
        else:  # placeholders: the column term is compiled out
            g_col = raw
            lse_c = raw
        dl = _info_nce_dlogits(scale * raw, rows, row_mask, col_offset + c, c_mask, pos,
                               grad_row, row_lse, g_col, lse_c, HAS_COL)
        gs += tl.sum(dl * raw, axis=1)
        b = tl.load(b_ptr + c.to(tl.int64)[:, None] * D + d_out[None, :],
                    mask=c_mask[:, None] & d_out_mask[None, :], other=0.0)
        # dlogits round to the input dtype for the tensor cores, as flash-attention's P.
        dq = _mm(dl.to(b.dtype), b, dq, DOT_DTYPE, DOT_PRECISION)
    return dq, gs


@triton.jit
def _info_nce_bwd_dq_kernel(
    q_ptr, k_ptr, neg_ptr, labels_ptr, scale_ptr, grad_row_ptr, grad_col_ptr,
    row_lse_ptr, col_lse_ptr, dq_ptr, gs_partial_ptr,
    N, M, E, D,
    HAS_NEG: tl.constexpr, HAS_LABELS: tl.constexpr, HAS_COL: tl.constexpr,
    ACC: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DOUT: tl.constexpr,
):
    # Grid: (cdiv(N, BLOCK_N), cdiv(D, BLOCK_DOUT)). A program owns BLOCK_N queries and
    # BLOCK_DOUT of their D gradient columns; it recomputes the logits of its queries
    # against every key and negative (looping over D in BLOCK_D chunks), forms dlogits
    # from the saved row/column lse, and accumulates dq in registers. Splitting D keeps
    # the accumulator small for wide embeddings at the price of recomputing the logits
    # cdiv(D, BLOCK_DOUT) times. The programs of D-chunk 0 also write their partial of
    # grad_scale = sum dlogits * <q, k>, summed by the launcher in a fixed order.
    # Bytes: per program, its queries plus all (M + E) * D keys: mostly L2 hits.
    pid_n = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    d_out = pid_d * BLOCK_DOUT + tl.arange(0, BLOCK_DOUT)
    d_out_mask = d_out < D
    if HAS_LABELS:
        pos = tl.load(labels_ptr + rows, mask=row_mask, other=0)
    else:
        pos = rows.to(tl.int64)
    scale = tl.load(scale_ptr).to(ACC)
    grad_row = tl.load(grad_row_ptr + rows, mask=row_mask, other=0.0).to(ACC)
    row_lse = tl.load(row_lse_ptr + rows, mask=row_mask, other=0.0).to(ACC)
    dq = tl.zeros([BLOCK_N, BLOCK_DOUT], ACC)
    gs = tl.zeros([BLOCK_N], ACC)
    dq, gs = _info_nce_dq_block(dq, gs, q_ptr, rows, row_mask, pos, grad_row, row_lse, k_ptr,
                                M, 0, grad_col_ptr, col_lse_ptr, scale, D, d_out, d_out_mask,
                                HAS_COL, ACC, DOT_DTYPE, DOT_PRECISION,
                                BLOCK_N, BLOCK_M, BLOCK_D)
    if HAS_NEG:
        dq, gs = _info_nce_dq_block(dq, gs, q_ptr, rows, row_mask, pos, grad_row, row_lse,
                                    neg_ptr, E, M, grad_col_ptr, col_lse_ptr, scale, D, d_out,
                                    d_out_mask, False, ACC, DOT_DTYPE, DOT_PRECISION,
                                    BLOCK_N, BLOCK_M, BLOCK_D)
    tl.store(dq_ptr + rows.to(tl.int64)[:, None] * D + d_out[None, :],
             (dq * scale).to(dq_ptr.dtype.element_ty),
             mask=row_mask[:, None] & d_out_mask[None, :])
    tl.store(gs_partial_ptr + pid_n, tl.sum(gs, axis=0), mask=pid_d == 0)


@triton.jit
def _info_nce_bwd_dk_kernel(
    q_ptr, b_ptr, labels_ptr, scale_ptr, grad_row_ptr, grad_col_ptr,
    row_lse_ptr, col_lse_ptr, db_ptr,
    N, n_b, col_offset, D,
    HAS_LABELS: tl.constexpr, HAS_COL: tl.constexpr, ACC: tl.constexpr,
    DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DOUT: tl.constexpr,
):
    # Launched once for the keys (b = key, col_offset 0, HAS_COL when symmetric) and once
    # for the negatives (b = negatives, col_offset M), so a block never straddles the two.
    # Grid: (cdiv(n_b, BLOCK_M), cdiv(D, BLOCK_DOUT)). A program owns BLOCK_M rows of b and
    # BLOCK_DOUT gradient columns; it recomputes its logits column tile against every
    # query block and accumulates db = dlogits^T @ q in registers.
    # Bytes: per program, its rows of b plus all N * D queries: mostly L2 hits.
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    cb = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cb_mask = cb < n_b
    d_out = pid_d * BLOCK_DOUT + tl.arange(0, BLOCK_DOUT)
    d_out_mask = d_out < D
    scale = tl.load(scale_ptr).to(ACC)
    if HAS_COL:
        g_col = tl.load(grad_col_ptr + cb, mask=cb_mask, other=0.0).to(ACC)
        lse_c = tl.load(col_lse_ptr + cb, mask=cb_mask, other=0.0).to(ACC)
    db = tl.zeros([BLOCK_M, BLOCK_DOUT], ACC)
    q_rows = tl.arange(0, BLOCK_N)
    for start in range(0, N, BLOCK_N):
        r = start + q_rows
        r_mask = r < N
        if HAS_LABELS:
            pos = tl.load(labels_ptr + r, mask=r_mask, other=0)
        else:
            pos = r.to(tl.int64)
        grad_row = tl.load(grad_row_ptr + r, mask=r_mask, other=0.0).to(ACC)
        row_lse = tl.load(row_lse_ptr + r, mask=r_mask, other=0.0).to(ACC)
        raw = _sim_tile(q_ptr, r, r_mask, b_ptr, cb, cb_mask, D, ACC, DOT_DTYPE,
                        DOT_PRECISION, BLOCK_N, BLOCK_M, BLOCK_D)
        if HAS_COL:
            dl = _info_nce_dlogits(scale * raw, r, r_mask, col_offset + cb, cb_mask, pos,
                                   grad_row, row_lse, g_col, lse_c, True)
        else:
            dl = _info_nce_dlogits(scale * raw, r, r_mask, col_offset + cb, cb_mask, pos,
                                   grad_row, row_lse, grad_row, row_lse, False)
        q = tl.load(q_ptr + r.to(tl.int64)[:, None] * D + d_out[None, :],
                    mask=r_mask[:, None] & d_out_mask[None, :], other=0.0)
        db = _mm(tl.trans(dl).to(q.dtype), q, db, DOT_DTYPE, DOT_PRECISION)
    tl.store(db_ptr + cb.to(tl.int64)[:, None] * D + d_out[None, :],
             (db * scale).to(db_ptr.dtype.element_ty),
             mask=cb_mask[:, None] & d_out_mask[None, :])


# ------------------------------------------------------------------------------ launchers
def _nce_meta(dtype, D):
    """Tile sizes for the InfoNCE kernels; tl.dot needs every dimension >= 16.

    GPU choices were checked by compiling for sm_90 (no spills at these sizes); they are
    not yet tuned by measurement.
    """
    d = max(16, np2(D))
    if _backends.triton_interpret():
        b = INTERPRET_BLOCK_NCE
        return dict(BLOCK_N=b, BLOCK_M=b, BLOCK_D=min(d, b), BLOCK_DOUT=min(d, b),
                    num_warps=1)
    if dtype == torch.float64 and not FLOAT64_DOT:  # [16, 16, 16] product tiles
        return dict(BLOCK_N=16, BLOCK_M=16, BLOCK_D=16, BLOCK_DOUT=16, num_warps=4)
    if dtype == torch.float64:
        return dict(BLOCK_N=32, BLOCK_M=32, BLOCK_D=min(d, 32), BLOCK_DOUT=min(d, 32),
                    num_warps=4)
    block_d = 32 if dtype == torch.float32 else 64
    return dict(BLOCK_N=64, BLOCK_M=64, BLOCK_D=min(d, block_d), BLOCK_DOUT=min(d, 64),
                num_warps=8)


def _dot_meta(dtype):
    """DOT_DTYPE and DOT_PRECISION of the InfoNCE kernels (see _sim_tile)."""
    dot_dtype = TL_DTYPE[dtype]
    if dtype == torch.bfloat16 and _backends.triton_interpret():
        dot_dtype = tl.float32  # the interpreter's dot is wrong on bf16 operands
    # IEEE for float32 (TF32 would round the inputs to 10 mantissa bits) and float64.
    precision = "ieee" if dtype in (torch.float32, torch.float64) else "tf32"
    if dtype == torch.float64 and not FLOAT64_DOT:
        precision = "sum"
    return dict(DOT_DTYPE=dot_dtype, DOT_PRECISION=precision)


def _embeddings(a):
    """query, key and negatives contiguous, in query's dtype; E, the number of negatives."""
    q = a.query.contiguous()
    k = a.key.to(q.dtype).contiguous()
    neg = a.negatives.to(q.dtype).contiguous() if a.negatives is not None else None
    return q, k, neg, neg.shape[0] if neg is not None else 0


def info_nce(a, row_loss, col_loss, row_lse, col_lse):
    q, k, neg, E = _embeddings(a)
    (N, D), M = q.shape, k.shape[0]
    meta = _nce_meta(q.dtype, D)
    blocks = dict(ACC=tl_acc(q.dtype), **_dot_meta(q.dtype),
                  BLOCK_A=meta["BLOCK_N"], BLOCK_B=meta["BLOCK_M"], BLOCK_D=meta["BLOCK_D"],
                  num_warps=meta["num_warps"])

    def lse_and_loss(lse, loss, rows, cols, extra, labels, n_a, n_b, n_extra):
        if n_a > 0:
            _info_nce_fwd_kernel[(triton.cdiv(n_a, blocks["BLOCK_A"]),)](
                rows, cols, extra if extra is not None else cols,
                labels.contiguous() if labels is not None else lse, a.scale, lse, loss,
                n_a, n_b, n_extra, D, HAS_EXTRA=extra is not None and n_extra > 0,
                HAS_LABELS=labels is not None, **blocks)

    lse_and_loss(row_lse, row_loss, q, k, neg, a.labels, N, M, E)
    if a.symmetric:
        lse_and_loss(col_lse, col_loss, k, q, None, None, M, N, 0)
    return row_loss, col_loss, row_lse, col_lse


def info_nce_backward(a, grad_query, grad_key, grad_negatives, grad_scale):
    q, k, neg, E = _embeddings(a)
    (N, D), M = q.shape, k.shape[0]
    acc = a.row_lse.dtype
    meta = _nce_meta(q.dtype, D)
    has_col = bool(a.symmetric) and a.grad_col.numel() > 0
    grad_row = a.grad_row.to(acc).contiguous()
    grad_col = a.grad_col.to(acc).contiguous() if has_col else grad_row
    row_lse = a.row_lse.contiguous()
    col_lse = a.col_lse.contiguous() if has_col else row_lse
    labels = a.labels.contiguous() if a.labels is not None else grad_row
    common = dict(ACC=tl_acc(q.dtype), **_dot_meta(q.dtype), **meta)
    n_dout = triton.cdiv(D, meta["BLOCK_DOUT"])

    gq = torch.empty((N, D), dtype=q.dtype, device=q.device)
    n_qblocks = triton.cdiv(N, meta["BLOCK_N"])
    scale_partials = torch.zeros(n_qblocks, dtype=acc, device=q.device)
    if N > 0 and D > 0:
        _info_nce_bwd_dq_kernel[(n_qblocks, n_dout)](
            q, k, neg if neg is not None else k, labels, a.scale, grad_row, grad_col,
            row_lse, col_lse, gq, scale_partials, N, M, E, D,
            HAS_NEG=E > 0, HAS_LABELS=a.labels is not None, HAS_COL=has_col, **common)

    def grad_of(out, b, n_b, col_offset, with_col):
        db = torch.empty((n_b, D), dtype=q.dtype, device=q.device)
        if n_b > 0 and D > 0:
            _info_nce_bwd_dk_kernel[(triton.cdiv(n_b, meta["BLOCK_M"]), n_dout)](
                q, b, labels, a.scale, grad_row, grad_col, row_lse, col_lse, db,
                N, n_b, col_offset, D, HAS_LABELS=a.labels is not None, HAS_COL=with_col,
                **common)
        out.copy_(db)

    grad_query.copy_(gq)
    grad_of(grad_key, k, M, 0, has_col)
    if neg is not None:
        grad_of(grad_negatives, neg, E, M, False)
    grad_scale.copy_(scale_partials.sum().reshape(grad_scale.shape))
    return grad_query, grad_key, grad_negatives, grad_scale
