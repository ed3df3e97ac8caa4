"""The losses past one device, on torch.distributed: only the process group's own
collectives (gloo for CPU tensors, NCCL for CUDA ones), no communication layer of our own.

Vocab-parallel cross-entropy (cross_entropy and linear_cross_entropy with a
process_group): every rank holds a contiguous slice of the classes, in rank order (the
slices may differ in size). Per row only a few numbers cross ranks, never the logits:
each rank folds its slice into (m_r, s_r) and the sums below, and then

    m = max_r m_r,   s = sum_r s_r exp(m_r - m),   lse = m + log s
    z_t = sum_r (the target's logit where rank r holds it),  and for label smoothing
    sum_c w_c z_c; for probability targets sum_c w_c t'_c z_c and T = sum_c w_c t'_c

give every rank the same loss (the algebra of fusedloss/cross_entropy.py), and the
gradient of its own slice, dz_c = exp(z_c - lse) p_coef - w_c w_coef - [c == t] t_coef.

InfoNCE over every rank's batch: see info_nce_distributed.
"""
import math

import torch
import torch.distributed as dist

from . import _library
from ._library import acc_dtype

# Rows of logits handled at once by the torch-op parts below (4 Mi values): bounds the
# scratch of a chunk where it cannot be the gradient buffer.
CHUNK_ELEMENTS = 1 << 22


def check_group(group, tensor, what):
    """(world size, rank) of `group`, once it is sure to carry `tensor`'s device."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"fusedloss.{what}: process_group was given but torch.distributed "
                           "is not initialized (torch.distributed.init_process_group)")
    if tensor.device.type != "cuda" and dist.get_backend(group) == "nccl":
        raise RuntimeError(f"fusedloss.{what}: the process group runs nccl, which carries CUDA "
                           f"tensors only, and the input is on {tensor.device}; use a gloo "
                           "group for CPU tensors")
    return dist.get_world_size(group), dist.get_rank(group)


def exchange(values, group, device):
    """Every rank's few integers `values`, as a (world size, len(values)) int64 tensor."""
    mine = torch.tensor(values, dtype=torch.int64, device=device)
    out = mine.new_empty((dist.get_world_size(group), len(values)))
    dist.all_gather_into_tensor(out.view(-1), mine, group=group)
    return out


def check_agree(meta, names, what):
    """Raise alike on every rank where ranks disagree on a value that must match. Reading
    the exchanged values costs nothing on the CPU; on a GPU it would synchronise the
    host, so there the check is skipped (a mismatch then fails inside a collective)."""
    if meta.device.type != "cpu":
        return
    for j, name in enumerate(names):
        column = meta[:, j]
        if bool((column != column[0]).any()):
            raise ValueError(f"fusedloss.{what}: the ranks of process_group disagree on "
                             f"{name}: {column.tolist()}; it must be the same on every rank")


# ------------------------------------------------------------------------------ vocab slices
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
        m = z.amax(1)
        shift = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        sums = []
        if not target.is_floating_point():
            local, held = self.targets(target)[:2]
            z_t = z.gather(1, local[:, None]).squeeze(1)
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
            out.scatter_add_(1, local[:, None], -torch.where(held, t_coef,
                                                             torch.zeros_like(t_coef))[:, None])
            out.masked_fill_((target == self.o.ignore_index)[:, None], 0)
        else:
            out.sub_(self.soft_targets(target) * w_coef[:, None])
        out.mul_(self.o.logit_scale)
        if dz_dx is not None:
            out.mul_(dz_dx)
        return out


def _first_order_only():
    """A backward run with create_graph=True asks for gradients these Functions cannot
    differentiate."""
    if torch.is_grad_enabled():
        raise RuntimeError("fusedloss: higher-order gradients (create_graph=True) are not "
                           "available with a process_group")


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
        _first_order_only()
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
            g = sl.grad_into(logits, z, tc, lse[i:i + chunk], coefs, loss_scale).view(-1, v)
            gx[i:i + chunk] = torch.mm(g.to(x.dtype), w)
            gw.addmm_(g.t().to(gw.dtype), xc.to(gw.dtype))
            if gb is not None:
                gb += g.sum(0, dtype=gb.dtype)
    return rows, lse, ent, gx, gw, gb


def _all_reduce(t, group):
    dist.all_reduce(t, group=group)
    return t


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
        _first_order_only()
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
        gx = _all_reduce(gx, ctx.sl.group)  # every rank: the whole gradient of the input
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


# ------------------------------------------------------------------------------ InfoNCE
class _AllGather(torch.autograd.Function):
    """Every rank's rows, concatenated in rank order, with gradients: the backward sums
    each rank's gradient of the gathered rows and hands every rank its own (a
    reduce-scatter), so that gradients reach the rows' owners."""

    @staticmethod
    def forward(ctx, t, group):
        ctx.group = group
        out = t.new_empty((dist.get_world_size(group) * t.shape[0], *t.shape[1:]))
        dist.all_gather_into_tensor(out, t.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        _first_order_only()  # the reduce-scatter is not differentiable
        out = grad.new_empty((grad.shape[0] // dist.get_world_size(ctx.group),
                              *grad.shape[1:]))
        dist.reduce_scatter_tensor(out, grad.contiguous(), group=ctx.group)
        return out, None


def _ring_step(tensors, group, rank, world):
    """Send `tensors` to the next rank of the ring and receive the previous rank's."""
    if world == 1:
        return tensors
    nxt = dist.get_global_rank(group, (rank + 1) % world)
    prv = dist.get_global_rank(group, (rank - 1) % world)
    incoming = [torch.empty_like(t) for t in tensors]
    ops = [dist.P2POp(dist.isend, t.contiguous(), nxt, group) for t in tensors] + \
        [dist.P2POp(dist.irecv, t, prv, group) for t in incoming]
    for req in dist.batch_isend_irecv(ops):
        req.wait()
    return incoming


def _pick(tile, j):
    """tile[i, j_i] where 0 <= j_i < columns, else 0."""
    if tile.shape[1] == 0:
        return tile.new_zeros(tile.shape[0])
    held = (j >= 0) & (j < tile.shape[1])
    picked = tile.gather(1, j.clamp(0, tile.shape[1] - 1)[:, None]).squeeze(1)
    return torch.where(held, picked, torch.zeros_like(picked))


def _fold(m, s, logits):
    """Fold a [rows, cols] tile into each row's running max m and sum s of exp(z - m)."""
    m_new = torch.maximum(m, logits.amax(1)) if logits.shape[1] else m
    shift = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))
    s = s * torch.exp(m - shift) + torch.exp(logits - shift[:, None]).sum(1)
    return m_new, s


class _RingInfoNCE(torch.autograd.Function):
    """InfoNCE with key (and negative, and for the symmetric loss query) blocks passed
    around the ring: a rank holds at most its own blocks, the block it works on and the
    one arriving, so memory stays O(local N x D) beyond one [N, M] tile of logits. The
    backward passes the blocks around again with accumulators of their gradients, which
    arrive back at their owners after a full turn (as Inf-CL does)."""

    @staticmethod
    def forward(ctx, q, k, neg, scale, labels, group, symmetric):
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        acc = acc_dtype(q.dtype)
        n, m_keys, e = q.shape[0], k.shape[0], neg.shape[0]
        sc = scale.to(acc)
        qa, ka = q.to(acc), k.to(acc)
        row_m = torch.full((n,), -math.inf, dtype=acc, device=q.device)
        row_s, pos = torch.zeros_like(row_m), torch.zeros_like(row_m)
        col_m = torch.full((m_keys if symmetric else 0,), -math.inf, dtype=acc,
                           device=q.device)
        col_s, diag = torch.zeros_like(col_m), torch.zeros_like(col_m)
        blocks = [k, neg, q if symmetric else q[:0]]
        for step in range(world):
            src = (rank - step) % world
            kb, eb, qb = (b.to(acc) for b in blocks)
            for tile, first in ((sc * qa @ kb.T, src * m_keys),
                                (sc * qa @ eb.T, world * m_keys + src * e)):
                row_m, row_s = _fold(row_m, row_s, tile)
                pos += _pick(tile, labels - first)
            if symmetric:
                tile = sc * ka @ qb.T  # local keys against that rank's queries
                col_m, col_s = _fold(col_m, col_s, tile)
                if src == rank:
                    diag = tile.diagonal().clone()
            if step < world - 1:
                blocks = _ring_step(blocks, group, rank, world)
        row_lse = row_m + torch.log(row_s)
        valid = (labels >= 0) & (labels < world * (m_keys + e))
        row_loss = torch.where(valid, row_lse - pos, torch.full_like(pos, math.nan))
        col_lse = col_m + torch.log(col_s)
        ctx.save_for_backward(q, k, neg, scale, labels, row_lse, col_lse)
        ctx.group, ctx.symmetric = group, symmetric
        return row_loss, col_lse - diag

    @staticmethod
    def backward(ctx, grad_row, grad_col):
        _first_order_only()
        q, k, neg, scale, labels, row_lse, col_lse = ctx.saved_tensors
        group, symmetric = ctx.group, ctx.symmetric
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        acc = row_lse.dtype
        m_keys, e = k.shape[0], neg.shape[0]
        sc = scale.to(acc)
        qa, ka = q.to(acc), k.to(acc)
        g_row = grad_row.to(acc) if grad_row is not None else torch.zeros_like(row_lse)
        g_col = grad_col.to(acc) if grad_col is not None and symmetric \
            else torch.zeros_like(col_lse)
        dq, dk = torch.zeros_like(qa), torch.zeros_like(ka)
        d_scale = torch.zeros((), dtype=acc, device=q.device)
        blocks = [ka, neg.to(acc), qa if symmetric else qa[:0]]
        # Rows whose label is outside every rank's keys have a NaN loss, and gradient.
        bad = ~((labels >= 0) & (labels < world * (m_keys + e)))
        # Gradients of the held blocks' rows, from this rank's losses: they travel with
        # the blocks and are home after a full turn.
        held = [torch.zeros_like(b) for b in blocks]
        for step in range(world):
            src = (rank - step) % world
            kb, eb, qb = blocks
            for b_i, (tile_rows, first) in enumerate(((kb, src * m_keys),
                                                      (eb, world * m_keys + src * e))):
                raw = qa @ tile_rows.T
                dl = g_row[:, None] * torch.exp(sc * raw - row_lse[:, None])
                j = labels - first
                hit = (j >= 0) & (j < tile_rows.shape[0])
                if tile_rows.shape[0]:
                    dl.scatter_add_(1, j.clamp(0, tile_rows.shape[0] - 1)[:, None],
                                    -torch.where(hit, g_row, torch.zeros_like(g_row))[:, None])
                dl = torch.where(bad[:, None], math.nan, dl)
                dq += sc * dl @ tile_rows
                held[b_i] += sc * dl.T @ qa
                d_scale += (dl * raw).sum()
            if symmetric:
                raw = ka @ qb.T  # local keys (columns' owners) against that rank's queries
                dl = g_col[:, None] * torch.exp(sc * raw - col_lse[:, None])
                if src == rank:
                    dl.diagonal().sub_(g_col)
                dk += sc * dl @ qb
                held[2] += sc * dl.T @ ka
                d_scale += (dl * raw).sum()
            # The blocks and their accumulators move on; after the last step only the
            # accumulators, which then arrive home.
            if step < world - 1:
                moved = _ring_step(blocks + held, group, rank, world)
                blocks, held = moved[:3], moved[3:]
            else:
                held = _ring_step(held, group, rank, world)
        if symmetric:
            dq += held[2]
        dk += held[0]
        return (dq.to(q.dtype), dk.to(k.dtype), held[1].to(neg.dtype),
                d_scale.to(scale.dtype).reshape(scale.shape), None, None, None)


def info_nce(query, key, negatives, labels, scale, symmetric, mode, group, fn):
    """InfoNCE of this rank's queries against every rank's keys (and negatives): the
    per-row losses (row, and col when symmetric) of this rank. mode: "all_gather" or
    "ring"; fn: the single-device fusedloss.info_nce (all_gather runs its kernels)."""
    world, rank = check_group(group, query, "info_nce")
    n, m_keys = query.shape[0], key.shape[0]
    e = negatives.shape[0] if negatives is not None else 0
    meta = exchange([n, m_keys, e, query.shape[1]], group, query.device)
    check_agree(meta, ["the number of queries", "the number of keys",
                       "the number of negatives", "the embedding dimension D"], "info_nce")
    if labels is None:
        labels = torch.arange(n, device=query.device) + rank * m_keys
    elif labels.device.type == "cpu":
        bad = (labels < 0) | (labels >= world * (m_keys + e))
        if bool(bad.any()):
            raise IndexError(f"labels contains {int(labels[bad][0])}, outside [0, "
                             f"{world * (m_keys + e)}) (every rank's keys, then every rank's "
                             "negatives)")
    if mode == "ring":
        neg = negatives if negatives is not None else query.new_empty((0, query.shape[1]))
        return _RingInfoNCE.apply(query, key, neg, scale, labels, group, symmetric)
    keys = _AllGather.apply(key, group)
    negs = _AllGather.apply(negatives, group) if negatives is not None else None
    rows = fn(query, keys, logit_scale=scale, labels=labels, negatives=negs, reduction="none")
    if not symmetric:
        return rows, rows.new_empty((0,))
    queries = _AllGather.apply(query, group)
    cols = fn(key, queries, logit_scale=scale,
              labels=torch.arange(m_keys, device=query.device) + rank * n, reduction="none")
    return rows, cols


# ------------------------------------------------------------------------------ SigLIP
class _RingSigLip(torch.autograd.Function):
    """SigLIP with the text blocks passed around the ring. The forward adds up this
    rank's image rows against each visiting block; the backward passes the blocks around
    again, each with the accumulator of its gradient from the images it met, which is
    home after a full turn (the incoming gradient of each rank's loss is only known then,
    so the tiles are computed again). A rank holds its own features, the block it works on
    and the one arriving: memory O(N x D) whatever the number of ranks. Each step runs the
    backend's tiles (fusedloss.siglip.pair_terms)."""

    @staticmethod
    def forward(ctx, image, text, scale, bias, group, reduction, backend):
        from .siglip import pair_terms
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        n = image.shape[0]
        rows, block = None, text
        for step in range(world):
            # Only this rank's own block holds its images' positives (diagonal 0); for the
            # others, diagonal n puts every positive past the last column.
            diagonal = 0 if (rank - step) % world == rank else n
            r = pair_terms(backend, image, block, scale, bias, diagonal)[0]
            rows = r if rows is None else rows + r
            if step < world - 1:
                (block,) = _ring_step([block], group, rank, world)
        ctx.save_for_backward(image, text, scale, bias)
        ctx.group, ctx.reduction, ctx.backend = group, reduction, backend
        return rows if reduction == 0 else rows.sum() / (n if reduction == 1 else 1)

    @staticmethod
    def backward(ctx, grad):
        from .siglip import pair_terms
        _first_order_only()
        image, text, scale, bias = ctx.saved_tensors
        group = ctx.group
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        n, acc = image.shape[0], acc_dtype(image.dtype)
        row_weight = grad.to(acc)
        if ctx.reduction != 0:
            row_weight = (row_weight / n if ctx.reduction == 1 else row_weight).expand(n)
        want = ctx.needs_input_grad[:4]
        total = [None] * 4  # image, text (the visiting block's), logit_scale, logit_bias
        block = text
        for step in range(world):
            diagonal = 0 if (rank - step) % world == rank else n
            got = pair_terms(ctx.backend, image, block, scale, bias, diagonal,
                             row_weight.contiguous(), want)[1:]
            for i, g in enumerate(got):
                if g is not None:
                    total[i] = g.to(acc) if total[i] is None else total[i] + g.to(acc)
            # The block moves on with the gradient it has gathered; after the last step
            # only the gradient, which then arrives home.
            moving = ([block] if step < world - 1 else []) + ([total[1]] if want[1] else [])
            if moving:
                moved = _ring_step(moving, group, rank, world)
                if step < world - 1:
                    block = moved.pop(0)
                if want[1]:
                    total[1] = moved[0]
        return (*(t.to(x.dtype).reshape(x.shape) if t is not None else None
                  for t, x in zip(total, (image, text, scale, bias))), None, None, None)


def siglip(image, text, scale, bias, reduction, mode, group, backend):
    """SigLIP of this rank's images against every rank's texts: this rank's loss (see
    fusedloss.siglip_loss). mode: "all_gather" (the texts gathered with their gradients,
    then this backend's single-device loss) or "ring"."""
    from . import _backends, _checks
    from . import siglip as single
    _, rank = check_group(group, image, "siglip_loss")
    n = image.shape[0]
    meta = exchange([n, image.shape[1]], group, image.device)
    check_agree(meta, ["the number of pairs N", "the feature dimension D"], "siglip_loss")
    if mode == "ring":
        name = _backends.resolve(single.SIGLIP, backend, image.device)
        return _RingSigLip.apply(image, text, scale, bias, group,
                                 _checks.reduction_code(reduction), name) \
            .to(_library.loss_dtype(image))
    texts = _AllGather.apply(text, group)
    return single.local_loss(image, texts, scale, bias, reduction, rank * n, backend)
