"""Vocab-parallel cross-entropy: the cross-rank code of the softmax cross-entropy family
(cross_entropy and linear_cross_entropy with a process_group). Every rank holds a
contiguous slice of the classes, in rank order (the slices may differ in size). Per row only a few numbers cross ranks, never the logits:
each rank folds its slice into (m_r, s_r) and the sums below, and then

    m = max_r m_r,   s = sum_r s_r exp(m_r - m),   lse = m + log s
    z_t = sum_r (the target's logit where rank r holds it),  and for label smoothing
    sum_c w_c z_c; for probability targets sum_c w_c t'_c z_c and T = sum_c w_c t'_c

give every rank the same loss (the algebra of fusedloss/cross_entropy.py), and the
gradient of its own slice, dz_c = exp(z_c - lse) p_coef - w_c w_coef - [c == t] t_coef.
"""
import torch
import torch.distributed as dist

from . import _library
from ._collectives import all_reduce, check_agree, check_group, exchange, first_order_only
from ._library import acc_dtype

# Rows of logits handled at once by the torch-op parts below (4 Mi values): bounds the
# scratch of a chunk where it cannot be the gradient buffer.
CHUNK_ELEMENTS = 1 << 22


class VocabSlice:
    """One call's view of this rank's slice of the classes: where it starts, how many
    classes there are in all, and the per-row statistics and gradients above."""

    def __init__(self, group, like, n_local, rows, o, weight, what, extra=()):
        self.group, self.o, self.what = group, o, what
        world, rank = check_group(group, like, what)
        meta = exchange([n_local, *rows, *extra], group, like.device)
        check_agree(meta[:, 1:1 + len(rows)],
                    ["the number of rows", "the positions per row"][:len(rows)], what)
        self.extra = meta[:, 1 + len(rows):]  # every rank's `extra` values
        sizes = meta[:, 0]
        self.offset = sizes[:rank].sum()      # device tensors: no host read
        self.n_classes = sizes.sum()
        self.n_local = n_local
        self.acc = acc_dtype(like.dtype)
        self.weight = weight.to(self.acc) if weight is not None else None
        if weight is not None and meta.device.type == "cpu" and \
                weight.shape[0] != int(self.n_classes):
            raise ValueError(f"fusedloss.{what}: weight has {weight.shape[0]} entries but the "
                             f"ranks' class slices add up to {int(self.n_classes)}; it must "
                             "hold the global classes")
        self.weight_local = None
        if weight is not None:  # clamped: a weight of the wrong size never reads out of range
            idx = (torch.arange(n_local, device=like.device) + self.offset).clamp_(
                max=weight.shape[0] - 1)
            self.weight_local = self.weight.index_select(0, idx)

    def check_targets(self, target):
        """Class indices outside every rank's classes raise where reading them is free
        (CPU tensors); on a GPU their rows get a NaN loss and gradient instead."""
        if target.is_floating_point() or target.device.type != "cpu":
            return
        bad = (target != self.o.ignore_index) & ((target < 0) | (target >= self.n_classes))
        if bool(bad.any()):
            raise IndexError(f"target contains the class index {int(target[bad][0])}, outside "
                             f"[0, {int(self.n_classes)}) (the classes of every rank) and not "
                             f"ignore_index ({self.o.ignore_index})")

    def transform_into(self, x, out):
        """out (the accumulation dtype) = z = the transformed logits x."""
        torch.mul(x, self.o.logit_scale, out=out)
        if self.o.softcap is not None:
            out.div_(self.o.softcap).tanh_().mul_(self.o.softcap)
        return out

    def targets(self, target):
        """Class-index targets (rows, S) -> (local index, held here, counted, bad)."""
        local = target - self.offset
        held = (local >= 0) & (local < self.n_local)
        counted = target != self.o.ignore_index
        bad = counted & ((target < 0) | (target >= self.n_classes))
        return local.clamp(0, max(self.n_local - 1, 0)), held & counted, counted & ~bad, bad

    def soft_targets(self, q):
        """w_c t'_c of the slice for probability targets q (rows, C_local, S)."""
        t = q.to(self.acc) * (1 - self.o.label_smoothing) + \
            self.o.label_smoothing / self.n_classes.to(self.acc)
        return t * self.weight_local[None, :, None] if self.weight_local is not None else t

    def local_stats(self, z, target, entropy):
        """The slice's (m, [s, sums...], shift) for z (rows, C_local, S), which it
        overwrites (with exp(z - shift)): so z may be scratch memory, such as the gradient
        buffer before the gradient is written."""
        # An empty slice (V=4 on 3 ranks: 2/2/0) has no max and holds no target: it adds
        # -inf to the max and 0 to every sum.
        empty = self.n_local == 0
        m = z.new_full((z.shape[0], z.shape[2]), float("-inf")) if empty else z.amax(1)
        shift = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        sums = []
        if not target.is_floating_point():
            local, held = self.targets(target)[:2]
            z_t = torch.zeros_like(m) if empty else z.gather(1, local[:, None]).squeeze(1)
            sums.append(torch.where(held, z_t, torch.zeros_like(z_t)))
            if self.o.label_smoothing > 0:
                sums.append(torch.einsum("rcs,c->rs", z, self.weight_local)
                            if self.weight_local is not None else z.sum(1))
        else:
            wt = self.soft_targets(target)
            sums += [torch.einsum("rcs,rcs->rs", wt, z), wt.sum(1)]
        if entropy:  # sum_c e_c z_c, 0 where e_c is (at -inf logits)
            e = torch.exp(z - shift[:, None])
            sums.insert(0, torch.where(e > 0, e * z, torch.zeros_like(z)).sum(1))
        e = z.sub_(shift[:, None]).exp_()
        sums.insert(0, e.sum(1))
        return m, torch.stack(sums), shift

    def combine(self, m, sums, shift, entropy):
        """The global statistics: two all-reduces of a few numbers per row. s (and the
        entropy's sum) are rescaled from each rank's shift to the global max first."""
        top = m.clone()
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=self.group)
        top_shift = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
        k = 2 if entropy else 1
        sums = torch.cat([sums[:k] * torch.exp(shift - top_shift), sums[k:]])
        dist.all_reduce(sums, group=self.group)
        return top_shift, sums

    def rows(self, target, top_shift, sums, row_weight, entropy):
        """Per row: loss, lse, entropy (or None) and the gradient coefficients."""
        o, eps = self.o, self.o.label_smoothing
        s = sums[0]
        lse = top_shift + torch.log(s)
        i = 1
        ent = None
        if entropy:
            ent = lse - sums[1] / s
            i = 2
        if not target.is_floating_point():
            local, held, valid, bad = self.targets(target)
            z_t = sums[i]
            w_t = self.weight[target.clamp(0, self.weight.shape[0] - 1)] \
                if self.weight is not None else torch.ones_like(lse)
            w_t = torch.where(valid, w_t, torch.zeros_like(w_t))
            keep = (1 - eps) * w_t
            loss = keep * (lse - z_t)
            p_coef = keep.clone()
            w_coef = torch.zeros_like(lse)
            if eps > 0:
                w_sum = self.weight.sum() if self.weight is not None else \
                    self.n_classes.to(self.acc)
                eps_c = eps / self.n_classes.to(self.acc)
                loss = loss + eps_c * (w_sum * lse - sums[i + 1])
                p_coef = p_coef + eps_c * w_sum
                w_coef = torch.where(valid, eps_c.to(self.acc).expand_as(lse), w_coef)
            if o.z_loss:
                loss = loss + o.z_loss * w_t * lse * lse
                p_coef = p_coef + 2 * o.z_loss * w_t * lse
            t_coef = keep
            nan = torch.full_like(loss, float("nan"))
            loss = torch.where(valid, loss, torch.where(bad, nan, torch.zeros_like(loss)))
            p_coef = torch.where(valid, p_coef, torch.where(bad, nan, torch.zeros_like(loss)))
        else:
            z_wt, total = sums[i], sums[i + 1]
            loss = total * lse - z_wt + o.z_loss * lse * lse
            p_coef = total + 2 * o.z_loss * lse
            w_coef, t_coef = torch.ones_like(lse), torch.zeros_like(lse)
        if row_weight is not None:
            loss, p_coef, w_coef, t_coef = (v * row_weight for v in (loss, p_coef, w_coef,
                                                                        t_coef))
        return loss, lse, ent, (p_coef, w_coef, t_coef)

    def grad_into(self, x, out, target, lse, coefs, scale):
        """out (rows, C_local, S; the accumulation dtype) = d loss / d x of the slice, in
        place: the only temporary is the softcap's derivative."""
        p_coef, w_coef, t_coef = (c * scale for c in coefs)
        self.transform_into(x, out)
        dz_dx = 1 - (out / self.o.softcap) ** 2 if self.o.softcap is not None else None
        out.sub_(lse[:, None]).exp_().mul_(p_coef[:, None])
        if not target.is_floating_point():
            if self.o.label_smoothing > 0:
                w = self.weight_local if self.weight_local is not None else \
                    torch.ones(self.n_local, dtype=self.acc, device=out.device)
                out.addcmul_(w[None, :, None], w_coef[:, None], value=-1)
            local, held = self.targets(target)[:2]
            if self.n_local:  # an empty slice holds no target
                out.scatter_add_(1, local[:, None],
                                 -torch.where(held, t_coef, torch.zeros_like(t_coef))[:, None])
            out.masked_fill_((target == self.o.ignore_index)[:, None], 0)
        else:
            out.sub_(self.soft_targets(target) * w_coef[:, None])
        out.mul_(self.o.logit_scale)
        if dz_dx is not None:
            out.mul_(dz_dx)
        return out


def _chunk_rows(per_row):
    return max(1, CHUNK_ELEMENTS // max(per_row, 1))


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """cross_entropy over a (B, C_local, S) slice: the loss and the slice's gradient in the
    forward, row chunk by row chunk (temporaries O(chunk x C_local)); the backward scales
    the saved gradient (in place where the graph owns it)."""

    @staticmethod
    def forward(ctx, x, sl, target, row_weight, loss_scale, reduction, entropy):
        B, C, S = x.shape
        step = _chunk_rows(C * S)
        grad = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        # Scratch for the chunks' z: the gradient buffer itself where it has the
        # accumulation dtype (it is written only after the statistics), else one chunk.
        in_grad = grad is not None and x.dtype == sl.acc
        scratch = None if in_grad else x.new_empty((min(B, step), C, S), dtype=sl.acc)

        def z_of(b):
            rows = x[b:b + step]
            out = grad[b:b + step] if in_grad else scratch[:rows.shape[0]]
            return rows, out

        stats = [sl.local_stats(sl.transform_into(*z_of(b)), target[b:b + step], entropy)
                 for b in range(0, max(B, 1), step)]  # no rows: one empty chunk
        m, sums, shift = (torch.cat([s[i] for s in stats], dim=1 if i == 1 else 0)
                          for i in range(3))
        top_shift, sums = sl.combine(m, sums, shift, entropy)
        loss, lse, ent, coefs = sl.rows(target, top_shift, sums, row_weight, entropy)
        if grad is not None:
            for b in range(0, B, step):
                rows, out = z_of(b)
                sl.grad_into(rows, out, target[b:b + step], lse[b:b + step],
                             [c[b:b + step] for c in coefs], loss_scale)
                if not in_grad:
                    grad[b:b + step] = out
        ctx.grad, ctx.reduction = grad, reduction
        if grad is not None:
            _library.owned(grad)
        out = loss if reduction == 0 else loss.sum() * loss_scale
        ent = ent if ent is not None else lse.new_empty((0,))
        ctx.mark_non_differentiable(lse, ent)
        return out, lse, ent

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        first_order_only()
        grad = ctx.grad
        if grad is None:
            raise RuntimeError(_library.CONSUMED)
        in_place = getattr(grad, "_fusedloss_owned", False)
        if in_place:
            ctx.grad = None
        shape = (grad.shape[0], 1, grad.shape[2])
        return (_library.scale_grad(grad, grad_loss, ctx.reduction, shape, in_place),
                None, None, None, None, None, None)


def cross_entropy(x, target_k, weight, row_weight, loss_scale, o, entropy, group):
    """Vocab-parallel cross-entropy of x (B, C_local, S); target_k: global class indices
    (B, S) or this slice's probabilities (B, C_local, S). Returns (loss, lse, entropy)."""
    sl = VocabSlice(group, x, x.shape[1], [x.shape[0], x.shape[2]], o, weight,
                    "cross_entropy")
    sl.check_targets(target_k)
    rw = row_weight.view(target_k.shape[0], -1) if row_weight is not None else None
    return _VocabParallelCrossEntropy.apply(x, sl, target_k, rw, loss_scale, o.reduction,
                                            entropy)


# ------------------------------------------------------------------------------ linear
def _linear_chunks(sl, x, w, b, target, row_weight, loss_scale, positions, chunk, grads,
                   entropy):
    """The vocab-parallel linear cross-entropy, chunk by chunk of rows (the same chunks
    on every rank: the statistics of each are exchanged before its gradient). Returns the
    loss rows, lse, entropy and, with `grads`, this rank's grad_input (its slice's share,
    to be summed over ranks), grad_weight and grad_bias."""
    n, d = x.shape
    v = w.shape[0]
    rows, lse = (x.new_empty((n, positions), dtype=sl.acc) for _ in range(2))
    ent = x.new_empty((n, positions) if entropy else (0,), dtype=sl.acc)
    gx = torch.zeros_like(x) if grads else None
    gw = torch.zeros((v, d), dtype=acc_dtype(w.dtype), device=w.device) if grads else None
    gb = torch.zeros(v, dtype=acc_dtype(w.dtype), device=w.device) \
        if grads and b is not None else None
    for i in range(0, max(n, 1), chunk):  # no rows: one empty chunk, still exchanged
        xc, tc = x[i:i + chunk], target[i:i + chunk]
        logits = torch.mm(xc, w.t()) if b is None else torch.addmm(b, xc, w.t())
        logits = logits.view(xc.shape[0], -1, positions)
        # z in its own buffer: the statistics use it up, the gradient is then written there.
        z = sl.transform_into(logits, torch.empty_like(logits, dtype=sl.acc))
        m, sums, shift = sl.local_stats(z, tc, entropy)
        top, sums = sl.combine(m, sums, shift, entropy)
        rw = row_weight[i:i + chunk] if row_weight is not None else None
        rows[i:i + chunk], lse[i:i + chunk], e, coefs = sl.rows(tc, top, sums, rw, entropy)
        if entropy:
            ent[i:i + chunk] = e
        if grads:
            g = sl.grad_into(logits, z, tc, lse[i:i + chunk], coefs, loss_scale) \
                .view(xc.shape[0], v)
            gx[i:i + chunk] = torch.mm(g.to(x.dtype), w)
            gw.addmm_(g.t().to(gw.dtype), xc.to(gw.dtype))
            if gb is not None:
                gb += g.sum(0, dtype=gb.dtype)
    return rows, lse, ent, gx, gw, gb


class _VocabParallelLinearCrossEntropy(torch.autograd.Function):
    """linear_cross_entropy with linear_weight (and linear_bias) holding this rank's slice
    of the classes and input replicated. Reduced losses get their gradients in the
    forward; the backward scales them and all-reduces grad_input over the ranks (as
    Megatron's column-parallel head does). Reduction "none" runs the chunks again in the
    backward, each row's incoming gradient as its row weight."""

    @staticmethod
    def forward(ctx, x, w, b, sl, target, row_weight, loss_scale, reduction, positions,
                chunk, entropy):
        grads = reduction != 0 and any(ctx.needs_input_grad[:3])
        rows, lse, ent, gx, gw, gb = _linear_chunks(sl, x, w, b, target, row_weight,
                                                    loss_scale, positions, chunk, grads,
                                                    entropy)
        ctx.grads = (gx, gw, gb) if grads else None
        ctx.save_for_backward(x, w, b, target, row_weight)
        ctx.sl, ctx.positions, ctx.chunk = sl, positions, chunk
        ctx.mark_non_differentiable(lse, ent)
        out = rows if reduction == 0 else rows.sum() * loss_scale
        return out, lse, ent

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        first_order_only()
        x, w, b, target, row_weight = ctx.saved_tensors
        if ctx.grads is not None:
            gx, gw, gb = (g * grad_loss.to(g.dtype) if g is not None else None
                          for g in ctx.grads)
        else:
            rw = grad_loss.to(ctx.sl.acc).reshape(x.shape[0], ctx.positions)
            if row_weight is not None:
                rw = rw * row_weight
            ones = torch.ones((), dtype=ctx.sl.acc, device=x.device)
            gx, gw, gb = _linear_chunks(ctx.sl, x, w, b, target, rw, ones, ctx.positions,
                                        ctx.chunk, True, False)[3:]
        gx = all_reduce(gx, ctx.sl.group)  # every rank: the whole gradient of the input
        return (gx, gw.to(w.dtype), gb.to(b.dtype) if gb is not None else None,
                *(None,) * 8)


def linear_cross_entropy(x, w, b, target_k, weight, row_weight, loss_scale, o, n_classes,
                         positions, chunk_size, entropy, group):
    """Vocab-parallel linear cross-entropy: x (N, D) replicated, w (C_local * S, D) and b
    this rank's slice. Returns (loss, lse, entropy)."""
    n = x.shape[0]
    default = max(1, min(max(n, 1), CHUNK_ELEMENTS // max(w.shape[0], 1)))
    sl = VocabSlice(group, x, n_classes, [n, positions], o, weight, "linear_cross_entropy",
                    extra=[chunk_size or default])
    # The same chunks on every rank: the smallest proposal (a host read of the exchanged
    # sizes; on a GPU pass chunk_size to avoid its synchronisation).
    chunk = chunk_size or int(sl.extra[:, 0].min())
    sl.check_targets(target_k)
    target_k = target_k.view(n, n_classes, positions) if target_k.is_floating_point() \
        else target_k.view(n, positions)
    rw = row_weight.view(n, positions) if row_weight is not None else None
    return _VocabParallelLinearCrossEntropy.apply(x, w, b, sl, target_k, rw, loss_scale,
                                                  o.reduction, positions, chunk, entropy)


# ------------------------------------------------------------------------------ log-probs
# linear_log_probs with a process_group: linear_weight (and linear_bias) hold this rank's
# slice of the vocabulary, input and target are replicated. Per chunk of rows each rank
# folds its slice of z (fusedloss/log_probs.py's algebra) into a max, then the sums s, d,
# q, sum z and the target's z; one MAX and one SUM all-reduce of those few numbers per row
# give every rank the same outputs. The backward recomputes the chunk's slice of z, writes
# its gradient, and all-reduces grad_input (the column-parallel head's).
class LogProbsSlice:
    """This rank's slice of the vocabulary: where it starts and how many classes there are
    in all (device tensors: no host read), and the transform of its logits."""

    def __init__(self, group, x, n_local, transform, n_rows, chunk_size, default_chunk):
        self.group, self.transform = group, transform
        world, rank = check_group(group, x, "linear_log_probs")
        meta = exchange([n_local, n_rows, chunk_size or default_chunk], group, x.device)
        check_agree(meta[:, 1:2], ["the number of rows"], "linear_log_probs")
        sizes = meta[:, 0]
        self.offset, self.n_classes, self.n_local = sizes[:rank].sum(), sizes.sum(), n_local
        # The same chunks on every rank: the smallest proposal (a host read of the
        # exchanged sizes; on a GPU pass chunk_size to spare that synchronisation).
        self.chunk = chunk_size or int(meta[:, 2].min())

    def z(self, x, w, b, inv_t):
        """This rank's slice of z for the rows x, in the accumulation dtype."""
        logits = torch.mm(x, w.t()) if b is None else torch.addmm(b, x, w.t())
        return self.transform(logits.to(acc_dtype(x.dtype))) * inv_t[:, None]

    def held(self, target):
        """(local index, whether this rank holds the target) of each row."""
        local = target - self.offset
        held = (local >= 0) & (local < self.n_local)
        return local.clamp(0, max(self.n_local - 1, 0)), held

    def stats(self, z, target, top1):
        """Every rank's (lse, entropy, log_sum_sq, mean, z_t, is_top1) of the rows: two
        all-reduces of a few numbers per row (three with is_top1)."""
        m = z.amax(1) if self.n_local else z.new_full((z.shape[0],), float("-inf"))
        top = m.clone()
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=self.group)
        shift = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
        e = torch.exp(z - shift[:, None])
        local, held = self.held(target)
        z_t = z.gather(1, local[:, None]).squeeze(1) if self.n_local else torch.zeros_like(m)
        sums = torch.stack([e.sum(1), torch.where(e > 0, e * (shift[:, None] - z), 0).sum(1),
                            (e * e).sum(1), z.sum(1), torch.where(held, z_t, 0)])
        dist.all_reduce(sums, group=self.group)
        s, d, q, z_sum, z_t = sums
        log_s = torch.log(s)
        first = None
        if top1:  # the first index of the global max: the smallest over the ranks that hold it
            mine = (z == top[:, None]).int().argmax(1) + self.offset if self.n_local \
                else torch.zeros_like(target)
            first = torch.where(m == top, mine, self.n_classes)
            dist.all_reduce(first, op=dist.ReduceOp.MIN, group=self.group)
        return (shift + log_s, log_s + d / s, torch.log(q) - 2 * log_s,
                z_sum / self.n_classes.to(z.dtype), z_t, first)


class _VocabParallelLogProbs(torch.autograd.Function):
    """(log_probs, entropy, lse, log_sum_sq, mean, is_top1) of every row, chunk by chunk;
    the backward runs the chunks again with the upstream gradients."""

    @staticmethod
    def forward(ctx, x, w, b, sl, target, inv_t, want):
        n = x.shape[0]
        outs = [x.new_empty(n, dtype=acc_dtype(x.dtype)) for _ in range(5)]
        top1 = torch.zeros(n, dtype=torch.bool, device=x.device)
        for i in range(0, max(n, 1), sl.chunk):  # no rows: one empty chunk, still reduced
            rows = slice(i, i + sl.chunk)
            lse, ent, lsq, mean, z_t, first = sl.stats(
                sl.z(x[rows], w, b, inv_t[rows]), target[rows], want["is_top1"])
            for out, v in zip(outs, (z_t - lse, ent, lse, lsq, mean)):
                out[rows] = v
            if first is not None:
                top1[rows] = first == target[rows]
        ctx.save_for_backward(x, w, b, target, inv_t, outs[2], outs[1])
        ctx.sl = sl
        ctx.mark_non_differentiable(*outs[2:], top1)
        ctx.set_materialize_grads(False)
        return (*outs, top1)

    @staticmethod
    def backward(ctx, g, h, *unused):
        first_order_only()
        x, w, b, target, inv_t, lse, ent = ctx.saved_tensors
        sl = ctx.sl
        acc = lse.dtype
        gx = torch.zeros(x.shape, dtype=acc, device=x.device)
        gw = torch.zeros(w.shape, dtype=acc, device=w.device)
        gb = torch.zeros(w.shape[0], dtype=acc, device=w.device) if b is not None else None
        for i in range(0, x.shape[0], sl.chunk):
            rows = slice(i, i + sl.chunk)
            xc = x[rows]
            logits = torch.mm(xc, w.t()) if b is None else torch.addmm(b, xc, w.t())
            logits = logits.to(acc).requires_grad_()
            with torch.enable_grad():  # d z / d logits through the transform, by autograd
                z = sl.transform(logits) * inv_t[rows, None]
            p = torch.exp(z.detach() - lse[rows, None])
            dz = torch.zeros_like(p)
            if g is not None:
                local, held = sl.held(target[rows])
                gc = g[rows].to(acc)
                dz = dz - gc[:, None] * p
                if sl.n_local:  # an empty slice holds no target
                    dz.scatter_add_(1, local[:, None], torch.where(held, gc, 0)[:, None])
            if h is not None:
                terms = p * (z.detach() - lse[rows, None] + ent[rows, None])
                dz = dz - h[rows].to(acc)[:, None] * torch.where(p > 0, terms, 0)
            (dlogits,) = torch.autograd.grad(z, logits, dz)
            gx[rows] = dlogits @ w.to(acc)
            gw += dlogits.t() @ xc.to(acc)
            if gb is not None:
                gb += dlogits.sum(0)
        all_reduce(gx, sl.group)  # every rank: the whole gradient of the replicated input
        return (gx.to(x.dtype), gw.to(w.dtype), gb.to(b.dtype) if gb is not None else None,
                None, None, None, None)


def linear_log_probs(x, w, b, target, inv_t, transform, want, chunk_size, default_chunk,
                     group):
    """Vocab-parallel linear log-probs: x (N, D) and target (N,) replicated, w (V_local, D)
    and b this rank's slice; inv_t (N,) each row's inverse temperature. Returns the six
    outputs of fusedloss.log_probs (all computed)."""
    sl = LogProbsSlice(group, x, w.shape[0], transform, x.shape[0], chunk_size, default_chunk)
    if target.device.type == "cpu":  # free to check on the CPU (a host sync elsewhere)
        bad = (target < 0) | (target >= sl.n_classes)
        if bool(bad.any()):
            raise IndexError(f"target contains the class index {int(target[bad][0])}, "
                             f"outside [0, {int(sl.n_classes)}) (the classes of every rank)")
    return _VocabParallelLogProbs.apply(x, w, b, sl, target, inv_t, want)
