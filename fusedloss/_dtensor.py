"""DTensor inputs: unwrap them, run the loss's own path, and wrap the outputs again.

A loss whose logits come as a DTensor (tensor parallel: ColwiseParallel gives logits
sharded on the vocabulary) runs the vocab-parallel path on the group of the mesh dimension
that shards the classes; logits replicated on every mesh dimension run the ordinary local
kernels. The slice offsets are those of the local tensors in rank order (DTensor's
torch.chunk layout, the last slices possibly smaller or empty): nothing is exchanged to
find them. Nothing here knows a loss: the loss passes itself (fn) in.
"""
try:
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
except ImportError:  # a torch without torch.distributed
    DTensor = None


def is_dtensor(*tensors):
    return DTensor is not None and any(isinstance(t, DTensor) for t in tensors)


def _shard_dim(placement, ndim):
    return placement.dim % ndim if isinstance(placement, Shard) else None


def class_group(x, class_dim, what):
    """(mesh, the process group of the mesh dimension sharding x's classes, or None).
    Refuses what the loss cannot compute exactly: partial logits, the classes sharded on
    two mesh dimensions, and other dimensions sharded (not yet supported)."""
    mesh, placements = x.device_mesh, x.placements
    if any(isinstance(p, Partial) for p in placements):
        raise ValueError(f"fusedloss.{what}: the input is a Partial DTensor (pending sums); "
                         "redistribute it to Shard or Replicate placements first")
    sharding = [i for i, p in enumerate(placements) if _shard_dim(p, x.dim()) == class_dim]
    if len(sharding) > 1:
        raise ValueError(f"fusedloss.{what}: the input's classes are sharded on mesh "
                         f"dimensions {sharding}; shard them on one mesh dimension")
    other = [p for p in placements if isinstance(p, Shard) and
             _shard_dim(p, x.dim()) != class_dim]
    if other:
        raise NotImplementedError(f"fusedloss.{what}: a DTensor input sharded on a "
                                  f"dimension other than the classes ({other}) is not "
                                  "supported yet; replicate it on that mesh dimension")
    return mesh, (mesh.get_group(sharding[0]) if sharding else None)


def replicated_local(value, mesh, name, what):
    """A DTensor argument replicated on every mesh dimension, as its local tensor (which
    carries its gradient); anything else as it is."""
    if not is_dtensor(value):
        return value
    if value.device_mesh != mesh or not all(isinstance(p, Replicate) for p in value.placements):
        raise ValueError(f"fusedloss.{what}: {name} must be a plain tensor or a DTensor "
                         f"replicated on the input's mesh, got placements {value.placements}")
    return value.to_local()


def call(fn, x, class_dim, what, tensors, kwargs):
    """fn(local x, **tensors as local tensors, **kwargs) with the process group of the
    class-sharding mesh dimension, its tensor outputs wrapped as replicated DTensors."""
    if not is_dtensor(x):
        raise TypeError(f"fusedloss.{what}: the input must be a DTensor when another "
                        "argument is one")
    if kwargs.get("process_group") is not None:
        raise ValueError(f"fusedloss.{what}: pass a DTensor input or a process_group, not "
                         "both (the DTensor's mesh names the group)")
    mesh, group = class_group(x, class_dim, what)
    local = {name: replicated_local(v, mesh, name, what) for name, v in tensors.items()}
    out = fn(x.to_local(), **local, **dict(kwargs, process_group=group))
    wrap = lambda t: DTensor.from_local(t, mesh, [Replicate()] * mesh.ndim)  # noqa: E731
    return tuple(wrap(t) for t in out) if isinstance(out, tuple) else wrap(out)

