"""Token log-probs and entropy (log_probs, linear_log_probs) against the formulas written
here in float64, on every backend: every option, upstream gradients on the log-probs and
the entropy alone and together, chunk boundaries, leading dimensions, the extras, and the
memory of the fused head."""

import pytest
import torch
import torch.nn.functional as F

import fusedloss
from fusedloss import _library
from conftest import assert_close, backend_device
from contract import LossContract, Sample

N, D, V = 23, 12, 41
EXTRAS = ("lse", "log_sum_sq_probs", "mean_logits", "is_top1")


def formula(logits, target, *, temperature=1.0, logit_scale=1.0, softcap=None,
            ignore_index=-100):
    """Every output as the definitions read: z = softcap(logit_scale x) / T, p = softmax z."""
    u = logits * logit_scale
    y = softcap * torch.tanh(u / softcap) if softcap is not None else u
    t_ = temperature if not isinstance(temperature, torch.Tensor) else \
        temperature.to(y.dtype).broadcast_to(target.shape)[..., None]
    z = y / t_
    logp = z - torch.logsumexp(z, -1, keepdim=True)
    counted = target != ignore_index
    lp = logp.gather(-1, torch.where(counted, target, 0)[..., None]).squeeze(-1)
    p = logp.exp()
    entropy = -torch.special.xlogy(p, p).sum(-1)
    out = dict(log_probs=lp, entropy=entropy, lse=torch.logsumexp(z, -1),
               log_sum_sq_probs=torch.log((p * p).sum(-1)), mean_logits=z.mean(-1))
    out = {k: torch.where(counted, v, torch.zeros_like(v)) for k, v in out.items()}
    out["is_top1"] = counted & (z.argmax(-1) == target)
    return out


def make(shape, dtype, device, v=V, scale=3.0, ignore_every=4):
    x = (torch.randn(*shape, v, dtype=torch.float64) * scale).to(dtype).to(device)
    t = torch.randint(0, v, shape, device=device)
    t.view(-1)[::ignore_every] = -100
    return x, t


def heads(n, d, v, dtype, device, bias=True):
    x = torch.randn(n, d, dtype=torch.float64).to(dtype).to(device)
    w = (torch.randn(v, d, dtype=torch.float64) * 3 / d ** 0.5).to(dtype).to(device)
    b = torch.randn(v, dtype=torch.float64).to(dtype).to(device) if bias else None
    t = torch.randint(0, v, (n,), device=device)
    t[::4] = -100
    return x, w, b, t


OPTIONS = {
    "plain": dict(),
    "temperature": dict(temperature=0.7),
    "softcap": dict(softcap=4.0, logit_scale=1.3, temperature=1.7),
    "per_row": dict(temperature="row"),
    "per_token": dict(temperature="token"),
}


def options(name, shape, device):
    opts = dict(OPTIONS[name])
    if opts.get("temperature") == "row":  # one per sequence: (B, 1) broadcast over T
        opts["temperature"] = torch.rand(shape[0], 1, dtype=torch.float64, device=device) + 0.5
    elif opts.get("temperature") == "token":
        opts["temperature"] = torch.rand(shape, dtype=torch.float64, device=device) + 0.5
    return opts


def _both(out, g, h):
    return (out["log_probs"] * g).sum() + (out["entropy"] * h).sum()


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("upstream", ["both", "log_probs", "entropy"])
def test_logits_match_formula(backend, device, option, upstream):
    shape = (3, 7)  # (B, T): leading dimensions kept
    x, t = make(shape, torch.float64, device)
    opts = options(option, shape, device)
    ours_x, ref_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours = fusedloss.log_probs(ours_x, t, return_entropy=True, extras=EXTRAS, backend=backend,
                               **opts)
    truth = formula(ref_x, t, **opts)
    for name in ("log_probs", "entropy", *EXTRAS):
        got = getattr(ours, name)
        assert got.shape == shape and got.dtype == truth[name].dtype, name
        if name == "is_top1":
            assert torch.equal(got, truth[name])
        else:
            assert_close(got, truth[name])
    g = torch.randn(shape, dtype=torch.float64, device=device) * (upstream != "entropy")
    h = torch.randn(shape, dtype=torch.float64, device=device) * (upstream != "log_probs")
    terms = {"log_probs": ours.log_probs, "entropy": ours.entropy}
    if upstream == "both":
        (ours.log_probs * g).sum().add((ours.entropy * h).sum()).backward()
    else:  # only one output reaches the loss: the other's gradient is absent
        (terms[upstream] * (g if upstream == "log_probs" else h)).sum().backward()
    _both(truth, g, h).backward()
    assert_close(ours_x.grad, ref_x.grad)
    assert ours_x.grad.view(-1, V)[t.view(-1) == -100].abs().max() == 0


@pytest.mark.parametrize("option", ["plain", "softcap", "per_token"])
@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_linear_matches_formula(backend, device, option, chunk):
    x, w, b, t = heads(N, D, V, torch.float64, device)
    x3, t3 = x.view(1, N, D), t.view(1, N)  # (B, T, D) hidden states
    opts = options(option, (1, N), device)
    leaves = [v.clone().requires_grad_() for v in (x3, w, b)]
    refs = [v.clone().requires_grad_() for v in (x3, w, b)]
    ours = fusedloss.linear_log_probs(leaves[0], leaves[1], t3, linear_bias=leaves[2],
                                      return_entropy=True, extras=EXTRAS, chunk_size=chunk,
                                      backend=backend, **opts)
    truth = formula(F.linear(refs[0], refs[1], refs[2]), t3, **opts)
    for name in ("log_probs", "entropy", *EXTRAS[:-1]):
        assert_close(getattr(ours, name), truth[name])
    assert torch.equal(ours.is_top1, truth["is_top1"])
    g, h = (torch.randn(1, N, dtype=torch.float64, device=device) for _ in range(2))
    _both(ours._asdict(), g, h).backward()
    _both(truth, g, h).backward()
    for a, e in zip(leaves, refs):
        assert_close(a.grad, e.grad)


def test_returns_the_tensor_alone_or_log_probs(backend, device):
    x, t = make((5,), torch.float32, device)
    out = fusedloss.log_probs(x, t, backend=backend)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    out = fusedloss.log_probs(x, t, extras=("is_top1",), backend=backend)
    assert isinstance(out, fusedloss.LogProbs) and out.entropy is None and out.lse is None
    assert out.is_top1.dtype == torch.bool


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_give_float32(backend, device, dtype):
    x, t = make((9,), dtype, device)
    out = fusedloss.log_probs(x.requires_grad_(), t, return_entropy=True, backend=backend)
    assert out.log_probs.dtype == out.entropy.dtype == torch.float32
    (out.log_probs.sum() + out.entropy.sum()).backward()
    assert x.grad.dtype == dtype
    truth = formula(x.detach().double(), t)
    for name in ("log_probs", "entropy"):  # float32 math from the half logits
        assert_close(getattr(out, name), truth[name], torch.float32)


def test_linear_half_accumulates_in_float32(backend, device):
    x, w, b, t = heads(N, D, V, torch.bfloat16, device)
    leaves = [v.clone().requires_grad_() for v in (x, w, b)]
    out = fusedloss.linear_log_probs(*leaves[:2], t, linear_bias=leaves[2],
                                     return_entropy=True, chunk_size=4, backend=backend)
    assert out.log_probs.dtype == torch.float32
    (out.log_probs.sum() - out.entropy.sum()).backward()
    assert [v.grad.dtype for v in leaves] == [torch.bfloat16] * 3
    refs = [v.detach().double().requires_grad_() for v in (x, w, b)]
    truth = formula(F.linear(*refs), t)
    (truth["log_probs"].sum() - truth["entropy"].sum()).backward()
    for a, e in zip(leaves, refs):
        assert_close(a.grad, e.grad, torch.bfloat16)


def test_autocast_products_in_autocast_dtype(backend, device):
    x, w, b, t = heads(N, D, V, torch.float32, device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        out = fusedloss.linear_log_probs(x, w, t, linear_bias=b, backend=backend)
    assert out.dtype == torch.float32
    # The product of the bfloat16 operands, rounded to bfloat16, then float32 math.
    half = [v.to(torch.bfloat16).double() for v in (x, w, b)]
    truth = formula(F.linear(*half).to(torch.bfloat16).double(), t)
    assert_close(out, truth["log_probs"], torch.bfloat16)
    assert not torch.equal(out, formula(F.linear(x, w, b).double(), t)["log_probs"].float())


def test_ignored_and_bad_rows(backend, device):
    x, t = make((6,), torch.float64, device)
    t[:] = -100
    out = fusedloss.log_probs(x.requires_grad_(), t, return_entropy=True, extras=EXTRAS,
                              backend=backend)
    for name in ("log_probs", "entropy", *EXTRAS[:-1]):
        assert (getattr(out, name) == 0).all()
    assert not out.is_top1.any()
    (out.log_probs.sum() + out.entropy.sum()).backward()
    assert (x.grad == 0).all()
    empty = fusedloss.log_probs(torch.randn(0, V, device=device), t[:0], backend=backend)
    assert empty.shape == (0,)


def test_top1_ties_take_the_first_index(backend, device):
    x = torch.zeros(2, 6, device=device)
    x[:, 2] = x[:, 4] = 5.0
    t = torch.tensor([2, 4], device=device)
    out = fusedloss.log_probs(x, t, extras=("is_top1",), backend=backend)
    assert out.is_top1.tolist() == [True, False]


def test_temperature_tensor_is_not_differentiated(backend, device):
    x, t = make((4,), torch.float32, device)
    with pytest.raises(ValueError, match="temperature"):
        fusedloss.log_probs(x, t, temperature=torch.ones(4, device=device,
                                                         requires_grad=True), backend=backend)


@pytest.mark.parametrize("softcap", [0.0, 3.0])
def test_grad_op_upstream_gradients_of_lse_and_mean(kernel_backend, softcap):
    """The backward op with upstream gradients of all four row outputs (g, h, and the k
    and u of lse and mean_logits that the vocab-parallel losses use), against autograd
    through torch's log_softmax."""
    device = backend_device(kernel_backend)
    n, v = 6, 23
    x = torch.randn(n, v, device=device, dtype=torch.float64) * 3
    t = torch.randint(0, v, (n,), device=device)
    t[2] = -100
    inv_t = torch.rand(n, device=device, dtype=torch.float64) + 0.5
    g, h, k, u = (torch.randn(n, device=device, dtype=torch.float64) for _ in range(4))
    xr = x.clone().requires_grad_()
    y = softcap * torch.tanh(1.2 * xr / softcap) if softcap else 1.2 * xr
    z = y * inv_t[:, None]
    logp = torch.log_softmax(z, -1)
    counted = t != -100
    lp = logp.gather(1, torch.where(counted, t, 0)[:, None])[:, 0]
    ent = -(logp.exp() * logp).sum(-1)
    lse, mean = torch.logsumexp(z, -1), z.mean(-1)
    total = torch.where(counted, g * lp + h * ent + k * lse + u * mean, torch.zeros_like(g))
    (expected,) = torch.autograd.grad(total.sum(), xr)
    got = _library.OPS["log_probs_grad"].call(
        kernel_backend, x=x, target=t, row_inv_temperature=inv_t, inv_temperature=1.0,
        logit_scale=1.2, softcap=softcap, ignore_index=-100, lse=lse.detach(),
        entropy=ent.detach(), grad_log_probs=g, grad_entropy=h, grad_lse=k,
        grad_mean_logits=u)
    assert_close(got, expected)


def test_linear_memory_stays_chunked():
    """No allocation of the fused CPU path comes near the N x V logits: the largest is a
    chunk of logits or a gradient (the formula's whole logits show the check can fail)."""
    if "cpu" not in fusedloss.available_backends("cpu", _library.OPS["linear_log_probs"]):
        pytest.skip("the C++ extension has no log_probs kernel here")
    n, d, v, chunk = 1024, 32, 3000, 64
    x, w, b, t = heads(n, d, v, torch.float32, "cpu")
    leaves = [a.requires_grad_() for a in (x, w, b)]

    def largest(run):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                    profile_memory=True) as prof:
            run()
        return max(e.cpu_memory_usage for e in prof.events())

    def fused():
        out = fusedloss.linear_log_probs(*leaves[:2], t, linear_bias=leaves[2],
                                         return_entropy=True, chunk_size=chunk, backend="cpu")
        (out.log_probs.sum() + out.entropy.sum()).backward()

    def whole():
        out = formula(F.linear(*leaves), t)
        (out["log_probs"].sum() + out["entropy"].sum()).backward()

    n_by_v = n * v * 4
    assert 0 < largest(fused) <= max(chunk * v * 4, v * d * 4) < n_by_v
    assert largest(whole) >= n_by_v


# ------------------------------------------------------------------------------ contracts
def combined(logits, target, *, temperature=1.0, logit_scale=1.0, softcap=None,
             ignore_index=-100, extras=(), backend="auto"):
    """Both differentiable outputs in one value, so the shared contract checks the
    gradients of log_probs and entropy together."""
    out = fusedloss.log_probs(logits, target, temperature=temperature,
                              logit_scale=logit_scale, softcap=softcap,
                              ignore_index=ignore_index, return_entropy=True, extras=extras,
                              backend=backend)
    return out.log_probs + 0.5 * out.entropy


def linear_combined(input, linear_weight, target, **kwargs):
    out = fusedloss.linear_log_probs(input, linear_weight, target, return_entropy=True,
                                     **kwargs)
    return out.log_probs + 0.5 * out.entropy


class Combined(fusedloss.TokenLogProbs):
    def forward(self, logits, target):
        return combined(logits, target, **{k: v for k, v in self.loss_options().items()
                                           if k != "return_entropy"})


class LinearCombined(fusedloss.LinearTokenLogProbs):
    def forward(self, input, linear_weight, target, linear_bias=None):
        options = {k: v for k, v in self.loss_options().items() if k != "return_entropy"}
        return linear_combined(input, linear_weight, target, linear_bias=linear_bias,
                               **options)


def _formula_combined(logits, target, **kwargs):
    out = formula(logits, target, **kwargs)
    return out["log_probs"] + 0.5 * out["entropy"]


def _row_args(device, n, v):
    t = torch.randint(0, v, (n,), device=device)
    t[1] = -100
    return dict(target=t, row_inv_temperature=None, inv_temperature=1 / 1.3, logit_scale=1.1,
                softcap=0.0, ignore_index=-100)


class TestLogProbsContract(LossContract):
    fn = staticmethod(combined)
    module = Combined
    ops = ("log_probs", "log_probs_grad", "log_probs_grad_inplace")
    half_slack = 1e-5

    def out_dtype(self, dtype):
        return torch.float64 if dtype == torch.float64 else torch.float32

    def sample(self, device, dtype, n=11, v=37):
        x, t = make((n,), dtype, device, v=v)
        return Sample((x.requires_grad_(), t), dict(temperature=1.3, softcap=5.0))

    def gradcheck_sample(self, device):
        return self.sample(device, torch.float64, n=5, v=6)

    def expected(self, logits, target, **kwargs):
        return _formula_combined(logits, target, **kwargs)

    def torch_equivalent(self, logits, target, temperature, softcap):
        # torch's own ops in the logits' dtype (what an eager RL trainer runs).
        z = softcap * torch.tanh(logits / softcap) / temperature
        logp = torch.log_softmax(z.float(), -1).to(logits.dtype)
        counted = target != -100
        lp = logp.gather(-1, torch.where(counted, target, 0)[:, None]).squeeze(-1)
        h = -(logp.exp() * logp).sum(-1)
        return torch.where(counted, lp + 0.5 * h, torch.zeros_like(lp)).float()

    def op_samples(self, device):
        x = torch.randn(7, 19, device=device, requires_grad=True)
        args = _row_args(device, 7, 19)
        want = dict(compute_entropy=True, compute_log_sum_sq=True, compute_mean=False,
                    compute_top1=True)
        lse = torch.logsumexp(x.detach(), -1)
        ent = torch.rand(7, device=device)
        grads = dict(lse=lse, entropy=ent, grad_log_probs=torch.randn(7, device=device),
                     grad_entropy=torch.randn(7, device=device),
                     grad_lse=torch.randn(7, device=device),
                     grad_mean_logits=torch.randn(7, device=device))
        per_row = dict(args, row_inv_temperature=torch.rand(7, device=device) + 0.5,
                       softcap=3.0)
        return [("log_probs", dict(args, x=x, **want)),
                ("log_probs", dict(per_row, x=x, **dict(want, compute_entropy=False))),
                ("log_probs_grad", dict(args, x=x.detach(), **grads)),
                ("log_probs_grad", dict(per_row, x=x.detach(), **dict(grads, entropy=None,
                                                                        grad_entropy=None))),
                ("log_probs_grad_inplace", dict(args, x=x.detach().clone(), **grads))]

    def bad_inputs(self, device):
        x, t = torch.randn(4, 9, device=device), torch.tensor([0, 1, 2, 3], device=device)
        return dict(logits=x, target=t), [
            (dict(target=torch.tensor([0, 1, 2], device=device)), ValueError, "target"),
            (dict(target=torch.zeros(4, device=device)), TypeError, "target"),
            (dict(target=torch.tensor([0, 1, 2, 9], device=device)), IndexError, "target"),
            (dict(logits=x.long()), TypeError, "logits"),
            (dict(logits=torch.randn(4, 0, device=device)), ValueError, "V >= 1"),
            (dict(temperature=0.0), ValueError, "temperature"),
            (dict(temperature=-1.0), ValueError, "temperature"),
            (dict(temperature=torch.tensor([1.0, 0.0, 1.0, 1.0], device=device)), ValueError,
             "temperature"),
            (dict(temperature=torch.ones(3, device=device)), ValueError, "temperature"),
            (dict(softcap=0.0), ValueError, "softcap"),
            (dict(logit_scale=-1.0), ValueError, "logit_scale"),
            (dict(extras=("lse", "entropy")), ValueError, "extras"),
            (dict(ignore_index=1.5), TypeError, "ignore_index"),
        ]


class TestLinearLogProbsContract(LossContract):
    fn = staticmethod(linear_combined)
    module = LinearCombined
    ops = ("linear_log_probs", "linear_log_probs_grad")
    half_slack = 1e-5

    def out_dtype(self, dtype):
        return torch.float64 if dtype == torch.float64 else torch.float32

    def sample(self, device, dtype, n=14, d=8, v=29, chunk=5):
        # n, n - 1, n - 2 rows (the compile tests) never leave a last chunk of one row,
        # which torch.compile would specialise.
        x, w, b, t = heads(n, d, v, dtype, device)
        return Sample((x.requires_grad_(), w.requires_grad_(), t),
                      dict(linear_bias=b.requires_grad_(), temperature=0.9, softcap=6.0,
                           chunk_size=chunk))

    def gradcheck_sample(self, device):
        return self.sample(device, torch.float64, n=5, d=3, v=6, chunk=2)

    def module_call(self, sample, backend):
        (x, w, t), kwargs = sample.args, dict(sample.kwargs)
        bias = kwargs.pop("linear_bias")
        options = dict(kwargs, backend=backend)
        return LinearCombined(**options), options, Sample((x, w, t), dict(linear_bias=bias))

    def expected(self, x, w, t, linear_bias=None, chunk_size=None, **kwargs):
        return _formula_combined(F.linear(x, w, linear_bias), t, **kwargs)

    def torch_equivalent(self, x, w, t, linear_bias=None, chunk_size=None, **kwargs):
        return TestLogProbsContract.torch_equivalent(self, F.linear(x, w, linear_bias), t,
                                                     **kwargs)

    def op_samples(self, device):
        x, w, b, _ = heads(9, 8, 11, torch.float32, device)
        args = _row_args(device, 9, 11)
        want = dict(compute_entropy=True, compute_log_sum_sq=False, compute_mean=True,
                    compute_top1=False)
        lse = torch.logsumexp(F.linear(x, w, b), -1).detach()
        grads = dict(lse=lse, entropy=torch.rand(9, device=device),
                     grad_log_probs=torch.randn(9, device=device),
                     grad_entropy=torch.randn(9, device=device),
                     grad_lse=torch.randn(9, device=device), grad_mean_logits=None)
        common = dict(input=x.requires_grad_(), linear_weight=w.requires_grad_(),
                      linear_bias=b.requires_grad_(), chunk_size=4, **args)
        detached = dict(common, input=x.detach(), linear_weight=w.detach(),
                        linear_bias=b.detach())
        return [("linear_log_probs", dict(common, **want)),
                ("linear_log_probs", dict(common, linear_bias=None, **dict(
                    want, compute_entropy=False))),
                ("linear_log_probs_grad", dict(detached, **grads, grad_input=True,
                                               grad_weight=True, grad_bias=True)),
                ("linear_log_probs_grad", dict(detached, **dict(grads, grad_entropy=None),
                                               grad_input=False, grad_weight=True,
                                               grad_bias=False))]

    def bad_inputs(self, device):
        x, w, b, _ = heads(4, 8, 6, torch.float32, device)
        t = torch.tensor([0, 1, 2, 3], device=device)
        return dict(input=x, linear_weight=w, target=t), [
            (dict(linear_weight=torch.randn(6, 7, device=device)), ValueError,
             "linear_weight"),
            (dict(linear_weight=w.double()), TypeError, "linear_weight"),
            (dict(linear_bias=torch.randn(5, device=device)), ValueError, "linear_bias"),
            (dict(target=torch.tensor([0, 1], device=device)), ValueError, "target"),
            (dict(target=t.float()), TypeError, "target"),
            (dict(target=torch.tensor([0, 1, 2, 6], device=device)), IndexError, "target"),
            (dict(input=x.long()), TypeError, "input"),
            (dict(temperature=0.0), ValueError, "temperature"),
            (dict(chunk_size=0), ValueError, "chunk_size"),
            (dict(extras=("top1",)), ValueError, "extras"),
        ]
