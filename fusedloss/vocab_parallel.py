"""Vocab-parallel losses: the cross-rank code of cross_entropy, linear_cross_entropy,
log_probs and linear_log_probs over a process group (or a DTensor sharded on the classes,
fusedloss/_dtensor.py). Every rank holds a contiguous slice of the classes, in rank order
(slices may differ in size, or be empty). Each rank does the work of one device on its
slice, with the same kernels: the log-probs row ops (fusedloss/log_probs.py, every
backend), over the slice's logits or, chunk by chunk, over its rows of the LM head.

  1. One pass over the slice: the log-probs forward op gives each row's lse_r (and, where
     asked, its entropy H_r, log sum p^2 lsq_r and mean of z); a gather gives the
     target's z_t on the rank that holds it.
  2. One MAX and one SUM all-reduce of a few numbers per row:
        M = max_r lse_r,  e_r = exp(lse_r - M),  S = sum_r e_r,  lse = M + log S
        H = log S + sum_r e_r (H_r + M - lse_r) / S         (every term >= 0)
        log sum p^2 = log sum_r e_r^2 exp(lsq_r) - 2 log S,   sum_c z_c = sum_r V_r mean_r
     with z_t, and sum_c a_c z_c where a loss needs one (probability targets and
     class-weighted label smoothing: a torch pass over the slice).
  3. Every rank computes the same losses from these (fusedloss/cross_entropy.py's algebra).
  4. One pass writes the slice's gradient: the log-probs backward op,
        dz_c = g [c == t] + (k - g) p_c - h p_c (z_c - lse + H) + u / V_r,
     carries every loss here with per-row g, k, h, u (g = 0 where this rank does not hold
     t); the a_c terms add - a_c dz_c/dx_c in torch. A reduced cross-entropy writes it in
     the forward (over the logits with inplace_backward), as on one device.

linear heads: input replicated; the backward returns this rank's share of grad_input, all-
reduced over the group (a DTensor layer may instead leave it pending, for a reduce-scatter).
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import _backends, _library, reference
from ._collectives import all_reduce, check_agree, check_group, exchange, first_order_only
from ._library import acc_dtype

# The log-probs row ops, looked up by name (fusedloss/log_probs.py defines them and calls
# this module).
_OPS = {"rows": ("log_probs", "log_probs_grad", "log_probs_grad_inplace"),
        "head": ("linear_log_probs", "linear_log_probs_grad")}
# Rows of the slice's z held at once by the torch passes (4 Mi values).
CHUNK_ELEMENTS = 1 << 22


def _op(name):
    return _library.OPS[name]


# ------------------------------------------------------------------------------ the slice
class Slice:
    """This rank's classes [offset, offset + n_local) of n_classes in all, on `group`.
    offset and n_classes are ints (from a DTensor's spec) or 0-dim device tensors (from
    an exchange): nothing here reads them on the host."""

    def __init__(self, group, offset, n_classes, n_local, reduce_input_grad=True):
        self.group, self.offset, self.n_classes, self.n_local = group, offset, n_classes, n_local
        # linear heads: all-reduce grad_input here, or leave each rank its share (the
        # DTensor layer then reduces it: a reduce-scatter for a sequence-parallel input)
        self.reduce_input_grad = reduce_input_grad

    @classmethod
    def exchanged(cls, group, like, n_local, rows, what):
        """The slice of a process_group call: the ranks' sizes exchanged (one all-gather).
        On CPU tensors in eager mode, ranks that disagree on the rows raise alike."""
        world, rank = check_group(group, like, what)
        meta = exchange([n_local, rows], group, like.device)
        if not torch.compiler.is_compiling():
            check_agree(meta[:, 1:], ["the number of rows"], what)
        sizes = meta[:, 0]
        return cls(group, sizes[:rank].sum(), sizes.sum(), n_local)

    @classmethod
    def of(cls, group, like, n_local, rows, what):
        """`group` itself when it is a Slice already (the DTensor layer's, from the spec),
        else the slice exchanged over the process group."""
        if isinstance(group, Slice):
            return group
        return cls.exchanged(group, like, n_local, rows, what)

    def targets(self, target, ignore_index):
        """For global class indices (N,): (the local ops' targets: the local index where
        held, 0 where another rank holds it, -1 where ignored; held; counted; bad)."""
        local = target - self.offset
        held = (local >= 0) & (local < self.n_local)
        counted = target != ignore_index
        bad = counted & ((target < 0) | (target >= self.n_classes))
        local = torch.where(held, local, torch.zeros_like(local))
        return torch.where(counted, local, torch.full_like(local, -1)), held & counted, \
            counted, bad

    def check_targets(self, target, ignore_index):
        """Class indices outside every rank's classes raise where reading them is free
        (CPU tensors, eager); elsewhere their rows get a NaN loss and gradient."""
        if target.device.type != "cpu" or torch.compiler.is_compiling():
            return
        bad = (target != ignore_index) & ((target < 0) | (target >= self.n_classes))
        if bool(bad.any()):
            raise IndexError(f"target contains the class index {int(target[bad][0])}, outside "
                             f"[0, {int(self.n_classes)}) (the classes of every rank) and not "
                             f"ignore_index ({ignore_index})")

    def combine(self, lse_r, z_t, ent_r=None, lsq_r=None, sums=()):
        """Step 2 above: (lse, z_t, H or None, log sum p^2 or None, the summed `sums`)."""
        top = lse_r.clone()
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=self.group)
        m = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
        e = torch.exp(lse_r - m)
        parts = [e, z_t, *sums]
        if ent_r is not None:
            parts.append(torch.where(e > 0, e * (ent_r + m - lse_r), torch.zeros_like(e)))
        if lsq_r is not None:
            parts.append(e * e * torch.exp(lsq_r))
        total = torch.stack(parts)
        dist.all_reduce(total, group=self.group)
        s, z_t, *rest = total
        log_s = torch.log(s)
        ent = log_s + rest[len(sums)] / s if ent_r is not None else None
        lsq = torch.log(rest[-1]) - 2 * log_s if lsq_r is not None else None
        return m + log_s, z_t, ent, lsq, rest[:len(sums)]


# ------------------------------------------------------------------------------ sources
class _Source:
    """What a slice of classes shares, logits or rows of a head: its transform
    z = inv_t softcap(logit_scale x) (inv_t: (N,) acc), the row ops' arguments, and the
    statistics of step 1 (`run_stats`: the source's forward op)."""

    def __init__(self, x, n_local, backend, op, logit_scale, softcap, inv_t):
        self.x, self.n_local = x, n_local
        self.logit_scale, self.softcap, self.inv_t = logit_scale, softcap, inv_t
        self.acc = acc_dtype(x.dtype)
        self.name = _backends.resolve(_op(op), backend, x.device)

    def _row_args(self, target):
        return dict(target=target, row_inv_temperature=self.inv_t, inv_temperature=1.0,
                    logit_scale=self.logit_scale, softcap=self.softcap or 0.0, ignore_index=-1)

    def z(self, x, inv_t):
        return reference.transform_logits(x.to(self.acc), self.logit_scale,
                                          self.softcap) * inv_t[:, None]

    def dz_dx(self, x, inv_t):
        """dz/dx of the rows x, in acc."""
        return reference.transform_grad(x.to(self.acc), self.logit_scale,
                                        self.softcap) * inv_t[:, None]

    def stats(self, target, entropy, log_sum_sq, mean):
        """(lse_r, H_r, lsq_r, mean_r) of the slice's rows (None where not asked)."""
        n = self.x.shape[0]
        if self.n_local == 0:  # no classes: adds nothing (e_r = 0)
            lse = self.x.new_full((n,), float("-inf"), dtype=self.acc)
            zero = torch.zeros_like(lse)
            return lse, zero if entropy else None, zero if log_sum_sq else None, \
                zero if mean else None
        outs = self.run_stats(target, entropy, log_sum_sq, mean)
        return outs[2], outs[1] if entropy else None, outs[3] if log_sum_sq else None, \
            outs[4] if mean else None


class Rows(_Source):
    """This rank's slice of logits x (N, V_local), contiguous."""

    def __init__(self, x, backend, logit_scale, softcap, inv_t):
        super().__init__(x, x.shape[1], backend, "log_probs", logit_scale, softcap, inv_t)

    def run_stats(self, target, entropy, log_sum_sq, mean):
        if self.name == "reference":
            return reference.log_probs_rows(self.x, target, self.inv_t, self.logit_scale,
                                            self.softcap, -1)
        return _op("log_probs").call(self.name, x=self.x, **self._row_args(target),
                                     compute_entropy=entropy, compute_log_sum_sq=log_sum_sq,
                                     compute_mean=mean, compute_top1=False)

    def target_logit(self, local):
        """z of each row's class `local` (N,), in acc."""
        if self.n_local == 0:
            return torch.zeros(local.shape, dtype=self.acc, device=self.x.device)
        x_t = self.x.gather(1, local.clamp(min=0)[:, None])
        return self.z(x_t, self.inv_t)[:, 0]

    def row_chunks(self):
        """Slices of rows holding about CHUNK_ELEMENTS of the slice, for the torch passes."""
        step = max(1, CHUNK_ELEMENTS // max(self.n_local, 1))
        return [slice(i, i + step) for i in range(0, self.x.shape[0], step)]

    def z_chunks(self):
        """(rows, the slice's z of those rows) chunk by chunk."""
        for rows in self.row_chunks():
            yield rows, self.z(self.x[rows], self.inv_t[rows])

    def grad(self, target, lse, ent, g, h, k, u, terms, inplace=False):
        """d/dx of the slice (step 4), into a new buffer or over x itself; `terms(rows)`:
        the a_c of those rows (or None)."""
        if self.n_local == 0:
            return self.x if inplace else torch.zeros_like(self.x)
        # The terms read x: before the gradient may be written over it.
        term_grads = self._term_grads(terms) if terms is not None else ()
        args = dict(x=self.x, **self._row_args(target), lse=lse, entropy=ent,
                    grad_log_probs=g, grad_entropy=h, grad_lse=k, grad_mean_logits=u)
        if self.name == "reference":
            out = reference.log_probs_grad_rows(**args)
            grad = self.x.copy_(out) if inplace else out
        elif inplace:
            _op("log_probs_grad_inplace").call(self.name, **args)
            grad = self.x
        else:
            grad = _op("log_probs_grad").call(self.name, **args)
        for rows, dz in term_grads:
            grad[rows] -= dz.to(grad.dtype)
        return grad

    def _term_grads(self, terms):
        """(rows, a_c dz_c/dx_c) chunk by chunk."""
        return [(rows, terms(rows) * self.dz_dx(self.x[rows], self.inv_t[rows]))
                for rows in self.row_chunks()]


class Head(_Source):
    """This rank's rows W (V_local, D) (and b) of an LM head over the replicated input x
    (N, D), their logits never whole (the linear ops' chunks)."""

    def __init__(self, x, w, b, backend, logit_scale, softcap, inv_t, chunk_size):
        super().__init__(x, w.shape[0], backend, "linear_log_probs", logit_scale, softcap,
                         inv_t)
        self.w, self.b, self.chunk_size = w, b, chunk_size

    def run_stats(self, target, entropy, log_sum_sq, mean):
        if self.name == "reference":
            return reference.linear_log_probs(self.x, self.w, self.b, target, self.inv_t,
                                              self.logit_scale, self.softcap, -1,
                                              self.chunk_size)
        return _op("linear_log_probs").call(
            self.name, input=self.x, linear_weight=self.w, linear_bias=self.b,
            chunk_size=self.chunk_size, **self._row_args(target), compute_entropy=entropy,
            compute_log_sum_sq=log_sum_sq, compute_mean=mean, compute_top1=False)

    def target_logit(self, local):
        if self.n_local == 0:
            return torch.zeros(local.shape, dtype=self.acc, device=self.x.device)
        idx = local.clamp(min=0)
        logit = (self.x.to(self.acc) * self.w[idx].to(self.acc)).sum(1)
        if self.b is not None:
            logit = logit + self.b[idx].to(self.acc)
        # rounded as the product the kernels read is (the input's dtype)
        return self.z(logit.to(self.x.dtype)[:, None], self.inv_t)[:, 0]

    def z_chunks(self):
        for i in range(0, self.x.shape[0], self.chunk_size):
            rows = slice(i, i + self.chunk_size)
            yield rows, self.z(F.linear(self.x[rows], self.w, self.b), self.inv_t[rows])

    def grad(self, target, lse, ent, g, h, k, u, terms, want):
        """(grad_input (this rank's share), grad_weight, grad_bias), as `want`s."""
        if self.n_local == 0:
            return (torch.zeros_like(self.x) if want[0] else None,
                    torch.zeros_like(self.w) if want[1] else None,
                    torch.zeros_like(self.b) if want[2] and self.b is not None else None)
        if self.name == "reference":  # the whole slice's logits, in torch ops
            rows = Rows(F.linear(self.x, self.w, self.b), "reference", self.logit_scale,
                        self.softcap, self.inv_t)
            dlogits = rows.grad(target, lse, ent, g, h, k, u, terms)
            return self._through_linear(dlogits, slice(None), want)
        got = _op("linear_log_probs_grad").call(
            self.name, input=self.x, linear_weight=self.w, linear_bias=self.b,
            chunk_size=self.chunk_size, **self._row_args(target), lse=lse, entropy=ent,
            grad_log_probs=g, grad_entropy=h, grad_lse=k, grad_mean_logits=u,
            grad_input=want[0], grad_weight=want[1],
            grad_bias=want[2] and self.b is not None)
        gx, gw, gb = (v if w and v.numel() else None for v, w in zip(got, want))
        if terms is not None:  # - a_c dz/dx_c through the chunks' logits, in torch
            for i in range(0, self.x.shape[0], self.chunk_size):
                rows = slice(i, i + self.chunk_size)
                logits = F.linear(self.x[rows], self.w, self.b)
                d = self._through_linear(terms(rows) * self.dz_dx(logits, self.inv_t[rows]),
                                         rows, want)
                if gx is not None:
                    gx[rows] -= d[0]
                for acc_grad, v in ((gw, d[1]), (gb, d[2])):
                    if acc_grad is not None:
                        acc_grad -= v
        return gx, gw, gb

    def _through_linear(self, dlogits, rows, want):
        """(d/dx, d/dW, d/db) of the rows' logits x W^T + b for their gradient dlogits."""
        x = self.x[rows]
        return (((dlogits @ self.w.to(dlogits.dtype)).to(x.dtype)) if want[0] else None,
                ((dlogits.t() @ x.to(dlogits.dtype)).to(self.w.dtype)) if want[1] else None,
                dlogits.sum(0).to(self.b.dtype) if want[2] and self.b is not None else None)


# ------------------------------------------------------------------------------ losses
class CrossEntropyRows:
    """The cross-entropy algebra of fusedloss/cross_entropy.py over a vocab-parallel
    source: forward() gives each row's loss (and lse, entropy); coefs(G) the gradient's
    per-row g, k, u and the a_c terms for upstream gradients G of the rows' losses."""

    def __init__(self, sl, src, target, weight, row_weight, o, entropy):
        self.sl, self.src, self.o, self.entropy = sl, src, o, entropy
        self.acc = src.acc
        self.row_weight = row_weight
        self.weight = weight.to(self.acc) if weight is not None else None
        self.prob = target.is_floating_point()
        self.target = target
        n_local = src.n_local
        self.weight_local = None
        if weight is not None:  # clamped: a weight of the wrong size never reads out of range
            idx = (torch.arange(n_local, device=weight.device) + sl.offset).clamp(
                max=weight.shape[0] - 1)
            self.weight_local = self.weight.index_select(0, idx)
        if self.prob:
            n = target.shape[0]
            self.tk = torch.zeros(n, dtype=torch.long, device=target.device)
            self.held = torch.zeros(n, dtype=torch.bool, device=target.device)
            self.valid, self.bad = ~self.held, torch.zeros_like(self.held)  # every row counts
        else:
            self.tk, self.held, counted, self.bad = sl.targets(target, o.ignore_index)
            self.valid = counted & ~self.bad

    def soft(self, rows):
        """w_c t'_c of the rows (probability targets)."""
        eps = self.o.label_smoothing
        t = self.target[rows].to(self.acc) * (1 - eps) + eps / self.n_classes
        return t * self.weight_local if self.weight_local is not None else t

    @property
    def n_classes(self):
        c = self.sl.n_classes
        return c.to(self.acc) if isinstance(c, torch.Tensor) else float(c)

    def a_terms(self):
        """The rows' a_c where the loss needs sum_c a_c z_c from a torch pass: w_c t'_c for
        probability targets, w_c for class-weighted smoothing; else None."""
        if self.prob:
            return self.soft
        if self.o.label_smoothing > 0 and self.weight_local is not None:
            return lambda rows: self.weight_local.expand(self.target[rows].shape[0], -1)
        return None

    def forward(self):
        o, eps, src = self.o, self.o.label_smoothing, self.src
        terms = self.a_terms()
        smooth_mean = not self.prob and eps > 0 and self.weight_local is None
        # Ignored rows too: their lse and entropy are returned (their gradient is 0).
        lse_r, ent_r, _, mean_r = src.stats(self.tk.clamp(min=0), self.entropy, False,
                                            smooth_mean)
        z_t = torch.where(self.held, src.target_logit(self.tk), torch.zeros_like(lse_r))
        sums = []
        if terms is not None:  # sum_c a_c z_c (and, for probability targets, sum_c a_c)
            az, a_sum = torch.zeros_like(lse_r), torch.zeros_like(lse_r)
            for rows, z in src.z_chunks():
                a = terms(rows)
                az[rows], a_sum[rows] = (a * z).sum(1), a.sum(1)
            sums += [az, a_sum] if self.prob else [az]
        if smooth_mean:
            sums.append(mean_r * src.n_local)
        lse, z_t, ent, _, sums = self.sl.combine(lse_r, z_t, ent_r, None, sums)
        self.lse, self.ent = lse, ent
        if self.prob:
            az, total = sums
            self.total = total
            loss = total * lse - az + o.z_loss * lse * lse
        else:
            w_t = self.w_t()
            loss = (1 - eps) * w_t * (lse - z_t)
            if eps > 0:
                w_sum = self.weight.sum() if self.weight is not None else self.n_classes
                wz = sums[0]  # sum_c w_c z_c
                loss = loss + eps / self.n_classes * (w_sum * lse - wz)
            loss = loss + o.z_loss * w_t * lse * lse
            nan = torch.full_like(loss, float("nan"))
            loss = torch.where(self.valid, loss,
                               torch.where(self.bad, nan, torch.zeros_like(loss)))
        if self.row_weight is not None:
            loss = loss * self.row_weight
        return loss, lse, ent

    def w_t(self):
        if self.weight is None:
            return self.valid.to(self.acc)
        w = self.weight[self.target.clamp(0, self.weight.shape[0] - 1)]
        return torch.where(self.valid, w, torch.zeros_like(w))

    def coefs(self, grad_loss, grad_entropy=None):
        """(g, k, h, u, terms) of the log-probs backward op for upstream gradients
        grad_loss (N,) of the rows' losses (and grad_entropy of the entropy)."""
        o, eps = self.o, self.o.label_smoothing
        G = grad_loss * self.row_weight if self.row_weight is not None else grad_loss
        lse = self.lse
        u, terms = None, None
        if self.prob:
            g = torch.zeros_like(G)
            k = G * (self.total + 2 * o.z_loss * lse)
            soft = self.soft
            terms = lambda rows: soft(rows) * G[rows, None]  # noqa: E731
        else:
            w_t = self.w_t()
            keep = (1 - eps) * w_t
            p_coef = keep + 2 * o.z_loss * w_t * lse
            if eps > 0:
                w_sum = self.weight.sum() if self.weight is not None else self.n_classes
                p_coef = p_coef + eps * w_sum / self.n_classes
                const = torch.where(self.valid, G * eps / self.n_classes, torch.zeros_like(G))
                if self.weight_local is None:
                    u = -const * self.src.n_local
                else:
                    wl = self.weight_local
                    terms = lambda rows: wl * const[rows, None]  # noqa: E731
            g = torch.where(self.held, -G * keep, torch.zeros_like(G))
            k = torch.where(self.valid, G * p_coef + g, torch.zeros_like(G))
            k = torch.where(self.bad, torch.full_like(k, float("nan")), k)
        h = grad_entropy
        return g, k, h, u, terms


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """cross_entropy / linear_cross_entropy over a vocab-parallel source. The rows'
    losses (reduction "none") or their scaled sum; a reduced loss gets its gradients in
    the forward (over the logits with `inplace`), which the backward scales."""

    @staticmethod
    def forward(ctx, loss, scale, inplace, *tensors):
        rows, lse, ent = loss.forward()
        ctx.loss, ctx.scale = loss, scale
        # The entropy's gradient is known in the backward only: then all of it runs there.
        ctx.eager = scale is not None and not (loss.entropy and any(ctx.needs_input_grad[3:]))
        ctx.grads = None
        if ctx.eager and any(ctx.needs_input_grad[3:]):
            G = torch.where(loss.valid, scale.expand_as(rows), torch.zeros_like(rows))
            ctx.grads = _source_grads(loss, ctx.needs_input_grad[3:], G, None, inplace)
            if inplace:
                torch.autograd.graph.increment_version(tensors[0])
            for g in ctx.grads:
                if g is not None:
                    _library.owned(g)
        out = rows if scale is None else rows.sum() * scale
        ctx.mark_non_differentiable(lse)
        return out, lse, ent if ent is not None else lse.new_empty((0,))

    @staticmethod
    def backward(ctx, grad_out, grad_lse, grad_ent):
        first_order_only()
        loss, need = ctx.loss, ctx.needs_input_grad[3:]
        if ctx.eager:
            if ctx.grads is None:
                raise RuntimeError(_library.CONSUMED)
            grads, ctx.grads = ctx.grads, None
            grads = [_library.scale_grad(g, grad_out, 1, (), getattr(g, "_fusedloss_owned",
                                                                        False))
                     if g is not None else None for g in grads]
        else:
            G = grad_out.expand(loss.lse.shape) * ctx.scale if ctx.scale is not None \
                else grad_out
            G = torch.zeros_like(loss.lse) if G is None else G.to(loss.acc)
            h = grad_ent.to(loss.acc) if grad_ent is not None and grad_ent.numel() else None
            grads = list(_source_grads(loss, need, G, h, False))
        if loss.sl.reduce_input_grad and isinstance(loss.src, Head) and grads[0] is not None:
            all_reduce(grads[0], loss.sl.group)
        return (None, None, None, *grads)


def _source_grads(loss, need, G, h, inplace):
    g, k, h, u, terms = loss.coefs(G, h)
    # Ignored rows are not read (exact zeros) unless the entropy's gradient reaches them.
    src, target = loss.src, loss.tk if h is None else loss.tk.clamp(min=0)
    if isinstance(src, Head):
        return src.grad(target, loss.lse, loss.ent if h is not None else None, g, h, k, u,
                        terms, need)
    return (src.grad(target, loss.lse, loss.ent if h is not None else None, g, h, k, u,
                     terms, inplace),)


def _rows_of(x):
    """(B, C, S) logits as (B * S, C) rows, contiguous (a copy only when S > 1)."""
    B, C, S = x.shape
    return x.view(B, C) if S == 1 else x.movedim(1, 2).reshape(B * S, C)


class _Rows(torch.autograd.Function):
    """(B, C, S) <-> (B * S, C) rows, with the gradient moved back."""

    @staticmethod
    def forward(ctx, x):
        ctx.shape = x.shape
        return _rows_of(x).contiguous()

    @staticmethod
    def backward(ctx, grad):
        B, C, S = ctx.shape
        return grad.view(B, C, 1) if S == 1 else grad.view(B, S, C).movedim(2, 1)


def cross_entropy(x, target_k, weight, row_weight, loss_scale, o, entropy, group,
                  inplace=False, backend="auto"):
    """Vocab-parallel cross-entropy of x (B, C_local, S); target_k: global class indices
    (B, S) or this slice's probabilities (B, C_local, S). Returns (loss, lse, entropy)."""
    B, C, S = x.shape
    sl = Slice.of(group, x, C, B * S, "cross_entropy")
    if not target_k.is_floating_point():
        sl.check_targets(target_k, o.ignore_index)
        _check_weight(weight, sl)
        target = target_k.reshape(-1)
    else:
        target = _rows_of(target_k)
    rows = _Rows.apply(x) if S > 1 or not x.is_contiguous() else x.view(B, C)
    inv_t = torch.ones(B * S, dtype=acc_dtype(x.dtype), device=x.device)
    src = Rows(rows.detach(), backend, o.logit_scale, o.softcap, inv_t)
    loss = CrossEntropyRows(sl, src, target, weight, row_weight, o, entropy)
    scale = loss_scale if o.reduction != 0 else None
    out, lse, ent = _VocabParallelCrossEntropy.apply(loss, scale, inplace and S == 1, rows)
    return out, lse, ent if entropy else None


def _check_weight(weight, sl):
    if weight is not None and weight.device.type == "cpu" and \
            not torch.compiler.is_compiling() and weight.shape[0] != int(sl.n_classes):
        raise ValueError(f"weight has {weight.shape[0]} entries but the ranks' class slices "
                         f"add up to {int(sl.n_classes)}; it must hold the global classes")


def linear_cross_entropy(x, w, b, target_k, weight, row_weight, loss_scale, o, chunk_size,
                         entropy, group, backend="auto"):
    """Vocab-parallel linear cross-entropy: x (N, D) replicated, w (C_local, D) and b this
    rank's slice. Returns (loss, lse, entropy)."""
    n = x.shape[0]
    sl = Slice.of(group, x, w.shape[0], n, "linear_cross_entropy")
    if not target_k.is_floating_point():
        sl.check_targets(target_k, o.ignore_index)
        _check_weight(weight, sl)
    inv_t = torch.ones(n, dtype=acc_dtype(x.dtype), device=x.device)
    src = Head(x.detach(), w.detach(), b.detach() if b is not None else None, backend,
               o.logit_scale, o.softcap, inv_t, chunk_size)
    loss = CrossEntropyRows(sl, src, target_k, weight, row_weight, o, entropy)
    scale = loss_scale if o.reduction != 0 else None
    out, lse, ent = _VocabParallelCrossEntropy.apply(loss, scale, False, x, w, b)
    return out, lse, ent if entropy else None


# ------------------------------------------------------------------------------ log-probs
class LogProbsRows:
    """log_probs' outputs over a vocab-parallel source (fusedloss/log_probs.py's algebra):
    forward() gives the six outputs; coefs(g, h) the gradient's per-row g, k, h."""

    def __init__(self, sl, src, target, ignore_index, want):
        self.sl, self.src, self.want, self.acc = sl, src, want, src.acc
        self.tk, self.held, self.counted, self.bad = sl.targets(target, ignore_index)
        self.target = target

    def forward(self):
        src, want = self.src, self.want
        lse_r, ent_r, lsq_r, mean_r = src.stats(self.tk, want["entropy"],
                                                want["log_sum_sq_probs"], want["mean_logits"])
        z_t = torch.where(self.held, src.target_logit(self.tk), torch.zeros_like(lse_r))
        sums = [mean_r * src.n_local] if mean_r is not None else []
        lse, z_t, ent, lsq, sums = self.sl.combine(lse_r, z_t, ent_r, lsq_r, sums)
        self.lse, self.ent = lse, ent
        mean = sums[0] / (self.sl.n_classes.to(self.acc) if isinstance(
            self.sl.n_classes, torch.Tensor) else self.sl.n_classes) if sums else None
        top1 = self._top1(z_t) if self.want["is_top1"] else None
        return z_t - lse, ent, lse, lsq, mean, top1

    def _top1(self, z_t):
        """Whether the target is the first index of the global max: no class beats z_t,
        and none before t equals it (a torch pass over the slice, one MAX all-reduce)."""
        beaten = torch.zeros(z_t.shape, dtype=torch.int32, device=z_t.device)
        for rows, z in self.src.z_chunks():
            idx = torch.arange(z.shape[1], device=z.device) + self.sl.offset
            zt = z_t[rows, None]
            before = idx[None, :] < self.target[rows, None]
            beaten[rows] = ((z > zt) | ((z == zt) & before)).any(1).int()
        dist.all_reduce(beaten, op=dist.ReduceOp.MAX, group=self.sl.group)
        return beaten == 0

    def coefs(self, grad_lp, grad_entropy):
        G = grad_lp if grad_lp is not None else torch.zeros_like(self.lse)
        g = torch.where(self.held, G, torch.zeros_like(G))
        k = g - G  # the p coefficient k - g is -G on every rank
        k = torch.where(self.bad, torch.full_like(k, float("nan")), k)
        return g, k, grad_entropy, None, None


class _VocabParallelLogProbs(torch.autograd.Function):
    """(log_probs, entropy, lse, log_sum_sq_probs, mean_logits, is_top1) of a
    vocab-parallel source; the backward runs the log-probs backward op once."""

    @staticmethod
    def forward(ctx, rows, *tensors):
        outs = list(rows.forward())
        ctx.rows = rows
        outs = [v if v is not None else rows.lse.new_empty((0,)) for v in outs[:5]] + \
            [outs[5] if outs[5] is not None else torch.zeros(0, dtype=torch.bool,
                                                              device=rows.lse.device)]
        ctx.mark_non_differentiable(*outs[2:])
        ctx.set_materialize_grads(False)
        return tuple(outs)

    @staticmethod
    def backward(ctx, grad_lp, grad_ent, *unused):
        first_order_only()
        rows = ctx.rows
        need = ctx.needs_input_grad[1:]
        if grad_lp is None and grad_ent is None:
            return (None, *(None,) * len(need))
        # (an output not computed has no entries: under torch.compile its gradient may
        # still come, as zeros of that empty shape)
        h = grad_ent.to(rows.acc).contiguous() if grad_ent is not None and \
            grad_ent.numel() else None
        g_in = grad_lp.to(rows.acc) if grad_lp is not None else None
        g, k, h, u, terms = rows.coefs(g_in, h)
        ent = rows.ent if h is not None else None
        if isinstance(rows.src, Head):
            grads = list(rows.src.grad(rows.tk, rows.lse, ent, g, h, k, u, terms, need))
            if rows.sl.reduce_input_grad and grads[0] is not None:
                all_reduce(grads[0], rows.sl.group)
        else:
            grads = [rows.src.grad(rows.tk, rows.lse, ent, g, h, k, u, terms)]
        return (None, *grads)


def _want(entropy, extras):
    return dict({e: e in extras for e in ("log_sum_sq_probs", "mean_logits", "is_top1")},
                entropy=entropy)


def log_probs(x, target, inv_t, logit_scale, softcap, ignore_index, entropy, extras, group,
              backend="auto"):
    """Vocab-parallel log_probs of x (N, V_local), target (N,) global class indices,
    inv_t (N,) each row's inverse temperature. Returns the six outputs (those not asked
    for empty); ignored rows 0."""
    sl = Slice.of(group, x, x.shape[1], x.shape[0], "log_probs")
    sl.check_targets(target, ignore_index)
    x = x.contiguous()
    src = Rows(x.detach(), backend, logit_scale, softcap, inv_t)
    rows = LogProbsRows(sl, src, target, ignore_index, _want(entropy, extras))
    return _zero_ignored(_VocabParallelLogProbs.apply(rows, x), rows.counted)


def linear_log_probs(x, w, b, target, inv_t, logit_scale, softcap, ignore_index, entropy,
                     extras, chunk_size, group, backend="auto"):
    """Vocab-parallel linear log-probs: x (N, D) and target (N,) replicated, w (V_local, D)
    and b this rank's slice."""
    sl = Slice.of(group, x, w.shape[0], x.shape[0], "linear_log_probs")
    sl.check_targets(target, ignore_index)
    src = Head(x.detach(), w.detach(), b.detach() if b is not None else None, backend,
               logit_scale, softcap, inv_t, chunk_size)
    rows = LogProbsRows(sl, src, target, ignore_index, _want(entropy, extras))
    return _zero_ignored(_VocabParallelLogProbs.apply(rows, x, w, b), rows.counted)


def _zero_ignored(outs, counted):
    """Ignored rows: 0 everywhere (and, through the where, no gradient)."""
    return [torch.where(counted, v, torch.zeros_like(v)) if v.numel() else v
            for v in outs[:5]] + [outs[5] & counted if outs[5].numel() else outs[5]]
