"""Full-size checks that need a GPU: the triton and cuda backends in bf16/fp16/fp32 at real
vocabulary sizes, and one case with N*V > 2^31 elements (64-bit offsets). Skipped, with the
reason, on machines without CUDA; a backend named in FUSEDLOSS_REQUIRE_BACKENDS fails
instead of skipping. benchmarks/gpu_validate.sh runs them on a bare GPU machine."""
import pytest
import torch
import torch.nn.functional as F

import fusedloss
from conftest import _available

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(params=["triton", "cuda"])
def gpu_backend(request):
    return _available(request.param)


def _max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


def _cross_entropy_no_worse_than_torch(backend, dtype, n, v):
    x = torch.randn(n, v, device="cuda", dtype=dtype) * 2
    t = torch.randint(0, v, (n,), device="cuda")
    t[::7] = -100
    kw = dict(label_smoothing=0.1, reduction="none")
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    xe = x.double().requires_grad_()
    ours = fusedloss.cross_entropy(xa, t, backend=backend, **kw)
    theirs = F.cross_entropy(xb, t, **kw)
    exact = F.cross_entropy(xe, t, **kw)
    g = torch.rand(n, device="cuda", dtype=torch.float64) + 0.5
    for out in (ours, theirs, exact):
        (out.double() * g).sum().backward()
    assert _max_err(ours, exact) <= 2 * _max_err(theirs, exact) + 1e-6
    assert _max_err(xa.grad, xe.grad) <= 2 * _max_err(xb.grad, xe.grad) + 1e-7


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n,v", [(4096, 32000), (1024, 128256), (333, 256000)])
def test_cross_entropy_full_size(gpu_backend, dtype, n, v):
    _cross_entropy_no_worse_than_torch(gpu_backend, dtype, n, v)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n,v", [(64, 1025), (61, 4099)])
def test_cross_entropy_long_rows_odd_sizes(gpu_backend, dtype, n, v):
    """Rows of more than 1024 classes, not a multiple of the vector width: the tails of the
    block-per-row kernels, at a size compute-sanitizer checks in seconds (enough rows that
    the largest error is not one lucky rounding)."""
    _cross_entropy_no_worse_than_torch(gpu_backend, dtype, n, v)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_focal_and_sigmoid_full_size(gpu_backend, dtype):
    x = torch.randn(2048, 32000, device="cuda", dtype=dtype)
    t = torch.randint(0, 32000, (2048,), device="cuda")
    ref = fusedloss.focal_loss(x.double(), t, gamma=2.0, backend="reference")
    ours = fusedloss.focal_loss(x, t, gamma=2.0, backend=gpu_backend)
    assert _max_err(ours, ref) < (2e-2 if dtype != torch.float32 else 1e-5) * ref.abs().item()
    y = (torch.rand(2048, 4096, device="cuda") > 0.9).to(dtype)
    xs = torch.randn(2048, 4096, device="cuda", dtype=dtype)
    ref = fusedloss.sigmoid_focal_loss(xs.double(), y.double(), reduction="mean",
                                       backend="reference")
    ours = fusedloss.sigmoid_focal_loss(xs, y, reduction="mean", backend=gpu_backend)
    assert _max_err(ours, ref) < (2e-2 if dtype != torch.float32 else 1e-5) * ref.abs().item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_info_nce_full_size(gpu_backend, dtype):
    q = F.normalize(torch.randn(8192, 768, device="cuda"), dim=1).to(dtype)
    k = F.normalize(torch.randn(8192, 768, device="cuda"), dim=1).to(dtype)
    ours = fusedloss.info_nce(q, k, temperature=0.05, symmetric=True, reduction="none",
                              backend=gpu_backend)
    ref = fusedloss.info_nce(q.double(), k.double(), temperature=0.05, symmetric=True,
                             reduction="none", backend="reference")
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    assert _max_err(ours, ref) < tol * ref.abs().max().item()


def test_cross_entropy_beyond_32bit_offsets(gpu_backend):
    """N*V > 2^31: the last rows start past 2^31 elements; checked against rows computed
    by torch on a slice."""
    n, v = 16400, 131072
    assert n * v > 2**31
    x = torch.randn(n, v, device="cuda", dtype=torch.bfloat16)
    t = torch.randint(0, v, (n,), device="cuda")
    xa = x.requires_grad_()
    loss = fusedloss.cross_entropy(xa, t, reduction="none", backend=gpu_backend)
    g = torch.zeros(n, device="cuda", dtype=loss.dtype)
    g[-3:] = 1
    (loss * g).sum().backward()
    tail = x.detach()[-3:].float().requires_grad_()
    expected = F.cross_entropy(tail, t[-3:], reduction="none")
    expected.sum().backward()
    torch.testing.assert_close(loss[-3:].float(), expected, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(xa.grad[-3:].float(), tail.grad, rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_linear_log_probs_full_size(dtype):
    """Token log-probs and entropy over an LM head (Triton: the op has no CUDA C++ kernel),
    no worse than twice eager torch's error on the same inputs, gradients included."""
    backend = _available("triton")
    n, d, v = 2048, 1024, 32000
    x = torch.randn(n, d, device="cuda", dtype=dtype)
    w = torch.randn(v, d, device="cuda", dtype=dtype) / d ** 0.5 * 3
    t = torch.randint(0, v, (n,), device="cuda")
    t[::9] = -100
    g, h = (torch.randn(n, device="cuda", dtype=torch.float64) for _ in range(2))
    results = []
    for kind in ("ours", "torch", "exact"):
        xs, ws = (a.double() if kind == "exact" else a.clone() for a in (x, w))
        xs.requires_grad_(), ws.requires_grad_()
        if kind == "ours":
            out = fusedloss.linear_log_probs(xs, ws, t, return_entropy=True, temperature=0.9,
                                             backend=backend)
            lp, ent = out.log_probs, out.entropy
        else:
            logp = torch.log_softmax((xs @ ws.T).float() / 0.9 if kind == "torch"
                                     else (xs @ ws.T) / 0.9, -1)
            counted = t != -100
            lp = torch.where(counted, logp.gather(-1, t.clamp(min=0)[:, None]).squeeze(-1), 0)
            ent = torch.where(counted, -(logp.exp() * logp).sum(-1), 0)
        ((lp.double() * g).sum() + (ent.double() * h).sum()).backward()
        results.append((lp, ent, xs.grad, ws.grad))
    for ours, theirs, exact in zip(*results):
        assert _max_err(ours, exact) <= 2 * _max_err(theirs, exact) + 1e-6
