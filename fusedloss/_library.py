"""The op layer: every torch.library op of fusedloss is one `Op`, written once.

An Op holds
  schema     the op's signature, its only copy: everything else reads the arguments by
             name (`a.x`, `a.ignore_index`). setup.py generates the C++ view of it, one
             struct per op (see csrc/common/op_boxing.h), so a C++ kernel that reads an
             argument the schema lacks, or reads it with the wrong type, does not compile.
  outputs    allocates the outputs from the arguments: the op's fake kernel, and the
             buffers the Triton launcher fills (fusedloss.kernels.<module>.<name>).
  backends   the kernel backends that implement it ("triton", "cpu", "cuda"); the
             reference is always one more (fusedloss._backends decides per op and device).
  autograd   `setup_context` / `backward`, reading the arguments by name, and `reference`:
             the differentiable outputs recomputed in torch ops. A backward run with
             create_graph=True (double backward, gradient penalties) differentiates that
             recomputation, so higher-order gradients are exact on every backend.

`Op.define()` registers the op in two namespaces with the same schema:
  torch.ops.fusedloss.<name>         C++ kernels: fusedloss._C registers the CPU ones and
                                     fusedloss._C_cuda the CUDA ones (TORCH_LIBRARY_IMPL)
  torch.ops.fusedloss_triton.<name>  the Triton launcher (CPU tensors: TRITON_INTERPRET=1)
"""
import contextlib
import contextvars
import functools
import importlib
import types

import torch

CPP_NS = "fusedloss"
TRITON_NS = "fusedloss_triton"
OPS = {}  # name -> Op, in definition order

_libraries = {ns: torch.library.Library(ns, "DEF") for ns in (CPP_NS, TRITON_NS)}


def acc_dtype(dtype):
    """The accumulation dtype: float64 for float64 inputs, float32 for the rest."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def functorch_active():
    """Whether a torch.func transform (grad, vjp, vmap, jacrev, ...) runs this call
    eagerly (under torch.compile dynamo handles the transforms itself)."""
    return (not torch.compiler.is_compiling()
            and torch._C._functorch.peek_interpreter_stack() is not None)


# ------------------------------------------------------------------------ autocast
# Every loss follows torch's autocast policy for its nearest torch op. The losses are on
# autocast's float32 list (cross_entropy, nll_loss, binary_cross_entropy_with_logits):
# torch computes them from float32 copies of half inputs and returns a float32 loss. The
# kernels already compute in float32 from the half inputs, so they read those as they
# are (no copy) and only the loss comes out in float32. Matrix products (the logits of
# linear_cross_entropy and info_nce) are on the lower-precision list: they run in
# autocast's dtype.
# Device type -> whether autocast exists for it, read outside compiled code: dynamo before
# torch 2.12 cannot trace torch.amp.is_autocast_available, and is_autocast_enabled raises
# for device types without autocast (meta).
_AUTOCAST_AVAILABLE = {kind: torch.amp.is_autocast_available(kind)
                       for kind in ("cpu", "cuda", "meta")}


def autocast_on(device):
    """Whether autocast is enabled for tensors on `device`."""
    kind = device.type
    available = _AUTOCAST_AVAILABLE.get(kind)
    if available is None:
        available = torch.amp.is_autocast_available(kind)
        if not torch.compiler.is_compiling():
            _AUTOCAST_AVAILABLE[kind] = available
    return available and torch.is_autocast_enabled(kind)


def autocast_off(device):
    """A context in which products run in their operands' dtypes whatever autocast is on
    (the references compute logits in the accumulation dtype, as the kernels do)."""
    return torch.autocast(device.type, enabled=False) if autocast_on(device) \
        else contextlib.nullcontext()


def loss_dtype(x):
    """The dtype of a loss computed from x: x's, or under autocast the accumulation dtype
    (float32 for float16 and bfloat16 x), as torch's float32-list losses return."""
    return acc_dtype(x.dtype) if autocast_on(x.device) else x.dtype


def autocast_operands(*tensors):
    """The operands of a matrix product as torch's autocast casts them: under autocast,
    floating tensors other than float64 in autocast's dtype; otherwise (and None) as
    given."""
    # A list, not next(generator, None): dynamo before torch 2.6 cannot trace that.
    devices = [t.device for t in tensors if isinstance(t, torch.Tensor)]
    if not devices or not autocast_on(devices[0]):
        return tensors
    dtype = torch.get_autocast_dtype(devices[0].type)
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point()
                 and t.dtype != torch.float64 else t for t in tensors)


class Op:
    def __init__(self, name, schema, *, outputs, backends, kernels=None, composite=None,
                 setup_context=None, backward=None, reference=None, differentiable=(0,),
                 saved_outputs=()):
        self.name, self.schema = name, schema
        parsed = torch._C.parse_schema(f"{CPP_NS}::{name}{schema}")
        self.arg_names = tuple(a.name for a in parsed.arguments)
        self.tensor_args = tuple(a.name for a in parsed.arguments
                                 if str(a.type) in ("Tensor", "Optional[Tensor]"))
        self.n_returns = len(parsed.returns)
        # Outputs a backward reads, saved (and version-checked) with the inputs: the
        # backward finds them by their schema names, as the inputs.
        names = [r.name for r in parsed.returns]
        self.saved_outputs = tuple((names.index(n), n) for n in saved_outputs)
        self.mutable = any(a.alias_info is not None and a.alias_info.is_write
                           for a in parsed.arguments)
        self.outputs = outputs
        self.backends = tuple(backends)
        self.kernels = kernels  # module of fusedloss.kernels holding the Triton launcher
        # An op built in Python on other ops (a chunk loop of matmuls and row kernels):
        # composite(a, namespace) runs the same code for every backend, each through its
        # own namespace's ops. `composite.builds_on` names the op whose kernels it needs.
        self.composite = composite
        self._setup, self._backward, self.reference = setup_context, backward, reference
        self.differentiable = differentiable  # output indices the reference recomputes

    def bind(self, values):
        """The arguments, positional as the dispatcher passes them, by name."""
        return types.SimpleNamespace(**dict(zip(self.arg_names, values)))

    def call(self, backend, **kwargs):
        """Run the op with `backend`'s kernels: "triton", or "cpu" / "cuda" (the C++ ops,
        which the dispatcher sends to the tensors' device; a backward passes on the
        namespace of its forward, ctx.fusedloss_backend)."""
        ns = TRITON_NS if backend in ("triton", TRITON_NS) else CPP_NS
        return getattr(getattr(torch.ops, ns), self.name)(**kwargs)

    def define(self):
        if self.name in OPS:
            raise RuntimeError(f"fusedloss op {self.name!r} is defined twice")
        OPS[self.name] = self
        for ns, lib in _libraries.items():
            lib.define(self.name + self.schema)
            torch.library.register_fake(f"{ns}::{self.name}", self._fake)
            if not self.mutable:  # torch has no autograd formulas for mutating ops
                torch.library.register_autograd(
                    f"{ns}::{self.name}", self._autograd_backward,
                    setup_context=functools.partial(self._autograd_setup, ns))
        if self.composite is not None:
            for ns, lib in _libraries.items():
                lib.impl(self.name, functools.partial(self._composite, ns),
                         "CompositeExplicitAutograd")
        elif "triton" in self.backends:
            _libraries[TRITON_NS].impl(self.name, self._triton, "CompositeExplicitAutograd")
        return self

    @property
    def kernel_op(self):
        """The op whose C++ kernels this one runs (itself, or what a composite builds on)."""
        return self.composite.builds_on if self.composite is not None else self.name

    # ---------------------------------------------------------------- kernels
    def _fake(self, *args):
        return self.outputs(self.bind(args)) if self.n_returns else None

    def _triton(self, *args):
        a = self.bind(args)
        launcher = getattr(importlib.import_module(f"fusedloss.kernels.{self.kernels}"),
                           self.name)
        device = args[0].device
        # Triton launches on the current CUDA device: make it the input's.
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            # An op with no outputs (it writes over an input) passes none to its launcher.
            outputs = self.outputs(a) if self.n_returns else ()
            return launcher(a, *((outputs,) if self.n_returns == 1 else outputs))

    def _composite(self, ns, *args):
        return self.composite(self.bind(args), ns)

    # ---------------------------------------------------------------- autograd
    def _autograd_setup(self, ns, ctx, inputs, output):
        a = self.bind(inputs)
        ctx.fusedloss_backend = ns
        ctx.fusedloss_arg_names = self.arg_names
        # Every tensor input is saved, but only unpacked (and version-checked) by a
        # backward that needs it: a higher-order one always does.
        ctx.save_for_backward(*(getattr(a, n) for n in self.tensor_args),
                              *(output[i] for i, _ in self.saved_outputs))
        ctx.fusedloss_scalars = {n: v for n, v in vars(a).items() if n not in self.tensor_args}
        if self._setup is not None:
            self._setup(ctx, a, output)

    def saved_args(self, ctx):
        """The op's arguments in a backward, tensors from the saved ones, and the
        saved_outputs by name."""
        names = (*self.tensor_args, *(n for _, n in self.saved_outputs))
        return types.SimpleNamespace(**ctx.fusedloss_scalars,
                                     **dict(zip(names, ctx.saved_tensors)))

    def _autograd_backward(self, ctx, *grads):
        if self._backward is None:
            raise RuntimeError(f"fusedloss::{self.name} is not differentiable (it computes "
                               "gradients itself); differentiate the loss that calls it")
        if torch.is_grad_enabled():  # create_graph=True
            grads_in = self._higher_order(ctx, grads)
        else:
            grads_in = self._backward(ctx, *grads)
        return tuple(grads_in.get(n) for n in self.arg_names)

    def _higher_order(self, ctx, grads):
        """Gradients that are themselves differentiable: the reference recomputation of the
        differentiable outputs, differentiated with create_graph=True. The fast backward
        treats its saved gradient as a constant and would drop the second-order terms."""
        a = self.saved_args(ctx)
        wanted = [n for n, need in zip(self.arg_names, ctx.needs_input_grad) if need]
        with torch.enable_grad():
            outs = self.reference(a)
        pairs = [(o, grads[i]) for o, i in zip(outs, self.differentiable)
                 if grads[i] is not None and o.requires_grad]
        if not wanted or not pairs:
            return {}
        got = torch.autograd.grad([o for o, _ in pairs], [getattr(a, n) for n in wanted],
                                  [g for _, g in pairs], create_graph=True, allow_unused=True)
        return dict(zip(wanted, got))


# -------------------------------------------------------------------- saved gradients
# The row-wise ops (cross-entropy, focal, sigmoid focal) compute d loss / d x in their
# forward and return it as their last output; the backward only scales it by the
# incoming gradient. By default the autograd graph owns that buffer and the backward
# scales it in place, so fwd+bwd never holds more than the logits and one gradient.
_keep_gradient_buffers = contextvars.ContextVar("fusedloss_keep_gradient_buffers",
                                                default=False)


@contextlib.contextmanager
def reusable_graph():
    """Build losses whose autograd graph can be run backward more than once.

    By default a kernel backend keeps one gradient buffer per loss and its backward scales
    that buffer in place, so fwd+bwd never holds more than the logits and one gradient.
    That consumes the buffer: a second backward through the same graph (retain_graph=True,
    torch.autograd.gradcheck) raises. Losses computed inside this context keep the buffer
    intact instead, at the cost of one more gradient-sized buffer during the backward.
    """
    token = _keep_gradient_buffers.set(True)
    try:
        yield
    finally:
        _keep_gradient_buffers.reset(token)


def reusable_graph_active():
    return _keep_gradient_buffers.get()


def owned(grad):
    """Hand an op's gradient output over to the autograd graph: the backward may scale it
    in place (the functional layer drops its own reference right after)."""
    if not torch.compiler.is_compiling() and not _keep_gradient_buffers.get():
        grad._fusedloss_owned = True
    return grad


CONSUMED = ("fusedloss: this loss's gradient buffer was already scaled in place by an "
            "earlier backward through the same graph; to run backward more than once "
            "(retain_graph=True, gradcheck), compute the loss inside "
            "`with fusedloss.reusable_graph():`")


def scale_grad(grad, grad_out, reduction, row_shape, in_place):
    """d loss / d x = (saved per-row gradient) * grad_out, broadcast over each row."""
    if reduction == 0:
        grad_out = grad_out.reshape(row_shape)
    if not in_place:
        return grad * grad_out
    # A loss that ends the graph gets grad_out == 1: skip that pass over the buffer where
    # reading the value is free (a CPU scalar; on CUDA it would be a host sync).
    if grad_out.device.type == "cpu" and grad_out.numel() == 1 and float(grad_out) == 1.0:
        return grad
    return grad.mul_(grad_out)


def take_saved(grads, name, grad_out, reduction, row_shape):
    """The saved gradient grads[name] scaled by the incoming gradient: in place, and then
    dropped from `grads`, when the graph owns the buffer (see reusable_graph); under
    tracing, or when a caller of the raw op still holds it (opcheck does), out of place."""
    grad = grads[name]
    if grad is None:
        raise RuntimeError(CONSUMED)
    in_place = (getattr(grad, "_fusedloss_owned", False) and type(grad) is torch.Tensor
                and not torch.compiler.is_compiling())
    if in_place:
        grads[name] = None
    return scale_grad(grad, grad_out, reduction, row_shape, in_place)


def needed_inputs(ctx):
    """The names of the op's inputs whose gradient a backward must return."""
    return {n for n, need in zip(ctx.fusedloss_arg_names, ctx.needs_input_grad) if need}


class SavedGradient:
    """setup_context and backward of an op whose last outputs are d(sum of its loss rows *
    loss_scale) / d input, one per name in `inputs` (by default the single input "x").
    `row_shape(first input)`: the shape that broadcasts a per-row gradient of the loss
    over it (reduction "none"); every input in `inputs` has the same shape."""

    def __init__(self, row_shape, inputs=("x",)):
        self.row_shape, self.inputs = row_shape, tuple(inputs)

    def setup_context(self, ctx, a, outputs):
        ctx.mark_non_differentiable(*outputs[1:])
        # The unused outputs (lse, grad) must not get zero-filled gradients: for grad that
        # would be one more N x C buffer and pass per backward.
        ctx.set_materialize_grads(False)
        ctx.grads = dict(zip(self.inputs, outputs[len(outputs) - len(self.inputs):]))
        ctx.input_numel = getattr(a, self.inputs[0]).numel()
        ctx.reduction = a.reduction
        ctx.row_shape = self.row_shape(getattr(a, self.inputs[0]))

    def backward(self, ctx, grad_loss, *unused):
        if grad_loss is None:  # the loss itself did not reach the output
            return {}
        out = {}
        for name in needed_inputs(ctx) & set(self.inputs):
            grad = ctx.grads[name]
            if grad is not None and grad.numel() != ctx.input_numel:
                raise RuntimeError(f"fusedloss: a gradient for {name} was requested from an "
                                   "op call that did not compute it")
            out[name] = take_saved(ctx.grads, name, grad_loss, ctx.reduction, ctx.row_shape)
        return out

    def op_kwargs(self):
        return dict(setup_context=self.setup_context, backward=self.backward)


class ForwardGradients:
    """setup_context and backward of a fused linear op (linear_cross_entropy, linear_jsd):
    a chunk loop whose last outputs are the gradients of the inputs named in `grads`,
    computed in its forward when the loss is reduced (flags: the op's booleans asking for
    each). The backward then only scales them (in place where the graph owns them). For
    reduction "none" (or a gradient not computed in the forward) it runs the op again,
    each row's incoming gradient folded into the op's `row_weight`, `rerun` overriding
    other arguments. n_rows(a): the number of loss rows."""

    def __init__(self, op_name, grads, flags, n_rows, rerun=None):
        self.op_name, self.grads, self.flags = op_name, tuple(grads), tuple(flags)
        self.n_rows, self.rerun = n_rows, dict(rerun or {})

    def setup_context(self, ctx, a, outputs):
        ctx.mark_non_differentiable(*outputs[1:])
        ctx.set_materialize_grads(False)
        computed = outputs[len(outputs) - len(self.grads):]
        # Reduction "none" gets one incoming gradient per row: only a rerun folds them in.
        ctx.grads = {name: g for name, g in zip(self.grads, computed)
                     if g.numel() > 0 and a.reduction != 0}
        ctx.n_rows = self.n_rows(a)

    def backward(self, ctx, grad_loss, *unused):
        if grad_loss is None:
            return {}
        needed = needed_inputs(ctx) & set(self.grads)
        if needed and needed <= ctx.grads.keys():
            return {name: take_saved(ctx.grads, name, grad_loss, 1, ()) for name in needed}
        op = OPS[self.op_name]
        a = op.saved_args(ctx)
        row_weight = grad_loss.to(acc_dtype(getattr(a, self.grads[0]).dtype)).expand(ctx.n_rows)
        if a.row_weight is not None:
            row_weight = row_weight * a.row_weight
        outs = op.call(ctx.fusedloss_backend, **{
            **vars(a), **self.rerun, "row_weight": row_weight.contiguous(),
            **{flag: name in needed for flag, name in zip(self.flags, self.grads)}})
        computed = outs[len(outs) - len(self.grads):]
        return {name: g for name, g in zip(self.grads, computed) if name in needed}

    def op_kwargs(self):
        return dict(setup_context=self.setup_context, backward=self.backward)


def rows_of(x):
    """The rows of the softmax ops' (B, C, S) input: one per (b, s)."""
    return x.shape[0] * x.shape[2]


def loss_output(x, rows, reduction, acc=False):
    """A loss output: (rows,) for reduction "none", else 0-dim; in x's dtype, or in the
    accumulation dtype when `acc` (an op's acc_loss)."""
    return x.new_empty((rows,) if reduction == 0 else (),
                       dtype=acc_dtype(x.dtype) if acc else x.dtype)


def grad_output(x, compute_grad):
    """The gradient output: x's shape, contiguous, or an empty (0,) tensor when it is not
    computed."""
    return x.new_empty(x.shape) if compute_grad else x.new_empty((0,))


def reduce_reference_rows(rows, a, out_dtype):
    """The loss output of a row-wise op from its rows, as the kernels reduce it."""
    if a.reduction == 0:
        return rows.reshape(-1).to(out_dtype)
    acc = acc_dtype(out_dtype)
    return (rows.to(acc).sum() * a.loss_scale.to(acc)).to(out_dtype)
