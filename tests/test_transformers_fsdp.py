"""A transformers model under FSDP2 (fully_shard on each decoder layer, the LM head and the
root, reshard_after_forward True and False), patched by fusedloss.integrations.transformers
before or after fully_shard, trained on 2 gloo ranks, each its own batch: losses and weights
equal the same FSDP2 training unpatched (and that, single-process training on the
concatenated batch), and the head's weight is all-gathered and its gradient reduce-scattered
as often as for the unpatched model: the model's own call of the head, which returns the
logits' stand-in, runs none of FSDP2's hooks."""
import pytest
import torch

pytest.importorskip("transformers")

from conftest import assert_close  # noqa: E402
from gloo_ranks import run_ranks  # noqa: E402

VOCAB, T, STEPS, LR = 96, 10, 3, 0.5


def _model():
    import transformers
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
        tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config).float()
    with torch.no_grad():  # logits far from 0, so that the head's gradient matters
        model.lm_head.weight.mul_(20)
    return model.train()


def _batches(world):
    """Each rank's batch; the same number of counted labels on each, so that FSDP2's mean of
    the ranks' gradients is the gradient of the mean over the concatenated batch."""
    torch.manual_seed(1)
    ids = torch.randint(0, VOCAB, (world, 2, T))
    labels = ids.clone()
    labels[:, 0, -3:] = -100  # padding
    labels[:, 1, :4] = -100  # a prompt
    return ids, labels


def _train(model, ids, labels, fused=False):
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    losses = []
    for _ in range(STEPS):
        opt.zero_grad()
        out = model(input_ids=ids, labels=labels)
        assert (out.logits is None) == fused  # patched: the logits never computed
        out.loss.backward()
        opt.step()
        losses.append(out.loss.detach())
    return torch.stack(losses)


class _Counts:
    """The head's all-gathers and gradient reduce-scatters, counted at FSDP2's collectives."""

    def __init__(self, head):
        from torch.distributed.fsdp._fully_shard import _fsdp_param_group as group
        self.group, self.head = group, head
        self.gathers = self.reductions = 0
        self.saved = group.foreach_all_gather, group.foreach_reduce

        def gather(fsdp_params, *args, **kwargs):
            self.gathers += self._is_head(fsdp_params)
            return self.saved[0](fsdp_params, *args, **kwargs)

        def reduce(fsdp_params, *args, **kwargs):
            self.reductions += self._is_head(fsdp_params)
            return self.saved[1](fsdp_params, *args, **kwargs)

        group.foreach_all_gather, group.foreach_reduce = gather, reduce

    def _is_head(self, fsdp_params):
        return any(p._module_info.module is self.head for p in fsdp_params)

    def close(self):
        self.group.foreach_all_gather, self.group.foreach_reduce = self.saved
        return self.gathers, self.reductions


def _fsdp(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import fusedloss.integrations.transformers as fl_hf
    mesh = init_device_mesh("cpu", (world,))
    ids, labels = _batches(world)
    single = _model()
    _train(single, ids.flatten(0, 1), labels.flatten(0, 1))
    for reshard in (True, False):
        runs = {}
        for when in ("unpatched", "before fully_shard", "after fully_shard"):
            model = _model()
            if when == "before fully_shard":
                fl_hf.apply(model)
            for layer in model.model.layers:
                fully_shard(layer, mesh=mesh, reshard_after_forward=reshard)
            fully_shard(model.lm_head, mesh=mesh, reshard_after_forward=reshard)
            fully_shard(model, mesh=mesh, reshard_after_forward=reshard)
            if when == "after fully_shard":
                fl_hf.apply(model)
            counts = _Counts(model.lm_head)
            try:
                losses = _train(model, ids[rank], labels[rank], fused=when != "unpatched")
            finally:
                counts = counts.close()
            weights = {n: p.full_tensor() for n, p in model.named_parameters()}
            runs[when] = losses, counts, weights
        losses, counts, weights = runs["unpatched"]
        # Unpatched: the head gathered in each forward (and again in each backward when
        # resharded after forward), its gradient reduced once a step.
        assert counts == (STEPS * (2 if reshard else 1), STEPS), counts
        assert not torch.allclose(weights["lm_head.weight"], _model().lm_head.weight)  # trained
        for n, w in weights.items():
            assert_close(w, dict(single.named_parameters())[n].detach(), msg=n)
        for when in ("before fully_shard", "after fully_shard"):
            ours = runs[when]
            msg = f"reshard_after_forward={reshard}, apply() {when}"
            assert_close(ours[0], losses, msg=msg)
            assert ours[1] == counts, f"{msg}: (gathers, reductions) {ours[1]} != {counts}"
            for n, w in ours[2].items():
                assert_close(w, weights[n], msg=f"{msg}: {n}")


def test_fsdp2_training_equals_unpatched_and_single_process():
    run_ranks(_fsdp, 2, timeout=120)
