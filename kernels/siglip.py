"""SigLIP's element-wise tile kernel: a tile of image-text dot products (from a GEMM in
fusedloss/siglip.py) turned into each row's loss and, in place, the tile's gradient. The
algebra is in fusedloss/siglip.py; the launcher of the siglip_tile op is at the end."""
import triton
import triton.language as tl

from fusedloss import _backends
from fusedloss.kernels._launch import INTERPRET_BLOCK_R, INTERPRET_BLOCK_V, tl_acc
from fusedloss.kernels._math import softplus_sigmoid


@triton.jit
def _siglip_tile_kernel(
    dots_ptr, scale_ptr, bias_ptr, row_weight_ptr, loss_scale_ptr,
    row_loss_ptr, scale_rows_ptr, bias_rows_ptr,
    R, C, diagonal,
    HAS_ROW_WEIGHT: tl.constexpr, COMPUTE_GRAD: tl.constexpr, ACC: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # Grid: cdiv(R, BLOCK_R); a program owns BLOCK_R rows of the (R, C) row-major tile and
    # walks their columns in BLOCK_C blocks, keeping three sums per row: the loss, and for
    # the gradient sum G * dots (-> d logit_scale) and sum G (-> d logit_bias), where
    # G = loss_scale * row_weight * dloss/dlogit; it writes logit_scale * G over the dots.
    # Row i's positive is column i + diagonal. Bytes: the tile read once (and written
    # once with the gradient) in the accumulation dtype, plus 3 R values.
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < R
    s = tl.load(scale_ptr).to(ACC)
    b = tl.load(bias_ptr).to(ACC)
    w = tl.load(loss_scale_ptr).to(ACC) + tl.zeros([BLOCK_R], ACC)
    if HAS_ROW_WEIGHT:
        w *= tl.load(row_weight_ptr + rows, mask=row_mask, other=0.0).to(ACC)
    pos = rows + diagonal
    base = rows.to(tl.int64)[:, None] * C
    cols = tl.arange(0, BLOCK_C)
    loss_sum = tl.zeros([BLOCK_R], ACC)
    scale_sum = tl.zeros([BLOCK_R], ACC)
    bias_sum = tl.zeros([BLOCK_R], ACC)
    for start in range(0, C, BLOCK_C):
        c = start + cols
        mask = row_mask[:, None] & (c < C)[None, :]
        offs = base + c[None, :]
        d = tl.load(dots_ptr + offs, mask=mask, other=0.0).to(ACC)
        z = tl.where(c[None, :] == pos[:, None], 1.0, -1.0)
        loss, sig = softplus_sigmoid(-z * (s * d + b))
        loss_sum += tl.sum(tl.where(mask, loss, 0.0), axis=1)
        if COMPUTE_GRAD:
            g = tl.where(mask, -z * sig * w[:, None], 0.0)
            scale_sum += tl.sum(g * d, axis=1)
            bias_sum += tl.sum(g, axis=1)
            tl.store(dots_ptr + offs, (s * g).to(dots_ptr.dtype.element_ty), mask=mask)
    tl.store(row_loss_ptr + rows, loss_sum, mask=row_mask)
    if COMPUTE_GRAD:
        tl.store(scale_rows_ptr + rows, scale_sum, mask=row_mask)
        tl.store(bias_rows_ptr + rows, bias_sum, mask=row_mask)


# ------------------------------------------------------------------------------ launcher
def siglip_tile(a, row_loss, scale_rows, bias_rows):
    dots = a.dots
    if dots.dim() != 2 or not dots.is_contiguous():
        raise ValueError("fusedloss: siglip_tile needs a contiguous (rows, cols) dots tile "
                         "(the gradient is written over it)")
    R, C = dots.shape
    if _backends.triton_interpret():  # small blocks: tiny tiles still span several
        meta = dict(BLOCK_R=INTERPRET_BLOCK_R, BLOCK_C=INTERPRET_BLOCK_V, num_warps=1)
    else:  # not yet tuned by measurement
        meta = dict(BLOCK_R=4, BLOCK_C=1024, num_warps=4)
    if R > 0:
        acc = dots.dtype
        _siglip_tile_kernel[(triton.cdiv(R, meta["BLOCK_R"]),)](
            dots, a.logit_scale, a.logit_bias,
            a.row_weight.to(acc).contiguous() if a.row_weight is not None else dots,
            a.loss_scale, row_loss, scale_rows, bias_rows, R, C, a.diagonal,
            HAS_ROW_WEIGHT=a.row_weight is not None, COMPUTE_GRAD=a.compute_grad,
            ACC=tl_acc(acc), **meta)
    return row_loss, scale_rows, bias_rows
