"""FSDP2 x tensor parallel with a fused LM head, as a complete script. On a CPU, as is:

    torchrun --nproc-per-node 4 benchmarks/fsdp_tp_example.py

(any even number of ranks; on GPUs the same with "cuda" meshes and the "nccl" backend).
The ranks form a ("dp", "tp") mesh, tp = 2. A tiny language model's head is
ColwiseParallel on "tp" (each tp rank holds half of the vocabulary's rows), then every
module is fully_shard on "dp" (FSDP2), each dp rank training on its own batch. The loss is
    fusedloss.lm_head_cross_entropy(model.head, hidden, labels)
computed inside the head's forward, so FSDP2 gathers the head's "dp" shards and
reduce-scatters its gradient as it would for head(hidden), and fusedloss runs the
vocab-parallel fused loss on the "tp" group: the (tokens x vocabulary) logits never exist,
neither whole nor as a rank's slice, and only a few numbers per token cross the tp ranks.
Every rank checks itself against the same training on one process (the whole head's
logits and F.cross_entropy on the concatenated batch).
"""
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Replicate
from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

import fusedloss

STEPS, VOCAB, HIDDEN, BATCH, SEQ, TP = 5, 1000, 32, 4, 16, 2


class TinyLM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, HIDDEN)
        self.block = torch.nn.Sequential(torch.nn.Linear(HIDDEN, 4 * HIDDEN), torch.nn.GELU(),
                                         torch.nn.Linear(4 * HIDDEN, HIDDEN))
        self.norm = torch.nn.LayerNorm(HIDDEN)
        self.head = torch.nn.Linear(HIDDEN, VOCAB, bias=False)

    def hidden(self, tokens):
        x = self.embed(tokens).flatten(0, 1)                 # (tokens, HIDDEN)
        return self.norm(x + self.block(x))

    def forward(self, tokens, labels):
        """The fused head's loss: head.weight is read inside head's forward."""
        return fusedloss.lm_head_cross_entropy(self.head, self.hidden(tokens),
                                               labels.flatten(), label_smoothing=0.1)


def model():
    torch.manual_seed(0)                                     # the same weights everywhere
    return TinyLM()


def main():
    dist.init_process_group("gloo")                          # torchrun sets rank and world
    rank, world = dist.get_rank(), dist.get_world_size()
    if world % TP:
        raise SystemExit(f"run an even number of ranks (tp = {TP}), got {world}")
    mesh = init_device_mesh("cpu", (world // TP, TP), mesh_dim_names=("dp", "tp"))
    dp, dp_size = mesh["dp"].get_local_rank(), mesh["dp"].size()

    ours = model()
    # The head's rows (the vocabulary) split over "tp". output_layouts=Replicate(): the
    # head's forward returns the (replicated) loss, which torch's hook must leave as it is.
    parallelize_module(ours.head, mesh["tp"], ColwiseParallel(output_layouts=Replicate()))
    for part in (ours.embed, ours.block, ours.norm, ours.head, ours):
        fully_shard(part, mesh=mesh["dp"])
    single = model()
    opt = torch.optim.SGD(ours.parameters(), lr=1.0)
    single_opt = torch.optim.SGD(single.parameters(), lr=1.0)

    torch.manual_seed(100)                                   # the same data on every rank
    tokens = torch.randint(0, VOCAB, (dp_size, BATCH, SEQ))  # every dp rank's batch
    labels = torch.roll(tokens, -1, dims=2)                  # (one batch, learnt by heart)
    labels[..., -1] = -100  # as many per dp rank: FSDP's average of the ranks' means is the mean
    for step in range(STEPS):
        loss = ours(tokens[dp], labels[dp])
        opt.zero_grad()
        loss.backward()
        opt.step()

        logits = single.head(single.hidden(tokens.flatten(0, 1)))
        full = F.cross_entropy(logits, labels.flatten(), label_smoothing=0.1)
        single_opt.zero_grad()
        full.backward()
        single_opt.step()

        mean = loss.detach().clone()
        dist.all_reduce(mean, group=mesh["dp"].get_group())
        mean /= dp_size
        torch.testing.assert_close(mean, full.detach())
        if rank == 0:
            print(f"FSDP x TP, step {step}: loss {mean.item():.4f} "
                  f"(one process: {full.item():.4f})")
    for (name, p), q in zip(ours.named_parameters(), single.parameters()):
        torch.testing.assert_close(p.full_tensor(), q.detach(), rtol=1e-4, atol=1e-5,
                                   msg=lambda m, name=name: f"{name}: {m}")
    if rank == 0:
        print(f"FSDP x TP matches a single process ({world} ranks: dp={dp_size} x tp={TP}, "
              f"pid {os.getpid()})")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
