"""verl's fused token log-probs and entropy computed by fusedloss.

    from fusedloss.integrations.verl import linear_cross_entropy
    log_probs, entropy = linear_cross_entropy(hidden, lm_head.weight, labels, temperature)

    import fusedloss.integrations.verl as fl_verl
    fl_verl.apply()     # verl's own calls now run fusedloss; fl_verl.restore() undoes it

linear_cross_entropy has the signature and outputs of verl's
`verl.utils.kernel.linear_cross_entropy.linear_cross_entropy` (per-token float32
log-probs and entropy, both differentiable), without its restrictions: any hidden size
(verl's Triton kernel needs a multiple of 128), a bias, softcap and logit scale, a
temperature per sequence or per token, CUDA or CPU tensors, and no positive "log-probs"
(verl issue 2656): log_probs <= 0 always. Labels equal to ignore_index (-100) give 0 and
no gradient; verl's kernel has no ignored labels.

apply() puts fusedloss at verl's hook points, where verl looks them up:
  - verl.utils.kernel.linear_cross_entropy.linear_cross_entropy, which verl's model
    forwards (dense_common, qwen2_vl, ...) import at call time, and the modules that bound
    it at import (verl.models.mcore.model_forward_fused, model_forward_1f1b_overlap);
  - verl.utils.experimental.torch_functional.FusedLinearForPPOFunction, the pure-torch
    path (its entropy keeps the hidden states' dtype, as verl's).
apply() refuses a verl version it was not tested with (TESTED_VERSIONS).
"""
import importlib
import importlib.metadata
import sys

import fusedloss

TESTED_VERSIONS = ("0.9.1",)
_KERNEL = "verl.utils.kernel.linear_cross_entropy"
_BOUND = ("verl.models.mcore.model_forward_fused", "verl.models.mcore.model_forward_1f1b_overlap")
_TORCH = "verl.utils.experimental.torch_functional"
_REDUCTIONS = ("none", "sum", "mean")
_replaced = []  # (module, name, original) of each hook point apply() set


def linear_cross_entropy(hidden, weight, labels, temperature=1.0, reduction="none",
                         dist_process_group=None, *, bias=None, logit_scale=1.0, softcap=None,
                         ignore_index=-100, chunk_size=None, backend="auto"):
    """(log_probs, entropy) of labels under softmax(softcap(logit_scale * (hidden @ W^T +
    b)) / temperature), as verl's linear_cross_entropy: hidden (..., D) and labels (...)
    are flattened; reduction "none" gives one float32 log-prob per token, "sum" their sum
    and "mean" their mean over the tokens; entropy is always per token. Both carry
    gradients to hidden, weight and bias. Keyword-only extras are fusedloss's (see
    fusedloss.linear_log_probs). dist_process_group: verl's vocab-parallel head, weight
    holding this rank's slice of the vocabulary in rank order and labels global indices
    (fusedloss.linear_log_probs' process_group; the slices may differ in size)."""
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if hidden.dim() < 1:
        raise ValueError("hidden must be (..., D), got a 0-dim tensor")
    if labels.numel() * hidden.shape[-1] != hidden.numel():
        raise ValueError(f"labels must hold one label per row of hidden: hidden "
                         f"{tuple(hidden.shape)}, labels {tuple(labels.shape)}")
    out = fusedloss.linear_log_probs(
        hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1), linear_bias=bias,
        temperature=temperature, logit_scale=logit_scale, softcap=softcap,
        ignore_index=ignore_index, return_entropy=True, chunk_size=chunk_size,
        process_group=dist_process_group, backend=backend)
    log_probs = out.log_probs
    if reduction == "sum":
        log_probs = log_probs.sum()
    elif reduction == "mean":
        log_probs = log_probs.mean()
    return log_probs, out.entropy


class FusedLinearForPPOFunction:
    """A drop-in for verl's FusedLinearForPPOFunction: .apply(hidden_states, vocab_weights,
    input_ids, temperature=1.0, chunk_size=512) -> (log_probs float32, entropy in the
    hidden states' dtype), shaped as input_ids; verl's chunk_size is not used (fusedloss
    picks its chunks)."""

    @staticmethod
    def apply(hidden_states, vocab_weights, input_ids, temperature=1.0, chunk_size=512):
        log_probs, entropy = linear_cross_entropy(hidden_states, vocab_weights, input_ids,
                                                  temperature)
        shape = input_ids.shape
        return log_probs.view(shape), entropy.view(shape).to(hidden_states.dtype)


def _check_version():
    try:
        version = importlib.metadata.version("verl")
    except importlib.metadata.PackageNotFoundError as exc:
        raise ImportError("fusedloss.integrations.verl.apply needs verl installed") from exc
    if version not in TESTED_VERSIONS:
        raise RuntimeError(f"fusedloss.integrations.verl: verl {version} is not a version "
                           f"this integration was tested with ({', '.join(TESTED_VERSIONS)})")


def _set(module, name, value):
    _replaced.append((module, name, getattr(module, name)))
    setattr(module, name, value)


def apply():
    """Put fusedloss at verl's hook points (module docstring). Idempotent."""
    _check_version()
    if _replaced:
        return
    _set(importlib.import_module(_KERNEL), "linear_cross_entropy", linear_cross_entropy)
    _set(importlib.import_module(_TORCH), "FusedLinearForPPOFunction",
         FusedLinearForPPOFunction)
    for name in _BOUND:  # imported already: they hold their own reference
        if name in sys.modules and hasattr(sys.modules[name], "linear_cross_entropy"):
            _set(sys.modules[name], "linear_cross_entropy", linear_cross_entropy)


def restore():
    """Undo apply()."""
    while _replaced:
        module, name, original = _replaced.pop()
        setattr(module, name, original)

