"""DTensor inputs: unwrap them, run the loss's own path, and wrap the outputs again.

A loss whose logits come as a DTensor (tensor parallel: ColwiseParallel gives logits
sharded on the vocabulary) runs the vocab-parallel path on the group of the mesh dimension
that shards the classes; logits replicated on every mesh dimension run the ordinary local
kernels. The slice offsets are those of the local tensors in rank order (DTensor's
torch.chunk layout, the last slices possibly smaller or empty): nothing is exchanged to
find them. Nothing here knows a loss: the loss passes itself (fn) in.
"""
import torch
import torch.distributed as dist

from .vocab_parallel import Slice

try:
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
except ImportError:  # a torch without torch.distributed
    DTensor = None


def is_dtensor(*tensors):
    return DTensor is not None and any(isinstance(t, DTensor) for t in tensors)


def _shard_dim(placement, ndim):
    return placement.dim % ndim if isinstance(placement, Shard) else None


def class_group(x, class_dim, what):
    """(mesh, the process group of the mesh dimension sharding x's classes or None, the
    mesh dimensions sharding its batch, dimension 0). Refuses what the loss cannot compute
    exactly: partial logits, the classes sharded on two mesh dimensions, other dimensions
    sharded."""
    mesh, placements = x.device_mesh, x.placements
    if any(isinstance(p, Partial) for p in placements):
        raise ValueError(f"fusedloss.{what}: the input is a Partial DTensor (pending sums); "
                         "redistribute it to Shard or Replicate placements first")
    odd = [p for p in placements if type(p) not in (Shard, Replicate)]
    if odd:  # e.g. _StridedShard, which flattening a sequence-sharded tensor gives
        raise NotImplementedError(
            f"fusedloss.{what}: the input's placements {odd} are not supported: only Shard "
            "and Replicate (flattening a (B, T, V) tensor sharded on T gives a strided "
            "sharding; redistribute it, or flatten the local tensors)")
    dims = [_shard_dim(p, x.dim()) for p in placements]
    sharding = [i for i, d in enumerate(dims) if d == class_dim]
    if len(sharding) > 1:
        raise ValueError(f"fusedloss.{what}: the input's classes are sharded on mesh "
                         f"dimensions {sharding}; shard them on one mesh dimension")
    batch = [i for i, d in enumerate(dims) if d == 0 and class_dim != 0]
    other = [placements[i] for i, d in enumerate(dims)
             if d is not None and d != class_dim and i not in batch]
    if other:
        raise NotImplementedError(f"fusedloss.{what}: a DTensor input sharded on a "
                                  f"dimension other than the batch and the classes ({other}) "
                                  "is not supported yet; replicate it on that mesh dimension")
    return mesh, (mesh.get_group(sharding[0]) if sharding else None), batch


def class_slice(x, class_dim, mesh, group, dim, reduce_input_grad=True):
    """The vocab-parallel slice of this rank's local tensor, from the spec alone (no
    exchange, no host read): DTensor's Shard splits V in chunks of ceil(V / P), in rank
    order, the last ones possibly smaller or empty."""
    if group is None:
        return None
    v, world = x.shape[class_dim], mesh.size(dim)
    chunk = -(-v // world)
    offset = min(mesh.get_local_rank(dim) * chunk, v)
    n_local = x.to_local().shape[class_dim]
    if n_local != max(0, min(chunk, v - offset)):  # not torch.chunk's layout: ask the ranks
        return group
    return Slice(group, offset, v, n_local, reduce_input_grad)


def replicated_local(value, mesh, name, what):
    """A DTensor argument replicated on every mesh dimension, as its local tensor (which
    carries its gradient); anything else as it is."""
    if not is_dtensor(value):
        return value
    if value.device_mesh != mesh or not all(isinstance(p, Replicate) for p in value.placements):
        raise ValueError(f"fusedloss.{what}: {name} must be a plain tensor or a DTensor "
                         f"replicated on the input's mesh, got placements {value.placements}")
    return value.to_local()


def _local(value, mesh, name, what, rows):
    """A DTensor argument as its local tensor: replicated, or, for the per-position
    arguments (`rows`: the batch's mesh dimensions), sharded on its dimension 0 as the
    input's batch; a plain tensor as it is (for a sharded batch: this rank's rows)."""
    if not is_dtensor(value) or not rows:
        return replicated_local(value, mesh, name, what)
    want = tuple(Shard(0) if i in rows else Replicate() for i in range(mesh.ndim))
    if value.device_mesh != mesh or tuple(value.placements) != want:
        raise ValueError(f"fusedloss.{what}: {name} must be placed as the input's batch, "
                         f"{want}, got {value.placements}")
    return value.to_local()


def _placed_as(value, x):
    """A DTensor of x's shape, mesh and placements (probability targets sharded as the
    logits): its local tensor is this rank's slice of x's."""
    return is_dtensor(value) and value.shape == x.shape and value.device_mesh == x.device_mesh \
        and tuple(value.placements) == tuple(x.placements)


def call(fn, x, class_dim, what, tensors, kwargs, per_position=(), denominator=None):
    """fn(local x, **tensors as local tensors, **kwargs) with the process group of the
    class-sharding mesh dimension. Its outputs as DTensors: a reduced loss replicated (the
    mean divided by the global denominator: `denominator(**local tensors)` summed over the
    batch's mesh dimensions), per-position outputs sharded as the batch."""
    if not is_dtensor(x):
        raise TypeError(f"fusedloss.{what}: the input must be a DTensor when another "
                        "argument is one")
    if kwargs.get("process_group") is not None:
        raise ValueError(f"fusedloss.{what}: pass a DTensor input or a process_group, not "
                         "both (the DTensor's mesh names the group)")
    mesh, group, batch = class_group(x, class_dim, what)
    dim = next((i for i, p in enumerate(x.placements)
                if _shard_dim(p, x.dim()) == class_dim), None)
    group = class_slice(x, class_dim, mesh, group, dim)
    local = {name: v.to_local() if _placed_as(v, x) else
             _local(v, mesh, name, what, batch if name in per_position else ())
             for name, v in tensors.items()}
    reduction = kwargs.get("reduction", "mean")
    if not batch:
        return _wrap(fn(x.to_local(), **local, **dict(kwargs, process_group=group)), mesh)
    out = fn(x.to_local(), **local, **dict(kwargs, process_group=group,
                                           reduction="sum" if reduction == "mean" else reduction))
    outs = list(out) if isinstance(out, tuple) else [out]
    rows = [Shard(0) if i in batch else Replicate() for i in range(mesh.ndim)]
    if reduction != "none":
        loss = outs[0]
        if reduction == "mean":  # the global denominator: a few numbers cross ranks
            total = torch.as_tensor(denominator(**local), dtype=loss.dtype,
                                    device=loss.device).clone()
            for i in batch:
                dist.all_reduce(total, group=mesh.get_group(i))
            loss = loss / total
        partial = [Partial() if i in batch else Replicate() for i in range(mesh.ndim)]
        outs[0] = DTensor.from_local(loss, mesh, partial).redistribute(
            mesh, [Replicate()] * mesh.ndim)
    outs[1 if reduction != "none" else 0:] = [
        DTensor.from_local(t, mesh, rows) for t in outs[1 if reduction != "none" else 0:]]
    return tuple(outs) if isinstance(out, tuple) else outs[0]


def _wrap(out, mesh):
    """The loss's outputs (a tensor, a tuple or a named tuple; None kept) as DTensors
    replicated on the mesh: every rank computed the same values."""
    def wrap(t):
        return DTensor.from_local(t, mesh, [Replicate()] * mesh.ndim) if t is not None else None
    if not isinstance(out, tuple):
        return wrap(out)
    values = [wrap(t) for t in out]
    return type(out)(*values) if hasattr(out, "_fields") else tuple(values)


def call_head(fn, x, weight, bias, what, tensors, kwargs):
    """fn(local x, local weight, ..., linear_bias=local bias) for a DTensor LM head: its
    weight Shard(0) along one mesh dimension is vocab-parallel on that dimension's group,
    replicated it is a local head. The input must be a DTensor on the weight's mesh,
    replicated or sharded on its rows (sequence parallel: gathered here, its gradient
    coming back sharded as it was); the other tensors plain or replicated."""
    if kwargs.get("process_group") is not None:
        raise ValueError(f"fusedloss.{what}: pass DTensors or a process_group, not both "
                         "(the DTensors' mesh names the group)")
    if not is_dtensor(x) or not is_dtensor(weight):
        raise ValueError(
            f"fusedloss.{what}: input and linear_weight must both be DTensors (or both plain "
            "tensors). A plain input with a DTensor weight is refused because an FSDP-sharded "
            "weight (Shard(0) on the data-parallel mesh) looks just like a vocab-sharded one: "
            "compute the loss inside the head's forward, where FSDP gathers the weight, or "
            "pass the input as a DTensor on the weight's mesh")
    mesh = weight.device_mesh
    if any(isinstance(p, Partial) for p in (*weight.placements, *x.placements)):
        raise ValueError(f"fusedloss.{what}: a Partial DTensor input or weight; redistribute "
                         "it to Shard or Replicate placements first")
    vocab = [i for i, p in enumerate(weight.placements) if _shard_dim(p, weight.dim()) == 0]
    if len(vocab) > 1 or any(isinstance(p, Shard) and _shard_dim(p, weight.dim()) != 0
                             for p in weight.placements):
        raise ValueError(f"fusedloss.{what}: linear_weight must be sharded on its rows (the "
                         f"vocabulary) along at most one mesh dimension, got "
                         f"{weight.placements}")
    if bias is not None and (not is_dtensor(bias) or bias.placements != weight.placements):
        raise ValueError(f"fusedloss.{what}: linear_bias must be a DTensor placed as "
                         f"linear_weight ({weight.placements})")
    if x.device_mesh != mesh or any(isinstance(p, Shard) and _shard_dim(p, x.dim()) != 0
                                    for p in x.placements):
        raise ValueError(f"fusedloss.{what}: input must be a DTensor on linear_weight's mesh, "
                         f"replicated or sharded on its rows, got {x.placements}")
    replicate = [Replicate()] * mesh.ndim
    group, grad_placements = None, replicate
    if vocab:
        group = class_slice(weight, 0, mesh, mesh.get_group(vocab[0]), vocab[0],
                            reduce_input_grad=False)
        if isinstance(group, Slice):  # grad_input: each rank's share, pending their sum
            grad_placements = [Partial() if i == vocab[0] else Replicate()
                               for i in range(mesh.ndim)]
    # Rows sharded (sequence parallel): gathered. The backward of the redistribution sums
    # the ranks' shares of grad_input into each rank's rows: a reduce-scatter (for a
    # replicated input an all-reduce).
    x_local = x.redistribute(mesh, replicate).to_local(grad_placements=grad_placements)
    local = {}
    for name, v in tensors.items():
        if is_dtensor(v) and v.device_mesh == mesh and all(
                isinstance(p, Replicate) or _shard_dim(p, v.dim()) == 0 for p in v.placements):
            v = v.redistribute(mesh, replicate)  # rows sharded as the input's: gathered
        local[name] = replicated_local(v, mesh, name, what)
    out = fn(x_local, weight.to_local(), **local,
             **dict(kwargs, linear_bias=bias.to_local() if bias is not None else None,
                    process_group=group))
    return _wrap(out, mesh)

