"""Sigmoid focal loss against torchvision's formula, written here."""
import pytest
import torch
import torch.nn.functional as F

import fusedloss
from conftest import assert_close, assert_matches
from contract import LossContract, Sample


def torchvision_formula(inputs, targets, alpha, gamma, reduction):
    p = torch.sigmoid(inputs)
    ce = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * ((1 - p_t) ** gamma)
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return {"none": loss, "mean": loss.mean(), "sum": loss.sum()}[reduction]


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("alpha", [0.25, -1.0])
@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("shape", [(7,), (5, 13), (2, 3, 33)], ids=str)
def test_matches_torchvision(backend, device, shape, soft, alpha, reduction):
    x = torch.randn(shape, dtype=torch.float64, device=device) * 4
    t = torch.rand(shape, dtype=torch.float64, device=device)
    t = t if soft else (t > 0.7).double()
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours = fusedloss.sigmoid_focal_loss(xa, t, alpha, 1.5, reduction, backend=backend)
    expected = torchvision_formula(xb, t, alpha, 1.5, reduction)
    assert_matches(ours, expected, [xa], [xb])


def test_float32(backend, device):
    x = torch.randn(9, 40, device=device) * 3
    t = (torch.rand(9, 40, device=device) > 0.8).float()
    xa, xb = x.clone().requires_grad_(), x.double().requires_grad_()
    ours = fusedloss.sigmoid_focal_loss(xa, t, reduction="mean", backend=backend)
    expected = torchvision_formula(xb, t.double(), 0.25, 2.0, "mean")
    assert_close(ours, expected, torch.float32)
    ours.backward()
    expected.backward()
    assert_close(xa.grad, xb.grad, torch.float32)


@pytest.mark.parametrize("gamma", [0.0, 0.25, 0.5, 2.0])
def test_stable_and_finite_when_saturated(backend, device, gamma):
    """Logits of +-100: 1 - p_t underflows, and torchvision's gradient would be NaN for
    gamma < 1; ours stays finite and the loss matches the limit."""
    x = torch.tensor([100.0, -100.0, 100.0, -100.0, 30.0], device=device)
    t = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0], device=device)
    xa = x.clone().requires_grad_()
    loss = fusedloss.sigmoid_focal_loss(xa, t, gamma=gamma, backend=backend)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(xa.grad).all()
    assert (loss[:2] < 1e-30).all()  # right and confident: (almost) nothing to learn
    assert_close(loss[2], torch.tensor(0.75 * 100.0), torch.float32)  # wrong & confident


@pytest.mark.parametrize("gamma", [0.5, 2.0])
def test_gradcheck_gamma(backend, device, gamma):
    x = torch.randn(3, 7, dtype=torch.float64, device=device, requires_grad=True)
    t = torch.rand(3, 7, dtype=torch.float64, device=device)
    f = lambda x: fusedloss.sigmoid_focal_loss(x, t, 0.3, gamma, backend=backend)  # noqa: E731
    with fusedloss.reusable_graph():  # gradcheck runs backward many times
        assert torch.autograd.gradcheck(f, (x,))


def test_target_gradient_uses_reference(backend, device):
    x = torch.randn(4, 5, dtype=torch.float64, device=device, requires_grad=True)
    t = torch.rand(4, 5, dtype=torch.float64, device=device, requires_grad=True)
    if backend == "reference":
        loss = fusedloss.sigmoid_focal_loss(x, t, reduction="sum", backend=backend)
        loss.backward()
        assert t.grad is not None and torch.isfinite(t.grad).all()
    else:
        with pytest.raises(ValueError, match="targets"):
            fusedloss.sigmoid_focal_loss(x, t, backend=backend)


def test_module_compiled(kernel_backend, device):
    m = fusedloss.SigmoidFocalLoss(alpha=0.5, gamma=1.0, reduction="sum",
                                   backend=kernel_backend)
    x = torch.randn(6, 10, device=device, requires_grad=True)
    t = (torch.rand(6, 10, device=device) > 0.5).float()
    compiled = torch.compile(m, fullgraph=True)
    assert_close(compiled(x, t), torchvision_formula(x.double(), t.double(), 0.5, 1.0, "sum"),
                 torch.float32)


class TestSigmoidFocalContract(LossContract):
    fn = fusedloss.sigmoid_focal_loss
    ops = ("sigmoid_focal_loss",)
    module = fusedloss.SigmoidFocalLoss

    def sample(self, device, dtype, shape=(5, 3, 13)):
        x = (torch.randn(shape, dtype=torch.float64) * 4).to(dtype).to(device)
        t = torch.rand(shape, dtype=torch.float64).to(dtype).to(device)  # soft targets
        return Sample((x.requires_grad_(), t), dict(alpha=0.25, gamma=1.5, reduction="sum"))

    def gradcheck_sample(self, device):
        return self.sample(device, torch.float64, shape=(3, 7))

    def expected(self, inputs, targets, alpha, gamma, reduction):
        return torchvision_formula(inputs, targets, alpha, gamma, reduction)

    def op_samples(self, device):
        t = (torch.rand(60, device=device) > 0.5).float()
        # acc_loss (autocast): a float32 loss from bfloat16 logits.
        return [("sigmoid_focal_loss", dict(
            x=torch.randn(60, device=device, dtype=dtype, requires_grad=True), target=t,
            loss_scale=torch.tensor(1.0, device=device), alpha=0.25, gamma=2.0, reduction=r,
            acc_loss=dtype != torch.float32, compute_grad=True))
            for r in (0, 2) for dtype in (torch.float32, torch.bfloat16)]

    def bad_inputs(self, device):
        x = torch.randn(4, 5, device=device)
        t = torch.rand(4, 5, device=device)
        return dict(inputs=x, targets=t), [
            (dict(gamma=-0.5), ValueError, "gamma"),
            (dict(alpha=1.5), ValueError, "alpha"),
            (dict(targets=t[:, :4]), ValueError, "targets"),
            (dict(targets=t.long()), TypeError, "targets"),
            (dict(inputs=x.long()), TypeError, "inputs"),
            (dict(reduction="avg"), ValueError, "reduction"),
        ]
