"""fusedloss past one device, as a complete script. On a CPU, as is:

    torchrun --nproc-per-node 2 benchmarks/distributed_example.py

(on GPUs the same with the "nccl" backend and each rank's tensors on its own device). It
trains, for a few steps,
  1. a language-model head split over the ranks by vocabulary (tensor parallelism):
     fusedloss.linear_cross_entropy(hidden, head_shard, labels, process_group=group);
  2. CLIP-style image and text towers under DDP, each rank with its own half of the batch:
     fusedloss.info_nce(img, txt, symmetric=True, process_group=group, exchange="ring");
and checks on every rank that each matches the same training on one process.
"""
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

import fusedloss

STEPS, VOCAB, HIDDEN, TOKENS, PAIRS = 3, 1000, 32, 64, 16


def lm_head(group, rank, world):
    """Hidden states replicated on every rank, the head's rows (the vocabulary) split."""
    torch.manual_seed(0)
    head = torch.randn(VOCAB, HIDDEN) * 0.05                # the whole head, for the check
    rows = VOCAB // world
    shard = torch.nn.Parameter(head[rank * rows:(rank + 1) * rows].clone())
    body = torch.nn.Linear(HIDDEN, HIDDEN)
    full_body, full_head = torch.nn.Linear(HIDDEN, HIDDEN), torch.nn.Parameter(head.clone())
    full_body.load_state_dict(body.state_dict())
    opt = torch.optim.SGD([*body.parameters(), shard], lr=0.5)
    full_opt = torch.optim.SGD([*full_body.parameters(), full_head], lr=0.5)
    for step in range(STEPS):
        tokens = torch.randn(TOKENS, HIDDEN)
        labels = torch.randint(0, VOCAB, (TOKENS,))
        labels[::5] = -100                                   # padding
        loss = fusedloss.linear_cross_entropy(torch.tanh(body(tokens)), shard, labels,
                                              label_smoothing=0.1, process_group=group)
        opt.zero_grad()
        loss.backward()                                      # all-reduces grad of the input
        opt.step()
        full = fusedloss.linear_cross_entropy(torch.tanh(full_body(tokens)), full_head,
                                              labels, label_smoothing=0.1)
        full_opt.zero_grad()
        full.backward()
        full_opt.step()
        torch.testing.assert_close(loss, full)
        if rank == 0:
            print(f"vocab-parallel LM head, step {step}: loss {loss.item():.4f}")
    torch.testing.assert_close(shard.detach(), full_head.detach()[rank * rows:(rank + 1) * rows])


class Towers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.image, self.text = torch.nn.Linear(24, 16), torch.nn.Linear(20, 16)
        self.logit_scale = torch.nn.Parameter(torch.tensor(2.5))

    def forward(self, images, texts):
        return F.normalize(self.image(images), dim=1), F.normalize(self.text(texts), dim=1)


def clip(group, rank, world):
    """DDP over the ranks' halves of each batch; InfoNCE over every rank's pairs."""
    torch.manual_seed(1)
    model, single = Towers(), Towers()
    single.load_state_dict(model.state_dict())
    ddp = torch.nn.parallel.DistributedDataParallel(model, process_group=group)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    single_opt = torch.optim.SGD(single.parameters(), lr=0.5)
    for step in range(STEPS):
        images, texts = torch.randn(world * PAIRS, 24), torch.randn(world * PAIRS, 20)
        mine = slice(rank * PAIRS, (rank + 1) * PAIRS)
        img, txt = ddp(images[mine], texts[mine])
        loss = fusedloss.info_nce(img, txt, logit_scale=model.logit_scale.exp(),
                                  symmetric=True, process_group=group, exchange="ring")
        opt.zero_grad()
        loss.backward()                                      # DDP averages the gradients
        opt.step()
        img, txt = single(images, texts)
        full = fusedloss.info_nce(img, txt, logit_scale=single.logit_scale.exp(),
                                  symmetric=True)
        single_opt.zero_grad()
        full.backward()
        single_opt.step()
        if rank == 0:
            print(f"CLIP over {world} ranks, step {step}: this rank's loss {loss.item():.4f}, "
                  f"global loss {full.item():.4f}")
    for a, b in zip(model.parameters(), single.parameters()):
        torch.testing.assert_close(a, b)


def main():
    dist.init_process_group("gloo")                          # torchrun sets rank and world
    group = dist.group.WORLD
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(100)                                    # the same data on every rank
    lm_head(group, rank, world)
    clip(group, rank, world)
    if rank == 0:
        print(f"both match a single process ({world} ranks, pid {os.getpid()})")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
