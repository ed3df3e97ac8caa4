"""fusedloss's cross-entropy as torchtitan's training loss: z-loss, label smoothing, and
the LM head fused with the loss. Written against torchtitan 0.3.0.

torchtitan's trainer builds its loss from `Trainer.Config.loss` and calls it as
`loss_fn(pred, labels, global_valid_tokens)`, expecting `(loss, metrics)` where loss is
the sum over this rank's tokens divided by the number of counted tokens (labels other
than -100) over every data-parallel rank and gradient-accumulation step; FSDP then sums
the gradients (its divide factor is 1). The classes below keep that contract. In a
config_registry function:

    from fusedloss.benchmarks.torchtitan_loss import (
        FusedCrossEntropyLoss, FusedHeadCrossEntropyLoss)

    config = llama3_debugmodel()
    # the model's LM head, then fusedloss's cross-entropy on its logits:
    config.loss = FusedCrossEntropyLoss.Config(z_loss=1e-4, label_smoothing=0.1)
    # or the head and the loss fused: the [B, L, V] logits never exist
    config.loss = FusedHeadCrossEntropyLoss.Config(z_loss=1e-4)

No `global_vocab_size` is needed: fusedloss finds each rank's slice of the vocabulary
from the local sizes. FusedHeadCrossEntropyLoss subclasses torchtitan's
ChunkedLossWrapper only so that the trainer hands it the model's `lm_head` and has the
model return the hidden states; it computes the loss in one call, chunked by fusedloss,
inside the head's forward (so FSDP2 gathers the weight and reduce-scatters its gradient
as for `lm_head(h)`).

The logits may be plain tensors (one device, FSDP/HSDP, or torchtitan's default
spmd_types backend, whose tensor-parallel logits are this rank's vocabulary slice, the
group taken from torchtitan's current mesh) or DTensors (the partial_dtensor and
full_dtensor backends: the classes sharded along one mesh dimension, the batch and the
sequence along others). The core functions need no torchtitan; the classes exist when it
imports.
"""
import contextlib
import functools
from dataclasses import dataclass

import torch
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

import fusedloss

IGNORE_INDEX = -100  # torchtitan's, and torch's default


def _float32_loss(x):
    """fusedloss returns a loss in its input's dtype, or in float32 under autocast (its
    kernels read half logits as they are and accumulate in float32 anyway). torchtitan
    upcasts the logits and sums in float32; a bfloat16 sum of a batch's losses would lose
    its third digit. Autocast gives the float32 loss without a float32 copy."""
    if x.dtype in (torch.float16, torch.bfloat16) and not torch.is_autocast_enabled(
            x.device.type):
        return torch.autocast(x.device.type, dtype=x.dtype)
    return contextlib.nullcontext()


def _local_sum(logits, labels, process_group, z_loss, label_smoothing):
    with _float32_loss(logits):
        return fusedloss.cross_entropy(
            logits.flatten(0, -2), labels.flatten(), ignore_index=IGNORE_INDEX,
            reduction="sum", label_smoothing=label_smoothing, z_loss=z_loss,
            process_group=process_group)


def cross_entropy_sum(pred, labels, *, z_loss=0.0, label_smoothing=0.0, process_group=None):
    """Sum over this rank's tokens of the cross-entropy of logits `pred` (B, L, V) against
    `labels` (B, L) (-100: not counted), plus z_loss * logsumexp^2 per counted token.

    Plain `pred`: its classes are all the classes, or with `process_group` this rank's
    contiguous slice of them (in rank order; tensor parallel). DTensor `pred`: classes
    sharded on at most one mesh dimension, whose group computes the log-sum-exp; batch
    and sequence shards are this rank's tokens. With plain `labels` (this rank's) the
    result is a plain tensor; with DTensor labels, placed as `pred` but replicated where
    it shards the classes, a DTensor that is Partial (a sum pending over ranks) where
    `pred` shards the tokens and Replicate elsewhere: torchtitan's full_dtensor contract.
    """
    if not isinstance(pred, DTensor):
        return _local_sum(pred, labels, process_group, z_loss, label_smoothing)
    if process_group is not None:
        raise ValueError("pass a DTensor pred or a process_group, not both: the DTensor's "
                         "mesh names the group")
    mesh, placements, vocab_dim = pred.device_mesh, pred.placements, pred.ndim - 1
    if any(isinstance(p, Partial) for p in placements):
        raise ValueError(f"pred is a Partial DTensor {placements}: redistribute it first")
    vocab = [i for i, p in enumerate(placements)
             if isinstance(p, Shard) and p.dim % pred.ndim == vocab_dim]
    if len(vocab) > 1:
        raise ValueError(f"pred's classes are sharded on mesh dimensions {vocab}; shard "
                         "them on one")
    group = mesh.get_group(vocab[0]) if vocab else None
    if not isinstance(labels, DTensor):
        return _local_sum(pred.to_local(), labels, group, z_loss, label_smoothing)
    want = tuple(Replicate() if i in vocab else p for i, p in enumerate(placements))
    if labels.device_mesh != mesh or tuple(labels.placements) != want:
        raise ValueError(f"labels must be placed as pred's tokens, {want}, got "
                         f"{labels.placements}")
    loss = _local_sum(pred.to_local(), labels.to_local(), group, z_loss, label_smoothing)
    return DTensor.from_local(loss, mesh, [
        Partial() if isinstance(p, Shard) and i not in vocab else Replicate()
        for i, p in enumerate(placements)])


def lm_head_cross_entropy_sum(head, hidden, labels, *, z_loss=0.0, label_smoothing=0.0,
                              process_group=None, chunk_size=None):
    """cross_entropy_sum(head(hidden), labels, ...) without the logits, run inside the
    head's forward (fusedloss.lm_head_cross_entropy): hidden (B, L, D), labels (B, L).

    The head's weight is all the classes, this rank's slice of them with
    `process_group` (the gradient of `hidden` then comes back all-reduced over the group,
    whole on every rank, as from Megatron's column-parallel head), or a DTensor sharded
    on its rows (the classes) when `hidden` is a DTensor on the same mesh. A DTensor
    `hidden` must be replicated on every mesh dimension: fusedloss would gather rows
    sharded on the batch, making the loss the global sum rather than this rank's, so that
    case (torchtitan's full_dtensor backend) is refused. `labels` are this rank's
    (plain); the result is a plain tensor.
    """
    if isinstance(hidden, DTensor) and not all(isinstance(p, Replicate)
                                               for p in hidden.placements):
        raise NotImplementedError(
            f"hidden states placed {hidden.placements}: the fused head needs them "
            "replicated (torchtitan's partial_dtensor or spmd_types backend); use "
            "cross_entropy_sum on the logits for full_dtensor")
    if isinstance(labels, DTensor):
        raise NotImplementedError("the fused head takes this rank's labels as a plain tensor")
    with _float32_loss(hidden):
        loss = fusedloss.lm_head_cross_entropy(
            head, hidden.flatten(0, -2), labels.flatten(), ignore_index=IGNORE_INDEX,
            reduction="sum", label_smoothing=label_smoothing, z_loss=z_loss,
            chunk_size=chunk_size, process_group=process_group)
    # Replicated DTensor: every rank of the mesh computed the same, its own tokens' sum.
    return loss.to_local() if isinstance(loss, DTensor) else loss


try:
    from torchtitan.components.loss import BaseLoss, ChunkedLossWrapper
    from torchtitan.config import CompileConfig
    from torchtitan.distributed.spmd_types import current_spmd_mesh, spmd_mesh_size
    import spmd_types  # a torchtitan dependency
except ImportError:  # torchtitan is not a dependency: the functions above stand alone
    BaseLoss = None


if BaseLoss is not None:
    def _tensor_parallel_group(pred):
        """torchtitan's spmd_types backend runs the model on plain tensors: tensor-parallel
        logits are this rank's vocabulary slice, the group that of the current mesh's
        "tp" axis."""
        if isinstance(pred, DTensor) or spmd_mesh_size("tp") == 1:
            return None
        return current_spmd_mesh().get_group("tp")

    class FusedCrossEntropyLoss(BaseLoss):
        """torchtitan's CrossEntropyLoss (sum over this rank's tokens, divided by the
        global token count by BaseLoss) computed by fusedloss, plus z-loss and label
        smoothing."""

        @dataclass(kw_only=True, slots=True)
        class Config(BaseLoss.Config):
            z_loss: float = 0.0
            """Weight of logsumexp^2 per counted token (PaLM); 1e-4 is usual."""
            label_smoothing: float = 0.0
            """As torch.nn.functional.cross_entropy's."""

        def __init__(self, config: Config, *, compile_config: CompileConfig | None = None):
            self.config = config
            self.fn = functools.partial(self._loss, z_loss=config.z_loss,
                                        label_smoothing=config.label_smoothing)
            self._maybe_compile(compile_config)

        @staticmethod
        def _loss(pred, labels, *, z_loss, label_smoothing):
            return cross_entropy_sum(pred, labels, z_loss=z_loss,
                                     label_smoothing=label_smoothing,
                                     process_group=_tensor_parallel_group(pred))

    class FusedHeadCrossEntropyLoss(ChunkedLossWrapper):
        """The LM head and FusedCrossEntropyLoss in one fusedloss call: `pred` is the
        hidden states (the trainer, seeing a ChunkedLossWrapper, calls set_lm_head and
        has the model skip its head). fusedloss chunks the rows itself (`chunk_size`,
        default from the sizes), so torchtitan's num_chunks and inner loss_fn are not
        used; the loss comes back with its gradient computed, like any other."""

        @dataclass(kw_only=True, slots=True)
        class Config(BaseLoss.Config):
            z_loss: float = 0.0
            label_smoothing: float = 0.0
            chunk_size: int | None = None
            """Rows per chunk of logits; None: fusedloss's default."""

        def __init__(self, config: Config, *, compile_config: CompileConfig | None = None):
            del compile_config  # the head's forward is not compiled, as in torchtitan's
            self.config = config
            self.lm_head = None

        def __call__(self, pred, labels, global_valid_tokens=None, **kwargs):
            del kwargs  # positions and the like: not used by a token-wise loss
            assert self.lm_head is not None, "call set_lm_head(model.lm_head) first"
            group = _tensor_parallel_group(pred)
            if group is not None:
                # spmd_types types the head's input Replicate, whose gradient is partial:
                # the norm that made it replicated all-reduces it in the backward.
                # fusedloss all-reduces it already (Megatron's convention), so this
                # input is Invariant; R -> I hands the norm the gradient once (on the
                # group's first rank, zeros elsewhere) instead of tp times.
                pred = spmd_types.convert(pred, group, src=spmd_types.R, dst=spmd_types.I,
                                          expert_mode=True)
            loss = lm_head_cross_entropy_sum(
                self.lm_head, pred, labels, z_loss=self.config.z_loss,
                label_smoothing=self.config.label_smoothing, process_group=group,
                chunk_size=self.config.chunk_size)
            if global_valid_tokens is not None:
                loss = loss / global_valid_tokens
            return loss, {}
