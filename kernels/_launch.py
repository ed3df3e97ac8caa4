"""Host-side helpers shared by the Triton launchers.

Nothing here reads tensor data on the host: block sizes depend on shapes only, and
reductions are torch.sum over per-row (or per-program) buffers, deterministic.

Under TRITON_INTERPRET=1 the class block is capped small on purpose, so that rows of a
hundred classes already span several blocks and the tests exercise the multi-block online
softmax and every tile tail.
"""
import torch
import triton
import triton.language as tl

from fusedloss import _backends
from fusedloss._library import acc_dtype

# GPU: elements of one [BLOCK_R, BLOCK_V] class tile (half for "wide" kernels, see
# class_blocks). Checked by compiling for sm_90: no register spills; not yet timed.
MAX_CLASS_TILE = 4096
# Interpreter (tests): small blocks, so small shapes still take the multi-block paths.
INTERPRET_BLOCK_V = 32
INTERPRET_BLOCK_R = 8
INTERPRET_BLOCK_ELEMS = 256
INTERPRET_BLOCK_NCE = 16

TL_DTYPE = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16,
            torch.float32: tl.float32, torch.float64: tl.float64}


def tl_acc(dtype):
    """The Triton accumulation type of a torch dtype."""
    return TL_DTYPE[acc_dtype(dtype)]


def np2(n):
    return triton.next_power_of_2(max(int(n), 1))


def class_blocks(B, C, S, wide):
    """(grid, meta) for the per-row kernels on a (B, C, S) input.

    wide: the kernel keeps two extra per-lane accumulators (label smoothing, probability
    targets) or computes in float64; its tile is halved to stay clear of register spills.
    """
    strided = S > 1
    n_r = S if strided else B  # the run of rows one program can take
    if _backends.triton_interpret():
        block_v = min(np2(C), INTERPRET_BLOCK_V)
        block_r = min(np2(n_r), INTERPRET_BLOCK_R)
        return _class_grid(B, S, block_r, strided), dict(
            STRIDED=strided, BLOCK_R=block_r, BLOCK_V=block_v, num_warps=1)
    tile = MAX_CLASS_TILE // 2 if wide else MAX_CLASS_TILE
    if strided:
        # Rows are consecutive s: a run of them per class is one coalesced load.
        block_r = min(np2(n_r), 64)
        block_v = min(np2(C), max(16, tile // block_r))
    else:
        # Long rows: one row per program; short rows: pack rows to fill the tile.
        block_v = min(np2(C), tile)
        block_r = min(np2(n_r), max(1, tile // block_v))
    num_warps = max(4, min(16, block_r * block_v // (256 if wide else 512)))
    return _class_grid(B, S, block_r, strided), dict(
        STRIDED=strided, BLOCK_R=block_r, BLOCK_V=block_v, num_warps=num_warps)


def _class_grid(B, S, block_r, strided):
    return (B * triton.cdiv(S, block_r),) if strided else (triton.cdiv(B, block_r),)


def reduce_rows_into(loss, loss_rows, reduction, loss_scale):
    """The op's loss output from per-row (or per-program) losses: reduction 0 keeps the
    rows; 1 and 2 are sum * loss_scale (1/denominator for the mean)."""
    if reduction == 0:
        return loss.copy_(loss_rows)
    return loss.copy_(loss_rows.sum() * loss_scale.to(loss_rows.dtype))
