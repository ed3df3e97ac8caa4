"""TRL's fused LM head computed by fusedloss, for every TRL trainer (GRPO, RLOO, DPO, KTO,
SFT and the experimental ones that use it), with no change to the training script
(pip install "fusedloss[trl]"):

    import fusedloss.integrations.trl as fl_trl
    fl_trl.apply()      # before or after the trainer is built
    ...
    fl_trl.restore()    # TRL's own kernel again

How: every trainer of TRL 1.16 scores tokens through `add_fused_lm_head`
(trl/trainer/utils.py), whose forward looks up `_ChunkedLogProbFunction` in that module
at call time. apply() puts ChunkedLogProbs there: the same call and the same outputs
(float32 per-token log-probs, a differentiable entropy, log sum p^2, the mean logit and
is-top-1, each computed only when asked), from fusedloss.linear_log_probs. So TRL's own
code keeps everything around it: the temperature, softcap and logit scale it reads from
the model, the shift and the -100 masking of the labels, the loss, the MoE auxiliary
loss, and its DeepSpeed ZeRO-3 gather of the head (`maybe_gather_lm_head_ctx`), which
ChunkedLogProbs enters again for the backward (there the chunk's logits are recomputed
once more: five products instead of four, under ZeRO-3 only).

The TRL versions this was tested with are TESTED_VERSIONS; apply() refuses others,
naming them, rather than patch a function whose contract may have changed.
"""
import torch

import fusedloss

TESTED_VERSIONS = ("1.16.0",)
_TARGET = "trl.trainer.utils"
_NAME = "_ChunkedLogProbFunction"
_EXTRAS = ("log_sum_sq_probs", "mean_logits", "is_top1")
_original = None


def _trl_utils():
    try:
        import trl
    except ImportError as exc:
        raise ImportError("fusedloss.integrations.trl needs TRL (pip install "
                          "\"fusedloss[trl]\")") from exc
    if trl.__version__ not in TESTED_VERSIONS:
        raise RuntimeError(f"fusedloss.integrations.trl: TRL {trl.__version__} is not a "
                           f"version this integration was tested with "
                           f"({', '.join(TESTED_VERSIONS)}); its fused LM head may differ")
    import importlib
    utils = importlib.import_module(_TARGET)
    if not hasattr(utils, _NAME):
        raise RuntimeError(f"fusedloss.integrations.trl: {_TARGET}.{_NAME} is missing in "
                           f"TRL {trl.__version__}")
    return utils


def apply():
    """Make TRL's fused LM head (add_fused_lm_head) run fusedloss's kernels. Idempotent."""
    global _original
    utils = _trl_utils()
    if _original is None:
        _original = getattr(utils, _NAME)
    setattr(utils, _NAME, ChunkedLogProbs)


def restore():
    """Undo apply(): TRL's own ChunkedLogProbFunction again."""
    global _original
    if _original is None:
        return
    import importlib
    setattr(importlib.import_module(_TARGET), _NAME, _original)
    _original = None


def _zero3():
    try:
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
    except ImportError:
        return False
    return is_deepspeed_zero3_enabled()


class ChunkedLogProbs:
    """A drop-in for TRL's ChunkedLogProbFunction: ChunkedLogProbs.apply(hidden, weight,
    bias, targets, temperature, chunk_size, final_logit_softcapping=None, logit_scale=1.0,
    outputs) returns (log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1), None
    for the fields not in `outputs`. TRL's chunk_size (a vocabulary tile) is not used:
    fusedloss chunks rows and picks their number itself."""

    @staticmethod
    def apply(hidden, weight, bias, targets, temperature, chunk_size,
              final_logit_softcapping=None, logit_scale=1.0,
              outputs=("entropy",) + _EXTRAS):
        outputs = tuple(outputs)
        if hidden.dtype != weight.dtype and not torch.is_autocast_enabled(hidden.device.type):
            # TRL's cast_lm_head_to_fp32: float32 hidden states outside autocast, the
            # head in its own dtype (the cast is differentiable).
            weight = weight.to(hidden.dtype)
            bias = bias.to(hidden.dtype) if bias is not None else None
        options = dict(temperature=temperature, logit_scale=logit_scale,
                       softcap=final_logit_softcapping, return_entropy="entropy" in outputs,
                       extras=tuple(e for e in _EXTRAS if e in outputs))
        if _zero3() and torch.is_grad_enabled():
            out = _ZeroThree.apply(hidden, weight, bias, targets, options)
        else:
            out = _call(hidden, weight, bias, targets, options)
        return out


def _call(hidden, weight, bias, targets, options):
    out = fusedloss.linear_log_probs(hidden, weight, targets, linear_bias=bias, **options)
    if isinstance(out, torch.Tensor):
        return out, None, None, None, None
    return out.log_probs, out.entropy, out.log_sum_sq_probs, out.mean_logits, out.is_top1


class _ZeroThree(torch.autograd.Function):
    """Under DeepSpeed ZeRO-3 the head is gathered only inside TRL's context: the backward
    enters it again and differentiates the recomputed outputs there."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, options):
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.options = options
        ctx.set_materialize_grads(False)
        with torch.no_grad():
            out = _call(hidden, weight, bias, targets, options)
        ctx.mark_non_differentiable(*(t for t in out[2:] if t is not None))
        return out

    @staticmethod
    def backward(ctx, grad_log_probs, grad_entropy, *unused):
        import importlib
        gather = importlib.import_module(_TARGET).maybe_gather_lm_head_ctx
        hidden, weight, bias, targets = ctx.saved_tensors
        with gather(weight, bias), torch.enable_grad():
            # Detached inside the context: the gathered weight, not the empty partition.
            leaves = [t.detach().requires_grad_(need) if t is not None else None
                      for t, need in zip((hidden, weight, bias), ctx.needs_input_grad[:3])]
            out = _call(*leaves, targets, ctx.options)
            pairs = [(o, g) for o, g in zip(out[:2], (grad_log_probs, grad_entropy))
                     if o is not None and g is not None]
            wanted = [t for t in leaves if t is not None and t.requires_grad]
            if not pairs or not wanted:
                return None, None, None, None, None
            got = iter(torch.autograd.grad([o for o, _ in pairs], wanted,
                                           [g for _, g in pairs]))
        grads = [next(got) if t is not None and t.requires_grad else None for t in leaves]
        return (*grads, None, None)
