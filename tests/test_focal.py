"""Softmax focal loss against a formula written here (not fusedloss.reference)."""
import pytest
import torch
import torch.nn.functional as F

import fusedloss
from conftest import assert_close, assert_matches
from contract import LossContract, Sample


def focal_formula(x, t, gamma, alpha, weight, ignore_index, reduction):
    """-alpha_t (1 - p_t)^gamma log p_t, straight from the definition, float64."""
    class_dim = 0 if x.dim() == 1 else 1
    logp = torch.log_softmax(x.double(), class_dim)
    counted = t != ignore_index
    safe = torch.where(counted, t, torch.zeros_like(t))
    logp_t = logp.gather(class_dim, safe.unsqueeze(class_dim)).squeeze(class_dim)
    p_t = logp_t.exp()
    terms = -((1 - p_t) ** gamma) * logp_t
    if isinstance(alpha, torch.Tensor):
        terms = terms * alpha.double()[safe]
    elif alpha is not None:
        terms = terms * alpha
    w_t = weight.double()[safe] if weight is not None else torch.ones_like(terms)
    w_t = w_t * counted
    terms = terms * w_t
    if reduction == "none":
        return terms
    return terms.sum() if reduction == "sum" else terms.sum() / w_t.sum()


SHAPES = [(37,), (6, 37), (5, 300), (3, 37, 4)]


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("alpha_kind", ["none", "float", "tensor"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_formula(backend, device, shape, weighted, alpha_kind, reduction):
    class_dim = 0 if len(shape) == 1 else 1
    c = shape[class_dim]
    x = torch.randn(shape, dtype=torch.float64, device=device) * 3
    t = torch.randint(0, c, shape[:class_dim] + shape[class_dim + 1:], device=device)
    if t.dim() and t.numel() > 2:
        t.view(-1)[1::4] = -100
    alpha = {"none": None, "float": 0.25,
             "tensor": torch.rand(c, dtype=torch.float64, device=device)}[alpha_kind]
    w = torch.rand(c, dtype=torch.float64, device=device) + 0.3 if weighted else None
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours = fusedloss.focal_loss(xa, t, 1.5, alpha, w, reduction=reduction, backend=backend)
    expected = focal_formula(xb, t, 1.5, alpha, w, -100, reduction)
    assert_matches(ours, expected, [xa], [xb])


def test_float32_and_ignore_index(backend, device):
    x = torch.randn(7, 300, device=device) * 2
    t = torch.randint(0, 300, (7,), device=device)
    t[2] = 5
    xa, xb = x.clone().requires_grad_(), x.clone().double().requires_grad_()
    ours = fusedloss.focal_loss(xa, t, gamma=2.0, ignore_index=5, backend=backend)
    expected = focal_formula(xb, t, 2.0, None, None, 5, "mean")
    assert_close(ours, expected, torch.float32)
    ours.backward()
    expected.backward()
    assert_close(xa.grad, xb.grad, torch.float32)


def test_gamma_zero_is_cross_entropy(backend, device):
    x = torch.randn(6, 37, 3, dtype=torch.float64, device=device)
    t = torch.randint(0, 37, (6, 3), device=device)
    t[0, 0] = -100
    w = torch.rand(37, dtype=torch.float64, device=device)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours = fusedloss.focal_loss(xa, t, gamma=0.0, weight=w, backend=backend)
    expected = F.cross_entropy(xb, t, w)
    assert_close(ours, expected)
    ours.backward()
    expected.backward()
    assert_close(xa.grad, xb.grad)


@pytest.mark.parametrize("gamma", [0.0, 0.3, 0.5, 1.0, 2.0])
def test_gradient_finite_when_confident(backend, device, gamma):
    """p_t -> 1 (a margin of 60 and 800): (1 - p_t)^(gamma - 1) would be inf for gamma < 1."""
    x = torch.zeros(4, 50, dtype=torch.float64, device=device)
    t = torch.tensor([0, 1, 2, 3], device=device)
    x[0, 0] = x[1, 1] = 60.0
    x[2, 2] = x[3, 3] = 800.0
    for dtype in (torch.float64, torch.float32):
        xa = x.to(dtype).detach().requires_grad_()
        loss = fusedloss.focal_loss(xa, t, gamma=gamma, backend=backend)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(xa.grad).all()


@pytest.mark.parametrize("gamma", [0.5, 2.0])
def test_gradcheck_gamma(backend, device, gamma):
    x = torch.randn(4, 9, 2, dtype=torch.float64, device=device, requires_grad=True)
    t = torch.tensor([[1, -100], [8, 0], [5, 5], [2, 3]], device=device)
    alpha = torch.rand(9, dtype=torch.float64, device=device)
    w = torch.rand(9, dtype=torch.float64, device=device) + 0.5
    f = lambda x: fusedloss.focal_loss(x, t, gamma, alpha, w, reduction="none",  # noqa: E731
                                       backend=backend)
    with fusedloss.reusable_graph():  # gradcheck runs backward many times
        assert torch.autograd.gradcheck(f, (x,))


def test_module(backend, device):
    alpha = torch.rand(11, device=device)
    m = fusedloss.FocalLoss(gamma=2.0, alpha=alpha, reduction="sum", backend=backend)
    x = torch.randn(5, 11, device=device)
    t = torch.randint(0, 11, (5,), device=device)
    assert_close(m(x, t), focal_formula(x, t, 2.0, alpha, None, -100, "sum"), torch.float32)
    assert "alpha" in dict(m.named_buffers())


class TestFocalContract(LossContract):
    fn = fusedloss.focal_loss
    ops = ("focal_loss",)
    module = fusedloss.FocalLoss

    def sample(self, device, dtype, shape=(5, 37, 3)):
        x = (torch.randn(shape, dtype=torch.float64) * 3).to(dtype).to(device)
        t = torch.randint(0, shape[1], (shape[0],) + shape[2:], device=device)
        t.view(-1)[1::4] = -100
        alpha = torch.rand(shape[1], dtype=torch.float64).to(dtype).to(device)
        w = (torch.rand(shape[1], dtype=torch.float64) + 0.3).to(dtype).to(device)
        return Sample((x.requires_grad_(), t), dict(gamma=1.5, alpha=alpha, weight=w))

    def gradcheck_sample(self, device):
        return self.sample(device, torch.float64, shape=(4, 9, 2))

    def expected(self, x, t, gamma, alpha, weight, ignore_index=-100, reduction="mean"):
        return focal_formula(x, t, gamma, alpha, weight, ignore_index, reduction)

    def torch_equivalent(self, x, t, gamma, alpha, weight, ignore_index=-100,
                         reduction="mean"):
        """The same formula, evaluated by torch in the inputs' dtype."""
        logp = torch.log_softmax(x, 1)
        counted = t != ignore_index
        safe = torch.where(counted, t, torch.zeros_like(t))
        logp_t = logp.gather(1, safe.unsqueeze(1)).squeeze(1)
        w_t = weight[safe] * counted
        rows = -((1 - logp_t.exp()) ** gamma) * logp_t * alpha[safe] * w_t
        return rows.sum() / w_t.sum()

    def op_samples(self, device):
        x = torch.randn(4, 33, 2, device=device, requires_grad=True)
        t = torch.tensor([0, 5, -100, 32, 7, 1, 2, 3], device=device)
        alpha = torch.rand(33, device=device)
        return [("focal_loss", dict(x=x, target=t, alpha=alpha, weight=weight,
                                    loss_scale=torch.tensor(0.2, device=device), gamma=0.7,
                                    ignore_index=-100, reduction=r, compute_grad=True))
                for r, weight in ((0, None), (1, torch.rand(33, device=device)))]

    def bad_inputs(self, device):
        x = torch.randn(4, 5, device=device)
        t = torch.tensor([0, 1, 2, 3], device=device)
        return dict(input=x, target=t), [
            (dict(gamma=-1.0), ValueError, "gamma"),
            (dict(alpha=torch.rand(4, device=device)), ValueError, "alpha"),
            (dict(weight=torch.rand(3, device=device)), ValueError, "weight"),
            (dict(target=torch.tensor([0, 1, 2, 5], device=device)), IndexError, "target"),
            (dict(target=torch.rand(4, 5, device=device)), TypeError, "target"),
            (dict(target=t[:3]), ValueError, "target"),
            (dict(reduction="max"), ValueError, "reduction"),
            (dict(ignore_index=1.5), TypeError, "ignore_index"),
        ]
