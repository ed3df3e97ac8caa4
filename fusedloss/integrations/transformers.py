"""Hugging Face transformers causal LMs trained through fusedloss (transformers is an
optional dependency: pip install "fusedloss[transformers]").

    import fusedloss.integrations.transformers
    model = fusedloss.integrations.transformers.apply(AutoModelForCausalLM.from_pretrained(...))

`apply` patches the model in place and returns it. The loss keeps the semantics of
transformers' own ForCausalLMLoss (`model.loss_function`): the labels are shifted by one
(or `shift_labels` is used as given), positions labelled `ignore_index` (-100, or the
`ignore_index` passed to forward) are not counted, and the loss is the mean over counted
positions, or their sum divided by `num_items_in_batch` when that is given (as Trainer does
under gradient accumulation).

fused_linear=True (default): a forward given `labels` computes the loss with
fusedloss.lm_head_cross_entropy from the decoder's last hidden state and the LM head's
weight (and bias, if any), inside the head's own forward (so FSDP2, DeepSpeed ZeRO-3 and
accelerate gather the head as for head(x)), and the logits are never computed. It honours the model's own
final-logit softcapping (Gemma 2's `config.final_logit_softcapping`), tied embeddings (the
head's weight is the tied tensor) and autocast (the head then runs in the autocast dtype,
as nn.Linear would). How: the model's own forward runs without the labels and with
`logits_to_keep` selecting no position, so its LM head projects nothing; a forward hook on
the decoder (`model.model`, or `model.transformer` for GPT-2) captures the last hidden
state. No model's forward code is copied.

Logits, the rule: without `labels` the model's forward runs unchanged and returns its
logits (generation, `logits_to_keep` included). With `labels`, a model in training mode
returns `logits=None` (the point: they are never computed), and a model in eval mode
returns them (Trainer's evaluate / predict and compute_metrics read them); forward's
`return_logits=True` / `False` overrides that. Returned logits are computed as the model
computes them (honouring `logits_to_keep`) besides the fused loss, which always covers
every position.

fused_linear=False: only `model.loss_function` is replaced, by transformers' causal-LM
loss computed with fusedloss.cross_entropy on the logits the model computed (they are not
upcast to float32: the kernels accumulate in float32 anyway).

Both ways the loss is float32 for a half-precision model, as transformers' own (which
upcasts the logits); fusedloss reads the half-precision hidden states or logits as they
are and accumulates in float32.
"""
import contextlib
import functools
import inspect
import types

import torch
import torch.nn.functional as F

import fusedloss

# The causal-LM classes whose forward has the form this patch relies on (decoder, then
# slice_logits_to_keep, the LM head, optional softcapping, model.loss_function), checked
# in transformers 5.24. Others are refused rather than patched on trust.
SUPPORTED = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM",
             "Gemma2ForCausalLM", "GPT2LMHeadModel")
LOSS_OPTIONS = ("label_smoothing", "z_loss", "logit_scale", "weight", "backend")
FUSED_ONLY_OPTIONS = ("chunk_size",)
_SET_BY_THE_MODEL = {
    "reduction": "transformers' semantics set it: the mean, or the sum / num_items_in_batch",
    "ignore_index": "transformers' semantics set it: -100, or the ignore_index passed to forward",
    "softcap": "the model's own config.final_logit_softcapping is applied",
}
_STATE = "_fusedloss_state"  # on the patched model: its options and what was replaced


def apply(model, *, fused_linear=True, **loss_options):
    """Patch a transformers causal-LM model in place so that its loss runs through
    fusedloss; returns the model. See the module docstring for the semantics.

    fused_linear: True computes the loss from the hidden states and the LM head's weight
    (fusedloss.linear_cross_entropy, no logits); False replaces only model.loss_function
    (fusedloss.cross_entropy on the logits).
    loss_options: label_smoothing, z_loss, logit_scale, weight (a class weight of shape
    (vocab_size,)), backend, and with fused_linear=True chunk_size; their meaning is
    fusedloss's. Applying again replaces the earlier patch.
    """
    import transformers

    classes = tuple(c for c in (getattr(transformers, name, None) for name in SUPPORTED) if c)
    if not isinstance(model, classes):
        raise TypeError(
            f"fusedloss.integrations.transformers.apply: model must be one of "
            f"{', '.join(SUPPORTED)} (transformers {transformers.__version__}), got "
            f"{type(model).__name__}")
    if not isinstance(fused_linear, bool):
        raise TypeError(f"fused_linear must be a bool, got {type(fused_linear).__name__}")
    accepted = LOSS_OPTIONS + (FUSED_ONLY_OPTIONS if fused_linear else ())
    for key in loss_options:
        if key not in accepted:
            why = _SET_BY_THE_MODEL.get(key) or (
                "an option of fused_linear=True only" if key in FUSED_ONLY_OPTIONS
                else "not a loss option")
            raise TypeError(f"apply() got an unexpected loss option {key!r} ({why}); "
                            f"accepted: {', '.join(accepted)}")
    _restore(model)
    state = {"options": dict(loss_options), "fused_linear": fused_linear}
    if fused_linear:
        model.forward = types.MethodType(_fused_forward(type(model).forward), model)
    else:
        state["loss_function"] = model.__dict__.get("_loss_function")  # one set before
        model.loss_function = functools.partial(_causal_lm_loss, loss_options=state["options"])
    model.__dict__[_STATE] = state
    return model


def _restore(model):
    """Undo an earlier apply() on this model."""
    state = model.__dict__.pop(_STATE, None)
    if state is None:
        return
    if state["fused_linear"]:
        del model.__dict__["forward"]
    elif state["loss_function"] is None:
        del model.__dict__["_loss_function"]
    else:
        model.__dict__["_loss_function"] = state["loss_function"]


# ------------------------------------------------------------------------ the semantics
def _shifted_targets(labels, shift_labels, ignore_index):
    """ForCausalLMLoss's targets, flat: position t predicts labels[t + 1]."""
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


def _causal_lm_loss(logits, labels, vocab_size, num_items_in_batch=None, ignore_index=-100,
                    shift_labels=None, *, loss_options, **kwargs):
    """transformers' ForCausalLMLoss (same arguments) through fusedloss.cross_entropy."""
    target = _shifted_targets(labels, shift_labels, ignore_index).to(logits.device)
    logits = logits.reshape(-1, vocab_size)
    with _float32_loss(logits):
        return _reduced(lambda reduction: fusedloss.cross_entropy(
            logits, target, ignore_index=ignore_index, reduction=reduction, **loss_options),
            num_items_in_batch)


def _linear_loss(model, hidden, labels, call):
    """The causal-LM loss from the decoder's last hidden state and the LM head."""
    ignore_index = call.get("ignore_index", -100)
    target = _shifted_targets(labels, call.get("shift_labels"), ignore_index).to(hidden.device)
    head = model.get_output_embeddings()
    x = hidden.reshape(-1, hidden.shape[-1])
    options = dict(ignore_index=ignore_index,
                   softcap=getattr(model.config, "final_logit_softcapping", None),
                   **model.__dict__[_STATE]["options"])
    # Inside the head's forward (lm_head_cross_entropy): FSDP2, ZeRO-3 and accelerate
    # gather its weight and reduce its gradient as for head(x). Under autocast the head's
    # product runs in the autocast dtype, as nn.Linear would; the loss is float32 either way.
    with _float32_loss(x):
        return _reduced(lambda reduction: fusedloss.lm_head_cross_entropy(
            head, x, target, reduction=reduction, **options), call.get("num_items_in_batch"))


# ------------------------------------------------------------------------ the forward
def _decoder(model):
    decoder = getattr(model, "model", None)
    return decoder if isinstance(decoder, torch.nn.Module) else model.transformer


def _by_name(signature, args, kwargs):
    """Every argument of a forward call by name (those of **kwargs flattened)."""
    call = {}
    for name, value in signature.bind_partial(*args, **kwargs).arguments.items():
        if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            call.update(value)
        else:
            call[name] = value
    return call


def _fused_forward(class_forward):
    """The model class's own forward, with the loss computed by _linear_loss when labels
    are given (see the module docstring)."""
    signature = inspect.signature(class_forward)

    @functools.wraps(class_forward)
    def forward(self, *args, return_logits=None, **kwargs):
        call = _by_name(signature, (self, *args), kwargs)
        del call["self"]
        labels = call.pop("labels", None)
        if labels is None:
            return class_forward(self, **call)
        if return_logits is None:
            return_logits = not self.training
        return_dict = call.pop("return_dict", None)
        if return_dict is None:
            return_dict = getattr(self.config, "return_dict", True)
        if not return_logits:  # no position kept: the LM head projects nothing
            call["logits_to_keep"] = torch.empty(0, dtype=torch.long)
        captured = {}
        hook = _decoder(self).register_forward_hook(
            lambda module, inputs, output: captured.update(hidden=output.last_hidden_state))
        try:
            out = class_forward(self, **call, return_dict=True)
        finally:
            hook.remove()
        loss = _linear_loss(self, captured["hidden"], labels, call)
        out = type(out)(**{**out, "loss": loss, "logits": out.logits if return_logits else None})
        return out if return_dict else out.to_tuple()

    # The signature callers and Trainer see: the model's own, plus return_logits.
    params = list(signature.parameters.values())
    extra = inspect.Parameter("return_logits", inspect.Parameter.KEYWORD_ONLY, default=None)
    at = next((i for i, p in enumerate(params) if p.kind is inspect.Parameter.VAR_KEYWORD),
              len(params))
    forward.__signature__ = signature.replace(parameters=params[:at] + [extra] + params[at:])
    return forward
