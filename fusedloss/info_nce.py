"""InfoNCE / CLIP contrastive loss over query-key similarities, without the N x M matrix
on the kernel backends."""
import torch

from . import _backends, _checks, ops, reference


def _check_embeddings(query, key, negatives):
    for name, value in (("query", query), ("key", key), ("negatives", negatives)):
        if value is None:
            continue
        _checks.floating(name, value)
        if value.dim() != 2:
            raise ValueError(f"{name} must be a 2-D (rows, D) tensor, got shape "
                             f"{tuple(value.shape)}")
        if value.shape[1] != query.shape[1]:
            raise ValueError(f"{name} has D={value.shape[1]} but query has "
                             f"D={query.shape[1]}; they must match")
        if value.dtype != query.dtype:
            raise TypeError(f"{name} has dtype {value.dtype} but query has {query.dtype}")
        _checks.same_device(name, value, query)


def _check_labels(labels, n_rows, n_keys, query):
    _checks.tensor("labels", labels)
    if labels.dtype != torch.int64:
        raise TypeError(f"labels must be int64, got {labels.dtype}")
    if labels.shape != (n_rows,):
        raise ValueError(f"labels must have shape ({n_rows},), one per query row, got "
                         f"{tuple(labels.shape)}")
    _checks.same_device("labels", labels, query)
    if _checks.data_checks(labels):
        bad = (labels < 0) | (labels >= n_keys)
        if bool(bad.any()):
            raise IndexError(f"labels contains {int(labels[bad][0])}, outside [0, {n_keys}) "
                             "(the keys followed by the negatives)")


def info_nce(query, key, *, temperature=0.07, logit_scale=None, labels=None, negatives=None,
             symmetric=False, reduction="mean", backend="auto"):
    """InfoNCE: cross-entropy of each query against all keys (and extra negatives).

    query (N, D), key (M, D): logits = query @ key^T / temperature, or * logit_scale when
    given (a 0-dim tensor, which receives a gradient, as CLIP learns it; temperature is then
    ignored). Row i's positive is key i (labels=None, needs N <= M) or key labels[i].
    negatives (E, D): extra keys appended after the keys for every row.
    symmetric=True (CLIP): averages the query->key and key->query losses of each pair; it
    needs labels=None and N == M, and the key->query direction ranges over the queries only.
    reduction: "mean" (default), "sum" or "none" (per query row, shape (N,)).
    Embeddings are used as given: normalise them first for cosine similarity.
    """
    red = _checks.reduction_code(reduction)
    _checks.tensor("query", query)
    _checks.tensor("key", key)
    _check_embeddings(query, key, negatives)
    n, m = query.shape[0], key.shape[0]
    n_keys = m + (negatives.shape[0] if negatives is not None else 0)
    if labels is None:
        if n > m:
            raise ValueError(f"labels=None pairs query i with key i, so it needs N <= M; got "
                             f"N={n} queries and M={m} keys")
    else:
        _check_labels(labels, n, n_keys, query)
    if symmetric and (labels is not None or n != m):
        raise ValueError("symmetric=True pairs query i with key i in both directions: it "
                         f"needs labels=None and N == M (got N={n}, M={m}, labels "
                         f"{'given' if labels is not None else 'None'})")
    acc = ops.acc_dtype(query.dtype)
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
    name = _backends.resolve(backend, query.device)

    if name == "reference":
        return reference.info_nce(query, key, labels=labels, negatives=negatives,
                                  logit_scale=scale, symmetric=symmetric,
                                  reduction=reduction)

    negatives_k = negatives.contiguous() if negatives is not None else None
    row_loss, col_loss, _, _ = ops.namespace(name).info_nce(
        query.contiguous(), key.contiguous(), negatives_k, labels, scale, symmetric)
    rows = (row_loss + col_loss) / 2 if symmetric else row_loss
    if red == 0:
        return rows.to(query.dtype)
    total = rows.sum()
    return (total / rows.numel() if red == 1 else total).to(query.dtype)


class InfoNCELoss(torch.nn.Module):
    """Module form of fusedloss.info_nce. With learn_logit_scale=True it holds CLIP's
    learnable logit scale (initialised to 1/temperature) as a parameter."""

    def __init__(self, *, temperature=0.07, learn_logit_scale=False, symmetric=False,
                 reduction="mean", backend="auto"):
        super().__init__()
        _checks.reduction_code(reduction)
        _checks.number("temperature", temperature, low=0.0, low_open=True)
        self.temperature = temperature
        self.logit_scale = (torch.nn.Parameter(torch.tensor(1.0 / temperature))
                            if learn_logit_scale else None)
        self.symmetric = symmetric
        self.reduction = reduction
        self.backend = backend

    def forward(self, query, key, labels=None, negatives=None):
        return info_nce(query, key, temperature=self.temperature, logit_scale=self.logit_scale,
                        labels=labels, negatives=negatives, symmetric=self.symmetric,
                        reduction=self.reduction, backend=self.backend)

    def extra_repr(self):
        return (f"temperature={self.temperature}, symmetric={self.symmetric}, "
                f"reduction={self.reduction!r}, backend={self.backend!r}")
