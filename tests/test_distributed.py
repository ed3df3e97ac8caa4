"""The losses over a torch.distributed group (gloo, spawned ranks): each equal, loss and
gradients in float64, to the single-process call on the concatenated tensors."""
import time

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import fusedloss
from conftest import assert_close
from gloo_ranks import run_ranks

# Uneven class slices of C = 37 for each world size.
SLICES = {1: [37], 2: [10, 27], 3: [5, 20, 12]}


def _slice(t, rank, world, dim=1):
    sizes = SLICES[world]
    return t.narrow(dim, sum(sizes[:rank]), sizes[rank])


def _vocab_parallel_ce(rank, world, backends):
    for backend in backends:
        _vocab_parallel_ce_on(rank, world, backend)


def _vocab_parallel_ce_on(rank, world, backend):
    torch.manual_seed(0)  # the same tensors on every rank
    n, c, s = 9, sum(SLICES[world]), 2
    x = torch.randn(n, c, s, dtype=torch.float64) * 3
    t = torch.randint(0, c, (n, s))
    t[::3, 0] = -100
    probs = torch.softmax(torch.randn(n, c, s, dtype=torch.float64), 1)
    weight = torch.rand(c, dtype=torch.float64) + 0.2
    tw = torch.rand(n, s, dtype=torch.float64)
    combos = [dict(), dict(weight=weight, label_smoothing=0.1, z_loss=1e-2),
              dict(softcap=4.0, logit_scale=1.3, token_weight=tw, label_smoothing=0.2),
              dict(weight=weight, ignore_index=3, label_smoothing=0.05)]
    group = dist.group.WORLD
    for target in (t, probs):
        for kwargs in combos:
            if "ignore_index" in kwargs:
                if target.is_floating_point():
                    continue
                target = torch.where(t == -100, kwargs["ignore_index"], t)
            for reduction in ("mean", "sum", "none"):
                full = x.clone().requires_grad_()
                expected, lse, ent = fusedloss.cross_entropy(
                    full, target, reduction=reduction, return_lse=True, return_entropy=True,
                    backend="reference", **kwargs)
                upstream = torch.rand_like(expected) + 0.5
                (expected * upstream).sum().backward()
                local = _slice(x, rank, world).clone().requires_grad_()
                local_t = _slice(target, rank, world) if target.is_floating_point() else target
                ours, our_lse, our_ent = fusedloss.cross_entropy(
                    local, local_t, reduction=reduction, return_lse=True, return_entropy=True,
                    process_group=group, backend=backend, **kwargs)
                (ours * upstream).sum().backward()
                assert_close(ours, expected)
                assert_close(our_lse, lse)
                assert_close(our_ent, ent)
                assert_close(local.grad, _slice(full.grad, rank, world))
                if reduction == "none":
                    continue
                # The entropy's gradient, and the gradient written over the logits.
                full = x.clone().requires_grad_()
                expected, ent = fusedloss.cross_entropy(
                    full, target, reduction=reduction, return_entropy=True,
                    backend="reference", **kwargs)
                (expected * 0.7 + (ent * upstream).sum()).backward()
                local = _slice(x, rank, world).clone().requires_grad_()
                ours, our_ent = fusedloss.cross_entropy(
                    local, local_t, reduction=reduction, return_entropy=True,
                    process_group=group, backend=backend, **kwargs)
                (ours * 0.7 + (our_ent * upstream).sum()).backward()
                assert_close(local.grad, _slice(full.grad, rank, world))
                logits = _slice(x, rank, world).clone().requires_grad_()
                buf = logits * 1  # a non-leaf: its buffer becomes the gradient
                ours = fusedloss.cross_entropy(buf, local_t, reduction=reduction,
                                               inplace_backward=True, process_group=group,
                                               backend=backend, **kwargs)
                (ours * 0.7).backward()
                assert_close(ours, expected)
                assert_close(logits.grad,
                             _slice(_grad_of(x, target, reduction, kwargs), rank, world) * 0.7)


def _grad_of(x, target, reduction, kwargs):
    full = x.clone().requires_grad_()
    fusedloss.cross_entropy(full, target, reduction=reduction, backend="reference",
                            **kwargs).backward()
    return full.grad


@pytest.mark.parametrize("world", [2, 3])
def test_vocab_parallel_cross_entropy(world, cpu_backends):
    """Every option, on each backend's kernels over the slices."""
    run_ranks(_vocab_parallel_ce, world, cpu_backends)


def _refusals(rank, world):
    group = dist.group.WORLD
    x = torch.randn(4, SLICES[world][rank])
    with pytest.raises(IndexError, match="target"):
        fusedloss.cross_entropy(x, torch.tensor([0, 1, 2, 99]), process_group=group)
    with pytest.raises(ValueError, match="weight"):
        fusedloss.cross_entropy(x, torch.tensor([0, 1, 2, 3]), weight=torch.rand(5),
                                process_group=group)
    with pytest.raises(ValueError, match="backend"):
        fusedloss.cross_entropy(x, torch.tensor([0, 1, 2, 3]), backend="fast",
                                process_group=group)
    # Ranks that disagree on the rows get a clear error on every rank, not a hang.
    rows = 4 + rank
    with pytest.raises(ValueError, match="disagree on the number of rows"):
        fusedloss.cross_entropy(torch.randn(rows, 5), torch.zeros(rows, dtype=torch.long),
                                process_group=group)


def test_bad_input_across_ranks():
    run_ranks(_refusals, 2)


def _vocab_parallel_linear(rank, world, backends):
    for backend in backends:
        _vocab_parallel_linear_on(rank, world, backend)


def _check_linear_slice(rank, world, x, w, b, target, reduction, backend, kwargs):
    """linear_cross_entropy with this rank's rows of the head (w, b: the whole head, its
    classes on dimension 0) equal to one process on the whole head: the loss, the whole
    gradient of the input (all-reduced) and the gradients of the rank's rows."""
    leaves = [v.clone().requires_grad_() for v in (x, w, b)]
    expected = fusedloss.linear_cross_entropy(
        leaves[0], leaves[1], target, linear_bias=leaves[2], reduction=reduction,
        backend="reference", **kwargs)
    upstream = torch.rand_like(expected) + 0.5
    (expected * upstream).sum().backward()
    mine = [x.clone().requires_grad_(), _slice(w, rank, world, 0).clone().requires_grad_(),
            _slice(b, rank, world, 0).clone().requires_grad_()]
    local_t = _slice(target, rank, world) if target.is_floating_point() else target
    ours = fusedloss.linear_cross_entropy(
        mine[0], mine[1], local_t, linear_bias=mine[2], reduction=reduction,
        process_group=dist.group.WORLD, backend=backend, **kwargs)
    (ours * upstream).sum().backward()
    assert_close(ours, expected)
    assert_close(mine[0].grad, leaves[0].grad)
    assert_close(mine[1].grad, _slice(leaves[1].grad, rank, world, 0))
    assert_close(mine[2].grad, _slice(leaves[2].grad, rank, world, 0))


def _vocab_parallel_linear_on(rank, world, backend):
    torch.manual_seed(1)
    n, d, c = 11, 6, sum(SLICES[world])
    x = torch.randn(n, d, dtype=torch.float64)
    w = torch.randn(c, d, dtype=torch.float64)
    b = torch.randn(c, dtype=torch.float64)
    t = torch.randint(0, c, (n,))
    t[::4] = -100
    probs = torch.softmax(torch.randn(n, c, dtype=torch.float64), 1)
    weight = torch.rand(c, dtype=torch.float64) + 0.2
    combos = [dict(), dict(weight=weight, label_smoothing=0.1, z_loss=1e-2, chunk_size=3),
              dict(softcap=4.0, logit_scale=1.3, token_weight=torch.rand(n, dtype=torch.float64),
                   chunk_size=5)]
    for target in (t, probs):
        for kwargs in combos:
            for reduction in ("mean", "sum", "none"):
                _check_linear_slice(rank, world, x, w, b, target, reduction, backend, kwargs)
    # A K-dimensional head (C, 2, D): each position's rows a head of their own.
    w2 = torch.randn(c, 2, d, dtype=torch.float64)
    b2 = torch.randn(c, 2, dtype=torch.float64)
    t2 = torch.randint(0, c, (n, 2))
    t2[::3, 1] = -100
    p2 = torch.softmax(torch.randn(n, c, 2, dtype=torch.float64), 1)
    for target, kwargs in ((t2, dict(weight=weight, label_smoothing=0.1, z_loss=1e-2)),
                           (p2, dict(label_smoothing=0.2))):
        for reduction in ("mean", "none"):
            _check_linear_slice(rank, world, x, w2, b2, target, reduction, backend, kwargs)


@pytest.mark.parametrize("world", [2, 3])
def test_vocab_parallel_linear_cross_entropy(world, cpu_backends):
    run_ranks(_vocab_parallel_linear, world, cpu_backends)


def _info_nce(rank, world, exchange):
    torch.manual_seed(2)
    n, e, d = 5, 3, 8  # per rank
    q = F.normalize(torch.randn(world * n, d, dtype=torch.float64), dim=1)
    k = F.normalize(torch.randn(world * n, d, dtype=torch.float64), dim=1)
    neg = F.normalize(torch.randn(world * e, d, dtype=torch.float64), dim=1)
    labels = torch.randint(0, world * (n + e), (world * n,))
    group = dist.group.WORLD
    mine = slice(rank * n, (rank + 1) * n)
    cases = [dict(symmetric=True), dict(symmetric=True, negatives=True),
             dict(labels=True, negatives=True), dict()]
    for case in cases:
        for reduction in ("mean", "sum", "none"):
            scale = torch.tensor(4.0, dtype=torch.float64, requires_grad=True)
            full = [t.clone().requires_grad_() for t in (q, k, neg)]
            rows = fusedloss.info_nce(
                full[0], full[1], logit_scale=scale,
                negatives=full[2] if case.get("negatives") else None,
                labels=labels if case.get("labels") else None,
                symmetric=case.get("symmetric", False), reduction="none", backend="reference")
            per_rank = rows.view(world, n)
            expected = {"mean": per_rank.mean(1), "sum": per_rank.sum(1), "none": per_rank}[
                reduction]
            upstream = torch.rand_like(expected) + 0.5
            # Every rank's loss: the gradients each rank's tensors get from all of them.
            (expected * upstream).sum().backward()
            local = [t[mine if t is not neg else slice(rank * e, (rank + 1) * e)].clone()
                     .requires_grad_() for t in (q, k, neg)]
            my_scale = torch.tensor(4.0, dtype=torch.float64, requires_grad=True)
            ours = fusedloss.info_nce(
                local[0], local[1], logit_scale=my_scale,
                negatives=local[2] if case.get("negatives") else None,
                labels=labels[mine] if case.get("labels") else None,
                symmetric=case.get("symmetric", False), reduction=reduction,
                process_group=group, exchange=exchange)
            (ours * upstream[rank]).sum().backward()
            assert_close(ours, expected[rank])
            assert_close(local[0].grad, full[0].grad[mine])
            assert_close(local[1].grad, full[1].grad[mine])
            if case.get("negatives"):
                assert_close(local[2].grad, full[2].grad[rank * e:(rank + 1) * e])
            # This rank's own loss only: the scale is replicated, DDP averages its gradient.
            own = torch.tensor(4.0, dtype=torch.float64, requires_grad=True)
            rows = fusedloss.info_nce(
                q, k, logit_scale=own, negatives=neg if case.get("negatives") else None,
                labels=labels if case.get("labels") else None,
                symmetric=case.get("symmetric", False), reduction="none", backend="reference")
            mine_rows = rows.view(world, n)[rank]
            own_loss = {"mean": mine_rows.mean(), "sum": mine_rows.sum(), "none": mine_rows}[
                reduction]
            (own_loss * upstream[rank]).sum().backward()
            assert_close(my_scale.grad, own.grad)


@pytest.mark.parametrize("exchange", ["all_gather", "ring"])
@pytest.mark.parametrize("world", [2, 3])
def test_info_nce_across_ranks(world, exchange):
    run_ranks(_info_nce, world, exchange)


class _ToParallelRegion(torch.autograd.Function):
    """Megatron's column-parallel input: identity forward, gradient summed over ranks."""

    @staticmethod
    def forward(ctx, x):
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def _train_tensor_parallel(rank, world, loss_name):
    """A replicated body and a head sharded over the classes, trained a few steps: the
    body equals, and each head shard is the slice of, the single-process run."""
    c, steps = sum(SLICES[world]), 3

    def make():
        torch.manual_seed(3)
        body = torch.nn.Linear(8, 6, dtype=torch.float64)
        head = torch.nn.Linear(6, c, bias=False, dtype=torch.float64)
        return body, head

    def loss_of(body, head_weight, x, t, group):
        h = torch.tanh(body(x))
        opts = dict(label_smoothing=0.1, z_loss=1e-3)
        if loss_name == "linear_cross_entropy":
            return fusedloss.linear_cross_entropy(h, head_weight, t, process_group=group,
                                                  chunk_size=5, **opts)
        if group is not None:
            h = _ToParallelRegion.apply(h)
        return fusedloss.cross_entropy(h @ head_weight.T, t, process_group=group, **opts)

    torch.manual_seed(4)
    data = [(torch.randn(13, 8, dtype=torch.float64), torch.randint(0, c, (13,)))
            for _ in range(steps)]
    runs = {}
    for group in (None, dist.group.WORLD):
        body, head = make()
        head_weight = head.weight if group is None else \
            torch.nn.Parameter(_slice(head.weight.detach(), rank, world, 0).clone())
        opt = torch.optim.SGD([*body.parameters(), head_weight], lr=0.3)
        for x, t in data:
            opt.zero_grad()
            loss_of(body, head_weight, x, t, group).backward()
            opt.step()
        runs[group] = (body.weight.detach(), head_weight.detach())
    (body_a, head_a), (body_b, head_b) = runs[None], runs[dist.group.WORLD]
    assert_close(body_b, body_a)
    assert_close(head_b, _slice(head_a, rank, world, 0))


@pytest.mark.parametrize("loss_name", ["cross_entropy", "linear_cross_entropy"])
def test_tensor_parallel_training(loss_name):
    run_ranks(_train_tensor_parallel, 2, loss_name)


class Towers(torch.nn.Module):
    """CLIP-style image and text towers, with learnt scalars (name=initial value)."""

    def __init__(self, **scalars):
        super().__init__()
        torch.manual_seed(5)
        self.image = torch.nn.Linear(10, 8, dtype=torch.float64)
        self.text = torch.nn.Linear(12, 8, dtype=torch.float64)
        for name, value in scalars.items():
            setattr(self, name, torch.nn.Parameter(torch.tensor(value, dtype=torch.float64)))

    def forward(self, a, b):
        return F.normalize(self.image(a), dim=1), F.normalize(self.text(b), dim=1)


def train_towers(rank, world, loss_of, **scalars):
    """A few SGD steps of Towers(**scalars), in one process on the whole batch and under
    DDP on each rank's share, with loss = loss_of(model, image, text, process_group or
    None): every parameter of the two runs must be equal."""
    torch.manual_seed(6)
    n = 6  # per rank
    data = [(torch.randn(world * n, 10, dtype=torch.float64),
             torch.randn(world * n, 12, dtype=torch.float64)) for _ in range(3)]
    results = []
    for distributed in (False, True):
        model = Towers(**scalars)
        net = torch.nn.parallel.DistributedDataParallel(model) if distributed else model
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        for a, b in data:
            if distributed:
                a, b = a[rank * n:(rank + 1) * n], b[rank * n:(rank + 1) * n]
            loss = loss_of(model, *net(a, b), dist.group.WORLD if distributed else None)
            opt.zero_grad()
            loss.backward()
            opt.step()
        results.append([p.detach().clone() for p in model.parameters()])
    for single, ours in zip(*results):
        assert_close(ours, single)


def _train_ddp(rank, world, exchange):
    """CLIP-style towers under DDP, InfoNCE over both ranks' batches: after a few steps the
    weights (and the learnt logit scale) equal a single-process run on the whole batch."""
    train_towers(rank, world, lambda model, q, k, group: fusedloss.info_nce(
        q, k, logit_scale=model.logit_scale, symmetric=True, process_group=group,
        exchange=exchange), logit_scale=3.0)


@pytest.mark.parametrize("exchange", ["all_gather", "ring"])
def test_ddp_training(exchange):
    run_ranks(_train_ddp, 2, exchange)


def test_example_runs_under_torchrun():
    """The README's distributed example, run as written (two gloo ranks on this CPU)."""
    import pathlib
    import shutil
    import subprocess
    import sys
    root = pathlib.Path(__file__).resolve().parents[1]
    torchrun = shutil.which("torchrun")
    cmd = [torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]
    proc = subprocess.run([*cmd, "--nproc-per-node", "2",
                           str(root / "benchmarks" / "distributed_example.py")],
                          capture_output=True, text=True, timeout=300, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "both match a single process (2 ranks" in proc.stdout


def _one_rank_fails(rank, world_size):
    if rank == 1:
        raise ValueError("rank 1 breaks")
    time.sleep(600)  # rank 0 would wait on rank 1 for much longer than the test allows


def test_a_failed_rank_ends_the_run_at_once():
    """The harness itself: a rank that fails ends the run with its traceback, the others
    killed, instead of waiting for them until the timeout."""
    started = time.monotonic()
    with pytest.raises(pytest.fail.Exception, match="(?s)rank 1 of 2 failed.*rank 1 breaks"):
        run_ranks(_one_rank_fails, 2, timeout=240)
    assert time.monotonic() - started < 120


# ------------------------------------------------------------------------------ log-probs
# Vocabulary slices of V = 37, and V = 4 on 3 ranks split 2/2/0 as DTensor's chunking
# does: a rank with an empty slice contributes nothing.
LOG_PROBS_SLICES = {1: [37], 2: [10, 27], 3: [2, 2, 0]}


def _vocab_parallel_log_probs(rank, world, backends):
    for backend in backends:
        _vocab_parallel_log_probs_on(rank, world, backend)


def _vocab_parallel_log_probs_on(rank, world, backend):
    torch.manual_seed(0)  # the same tensors on every rank
    sizes = LOG_PROBS_SLICES[world]
    n, d, v = 11, 6, sum(sizes)
    x = torch.randn(n, d, dtype=torch.float64)
    w = torch.randn(v, d, dtype=torch.float64) * 2
    b = torch.randn(v, dtype=torch.float64)
    t = torch.randint(0, v, (n,))
    t[::4] = -100
    temperature = torch.rand(n, dtype=torch.float64) + 0.5
    g, h = torch.randn(n, dtype=torch.float64), torch.randn(n, dtype=torch.float64)
    extras = ("lse", "log_sum_sq_probs", "mean_logits", "is_top1")
    lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
    for kwargs in (dict(), dict(softcap=3.0, logit_scale=1.2, temperature=temperature)):
        leaves = [x.clone().requires_grad_(), w.clone().requires_grad_(),
                  b.clone().requires_grad_()]
        expected = fusedloss.linear_log_probs(leaves[0], leaves[1], t, linear_bias=leaves[2],
                                              return_entropy=True, extras=extras,
                                              backend="reference", **kwargs)
        ((expected.log_probs * g).sum() + (expected.entropy * h).sum()).backward()
        mine = [x.clone().requires_grad_(), w[lo:hi].clone().requires_grad_(),
                b[lo:hi].clone().requires_grad_()]
        ours = fusedloss.linear_log_probs(mine[0], mine[1], t, linear_bias=mine[2],
                                          return_entropy=True, extras=extras, chunk_size=4,
                                          process_group=dist.group.WORLD, backend=backend,
                                          **kwargs)
        ((ours.log_probs * g).sum() + (ours.entropy * h).sum()).backward()
        for name in ("log_probs", "entropy", *extras[:-1]):
            assert_close(getattr(ours, name), getattr(expected, name))
        assert torch.equal(ours.is_top1, expected.is_top1)
        assert_close(mine[0].grad, leaves[0].grad)
        assert_close(mine[1].grad, leaves[1].grad[lo:hi])
        assert_close(mine[2].grad, leaves[2].grad[lo:hi])
        # From the slice's logits; log_probs alone, without the entropy.
        logits = torch.nn.functional.linear(x, w, b)
        full = logits.clone().requires_grad_()
        expected = fusedloss.log_probs(full, t, extras=extras, return_entropy=True,
                                       backend="reference", **kwargs)
        (expected.log_probs * g).sum().backward()
        local = logits[:, lo:hi].clone().requires_grad_()
        ours = fusedloss.log_probs(local, t, extras=extras, process_group=dist.group.WORLD,
                                   backend=backend, **kwargs)
        (ours.log_probs * g).sum().backward()
        assert ours.entropy is None
        for name in ("log_probs", *extras[:-1]):
            assert_close(getattr(ours, name), getattr(expected, name))
        assert torch.equal(ours.is_top1, expected.is_top1)
        assert_close(local.grad, full.grad[:, lo:hi])
    group = dist.group.WORLD
    with pytest.raises(IndexError, match="target"):  # past every rank's classes
        fusedloss.linear_log_probs(x, w[lo:hi], torch.full((n,), v), process_group=group)


@pytest.mark.parametrize("world", [1, 3])
def test_vocab_parallel_log_probs(world, cpu_backends):
    run_ranks(_vocab_parallel_log_probs, world, cpu_backends)


def _empty_class_slice(rank, world, backends):
    for backend in backends:
        _empty_class_slice_on(rank, world, backend)


def _empty_class_slice_on(rank, world, backend):
    """V=4 on 3 ranks splits 2/2/0, as DTensor's chunking does: the rank with no classes
    contributes nothing, and every rank gets the single-process loss and its gradients."""
    sizes = [2, 2, 0]
    lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
    torch.manual_seed(0)
    x = torch.randn(5, 4, dtype=torch.float64) * 2
    t = torch.tensor([0, 1, 2, 3, -100])
    weight = torch.rand(4, dtype=torch.float64) + 0.5
    h, w = torch.randn(5, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    group = dist.group.WORLD
    for kwargs in (dict(), dict(weight=weight, label_smoothing=0.1, z_loss=1e-2)):
        full = x.clone().requires_grad_()
        expected = fusedloss.cross_entropy(full, t, backend="reference", **kwargs)
        expected.backward()
        local = x[:, lo:hi].clone().requires_grad_()
        loss = fusedloss.cross_entropy(local, t, process_group=group, backend=backend,
                                       **kwargs)
        loss.backward()
        assert_close(loss, expected)
        assert_close(local.grad, full.grad[:, lo:hi])
        leaves = [h.clone().requires_grad_(), w.clone().requires_grad_()]
        expected = fusedloss.linear_cross_entropy(*leaves, t, backend="reference", **kwargs)
        expected.backward()
        mine = [h.clone().requires_grad_(), w[lo:hi].clone().requires_grad_()]
        loss = fusedloss.linear_cross_entropy(*mine, t, process_group=group, backend=backend,
                                              **kwargs)
        loss.backward()
        assert_close(loss, expected)
        assert_close(mine[0].grad, leaves[0].grad)
        assert_close(mine[1].grad, leaves[1].grad[lo:hi])


def test_empty_class_slice(cpu_backends):
    run_ranks(_empty_class_slice, 3, cpu_backends)


# ------------------------------------------------------------------------------ DTensor
def _dtensor_cross_entropy(rank, world, backends):
    """DTensor logits sharded on the classes (uneven and empty slices: V=5 on 2 ranks is
    3/2, V=4 on 3 ranks 2/2/0) or replicated: loss and gradients equal to one process, the
    loss a replicated DTensor, the gradient sharded as the logits; the refusals."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    v = {1: 7, 2: 5, 3: 4}[world]
    x = torch.randn(6, v, dtype=torch.float64) * 2
    t = torch.tensor([0, 1, 2, 3, -100, 1]) % v
    t[4] = -100
    weight = torch.rand(v, dtype=torch.float64) + 0.5
    for backend, placement in [(b, p) for b in backends for p in (Shard(1), Replicate())]:
        for kwargs in (dict(), dict(weight=weight, label_smoothing=0.1, z_loss=1e-2)):
            full = x.clone().requires_grad_()
            expected = fusedloss.cross_entropy(full, t, backend="reference", **kwargs)
            expected.backward()
            dx = distribute_tensor(x.clone(), mesh, [placement]).requires_grad_()
            loss = fusedloss.cross_entropy(dx, t, backend=backend, **kwargs)
            assert isinstance(loss, DTensor) and loss.placements == (Replicate(),)
            # (torch.autograd.grad: the gradient as the loss returns it. torch 2.11's
            # AccumulateGrad makes an unevenly sharded leaf's .grad Replicate.)
            grad, = torch.autograd.grad(loss, dx)
            assert_close(loss.full_tensor(), expected)
            assert grad.placements == (placement,)
            assert_close(grad.full_tensor(), full.grad)
        # log_probs over the same logits, with the entropy and its gradient
        full = x.clone().requires_grad_()
        lp = fusedloss.log_probs(full, t, return_entropy=True, backend="reference")
        (lp.log_probs.sum() + lp.entropy.sum()).backward()
        dx = distribute_tensor(x.clone(), mesh, [placement]).requires_grad_()
        out = fusedloss.log_probs(dx, t, return_entropy=True, backend=backend)
        (out.log_probs.sum() + out.entropy.sum()).backward()
        assert out.entropy.placements == (Replicate(),)
        assert_close(out.log_probs.full_tensor(), lp.log_probs)
        assert_close(out.entropy.full_tensor(), lp.entropy)
        assert_close(dx.grad.full_tensor(), full.grad)
    dt = distribute_tensor(t, mesh, [Replicate()])  # a replicated DTensor target
    sharded = distribute_tensor(x.clone(), mesh, [Shard(1)])
    assert_close(fusedloss.cross_entropy(sharded, dt, reduction="sum").full_tensor(),
                 torch.nn.functional.cross_entropy(x, t, reduction="sum"))
    with pytest.raises(ValueError, match="Partial"):
        fusedloss.cross_entropy(DTensor.from_local(x, mesh, [Partial()]), t)
    with pytest.raises(ValueError, match="not both"):
        fusedloss.cross_entropy(sharded, t, process_group=dist.group.WORLD)
    with pytest.raises(ValueError, match="target"):
        fusedloss.cross_entropy(sharded, distribute_tensor(t, mesh, [Shard(0)]))


@pytest.mark.parametrize("world", [1, 2, 3])
def test_dtensor_cross_entropy(world, cpu_backends):
    run_ranks(_dtensor_cross_entropy, world, cpu_backends)


def _dtensor_heads(rank, world, backends):
    """A DTensor LM head: weight (and bias) Shard(0) on the vocabulary or replicated, the
    input replicated or sharded on its rows (sequence parallel). Loss, log-probs, entropy
    and every gradient equal to one process; gradients placed as their tensors; a plain
    input with a DTensor weight refused."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    n, d, v = 6, 5, {1: 7, 2: 5, 3: 4}[world]
    x = torch.randn(n, d, dtype=torch.float64)
    w = torch.randn(v, d, dtype=torch.float64) * 2
    b = torch.randn(v, dtype=torch.float64)
    t = torch.tensor([0, 1, 2, 3, -100, 1]) % v
    t[4] = -100
    g = torch.randn(n, dtype=torch.float64)
    for backend, w_place, x_place in [(bk, *places) for bk in backends for places in (
            (Shard(0), Replicate()), (Shard(0), Shard(0)), (Replicate(), Replicate()))]:
        leaves = [a.clone().requires_grad_() for a in (x, w, b)]
        expected = fusedloss.linear_cross_entropy(leaves[0], leaves[1], t,
                                                  linear_bias=leaves[2], label_smoothing=0.1,
                                                  backend="reference")
        lp = fusedloss.linear_log_probs(leaves[0], leaves[1], t, linear_bias=leaves[2],
                                        return_entropy=True, backend="reference")
        (expected + (lp.log_probs * g).sum() + lp.entropy.sum()).backward()
        dx = distribute_tensor(x.clone(), mesh, [x_place]).requires_grad_()
        dw = distribute_tensor(w.clone(), mesh, [w_place]).requires_grad_()
        db = distribute_tensor(b.clone(), mesh, [w_place]).requires_grad_()
        loss = fusedloss.linear_cross_entropy(dx, dw, t, linear_bias=db, label_smoothing=0.1,
                                              backend=backend)
        out = fusedloss.linear_log_probs(dx, dw, t, linear_bias=db, return_entropy=True,
                                         backend=backend)
        assert isinstance(loss, DTensor) and isinstance(out.entropy, DTensor)
        g_d = distribute_tensor(g, mesh, [Replicate()])
        (loss + (out.log_probs * g_d).sum() + out.entropy.sum()).backward()
        assert_close(loss.full_tensor(), expected)
        assert_close(out.log_probs.full_tensor(), lp.log_probs)
        for ours, theirs, place in ((dx, leaves[0], x_place), (dw, leaves[1], w_place),
                                    (db, leaves[2], w_place)):
            assert ours.grad.placements == (place,)
            assert_close(ours.grad.full_tensor(), theirs.grad)
    dw = distribute_tensor(w, mesh, [Shard(0)])
    with pytest.raises(ValueError, match="FSDP"):
        fusedloss.linear_cross_entropy(x, dw, t)
    with pytest.raises(ValueError, match="not both"):
        fusedloss.linear_cross_entropy(distribute_tensor(x, mesh, [Replicate()]), dw, t,
                                       process_group=dist.group.WORLD)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_dtensor_heads(world, cpu_backends):
    run_ranks(_dtensor_heads, world, cpu_backends)


# ------------------------------------------------------------------------------ FSDP2
def _fsdp_training(rank, world, reshard, mixed):
    """A tiny body and LM head under FSDP2 (fully_shard), each rank its own batch, the loss
    from lm_head_cross_entropy plus an RL term from lm_head_log_probs: after 3 SGD steps
    the weights equal single-process training on the concatenated batch (float64; bf16
    mixed precision within bf16 rounding). Reading the sharded weight directly is refused."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mesh = init_device_mesh("cpu", (world,))
    dtype = torch.float32 if mixed else torch.float64

    def model():
        torch.manual_seed(0)
        return torch.nn.ModuleDict(dict(body=torch.nn.Linear(8, 8), head=torch.nn.Linear(8, 11))
                                   ).to(dtype)

    def objective(m, x, t):
        h = torch.tanh(m["body"](x))
        lp = fusedloss.lm_head_log_probs(m["head"], h, t, return_entropy=True)
        return fusedloss.lm_head_cross_entropy(m["head"], h, t) \
            - 0.1 * (lp.log_probs.mean() + 0.5 * lp.entropy.mean())

    torch.manual_seed(1)
    xs = torch.randn(world, 6, 8, dtype=dtype)
    ts = torch.randint(0, 11, (world, 6))
    ref = model()
    opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        objective(ref, xs.flatten(0, 1), ts.flatten()).backward()
        opt.step()
    ours = model()
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if mixed else MixedPrecisionPolicy()
    for part in (ours["head"], ours["body"]):  # (a ModuleDict has no forward to wrap)
        fully_shard(part, mesh=mesh, reshard_after_forward=reshard, mp_policy=policy)
    opt = torch.optim.SGD(ours.parameters(), lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        objective(ours, xs[rank], ts[rank]).backward()
        opt.step()
    tol = dict(rtol=3e-2, atol=3e-2) if mixed else {}
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.full_tensor(), q.detach(), msg=name, **tol)
    with pytest.raises(ValueError, match="FSDP"):
        fusedloss.linear_cross_entropy(xs[rank], ours["head"].weight, ts[rank])


@pytest.mark.parametrize("reshard,mixed", [(True, False), (False, False), (True, True)],
                         ids=["reshard", "keep", "bf16"])
def test_fsdp2_lm_head(reshard, mixed):
    run_ranks(_fsdp_training, 2, reshard, mixed)


def _dtensor_batch_sharded(rank, world):
    """Logits sharded on the batch too: a 2 x 2 mesh (Shard(0), Shard(1)) on 4 ranks, and
    the batch alone on 2. The mean divides by the global denominator (class weights and
    ignored targets make it differ from any local one); "none" rows come back sharded as
    the batch; gradients equal to one process."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    shape = (2, 2) if world == 4 else (world,)
    mesh = init_device_mesh("cpu", shape)
    placements = [Shard(0), Shard(1)] if world == 4 else [Shard(0)]
    row_place = [Shard(0), Replicate()] if world == 4 else [Shard(0)]
    torch.manual_seed(0)
    x = torch.randn(8, 5, dtype=torch.float64) * 2
    t = torch.randint(0, 5, (8,))
    t[[1, 2, 3]] = -100  # unevenly ignored across the batch shards
    weight = torch.rand(5, dtype=torch.float64) + 0.5
    for reduction in ("mean", "sum", "none"):
        full = x.clone().requires_grad_()
        expected = fusedloss.cross_entropy(full, t, weight=weight, label_smoothing=0.1,
                                           reduction=reduction, backend="reference")
        upstream = torch.rand_like(expected) + 0.5
        (expected * upstream).sum().backward()
        dx = distribute_tensor(x.clone(), mesh, placements).requires_grad_()
        dt = distribute_tensor(t, mesh, row_place)
        loss = fusedloss.cross_entropy(dx, dt, weight=weight, label_smoothing=0.1,
                                       reduction=reduction)
        want = tuple(row_place) if reduction == "none" else (Replicate(),) * len(shape)
        assert tuple(loss.placements) == want
        (loss * distribute_tensor(upstream, mesh, list(want))).sum().backward()
        assert_close(loss.full_tensor(), expected)
        assert_close(dx.grad.full_tensor(), full.grad)


@pytest.mark.parametrize("world", [2, 4])
def test_dtensor_batch_sharded(world):
    run_ranks(_dtensor_batch_sharded, world)


# ------------------------------------------------------------------------------ compile
def _graph_ops(found):
    """An aot_eager-style backend that records every op of the forward and backward
    graphs it is given."""
    from torch._dynamo.backends.common import aot_autograd

    def record(gm, example_inputs):
        found.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward
    return aot_autograd(fw_compiler=record, bw_compiler=record)


HOST_READ = "aten._local_scalar_dense"


def _compiled_without_host_reads(rank, world):
    """torch.compile(fullgraph=True) of the process_group and DTensor paths: equal to
    eager, and no op of the forward or backward graphs reads a tensor on the host (torch
    2.14 traces .item() and int(tensor) into the graph as aten._local_scalar_dense rather
    than breaking it, so that op is looked for directly)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    torch.manual_seed(0)
    group = dist.group.WORLD
    n, d, c = 6, 5, sum(SLICES[world])
    lo, hi = sum(SLICES[world][:rank]), sum(SLICES[world][:rank + 1])
    full = torch.randn(n, c, dtype=torch.float64)
    x = full[:, lo:hi].contiguous()
    h, w = torch.randn(n, d, dtype=torch.float64), torch.randn(c, d, dtype=torch.float64)
    w = w[lo:hi].contiguous()
    t = torch.randint(0, c, (n,))
    t[1] = -100
    weight = torch.rand(c, dtype=torch.float64) + 0.5
    mesh = init_device_mesh("cpu", (world,))
    logits = distribute_tensor(full, mesh, [Shard(1)])  # torch.chunk's slices: no exchange
    cases = {
        "cross_entropy": (lambda x: fusedloss.cross_entropy(
            x, t, weight=weight, label_smoothing=0.1, z_loss=1e-3, process_group=group), x),
        "linear_cross_entropy": (lambda h, w: fusedloss.linear_cross_entropy(
            h, w, t, process_group=group, chunk_size=4), h, w),
        "linear_log_probs": (lambda h, w: fusedloss.linear_log_probs(
            h, w, t, return_entropy=True, process_group=group).entropy.sum(), h, w),
        "log_probs": (lambda x: fusedloss.log_probs(x, t, process_group=group).sum(), x),
        "DTensor logits": (lambda x: fusedloss.cross_entropy(x, t).to_local(), logits),
    }
    for name, (fn, *args) in cases.items():
        eager_args = [a.detach().clone().requires_grad_() for a in args]
        expected = fn(*eager_args)
        expected.backward()
        torch._dynamo.reset()
        found = []
        ours_args = [a.detach().clone().requires_grad_() for a in args]
        got = torch.compile(fn, fullgraph=True, backend=_graph_ops(found))(*ours_args)
        got.backward()
        assert_close(got, expected)
        for a, b in zip(ours_args, eager_args):
            assert_close(a.grad, b.grad)
        assert any("all_reduce" in op for op in found), (name, found)
        assert not [op for op in found if HOST_READ in op], (name, sorted(set(found)))
    # The check can fail: a planted host read is found.
    torch._dynamo.reset()
    found = []
    with torch._dynamo.config.patch(capture_scalar_outputs=True):
        torch.compile(lambda x: x.sum() * torch.ones(int(t.max())).sum(), fullgraph=True,
                      backend=_graph_ops(found))(x.clone().requires_grad_()).backward()
    assert [op for op in found if HOST_READ in op], found


def test_compiled_without_host_reads():
    run_ranks(_compiled_without_host_reads, 2)
