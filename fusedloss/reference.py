"""The pure-PyTorch reference for every loss: the oracle the kernels are tested against,
and the fallback where no kernel serves.

Plain, readable PyTorch, differentiated by autograd. Computes in float64 for float64
inputs and in float32 otherwise, and returns the input's dtype (under autocast the
accumulation dtype, as torch's float32-list losses: _library.loss_dtype). Arguments are
assumed valid: the public functions in fusedloss validate them before calling here.
"""
import math

import torch
import torch.nn.functional as F

from ._library import acc_dtype, autocast_off, functorch_active, loss_dtype


def transform_logits(x, logit_scale=1.0, softcap=None):
    """z = logit_scale * x, then softcap * tanh(z / softcap) when softcap is set."""
    z = x * logit_scale if logit_scale != 1.0 else x
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z


def safe_pow(base, gamma):
    """base ** gamma for base >= 0 whose gradient is finite at base == 0 for every gamma >= 0.

    (d/db b^g = g b^(g-1) is infinite at b = 0 for g < 1; in the focal losses it multiplies
    a factor that is 0 there, and autograd would form inf * 0 = NaN.)
    """
    if gamma == 0:
        return torch.ones_like(base)
    tiny = torch.finfo(base.dtype).tiny
    positive = base > 0
    return torch.where(positive, base.clamp_min(tiny) ** gamma, torch.zeros_like(base))


def _class_view(vec, ndim, class_dim):
    """A (C,) tensor shaped to broadcast along the class dimension of an ndim input."""
    shape = [1] * ndim
    shape[class_dim] = -1
    return vec.view(shape)


def _reduce(rows, reduction, denominator):
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction == "sum":
        return total
    # As torch's nll_loss: the mean divides by the total weight, negative or not; a total
    # of exactly 0 gives NaN (and, through counted rows of weight 0, NaN gradients).
    return total / denominator


def _class_target_terms(logp, target, weight, ignore_index, class_dim):
    """log p of the target class, the target's weight (0 where ignored), the mask of
    counted positions, and the target made safe to index with.

    A target outside [0, C) that is not ignore_index gives NaN (never an out-of-bounds
    read: on CUDA that would be a device assert), as the kernels do.
    """
    n_classes = logp.shape[class_dim]
    valid = target != ignore_index
    in_range = (target >= 0) & (target < n_classes)
    safe_target = torch.where(valid & in_range, target, torch.zeros_like(target))
    logp_t = logp.gather(class_dim, safe_target.unsqueeze(class_dim)).squeeze(class_dim)
    logp_t = torch.where(valid & ~in_range, torch.full_like(logp_t, float("nan")), logp_t)
    w_t = weight[safe_target] if weight is not None else torch.ones_like(logp_t)
    return logp_t, w_t * valid, valid, safe_target


def cross_entropy_rows(input, target, weight=None, ignore_index=-100, label_smoothing=0.0,
                       z_loss=0.0, softcap=None, logit_scale=1.0, token_weight=None):
    """Each position's cross-entropy in the accumulation dtype, the per-position lse, and
    the mean's denominator: (rows, lse, denominator). See cross_entropy."""
    acc = acc_dtype(input.dtype)
    class_dim = 0 if input.dim() == 1 else 1
    n_classes = input.shape[class_dim]
    z = transform_logits(input.to(acc), logit_scale, softcap)
    lse = torch.logsumexp(z, dim=class_dim)
    logp = z - lse.unsqueeze(class_dim)
    w = weight.to(acc) if weight is not None else None
    tw = token_weight.to(acc) if token_weight is not None else None
    eps = label_smoothing

    if target.is_floating_point():
        t = target.to(acc)
        if eps > 0:
            t = t * (1 - eps) + eps / n_classes
        if w is not None:
            t = t * _class_view(w, z.dim(), class_dim)
        rows = -(t * logp).sum(class_dim) + z_loss * lse ** 2
        # torch: the mean over positions, weights or not; over the token weights with them.
        denominator = rows.numel() if tw is None else tw.sum()
        if tw is not None:
            rows = rows * tw
        return rows, lse, denominator
    logp_t, w_t, valid, _ = _class_target_terms(logp, target.long(), w, ignore_index,
                                                class_dim)
    rows = -(1 - eps) * w_t * logp_t
    if eps > 0:
        wlogp = logp * _class_view(w, z.dim(), class_dim) if w is not None else logp
        rows = rows - (eps / n_classes) * wlogp.sum(class_dim) * valid
    rows = rows + z_loss * w_t * lse ** 2
    if tw is not None:
        rows, w_t = rows * tw, w_t * tw
    # Ignored positions contribute an exact 0 to the gradient, even where the mean's factor
    # is infinite (a total weight of 0).
    rows = torch.where(valid, rows, torch.zeros_like(rows))
    return rows, lse, w_t.sum()


def cross_entropy(input, target, weight=None, ignore_index=-100, reduction="mean",
                  label_smoothing=0.0, z_loss=0.0, softcap=None, logit_scale=1.0,
                  token_weight=None):
    """torch.nn.functional.cross_entropy plus logit_scale, softcap, z_loss and token_weight
    (one weight per position: it multiplies the position's loss, and the mean divides by
    the summed token weights of the counted positions, times weight[target]).

    Returns (loss, lse), lse being the per-position log-sum-exp of the transformed logits
    (shape of the target positions, accumulation dtype).
    """
    rows, lse, denominator = cross_entropy_rows(input, target, weight, ignore_index,
                                                label_smoothing, z_loss, softcap, logit_scale,
                                                token_weight)
    return _reduce(rows, reduction, denominator).to(loss_dtype(input)), lse


def checkpointed_chunks(chunk, n, chunk_size, *rows):
    """[chunk(*rows[sl]) for each slice sl of chunk_size rows], each under
    torch.utils.checkpoint when autograd records (memory O(chunk): the references of the
    fused linear losses and of SigLIP). None in `rows` stays None."""
    # Under torch.compile with a dynamic N the loop unrolls per number of chunks, not per
    # N; one chunk (an empty batch too) takes the rows unsliced.
    slices = [slice(None)] if n <= chunk_size else \
        [slice(i * chunk_size, (i + 1) * chunk_size) for i in range(-(-n // chunk_size))]
    # torch.func transforms refuse checkpoint's saved-tensor hooks, and torch.jit.trace
    # would record checkpoint's bookkeeping only when grad is on (torch < 2.12 then fails
    # the trace's check, run without grad): there, autograd keeps the chunks' logits.
    checkpointed = (torch.is_grad_enabled() and not functorch_active()
                    and not torch.jit.is_tracing())
    pieces = []
    for sl in slices:
        args = [r[sl] if r is not None else None for r in rows]
        pieces.append(torch.utils.checkpoint.checkpoint(chunk, *args, use_reentrant=False)
                      if checkpointed else chunk(*args))
    return pieces


def linear_cross_entropy(x, linear_weight, linear_bias, target, num_classes, weight=None,
                         ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0,
                         softcap=None, logit_scale=1.0, token_weight=None, chunk_size=1024,
                         with_entropy=False):
    """cross_entropy(F.linear(x, linear_weight, linear_bias)) over rows of x in chunks.

    x (N, D); linear_weight (C * S, D) and linear_bias (C * S,), the logits of a row being
    (C, S) (S > 1: a K-dimensional loss); target, token_weight: as cross_entropy's for
    logits (N, C, S). Each chunk runs under torch.utils.checkpoint, so autograd keeps only
    its inputs and recomputes its logits in the backward: memory O(chunk x C x S).
    Returns (loss, lse, entropy or None), one per position: lse detached, the entropy with
    its gradient.
    """
    n = x.shape[0]
    positions = linear_weight.shape[0] // num_classes
    prob = target.is_floating_point()
    target = target.reshape(n, num_classes, positions) if prob else target.reshape(n, positions)
    if token_weight is not None:
        token_weight = token_weight.reshape(n, positions)

    def chunk(xc, tc, twc):
        logits = F.linear(xc, linear_weight, linear_bias).view(-1, num_classes, positions)
        rows, lse, den = cross_entropy_rows(logits, tc, weight, ignore_index,
                                            label_smoothing, z_loss, softcap, logit_scale, twc)
        entropy = softmax_entropy(logits, logit_scale, softcap) if with_entropy \
            else None
        return rows, lse.detach(), den, entropy

    pieces = checkpointed_chunks(chunk, n, chunk_size, x, target, token_weight)
    rows = torch.cat([p[0] for p in pieces]).reshape(-1)
    lse = torch.cat([p[1] for p in pieces]).reshape(-1)
    denominator = sum(p[2] for p in pieces)
    entropy = torch.cat([p[3] for p in pieces]).reshape(-1) if with_entropy else None
    return _reduce(rows, reduction, denominator).to(loss_dtype(x)), lse, entropy


def softmax_entropy(input, logit_scale=1.0, softcap=None):
    """The entropy (nats) of the softmax of the transformed logits, per position."""
    class_dim = 0 if input.dim() == 1 else 1
    logp = torch.log_softmax(transform_logits(input.to(acc_dtype(input.dtype)), logit_scale,
                                              softcap), dim=class_dim)
    return -(logp.exp() * logp).sum(class_dim)


def focal_loss(input, target, gamma=2.0, alpha=None, weight=None, ignore_index=-100,
               reduction="mean"):
    """Softmax focal loss: -alpha_t (1 - p_t)^gamma log p_t, class-index targets.

    alpha: None, a float, or a (C,) tensor (alpha_t = alpha[target]). weight acts as in
    cross_entropy: it multiplies each term, and the mean divides by the summed weights of
    the counted targets; alpha does not enter the denominator.
    """
    acc = acc_dtype(input.dtype)
    class_dim = 0 if input.dim() == 1 else 1
    logp = torch.log_softmax(input.to(acc), dim=class_dim)
    w = weight.to(acc) if weight is not None else None
    logp_t, w_t, valid, safe_target = _class_target_terms(logp, target.long(), w,
                                                          ignore_index, class_dim)
    q = -torch.expm1(logp_t)  # 1 - p_t, accurate as p_t -> 1
    rows = -w_t * safe_pow(q, gamma) * logp_t
    if isinstance(alpha, torch.Tensor):
        rows = rows * alpha.to(acc)[safe_target]
    elif alpha is not None:
        rows = rows * alpha
    rows = torch.where(valid, rows, torch.zeros_like(rows))  # as in cross_entropy
    return _reduce(rows, reduction, w_t.sum()).to(loss_dtype(input))


def sigmoid_focal_loss(inputs, targets, alpha=0.25, gamma=2.0, reduction="none"):
    """torchvision.ops.sigmoid_focal_loss, computed stably from the logits."""
    acc = acc_dtype(inputs.dtype)
    x, t = inputs.to(acc), targets.to(acc)
    ce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
    m = torch.sigmoid(x) * (1 - t) + torch.sigmoid(-x) * t  # 1 - p_t
    loss = ce * safe_pow(m, gamma)
    if alpha >= 0:
        loss = loss * (alpha * t + (1 - alpha) * (1 - t))
    return _reduce(loss, reduction, loss.numel()).to(loss_dtype(inputs))


def _nll_rows(logits, pos):
    """logsumexp_j logits[i, j] - logits[i, pos_i] per row; NaN where pos_i is outside
    [0, columns) (never an out-of-bounds gather: on CUDA that is a device assert)."""
    in_range = (pos >= 0) & (pos < logits.shape[1])
    safe = torch.where(in_range, pos, torch.zeros_like(pos))
    rows = torch.logsumexp(logits, 1) - logits.gather(1, safe.unsqueeze(1)).squeeze(1)
    return torch.where(in_range, rows, torch.full_like(rows, float("nan")))


def info_nce_rows(query, key, negatives, labels, scale, symmetric):
    """(row_loss, col_loss) of InfoNCE in the accumulation dtype: row i against all keys
    and negatives (positive labels[i], or i), and, when symmetric, key j against all
    queries (positive query j); col_loss is empty otherwise."""
    acc = acc_dtype(query.dtype)
    keys = key if negatives is None else torch.cat([key, negatives.to(key.dtype)])
    scale = scale.to(acc) if isinstance(scale, torch.Tensor) else scale
    # In acc, as the kernels compute them, whatever autocast is on.
    with autocast_off(query.device):
        logits = (query.to(acc) @ keys.to(acc).T) * scale
    n, m = query.shape[0], key.shape[0]
    pos = labels if labels is not None else torch.arange(n, device=query.device)
    rows = _nll_rows(logits, pos)
    if not symmetric:
        return rows, rows.new_empty((0,))
    return rows, _nll_rows(logits[:, :m].T, torch.arange(m, device=query.device))


def info_nce(query, key, temperature=0.07, logit_scale=None, labels=None, negatives=None,
             symmetric=False, reduction="mean"):
    """InfoNCE over logits = query @ [key; negatives]^T * scale, scale = 1/temperature or
    logit_scale. Row i's positive is labels[i] (i by default). symmetric averages the
    query->key and key->query losses of each pair (diagonal pairing, keys only)."""
    scale = logit_scale if logit_scale is not None else 1.0 / temperature
    rows, cols = info_nce_rows(query, key, negatives, labels, scale, symmetric)
    if symmetric:
        rows = (rows + cols) / 2
    return _reduce(rows, reduction, rows.numel()).to(loss_dtype(query))


# Pairs (logits) in one chunk of the SigLIP reference, as the CPU kernels' tile
# (siglip.TILE_ELEMENTS): the chunk and its few temporaries stay a few MiB each.
SIGLIP_CHUNK_PAIRS = 1 << 20


def siglip_rows(image, text, logit_scale, logit_bias, diagonal=0):
    """Each image's SigLIP loss (accumulation dtype): sum_j -log sigmoid(z_ij l_ij) with
    l = logit_scale <image_i, text_j> + logit_bias, z_ij = +1 for j = i + diagonal (its
    own text, where that column exists) and -1 for every other text.

    The images go in chunks of rows, SIGLIP_CHUNK_PAIRS pairs with all the texts, each as
    checkpointed_chunks runs it: memory O(chunk + N), never the N x M logits, through the
    backward too."""
    acc = acc_dtype(image.dtype)
    y = text.to(acc)
    scale, bias = logit_scale.to(acc).reshape(()), logit_bias.to(acc).reshape(())
    columns = torch.arange(y.shape[0], device=y.device)

    def chunk(x, rows):  # rows: the chunk's image indices, for its positives
        with autocast_off(x.device):
            logits = scale * (x.to(acc) @ y.T) + bias
        z = torch.where(columns == rows[:, None] + diagonal, 1.0, -1.0).to(acc)
        return -F.logsigmoid(z * logits).sum(1)

    n = image.shape[0]
    chunk_rows = max(1, SIGLIP_CHUNK_PAIRS // max(1, y.shape[0]))
    return torch.cat(checkpointed_chunks(chunk, n, chunk_rows, image,
                                         torch.arange(n, device=image.device)))


def siglip_loss(image, text, logit_scale, logit_bias, reduction="mean", diagonal=0):
    """open_clip's SigLipLoss (whose mean divides by the number of images); "sum" and
    "none" (one loss per image) besides."""
    rows = siglip_rows(image, text, logit_scale, logit_bias, diagonal)
    return _reduce(rows, reduction, rows.numel()).to(loss_dtype(image))


def _kl_rows(logp, logq):
    """sum_c p_c (log p_c - log q_c) per row; a class with p_c = 0 adds exactly 0 (also
    to the gradient, where log p_c - log q_c would be -inf - -inf)."""
    return (logp.exp() * torch.where(logp > float("-inf"), logp - logq, 0.0)).sum(-1)


def jsd_rows(student, teacher, beta=0.5, temperature=1.0):
    """Each row's divergence (accumulation dtype) between P_s = softmax(student / T) and
    P_t = softmax(teacher / T), over the last dimension: KL(P_t || P_s) at beta 0,
    KL(P_s || P_t) at beta 1, else beta KL(P_t || M) + (1 - beta) KL(P_s || M) with
    M = beta P_t + (1 - beta) P_s."""
    acc = acc_dtype(student.dtype)
    log_s = torch.log_softmax(student.to(acc) / temperature, -1)
    log_t = torch.log_softmax(teacher.to(acc) / temperature, -1)
    if beta == 0:
        return _kl_rows(log_t, log_s)
    if beta == 1:
        return _kl_rows(log_s, log_t)
    a, b = log_t + math.log(beta), log_s + math.log1p(-beta)
    # log M = logaddexp(a, b); where both are -inf (M = 0) its gradient would be NaN.
    empty = (a == float("-inf")) & (b == float("-inf"))
    log_m = torch.where(empty, float("-inf"),
                        torch.logaddexp(a.masked_fill(empty, 0), b.masked_fill(empty, 0)))
    return beta * _kl_rows(log_t, log_m) + (1 - beta) * _kl_rows(log_s, log_m)


def jsd(student, teacher, target=None, beta=0.5, temperature=1.0, ignore_index=-100,
        reduction="mean", row_weight=None):
    """The generalized Jensen-Shannon divergence of (N, V) logits (see jsd_rows), rows
    whose target is ignore_index left out (the mean divides by the counted rows), each
    row times row_weight when given. No T^2 factor."""
    counted = target != ignore_index if target is not None else None
    if counted is not None:  # rows left out are exactly 0, gradients too, whatever they hold
        student, teacher = (v.masked_fill(~counted.unsqueeze(-1), 0) for v in (student, teacher))
    rows = jsd_rows(student, teacher, beta, temperature)
    if row_weight is not None:
        rows = rows * row_weight.to(rows.dtype)
    if counted is None:
        return _reduce(rows, reduction, rows.numel()).to(loss_dtype(student))
    rows = torch.where(counted, rows, torch.zeros_like(rows))
    return _reduce(rows, reduction, counted.sum()).to(loss_dtype(student))


def linear_jsd_rows(student_input, student_weight, student_bias, teacher_input,
                    teacher_weight, teacher_bias, beta=0.5, temperature=1.0, chunk_size=1024):
    """jsd_rows(F.linear(student ...), F.linear(teacher ...)) over rows in chunks, as
    checkpointed_chunks runs them (memory O(chunk x V), as linear_cross_entropy)."""
    def chunk(xs, xt):
        return jsd_rows(F.linear(xs, student_weight, student_bias),
                        F.linear(xt, teacher_weight, teacher_bias), beta, temperature)

    return torch.cat(checkpointed_chunks(chunk, student_input.shape[0], chunk_size,
                                         student_input, teacher_input))


def linear_jsd(student_input, student_weight, student_bias, teacher_input, teacher_weight,
               teacher_bias, target=None, beta=0.5, temperature=1.0, ignore_index=-100,
               reduction="mean", chunk_size=1024):
    """jsd(F.linear(student ...), F.linear(teacher ...)) without the logits of either
    head: see linear_jsd_rows."""
    rows = linear_jsd_rows(student_input, student_weight, student_bias, teacher_input,
                           teacher_weight, teacher_bias, beta, temperature, chunk_size)
    counted = target != ignore_index if target is not None else None
    if counted is not None:
        rows = torch.where(counted, rows, torch.zeros_like(rows))
    return _reduce(rows, reduction, counted.sum() if counted is not None else rows.numel()) \
        .to(loss_dtype(student_input))


# ------------------------------------------------------------------------------ log-probs
def log_probs_rows(x, target, inv_temperature, logit_scale=1.0, softcap=None,
                   ignore_index=-100):
    """fusedloss.log_probs' six outputs for the rows of x (N, V), in the accumulation
    dtype: (log_probs, entropy, lse, log_sum_sq_probs, mean_logits, is_top1), the first
    two differentiable. inv_temperature: a number, or one per row ((N,) tensor). Rows
    whose target is ignore_index are 0 (is_top1 False); other targets outside [0, V) NaN."""
    with autocast_off(x.device):
        inv_t = inv_temperature[:, None] if isinstance(inv_temperature, torch.Tensor) \
            else inv_temperature
        z = transform_logits(x.to(acc_dtype(x.dtype)), logit_scale, softcap) * inv_t
        logp = torch.log_softmax(z, dim=-1)
    counted = target != ignore_index
    valid = counted & (target >= 0) & (target < x.shape[-1])
    picked = logp.gather(-1, torch.where(valid, target, 0)[:, None]).squeeze(-1)
    p = logp.exp()
    # p log p -> 0 where p = 0; the zeroed log keeps the gradient finite there too.
    entropy = -(p * torch.where(p > 0, logp, torch.zeros_like(logp))).sum(-1)
    nan, zero = torch.full_like(picked, math.nan), torch.zeros_like(picked)

    def row(v):
        return torch.where(valid, v, torch.where(counted, nan, zero))

    detached = [torch.logsumexp(z, -1), torch.logsumexp(2 * logp, -1), z.mean(-1)]
    return (row(picked), row(entropy), *(row(v.detach()) for v in detached),
            valid & (z.argmax(-1) == target))


def transform_grad(x, logit_scale=1.0, softcap=None):
    """d transform_logits(x) / dx, elementwise: logit_scale (1 - (y / softcap)^2)."""
    if softcap is None:
        return torch.full_like(x, logit_scale)
    t = torch.tanh(x * (logit_scale / softcap))
    return logit_scale * (1 - t * t)


def log_probs_grad_rows(x, target, row_inv_temperature, inv_temperature, logit_scale, softcap,
                        ignore_index, lse, entropy, grad_log_probs, grad_entropy, grad_lse,
                        grad_mean_logits):
    """The log-probs backward op (fusedloss/log_probs.py) in torch ops, with its arguments:
    dz_c = g ([c == t] - p_c) - h p_c (z_c - lse + H) + k p_c + u / V, then times dz/dx;
    rows whose target is ignore_index 0."""
    inv_t = row_inv_temperature[:, None] if row_inv_temperature is not None \
        else inv_temperature
    xa = x.to(acc_dtype(x.dtype))
    z = transform_logits(xa, logit_scale, softcap or None) * inv_t
    p = torch.exp(z - lse[:, None])
    zero = torch.zeros_like(lse)
    g, h, k, u = (v if v is not None else zero
                  for v in (grad_log_probs, grad_entropy, grad_lse, grad_mean_logits))
    dz = (k - g)[:, None] * p + (u / x.shape[1])[:, None]
    if grad_entropy is not None:
        dz = dz - h[:, None] * torch.where(p > 0, p * (z - lse[:, None] + entropy[:, None]),
                                           torch.zeros_like(p))
    counted = target != ignore_index
    dz = dz.scatter_add(1, torch.where(counted, target, 0)[:, None], g[:, None])
    dz = torch.where(counted[:, None], dz, torch.zeros_like(dz))
    return (dz * inv_t * transform_grad(xa, logit_scale, softcap or None)).to(x.dtype)


def linear_log_probs(x, linear_weight, linear_bias, target, inv_temperature, logit_scale=1.0,
                     softcap=None, ignore_index=-100, chunk_size=1024):
    """log_probs_rows(F.linear(x, linear_weight, linear_bias), ...) over rows of x (N, D) in
    chunks, each under torch.utils.checkpoint (memory O(chunk x V), as linear_log_probs)."""
    row_inv = inv_temperature if isinstance(inv_temperature, torch.Tensor) else None

    def chunk(xc, tc, inv_c):
        return log_probs_rows(F.linear(xc, linear_weight, linear_bias), tc,
                              inv_c if inv_c is not None else inv_temperature, logit_scale,
                              softcap, ignore_index)

    pieces = checkpointed_chunks(chunk, x.shape[0], chunk_size, x, target, row_inv)
    return tuple(torch.cat([p[i] for p in pieces]) for i in range(6))
