"""Tensor parallelism with torch's own tools (parallelize_module, DTensor, CommDebugMode):
fusedloss on a ColwiseParallel LM head's logits and on sequence-parallel hidden states,
each equal, loss and gradients in float64, to one process on the whole tensors; what
crosses ranks, counted; the cases torch 2.14's loss_parallel gets wrong or refuses; FSDP2
x tensor parallel training, and its example script under torchrun. Spawned gloo ranks
(tests/gloo_ranks.py), tiny sizes."""
import json
import os
import pathlib
import shutil
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

import fusedloss
from conftest import assert_close
from gloo_ranks import run_ranks

try:
    from torch.distributed.tensor.debug import CommDebugMode
except ImportError:  # a torch without torch.distributed
    CommDebugMode = object


class CollectiveSizes(CommDebugMode):
    """CommDebugMode that also records, for each collective, its name and the number of
    elements of its largest tensor argument (CommDebugMode alone only counts them)."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = super().__torch_dispatch__(func, types, args, kwargs)
        name = str(getattr(func, "_overloadpacket", func))
        if out is not NotImplemented \
                and getattr(func, "namespace", "") in ("c10d", "_c10d_functional") \
                and not name.endswith(("wait_tensor", "_wrap_tensor_autograd")):
            numel = [t.numel() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                     if isinstance(t, torch.Tensor)]
            self.sizes.append((name, max(numel, default=0)))
        return out

    def largest(self, *names):
        """The largest tensor moved by a collective whose name contains one of `names`."""
        return max((n for op, n in self.sizes if any(k in op for k in names)), default=0)

    def total(self, *names):
        """The elements moved by all the collectives whose names contain one of `names`."""
        return sum(n for op, n in self.sizes if any(k in op for k in names))


ALL_REDUCE = ("allreduce", "all_reduce")
ALL_GATHER = ("allgather", "all_gather")
REDUCE_SCATTER = ("reduce_scatter",)


# ------------------------------------------------------------------ a ColwiseParallel head
def _colwise_head(rank, world):
    """An nn.Linear LM head under ColwiseParallel(use_local_output=False): its (B, T, V)
    logits a DTensor Shard(2) (V=13: uneven slices), passed to cross_entropy flattened to
    (B*T, V) (Shard(1)) or with the classes moved to dimension 1, (B, V, T). Loss and the
    gradients of the head and of the hidden states equal one process; no collective moves
    anything of the logits' size."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module
    mesh = init_device_mesh("cpu", (world,))
    b, t, d, v = 2, 5, 6, 13
    torch.manual_seed(0)
    ref = torch.nn.Linear(d, v).double()
    head = torch.nn.Linear(d, v).double()
    head.load_state_dict(ref.state_dict())
    parallelize_module(head, mesh, ColwiseParallel(use_local_output=False))
    h = torch.randn(b, t, d, dtype=torch.float64) * 2
    target = torch.randint(0, v, (b, t))
    target[0, 1] = target[1, 3] = -100
    weight = torch.rand(v, dtype=torch.float64) + 0.5
    kwargs = dict(weight=weight, label_smoothing=0.1)
    for layout in ("rows", "classes_dim1"):
        h_ref, h_tp = h.clone().requires_grad_(), h.clone().requires_grad_()
        ref.zero_grad()
        head.zero_grad()
        expected = F.cross_entropy(ref(h_ref).flatten(0, 1), target.flatten(), **kwargs)
        expected.backward()
        with CollectiveSizes() as comm:
            logits = head(h_tp)
            assert isinstance(logits, DTensor) and logits.placements == (Shard(2),)
            if layout == "rows":
                logits, tgt = logits.flatten(0, 1), target.flatten()
            else:
                logits, tgt = logits.transpose(1, 2), target
            assert logits.placements == (Shard(1),)
            loss = fusedloss.cross_entropy(logits, tgt, **kwargs)
            loss.backward()
        assert isinstance(loss, DTensor) and loss.placements == (Replicate(),)
        assert_close(loss.full_tensor(), expected)
        assert_close(head.weight.grad.full_tensor(), ref.weight.grad)
        assert_close(head.bias.grad.full_tensor(), ref.bias.grad)
        assert_close(h_tp.grad, h_ref.grad)
        # The logits are never gathered, whole or a rank's slice: the largest collective
        # is the all-reduce of the hidden states' gradient (B*T*D, torch's matmul backward).
        assert max(n for _, n in comm.sizes) < b * t * v, comm.sizes
        assert comm.largest(*ALL_GATHER) < b * t * (v // world), comm.sizes
    # Refused, naming the reason: a placement the loss cannot read exactly (flattening
    # (B, T, V) logits sharded on T gives a strided sharding of the rows in torch 2.14),
    # and a fused head whose ColwiseParallel would shard the loss as it shards logits.
    from torch.distributed.tensor import distribute_tensor
    seq = distribute_tensor(torch.randn(b, t, v, dtype=torch.float64), mesh, [Shard(1)])
    try:
        flat = seq.flatten(0, 1)
    except RuntimeError:  # torch 2.11 refuses the flatten itself: nothing to pass on
        flat = None
    if flat is not None and type(flat.placements[0]) not in (Shard, Replicate):
        with pytest.raises(NotImplementedError, match="placements"):
            fusedloss.cross_entropy(flat, target.flatten())
    sharded_out = parallelize_module(torch.nn.Linear(d, v).double(), mesh, ColwiseParallel())
    with pytest.raises(ValueError, match="output_layouts=Replicate"):
        fusedloss.lm_head_cross_entropy(sharded_out, h.flatten(0, 1), target.flatten())


# ------------------------------------------------------------------ sequence parallel
def _sequence_parallel(rank, world):
    """Hidden states sharded on their rows (sequence parallel) into a fused head.
    1. linear_cross_entropy(hidden Shard(0) (N=9: uneven), head.weight Shard(0), target):
       the hidden states' gradient comes back sharded as they were, through a
       reduce-scatter, never an all-reduce of N x D.
    2. A SequenceParallel LayerNorm, its output (B, T, D) Shard(1), flattened to rows
       (DTensor makes that _StridedShard(0)), into lm_head_cross_entropy(head, rows,
       target) with the head ColwiseParallel(output_layouts=Replicate()) (torch's output
       hook then leaves the replicated loss as it is; its default, Shard(-1), would try to
       shard the scalar loss and fail), and into linear_cross_entropy(rows, head.weight).
    Loss and every gradient equal one process in both."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.parallel import (ColwiseParallel, SequenceParallel,
                                                   parallelize_module)
    mesh = init_device_mesh("cpu", (world,))
    n, d, v = 9, 16, 13
    torch.manual_seed(0)
    ref = torch.nn.Linear(d, v).double()
    head = torch.nn.Linear(d, v).double()
    head.load_state_dict(ref.state_dict())
    parallelize_module(head, mesh, ColwiseParallel(output_layouts=Replicate()))
    h = torch.randn(n, d, dtype=torch.float64)
    target = torch.randint(0, v, (n,))
    target[[2, 7]] = -100

    h_ref = h.clone().requires_grad_()
    expected = F.cross_entropy(ref(h_ref), target, label_smoothing=0.1)
    expected.backward()
    hd = distribute_tensor(h.clone(), mesh, [Shard(0)]).requires_grad_()
    with CollectiveSizes() as comm:
        loss = fusedloss.linear_cross_entropy(hd, head.weight, target,
                                              linear_bias=head.bias, label_smoothing=0.1)
        loss.backward()
    assert isinstance(loss, DTensor)
    assert_close(loss.full_tensor(), expected)
    assert hd.grad.placements == (Shard(0),)
    assert_close(hd.grad.full_tensor(), h_ref.grad)
    assert_close(head.weight.grad.full_tensor(), ref.weight.grad)
    assert_close(head.bias.grad.full_tensor(), ref.bias.grad)
    # After the equalities, so that they are checked first: how (1) moved the gradient.
    assert comm.total(*ALL_REDUCE) < n * d, comm.sizes  # a few numbers per row only

    b, t = 2, 6  # T divisible by the ranks, as SequenceParallel's from_local needs
    torch.manual_seed(1)
    ref_norm = torch.nn.LayerNorm(d).double()
    with torch.no_grad():
        ref_norm.weight.normal_()
        ref_norm.bias.normal_()
    norm = torch.nn.LayerNorm(d).double()
    norm.load_state_dict(ref_norm.state_dict())
    parallelize_module(norm, mesh, SequenceParallel(use_local_output=False))
    x = torch.randn(b, t, d, dtype=torch.float64)
    target = torch.randint(0, v, (b, t))
    target[1, 0] = -100
    ref.zero_grad()
    x_ref = x.clone().requires_grad_()
    expected = F.cross_entropy(ref(ref_norm(x_ref)).flatten(0, 1), target.flatten())
    expected.backward()
    mine = slice(rank * t // world, (rank + 1) * t // world)
    for fused in ("lm_head_cross_entropy", "linear_cross_entropy"):
        head.zero_grad()
        norm.zero_grad()
        x_local = x[:, mine].clone().requires_grad_()
        normed = norm(x_local)
        assert normed.placements == (Shard(1),)
        try:
            rows = normed.flatten(0, 1)
        except RuntimeError:  # torch 2.11's DTensor refuses to flatten rows sharded on T
            return
        if fused == "lm_head_cross_entropy":  # the head's hook gathers the rows first
            loss = fusedloss.lm_head_cross_entropy(head, rows, target.flatten())
        else:  # fusedloss gathers the (_StridedShard) rows itself
            loss = fusedloss.linear_cross_entropy(rows, head.weight, target.flatten(),
                                                  linear_bias=head.bias).full_tensor()
        loss.backward()
        assert_close(loss, expected)
        assert_close(x_local.grad, x_ref.grad[:, mine])
        for ours, theirs in ((norm.weight, ref_norm.weight), (norm.bias, ref_norm.bias),
                             (head.weight, ref.weight), (head.bias, ref.bias)):
            assert_close(ours.grad.full_tensor(), theirs.grad)
    assert comm.total(*REDUCE_SCATTER) >= n * d, comm.sizes


def _heads(rank, world):
    _colwise_head(rank, world)
    _sequence_parallel(rank, world)


def test_colwise_and_sequence_parallel_heads():
    """Both in one run of 2 ranks: most of a run's time is its ranks' start."""
    run_ranks(_heads, 2)


# ------------------------------------------------------------------ torch's loss_parallel
# What torch 2.14.1's loss_parallel() does with F.cross_entropy on class-sharded DTensor
# logits, for the cases fusedloss computes exactly: "raises" or "wrong" (loss or gradient
# differ from one process). The test records what the installed torch does: it fails on
# neither a fix ("right": it warns, so this table and the README line can be updated)
# nor these outcomes, and fails on a new kind of failure, so the table stays true.
LOSS_PARALLEL_2_14 = {
    "label_smoothing": "raises",       # RuntimeError: masked_fill_ on a Partial DTensor
    "probability_targets": "wrong",    # silently wrong gradient (pytorch issue 190746)
    "class_weight_ignored": "raises",  # RuntimeError: index -100 is out of bounds
    "mean_2d_mesh": "raises",          # NotImplementedError: one-dimensional mesh only
}


def _loss_parallel_gaps(rank, world, record):
    """The logits Shard(1) on a 1-D mesh of 2 (V=13: slices 7/6), and (Shard(0), Shard(1))
    on a 1 x 2 mesh for the mean (loss_parallel refuses any mesh of two dimensions; fusedloss
    on a 2 x 2 mesh is test_distributed's _dtensor_batch_sharded). For each case fusedloss
    equals one process (loss and gradient); loss_parallel's outcome is written to
    `record`."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.parallel import loss_parallel
    flat, square = init_device_mesh("cpu", (world,)), init_device_mesh("cpu", (1, world))
    torch.manual_seed(0)
    n, v = 8, 13
    x = torch.randn(n, v, dtype=torch.float64) * 2
    t = torch.randint(0, v, (n,))
    t[[1, 6]] = -100
    probs = torch.softmax(torch.randn(n, v, dtype=torch.float64) * 2, 1)
    weight = torch.rand(v, dtype=torch.float64) + 0.5
    every = t.clamp(min=0)  # no ignored row: loss_parallel's mean on 2-D meshes is its own gap
    cases = {  # name: (mesh, logits placements, target, its placements, kwargs)
        "label_smoothing": (flat, [Shard(1)], t, [Replicate()], dict(label_smoothing=0.1)),
        "probability_targets": (flat, [Shard(1)], probs, [Shard(1)], {}),
        "class_weight_ignored": (flat, [Shard(1)], t, [Replicate()], dict(weight=weight)),
        "mean_2d_mesh": (square, [Shard(0), Shard(1)], every, [Shard(0), Replicate()], {}),
    }
    outcomes, wrong = {}, []
    for name, (mesh, placements, target, target_placements, kwargs) in cases.items():
        full = x.clone().requires_grad_()
        expected = F.cross_entropy(full, target, **kwargs)
        expected.backward()
        dt = distribute_tensor(target, mesh, target_placements)
        for who in ("fusedloss", "loss_parallel"):
            dx = distribute_tensor(x.clone(), mesh, placements).requires_grad_()
            try:
                if who == "fusedloss":
                    loss = fusedloss.cross_entropy(dx, dt, **kwargs)
                    loss.backward()
                else:
                    with loss_parallel():
                        loss = F.cross_entropy(dx, dt, **kwargs)
                        loss.backward()
                right = torch.allclose(loss.full_tensor(), expected) \
                    and torch.allclose(dx.grad.full_tensor(), full.grad)
                outcome = "right" if right else "wrong"
            except (RuntimeError, ValueError, NotImplementedError) as exc:
                outcome = f"raises {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            if who == "loss_parallel":
                outcomes[name] = outcome
            elif outcome != "right":
                wrong.append(f"{name}: {outcome}")
    if rank == 0:
        with open(record, "w") as f:
            json.dump(outcomes, f)
    assert not wrong, "fusedloss differs from one process: " + "; ".join(wrong)


def test_loss_parallel_gaps(tmp_path):
    record = tmp_path / "loss_parallel.json"
    run_ranks(_loss_parallel_gaps, 2, str(record))
    outcomes = json.loads(record.read_text())
    assert set(outcomes) == set(LOSS_PARALLEL_2_14)
    for name, outcome in outcomes.items():
        if outcome == "right":
            warnings.warn(f"torch {torch.__version__}'s loss_parallel now gets {name} right")
        else:
            assert outcome.split(" ")[0] == LOSS_PARALLEL_2_14[name], (name, outcome)


# ------------------------------------------------------------------ FSDP2 x tensor parallel
class TinyLM(torch.nn.Module):
    """Embedding, one block, an LM head; forward returns the fused head's loss."""

    def __init__(self, vocab, dim):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.block = torch.nn.Linear(dim, dim)
        self.head = torch.nn.Linear(dim, vocab)

    def forward(self, tokens, labels):
        hidden = torch.tanh(self.block(self.embed(tokens).flatten(0, 1)))
        return fusedloss.lm_head_cross_entropy(self.head, hidden, labels.flatten(),
                                               label_smoothing=0.1)


def _fsdp_tp_training(rank, world):
    """A 2 x 2 mesh ("dp", "tp"): the head ColwiseParallel on "tp" (V=13: 7/6 rows, then
    FSDP shards those on "dp"), every module fully_shard on "dp", each dp rank its own
    batch. After 3 SGD steps every weight equals single-process training (F.cross_entropy
    on the whole head's logits) on the concatenated batch, float64. The same number of
    ignored labels on each dp rank, so FSDP's average of the ranks' means is the mean."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    v, d = 13, 8

    def model():
        torch.manual_seed(0)
        return TinyLM(v, d).double()

    torch.manual_seed(1)
    tokens = torch.randint(0, v, (2, 3, 4))  # (dp rank, batch, sequence)
    labels = torch.randint(0, v, (2, 3, 4))
    labels[:, 1, 2] = -100
    ref = model()
    opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        hidden = torch.tanh(ref.block(ref.embed(tokens.flatten())))
        F.cross_entropy(ref.head(hidden), labels.flatten(), label_smoothing=0.1).backward()
        opt.step()

    ours = model()
    parallelize_module(ours.head, mesh["tp"], ColwiseParallel(output_layouts=Replicate()))
    for part in (ours.embed, ours.block, ours.head, ours):
        fully_shard(part, mesh=mesh["dp"])
    opt = torch.optim.SGD(ours.parameters(), lr=0.5)
    dp = mesh["dp"].get_local_rank()
    for _ in range(3):
        opt.zero_grad()
        ours(tokens[dp], labels[dp]).backward()
        opt.step()
    assert ours.head.weight.device_mesh.mesh_dim_names == ("dp", "tp")
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        assert_close(p.full_tensor(), q.detach(), msg=lambda m, name=name: f"{name}: {m}")


def test_fsdp_tensor_parallel_training():
    run_ranks(_fsdp_tp_training, 4)


def test_fsdp_tp_example_runs_under_torchrun():
    """benchmarks/fsdp_tp_example.py as the README runs it: 4 gloo ranks on this CPU, the
    script checking itself against one process."""
    root = pathlib.Path(__file__).resolve().parents[1]
    torchrun = shutil.which("torchrun")
    cmd = [torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(root), *filter(None, [os.environ.get("PYTHONPATH")])]))
    proc = subprocess.run([*cmd, "--nproc-per-node", "4",
                           str(root / "benchmarks" / "fsdp_tp_example.py")],
                          capture_output=True, text=True, timeout=300, cwd=root, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "FSDP x TP matches a single process (4 ranks: dp=2 x tp=2" in proc.stdout
    assert proc.stdout.count("FSDP x TP, step") == 5

