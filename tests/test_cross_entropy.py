"""fusedloss.cross_entropy against torch.nn.functional.cross_entropy, on every backend.

Sizes are small (the Triton backend runs in the interpreter on the CPU) but never round:
C = 37 and 300 (several Triton blocks), spatial dims, ignored rows, every option.
"""
import pytest
import torch
import torch.nn.functional as F

import fusedloss
from conftest import assert_close, assert_matches
from contract import LossContract, Sample

SHAPES = [(37,), (6, 37), (5, 300), (3, 37, 4), (2, 11, 3, 2)]
COMBOS = {
    "plain": dict(),
    "weight": dict(weight=True),
    "smoothing": dict(label_smoothing=0.15),
    "ignore": dict(ignore_index=3),
    "all": dict(weight=True, label_smoothing=0.1, ignore_index=-100),
}


def make_inputs(shape, target_kind, dtype, device, ignore_index=-100, weight=False):
    x = (torch.randn(shape, dtype=torch.float64) * 3).to(dtype).to(device)
    class_dim = 0 if len(shape) == 1 else 1
    n_classes = shape[class_dim]
    if target_kind == "index":
        t_shape = shape[:class_dim] + shape[class_dim + 1:]
        t = torch.randint(0, n_classes, t_shape, device=device)
        if t.dim() > 0 and t.numel() > 2:
            t.view(-1)[::3] = ignore_index  # some ignored positions (or class 3: see COMBOS)
    else:
        t = torch.softmax(torch.randn(shape, dtype=torch.float64) * 2, class_dim)
        t = t.to(dtype).to(device)
    w = (torch.rand(n_classes, dtype=torch.float64) + 0.2).to(dtype).to(device) if weight \
        else None
    return x, t, w


def run_both(x, t, backend, **kw):
    """(ours, torch's) loss and input gradient for the same inputs and arguments."""
    xa = x.detach().clone().requires_grad_()
    xb = x.detach().clone().requires_grad_()
    ours = fusedloss.cross_entropy(xa, t, backend=backend, **kw)
    theirs = F.cross_entropy(xb, t, **kw)
    g = torch.randn_like(ours)  # a random upstream gradient, not just ones
    (ours * g).sum().backward()
    (theirs * g).sum().backward()
    return ours, theirs, xa.grad, xb.grad


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("combo", list(COMBOS))
@pytest.mark.parametrize("target_kind", ["index", "probs"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_torch_float64(backend, device, shape, target_kind, combo, reduction):
    opts = dict(COMBOS[combo])
    if target_kind == "probs" and "ignore_index" in opts:
        opts.pop("ignore_index")  # torch refuses ignore_index with probability targets
    x, t, w = make_inputs(shape, target_kind, torch.float64, device,
                          opts.get("ignore_index", -100), opts.pop("weight", False))
    ours, theirs, ga, gb = run_both(x, t, backend, weight=w, reduction=reduction, **opts)
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    assert_close(ours, theirs)
    assert_close(ga, gb)


@pytest.mark.parametrize("combo", ["plain", "all"])
@pytest.mark.parametrize("target_kind", ["index", "probs"])
@pytest.mark.parametrize("shape", [(6, 37), (5, 300), (3, 37, 4)], ids=str)
def test_matches_torch_float32(backend, device, shape, target_kind, combo):
    opts = dict(COMBOS[combo])
    x, t, w = make_inputs(shape, target_kind, torch.float32, device,
                          opts.get("ignore_index", -100), opts.pop("weight", False))
    ours, theirs, ga, gb = run_both(x, t, backend, weight=w, **opts)
    ref, _ = fusedloss.reference.cross_entropy(x.double(), t.double() if t.is_floating_point()
                                               else t, w.double() if w is not None else None,
                                               **opts)
    assert_close(ours, ref, torch.float32)
    assert_close(ga, gb, torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_no_worse_than_torch(backend, device, dtype):
    """bf16/fp16: loss and gradient errors against float64 at most twice torch's own error
    in that dtype on the same inputs."""
    x, t, _ = make_inputs((8, 300), "index", dtype, device)
    kw = dict(reduction="none", label_smoothing=0.1)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    xe = x.double().requires_grad_()
    ours = fusedloss.cross_entropy(xa, t, backend=backend, **kw)
    theirs = F.cross_entropy(xb, t, **kw)
    exact = F.cross_entropy(xe, t, **kw)
    g = torch.rand(8, dtype=torch.float64, device=device) + 0.5
    (ours * g.to(dtype)).sum().backward()
    (theirs * g.to(dtype)).sum().backward()
    (exact * g.to(dtype).double()).sum().backward()
    assert ours.dtype == dtype and xa.grad.dtype == dtype
    for mine, torchs, truth in [(ours, theirs, exact), (xa.grad, xb.grad, xe.grad)]:
        err_ours = (mine.double() - truth).abs().max()
        err_torch = (torchs.double() - truth).abs().max()
        assert err_ours <= 2 * err_torch + 1e-6, (err_ours, err_torch)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_logit_scale_softcap_zloss_lse(backend, device, reduction):
    """The extras against formulas written here, independent of fusedloss.reference."""
    x, t, w = make_inputs((5, 300), "index", torch.float64, device, weight=True)
    s, cap, z = 0.7, 4.0, 1e-2
    xa = x.clone().requires_grad_()
    xb = x.clone().requires_grad_()
    ours, lse = fusedloss.cross_entropy(xa, t, w, reduction=reduction, logit_scale=s,
                                        softcap=cap, z_loss=z, return_lse=True,
                                        backend=backend)
    zl = cap * torch.tanh(xb * s / cap)
    lse_b = torch.logsumexp(zl, 1)
    counted = t != -100
    w_t = torch.where(counted, w[t.clamp_min(0)], torch.zeros((), dtype=w.dtype))
    rows = F.cross_entropy(zl, t, w, reduction="none") + z * w_t * lse_b ** 2
    expected = {"none": rows, "sum": rows.sum(), "mean": rows.sum() / w_t.sum()}[reduction]
    assert_close(lse, lse_b)
    assert not lse.requires_grad
    assert_matches(ours, expected, [xa], [xb])


def test_return_lse_shapes(backend, device):
    for shape in [(37,), (6, 37), (3, 37, 4)]:
        x, t, _ = make_inputs(shape, "index", torch.float32, device)
        loss, lse = fusedloss.cross_entropy(x, t, return_lse=True, backend=backend)
        assert lse.shape == t.shape
        assert_close(lse, torch.logsumexp(x.double(), 0 if len(shape) == 1 else 1),
                     torch.float32)


@pytest.mark.parametrize("target_kind", ["index", "probs"])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_empty_batch(backend, device, target_kind, reduction):
    x = torch.randn(0, 7, device=device, requires_grad=True)
    t = (torch.zeros(0, dtype=torch.long, device=device) if target_kind == "index"
         else torch.zeros(0, 7, device=device))
    ours = fusedloss.cross_entropy(x, t, reduction=reduction, backend=backend)
    theirs = F.cross_entropy(x, t, reduction=reduction)
    assert ours.shape == theirs.shape
    assert_close(ours, theirs)
    ours.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("weighted", [False, True])
def test_all_ignored(backend, device, weighted):
    x = torch.randn(4, 9, dtype=torch.float64, device=device)
    t = torch.full((4,), -100, device=device)
    w = torch.rand(9, dtype=torch.float64, device=device) if weighted else None
    for reduction in ["mean", "sum", "none"]:
        ours, theirs, ga, gb = run_both(x, t, backend, weight=w, reduction=reduction,
                                        label_smoothing=0.2)
        assert_close(ours, theirs)  # mean: NaN, as torch
        assert_close(ga, gb)  # zeros


def test_nan_and_inf_propagate(backend, device):
    x = torch.randn(4, 50, device=device)
    x[1, 7] = float("nan")
    x[2, 3] = float("inf")
    t = torch.tensor([0, 1, 2, 3], device=device)
    ours = fusedloss.cross_entropy(x, t, reduction="none", backend=backend)
    theirs = F.cross_entropy(x, t, reduction="none")
    assert_close(ours, theirs)
    assert torch.isnan(ours[1]) and torch.isfinite(ours[0])


def test_uint8_targets_and_noncontiguous_input(backend, device):
    x = torch.randn(37, 6, dtype=torch.float64, device=device).T  # (6, 37), not contiguous
    t = torch.randint(0, 37, (6,), device=device).to(torch.uint8)
    ours, theirs, ga, gb = run_both(x, t, backend)
    assert_close(ours, theirs)
    assert_close(ga, gb)


def test_no_grad_inference(backend, device):
    x, t, w = make_inputs((6, 300), "index", torch.float32, device, weight=True)
    with torch.no_grad():
        ours = fusedloss.cross_entropy(x, t, w, backend=backend)
    assert_close(ours, F.cross_entropy(x, t, w))


def test_second_backward(kernel_backend, device):
    """The gradient buffer is scaled in place by the backward: a second backward through the
    same graph raises a clear error, unless the loss was built in reusable_graph()."""
    x, t, _ = make_inputs((6, 37), "index", torch.float64, device)
    x.requires_grad_()
    loss = fusedloss.cross_entropy(x, t, backend=kernel_backend)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="reusable_graph"):
        loss.backward()
    x.grad = None
    with fusedloss.reusable_graph():
        loss = fusedloss.cross_entropy(x, t, backend=kernel_backend)
    loss.backward(retain_graph=True)
    loss.backward()
    xe = x.detach().clone().requires_grad_()
    F.cross_entropy(xe, t).backward()
    assert_close(x.grad, 2 * xe.grad)


def test_module_is_drop_in(backend, device):
    """Training a small model with fusedloss.CrossEntropyLoss in place of torch's gives the
    same losses and weights (float32 within 1e-5 relative)."""
    def train(loss_fn):
        torch.manual_seed(1)
        model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(),
                                    torch.nn.Linear(32, 37)).to(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        xs = torch.randn(8, 24, 16, device=device)
        ys = torch.randint(0, 37, (8, 24), device=device)
        ys[:, ::5] = -100
        losses = []
        for x, y in zip(xs, ys):
            loss = loss_fn(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        return torch.stack(losses), torch.cat([p.detach().flatten() for p in model.parameters()])

    w = torch.rand(37, device=device) + 0.5
    kw = dict(weight=w, label_smoothing=0.05)
    la, pa = train(fusedloss.CrossEntropyLoss(backend=backend, **kw))
    lb, pb = train(torch.nn.CrossEntropyLoss(**kw))
    torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


def test_inplace_backward(kernel_backend, device):
    x, t, w = make_inputs((6, 300), "index", torch.float32, device, weight=True)
    expected_grad = None
    xb = x.clone().requires_grad_()
    F.cross_entropy(xb, t, w, label_smoothing=0.1).backward()
    expected_grad = xb.grad

    logits_leaf = x.clone().requires_grad_()
    h = logits_leaf * 1.0  # a non-leaf logits buffer, as a model's output is
    loss = fusedloss.cross_entropy(h, t, w, label_smoothing=0.1, inplace_backward=True,
                                   backend=kernel_backend)
    assert_close(loss, F.cross_entropy(x, t, w, label_smoothing=0.1), torch.float32)
    assert not torch.equal(h.detach(), x)  # the logits buffer now holds the gradient
    loss.backward()
    assert_close(logits_leaf.grad, expected_grad, torch.float32)

    # Misuse: an earlier op saved the logits for its backward; the overwrite must raise.
    a = x.clone().requires_grad_()
    logits = a.exp()  # exp saves its output
    loss = fusedloss.cross_entropy(logits, t, inplace_backward=True, backend=kernel_backend)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


# ---------------------------------------------------------------- bad input
BAD_CASES = [
    ("reduction", dict(reduction="avg"), ValueError),
    ("label_smoothing", dict(label_smoothing=1.5), ValueError),
    ("label_smoothing", dict(label_smoothing=-0.1), ValueError),
    ("logit_scale", dict(logit_scale=0.0), ValueError),
    ("softcap", dict(softcap=-1.0), ValueError),
    ("z_loss", dict(z_loss=-1.0), ValueError),
    ("ignore_index", dict(ignore_index=1.5), TypeError),
]


@pytest.mark.parametrize("argument,kwargs,error", BAD_CASES, ids=lambda v: str(v)[:20])
def test_bad_arguments(argument, kwargs, error):
    x, t = torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    with pytest.raises(error, match=argument):
        fusedloss.cross_entropy(x, t, **kwargs)


def test_unavailable_backend_names_alternatives():
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    with pytest.raises(RuntimeError, match=r"backend='cuda' is not available: .*Available"):
        fusedloss.cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]), backend="cuda")


def test_module_arguments_are_torchs():
    """CrossEntropyLoss takes torch's positional arguments in torch's order."""
    w = torch.rand(5)
    m = fusedloss.CrossEntropyLoss(w, -1, "sum", 0.1)
    ref = torch.nn.CrossEntropyLoss(w, ignore_index=-1, reduction="sum", label_smoothing=0.1)
    x, t = torch.randn(4, 5), torch.tensor([0, -1, 2, 3])
    assert_close(m(x, t), ref(x, t), torch.float32)
    with pytest.raises(ValueError, match="reduction"):
        fusedloss.CrossEntropyLoss(reduction="bad")


def test_bad_backend_name():
    with pytest.raises(ValueError, match="backend"):
        fusedloss.cross_entropy(torch.randn(4, 5), torch.tensor([0, 1, 2, 3]), backend="tpu")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_negative_weights(backend, device, reduction):
    """torch divides the mean by the total weight even when it is negative (its OpInfo
    samples include this); only a total of exactly 0 gives NaN."""
    x, t, _ = make_inputs((6, 37), "index", torch.float64, device)
    w = torch.rand(37, dtype=torch.float64, device=device) - 0.8
    ours, theirs, ga, gb = run_both(x, t, backend, weight=w, reduction=reduction,
                                    label_smoothing=0.1)
    assert torch.isfinite(ours).all()
    assert_close(ours, theirs)
    assert_close(ga, gb)


def test_zero_total_weight_is_nan(backend, device):
    """A total weight of 0 with counted positions: NaN loss and, as torch, NaN gradient
    rows for them (0 / 0) and zero rows for the ignored positions."""
    x, t, _ = make_inputs((6, 37), "index", torch.float64, device)
    w = torch.ones(37, dtype=torch.float64, device=device)
    w[t[t != -100]] = 0.0
    ours, theirs, ga, gb = run_both(x, t, backend, weight=w)
    assert torch.isnan(ours) and torch.isnan(theirs)
    assert_close(ga, gb)


def test_gradient_penalty_through_a_layer(backend, device):
    """The issue's case: an input-gradient penalty through a linear layer gives torch's
    weight gradient (it was 13% off when the saved gradient was treated as a constant)."""
    def weight_grad(loss_fn):
        torch.manual_seed(5)
        lin = torch.nn.Linear(8, 37, dtype=torch.float64).to(device)
        inp = torch.randn(6, 8, dtype=torch.float64, device=device, requires_grad=True)
        t = torch.randint(0, 37, (6,), device=device)
        loss = loss_fn(lin(inp), t)
        g, = torch.autograd.grad(loss, inp, create_graph=True)
        g.pow(2).sum().backward()
        return lin.weight.grad
    assert_close(weight_grad(lambda z, t: fusedloss.cross_entropy(z, t, backend=backend)),
                 weight_grad(F.cross_entropy))


def ce_formula(x, t, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0,
               *, z_loss=0.0, softcap=None, logit_scale=1.0, token_weight=None):
    """cross_entropy with its extras, from torch ops: the scaled and capped logits into
    F.cross_entropy, plus z_loss * w_t * lse^2 per counted position, times token_weight;
    the mean over the counted w_t * token_weight (over token_weight for probabilities)."""
    z = x * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    rows = F.cross_entropy(z, t, weight, ignore_index=ignore_index, reduction="none",
                           label_smoothing=label_smoothing)
    if t.is_floating_point():
        w_t = torch.ones_like(rows)
    else:
        counted = t != ignore_index
        w_t = (weight[t.clamp_min(0)] if weight is not None else torch.ones_like(rows)) * counted
    rows = rows + z_loss * w_t * torch.logsumexp(z, 1) ** 2
    if token_weight is not None:
        rows, w_t = rows * token_weight, w_t * token_weight
    return {"none": rows, "sum": rows.sum(), "mean": rows.sum() / w_t.sum()}[reduction]


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("target_kind", ["index", "probs"])
def test_token_weight(backend, device, target_kind, reduction):
    x, t, w = make_inputs((5, 37, 3), target_kind, torch.float64, device, weight=True)
    tw = torch.rand(5, 3, dtype=torch.float64, device=device) * 2
    opts = dict(weight=w, reduction=reduction, label_smoothing=0.1, z_loss=1e-2)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours = fusedloss.cross_entropy(xa, t, token_weight=tw, backend=backend, **opts)
    assert_matches(ours, ce_formula(xb, t, token_weight=tw, **opts), [xa], [xb])
    ones = fusedloss.cross_entropy(x, t, token_weight=torch.ones_like(tw), backend=backend,
                                   **opts)
    assert_close(ones, ce_formula(x, t, **opts))  # weights of 1 change nothing


def test_token_weight_gradient_uses_reference(backend, device):
    x, t, _ = make_inputs((6, 37), "index", torch.float64, device)
    tw = torch.rand(6, dtype=torch.float64, device=device, requires_grad=True)
    if backend == "reference":
        fusedloss.cross_entropy(x, t, token_weight=tw, backend=backend).backward()
        twb = tw.detach().clone().requires_grad_()
        ce_formula(x, t, token_weight=twb).backward()
        assert_close(tw.grad, twb.grad)
    else:
        with pytest.raises(ValueError, match="token_weight"):
            fusedloss.cross_entropy(x, t, token_weight=tw, backend=backend)
    tw.grad = None
    fusedloss.cross_entropy(x, t, token_weight=tw).backward()  # auto: the reference
    assert tw.grad is not None


@pytest.mark.parametrize("shape", [(37,), (6, 300), (3, 37, 4)], ids=str)
def test_entropy(backend, device, shape):
    x, t, w = make_inputs(shape, "index", torch.float64, device, weight=True)
    x = x.clone()
    x.view(-1)[5] = float("-inf")  # a class with probability 0: contributes 0, not NaN
    class_dim = 0 if len(shape) == 1 else 1
    xa = x.clone().requires_grad_()
    loss, lse, entropy = fusedloss.cross_entropy(xa, t, w, logit_scale=0.8, softcap=4.0,
                                                 return_lse=True, return_entropy=True,
                                                 backend=backend)
    z = 4.0 * torch.tanh(x * 0.8 / 4.0)
    logp = torch.log_softmax(z, class_dim)
    expected = -(logp.exp() * torch.where(logp.exp() > 0, logp, 0)).sum(class_dim)
    assert entropy.shape == t.shape and entropy.requires_grad and not lse.requires_grad
    assert_close(entropy, expected)
    assert_close(lse, torch.logsumexp(z, class_dim))
    loss.backward(retain_graph=True)  # the extras do not change the loss or its gradient
    xb = x.clone().requires_grad_()
    ce_formula(xb if len(shape) > 1 else xb[None], t if len(shape) > 1 else t[None], w,
               logit_scale=0.8, softcap=4.0).backward()
    assert_close(xa.grad, xb.grad)
    # The entropy's own gradient (an entropy bonus), alone: as the formula's.
    h = torch.randn(t.shape, dtype=torch.float64, device=device)
    (got,) = torch.autograd.grad((entropy * h).sum(), xa)
    xc = x.clone().requires_grad_()
    logp_c = torch.log_softmax(4.0 * torch.tanh(xc * 0.8 / 4.0), class_dim)
    formula_h = -(logp_c.exp() * torch.where(logp_c.exp() > 0, logp_c, 0)).sum(class_dim)
    (want,) = torch.autograd.grad((formula_h * h).sum(), xc)
    assert_close(got, want)
    only = fusedloss.cross_entropy(x, t, w, return_entropy=True, backend=backend)
    assert len(only) == 2
    with torch.no_grad():  # without a gradient pass
        assert_close(fusedloss.cross_entropy(x, t, w, logit_scale=0.8, softcap=4.0,
                                             return_entropy=True, backend=backend)[1],
                     expected)


class TestCrossEntropyContract(LossContract):
    fn = fusedloss.cross_entropy
    ops = ("cross_entropy", "cross_entropy_inplace")
    module = fusedloss.CrossEntropyLoss

    def sample(self, device, dtype, shape=(5, 37, 3)):
        x = (torch.randn(shape, dtype=torch.float64) * 3).to(dtype).to(device)
        t = torch.randint(0, shape[1], (shape[0],) + shape[2:], device=device)
        t.view(-1)[::4] = -100
        w = (torch.rand(shape[1], dtype=torch.float64) + 0.2).to(dtype).to(device)
        tw = (torch.rand(t.shape, dtype=torch.float64) * 2).to(device)
        return Sample((x.requires_grad_(), t, w),
                      dict(label_smoothing=0.1, z_loss=1e-2, softcap=3.0, logit_scale=1.3,
                           token_weight=tw.to(dtype)))

    def gradcheck_sample(self, device):
        return self.sample(device, torch.float64, shape=(3, 13, 2))

    def expected(self, *args, **kwargs):
        return ce_formula(*args, **kwargs)

    def op_samples(self, device):
        x = torch.randn(4, 33, 2, device=device, requires_grad=True)
        t = torch.tensor([0, 5, -100, 32, 7, 1, 2, 3], device=device)
        common = dict(weight=torch.rand(33, device=device), row_weight=None,
                      loss_scale=torch.tensor(0.25, device=device), ignore_index=-100,
                      label_smoothing=0.1, logit_scale=1.0, softcap=0.0, z_loss=0.0,
                      compute_entropy=False)
        p = torch.softmax(torch.randn(4, 33, 2, device=device), 1)
        probs = dict(common, weight=None, label_smoothing=0.0, logit_scale=2.0, softcap=5.0,
                     z_loss=1e-3, row_weight=torch.rand(8, device=device),
                     compute_entropy=True)
        return [("cross_entropy", dict(common, x=x, target=t, reduction=r, compute_grad=True))
                for r in (0, 1)] + [
            ("cross_entropy", dict(probs, x=x, target=p, reduction=2, compute_grad=True)),
            ("cross_entropy", dict(common, x=x.detach(), target=t, reduction=1,
                                   compute_grad=False)),
            ("cross_entropy_inplace", dict(common, x=x.detach().clone(), target=t,
                                           reduction=0)),
            ("cross_entropy_inplace", dict(probs, x=x.detach().clone(), target=p,
                                           reduction=1))]

    def bad_inputs(self, device):
        x = torch.randn(4, 5, device=device)
        t = torch.tensor([0, 1, 2, 3], device=device)
        return dict(input=x, target=t), [
            (dict(target=torch.tensor([0, 1, 2, 7], device=device)), IndexError, "target"),
            (dict(target=torch.tensor([0, 1, -2, 3], device=device)), IndexError, "target"),
            (dict(target=torch.tensor([0, 1, 2], device=device)), ValueError, "target"),
            (dict(target=t.int()), TypeError, "target"),
            (dict(target=torch.rand(4, 6, device=device)), ValueError, "target"),
            (dict(target=torch.rand(4, 5, device=device), ignore_index=3), ValueError,
             "ignore_index"),
            (dict(weight=torch.rand(6, device=device)), ValueError, "weight"),
            (dict(weight=torch.rand(5, device=device).double()), TypeError, "weight"),
            (dict(input=x.long()), TypeError, "input"),
            (dict(input=torch.tensor(1.0, device=device)), ValueError, "input"),
            *[(kwargs, error, argument) for argument, kwargs, error in BAD_CASES
              if argument != "backend"],
        ]


def test_gradcheck_probability_targets(backend, device):
    x = torch.randn(3, 13, 2, dtype=torch.float64, device=device, requires_grad=True)
    p = torch.softmax(torch.randn(3, 13, 2, dtype=torch.float64, device=device), 1)
    w = torch.rand(13, dtype=torch.float64, device=device) + 0.5
    f = lambda x: fusedloss.cross_entropy(x, p, w, label_smoothing=0.1, z_loss=1e-2,  # noqa: E731
                                          backend=backend)
    with fusedloss.reusable_graph():  # gradcheck runs backward many times
        assert torch.autograd.gradcheck(f, (x,))
        assert torch.autograd.gradgradcheck(f, (x,))
