"""What the cross-rank code of every loss shares: the process group's own collectives
(gloo for CPU tensors, NCCL for CUDA ones), no communication layer of our own. Nothing here
knows a loss; the losses' cross-rank code (fusedloss/vocab_parallel.py, and the "across
ranks" sections of info_nce.py and siglip.py) imports it.
"""
import torch
import torch.distributed as dist


def check_group(group, tensor, what):
    """(world size, rank) of `group`, once it is sure to carry `tensor`'s device."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"fusedloss.{what}: process_group was given but torch.distributed "
                           "is not initialized (torch.distributed.init_process_group)")
    if tensor.device.type != "cuda" and dist.get_backend(group) == "nccl":
        raise RuntimeError(f"fusedloss.{what}: the process group runs nccl, which carries CUDA "
                           f"tensors only, and the input is on {tensor.device}; use a gloo "
                           "group for CPU tensors")
    return dist.get_world_size(group), dist.get_rank(group)


def exchange(values, group, device):
    """Every rank's few integers `values`, as a (world size, len(values)) int64 tensor."""
    mine = torch.tensor(values, dtype=torch.int64, device=device)
    out = mine.new_empty((dist.get_world_size(group), len(values)))
    dist.all_gather_into_tensor(out.view(-1), mine, group=group)
    return out


def check_agree(meta, names, what):
    """Raise alike on every rank where ranks disagree on a value that must match. Reading
    the exchanged values costs nothing on the CPU; on a GPU it would synchronise the
    host, so there the check is skipped (a mismatch then fails inside a collective)."""
    if meta.device.type != "cpu":
        return
    for j, name in enumerate(names):
        column = meta[:, j]
        if bool((column != column[0]).any()):
            raise ValueError(f"fusedloss.{what}: the ranks of process_group disagree on "
                             f"{name}: {column.tolist()}; it must be the same on every rank")


def first_order_only():
    """A backward run with create_graph=True asks for gradients these Functions cannot
    differentiate."""
    if torch.is_grad_enabled():
        raise RuntimeError("fusedloss: higher-order gradients (create_graph=True) are not "
                           "available with a process_group")


def all_reduce(t, group):
    dist.all_reduce(t, group=group)
    return t


class AllGather(torch.autograd.Function):
    """Every rank's rows, concatenated in rank order, with gradients: the backward sums
    each rank's gradient of the gathered rows and hands every rank its own (a
    reduce-scatter), so that gradients reach the rows' owners."""

    @staticmethod
    def forward(ctx, t, group):
        ctx.group = group
        out = t.new_empty((dist.get_world_size(group) * t.shape[0], *t.shape[1:]))
        dist.all_gather_into_tensor(out, t.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        first_order_only()  # the reduce-scatter is not differentiable
        out = grad.new_empty((grad.shape[0] // dist.get_world_size(ctx.group),
                              *grad.shape[1:]))
        dist.reduce_scatter_tensor(out, grad.contiguous(), group=ctx.group)
        return out, None


def ring_step(tensors, group, rank, world):
    """Send `tensors` to the next rank of the ring and receive the previous rank's."""
    if world == 1:
        return tensors
    nxt = dist.get_global_rank(group, (rank + 1) % world)
    prv = dist.get_global_rank(group, (rank - 1) % world)
    incoming = [torch.empty_like(t) for t in tensors]
    ops = [dist.P2POp(dist.isend, t.contiguous(), nxt, group) for t in tensors] + \
        [dist.P2POp(dist.irecv, t, prv, group) for t in incoming]
    for req in dist.batch_isend_irecv(ops):
        req.wait()
    return incoming
