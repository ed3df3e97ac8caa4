"""Math shared by the fusedloss Triton kernels, written once (the algebra is documented
with each op: fusedloss/cross_entropy.py, focal.py, sigmoid_focal.py, info_nce.py).

Everything computes in the dtype of its inputs: the kernels upcast to ACC (float32 for
half inputs, float64 for float64 inputs) before calling here. Only tl.exp and tl.log are
used for transcendentals: libdevice is not available under TRITON_INTERPRET=1, where the
tests run, and one code path for both keeps what is tested what runs on the GPU.
"""
import triton
import triton.language as tl


@triton.jit
def scalar_arg(value, ACC: tl.constexpr):
    """A float kernel argument as an ACC scalar.

    Float arguments are declared tl.float64 so that float64 losses see label_smoothing=0.1
    and friends unrounded; fp32 kernels then convert once here instead of promoting every
    tile operation to float64.
    """
    return tl.full([], value, ACC)


# ------------------------------------------------------------------ elementary functions
@triton.jit
def expm1(x):
    """exp(x) - 1 for x <= 0, accurate near 0 (Kahan: the ratio cancels exp's rounding)."""
    u = tl.exp(x)
    um1 = u - 1.0
    r = tl.where(u == 1.0, x, um1 * (x / tl.log(u)))
    return tl.where(um1 == -1.0, -1.0, r)


@triton.jit
def log1p(x):
    """log(1 + x) for x >= 0, accurate near 0 (Kahan's trick, as in expm1)."""
    u = 1.0 + x
    return tl.where(u == 1.0, x, tl.log(u) * (x / (u - 1.0)))


@triton.jit
def tanh(y):
    # exp(-2|y|) never overflows, and expm1 keeps tanh(y) ~ y accurate for small y.
    e = expm1(-2.0 * tl.abs(y))
    t = -e / (2.0 + e)
    return tl.where(y < 0, -t, t)


@triton.jit
def pow_nonneg(base, gamma):
    """base ** gamma for base >= 0, gamma >= 0, with 0 ** 0 = 1 (as the reference's safe_pow)."""
    positive = base > 0
    powered = tl.exp(gamma * tl.log(tl.where(positive, base, 1.0)))
    return tl.where(positive, powered, tl.where(gamma == 0, 1.0, 0.0))


# ------------------------------------------------------------------ logits transform
@triton.jit
def softcap_logits(x, logit_scale, softcap, HAS_SOFTCAP: tl.constexpr):
    """z = logit_scale * x, then softcap * tanh(z / softcap)."""
    z = x * logit_scale
    if HAS_SOFTCAP:
        z = softcap * tanh(z / softcap)
    return z


@triton.jit
def softcap_logits_grad(z, logit_scale, softcap, HAS_SOFTCAP: tl.constexpr):
    """dz/dx from z itself: d/dy [c tanh(y / c)] = 1 - (z / c)^2, so x need not be kept."""
    dz_dx = logit_scale
    if HAS_SOFTCAP:
        t = z / softcap
        dz_dx = logit_scale * (1.0 - t * t)
    return dz_dx


# ------------------------------------------------------------------ softmax pieces
@triton.jit
def online_lse_update(m, s, z):
    """Fold a tile z [R, B] into each row's running max m and sum s of exp(z - m) (axis 1).

    Rows whose values so far are all -inf (masked tails, -inf logits) keep m = -inf and
    s = 0: the shift falls back to 0 there, so no exp(-inf - -inf) = NaN appears.
    """
    m_new = tl.maximum(m, tl.max(z, axis=1))
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    s = s * tl.exp(m - shift) + tl.sum(tl.exp(z - shift[:, None]), axis=1)
    return m_new, s


@triton.jit
def class_target_state(t, C, ignore_index):
    """(ignored, valid, safe index) of class-index targets: out-of-range and not ignored
    means neither, which the kernels turn into NaN; the safe index is always in bounds."""
    ignored = t == ignore_index
    in_range = (t >= 0) & (t < C)
    valid = in_range & (t != ignore_index)
    return ignored, valid, tl.where(in_range, t, 0)


@triton.jit
def class_rows_tile(pid, B, C, S, BLOCK_R: tl.constexpr, STRIDED: tl.constexpr):
    """The rows a program owns in a (B, C, S) input, as (row index, offset of class 0, mask).

    Row r = b*S + s holds x[b, :, s], class c at b*C*S + c*S + s. With S == 1 a program
    owns BLOCK_R consecutive b (classes contiguous). With S > 1 it owns BLOCK_R consecutive
    s of one b, so each class is one contiguous, coalesced run of BLOCK_R elements and the
    strided layout is read without a transposed copy. Offsets are int64: N*C > 2^31 works.
    """
    if STRIDED:
        n_sblocks = tl.cdiv(S, BLOCK_R)
        b = (pid // n_sblocks).to(tl.int64)
        s = (pid % n_sblocks) * BLOCK_R + tl.arange(0, BLOCK_R)
        mask = s < S
        rows = b * S + s
        base = b * C * S + s
    else:
        rows = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        mask = rows < B
        base = rows * C
    return rows, base, mask


@triton.jit
def class_tile(start, cols, row_base, row_mask, C, S):
    """Classes c = start + cols of the program's rows: (c, mask, offsets) of the
    [BLOCK_R, BLOCK_V] tile, the offsets int64 (class stride S)."""
    c = start + cols
    mask = row_mask[:, None] & (c < C)[None, :]
    return c, mask, row_base[:, None] + c.to(tl.int64)[None, :] * S


# ------------------------------------------------------------------ focal terms
@triton.jit
def focal_factors(logp_t, gamma):
    """(q^gamma, q^gamma (1 - gamma p_t logp_t / q)) with q = 1 - p_t.

    The second is the softmax focal loss's gradient factor; logp_t / q -> -1 as q -> 0
    (p_t -> 1), so it stays finite for every gamma >= 0 where the naive form is 0 * inf.
    """
    q = tl.maximum(-expm1(logp_t), 0.0)
    p_t = tl.exp(logp_t)
    q_gamma = pow_nonneg(q, gamma)
    ratio = tl.where(q > 0, logp_t / tl.where(q > 0, q, 1.0), -1.0)
    return q_gamma, q_gamma * (1.0 - gamma * p_t * ratio)


@triton.jit
def sigmoid_focal_terms(x, t, alpha, gamma):
    """Elementwise sigmoid focal loss and its derivative in x (alpha < 0: no alpha term).

    ce = max(x,0) - x t + log1p(exp(-|x|)); m = p (1-t) + (1-p) t; loss = a_t ce m^gamma;
    dloss/dx = a_t m^gamma ((p - t) + gamma ce p (1-p) (1-2t) / m), the last ratio 0 at m == 0.
    p and 1 - p both come from e = exp(-|x|), so neither cancels for large |x|.
    """
    e = tl.exp(-tl.abs(x))
    inv = 1.0 / (1.0 + e)
    p = tl.where(x >= 0, inv, e * inv)
    one_minus_p = tl.where(x >= 0, e * inv, inv)
    ce = tl.maximum(x, 0.0) - x * t + log1p(e)
    m = p * (1.0 - t) + one_minus_p * t
    m_gamma = pow_nonneg(m, gamma)
    r = tl.where(m > 0, p * one_minus_p * (1.0 - 2.0 * t) / tl.where(m > 0, m, 1.0), 0.0)
    a_t = tl.where(alpha >= 0, alpha * t + (1.0 - alpha) * (1.0 - t), 1.0)
    loss = a_t * ce * m_gamma
    grad = a_t * m_gamma * ((p - t) + gamma * ce * r)
    return loss, grad


# ------------------------------------------------------------------ SigLIP pairs
@triton.jit
def softplus_sigmoid(u):
    """(softplus(u), sigmoid(u)), both from e = exp(-|u|): neither overflows for large |u|
    and softplus keeps its log1p accuracy (SigLIP: u = -z l, see fusedloss/siglip.py)."""
    e = tl.exp(-tl.abs(u))
    inv = 1.0 / (1.0 + e)
    return tl.maximum(u, 0.0) + log1p(e), tl.where(u >= 0, inv, e * inv)
