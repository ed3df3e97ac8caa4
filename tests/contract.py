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
  - what torch's users expect of a drop-in: torch.func.grad / vjp / vmap;
    torch.compile(fullgraph=True) over three batch sizes without a recompile per size
    (dynamic=True, and automatic dynamic shapes); under autocast a float32 loss, gradients
    in the inputs' dtype and a float32 class weight accepted; the function and the module
    on the meta device, the module's repr; torch.jit.script refused with a pointer to
    torch.compile, torch.jit.trace and torch.export.export working;
  - bad input: each case raises the error it names.

tests/test_ops.py checks that the contracts together opcheck every op of the library.
"""
import dataclasses
import inspect

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
        return [v for v in self.tensors() if v.requires_grad]

    def tensors(self):
        return [v for v in (*self.args, *self.kwargs.values()) if isinstance(v, torch.Tensor)]

    def rows(self, n):
        """A copy with the first n rows of every tensor whose leading dimension is the
        first argument's (the batch)."""
        b = self.args[0].shape[0]
        return self.map(lambda t: t[:n].clone() if t.dim() and t.shape[0] == b else t)

    def batch_sizes(self):
        """Three batch sizes, the sample's first, none below 2 (torch.compile specialises
        0 and 1) nor equal to another dimension of the tensors (it would share a symbol
        with it)."""
        b = self.args[0].shape[0]
        other = {d for t in self.tensors() for i, d in enumerate(t.shape)
                 if not (i == 0 and d == b)}
        sizes = [n for n in range(b, 1, -1) if n not in other][:3]
        assert len(sizes) == 3, f"the sample's batch ({b}) is too small to vary"
        return sizes


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
    """Subclasses set `fn` (the public function), `module` (its nn.Module) and `ops` (names
    of the fusedloss ops it runs through), and define sample(device, dtype),
    expected(*args, **kwargs) (a formula in plain torch ops, written in the test file),
    op_samples(device) ([(op name, kwargs)]) and bad_inputs(device) ((base kwargs,
    [(overrides, error, text)])). `half_slack` is the absolute slack of the low-precision
    comparison. The sample's first argument's leading dimension is its batch."""

    fn = None
    module = None
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

    def out_dtype(self, dtype):
        """The output's dtype for inputs of `dtype`: the input's, as torch's losses (the
        token log-probs come out in the accumulation dtype instead)."""
        return dtype

    def bound(self, backend):
        """The loss as a function of the sample's arguments, on `backend`."""
        fn = type(self).fn
        return lambda *args, **kwargs: fn(*args, backend=backend, **kwargs)

    def gradcheck_sample(self, device):
        """A float64 sample small enough for gradcheck and gradgradcheck."""
        return self.sample(device, torch.float64)

    def module_call(self, sample, backend):
        """The module computing the sample's loss: (module, the options it was built with,
        the Sample of its forward). By default the function's arguments that the module's
        constructor takes build it and the others go to its forward; override where the
        module takes them otherwise."""
        named = inspect.signature(type(self).fn).bind(*sample.args, **sample.kwargs).arguments
        takes = inspect.signature(self.module).parameters
        options = {k: v for k, v in named.items() if k in takes}
        options["backend"] = backend
        call = Sample((), {k: v for k, v in named.items() if k not in takes})
        return self.module(**options), options, call

    # ---------------------------------------------------------------- the checks
    def _compare(self, backend, device, dtype):
        sample = self.sample(device, dtype)
        truth, truth_grads, upstream = _run(self.expected, sample.map(_to(torch.float64)))
        ours, grads, _ = _run(self.bound(backend), sample, upstream)
        assert ours.shape == truth.shape and ours.dtype == self.out_dtype(dtype)
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

    # ------------------------------------------------ what torch's users expect of a drop-in
    def test_func_grad_and_vjp(self, backend, device):
        """torch.func.grad and torch.func.vjp give the eager gradients."""
        sample = self.gradcheck_sample(device)
        eager, eager_grads, upstream = _run(self.bound(backend), sample)
        f = _as_function_of_leaves(self.bound(backend), sample)
        leaves = sample.leaves()
        out, vjp = torch.func.vjp(f, *leaves)
        grads = torch.func.grad(lambda *x: (f(*x) * upstream).sum(),
                                argnums=tuple(range(len(leaves))))(*leaves)
        assert_close(out, eager)
        for g, v, e in zip(grads, vjp(upstream), eager_grads):
            assert_close(g, e)
            assert_close(v, e)

    def test_vmap(self, backend, device):
        """torch.func.vmap over a leading dimension of every tensor argument equals a loop."""
        samples = [self.gradcheck_sample(device) for _ in range(2)]
        fn = self.bound(backend)
        looped = torch.stack([fn(*s.args, **s.kwargs) for s in samples])
        stacked = [torch.stack(ts) for ts in zip(*(s.tensors() for s in samples))]
        assert_close(torch.func.vmap(_as_function_of(fn, samples[0], _is_tensor))(*stacked),
                     looped)

    @pytest.mark.parametrize("dynamic", [True, None], ids=["dynamic", "automatic"])
    def test_compile_batch_sizes(self, backend, device, dynamic):
        """torch.compile(fullgraph=True) over three batch sizes: with dynamic=True one graph
        serves them all; with automatic dynamic shapes (dynamic=None, the default) the
        second size recompiles once, dynamic, and the third does not."""
        from torch._dynamo.utils import counters
        sample = self.sample(device, torch.float32)
        torch._dynamo.reset()
        counters.clear()
        # aot_eager: the graphs and their autograd, without generating code for them.
        compiled = torch.compile(self.bound(backend), backend="aot_eager", fullgraph=True,
                                 dynamic=dynamic)
        frames = []
        for n in sample.batch_sizes():
            part = sample.rows(n)
            eager, eager_grads, upstream = _run(self.bound(backend), part)
            out, grads, _ = _run(compiled, part.map(lambda t: t.clone()), upstream)
            frames.append(counters["stats"]["unique_graphs"])
            for a, e in zip((out, *grads), (eager, *eager_grads)):
                assert_close(a, e, torch.float32)
        assert frames == ([1, 1, 1] if dynamic else [1, 2, 2]), frames

    def test_autocast(self, backend, device):
        """Under autocast (bfloat16) a loss follows torch's policy for the losses on its
        float32 list: a float32 loss (from the bfloat16 inputs, read as they are), gradients
        in the inputs' dtype, and a float32 class weight accepted."""
        sample = self.sample(device, torch.bfloat16)
        # torch's class weight (an argument named weight), when given, in float32.
        names = list(inspect.signature(type(self).fn).parameters)
        args, kwargs = list(sample.args), dict(sample.kwargs)
        at = names.index("weight") if "weight" in names else len(args)
        if at < len(args) and _is_tensor(args[at]):
            args[at] = args[at].float()
        elif _is_tensor(kwargs.get("weight")):
            kwargs["weight"] = kwargs["weight"].float()
        sample = Sample(tuple(args), kwargs)
        truth, truth_grads, upstream = _run(self.expected, sample.map(_to(torch.float64)))
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = self.bound(backend)(*sample.args, **sample.kwargs)
        grads = torch.autograd.grad(out, sample.leaves(), upstream.to(out.dtype),
                                    allow_unused=True)
        assert out.dtype == torch.float32
        assert [g.dtype for g in grads] == [leaf.dtype for leaf in sample.leaves()]
        for a, t in zip((out, *grads), (truth, *truth_grads)):
            assert_close(a, t, torch.bfloat16)

    def test_meta_device(self, backend, device):
        """The function and the module compute the output's shape on meta tensors (the
        module moved with .to("meta")), and the module's repr shows every option it was
        given that is not its default."""
        sample = self.sample(device, torch.float32)
        eager = self.bound(backend)(*sample.args, **sample.kwargs)
        meta = sample.map(lambda t: t.to("meta"))
        out = self.bound(backend)(*meta.args, **meta.kwargs)
        assert (out.device.type, out.shape, out.dtype) == ("meta", eager.shape, eager.dtype)
        module, options, call = self.module_call(sample, backend)
        assert_close(module(*call.args, **call.kwargs), eager, torch.float32)
        meta_call = call.map(lambda t: t.to("meta"))
        out = module.to("meta")(*meta_call.args, **meta_call.kwargs)
        assert (out.device.type, out.shape) == ("meta", eager.shape)
        defaults = inspect.signature(type(module)).parameters
        text = repr(module)
        for name, value in options.items():
            default = defaults[name].default
            if isinstance(value, torch.Tensor) or not (value is default or value == default):
                assert f"{name}=" in text, (name, text)

    def test_jit(self):
        """torch.jit.script of the module either works or says to use torch.compile;
        torch.jit.trace records a module that gives the eager loss and gradients."""
        sample = self.sample(torch.device("cpu"), torch.float32)
        module, _, call = self.module_call(sample, "auto")
        try:
            scripted = torch.jit.script(module)
        except Exception as e:  # noqa: BLE001 (any refusal, so long as it says what to use)
            assert "torch.compile" in str(e), e
        else:
            assert_close(scripted(*call.args, **call.kwargs), module(*call.args, **call.kwargs))
        inputs = inspect.signature(module.forward).bind(*call.args, **call.kwargs).arguments
        inputs = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        traced = torch.jit.trace(module, example_kwarg_inputs=inputs)
        fresh = call.map(lambda t: t.clone())
        eager, eager_grads, upstream = _run(module, call)
        out, grads, _ = _run(traced, fresh, upstream)
        for a, e in zip((out, *grads), (eager, *eager_grads)):
            assert_close(a, e, torch.float32)

    def test_export(self):
        """torch.export.export of the module gives a program computing the eager loss."""
        sample = self.sample(torch.device("cpu"), torch.float32)
        module, _, call = self.module_call(sample, "auto")
        call = call.map(lambda t: t.detach())
        program = torch.export.export(module, tuple(call.args), dict(call.kwargs))
        assert_close(program.module()(*call.args, **call.kwargs),
                     module(*call.args, **call.kwargs), torch.float32)


def _is_tensor(v):
    return isinstance(v, torch.Tensor)


def _as_function_of(fn, sample, chosen):
    """fn(*values): the sample's call with the arguments for which chosen(argument) holds
    taken, in order, from the values."""
    def call(*values):
        it = iter(values)
        pick = lambda v: next(it) if chosen(v) else v  # noqa: E731
        args = [pick(v) for v in sample.args]
        kwargs = {k: pick(v) for k, v in sample.kwargs.items()}
        return fn(*args, **kwargs)
    return call


def _as_function_of_leaves(fn, sample):
    """fn(*leaves): the sample's call with its leaves (the tensors that require grad)."""
    return _as_function_of(fn, sample, lambda v: _is_tensor(v) and v.requires_grad)
