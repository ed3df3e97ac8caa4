"""benchmarks/torchtitan_loss.py: its functions always, against torch in float64 (one
process and DTensor / vocab-parallel logits on 2 gloo ranks); torchtitan's loss classes
where torchtitan imports, against torchtitan's own CrossEntropyLoss and
ChunkedLossWrapper."""
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_close
from gloo_ranks import run_ranks

try:
    from fusedloss.benchmarks import torchtitan_loss as tl
except ImportError:  # a source checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks import torchtitan_loss as tl

B, L, D, V = 4, 6, 8, 37  # V odd: DTensor gives 2 ranks 19 and 18 classes


def batch(seed=0, dtype=torch.float64):
    """Logits (B, L, V), labels (B, L) with ignored tokens, hidden states and a head."""
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(B, L, V, generator=g)).to(dtype)
    labels = torch.randint(0, V, (B, L), generator=g)
    labels[0, :2] = labels[2, -1] = tl.IGNORE_INDEX
    hidden = torch.randn(B, L, D, generator=g, dtype=dtype)
    head = torch.nn.Linear(D, V, bias=False, dtype=dtype)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, D, generator=g))
    return logits, labels, hidden, head


def expected_sum(logits, labels, z_loss=0.0, label_smoothing=0.0):
    """The sum over counted tokens of torch's cross-entropy plus z_loss * logsumexp^2."""
    ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum",
                         label_smoothing=label_smoothing)
    counted = labels != tl.IGNORE_INDEX
    return ce + z_loss * (torch.logsumexp(logits, -1).square() * counted).sum()


def leaf(t):
    return t.detach().clone().requires_grad_()


OPTIONS = [dict(), dict(z_loss=0.05), dict(label_smoothing=0.1),
           dict(z_loss=0.05, label_smoothing=0.2)]


@pytest.mark.parametrize("options", OPTIONS)
def test_cross_entropy_sum_matches_torch(options):
    logits, labels, _, _ = batch()
    ours, ref = leaf(logits), leaf(logits)
    loss = tl.cross_entropy_sum(ours, labels, **options)
    want = expected_sum(ref, labels, **options)
    assert_close(loss, want)
    loss.backward()
    want.backward()
    assert_close(ours.grad, ref.grad)
    assert ours.grad[0, :2].abs().max() == 0  # ignored tokens


def test_z_loss_adds_its_weight_times_lse_squared_per_counted_token():
    logits, labels, _, _ = batch(1)
    lse = torch.logsumexp(logits, -1)
    extra = sum(lse[b, t] ** 2 for b in range(B) for t in range(L)
                if labels[b, t] != tl.IGNORE_INDEX)
    base = tl.cross_entropy_sum(logits, labels)
    assert_close(tl.cross_entropy_sum(logits, labels, z_loss=0.1) - base, 0.1 * extra)
    assert 0.1 * extra > 1  # large enough to be seen


def test_half_logits_give_a_float32_loss_and_half_gradients():
    logits, labels, _, _ = batch(2)
    half = leaf(logits.bfloat16())
    loss = tl.cross_entropy_sum(half, labels, z_loss=0.01)
    assert loss.dtype == torch.float32
    ref = leaf(half.detach().double())
    want = expected_sum(ref, labels, z_loss=0.01)
    assert_close(loss, want, dtype=torch.float32)  # float32's tolerance: summed in float32
    loss.backward()
    want.backward()
    assert half.grad.dtype == torch.bfloat16
    assert_close(half.grad, ref.grad)


@pytest.mark.parametrize("options", OPTIONS[::3])
def test_lm_head_cross_entropy_sum_matches_torch(options):
    _, labels, hidden, head = batch(3)
    ref_head = torch.nn.Linear(D, V, bias=False, dtype=hidden.dtype)
    ref_head.load_state_dict(head.state_dict())
    ours, ref = leaf(hidden), leaf(hidden)
    loss = tl.lm_head_cross_entropy_sum(head, ours, labels, chunk_size=5, **options)
    want = expected_sum(ref_head(ref), labels, **options)
    assert_close(loss, want)
    loss.backward()
    want.backward()
    assert_close(ours.grad, ref.grad)
    assert_close(head.weight.grad, ref_head.weight.grad)


def local_grad(leaf):
    """This rank's part of a DTensor leaf's gradient, placed as the leaf (torch 2.11's
    AccumulateGrad makes the .grad of an unevenly sharded leaf Replicate)."""
    return leaf.grad.redistribute(leaf.device_mesh, leaf.placements).to_local()


def _dtensor_ranks(rank, world):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    logits, labels, hidden, head = batch(4)
    opts = dict(z_loss=0.05, label_smoothing=0.1)
    full = leaf(logits)
    want = expected_sum(full, labels, **opts)
    want.backward()
    tp = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
    lo, hi = [(0, 19), (19, 37)][rank]  # DTensor's slices of 37 classes

    # Classes sharded (ColwiseParallel logits, partial_dtensor), plain labels: this
    # rank's (here every) token, as a plain tensor.
    pred = distribute_tensor(logits, tp, [Shard(2)]).requires_grad_()
    loss = tl.cross_entropy_sum(pred, labels, **opts)
    assert not isinstance(loss, DTensor)
    assert_close(loss, want)
    (loss / 7).backward()
    assert_close(local_grad(pred), full.grad[..., lo:hi] / 7)

    # The same slice as a plain tensor with a process group (torchtitan's spmd_types).
    local = leaf(logits[..., lo:hi])
    loss = tl.cross_entropy_sum(local, labels, process_group=dist.group.WORLD, **opts)
    assert_close(loss, want)
    loss.backward()
    assert_close(local.grad, full.grad[..., lo:hi])

    # Tokens sharded on the sequence (context parallel) with DTensor labels (full_dtensor):
    # a Partial DTensor holding this rank's sum; the gradient of each rank's own tokens.
    cp = init_device_mesh("cpu", (world,), mesh_dim_names=("cp",))
    pred = distribute_tensor(logits, cp, [Shard(1)]).requires_grad_()
    mine = slice(rank * L // world, (rank + 1) * L // world)
    loss = tl.cross_entropy_sum(pred, distribute_tensor(labels, cp, [Shard(1)]), **opts)
    assert isinstance(loss, DTensor) and loss.placements == (Partial(),)
    part = leaf(logits[:, mine])
    want_part = expected_sum(part, labels[:, mine], **opts)
    assert_close(loss.to_local(), want_part)
    assert_close(loss.full_tensor(), want)
    (loss / 7).backward()  # the trainer's: divided by the global token count
    want_part.backward()
    assert_close(local_grad(pred), part.grad / 7)

    # Batch and classes on a 2-D mesh (data parallel of 1 x tensor parallel of 2).
    mesh = init_device_mesh("cpu", (1, world), mesh_dim_names=("dp", "tp"))
    pred = distribute_tensor(logits, mesh, [Shard(0), Shard(2)]).requires_grad_()
    target = distribute_tensor(labels, mesh, [Shard(0), Replicate()])
    loss = tl.cross_entropy_sum(pred, target, **opts)
    assert loss.placements == (Partial(), Replicate())
    assert_close(loss.to_local(), want)
    loss.backward()
    assert_close(local_grad(pred), full.grad[..., lo:hi])
    with pytest.raises(ValueError, match="labels must be placed"):
        tl.cross_entropy_sum(pred, distribute_tensor(labels, mesh, [Replicate(), Replicate()]))
    with pytest.raises(ValueError, match="not both"):
        tl.cross_entropy_sum(pred, target, process_group=dist.group.WORLD)

    # The fused head, its rows (the vocabulary) split: as a plain slice with the group
    # (spmd_types), or as a DTensor weight with replicated hidden states (partial_dtensor).
    ref_head = torch.nn.Linear(D, V, bias=False, dtype=hidden.dtype)
    ref_head.load_state_dict(head.state_dict())
    ref_hidden = leaf(hidden)
    want = expected_sum(ref_head(ref_hidden), labels, **opts)
    want.backward()
    shard = torch.nn.Linear(D, hi - lo, bias=False, dtype=hidden.dtype)
    with torch.no_grad():
        shard.weight.copy_(head.weight[lo:hi])
    mine = leaf(hidden)
    loss = tl.lm_head_cross_entropy_sum(shard, mine, labels, process_group=dist.group.WORLD,
                                        **opts)
    assert_close(loss, want)
    loss.backward()
    assert_close(mine.grad, ref_hidden.grad)
    assert_close(shard.weight.grad, ref_head.weight.grad[lo:hi])
    head.weight = torch.nn.Parameter(distribute_tensor(head.weight.detach(), tp, [Shard(0)]))
    mine = distribute_tensor(hidden, tp, [Replicate()]).requires_grad_()
    loss = tl.lm_head_cross_entropy_sum(head, mine, labels, **opts)
    assert not isinstance(loss, DTensor)
    assert_close(loss, want)
    loss.backward()
    assert_close(mine.grad.full_tensor(), ref_hidden.grad)
    assert_close(local_grad(head.weight), ref_head.weight.grad[lo:hi])
    with pytest.raises(NotImplementedError, match="replicated"):
        tl.lm_head_cross_entropy_sum(head, distribute_tensor(hidden, tp, [Shard(0)]), labels)


def test_dtensor_and_vocab_parallel_logits_on_two_ranks():
    run_ranks(_dtensor_ranks, 2, timeout=120)


# ------------------------------------------------------- torchtitan's own loss classes

def titan():
    pytest.importorskip("torchtitan.components.loss")
    assert tl.BaseLoss is not None  # torchtitan imports, so the classes must exist
    from torchtitan.components.loss import ChunkedLossWrapper, CrossEntropyLoss
    return CrossEntropyLoss, ChunkedLossWrapper


@pytest.mark.parametrize("options", OPTIONS)
def test_fused_cross_entropy_loss_keeps_torchtitan_contract(options):
    CrossEntropyLoss, _ = titan()
    logits, labels, _, _ = batch(5)
    tokens = torch.tensor(3 * int((labels != tl.IGNORE_INDEX).sum()))  # other ranks' too
    ours, ref = leaf(logits), leaf(logits)
    loss, metrics = tl.FusedCrossEntropyLoss.Config(**options).build()(ours, labels, tokens)
    assert metrics == {}
    want = expected_sum(ref, labels, **options) / tokens
    assert_close(loss, want)
    loss.backward()
    want.backward()
    assert_close(ours.grad, ref.grad)
    if not options:  # torchtitan's own loss, which has neither option
        ref = leaf(logits)
        titan_loss, _ = CrossEntropyLoss.Config().build()(ref, labels, tokens)
        titan_loss.backward()
        # torchtitan computes in float32
        assert_close(loss, titan_loss, dtype=torch.float32)
        assert_close(ours.grad, ref.grad, dtype=torch.float32)
    # Validation calls it without a token count: the sum.
    assert_close(tl.FusedCrossEntropyLoss.Config(**options).build()(logits, labels)[0],
                 expected_sum(logits, labels, **options))


def test_fused_cross_entropy_loss_compiles_when_torchtitan_compiles_the_loss():
    titan()
    from torchtitan.config import CompileConfig
    options = dict(z_loss=0.05, label_smoothing=0.1)
    loss_fn = tl.FusedCrossEntropyLoss.Config(**options).build(compile_config=CompileConfig(
        enable=True, components=["loss"], backend="aot_eager"))
    assert hasattr(loss_fn.fn, "_torchdynamo_orig_callable")  # compiled
    logits, labels, _, _ = batch(9)
    ours, ref = leaf(logits), leaf(logits)
    loss, _ = loss_fn(ours, labels, torch.tensor(30))
    want = expected_sum(ref, labels, **options) / 30
    assert_close(loss, want)
    loss.backward()
    want.backward()
    assert_close(ours.grad, ref.grad)


@pytest.mark.parametrize("options", OPTIONS[::3])
def test_fused_head_loss_matches_torchtitan_chunked_wrapper(options):
    _, ChunkedLossWrapper = titan()
    _, labels, hidden, head = batch(6)
    tokens = torch.tensor(int((labels != tl.IGNORE_INDEX).sum()) + 5)
    ref_head = torch.nn.Linear(D, V, bias=False, dtype=hidden.dtype)
    ref_head.load_state_dict(head.state_dict())
    fused = tl.FusedHeadCrossEntropyLoss.Config(chunk_size=7, **options).build()
    assert isinstance(fused, ChunkedLossWrapper)  # what makes the trainer hand it the head
    fused.set_lm_head(head)
    ours, ref = leaf(hidden), leaf(hidden)
    loss, _ = fused(ours, labels, tokens, positions=None)
    tolerance = None  # float64's
    if options:
        want = expected_sum(ref_head(ref), labels, **options) / tokens
        want.backward()
    else:  # torchtitan's own chunked head and loss (its cross-entropy upcasts to float32)
        wrapper = ChunkedLossWrapper.Config(num_chunks=3).build()
        wrapper.set_lm_head(ref_head)
        want, _ = wrapper(ref, labels, tokens)
        want.backward()
        tolerance = torch.float32
        assert_close(loss, want, dtype=tolerance)
    assert_close(loss, expected_sum(head(hidden), labels, **options) / tokens)
    loss.backward()
    assert_close(ours.grad, ref.grad, dtype=tolerance)
    assert_close(head.weight.grad, ref_head.weight.grad, dtype=tolerance)
    with torch.no_grad():  # validation: forward only, no token count
        assert_close(fused(hidden, labels)[0], expected_sum(head(hidden), labels, **options))


def _titan_ranks(rank, world):
    """torchtitan's own CrossEntropyLoss and ours on the same tensor-parallel logits,
    under its three SPMD backends."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
    import spmd_types
    from torchtitan.components.loss import ChunkedLossWrapper, CrossEntropyLoss
    from torchtitan.distributed.spmd_types import set_current_spmd_mesh
    from torchtitan.distributed.utils import set_spmd_backend

    logits, labels, _, _ = batch(7)
    tokens = torch.tensor(int((labels != tl.IGNORE_INDEX).sum()))
    tp = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
    lo, hi = [(0, 19), (19, 37)][rank]
    ours_fn = tl.FusedCrossEntropyLoss.Config().build()
    theirs_fn = CrossEntropyLoss.Config(global_vocab_size=V).build()

    def both(make_pred, make_labels=lambda: labels):
        out = []
        for fn in (ours_fn, theirs_fn):
            pred = make_pred()
            loss, _ = fn(pred, make_labels(), tokens)
            loss.backward()
            grad = local_grad(pred) if isinstance(pred, DTensor) else pred.grad
            out.append((loss, grad))
        (loss, grad), (their_loss, their_grad) = out
        assert type(loss) is type(their_loss)
        if isinstance(loss, DTensor):
            assert loss.placements == their_loss.placements
            loss, their_loss = loss.to_local(), their_loss.to_local()
        assert_close(loss, their_loss, dtype=torch.float32)  # theirs: in float32
        assert_close(grad, their_grad, dtype=torch.float32)
        assert_close(grad, grads[..., lo:hi])

    full = leaf(logits)
    (expected_sum(full, labels) / tokens).backward()
    grads = full.grad
    set_spmd_backend("partial_dtensor")
    both(lambda: distribute_tensor(logits, tp, [Shard(2)]).requires_grad_())
    set_spmd_backend("full_dtensor")
    both(lambda: distribute_tensor(logits, tp, [Shard(2)]).requires_grad_(),
         lambda: distribute_tensor(labels, tp, [Replicate()]))
    set_spmd_backend("spmd_types")
    with set_current_spmd_mesh(tp):
        both(lambda: leaf(logits[..., lo:hi]))

        # The fused head on plain tensors: this rank's rows of the head, the hidden states
        # made replicated by the norm before it (spmd_types' I -> R, whose backward
        # all-reduces): the hidden states' gradient must be counted once, as with
        # torchtitan's ChunkedLossWrapper.
        _, _, hidden, head = batch(8)
        ref_head = torch.nn.Linear(D, V, bias=False, dtype=hidden.dtype)
        ref_head.load_state_dict(head.state_dict())
        ref = leaf(hidden)
        (expected_sum(ref_head(ref), labels) / tokens).backward()
        grads = []
        for fused in (tl.FusedHeadCrossEntropyLoss.Config(chunk_size=5).build(),
                      ChunkedLossWrapper.Config(loss_fn=CrossEntropyLoss.Config(
                          global_vocab_size=V), num_chunks=2).build()):
            shard = torch.nn.Linear(D, hi - lo, bias=False, dtype=hidden.dtype)
            with torch.no_grad():
                shard.weight.copy_(head.weight[lo:hi])
            fused.set_lm_head(shard)
            mine = leaf(hidden)
            replicated = spmd_types.convert(mine, tp.get_group(), src=spmd_types.I,
                                            dst=spmd_types.R)
            loss, _ = fused(replicated, labels, tokens)
            loss.backward()
            assert_close(loss, expected_sum(ref_head(hidden), labels) / tokens,
                         dtype=torch.float32)
            assert_close(mine.grad, ref.grad, dtype=torch.float32)
            assert_close(shard.weight.grad, ref_head.weight.grad[lo:hi], dtype=torch.float32)
            grads.append(mine.grad)
        assert_close(*grads, dtype=torch.float32)
    assert dist.get_world_size() == world


def test_fused_cross_entropy_loss_matches_torchtitan_on_two_ranks():
    titan()
    run_ranks(_titan_ranks, 2, timeout=120)
