"""SigLIP against open_clip's SigLipLoss formula (the N x N logits), written here."""
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import fusedloss
from conftest import assert_close, assert_matches
from contract import LossContract, Sample
from fusedloss import reference
from fusedloss import siglip as siglip_module


def open_clip_formula(image, text, logit_scale, logit_bias, reduction="mean"):
    """open_clip's SigLipLoss from its definition; "sum" and "none" (each image's sum
    over the texts) are fusedloss's."""
    logits = logit_scale * image @ text.T + logit_bias
    n = image.shape[0]
    labels = 2 * torch.eye(n, dtype=logits.dtype, device=logits.device) - 1
    per_pair = -F.logsigmoid(labels * logits)
    return {"mean": per_pair.sum() / n, "sum": per_pair.sum(), "none": per_pair.sum(1)}[
        reduction]


def make(n, d, dtype, device, scale=10.0, bias=-10.0, param_shape=()):
    """Unit features (as SigLIP's) and the scalars at SigLIP's initialisation."""
    image = F.normalize(torch.randn(n, d, dtype=torch.float64), dim=1).to(dtype).to(device)
    text = F.normalize(torch.randn(n, d, dtype=torch.float64), dim=1).to(dtype).to(device)
    s = torch.full(param_shape, scale, dtype=dtype, device=device)
    b = torch.full(param_shape, bias, dtype=dtype, device=device)
    return image, text, s, b


def leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


@pytest.fixture
def tiles(monkeypatch):
    """Set the tile budget (values) for the tensors' device type, and the reference's
    chunk (pairs) to the same."""
    def set_budget(device, values):
        monkeypatch.setitem(siglip_module.TILE_ELEMENTS, torch.device(device).type, values)
        monkeypatch.setattr(reference, "SIGLIP_CHUNK_PAIRS", values)
    return set_budget


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("n, d", [(1, 4), (6, 5), (37, 21)], ids=str)
@pytest.mark.parametrize("param_shape", [(), (1,)], ids=["0-dim", "(1,)"])
def test_matches_open_clip(backend, device, n, d, param_shape, reduction):
    a = leaves(*make(n, d, torch.float64, device, param_shape=param_shape))
    b = leaves(*a)
    ours = fusedloss.siglip_loss(*a, reduction=reduction, backend=backend)
    expected = open_clip_formula(*b, reduction)
    assert_matches(ours, expected, a, b)
    assert [t.grad.shape for t in a[2:]] == [torch.Size(param_shape)] * 2


# (N, tile budget in values): 1 x 1 tiles; 2 x 3 tiles (23 rows leave a tail of 1, 23
# columns a tail of 2); 5 x 4 (tails of 3 and 3); 3 x 3 (tails of 3 and 3); one 23 x 23
# tile; a budget above N^2. The reference's chunks: 1 row up to budget 20, then 4 rows (a
# tail of 3), then all 23.
@pytest.mark.parametrize("n, budget", [(7, 1), (23, 6), (23, 20), (23, 100), (23, 529),
                                       (23, 10_000)])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_tile_boundaries(backend, device, tiles, n, budget, reduction):
    tiles(device, budget)
    rows, cols = siglip_module.tile_shape(n, n, device.type)
    assert rows * cols <= budget
    a = leaves(*make(n, 7, torch.float64, device, scale=3.0, bias=-2.0))
    b = leaves(*a)
    ours = fusedloss.siglip_loss(*a, reduction=reduction, backend=backend)
    assert_matches(ours, open_clip_formula(*b, reduction), a, b)


def test_float32_and_saturated_logits(backend, device):
    """float32 at float32 tolerance, with logits of +-hundreds (unnormalised features and
    a large scale): no overflow, and every gradient finite."""
    image, text, s, b = make(19, 16, torch.float32, device, scale=30.0, bias=-4.0)
    image = image * 5
    a, b64 = leaves(image, text, s, b), leaves(*(t.double() for t in (image, text, s, b)))
    ours = fusedloss.siglip_loss(*a, backend=backend)
    expected = open_clip_formula(*b64)
    assert expected > 10  # saturated: some logits are far from 0
    assert_close(ours, expected, torch.float32)
    ours.backward()
    expected.backward()
    for x, y in zip(a, b64):
        assert torch.isfinite(x.grad).all()
        assert_close(x.grad, y.grad, torch.float32)


def test_frozen_tower_and_constant_scalars(backend, device):
    """Only the image features learn (a frozen text tower, as in LiT); logit_scale and
    logit_bias given as Python numbers."""
    image, text, _, _ = make(9, 6, torch.float64, device)
    a, b = image.clone().requires_grad_(), image.clone().requires_grad_()
    ours = fusedloss.siglip_loss(a, text, 10.0, -10.0, reduction="sum", backend=backend)
    expected = open_clip_formula(b, text, 10.0, -10.0, "sum")
    assert_matches(ours, expected, [a], [b])


def test_no_grad_forward(backend, device):
    image, text, s, b = make(8, 5, torch.float64, device)
    with torch.no_grad():
        ours = fusedloss.siglip_loss(image, text, s, b, backend=backend)
    assert_close(ours, open_clip_formula(image, text, s, b))


def test_module(backend, device):
    m = fusedloss.SigLipLoss(reduction="sum", backend=backend)
    assert repr(m) == f"SigLipLoss(reduction='sum', backend={backend!r})"
    a = leaves(*make(7, 5, torch.float64, device))
    b = leaves(*a)
    assert_matches(m(*a), open_clip_formula(*b, "sum"), a, b)


def test_module_compiled_with_learnt_scalars(kernel_backend, device):
    """torch.compile(fullgraph=True) with logit_scale / logit_bias as parameters (open_clip
    passes logit_scale.exp())."""
    image, text, _, _ = make(10, 8, torch.float32, device)
    log_scale = torch.nn.Parameter(torch.tensor(2.3, device=device))
    bias = torch.nn.Parameter(torch.tensor(-10.0, device=device))
    loss_fn = fusedloss.SigLipLoss(backend=kernel_backend)
    x = image.clone().requires_grad_()
    compiled = torch.compile(lambda x: loss_fn(x, text, log_scale.exp(), bias), fullgraph=True)
    loss = compiled(x)
    loss.backward()
    ls, bb, xx = (t.detach().double().requires_grad_() for t in (log_scale, bias, x))
    expected = open_clip_formula(xx, text.double(), ls.exp(), bb)
    expected.backward()
    assert_close(loss, expected, torch.float32)
    for ours, theirs in ((x, xx), (log_scale, ls), (bias, bb)):
        assert_close(ours.grad, theirs.grad, torch.float32)


def test_memory_stays_tiled():
    """No allocation of the fused CPU path comes near N x N values (the eager formula's
    logits): the largest is a gradient or a tile."""
    if "cpu" not in fusedloss.available_backends("cpu"):
        pytest.skip("the C++ extension is not built here")
    n, d = 2048, 16
    a = leaves(*make(n, d, torch.float32, "cpu"))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                profile_memory=True) as prof:
        fusedloss.siglip_loss(*a, backend="cpu").backward()
    largest = max(e.cpu_memory_usage for e in prof.events())
    n_by_n = n * n * 4
    tile = 4 * min(siglip_module.TILE_ELEMENTS["cpu"], n * n)
    assert 0 < largest <= max(tile, n * d * 4) < n_by_n
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                profile_memory=True) as prof:
        open_clip_formula(*leaves(*a)).backward()
    assert max(e.cpu_memory_usage for e in prof.events()) >= n_by_n  # the check can fail


class LiveBytes(TorchDispatchMode):
    """The bytes of the tensors the ops create while they live, and their peak (`peak`):
    the CPU allocator keeps no peak of its own. A storage counts from the op that creates
    it until it is freed; outputs sharing an input's storage (views, in place) add
    nothing. Workspace an op frees before returning is not seen."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.counted = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = lambda tree: [t for t in torch.utils._pytree.tree_leaves(tree)  # noqa: E731
                                if isinstance(t, torch.Tensor)]
        inputs = {t.untyped_storage().data_ptr() for t in tensors((args, kwargs))}
        for t in tensors(out):
            storage = t.untyped_storage()
            ptr, size = storage.data_ptr(), storage.nbytes()
            if size and ptr not in inputs and ptr not in self.counted:
                self.counted.add(ptr)
                self.live += size
                self.peak = max(self.peak, self.live)
                weakref.finalize(storage, self._freed, ptr, size)
        return out

    def _freed(self, ptr, size):
        self.counted.discard(ptr)
        self.live -= size


def test_reference_memory_stays_chunked(monkeypatch):
    """The reference's fwd+bwd (the oracle, and the fallback without the extension) holds
    a few chunks and the gradients, never the N x N logits: autograd keeps no chunk's
    logits, the backward recomputes them."""
    n, d, rows = 2048, 16, 32
    monkeypatch.setattr(reference, "SIGLIP_CHUNK_PAIRS", rows * n)
    a = leaves(*make(n, d, torch.float32, "cpu"))
    with LiveBytes() as mem:
        fusedloss.siglip_loss(*a, backend="reference").backward()
    chunk, n_by_n, features = rows * n * 4, n * n * 4, n * d * 4
    # Measured: about 7 chunks, the gradients included (a chunk's temporaries, kept for
    # its backward); in one chunk that is 6 N x N.
    assert 0 < mem.peak <= 8 * chunk + 4 * features < n_by_n / 4, mem.peak
    monkeypatch.setattr(reference, "SIGLIP_CHUNK_PAIRS", n * n)  # one chunk: N x N
    with LiveBytes() as mem:
        fusedloss.siglip_loss(*leaves(*a), backend="reference").backward()
    assert mem.peak >= n_by_n  # the check can fail


def test_chunked_reference_second_order_and_func(backend, device, tiles):
    """With the reference in chunks (of 2 rows here): double backward (the kernel ops'
    create_graph differentiates the reference), torch.func.grad and vmap (which run the
    reference on every backend)."""
    tiles(device, 10)
    a = leaves(*make(5, 3, torch.float64, device, scale=3.0, bias=-2.0, param_shape=(1,)))
    f = lambda *t: fusedloss.siglip_loss(*t, reduction="none", backend=backend)  # noqa: E731
    with fusedloss.reusable_graph():
        assert torch.autograd.gradgradcheck(f, a)
    grads = torch.func.grad(lambda *t: f(*t).sum(), argnums=(0, 1, 2, 3))(*a)
    for g, e in zip(grads, torch.autograd.grad(open_clip_formula(*a, "none").sum(), a)):
        assert_close(g, e)
    batch = [torch.stack([t.detach(), t.detach().flip(0)]) for t in a]
    assert_close(torch.func.vmap(f)(*batch),
                 torch.stack([open_clip_formula(*(t[i] for t in batch), "none")
                              for i in range(2)]))


def test_not_initialized_process_group():
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        pytest.skip("a process group exists in this process")
    image, text, s, b = make(4, 3, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="not initialized"):
        fusedloss.siglip_loss(image, text, s, b, process_group=object())


class TestSigLipContract(LossContract):
    fn = fusedloss.siglip_loss
    module = fusedloss.SigLipLoss
    ops = ("siglip", "siglip_tile")
    half_slack = 1e-3

    def sample(self, device, dtype, n=13, d=9):
        image, text, s, b = make(n, d, torch.float64, device, scale=6.0, bias=-3.0,
                                 param_shape=(1,))
        # Reduction "none": the backward runs the tiles again, each row's gradient as its
        # weight (the reduced losses are checked against the formula above).
        return Sample(tuple(t.to(dtype).requires_grad_() for t in (image, text, s, b)),
                      dict(reduction="none"))

    def gradcheck_sample(self, device):
        return self.sample(device, torch.float64, n=5, d=4)

    def expected(self, image, text, logit_scale, logit_bias, *, reduction):
        return open_clip_formula(image, text, logit_scale, logit_bias, reduction)

    def torch_equivalent(self, image, text, logit_scale, logit_bias, *, reduction):
        if image.device.type == "cpu" and image.dtype == torch.float16:
            # No float16 matmul on some CPUs: torch's float32 result, rounded to float16.
            f = lambda t: t.float()  # noqa: E731
            return self.expected(f(image), f(text), f(logit_scale), f(logit_bias),
                                 reduction=reduction).half()
        return self.expected(image, text, logit_scale, logit_bias, reduction=reduction)

    def op_samples(self, device):
        image, text, s, b = make(5, 4, torch.float32, device, scale=4.0, bias=-1.0)
        more_texts = F.normalize(torch.randn(9, 4, device=device), dim=1)
        common = dict(image=image.requires_grad_(), text=text.requires_grad_(),
                      logit_scale=s.requires_grad_(), logit_bias=b.requires_grad_(),
                      row_weight=None, loss_scale=torch.tensor(0.2, device=device),
                      diagonal=0, reduction=1, block_rows=2, block_cols=3, grad_image=True,
                      grad_text=True, grad_logit_scale=True, grad_logit_bias=True)
        tile = dict(logit_scale=torch.tensor(4.0, device=device),
                    logit_bias=torch.tensor([-1.0], device=device),
                    loss_scale=torch.tensor(0.5, device=device))
        return [
            ("siglip", common),
            # Five images against nine texts, positives from column 3 (a rank's share):
            # reduction none, row weights, some gradients only.
            ("siglip", dict(common, text=more_texts, diagonal=3, reduction=0,
                            row_weight=torch.rand(5, device=device), loss_scale=torch.ones(
                                (), device=device), grad_text=False, grad_logit_bias=False)),
            ("siglip", dict(common, reduction=2, grad_image=False, grad_text=False,
                            grad_logit_scale=False, grad_logit_bias=False)),
            ("siglip_tile", dict(tile, dots=torch.randn(6, 7, device=device), row_weight=None,
                                 diagonal=1, compute_grad=True)),
            ("siglip_tile", dict(tile, dots=torch.randn(4, 3, device=device),
                                 row_weight=torch.rand(4, device=device), diagonal=-2,
                                 compute_grad=False)),
        ]

    def bad_inputs(self, device):
        image, text, s, b = make(4, 3, torch.float32, device)
        meta = torch.device("meta")
        return dict(image_features=image, text_features=text, logit_scale=s,
                    logit_bias=b), [
            (dict(text_features=torch.randn(4, 5, device=device)), ValueError,
             "feature dimension"),
            (dict(text_features=text[:3]), ValueError, "text_features"),
            (dict(image_features=image[None]), ValueError, "image_features"),
            (dict(image_features=image.long()), TypeError, "image_features"),
            (dict(text_features=text.double()), TypeError, "text_features"),
            (dict(text_features=text.to(meta)), ValueError, "text_features"),
            (dict(logit_scale=torch.ones(2, device=device)), ValueError, "logit_scale"),
            (dict(logit_scale=torch.ones(1, 1, device=device)), ValueError, "logit_scale"),
            (dict(logit_scale=torch.ones((), dtype=torch.long, device=device)), TypeError,
             "logit_scale"),
            (dict(logit_scale="10"), TypeError, "logit_scale"),
            (dict(logit_bias=torch.zeros(3, device=device)), ValueError, "logit_bias"),
            (dict(logit_bias=torch.zeros((), device=meta)), ValueError, "logit_bias"),
            (dict(logit_bias=float("nan")), ValueError, "logit_bias"),
            (dict(reduction="avg"), ValueError, "reduction"),
            (dict(exchange="tree"), ValueError, "exchange"),
        ]
