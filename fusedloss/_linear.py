"""The chunk loop's pieces every fused linear op shares (linear_cross_entropy, linear_jsd,
linear_log_probs): how many rows a chunk takes, which rows run, and the head's gradients
accumulated chunk by chunk. The logits of a chunk, R x V, are the only buffer of the
vocabulary's size; the losses' own files hold their loops.
"""
import torch

from ._library import acc_dtype

# Bytes of one chunk of logits (which also holds its gradient). On a CPU, 15 MiB keeps the
# memory beyond the gradients at or below torch's chunked path (which picks 128 rows for
# N=4096, D=512, V=32000 float32) while the matmuls stay within a few % of their speed
# at twice the chunk; fewer rows cost more: each chunk's grad_weight update reads and
# writes the whole V x D accumulator. On a GPU the chunk only has to keep the matmuls
# large.
CHUNK_BYTES = {"cpu": 15 << 20, "cuda": 1 << 30}


def default_chunk_size(n_rows, n_features, n_logits, dtype, device_type,
                       budget=CHUNK_BYTES):
    """Rows per chunk: as many as fit `budget` bytes of logits (per device type; at least
    16, a multiple of 8 when smaller than N, so that the matmuls stay efficient)."""
    per_row = n_logits * max(dtype.itemsize, 4 if device_type == "cpu" else 0)
    rows = budget.get(device_type, budget["cuda"]) // max(per_row, 1)
    rows = max(16, rows // 8 * 8)
    # Under torch.compile the bound alone (the chunk loops clamp it): min(N, rows) would
    # make a dynamic N a constant of the graph.
    return rows if torch.compiler.is_compiling() else max(1, min(n_rows, rows))


def row_chunks(x, target, ignore_index, chunk_size, positions=1, skip_ignored=True):
    """The rows of x to run, chunk by chunk: slices of all of them, or, on CPU tensors
    with `skip_ignored`, index tensors of the rows with a counted class-index target only
    (then True). The others need no logits: their outputs and gradients are exactly 0
    (reading the targets costs no synchronisation on the CPU; on a GPU it would, so all
    rows run)."""
    n = x.shape[0]
    if (skip_ignored and x.device.type == "cpu" and not target.is_floating_point()
            and n > 0):
        counted = (target.view(n, positions) != ignore_index).any(1)
        if not bool(counted.all()):
            keep = counted.nonzero().view(-1)
            return [keep[i:i + chunk_size] for i in range(0, keep.numel(), chunk_size)], True
    return [slice(i, min(n, i + chunk_size)) for i in range(0, n, chunk_size)], False


def _add_product(acc, a, b, scratch, first):
    """acc += a @ b (acc = a @ b for the first chunk: no zero-filled accumulator), with acc
    in float32 when a and b are half: one matmul into it on CUDA, elsewhere a float32
    matmul of `a` upcast into `scratch` (an O(chunk x V) buffer)."""
    beta = 0 if first else 1
    if acc.dtype == a.dtype:
        return torch.addmm(acc, a, b, beta=beta, out=acc)
    if a.is_cuda and hasattr(torch.ops.aten.addmm, "dtype_out"):
        return torch.ops.aten.addmm.dtype_out(acc, a, b, acc.dtype, beta=beta, out=acc)
    up = scratch[:a.numel()].view(a.shape[1], a.shape[0]).t().copy_(a)
    return torch.addmm(acc, up, b.to(acc.dtype), beta=beta, out=acc)


class HeadGradients:
    """The gradients of a linear head (logits = x @ w.T + b) over chunks of rows, for the
    fused linear losses: add(g, xc, rows) takes a chunk's d loss / d logits g; grad_weight
    and grad_bias accumulate in the outputs themselves, or in float32 for half weights
    (then finish() copies them out); grad_input is written per chunk. want: (grad_input,
    grad_weight, grad_bias) asked for."""

    def __init__(self, w, outputs, want, chunk_rows):
        self.w, (self.grad_x, self.grad_w, self.grad_b), self.want = w, outputs, want
        self.acc = acc_dtype(w.dtype)
        self.gw = (self.grad_w if self.acc == w.dtype else
                   self.grad_w.new_empty(w.shape, dtype=self.acc)) if want[1] else None
        self.gb = (self.grad_b if self.acc == w.dtype else
                   self.grad_b.new_empty(w.shape[0], dtype=self.acc)) if want[2] else None
        self.scratch = torch.empty(chunk_rows * w.shape[0], dtype=torch.float32,
                                   device=w.device) \
            if want[1] and self.gw.dtype != w.dtype and not w.is_cuda else None
        self.first = True

    def add(self, g, xc, rows, gathered=False):
        """rows: the chunk's rows of x (a slice, or indices when `gathered`: then xc is
        their copy, which takes their grad_input)."""
        if self.want[1]:
            _add_product(self.gw, g.t(), xc, self.scratch, first=self.first)
        if self.want[2]:
            if self.first:
                torch.sum(g, 0, dtype=self.acc, out=self.gb)
            else:
                self.gb += g.sum(0, dtype=self.acc)
        if self.want[0]:  # last: a gathered chunk's rows of x are no longer needed
            if gathered:
                self.grad_x.index_copy_(0, rows, torch.mm(g, self.w, out=xc))
            else:
                torch.mm(g, self.w, out=self.grad_x[rows])
        self.first = False

    def finish(self):
        for acc, out in ((self.gw, self.grad_w), (self.gb, self.grad_b)):
            if acc is None:
                continue
            if self.first:  # no rows: zero gradients
                acc.zero_()
            if acc is not out:
                out.copy_(acc)


def in_forward_of(head, fn, input):
    """fn(input, head.weight, head.bias) run as `head`'s forward: head(input) with its
    forward replaced for the call. The hooks around a module's forward then see the head
    used, as for head(input): FSDP2 (fully_shard) all-gathers its weight before and
    reshards after, arms its backward to reduce-scatter the weight's gradient (and to
    gather the weight again where the backward needs it); DeepSpeed ZeRO-3 gathers it.
    accelerate's hooks (add_hook_to_module: cpu_offload, dispatch_model, device_map) wrap
    the forward itself, the original kept as `_old_forward`: that one is replaced, so
    that its hook moves the input to the head's device and loads an offloaded weight.
    The weight is read inside, where those hooks put it; `head.weight.full_tensor()`
    outside would skip the data-parallel gradient reduction."""
    if not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise TypeError(f"head must be a module with a weight (an nn.Linear LM head), got "
                        f"{type(head).__name__}")
    name = "_old_forward" if hasattr(head, "_hf_hook") and "_old_forward" in vars(head) \
        else "forward"
    had = head.__dict__.get(name)
    setattr(head, name, lambda x: fn(x, head.weight, getattr(head, "bias", None)))
    try:
        return head(input)
    except AssertionError as e:  # torch's tensor-parallel output hook, on the scalar loss
        if not getattr(head, "_distribute_module_applied", False):
            raise
        raise ValueError(
            "the head is tensor-parallel and its output hook redistributes what its forward "
            "returns, here the loss, to the logits' layout (ColwiseParallel's default "
            "output_layouts=Shard(-1)), which a loss does not have: parallelize the head "
            "with ColwiseParallel(output_layouts=Replicate()) (the fused loss never makes "
            "the logits, so nothing is gathered)") from e
    finally:
        if had is None:
            delattr(head, name)
        else:
            setattr(head, name, had)
