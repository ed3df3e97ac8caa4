"""InfoNCE / CLIP contrastive loss over query-key similarities, without the N x M matrix
on the kernel backends.

The algebra of the ops (N queries, M keys, E extra negatives, keys = [key; negatives],
everything in acc: float32 for half inputs):

    logits[i, j] = scale <query_i, keys_j>;  row i's positive pos_i = labels[i] (i without)
    row_lse_i    = logsumexp_j logits[i, j],  row_loss_i = row_lse_i - logits[i, pos_i]
                   (NaN when pos_i is outside [0, M + E): never an out-of-bounds read)
    symmetric (labels None, N == M), over the queries for each key j < M:
    col_lse_j    = logsumexp_i logits[i, j],  col_loss_j = col_lse_j - logits[j, j]
    backward, with P = exp(logits - row_lse[:, None]) and Pc = exp(logits - col_lse[None, :]):
    dlogits[i, j] = grad_row_i (P[i, j] - [j == pos_i])
                    + [symmetric, j < M] grad_col_j (Pc[i, j] - [i == j])
    grad_query = scale dlogits @ keys,   grad_keys = scale dlogits^T @ query,
    grad_scale = sum_ij dlogits[i, j] <query_i, keys_j>
The kernels tile the logits (flash-attention style in Triton, GEMM blocks in C++) and
never store them whole.
"""
import math

import torch
import torch.distributed as dist

from . import _backends, _checks, _collectives, _library, reference
from ._collectives import AllGather, check_agree, check_group, first_order_only, ring_step
from ._library import Op, acc_dtype
from ._module import LossModule


def _outputs(a):
    acc = acc_dtype(a.query.dtype)
    n, cols = a.query.shape[0], a.key.shape[0] if a.symmetric else 0
    new = lambda size: a.query.new_empty((size,), dtype=acc)  # noqa: E731
    return new(n), new(cols), new(n), new(cols)


def _setup_context(ctx, a, outputs):
    row_loss, col_loss, row_lse, col_lse = outputs
    ctx.mark_non_differentiable(row_lse, col_lse)
    ctx.set_materialize_grads(False)
    ctx.row_lse, ctx.col_lse = row_lse, col_lse


def _backward(ctx, grad_row, grad_col, *unused):
    if grad_row is None and grad_col is None:
        return {}
    a = INFO_NCE.saved_args(ctx)
    grad_row = torch.zeros_like(ctx.row_lse) if grad_row is None else grad_row
    grad_col = torch.zeros_like(ctx.col_lse) if grad_col is None else grad_col
    gq, gk, gn, gs = INFO_NCE_BACKWARD.call(
        ctx.fusedloss_backend, grad_row=grad_row, grad_col=grad_col, query=a.query,
        key=a.key, negatives=a.negatives, labels=a.labels, scale=a.scale,
        row_lse=ctx.row_lse, col_lse=ctx.col_lse, symmetric=a.symmetric)
    return {"query": gq, "key": gk, "negatives": gn if a.negatives is not None else None,
            "scale": gs}


def _reference(a):
    return reference.info_nce_rows(a.query, a.key, a.negatives, a.labels, a.scale,
                                   a.symmetric)


INFO_NCE = Op(
    "info_nce",
    "(Tensor query, Tensor key, Tensor? negatives, Tensor? labels, Tensor scale, "
    "bool symmetric) -> (Tensor row_loss, Tensor col_loss, Tensor row_lse, Tensor col_lse)",
    outputs=_outputs, backends=("triton", "cpu", "cuda"), kernels="info_nce",
    setup_context=_setup_context, backward=_backward, reference=_reference,
    differentiable=(0, 1)).define()


def _backward_outputs(a):
    neg = torch.empty_like(a.negatives) if a.negatives is not None else a.query.new_empty((0,))
    return (torch.empty_like(a.query), torch.empty_like(a.key), neg, torch.empty_like(a.scale))


# The gradients of info_nce; itself not differentiable (higher-order gradients of info_nce
# come from its reference recomputation, see fusedloss._library).
INFO_NCE_BACKWARD = Op(
    "info_nce_backward",
    "(Tensor grad_row, Tensor grad_col, Tensor query, Tensor key, Tensor? negatives, "
    "Tensor? labels, Tensor scale, Tensor row_lse, Tensor col_lse, bool symmetric) "
    "-> (Tensor grad_query, Tensor grad_key, Tensor grad_negatives, Tensor grad_scale)",
    outputs=_backward_outputs, backends=("triton", "cpu", "cuda"),
    kernels="info_nce").define()


def _check_labels(labels, n_rows, n_keys, query):
    _checks.tensor("labels", labels)
    if labels.dtype != torch.int64:
        raise TypeError(f"labels must be int64, got {labels.dtype}")
    if labels.shape != (n_rows,):
        raise ValueError(f"labels must have shape ({n_rows},), one per query row, got "
                         f"{tuple(labels.shape)}")
    _checks.same_device("labels", labels, query)
    if n_keys is not None and _checks.data_checks(labels):
        bad = (labels < 0) | (labels >= n_keys)
        if bool(bad.any()):
            raise IndexError(f"labels contains {int(labels[bad][0])}, outside [0, {n_keys}) "
                             "(the keys followed by the negatives)")


def info_nce(query, key, *, temperature=0.07, logit_scale=None, labels=None, negatives=None,
             symmetric=False, reduction="mean", process_group=None, exchange="all_gather",
             backend="auto"):
    """InfoNCE: cross-entropy of each query against all keys (and extra negatives).

    query (N, D), key (M, D): logits = query @ key^T / temperature, or * logit_scale when
    given (a 0-dim tensor, which receives a gradient, as CLIP learns it; temperature is then
    ignored). Row i's positive is key i (labels=None, needs N <= M) or key labels[i].
    negatives (E, D): extra keys appended after the keys for every row.
    symmetric=True (CLIP): averages the query->key and key->query losses of each pair; it
    needs labels=None and N == M, and the key->query direction ranges over the queries only.
    reduction: "mean" (default), "sum" or "none" (per query row, shape (N,)).
    Embeddings are used as given: normalise them first for cosine similarity.

    process_group: InfoNCE over every rank's batch (torch.distributed). Each rank passes
    its own query and key rows (and negatives, shared like the keys); every rank's keys
    are candidates for every query; row i's positive is this rank's key i, or labels[i]
    in global key indices (every rank's keys in rank order, then every rank's negatives);
    symmetric=True adds the key->query direction over every rank's queries. The loss is
    this rank's share (the mean over its rows), so DDP's averaging of the gradients gives
    the gradient of the global mean (equal local batches). exchange: "all_gather" gathers
    keys (and queries) with their gradients and runs this backend's kernels, memory
    O(global N x D); "ring" passes key blocks around the ring (torch ops on [N, M] tiles),
    memory O(local N x D) beyond one tile. Every rank needs the same N, M, E and D
    (checked on CPU tensors; on CUDA a mismatch fails inside the collectives).
    """
    red = _checks.reduction_code(reduction)
    _checks.tensor("query", query)
    _checks.tensor("key", key)
    # Under autocast the similarities are a product in autocast's dtype, as torch's matmul;
    # the loss comes out in float32.
    query, key, negatives = _library.autocast_operands(query, key, negatives)
    _checks.feature_rows([("query", query), ("key", key), ("negatives", negatives)])
    n, m = query.shape[0], key.shape[0]
    n_keys = m + (negatives.shape[0] if negatives is not None else 0)
    if exchange not in ("all_gather", "ring"):
        raise ValueError(f"exchange must be 'all_gather' or 'ring', got {exchange!r}")
    if labels is None:
        if n > m:
            raise ValueError(f"labels=None pairs query i with key i, so it needs N <= M; got "
                             f"N={n} queries and M={m} keys")
    else:  # with a process_group, labels index every rank's keys: checked there
        _check_labels(labels, n, n_keys if process_group is None else None, query)
    if symmetric and (labels is not None or n != m):
        raise ValueError("symmetric=True pairs query i with key i in both directions: it "
                         f"needs labels=None and N == M (got N={n}, M={m}, labels "
                         f"{'given' if labels is not None else 'None'})")
    acc = acc_dtype(query.dtype)
    if logit_scale is None:
        temperature = _checks.number("temperature", temperature, low=0.0, low_open=True)
        scale = torch.full((), 1.0 / temperature, dtype=acc, device=query.device)
    elif isinstance(logit_scale, torch.Tensor):
        _checks.floating("logit_scale", logit_scale)
        if logit_scale.numel() != 1:
            raise ValueError(f"logit_scale must hold one value, got shape "
                             f"{tuple(logit_scale.shape)}")
        _checks.same_device("logit_scale", logit_scale, query)
        scale = logit_scale.reshape(()).to(acc)
    else:
        scale = torch.full((), _checks.number("logit_scale", logit_scale), dtype=acc,
                           device=query.device)
    if process_group is not None:
        rows, cols = _across_ranks(query, key, negatives, labels, scale, symmetric, exchange,
                                   process_group, backend)
        return _reduce_rows((rows + cols) / 2 if symmetric else rows, red,
                            _library.loss_dtype(query))
    name = _backends.resolve(INFO_NCE, backend, query.device)

    if name == "reference":
        return reference.info_nce(query, key, labels=labels, negatives=negatives,
                                  logit_scale=scale, symmetric=symmetric,
                                  reduction=reduction)

    row_loss, col_loss, _, _ = INFO_NCE.call(
        name, query=query.contiguous(), key=key.contiguous(),
        negatives=negatives.contiguous() if negatives is not None else None, labels=labels,
        scale=scale, symmetric=symmetric)
    return _reduce_rows((row_loss + col_loss) / 2 if symmetric else row_loss, red,
                        _library.loss_dtype(query))


def _reduce_rows(rows, red, dtype):
    if red == 0:
        return rows.to(dtype)
    total = rows.sum()
    return (total / rows.numel() if red == 1 else total).to(dtype)


# ------------------------------------------------------------------------------ across ranks
# InfoNCE over every rank's batch (process_group): "all_gather" gathers the keys with their
# gradients and runs the single-device loss; "ring" passes key blocks around the ring.
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
                blocks = ring_step(blocks, group, rank, world)
        row_lse = row_m + torch.log(row_s)
        valid = (labels >= 0) & (labels < world * (m_keys + e))
        row_loss = torch.where(valid, row_lse - pos, torch.full_like(pos, math.nan))
        col_lse = col_m + torch.log(col_s)
        ctx.save_for_backward(q, k, neg, scale, labels, row_lse, col_lse)
        ctx.group, ctx.symmetric = group, symmetric
        return row_loss, col_lse - diag

    @staticmethod
    def backward(ctx, grad_row, grad_col):
        first_order_only()
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
                moved = ring_step(blocks + held, group, rank, world)
                blocks, held = moved[:3], moved[3:]
            else:
                held = ring_step(held, group, rank, world)
        if symmetric:
            dq += held[2]
        dk += held[0]
        return (dq.to(q.dtype), dk.to(k.dtype), held[1].to(neg.dtype),
                d_scale.to(scale.dtype).reshape(scale.shape), None, None, None)


def _across_ranks(query, key, negatives, labels, scale, symmetric, mode, group, backend):
    """InfoNCE of this rank's queries against every rank's keys (and negatives): the
    per-row losses (row, and col when symmetric) of this rank. mode: "all_gather" (the
    single-device loss, with this backend's kernels, on the gathered keys) or "ring"."""
    world, rank = check_group(group, query, "info_nce")
    n, m_keys = query.shape[0], key.shape[0]
    e = negatives.shape[0] if negatives is not None else 0
    meta = _collectives.exchange([n, m_keys, e, query.shape[1]], group, query.device)
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
    keys = AllGather.apply(key, group)
    negs = AllGather.apply(negatives, group) if negatives is not None else None
    rows = info_nce(query, keys, logit_scale=scale, labels=labels, negatives=negs,
                    reduction="none", backend=backend)
    if not symmetric:
        return rows, rows.new_empty((0,))
    queries = AllGather.apply(query, group)
    cols = info_nce(key, queries, logit_scale=scale,
                    labels=torch.arange(m_keys, device=query.device) + rank * n,
                    reduction="none", backend=backend)
    return rows, cols


class InfoNCELoss(LossModule):
    """Module form of fusedloss.info_nce. With learn_logit_scale=True it holds CLIP's
    learnable logit scale (initialised to 1/temperature) as a parameter.
    forward(query, key, labels=None, negatives=None)."""

    def __init__(self, *, temperature=0.07, learn_logit_scale=False, symmetric=False,
                 reduction="mean", process_group=None, exchange="all_gather", backend="auto"):
        _checks.number("temperature", temperature, low=0.0, low_open=True)
        super().__init__(temperature=temperature, symmetric=symmetric, reduction=reduction,
                         process_group=process_group, exchange=exchange, backend=backend)
        self.logit_scale = (torch.nn.Parameter(torch.tensor(1.0 / temperature))
                            if learn_logit_scale else None)

    def forward(self, query, key, labels=None, negatives=None):
        return info_nce(query, key, logit_scale=self.logit_scale, labels=labels,
                        negatives=negatives, **self.loss_options())

    def extra_repr(self):
        learnt = ", learn_logit_scale=True" if self.logit_scale is not None else ""
        return super().extra_repr() + learnt
