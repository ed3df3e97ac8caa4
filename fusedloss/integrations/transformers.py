"""Hugging Face transformers language models trained through fusedloss (transformers is an
optional dependency: pip install "fusedloss[transformers]").

    import fusedloss.integrations.transformers as fl_hf
    model = fl_hf.apply(AutoModelForCausalLM.from_pretrained(...))   # or a VLM, a PeftModel

`apply` patches the model in place and returns it. It works on any causal LM or
vision-language model whose loss it can compute exactly, and refuses the others with
`UnsupportedModel` (a TypeError) naming the class and the reason. No model's forward is
copied: the patch hooks two things transformers keeps stable, the output embeddings
(`model.get_output_embeddings()`, an nn.Linear) and `model.loss_function`, and learns what
the model's own forward does to the logits by watching it.

The loss keeps the semantics of the model's own loss_function, transformers' ForCausalLMLoss
(or ForMaskedLMLoss, which does not shift, for the encoder-decoders that use it): labels
shifted by one (or `shift_labels` used as given), positions labelled `ignore_index` (-100,
or the one passed to forward) not counted, the mean over counted positions, or their sum
divided by `num_items_in_batch` when given (as Trainer does under gradient accumulation).
Everything model-specific stays in the model's own code: what runs before the head (a
BERT-style transform, a scaled hidden state), a router aux loss added to the loss after.

fused_linear=True (default), a forward given `labels`: the output embeddings return a
stand-in for the logits (`_Logits`, a tensor without data) that records what the forward
then does to it: multiplying or dividing by a number, tanh (a softcap c*tanh(x/c)), float
casts, and selecting positions (indexing or reshaping that keeps the vocabulary dimension).
When the model's loss_function receives it, that chain maps exactly onto fusedloss's
transform z = softcap * tanh(logit_scale * x / softcap) (or z = logit_scale * x), and
fusedloss.lm_head_cross_entropy computes the loss from the head's input and weight (and
bias) inside the head's own forward, so FSDP2, DeepSpeed ZeRO-3 and accelerate gather the
head (and reduce its gradient) as for head(x), once: the model's own call of the head, which
returns the stand-in, runs none of the head's hooks. The logits are never computed, and
apply() may come before or after fully_shard or accelerate's hooks are added. (A PEFT
modules_to_save head is followed, but FSDP2 must then shard the wrapper with the model's
root, not with a fully_shard of its own: that one's hooks sit on the wrapper, which the
loss does not call, and linear_cross_entropy refuses the still-sharded weight.)
Anything else that touches the stand-in (a vocabulary slice, a tensor scale, logsumexp for
a z-loss, writing into it, its own cross-entropy, a second call of the head) raises
UnsupportedModel at that point, before any loss is returned. Such refusals surface at the
first labelled forward; `apply(model, verify=True)` runs a probe batch at apply() instead,
and compares the patched loss with the model's own.

Logits, the rule: without `labels` the model's forward runs unchanged (generation). With
`labels`, a model in training mode returns `logits=None` (they were never computed), and one
in eval mode returns its own logits (Trainer's evaluate / predict and compute_metrics):
forward's `return_logits=True` / `False` overrides that. When logits are returned, the
model computes them as ever and its loss_function computes the loss on them with
fusedloss.cross_entropy, as with fused_linear=False.

fused_linear=False: the model's loss_function computes the loss on the logits the model
computed, with fusedloss.cross_entropy (not upcast to float32: the kernels accumulate in
float32 anyway).

Both ways the loss is float32 for a half-precision model, as transformers' own (which
upcasts the logits); fusedloss reads the half-precision hidden states or logits as they are
and accumulates in float32, so it agrees with transformers' to the half precision's rounding.
"""
import collections
import collections.abc
import contextlib
import functools
import inspect
import math
import numbers
import types

import torch
import torch.nn.functional as F

import fusedloss

LOSS_OPTIONS = ("label_smoothing", "z_loss", "logit_scale", "weight", "backend")
FUSED_ONLY_OPTIONS = ("chunk_size",)
_SET_BY_THE_MODEL = {
    "reduction": "transformers' semantics set it: the mean, or the sum / num_items_in_batch",
    "ignore_index": "transformers' semantics set it: -100, or the ignore_index passed to forward",
    "softcap": "the softcapping the model's own forward applies is applied",
}
MIN_TRANSFORMERS = (4, 46)  # the first with model.loss_function
_STATE = "_fusedloss_state"  # on the patched model: its options and what was replaced


class UnsupportedModel(TypeError):
    """A model whose loss fusedloss cannot compute exactly; the message names its class and
    the reason."""

    def __init__(self, model, reason):
        name = model if isinstance(model, str) else type(model).__name__
        super().__init__(f"{name}: {reason} (fusedloss.integrations.transformers computes "
                         f"a model's loss only where it is exact)")
        self.model_class, self.reason = name, reason


def apply(model, *, fused_linear=True, verify=False, **loss_options):
    """Patch a transformers language model in place so that its loss runs through fusedloss;
    returns the model. See the module docstring for the semantics.

    model: a transformers PreTrainedModel with a language-modelling loss (any causal LM or
    vision-language model whose loss_function is transformers' ForCausalLMLoss or
    ForMaskedLMLoss), or a peft PeftModel around one (a `modules_to_save` copy of the head
    is followed; a LoRA on the head is refused).
    fused_linear: True computes the loss from the LM head's input and weight (no logits);
    False replaces only the loss on the logits (fusedloss.cross_entropy).
    verify: True runs a probe batch (2 x 8 random tokens, text only) through the patched and
    the unpatched forward and raises UnsupportedModel unless the losses agree; or a dict of
    the model's inputs (labels included) to probe with instead.
    loss_options: label_smoothing, z_loss, logit_scale (multiplies the logits the model
    passes to its loss), weight (a class weight of shape (vocab_size,)), backend, and with
    fused_linear=True chunk_size; their meaning is fusedloss's. Applying again replaces
    the earlier patch; restore(model) removes it.
    """
    import transformers

    version = tuple(int(p) for p in transformers.__version__.split(".")[:2])
    if version < MIN_TRANSFORMERS:
        raise UnsupportedModel(model, f"transformers {transformers.__version__} is older "
                                      f"than {'.'.join(map(str, MIN_TRANSFORMERS))}, which "
                                      f"introduced model.loss_function")
    if not isinstance(fused_linear, bool):
        raise TypeError(f"fused_linear must be a bool, got {type(fused_linear).__name__}")
    if not isinstance(verify, (bool, collections.abc.Mapping)):
        raise TypeError(f"verify must be a bool or a dict of inputs, got {type(verify).__name__}")
    accepted = LOSS_OPTIONS + (FUSED_ONLY_OPTIONS if fused_linear else ())
    for key in loss_options:
        if key not in accepted:
            why = _SET_BY_THE_MODEL.get(key) or (
                "an option of fused_linear=True only" if key in FUSED_ONLY_OPTIONS
                else "not a loss option")
            raise TypeError(f"apply() got an unexpected loss option {key!r} ({why}); "
                            f"accepted: {', '.join(accepted)}")
    target = _transformers_model(model, transformers)
    restore(target)
    if _loss_kind(target.loss_function) is None:
        name = getattr(target.loss_function, "__name__", repr(target.loss_function))
        raise UnsupportedModel(target, f"its loss_function is {name}, not transformers' "
                                       f"ForCausalLMLoss or ForMaskedLMLoss")
    if fused_linear:
        _head_linears(target)  # refuses a head that is not an nn.Linear
    signature = inspect.signature(target.forward)
    if "return_logits" in signature.parameters:
        raise UnsupportedModel(target, "its forward has a return_logits argument of its own, "
                                       "which apply()'s would shadow")
    target.__dict__[_STATE] = {"options": dict(loss_options), "fused_linear": fused_linear,
                               "forward": target.__dict__.get("forward")}
    target.forward = types.MethodType(_patched_forward(signature), target)
    if verify is not False:
        try:
            _verify(target, None if verify is True else verify)
        except BaseException:
            restore(target)
            raise
    return model


def restore(model):
    """Undo apply() on this model (a no-op on a model that is not patched)."""
    if hasattr(model, "get_base_model") and _STATE not in vars(model):
        model = model.get_base_model()  # a peft PeftModel
    state = model.__dict__.pop(_STATE, None)
    if state is None:
        return
    if state["forward"] is None:
        del model.__dict__["forward"]
    else:
        model.__dict__["forward"] = state["forward"]


def _transformers_model(model, transformers):
    """The transformers model to patch: the model, or the one a peft PeftModel wraps."""
    if not isinstance(model, transformers.PreTrainedModel) and hasattr(model, "get_base_model"):
        model = model.get_base_model()
    if not isinstance(model, transformers.PreTrainedModel):
        raise UnsupportedModel(model, "not a transformers PreTrainedModel (nor a peft model "
                                      "around one)")
    return model


def _loss_kind(loss_function):
    """"causal" for transformers' ForCausalLMLoss, "masked" for ForMaskedLMLoss, else None."""
    from transformers.loss import loss_utils
    return {loss_utils.ForCausalLMLoss: "causal",
            loss_utils.ForMaskedLMLoss: "masked"}.get(loss_function)


def _is_linear(module):
    return isinstance(module, torch.nn.Linear) and type(module).forward is torch.nn.Linear.forward


# The hooks nn.Module.__call__ runs around a module's forward (FSDP2's fully_shard and
# DeepSpeed ZeRO-3 register theirs there; accelerate's wrap the instance's forward).
_HOOKS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")


def _swap_forward(module, forward, hooks):
    """Set the module's instance forward (None: its class's) and its hooks (a dict by the
    names in _HOOKS); return what they were, in the same form."""
    was = module.__dict__.get("forward"), {k: module.__dict__[k] for k in _HOOKS}
    if forward is None:
        module.__dict__.pop("forward", None)
    else:
        module.__dict__["forward"] = forward
    module.__dict__.update(hooks)
    return was


def _head_linears(model):
    """The nn.Linear modules that may compute the model's logits: its output embeddings, or
    the copies a peft ModulesToSaveWrapper dispatches to (the one it calls is the one the
    stand-in then reads)."""
    try:
        head = model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        head = None
    if head is None:
        raise UnsupportedModel(model, "it has no output embeddings (get_output_embeddings() "
                                      "is None): no LM head to fuse")
    if _is_linear(head):
        return [head]
    wrapped = getattr(head, "modules_to_save", None)  # peft's ModulesToSaveWrapper
    original = getattr(head, "original_module", None)
    if isinstance(wrapped, torch.nn.ModuleDict) and _is_linear(original) \
            and all(_is_linear(m) for m in wrapped.values()):
        return [original, *wrapped.values()]
    lora = " (a LoRA adapter on the LM head)" if hasattr(head, "base_layer") else ""
    raise UnsupportedModel(model, f"its output embeddings are a "
                                  f"{type(head).__module__}.{type(head).__qualname__}{lora}, "
                                  f"not a torch.nn.Linear")


# ------------------------------------------------------------------------ the semantics
def _targets(kind, labels, shift_labels, ignore_index):
    """The loss's targets, flat: ForCausalLMLoss's (position t predicts labels[t + 1], or
    shift_labels as given) or ForMaskedLMLoss's (the labels as they are)."""
    if kind == "masked":
        return labels.reshape(-1)
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    return shift_labels.reshape(-1)


def _reduced(loss_with, num_items_in_batch):
    """The mean over counted positions, or their sum / num_items_in_batch (fixed_cross_entropy)."""
    if num_items_in_batch is None:
        return loss_with("mean")
    loss = loss_with("sum")
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch


def _float32_loss(x):
    """A context in which fusedloss returns a float32 loss from half-precision x, as
    transformers' loss (which upcasts the logits) does: autocast in x's own dtype, so that
    fusedloss follows torch's autocast policy for losses (float32 out, the half inputs
    read as they are, nothing cast). Under the caller's autocast, or for float32 x,
    nothing changes."""
    device = x.device.type
    if x.dtype not in (torch.float16, torch.bfloat16) or torch.is_autocast_enabled(device):
        return contextlib.nullcontext()
    return torch.autocast(device, dtype=x.dtype)


def _check_rows(rows, target):
    if rows != target.numel():  # torch's cross_entropy message, as transformers would raise
        raise ValueError(f"Expected input batch_size ({rows}) to match target batch_size "
                         f"({target.numel()}).")


class _Call:
    """One labelled forward of a patched model: the loss functions it installs, and the
    logits stand-ins its head returns (fused) or the logits its loss reads."""

    def __init__(self, model, fused):
        self.model, self.fused = model, fused
        self.options = dict(model.__dict__[_STATE]["options"])
        self.heads = self.losses = 0
        self.refusal = None  # an UnsupportedModel the stand-in raised
        self.received = []  # the logits objects the loss functions got
        self.own = {}  # each head's own forward and hooks, held back while it is patched

    @contextlib.contextmanager
    def installed(self):
        """The model's (and its sub-models') loss_function, and with fused its head, replaced
        for the call."""
        import transformers
        owners = [(m, _loss_kind(m.loss_function)) for m in self.model.modules()
                  if isinstance(m, transformers.PreTrainedModel)]
        owners = [(m, kind) for m, kind in owners if kind is not None]
        saved = [(m, m.__dict__.get("_loss_function")) for m, _ in owners]
        heads = _head_linears(self.model) if self.fused else []
        try:
            for m, kind in owners:
                m.loss_function = functools.partial(self.loss, kind=kind)
            for h in heads:  # the model's call of the head runs none of its hooks
                self.own[h] = _swap_forward(h, functools.partial(self.head_forward, h),
                                            {k: collections.OrderedDict() for k in _HOOKS})
            yield self
        finally:
            for h, own in self.own.items():
                _swap_forward(h, *own)
            for m, loss_function in saved:
                if loss_function is None:
                    del m.__dict__["_loss_function"]
                else:
                    m.loss_function = loss_function

    def refuse(self, reason):
        """Raise UnsupportedModel, kept on the call as well: a binary operator turns a
        TypeError raised inside it into NotImplemented, and model code may catch it."""
        self.refusal = self.refusal or UnsupportedModel(self.model, reason)
        raise self.refusal

    def head_forward(self, head, input):
        self.heads += 1
        if self.heads > 1:
            self.refuse("the forward calls its LM head (the output embeddings) more than once")
        return _Logits(self, head, input)

    def loss(self, logits, labels, vocab_size, num_items_in_batch=None, ignore_index=-100,
             shift_labels=None, *, kind, **kwargs):
        """The model's loss_function (ForCausalLMLoss / ForMaskedLMLoss, same arguments)
        computed by fusedloss."""
        self.losses += 1
        self.received.append(logits)
        if not self.fused:
            target = _targets(kind, labels, shift_labels, ignore_index).to(logits.device)
            logits = logits.reshape(-1, vocab_size)
            _check_rows(logits.shape[0], target)
            with _float32_loss(logits):
                return _reduced(lambda reduction: fusedloss.cross_entropy(
                    logits, target, ignore_index=ignore_index, reduction=reduction,
                    **self.options), num_items_in_batch)
        if not isinstance(logits, _Logits) or logits._call is not self:
            self.refuse("the logits its loss_function receives are not the output of its LM "
                        "head (output embeddings)")
        if vocab_size != logits._head.out_features:
            self.refuse(f"the forward passes vocab_size={vocab_size} to its loss_function, but "
                        f"its LM head has {logits._head.out_features} outputs")
        x = logits._hidden.reshape(-1, logits._hidden.shape[-1])
        target = _targets(kind, labels, shift_labels, ignore_index).to(x.device)
        _check_rows(x.shape[0], target)
        options = {**self.options, **logits._transform(self.options.get("logit_scale", 1.0)),
                   "ignore_index": ignore_index}
        with self.as_its_own(logits._head), _float32_loss(x):
            return _reduced(lambda reduction: fusedloss.lm_head_cross_entropy(
                logits._head, x, target, reduction=reduction, **options), num_items_in_batch)

    @contextlib.contextmanager
    def as_its_own(self, head):
        """The head with its own forward and hooks back, for the call that computes the
        loss: lm_head_cross_entropy calls it (head(x)), so that FSDP2, DeepSpeed ZeRO-3
        and accelerate place its weight and reduce its gradient there, once a forward as
        for the model's own head(x). The stand-in call before ran none of its hooks."""
        patched = _swap_forward(head, *self.own[head])
        try:
            yield
        finally:
            _swap_forward(head, *patched)

    def check(self):
        """After the forward: the loss went through the model's loss_function (and, fused,
        from its head's stand-in)."""
        if self.refusal is not None:  # raised, and caught in the model's code
            raise self.refusal
        if self.fused and self.heads == 0:
            self.refuse("the forward does not call its LM head (the output embeddings) when "
                        "given labels")
        if self.losses == 0:
            self.refuse("the forward computes its loss without model.loss_function")


# ------------------------------------------------------------------ the logits stand-in
_NUMBER_OPS = {  # (a stand-in, a Python number) -> how the number acts on the logits
    torch.Tensor.__mul__: "mul", torch.Tensor.__rmul__: "mul", torch.Tensor.mul: "mul",
    torch.mul: "mul", torch.Tensor.multiply: "mul", torch.multiply: "mul",
    torch.Tensor.__truediv__: "div", torch.Tensor.div: "div", torch.div: "div",
    torch.Tensor.divide: "div", torch.divide: "div", torch.Tensor.true_divide: "div",
    torch.true_divide: "div",
}
_IN_PLACE = {torch.Tensor.mul_: "mul", torch.Tensor.__imul__: "mul", torch.Tensor.div_: "div",
             torch.Tensor.__itruediv__: "div", torch.Tensor.tanh_: "tanh", torch.Tensor.neg_: "neg"}
_TANH = {torch.tanh, torch.Tensor.tanh, F.tanh}
_NEG = {torch.neg, torch.Tensor.neg, torch.Tensor.__neg__, torch.negative, torch.Tensor.negative}
_CASTS = {torch.Tensor.float: lambda t: torch.float32,
          torch.Tensor.double: lambda t: torch.float64,
          torch.Tensor.half: lambda t: torch.float16,
          torch.Tensor.bfloat16: lambda t: torch.bfloat16,
          torch.Tensor.to: lambda t, *a, **k: _to_dtype(a, k),
          torch.Tensor.type_as: lambda t, other: other.dtype}
_SAME = {torch.Tensor.contiguous}
_RESHAPES = {torch.Tensor.view, torch.Tensor.reshape, torch.reshape, torch.Tensor.flatten,
             torch.flatten}
_METADATA = {getattr(torch.Tensor, name).__get__ for name in (
    "shape", "dtype", "device", "ndim", "requires_grad", "is_cuda", "is_cpu", "is_meta",
    "layout", "is_sparse", "is_quantized", "is_nested", "grad_fn", "is_leaf")} | {
    torch.Tensor.size, torch.Tensor.dim, torch.Tensor.numel, torch.Tensor.is_floating_point,
    torch.Tensor.is_complex, torch.Tensor.get_device, torch.Tensor.element_size,
    torch.Tensor.__len__, torch.Tensor.is_contiguous, torch.Tensor.stride, torch.Tensor.__hash__,
    torch.is_floating_point, torch.numel}
_NAMED = {"logsumexp": "computes logsumexp of the logits (a z-loss) besides model.loss_function",
          "cross_entropy": "computes its own cross-entropy on the logits",
          "nll_loss": "computes its own cross-entropy on the logits",
          "log_softmax": "computes log_softmax of the logits besides model.loss_function",
          "__setitem__": "writes into the logits (__setitem__)",
          "masked_fill": "masks the logits", "masked_fill_": "masks the logits",
          "__add__": "adds to the logits (a bias?)", "add": "adds to the logits (a bias?)",
          "transpose": "transposes the logits"}


def _to_dtype(args, kwargs):
    """The dtype Tensor.to(...) converts to (None: it keeps the dtype)."""
    for a in (*args, kwargs.get("dtype"), kwargs.get("other")):
        if isinstance(a, torch.dtype):
            return a
        if isinstance(a, torch.Tensor):
            return a.dtype
    return None


def _is_number(k):
    return isinstance(k, numbers.Real) and not isinstance(k, bool) and math.isfinite(k)


def _index_keeps_vocab(index, ndim):
    """Whether logits[index] selects positions only, keeping the last (vocabulary) dimension
    whole: then hidden[index] selects the same positions of the head's input."""
    items = index if isinstance(index, tuple) else (index,)
    used = [1 if not isinstance(i, torch.Tensor) or i.dtype != torch.bool else i.dim()
            for i in items]
    used = [0 if i is None or i is Ellipsis else n for i, n in zip(items, used)]
    if any(i is Ellipsis for i in items):
        last = next((i for i, n in zip(reversed(items), reversed(used)) if n or i is Ellipsis))
        return last is Ellipsis or (isinstance(last, slice) and last == slice(None))
    if sum(used) < ndim:
        return True
    last = next(i for i, n in zip(reversed(items), reversed(used)) if n)
    return isinstance(last, slice) and last == slice(None)


class _Logits(torch.Tensor):
    """The logits an LM head would have returned, not computed: a tensor of their shape,
    dtype and device without data, holding the head's input (hidden states, positions
    selected as the forward selected the logits') and the transform the forward applied,
    value = cap * tanh(scale * x) (cap set) or scale * x, x the head's output. Every other
    operation raises UnsupportedModel naming the model."""

    @staticmethod
    def __new__(cls, call, head, hidden, scale=1.0, cap=None, dtype=None):
        if dtype is None:
            device = hidden.device.type
            dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) \
                else hidden.dtype
        self = torch.Tensor._make_wrapper_subclass(
            cls, (*hidden.shape[:-1], head.out_features), dtype=dtype, device=hidden.device)
        self._call, self._head, self._hidden = call, head, hidden
        self._scale, self._cap = scale, cap
        return self

    def _like(self, hidden=None, scale=None, cap=False, dtype=None):
        return _Logits(self._call, self._head, self._hidden if hidden is None else hidden,
                       self._scale if scale is None else scale,
                       self._cap if cap is False else cap, dtype or self.dtype)

    def _refuse(self, why):
        self._call.refuse(f"the forward {why}")

    def _transform(self, user_scale=1.0):
        """fusedloss's logit_scale and softcap for this value times user_scale."""
        scale, cap = self._scale, self._cap
        if cap is None:
            scale *= user_scale
            if not scale > 0:
                self._refuse(f"scales the logits by {scale}, not a positive number")
            return {"logit_scale": scale, "softcap": None}
        cap *= user_scale
        if cap < 0:  # c tanh(a x) = (-c) tanh(-a x)
            cap, scale = -cap, -scale
        if not (scale > 0 and cap > 0):
            self._refuse(f"maps the logits to {cap} * tanh({scale} * logits)")
        return {"logit_scale": scale * cap, "softcap": cap}

    def _step(self, op, k=None):
        """The value after op ("mul", "div" by the number k, "tanh", "neg")."""
        if op == "tanh":
            if self._cap is not None:
                self._refuse("applies tanh to the logits twice")
            return dict(cap=1.0)
        if op == "neg":
            k, op = -1.0, "mul"
        if op == "div":
            if k == 0:
                self._refuse("divides the logits by 0")
            k = 1.0 / k
        return dict(cap=self._cap * k) if self._cap is not None else dict(scale=self._scale * k)

    def _cast(self, dtype):
        if dtype is None or dtype == self.dtype:
            return self
        if dtype not in (torch.float32, torch.float64) and dtype != self._hidden.dtype:
            self._refuse(f"casts the logits to {dtype}")
        return self._like(dtype=dtype)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _METADATA:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        if func is torch.Tensor.__repr__:
            self = args[0]
            return f"<fusedloss stand-in for {type(self._call.model).__name__}'s logits, " \
                   f"shape {tuple(self.shape)}>"
        self = next(a for a in (*args, *kwargs.values()) if isinstance(a, _Logits))
        name = getattr(func, "__name__", repr(func))
        rest = [a for a in (*args, *kwargs.values()) if a is not self]
        if func in _NUMBER_OPS or func in _IN_PLACE:
            op = _NUMBER_OPS.get(func) or _IN_PLACE[func]
            if op in ("mul", "div") and not (len(rest) == 1 and _is_number(rest[0])):
                kind = "a tensor" if any(isinstance(a, torch.Tensor) for a in rest) else \
                    ", ".join(repr(a) for a in rest)
                self._refuse(f"{'multiplies' if op == 'mul' else 'divides'} the logits by "
                             f"{kind} ({name}), not by a number")
            if op == "div" and (args[0] is not self or "rounding_mode" in kwargs):
                self._refuse(f"divides by the logits ({name})")
            change = self._step(op, rest[0] if rest else None)
            if func in _IN_PLACE:
                self._scale = change.get("scale", self._scale)
                self._cap = change.get("cap", self._cap)
                return self
            return self._like(**change)
        if func in _TANH and not rest:
            return self._like(**self._step("tanh"))
        if func in _NEG and not rest:
            return self._like(**self._step("neg"))
        if func in _CASTS and args[0] is self:
            return self._cast(_CASTS[func](*args, **kwargs))
        if func in _SAME and args[0] is self:
            return self
        if func is torch.Tensor.__getitem__ and args[0] is self:
            if not _index_keeps_vocab(args[1], self.dim()):
                self._refuse("slices the vocabulary of the logits")
            return self._like(hidden=self._hidden[args[1]])
        if func in _RESHAPES:
            with torch._C.DisableTorchFunctionSubclass():
                shape = func(torch.empty(self.shape, device="meta"), *args[1:], **kwargs).shape
            if not shape or shape[-1] != self.shape[-1]:
                self._refuse(f"reshapes the vocabulary dimension of the logits ({name})")
            return self._like(hidden=self._hidden.reshape(*shape[:-1], self._hidden.shape[-1]))
        self._refuse(_NAMED.get(name, f"applies {name} to the logits"))

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        self = next(a for a in args if isinstance(a, _Logits))
        self._refuse(f"runs {func} on the logits")


# ------------------------------------------------------------------------ the forward
def _labels(signature, args, kwargs):
    if "labels" in kwargs:
        return kwargs["labels"]
    names = list(signature.parameters)
    at = names.index("labels") if "labels" in names else len(args)
    return args[at] if at < len(args) else None


def _patched_forward(signature):
    """The model's forward (as it was at apply()), with the loss computed by fusedloss when
    labels are given (see the module docstring)."""

    def forward(self, *args, return_logits=None, **kwargs):
        state = self.__dict__[_STATE]
        inner = state["forward"] or type(self).forward.__get__(self)
        if _labels(signature, args, kwargs) is None:
            return inner(*args, **kwargs)
        if return_logits is None:
            return_logits = not self.training
        call = _Call(self, fused=state["fused_linear"] and not return_logits)
        with call.installed():
            try:
                out = inner(*args, **kwargs)
            except Exception as error:
                if call.refusal is None or error is call.refusal:
                    raise
                raise call.refusal from error  # the error a refusal became on its way out
        call.check()
        return out if return_logits else _without_logits(out, call.received)

    # The signature callers and Trainer see: the model's own, plus return_logits.
    params = list(signature.parameters.values())
    extra = inspect.Parameter("return_logits", inspect.Parameter.KEYWORD_ONLY, default=None)
    at = next((i for i, p in enumerate(params) if p.kind is inspect.Parameter.VAR_KEYWORD),
              len(params))
    self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    forward.__signature__ = signature.replace(
        parameters=[self_param] + params[:at] + [extra] + params[at:])
    return forward


def _without_logits(out, received):
    """The model's output without its logits: stand-ins and the logits its loss read."""
    drop = lambda v: isinstance(v, _Logits) or any(v is r for r in received)  # noqa: E731
    if isinstance(out, tuple):
        return tuple(v for v in out if not drop(v))
    return type(out)(**{k: v for k, v in out.items() if not (drop(v) or k == "logits")})


# ------------------------------------------------------------------------ verify
def _special_ids(config, found=None):
    """Every token id a config (and its sub-configs) names: a probe avoids them."""
    found = set() if found is None else found
    for key, value in vars(config).items():
        if hasattr(value, "to_dict") and hasattr(value, "model_type"):
            _special_ids(value, found)
        elif key.endswith(("token_id", "token_ids", "token_index")):
            found.update(v for v in (value if isinstance(value, (list, tuple)) else [value])
                         if isinstance(v, int) and not isinstance(v, bool))
    return found


def _probe_batch(model, batch_size=2, seq_len=8, seed=0):
    """A text batch for model: random token ids (none the config names special) below its
    LM head's size, an attention mask, and labels with ignored positions."""
    vocab = _head_linears(model)[0].out_features
    special = _special_ids(model.config)
    allowed = torch.tensor([i for i in range(min(vocab, 10_000)) if i not in special])
    generator = torch.Generator().manual_seed(seed)
    ids = allowed[torch.randint(len(allowed), (batch_size, seq_len), generator=generator)]
    labels = ids.clone()
    labels[0, -seq_len // 4:] = -100
    labels[-1, :seq_len // 4] = -100
    device = model.get_input_embeddings().weight.device
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "labels": labels.to(device)}


def _verify(model, inputs):
    """Raise UnsupportedModel unless the patched forward's loss equals the unpatched one's
    on inputs (a probe batch when None), in eval mode (no dropout) without gradients."""
    state = model.__dict__[_STATE]
    inner = state["forward"] or type(model).forward.__get__(model)
    inputs = dict(_probe_batch(model) if inputs is None else inputs)
    if inputs.get("labels") is None:
        raise ValueError("apply(verify=...): the inputs must include labels")
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            try:
                expected = inner(**inputs).loss
            except Exception as error:
                raise ValueError(
                    f"apply(verify=True): {type(model).__name__} did not run the probe batch "
                    f"(random text, {', '.join(inputs)}) unpatched ({type(error).__name__}: "
                    f"{error}); pass verify=<a dict of its inputs with labels>") from error
            loss = model(**inputs, return_logits=False).loss
    finally:
        model.train(training)
    half = expected.dtype in (torch.float16, torch.bfloat16) or \
        _head_linears(model)[0].weight.dtype in (torch.float16, torch.bfloat16)
    tol = 2e-2 if half else 1e-4
    if not torch.allclose(loss.float(), expected.float(), rtol=tol, atol=tol):
        raise UnsupportedModel(model, f"apply(verify=True): the patched loss {loss.item():.6g} "
                                      f"differs from the model's own {expected.item():.6g}")
