"""InfoNCE against the N x M logits formula (as open_clip computes it), written here."""
import pytest
import torch
import torch.nn.functional as F

import fusedloss
from conftest import assert_close, assert_matches
from contract import LossContract, Sample


def logits_formula(q, k, scale, labels=None, negatives=None, symmetric=False,
                   reduction="mean"):
    keys = k if negatives is None else torch.cat([k, negatives])
    logits = scale * q @ keys.T
    n, m = q.shape[0], k.shape[0]
    labels = torch.arange(n, device=q.device) if labels is None else labels
    loss = F.cross_entropy(logits, labels, reduction="none")
    if symmetric:
        loss = (loss + F.cross_entropy(logits[:, :m].T, torch.arange(m, device=q.device),
                                       reduction="none")) / 2
    return {"none": loss, "mean": loss.mean(), "sum": loss.sum()}[reduction]


CASES = {
    "diagonal": dict(n=9, m=9),
    "more_keys": dict(n=7, m=20),
    "labels": dict(n=11, m=6, labels=True),
    "negatives": dict(n=9, m=9, e=13),
    "labels_negatives": dict(n=5, m=4, e=7, labels=True),
    "symmetric": dict(n=17, m=17, symmetric=True),
    "symmetric_negatives": dict(n=10, m=10, e=5, symmetric=True),
}


def make(case, dtype, device, d=24):
    c = CASES[case]
    n, m, e = c["n"], c["m"], c.get("e", 0)
    q = F.normalize(torch.randn(n, d, dtype=torch.float64), dim=1).to(dtype).to(device)
    k = F.normalize(torch.randn(m, d, dtype=torch.float64), dim=1).to(dtype).to(device)
    neg = (F.normalize(torch.randn(e, d, dtype=torch.float64), dim=1).to(dtype).to(device)
           if e else None)
    labels = torch.randint(0, m + e, (n,), device=device) if c.get("labels") else None
    return q, k, neg, labels, c.get("symmetric", False)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_formula_float64(backend, device, case, reduction):
    q, k, neg, labels, sym = make(case, torch.float64, device)
    scale = torch.tensor(7.5, dtype=torch.float64, device=device)
    leaves = [q, k, scale] + ([neg] if neg is not None else [])
    a = [t.clone().requires_grad_() for t in leaves]
    b = [t.clone().requires_grad_() for t in leaves]
    ours = fusedloss.info_nce(a[0], a[1], logit_scale=a[2], labels=labels,
                              negatives=a[3] if neg is not None else None, symmetric=sym,
                              reduction=reduction, backend=backend)
    expected = logits_formula(b[0], b[1], b[2], labels, b[3] if neg is not None else None,
                              sym, reduction)
    assert_matches(ours, expected, a, b)


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
@pytest.mark.parametrize("case", ["symmetric_negatives", "labels"])
def test_float64_without_float64_dot(backend, device, case, monkeypatch):
    """Triton before 3.6 refuses float64 in tl.dot: there the kernels multiply float64
    tiles as a sum of products, forced here on any triton."""
    from fusedloss.kernels import info_nce as kernels
    monkeypatch.setattr(kernels, "FLOAT64_DOT", False)
    test_matches_formula_float64(backend, device, case, "mean")


@pytest.mark.parametrize("case", ["diagonal", "symmetric_negatives", "labels"])
def test_float32_with_temperature(backend, device, case):
    q, k, neg, labels, sym = make(case, torch.float32, device, d=40)
    qa, ka = q.clone().requires_grad_(), k.clone().requires_grad_()
    qb, kb = q.double().requires_grad_(), k.double().requires_grad_()
    ours = fusedloss.info_nce(qa, ka, temperature=0.1, labels=labels, negatives=neg,
                              symmetric=sym, backend=backend)
    expected = logits_formula(qb, kb, 10.0, labels,
                              neg.double() if neg is not None else None, sym)
    assert_close(ours, expected, torch.float32)
    ours.backward()
    expected.backward()
    assert_close(qa.grad, qb.grad, torch.float32)
    assert_close(ka.grad, kb.grad, torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(backend, device, dtype):
    """Half inputs, fp32 accumulation: error no worse than twice the error of the same
    formula evaluated by torch in that dtype."""
    q, k, _, _, _ = make("symmetric", dtype, device, d=64)
    ours = fusedloss.info_nce(q, k, temperature=0.05, symmetric=True, reduction="none",
                              backend=backend)
    exact = logits_formula(q.double(), k.double(), 20.0, symmetric=True, reduction="none")
    if device.type == "cpu" and dtype == torch.float16:
        torchs = logits_formula(q.float(), k.float(), 20.0, symmetric=True,
                                reduction="none").to(dtype)  # no fp16 matmul on some CPUs
    else:
        torchs = logits_formula(q, k, 20.0, symmetric=True, reduction="none")
    err_ours = (ours.double() - exact).abs().max()
    err_torch = (torchs.double() - exact).abs().max()
    assert ours.dtype == dtype
    assert err_ours <= 2 * err_torch + 1e-3, (err_ours, err_torch)


def test_module_learns_logit_scale(backend, device):
    m = fusedloss.InfoNCELoss(temperature=0.1, learn_logit_scale=True, symmetric=True,
                              backend=backend).to(device)
    q, k, _, _, _ = make("symmetric", torch.float32, device)
    loss = m(q, k)
    loss.backward()
    assert m.logit_scale.grad is not None and torch.isfinite(m.logit_scale.grad)
    assert_close(loss, logits_formula(q.double(), k.double(), 10.0, symmetric=True),
                 torch.float32)


def test_compiled_with_learnable_scale(kernel_backend, device):
    q, k, neg, _, _ = make("symmetric_negatives", torch.float32, device)
    scale = torch.tensor(5.0, device=device, requires_grad=True)
    qa = q.clone().requires_grad_()
    f = lambda q: fusedloss.info_nce(q, k, logit_scale=scale, negatives=neg, symmetric=True,
                                     backend=kernel_backend)
    y = torch.compile(f, fullgraph=True)(qa)
    assert_close(y, logits_formula(q.double(), k.double(), 5.0, None, neg.double(), True),
                 torch.float32)
    y.backward()
    assert scale.grad is not None and torch.isfinite(scale.grad)


class TestInfoNCEContract(LossContract):
    fn = fusedloss.info_nce
    ops = ("info_nce", "info_nce_backward")
    module = fusedloss.InfoNCELoss
    half_slack = 1e-3

    def sample(self, device, dtype, n=17, e=6, d=24):
        def unit(rows):
            return F.normalize(torch.randn(rows, d, dtype=torch.float64), dim=1).to(dtype) \
                .to(device).requires_grad_()
        scale = torch.tensor(7.5, dtype=torch.float64).to(dtype).to(device).requires_grad_()
        return Sample((unit(n), unit(n)), dict(logit_scale=scale, negatives=unit(e),
                                                symmetric=True, reduction="none"))

    def gradcheck_sample(self, device):
        return self.sample(device, torch.float64, n=5, e=3, d=6)

    def module_call(self, sample, backend):
        # The module learns its logit scale: the sample's becomes its parameter.
        kwargs = dict(sample.kwargs)
        scale = kwargs.pop("logit_scale")
        module, options, call = super().module_call(Sample(sample.args, kwargs), backend)
        module = fusedloss.InfoNCELoss(**options, learn_logit_scale=True).to(scale.dtype)
        with torch.no_grad():
            module.logit_scale.copy_(scale)
        return module, dict(options, learn_logit_scale=True), call

    def expected(self, query, key, *, logit_scale, negatives, symmetric, reduction):
        return logits_formula(query, key, logit_scale, None, negatives, symmetric, reduction)

    def torch_equivalent(self, query, key, *, logit_scale, negatives, symmetric, reduction):
        if query.device.type == "cpu" and query.dtype == torch.float16:
            # No float16 matmul on some CPUs: torch's float32 result, rounded to float16.
            f = lambda t: t.float()  # noqa: E731
            return self.expected(f(query), f(key), logit_scale=f(logit_scale),
                                 negatives=f(negatives), symmetric=symmetric,
                                 reduction=reduction).half()
        return self.expected(query, key, logit_scale=logit_scale, negatives=negatives,
                             symmetric=symmetric, reduction=reduction)

    def op_samples(self, device):
        q, k, neg, _, _ = make("symmetric_negatives", torch.float32, device)
        q.requires_grad_()
        scale = torch.tensor(5.0, device=device, requires_grad=True)
        labels = torch.tensor([0, 3, 14, 2, 1, 9, 8, 7, 6, 5], device=device)
        n, m = q.shape[0], k.shape[0]
        rows = torch.rand(n, device=device)
        lse = torch.logsumexp(5.0 * q.detach() @ torch.cat([k, neg]).T, 1)
        col_lse = torch.logsumexp(5.0 * q.detach() @ k.T, 0)
        backward = dict(grad_row=rows, query=q.detach(), key=k, negatives=neg,
                        scale=scale.detach(), row_lse=lse)
        return [
            ("info_nce", dict(query=q, key=k, negatives=neg, labels=None, scale=scale,
                              symmetric=True)),
            ("info_nce", dict(query=q, key=k, negatives=neg, labels=labels, scale=scale,
                              symmetric=False)),
            ("info_nce_backward", dict(backward, grad_col=torch.rand(m, device=device),
                                       labels=None, col_lse=col_lse, symmetric=True)),
            ("info_nce_backward", dict(backward, grad_col=rows.new_empty(0), labels=labels,
                                       col_lse=lse.new_empty(0), symmetric=False)),
        ]

    def bad_inputs(self, device):
        q = torch.randn(4, 8, device=device)
        k = torch.randn(4, 8, device=device)
        return dict(query=q, key=k), [
            (dict(key=torch.randn(4, 7, device=device)), ValueError, "D="),
            (dict(key=torch.randn(3, 8, device=device)), ValueError, "N <= M"),
            (dict(temperature=0.0), ValueError, "temperature"),
            (dict(temperature=-1.0), ValueError, "temperature"),
            (dict(labels=torch.tensor([0, 1, 2, 4], device=device)), IndexError, "labels"),
            (dict(labels=torch.tensor([0, 1, 2], device=device)), ValueError, "labels"),
            (dict(labels=torch.tensor([0, 1, 2, 3], device=device).int()), TypeError,
             "labels"),
            (dict(labels=torch.tensor([0, 1, 2, 3], device=device), symmetric=True),
             ValueError, "symmetric"),
            (dict(negatives=torch.randn(5, 9, device=device)), ValueError, "negatives"),
            (dict(key=k.double()), TypeError, "key"),
            (dict(query=torch.randn(4, 8, 1, device=device)), ValueError, "query"),
            (dict(logit_scale=torch.ones(2, device=device)), ValueError, "logit_scale"),
            (dict(reduction="avg"), ValueError, "reduction"),
        ]
