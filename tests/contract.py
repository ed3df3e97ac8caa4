"""The test contract every loss is held to, written once (in the manner of torchvision's
RoIOpTester): a loss's test file subclasses LossContract as `TestXxxContract`, supplies
its function, sample inputs, an independent float64 formula and bad inputs, and inherits
every check below, on every backend available here:

  - the float64 result and gradients against the formula;
  - float32 against the formula at float32 tolerance;
  - bfloat16 and float16 no worse than twice torch's own error in that dtype;
  - gradcheck, and second-order gradients (gradgradcheck, and a gradient penalty through
    a layer, which must match the formula's);
  - torch.library.opcheck of every op it runs through (the in-place and backward ops
    included), and torch.compile(fullgraph=True);
  - bad input: each case raises the error it names.

tests/test_ops.py checks that the contracts together opcheck every op of the library.
"""
import dataclasses

import pytest
import torch

import fusedloss
from conftest import assert_close, assert_refusals


@dataclasses.dataclass
class Sample:
    """One call of the loss: fn(*args, **kwargs). Floating tensors that require grad are
    the leaves whose gradients are checked."""
    args: tuple
    kwargs: dict = dataclasses.field(default_factory=dict)

    def map(self, f):
        """A copy with f applied to every tensor (keeping which ones require grad)."""
        def one(v):
            if not isinstance(v, torch.Tensor):
                return v
            out = f(v.detach())
            return out.requires_grad_() if v.requires_grad else out
        return Sample(tuple(one(v) for v in self.args),
                      {k: one(v) for k, v in self.kwargs.items()})

    def leaves(self):
        return [v for v in (*self.args, *self.kwargs.values())
                if isinstance(v, torch.Tensor) and v.requires_grad]


def _to(dtype):
    return lambda t: t.to(dtype) if t.is_floating_point() else t.clone()


def _run(fn, sample, upstream=None):
    """fn on the sample, and the gradients of sum(output * upstream) for its leaves
    (upstream: a random positive gradient, made here when not given)."""
    out = fn(*sample.args, **sample.kwargs)
    if upstream is None:
        upstream = torch.rand(out.shape, dtype=torch.float64, device=out.device) + 0.5
    grads = torch.autograd.grad((out * upstream.to(out.dtype)).sum(), sample.leaves(),
                                allow_unused=True)
    return out.detach(), grads, upstream


class LossContract:
    """Subclasses set `fn` (the public function) and `ops` (names of the fusedloss ops it
    runs through), and define sample(device, dtype), expected(*args, **kwargs) (a formula
    in plain torch ops, written in the test file), op_samples(device) ([(op name, kwargs)])
    and bad_inputs(device) ((base kwargs, [(overrides, error, text)])). `half_slack` is
    the absolute slack of the low-precision comparison."""

    fn = None
    ops = ()
    half_slack = 1e-6

    # ---------------------------------------------------------------- to supply
    def sample(self, device, dtype):
        raise NotImplementedError

    def expected(self, *args, **kwargs):
        raise NotImplementedError

    def torch_equivalent(self, *args, **kwargs):
        """Torch's own computation of the loss, run in the inputs' dtype."""
        return self.expected(*args, **kwargs)

    def op_samples(self, device):
        raise NotImplementedError

    def bad_inputs(self, device):
        raise NotImplementedError

    def bound(self, backend):
        """The loss as a function of the sample's arguments, on `backend`."""
        fn = type(self).fn
        return lambda *args, **kwargs: fn(*args, backend=backend, **kwargs)

    def gradcheck_sample(self, device):
        """A float64 sample small enough for gradcheck and gradgradcheck."""
        return self.sample(device, torch.float64)

    # ---------------------------------------------------------------- the checks
    def _compare(self, backend, device, dtype):
        sample = self.sample(device, dtype)
        truth, truth_grads, upstream = _run(self.expected, sample.map(_to(torch.float64)))
        ours, grads, _ = _run(self.bound(backend), sample, upstream)
        assert ours.shape == truth.shape and ours.dtype == dtype
        return sample, upstream, ours, grads, truth, truth_grads

    def test_float64_matches_formula(self, backend, device):
        _, _, ours, grads, truth, truth_grads = self._compare(backend, device, torch.float64)
        assert_close(ours, truth)
        for g, t in zip(grads, truth_grads):
            assert_close(g, t)

    def test_float32_matches_formula(self, backend, device):
        _, _, ours, grads, truth, truth_grads = self._compare(backend, device, torch.float32)
        assert_close(ours, truth, torch.float32)
        for g, t in zip(grads, truth_grads):
            assert_close(g, t, torch.float32)

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
    def test_half_no_worse_than_torch(self, backend, device, dtype):
        sample, upstream, ours, grads, truth, truth_grads = self._compare(backend, device,
                                                                          dtype)
        torchs, torch_grads, _ = _run(self.torch_equivalent, sample.map(lambda t: t.clone()),
                                      upstream)
        for mine, theirs, exact in [(ours, torchs, truth), *zip(grads, torch_grads,
                                                               truth_grads)]:
            err_ours = (mine.double() - exact).abs().nan_to_num(posinf=1e30).max()
            err_torch = (theirs.double() - exact).abs().nan_to_num(posinf=1e30).max()
            assert err_ours <= 2 * err_torch + self.half_slack, (err_ours, err_torch)

    def test_gradcheck(self, backend, device):
        sample = self.gradcheck_sample(device)
        with fusedloss.reusable_graph():  # gradcheck runs backward many times
            assert torch.autograd.gradcheck(_as_function_of_leaves(self.bound(backend), sample),
                                            sample.leaves())

    def test_gradgradcheck(self, backend, device):
        sample = self.gradcheck_sample(device)
        with fusedloss.reusable_graph():
            assert torch.autograd.gradgradcheck(
                _as_function_of_leaves(self.bound(backend), sample), sample.leaves())

    def test_second_order(self, backend, device):
        """A gradient penalty (R1, WGAN-GP): d/dw |d loss(h w + x) / d h|^2 must equal the
        formula's, on every backend. The fast backward's saved gradient is a constant in h,
        so kernel backends recompute it through the reference when create_graph is set;
        the check fails if that second-order term is dropped."""
        sample = self.sample(device, torch.float64).map(lambda t: t)
        fixed = Sample(tuple(v.detach() if isinstance(v, torch.Tensor) else v
                             for v in sample.args),
                       {k: v.detach() if isinstance(v, torch.Tensor) else v
                        for k, v in sample.kwargs.items()})
        x = fixed.args[0]
        h = torch.randn(x.shape, dtype=torch.float64, device=device, requires_grad=True)
        w = torch.tensor(1.5, dtype=torch.float64, device=device, requires_grad=True)

        def penalty(fn):
            loss = fn(h * w + x, *fixed.args[1:], **fixed.kwargs).sum()
            (g,) = torch.autograd.grad(loss, h, create_graph=True)
            return torch.autograd.grad(g.pow(2).sum(), w)[0]

        truth = penalty(self.expected)
        # Without the second-order term the answer would be 2 |g|^2 / w.
        (g,) = torch.autograd.grad(self.expected(h * w + x, *fixed.args[1:],
                                                 **fixed.kwargs).sum(), h)
        assert (truth - 2 * g.pow(2).sum() / w).abs() > 1e-3 * truth.abs() + 1e-9
        assert_close(penalty(self.bound(backend)), truth)
        with fusedloss.reusable_graph():
            assert_close(penalty(self.bound(backend)), truth)

    def test_opcheck(self, kernel_backend, device):
        from fusedloss import _library
        ns = getattr(torch.ops, _library.TRITON_NS if kernel_backend == "triton"
                     else _library.CPP_NS)
        samples = self.op_samples(device)
        assert {name for name, _ in samples} == set(self.ops)
        for name, kwargs in samples:
            torch.library.opcheck(getattr(ns, name), (), kwargs)

    def test_compile_fullgraph(self, backend, device):
        sample = self.sample(device, torch.float32)
        eager, eager_grads, upstream = _run(self.bound(backend), sample)
        torch._dynamo.reset()  # every loss compiles the same wrapper: start each afresh
        compiled = torch.compile(self.bound(backend), fullgraph=True)
        out, grads, _ = _run(compiled, sample.map(lambda t: t.clone()), upstream)
        assert_close(out, eager, torch.float32)
        for g, e in zip(grads, eager_grads):
            assert_close(g, e, torch.float32)

    def test_bad_input(self, backend, device):
        base, cases = self.bad_inputs(device)
        assert_refusals(type(self).fn, base, cases, backend=backend)


def _as_function_of_leaves(fn, sample):
    """fn(*leaves): the sample's call with its leaves (the tensors that require grad, in
    order) taken from the arguments."""
    def call(*leaves):
        it = iter(leaves)
        pick = lambda v: next(it) if isinstance(v, torch.Tensor) and v.requires_grad else v  # noqa: E731
        args = [pick(v) for v in sample.args]
        kwargs = {k: pick(v) for k, v in sample.kwargs.items()}
        return fn(*args, **kwargs)
    return call
