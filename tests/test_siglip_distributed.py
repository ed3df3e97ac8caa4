"""SigLIP over a torch.distributed group (gloo, spawned ranks, hard timeouts): each
rank's loss and the gradients equal, in float64, the single-process loss on the
concatenated batch, and DDP training matches a single process."""
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import fusedloss
from conftest import assert_close
from gloo_ranks import run_ranks
from test_distributed import train_towers
from test_siglip import open_clip_formula


def _cases():
    """(backend, reduction, shape of the scalars): every option on the default backend,
    one case each on the others (the Triton interpreter is slow)."""
    cases = [("auto", r, shape) for r in ("mean", "sum", "none") for shape in ((), (1,))]
    cases.append(("reference", "mean", ()))
    if fusedloss._backends.unavailable_reason("triton", "cpu") is None:
        cases.append(("triton", "none", (1,)))
    return cases


def _siglip(rank, world):
    for exchange in ("all_gather", "ring"):
        _against_one_process(rank, world, exchange)
        _frozen_text_tower(rank, world, exchange)


def _against_one_process(rank, world, exchange):
    from fusedloss import siglip as siglip_module
    siglip_module.TILE_ELEMENTS["cpu"] = 6  # many tiles, with tails (2 x 3 of 5 x 5)
    torch.manual_seed(7)  # the same tensors on every rank
    n, d = 5, 6  # per rank
    image = F.normalize(torch.randn(world * n, d, dtype=torch.float64), dim=1)
    text = F.normalize(torch.randn(world * n, d, dtype=torch.float64), dim=1)
    mine = slice(rank * n, (rank + 1) * n)
    group = dist.group.WORLD
    for backend, reduction, param_shape in _cases():
        def scalars():
            return (torch.full(param_shape, 8.0, dtype=torch.float64,
                               requires_grad=True),
                    torch.full(param_shape, -4.0, dtype=torch.float64,
                               requires_grad=True))
        full = [t.clone().requires_grad_() for t in (image, text)]
        scale, bias = scalars()
        rows = open_clip_formula(*full, scale, bias, "none").view(world, n)
        expected = {"mean": rows.mean(1), "sum": rows.sum(1), "none": rows}[reduction]
        upstream = torch.rand_like(expected) + 0.5
        # Every rank's loss: the gradients each rank's features get from all of them.
        (expected * upstream).sum().backward()
        local = [t[mine].clone().requires_grad_() for t in (image, text)]
        my_scale, my_bias = scalars()
        ours = fusedloss.siglip_loss(*local, my_scale, my_bias, reduction=reduction,
                                     process_group=group, exchange=exchange,
                                     backend=backend)
        (ours * upstream[rank]).sum().backward()
        assert_close(ours, expected[rank])
        assert_close(local[0].grad, full[0].grad[mine])
        assert_close(local[1].grad, full[1].grad[mine])
        # This rank's own loss only: the scalars are replicated, DDP averages them.
        own_scale, own_bias = scalars()
        own = open_clip_formula(image, text, own_scale, own_bias, "none")
        own = own.view(world, n)[rank]
        own = {"mean": own.mean(), "sum": own.sum(), "none": own}[reduction]
        (own * upstream[rank]).sum().backward()
        assert my_scale.grad.shape == param_shape
        assert_close(my_scale.grad, own_scale.grad)
        assert_close(my_bias.grad, own_bias.grad)


@pytest.mark.parametrize("world", [2, 3])
def test_siglip_across_ranks(world):
    """Both exchanges, every backend here, reductions, scalar shapes, a frozen tower."""
    run_ranks(_siglip, world)


def _frozen_text_tower(rank, world, exchange):
    """Only the images learn (LiT); the texts need no gradient, and none travels."""
    torch.manual_seed(8)
    n, d = 4, 5
    image = F.normalize(torch.randn(world * n, d, dtype=torch.float64), dim=1)
    text = F.normalize(torch.randn(world * n, d, dtype=torch.float64), dim=1)
    mine = slice(rank * n, (rank + 1) * n)
    full = image.clone().requires_grad_()
    open_clip_formula(full, text, 10.0, -10.0, "sum").backward()
    local = image[mine].clone().requires_grad_()
    fusedloss.siglip_loss(local, text[mine], 10.0, -10.0, reduction="sum",
                          process_group=dist.group.WORLD, exchange=exchange).backward()
    # The gradient of this rank's images comes from its own loss only.
    assert_close(local.grad, full.grad[mine])


def _refusals(rank, world):
    group = dist.group.WORLD
    n = 4 + rank  # ranks that disagree on N get a clear error on every rank, not a hang
    image = F.normalize(torch.randn(n, 3), dim=1)
    for exchange in ("all_gather", "ring"):
        with pytest.raises(ValueError, match="disagree on the number of pairs N"):
            fusedloss.siglip_loss(image, image, 10.0, -10.0, process_group=group,
                                  exchange=exchange)
    with pytest.raises(ValueError, match="text_features"):
        fusedloss.siglip_loss(image, image[1:], 10.0, -10.0, process_group=group)
    image = torch.randn(4, 3 + rank)
    with pytest.raises(ValueError, match="disagree on the feature dimension D"):
        fusedloss.siglip_loss(image, image, 10.0, -10.0, process_group=group)
    # Higher-order gradients are refused, not silently wrong.
    for exchange in ("all_gather", "ring"):
        x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
        loss = fusedloss.siglip_loss(x, x * 2, 10.0, -10.0, process_group=group,
                                     exchange=exchange)
        with pytest.raises(RuntimeError, match="higher-order"):
            torch.autograd.grad(loss, x, create_graph=True)


def test_bad_input_across_ranks():
    run_ranks(_refusals, 2)


def _train_ddp(rank, world):
    for exchange in ("all_gather", "ring"):
        _train_ddp_with(rank, world, exchange)


def _train_ddp_with(rank, world, exchange):
    """SigLIP towers under DDP, with the learnt logit scale (as open_clip: its log, passed
    exponentiated) and bias: after a few steps every parameter equals a single-process run
    on the whole batch."""
    train_towers(rank, world, lambda model, image, text, group: fusedloss.siglip_loss(
        image, text, model.logit_scale.exp(), model.logit_bias, process_group=group,
        exchange=exchange), logit_scale=2.3, logit_bias=-5.0)


@pytest.mark.parametrize("world", [2, 3])
def test_ddp_training(world):
    run_ranks(_train_ddp, world)
