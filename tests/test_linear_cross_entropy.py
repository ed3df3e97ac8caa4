"""fusedloss.linear_cross_entropy against cross_entropy(F.linear(...)) written here, and
against torch's own F.linear_cross_entropy, on every backend: every option, chunk
boundaries that split the rows unevenly, K-dimensional losses, and the module."""
import pytest
import torch
import torch.nn.functional as F

import fusedloss
from conftest import assert_close, assert_matches
from contract import LossContract, Sample
from test_cross_entropy import ce_formula

N, D, C = 37, 16, 50

# torch's own F.linear_cross_entropy / nn.LinearCrossEntropyLoss (torch 2.14 and later).
TORCH_LCE = hasattr(F, "linear_cross_entropy")
needs_torch_lce = pytest.mark.skipif(
    not TORCH_LCE, reason=f"torch {torch.__version__} has no F.linear_cross_entropy")


def linear_formula(x, w, t, *, linear_bias=None, weight=None, reduction="mean",
                   ignore_index=-100, label_smoothing=0.0, z_loss=0.0, softcap=None,
                   logit_scale=1.0, token_weight=None, chunk_size=None, options=None):
    """cross_entropy(F.linear(x, w, b)) with the extras, logits (N, C, d...) for a
    K-dimensional weight (C, d..., D)."""
    logits = F.linear(x, w.reshape(-1, w.shape[-1]),
                      linear_bias.reshape(-1) if linear_bias is not None else None)
    logits = logits.reshape(*x.shape[:-1], *w.shape[:-1])
    if logits.dim() > 2:
        logits = logits  # (N, C, d...): the class dimension is already second
    if x.dim() == 1:  # unbatched: one position
        logits, t = logits[None], t[None]
        token_weight = token_weight[None] if token_weight is not None else None
    out = ce_formula(logits, t, weight, ignore_index, reduction, label_smoothing, z_loss=z_loss,
                     softcap=softcap, logit_scale=logit_scale, token_weight=token_weight)
    return out[0] if x.dim() == 1 and reduction == "none" else out


def torch_lce(x, w, t, linear_bias=None, reduction="mean"):
    """torch's F.linear_cross_entropy; before torch 2.14, what it is defined as:
    F.cross_entropy of F.linear's logits (N, C, d...) for a weight (C, d..., D)."""
    if TORCH_LCE:
        return F.linear_cross_entropy(x, w, t, linear_bias=linear_bias, reduction=reduction)
    logits = F.linear(x, w.flatten(0, -2), None if linear_bias is None else linear_bias.flatten())
    return F.cross_entropy(logits.unflatten(-1, w.shape[:-1]), t, reduction=reduction)


def make(dtype, device, n=N, d=D, c=C, bias=True, target_kind="index", out=()):
    x = (torch.randn(n, d, dtype=torch.float64)).to(dtype).to(device)
    w = (torch.randn(c, *out, d, dtype=torch.float64) / d ** 0.5 * 3).to(dtype).to(device)
    b = torch.randn(c, *out, dtype=torch.float64).to(dtype).to(device) if bias else None
    if target_kind == "index":
        t = torch.randint(0, c, (n, *out), device=device)
        t.view(-1)[::5] = -100
    else:
        t = torch.softmax(torch.randn(n, c, *out, dtype=torch.float64) * 2, 1).to(dtype) \
            .to(device)
    return x, w, b, t


COMBOS = {
    "plain": dict(),
    "all": dict(weight=True, label_smoothing=0.1, z_loss=1e-2),
    "extras": dict(softcap=3.0, logit_scale=1.3, token_weight=True),
}


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("combo", list(COMBOS))
@pytest.mark.parametrize("target_kind", ["index", "probs"])
@pytest.mark.parametrize("chunk_size", [7, 64])
def test_matches_formula_float64(backend, device, chunk_size, target_kind, combo, reduction):
    x, w, b, t = make(torch.float64, device, target_kind=target_kind)
    opts = dict(COMBOS[combo])
    if opts.pop("weight", False):
        opts["weight"] = torch.rand(C, dtype=torch.float64, device=device) + 0.2
    if opts.pop("token_weight", False):
        opts["token_weight"] = torch.rand(N, dtype=torch.float64, device=device) * 2
    leaves_a = [v.clone().requires_grad_() for v in (x, w, b)]
    leaves_b = [v.clone().requires_grad_() for v in (x, w, b)]
    ours = fusedloss.linear_cross_entropy(leaves_a[0], leaves_a[1], t, linear_bias=leaves_a[2],
                                          reduction=reduction, chunk_size=chunk_size,
                                          backend=backend, **opts)
    expected = linear_formula(leaves_b[0], leaves_b[1], t, linear_bias=leaves_b[2],
                              reduction=reduction, **opts)
    assert ours.dtype == torch.float64
    assert_matches(ours, expected, leaves_a, leaves_b)


@needs_torch_lce
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_matches_torch_linear_cross_entropy(backend, device, reduction):
    """torch's own function, on its reference path and on its chunked path."""
    x, w, b, t = make(torch.float64, device)
    weight = torch.rand(C, dtype=torch.float64, device=device) + 0.2
    opts = dict(linear_bias=b, weight=weight, reduction=reduction)
    ours = fusedloss.linear_cross_entropy(x, w, t, chunk_size=9, backend=backend,
                                          label_smoothing=0.05, **opts)
    assert_close(ours, F.linear_cross_entropy(x, w, t, label_smoothing=0.05, **opts))
    chunked = F.linear_cross_entropy(x, w, t, options=torch.nn.LinearCrossEntropyOptions(),
                                     **opts)
    assert_close(fusedloss.linear_cross_entropy(x, w, t, backend=backend, **opts), chunked)


@pytest.mark.parametrize("requires", ["input", "linear_weight", "linear_bias"])
def test_each_gradient_alone(backend, device, requires):
    """Frozen parts (a frozen LM head, frozen features): only what requires grad gets one."""
    x, w, b, t = make(torch.float64, device)
    leaves = dict(input=x, linear_weight=w, linear_bias=b)
    leaves[requires] = leaves[requires].clone().requires_grad_()
    loss = fusedloss.linear_cross_entropy(leaves["input"], leaves["linear_weight"], t,
                                          linear_bias=leaves["linear_bias"], chunk_size=10,
                                          backend=backend)
    loss.backward()
    other = {k: v.detach().clone().requires_grad_() if k == requires else v
             for k, v in leaves.items()}
    linear_formula(other["input"], other["linear_weight"], t,
                   linear_bias=other["linear_bias"]).backward()
    assert_close(leaves[requires].grad, other[requires].grad)


@pytest.mark.parametrize("out", [(3,), (2, 3)], ids=str)
def test_k_dimensional(backend, device, out):
    """linear_weight (C, d1..dK, D): logits (N, C, d1..dK), a loss per (row, position)."""
    x, w, b, t = make(torch.float64, device, n=11, c=13, out=out)
    for reduction in ("none", "mean"):
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ours = fusedloss.linear_cross_entropy(xa, w, t, linear_bias=b, reduction=reduction,
                                              chunk_size=4, backend=backend)
        assert_matches(ours, torch_lce(xb, w, t, linear_bias=b, reduction=reduction),
                       [xa], [xb])


def test_unbatched_input(backend, device):
    x, w, b, t = make(torch.float64, device, n=1)
    x, t = x[0].clone().requires_grad_(), t[0].clone().fill_(3)
    xb = x.detach().clone().requires_grad_()
    ours = fusedloss.linear_cross_entropy(x, w, t, linear_bias=b, backend=backend)
    assert ours.shape == ()
    assert_matches(ours, torch_lce(xb, w, t, linear_bias=b), [x], [xb])


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_all_ignored_and_empty(backend, device, reduction):
    x, w, b, t = make(torch.float64, device)
    t = torch.full_like(t, -100)
    for rows in (N, 0):
        xa, xb = x[:rows].clone().requires_grad_(), x[:rows].clone().requires_grad_()
        ours = fusedloss.linear_cross_entropy(xa, w, t[:rows], linear_bias=b,
                                              reduction=reduction, backend=backend)
        expected = torch_lce(xb, w, t[:rows], linear_bias=b, reduction=reduction)
        assert ours.shape == expected.shape
        assert_close(ours, expected)  # mean: NaN, as torch
        if rows:
            assert_matches(ours, expected, [xa], [xb])


def test_lse_and_entropy(backend, device):
    x, w, b, t = make(torch.float64, device)
    loss, lse, entropy = fusedloss.linear_cross_entropy(
        x, w, t, linear_bias=b, softcap=5.0, return_lse=True, return_entropy=True,
        chunk_size=6, backend=backend)
    z = 5.0 * torch.tanh(F.linear(x, w, b) / 5.0)
    logp = torch.log_softmax(z, 1)
    assert_close(lse, torch.logsumexp(z, 1))
    assert_close(entropy, -(logp.exp() * logp).sum(1))
    assert not lse.requires_grad and not entropy.requires_grad  # nothing required grad
    # With leaves that require grad, the entropy carries its gradient (an entropy bonus).
    leaves = [v.clone().requires_grad_() for v in (x, w, b)]
    refs = [v.clone().requires_grad_() for v in (x, w, b)]
    loss, entropy = fusedloss.linear_cross_entropy(
        leaves[0], leaves[1], t, linear_bias=leaves[2], softcap=5.0, return_entropy=True,
        chunk_size=6, backend=backend)
    h = torch.randn(entropy.shape, dtype=torch.float64, device=device)
    (loss + (entropy * h).sum()).backward()
    logp = torch.log_softmax(5.0 * torch.tanh(F.linear(*refs) / 5.0), 1)
    (linear_formula(refs[0], refs[1], t, linear_bias=refs[2], softcap=5.0)
     - ((logp.exp() * logp).sum(1) * h).sum()).backward()
    for a, e in zip(leaves, refs):
        assert_close(a.grad, e.grad)


def test_second_backward_needs_reusable_graph(kernel_backend, device):
    x, w, b, t = make(torch.float64, device)
    w.requires_grad_()
    loss = fusedloss.linear_cross_entropy(x, w, t, linear_bias=b, backend=kernel_backend)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="reusable_graph"):
        loss.backward()
    w.grad = None
    with fusedloss.reusable_graph():
        loss = fusedloss.linear_cross_entropy(x, w, t, linear_bias=b, backend=kernel_backend)
    loss.backward(retain_graph=True)
    loss.backward()
    wb = w.detach().clone().requires_grad_()
    linear_formula(x, wb, t, linear_bias=b).backward()
    assert_close(w.grad, 2 * wb.grad)


@needs_torch_lce
def test_module_is_drop_in(backend, device):
    """Same constructor, same state_dict keys, same losses and weights as torch's module
    over a few training steps."""
    kw = dict(bias=True, reduction="mean", label_smoothing=0.05, ignore_index=-1)

    def train(cls, **extra):
        torch.manual_seed(2)
        m = cls(16, 29, dtype=torch.float64, device=device, **kw, **extra)
        opt = torch.optim.SGD(m.parameters(), lr=0.5)
        losses = []
        for _ in range(4):
            x = torch.randn(21, 16, dtype=torch.float64, device=device)
            t = torch.randint(-1, 29, (21,), device=device)
            loss = m(x, t)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        return torch.stack(losses), m.state_dict()

    la, sa = train(fusedloss.LinearCrossEntropyLoss, backend=backend, chunk_size=5)
    lb, sb = train(torch.nn.LinearCrossEntropyLoss)
    assert list(sa) == list(sb)
    assert_close(la, lb)
    for k in sa:
        assert_close(sa[k], sb[k])
    # A state_dict moves between the two modules.
    m = fusedloss.LinearCrossEntropyLoss(16, 29, bias=True, dtype=torch.float64)
    m.load_state_dict(sb)


@needs_torch_lce
def test_k_dimensional_module_matches_torch():
    a = fusedloss.LinearCrossEntropyLoss(8, 5, out_features=(3,), bias=True)
    b = torch.nn.LinearCrossEntropyLoss(8, 5, out_features=(3,), bias=True)
    b.load_state_dict(a.state_dict())
    x, t = torch.randn(6, 8), torch.randint(0, 5, (6, 3))
    assert_close(a(x, t), b(x, t), torch.float32)


@needs_torch_lce
def test_options_are_accepted():
    x, w, b, t = make(torch.float32, "cpu")
    opts = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=8)
    assert_close(fusedloss.linear_cross_entropy(x, w, t, options=opts),
                 F.linear_cross_entropy(x, w, t), torch.float32)
    assert_close(fusedloss.linear_cross_entropy(x, w, t, ignore_index=None),
                 F.linear_cross_entropy(x, w, t), torch.float32)


def test_default_chunk_size():
    from fusedloss.linear_cross_entropy import default_chunk_size
    assert default_chunk_size(10, 512, 32000, torch.float32, "cpu") == 10  # fewer rows
    rows = default_chunk_size(100000, 512, 32000, torch.float32, "cpu")
    assert 16 <= rows < 100000 and rows % 8 == 0
    assert rows * 32000 * 4 <= 15 << 20  # one chunk of logits within its budget


def test_lm_head_runs_accelerate_hooks():
    """accelerate's hooks wrap a module's forward (add_hook_to_module): an offloaded head's
    weight is on the meta device except inside its forward, where the hook loads it.
    lm_head_cross_entropy runs the hook, once, and equals the loss and input gradient of
    cross_entropy(head(x)); the hook offloads the weight again after."""
    hooks = pytest.importorskip("accelerate.hooks")
    head = torch.nn.Linear(16, 40)
    x = torch.randn(6, 16, requires_grad=True)
    t = torch.tensor([3, -100, 39, 0, 7, 7])
    expected = F.cross_entropy(head(x), t)
    expected_grad, = torch.autograd.grad(expected, x)
    weights = {k: v.detach().clone() for k, v in head.state_dict().items()}
    hooks.add_hook_to_module(head, hooks.AlignDevicesHook(
        execution_device="cpu", offload=True, weights_map=weights))
    assert head.weight.is_meta
    hooked = dict(vars(head))
    loads = []
    pre_forward = head._hf_hook.pre_forward
    head._hf_hook.pre_forward = lambda *a, **k: loads.append(1) or pre_forward(*a, **k)
    loss = fusedloss.lm_head_cross_entropy(head, x, t, chunk_size=4)
    assert loads == [1] and head.weight.is_meta
    assert_close(loss, expected)
    assert_close(torch.autograd.grad(loss, x)[0], expected_grad)
    for name in ("forward", "_old_forward"):  # the hook stays as it was
        assert vars(head)[name] is hooked[name]


class TestLinearCrossEntropyContract(LossContract):
    fn = fusedloss.linear_cross_entropy
    ops = ("linear_cross_entropy",)
    module = fusedloss.LinearCrossEntropyLoss

    def sample(self, device, dtype, n=N, d=D, c=C, chunk=8):
        x, w, b, t = make(dtype, device, n=n, d=d, c=c)
        weight = (torch.rand(c, dtype=torch.float64) + 0.2).to(dtype).to(device)
        tw = (torch.rand(n, dtype=torch.float64) * 2).to(dtype).to(device)
        return Sample((x.requires_grad_(), w.requires_grad_(), t),
                      dict(linear_bias=b.requires_grad_(), weight=weight, label_smoothing=0.1,
                           z_loss=1e-2, softcap=3.0, logit_scale=1.3, token_weight=tw,
                           chunk_size=chunk))

    def gradcheck_sample(self, device):
        return self.sample(device, torch.float64, n=5, d=4, c=7, chunk=2)

    def module_call(self, sample, backend):
        # The module owns the linear layer, as torch's: the sample's becomes its own.
        (x, w, t), kwargs = sample.args, dict(sample.kwargs)
        bias, token_weight = kwargs.pop("linear_bias"), kwargs.pop("token_weight")
        options = dict(in_features=w.shape[1], num_classes=w.shape[0], bias=True,
                       backend=backend, **kwargs)
        module = fusedloss.LinearCrossEntropyLoss(**options, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            module.linear.weight.copy_(w)
            module.linear.bias.copy_(bias)
        return module, options, Sample((x, t), dict(token_weight=token_weight))

    def expected(self, x, w, t, **kwargs):
        return linear_formula(x, w, t, **kwargs)

    def op_samples(self, device):
        x, w, b, t = make(torch.float32, device, n=9, d=8, c=11)
        common = dict(input=x.requires_grad_(), linear_weight=w.requires_grad_(),
                      linear_bias=b.requires_grad_(), target=t, weight=None, row_weight=None,
                      loss_scale=torch.tensor(0.1, device=device), num_classes=11,
                      ignore_index=-100, label_smoothing=0.1, logit_scale=1.0, softcap=0.0,
                      z_loss=0.0, compute_lse=True, compute_entropy=False, chunk_size=4)
        p = torch.softmax(torch.randn(9, 11, 1, device=device), 1)
        return [
            ("linear_cross_entropy", dict(common, reduction=1, grad_input=True,
                                          grad_weight=True, grad_bias=True)),
            ("linear_cross_entropy", dict(common, reduction=0, grad_input=False,
                                          grad_weight=False, grad_bias=False,
                                          row_weight=torch.rand(9, device=device),
                                          compute_lse=False, compute_entropy=True)),
            ("linear_cross_entropy", dict(common, target=p, reduction=2, grad_input=True,
                                          grad_weight=False, grad_bias=True, softcap=4.0)),
            ("linear_cross_entropy", dict(common, reduction=1, grad_input=True,
                                          grad_weight=True, grad_bias=False,
                                          compute_lse=False)),
        ]

    def bad_inputs(self, device):
        x, w, b, t = make(torch.float32, device, n=4, d=8, c=5)
        t = torch.tensor([0, 1, 2, 3], device=device)
        return dict(input=x, linear_weight=w, target=t), [
            (dict(linear_weight=torch.randn(5, 7, device=device)), ValueError, "in_features"),
            (dict(linear_weight=torch.randn(5, device=device)), ValueError, "linear_weight"),
            (dict(linear_weight=w.double()), TypeError, "linear_weight"),
            (dict(input=torch.randn(2, 2, 8, device=device)), ValueError, "flatten"),
            (dict(input=x.long()), TypeError, "input"),
            (dict(linear_bias=torch.randn(4, device=device)), ValueError, "linear_bias"),
            (dict(linear_bias=torch.randn(5, device=device).double()), TypeError,
             "linear_bias"),
            (dict(target=torch.tensor([0, 1, 2], device=device)), ValueError, "target"),
            (dict(target=torch.tensor([0, 1, 2, 5], device=device)), IndexError, "target"),
            (dict(target=t.int()), TypeError, "target"),
            (dict(weight=torch.rand(4, device=device)), ValueError, "weight"),
            (dict(weight=torch.rand(5, device=device).double()), TypeError, "weight"),
            (dict(token_weight=torch.rand(3, device=device)), ValueError, "token_weight"),
            (dict(chunk_size=0), ValueError, "chunk_size"),
            (dict(reduction="avg"), ValueError, "reduction"),
            (dict(label_smoothing=2.0), ValueError, "label_smoothing"),
        ]
