"""JSD / KL distillation losses (jsd, linear_jsd) against formulas written here."""
import math

import pytest
import torch
import torch.nn.functional as F

import fusedloss
from conftest import assert_close, assert_matches
from contract import LossContract, Sample
from test_siglip import LiveBytes

BETAS = [0.0, 1.0, 0.5, 0.2]


def kl(log_p, log_q):
    """KL(P || Q) per row, from log-probabilities (torch's kl_div, log_target=True)."""
    return F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)


def jsd_formula(student, teacher, target=None, beta=0.5, temperature=1.0, ignore_index=-100,
                reduction="mean"):
    """The divergence as its definition reads, in the inputs' dtype."""
    v = student.shape[-1]
    log_s = F.log_softmax(student.reshape(-1, v) / temperature, -1)
    log_t = F.log_softmax(teacher.reshape(-1, v) / temperature, -1)
    if beta == 0:
        rows = kl(log_t, log_s)
    elif beta == 1:
        rows = kl(log_s, log_t)
    else:
        log_m = torch.log(beta * log_t.exp() + (1 - beta) * log_s.exp())
        rows = beta * kl(log_t, log_m) + (1 - beta) * kl(log_s, log_m)
    counted = torch.ones_like(rows, dtype=torch.bool) if target is None \
        else target.reshape(-1) != ignore_index
    rows = rows * counted
    if reduction == "none":
        return rows.view(student.shape[:-1])
    return rows.sum() / (counted.sum() if reduction == "mean" else 1)


def logits(shape, dtype, device, scale=3.0):
    return (torch.randn(shape, dtype=torch.float64) * scale).to(dtype).to(device)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("beta", BETAS)
def test_matches_formula(backend, device, beta, reduction):
    s, t = logits((9, 53), torch.float64, device), logits((9, 53), torch.float64, device)
    target = torch.tensor([1, -100, 3, 4, -100, 0, 2, 2, 7], device=device)
    sa, ta = s.clone().requires_grad_(), t.clone().requires_grad_()
    sb, tb = s.clone().requires_grad_(), t.clone().requires_grad_()
    ours = fusedloss.jsd(sa, ta, target, beta=beta, temperature=1.7, reduction=reduction,
                         backend=backend)
    expected = jsd_formula(sb, tb, target, beta, 1.7, reduction=reduction)
    assert_matches(ours, expected, [sa, ta], [sb, tb])  # the teacher's gradient too
    if reduction != "none":
        assert ta.grad is not None and sa.grad[1].abs().max() == 0  # ignored row: exact 0


@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
def test_forward_kl_is_torch_kl_div_without_t_squared(backend, device, temperature):
    """beta=0, mean: torch's usual distillation term, F.kl_div(..., "batchmean"), and no
    T^2 factor."""
    s, t = logits((6, 40), torch.float64, device), logits((6, 40), torch.float64, device)
    ours = fusedloss.jsd(s, t, beta=0.0, temperature=temperature, backend=backend)
    torchs = F.kl_div(F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1),
                      reduction="batchmean", log_target=True)
    assert_close(ours, torchs)


def test_leading_dimensions_and_default_target(backend, device):
    s, t = logits((2, 3, 17), torch.float64, device), logits((2, 3, 17), torch.float64, device)
    target = torch.tensor([[0, -100, 1], [-100, -100, 5]], device=device)
    for reduction in ("none", "mean"):
        assert_close(fusedloss.jsd(s, t, target, reduction=reduction, backend=backend),
                     jsd_formula(s, t, target, reduction=reduction))
    assert fusedloss.jsd(s, t, reduction="none", backend=backend).shape == (2, 3)
    assert_close(fusedloss.jsd(s, t, backend=backend), jsd_formula(s, t))


def test_zero_probabilities_and_equal_distributions(backend, device):
    """-inf logits (probability 0) add exactly 0 to loss and gradient; P_s == P_t gives 0."""
    s = logits((3, 30), torch.float64, device)
    s[:, :4] = float("-inf")
    t = s.clone()
    t[0, 10] += 1.0
    for beta in BETAS:
        sa = s.clone().requires_grad_()
        loss = fusedloss.jsd(sa, t, beta=beta, reduction="none", backend=backend)
        loss.sum().backward()
        assert torch.isfinite(loss).all() and torch.isfinite(sa.grad).all()
        assert loss[0] > 0 and (loss[1:].abs() < 1e-12).all()
        assert (sa.grad[:, :4] == 0).all()


def test_non_finite_rows_are_nan_and_ignored_rows_zero(backend, device):
    s, t = logits((3, 20), torch.float32, device), logits((3, 20), torch.float32, device)
    s[0, 3] = float("nan")
    s[1, 5] = float("nan")
    target = torch.tensor([0, -100, 1], device=device)
    sa = s.clone().requires_grad_()
    loss = fusedloss.jsd(sa, t, target, reduction="none", backend=backend)
    loss.sum().backward()
    assert torch.isnan(loss[0]) and loss[1] == 0 and torch.isfinite(loss[2])
    assert torch.isnan(sa.grad[0]).all() and (sa.grad[1] == 0).all()


def test_module(backend, device):
    m = fusedloss.JSDLoss(beta=0.3, temperature=2.0, reduction="sum", backend=backend)
    assert "beta=0.3" in repr(m) and "temperature=2.0" in repr(m)
    s, t = logits((4, 11), torch.float64, device), logits((4, 11), torch.float64, device)
    assert_close(m(s, t), jsd_formula(s, t, None, 0.3, 2.0, reduction="sum"))


# ------------------------------------------------------------------------------ linear_jsd
def heads(n, ds, dt, v, dtype, device, bias=True):
    mk = lambda *shape: (torch.randn(shape, dtype=torch.float64) / math.sqrt(shape[-1])  # noqa: E731
                         * 3).to(dtype).to(device)
    return (mk(n, ds), mk(v, ds), mk(v, 1) .view(v) if bias else None, mk(n, dt), mk(v, dt),
            mk(v, 1).view(v) if bias else None)


def linear_formula(xs, ws, xt, wt, target=None, student_bias=None, teacher_bias=None,
                   chunk_size=None, **options):
    return jsd_formula(F.linear(xs, ws, student_bias), F.linear(xt, wt, teacher_bias), target,
                       **options)


@pytest.mark.parametrize("beta,chunk", [(0.5, 1), (0.0, 7), (1.0, 16), (0.2, 100), (0.5, 7)])
def test_linear_jsd_chunks(backend, device, beta, chunk):
    """Chunk boundaries: 1 row, a chunk that does not divide N=16, exactly N, more than N;
    each beta regime."""
    xs, ws, bs, xt, wt, bt = heads(16, 8, 5, 37, torch.float64, device)
    target = torch.randint(0, 4, (16,), device=device)
    target[target == 0] = -100
    a = [v.clone().requires_grad_() for v in (xs, ws, bs)]
    b = [v.clone().requires_grad_() for v in (xs, ws, bs)]
    for reduction in ("mean", "none"):
        ours = fusedloss.linear_jsd(a[0], a[1], xt, wt, target, student_bias=a[2],
                                    teacher_bias=bt, beta=beta, temperature=1.5,
                                    reduction=reduction, chunk_size=chunk, backend=backend)
        expected = linear_formula(b[0], b[1], xt, wt, target, b[2], bt, beta=beta,
                                  temperature=1.5, reduction=reduction)
        for v in (*a, *b):
            v.grad = None
        assert_matches(ours, expected, a, b)


def test_linear_jsd_refuses_teacher_gradients(backend, device):
    xs, ws, bs, xt, wt, bt = heads(4, 8, 5, 11, torch.float32, device)
    with pytest.raises(ValueError, match="teacher_weight requires grad"):
        fusedloss.linear_jsd(xs, ws, xt, wt.requires_grad_(), backend=backend)
    with torch.no_grad():  # a frozen teacher under no_grad is fine
        fusedloss.linear_jsd(xs, ws, xt, wt, backend=backend)


def test_linear_jsd_reference_memory_stays_chunked():
    """The reference's fwd+bwd holds a few chunks of logits and the student's gradients,
    never either head's N x V logits: autograd keeps no chunk's logits, the backward
    recomputes them."""
    n, v, rows = 1024, 2048, 16
    xs, ws, bs, xt, wt, bt = heads(n, 32, 32, v, torch.float32, "cpu")
    student = [t.requires_grad_() for t in (xs, ws, bs)]

    def peak(chunk_size):
        with LiveBytes() as mem:
            fusedloss.linear_jsd(student[0], student[1], xt, wt, student_bias=student[2],
                                 teacher_bias=bt, chunk_size=chunk_size,
                                 backend="reference").backward()
        return mem.peak

    chunk, logits = rows * v * 4, n * v * 4
    gradients = sum(t.numel() * 4 for t in student)
    # Measured: the gradients and 14 chunks (jsd_rows' temporaries, kept for the chunk's
    # backward); in one chunk that is 14 times one head's N x V logits.
    got = peak(rows)
    assert 0 < got <= 16 * chunk + 2 * gradients < logits / 2, got
    assert peak(n) >= 2 * logits  # the check can fail: one chunk holds both heads' logits


def test_linear_jsd_module(backend, device):
    xs, ws, bs, xt, wt, bt = heads(6, 8, 5, 11, torch.float64, device)
    m = fusedloss.LinearJSDLoss(beta=0.0, temperature=2.0, chunk_size=4, backend=backend)
    assert "chunk_size=4" in repr(m)
    assert_close(m(xs, ws, xt, wt, student_bias=bs, teacher_bias=bt),
                 linear_formula(xs, ws, xt, wt, None, bs, bt, beta=0.0, temperature=2.0))


# ------------------------------------------------------------------------------ contracts
class TestJSDContract(LossContract):
    fn = fusedloss.jsd
    module = fusedloss.JSDLoss
    ops = ("jsd",)

    def sample(self, device, dtype, n=11, v=45):
        s, t = logits((n, v), dtype, device), logits((n, v), dtype, device)
        target = torch.randint(0, 3, (n,), device=device)
        target[target == 0] = -100
        return Sample((s.requires_grad_(), t.requires_grad_(), target),
                      dict(beta=0.3, temperature=1.3))

    def gradcheck_sample(self, device):
        return self.sample(device, torch.float64, n=3, v=4)

    def expected(self, *args, **kwargs):
        return jsd_formula(*args, **kwargs)

    def op_samples(self, device):
        s = torch.randn(7, 33, device=device, requires_grad=True)
        t = torch.randn(7, 33, device=device, requires_grad=True)
        common = dict(student=s, teacher=t, target=torch.tensor([0, 1, -100, 2, 3, 4, 5],
                                                                device=device),
                      row_weight=None, loss_scale=torch.tensor(0.25, device=device),
                      temperature=2.0, ignore_index=-100)
        frozen = t.detach()  # a teacher without a gradient
        return [("jsd", dict(common, beta=b, reduction=r, grad_student=True, grad_teacher=gt,
                             teacher=t if gt else frozen))
                for b, r, gt in ((0.0, 1, True), (1.0, 0, False), (0.4, 2, True))] + [
            ("jsd", dict(common, beta=0.5, reduction=0, grad_student=True, grad_teacher=False,
                         teacher=frozen, target=None, row_weight=torch.rand(7, device=device)))]

    def bad_inputs(self, device):
        s, t = torch.randn(4, 9, device=device), torch.randn(4, 9, device=device)
        return dict(student_logits=s, teacher_logits=t), [
            (dict(teacher_logits=torch.randn(4, 8, device=device)), ValueError, "V classes"),
            (dict(teacher_logits=torch.randn(3, 9, device=device)), ValueError,
             "teacher_logits"),
            (dict(teacher_logits=t.double()), TypeError, "teacher_logits"),
            (dict(student_logits=s.long()), TypeError, "student_logits"),
            (dict(student_logits=torch.randn(4, 0, device=device),
                  teacher_logits=torch.randn(4, 0, device=device)), ValueError, "V >= 1"),
            (dict(beta=1.5), ValueError, "beta"),
            (dict(beta=-0.1), ValueError, "beta"),
            (dict(temperature=0.0), ValueError, "temperature"),
            (dict(temperature=-1.0), ValueError, "temperature"),
            (dict(target=torch.zeros(3, dtype=torch.long, device=device)), ValueError, "target"),
            (dict(target=torch.zeros(4, device=device)), TypeError, "target"),
            (dict(ignore_index=1.5), TypeError, "ignore_index"),
            (dict(reduction="batchmean"), ValueError, "reduction"),
        ]


class TestLinearJSDContract(LossContract):
    fn = fusedloss.linear_jsd
    module = fusedloss.LinearJSDLoss
    ops = ("linear_jsd",)

    def sample(self, device, dtype, n=13, v=29, chunk=7, hidden=(8, 6)):
        xs, ws, bs, xt, wt, bt = heads(n, *hidden, v, dtype, device)
        target = torch.randint(0, 3, (n,), device=device)
        target[target == 0] = -100
        return Sample((xs.requires_grad_(), ws.requires_grad_(), xt, wt, target),
                      dict(student_bias=bs.requires_grad_(), teacher_bias=bt, beta=0.6,
                           temperature=1.5, chunk_size=chunk))

    def gradcheck_sample(self, device):
        return self.sample(device, torch.float64, n=3, v=4, chunk=2, hidden=(3, 2))

    def expected(self, *args, **kwargs):
        return linear_formula(*args, **kwargs)

    def op_samples(self, device):
        xs, ws, bs, xt, wt, bt = heads(9, 8, 6, 11, torch.float32, device)
        common = dict(student_input=xs.requires_grad_(), student_weight=ws.requires_grad_(),
                      student_bias=bs.requires_grad_(), teacher_input=xt, teacher_weight=wt,
                      teacher_bias=bt, target=None, row_weight=None,
                      loss_scale=torch.tensor(1 / 9, device=device), temperature=2.0,
                      ignore_index=-100, chunk_size=4)
        return [
            ("linear_jsd", dict(common, beta=0.5, reduction=1, grad_input=True,
                                grad_weight=True, grad_bias=True)),
            ("linear_jsd", dict(common, beta=0.0, reduction=0, grad_input=False,
                                grad_weight=False, grad_bias=False,
                                row_weight=torch.rand(9, device=device))),
            ("linear_jsd", dict(common, beta=1.0, reduction=2, grad_input=True,
                                grad_weight=False, grad_bias=True, teacher_bias=None,
                                target=torch.tensor([0, -100] * 4 + [1], device=device))),
        ]

    def bad_inputs(self, device):
        xs, ws, bs, xt, wt, bt = heads(4, 8, 6, 11, torch.float32, device)
        return dict(student_input=xs, student_weight=ws, teacher_input=xt,
                    teacher_weight=wt), [
            (dict(student_weight=torch.randn(11, 7, device=device)), ValueError,
             "student_weight"),
            (dict(teacher_weight=torch.randn(11, 8, device=device)), ValueError,
             "teacher_weight"),
            (dict(teacher_weight=torch.randn(12, 6, device=device)), ValueError, "V=12"),
            (dict(teacher_input=torch.randn(5, 6, device=device)), ValueError, "teacher_input"),
            (dict(student_input=torch.randn(2, 2, 8, device=device)), ValueError, "flatten"),
            (dict(student_bias=torch.randn(10, device=device)), ValueError, "student_bias"),
            (dict(teacher_input=xt.double(), teacher_weight=wt.double()), TypeError,
             "teacher_input"),
            (dict(beta=2.0), ValueError, "beta"),
            (dict(temperature=0.0), ValueError, "temperature"),
            (dict(chunk_size=0), ValueError, "chunk_size"),
            (dict(target=torch.zeros(3, dtype=torch.long, device=device)), ValueError, "target"),
            (dict(reduction="avg"), ValueError, "reduction"),
        ]
