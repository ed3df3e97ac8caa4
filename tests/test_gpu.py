"""Full-size checks that need a GPU: the triton and cuda backends in bf16/fp16/fp32 at real
vocabulary sizes, and one case with N*V > 2^31 elements (64-bit offsets); token log-probs
and entropy (from logits, over an LM head); an NCCL group of one rank running the
cross-rank paths; two training steps of a patched Llama and a TRL-style GRPO log-prob
step. Skipped, with the reason, on machines without CUDA; a backend named in
FUSEDLOSS_REQUIRE_BACKENDS fails instead of skipping. benchmarks/gpu_validate.sh runs
them on a bare GPU machine."""
import copy

import pytest
import torch
import torch.nn.functional as F

import fusedloss
from conftest import _available

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(params=["triton", "cuda"])
def gpu_backend(request):
    return _available(request.param)


def _max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


def _cross_entropy_no_worse_than_torch(backend, dtype, n, v):
    x = torch.randn(n, v, device="cuda", dtype=dtype) * 2
    t = torch.randint(0, v, (n,), device="cuda")
    t[::7] = -100
    kw = dict(label_smoothing=0.1, reduction="none")
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    xe = x.double().requires_grad_()
    ours = fusedloss.cross_entropy(xa, t, backend=backend, **kw)
    theirs = F.cross_entropy(xb, t, **kw)
    exact = F.cross_entropy(xe, t, **kw)
    g = torch.rand(n, device="cuda", dtype=torch.float64) + 0.5
    for out in (ours, theirs, exact):
        (out.double() * g).sum().backward()
    assert _max_err(ours, exact) <= 2 * _max_err(theirs, exact) + 1e-6
    assert _max_err(xa.grad, xe.grad) <= 2 * _max_err(xb.grad, xe.grad) + 1e-7


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n,v", [(4096, 32000), (1024, 128256), (333, 256000)])
def test_cross_entropy_full_size(gpu_backend, dtype, n, v):
    _cross_entropy_no_worse_than_torch(gpu_backend, dtype, n, v)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n,v", [(64, 1025), (61, 4099)])
def test_cross_entropy_long_rows_odd_sizes(gpu_backend, dtype, n, v):
    """Rows of more than 1024 classes, not a multiple of the vector width: the tails of the
    block-per-row kernels, at a size compute-sanitizer checks in seconds (enough rows that
    the largest error is not one lucky rounding)."""
    _cross_entropy_no_worse_than_torch(gpu_backend, dtype, n, v)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_focal_and_sigmoid_full_size(gpu_backend, dtype):
    x = torch.randn(2048, 32000, device="cuda", dtype=dtype)
    t = torch.randint(0, 32000, (2048,), device="cuda")
    ref = fusedloss.focal_loss(x.double(), t, gamma=2.0, backend="reference")
    ours = fusedloss.focal_loss(x, t, gamma=2.0, backend=gpu_backend)
    assert _max_err(ours, ref) < (2e-2 if dtype != torch.float32 else 1e-5) * ref.abs().item()
    y = (torch.rand(2048, 4096, device="cuda") > 0.9).to(dtype)
    xs = torch.randn(2048, 4096, device="cuda", dtype=dtype)
    ref = fusedloss.sigmoid_focal_loss(xs.double(), y.double(), reduction="mean",
                                       backend="reference")
    ours = fusedloss.sigmoid_focal_loss(xs, y, reduction="mean", backend=gpu_backend)
    assert _max_err(ours, ref) < (2e-2 if dtype != torch.float32 else 1e-5) * ref.abs().item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_info_nce_full_size(gpu_backend, dtype):
    q = F.normalize(torch.randn(8192, 768, device="cuda"), dim=1).to(dtype)
    k = F.normalize(torch.randn(8192, 768, device="cuda"), dim=1).to(dtype)
    ours = fusedloss.info_nce(q, k, temperature=0.05, symmetric=True, reduction="none",
                              backend=gpu_backend)
    ref = fusedloss.info_nce(q.double(), k.double(), temperature=0.05, symmetric=True,
                             reduction="none", backend="reference")
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    assert _max_err(ours, ref) < tol * ref.abs().max().item()


def test_cross_entropy_beyond_32bit_offsets(gpu_backend):
    """N*V > 2^31: the last rows start past 2^31 elements; checked against rows computed
    by torch on a slice."""
    n, v = 16400, 131072
    assert n * v > 2**31
    x = torch.randn(n, v, device="cuda", dtype=torch.bfloat16)
    t = torch.randint(0, v, (n,), device="cuda")
    xa = x.requires_grad_()
    loss = fusedloss.cross_entropy(xa, t, reduction="none", backend=gpu_backend)
    g = torch.zeros(n, device="cuda", dtype=loss.dtype)
    g[-3:] = 1
    (loss * g).sum().backward()
    tail = x.detach()[-3:].float().requires_grad_()
    expected = F.cross_entropy(tail, t[-3:], reduction="none")
    expected.sum().backward()
    torch.testing.assert_close(loss[-3:].float(), expected, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(xa.grad[-3:].float(), tail.grad, rtol=2e-2, atol=2e-3)


def _eager_log_probs(logits, t, temperature, upcast):
    """Token log-probs and entropy the way eager torch code computes them (TRL's
    selective_log_softmax, verl's torch path): the logits upcast to float32 first."""
    logp = torch.log_softmax((logits.float() if upcast else logits) / temperature, -1)
    counted = t != -100
    lp = torch.where(counted, logp.gather(-1, t.clamp(min=0)[:, None]).squeeze(-1), 0)
    return lp, torch.where(counted, -(logp.exp() * logp).sum(-1), 0)


def _log_probs_no_worse_than_torch(ours_of, inputs, t, temperature, objective=None):
    """ours_of(*leaves) -> (log-probs, entropy) against eager torch on the same inputs and
    on their float64 copies: outputs and every input's gradient (of `objective(lp, ent)`,
    by default a random weighing of both outputs) no worse than twice torch's error."""
    if objective is None:
        g, h = (torch.randn(t.shape[0], device="cuda", dtype=torch.float64) for _ in range(2))
        objective = lambda lp, ent: (lp.double() * g).sum() + (ent.double() * h).sum()  # noqa
    results = []
    for kind in ("ours", "torch", "exact"):
        leaves = [(a.double() if kind == "exact" else a.clone()).requires_grad_()
                  for a in inputs]
        if kind == "ours":
            lp, ent = ours_of(*leaves)
        else:
            logits = leaves[0] if len(leaves) == 1 else leaves[0] @ leaves[1].T
            lp, ent = _eager_log_probs(logits, t, temperature, upcast=kind == "torch")
        objective(lp, ent).backward()
        results.append((lp, ent, *(a.grad for a in leaves)))
    names = ("log_probs", "entropy", *(f"grad {i}" for i in range(len(inputs))))
    for name, ours, theirs, exact in zip(names, *results):
        err, torch_err = _max_err(ours, exact), _max_err(theirs, exact)
        assert err <= 2 * torch_err + 1e-6, f"{name}: {err:.3g} against torch's {torch_err:.3g}"


def _targets(n, v):
    t = torch.randint(0, v, (n,), device="cuda")
    t[::9] = -100
    return t


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_log_probs_full_size(gpu_backend, dtype):
    """Token log-probs and a differentiable entropy from the logits, at Qwen's vocabulary
    (the rows longer than any one-pass tile), no worse than twice eager torch's error."""
    n, v = 1024, 151936
    x = torch.randn(n, v, device="cuda", dtype=dtype) * 3
    t = _targets(n, v)

    def ours(logits):
        out = fusedloss.log_probs(logits, t, return_entropy=True, temperature=0.9,
                                  backend=gpu_backend)
        return out.log_probs, out.entropy
    _log_probs_no_worse_than_torch(ours, (x,), t, 0.9)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_linear_log_probs_full_size(gpu_backend, dtype):
    """Token log-probs and entropy over an LM head, gradients of the hidden states and the
    head included, no worse than twice eager torch's error on the same inputs."""
    n, d, v = 2048, 1024, 32000
    x = torch.randn(n, d, device="cuda", dtype=dtype)
    w = torch.randn(v, d, device="cuda", dtype=dtype) / d ** 0.5 * 3
    t = _targets(n, v)

    def ours(xs, ws):
        out = fusedloss.linear_log_probs(xs, ws, t, return_entropy=True, temperature=0.9,
                                         backend=gpu_backend)
        return out.log_probs, out.entropy
    _log_probs_no_worse_than_torch(ours, (x, w), t, 0.9)


# ------------------------------------------------------------------- NCCL, on one GPU
def _weighted_sum(outputs):
    """A fixed objective of every output (so that each one's gradient is checked)."""
    return sum((o.double() * torch.linspace(0.5, 1.5, o.numel(), device=o.device,
                                            dtype=torch.float64).view(o.shape)).sum()
               for o in outputs)


def _nccl_rank(rank, world, backends):
    """One rank of an NCCL group on this GPU. The cross-rank paths run their collectives
    through NCCL; with one rank each must equal the single-device call, outputs and
    gradients: the vocab-parallel losses and log-probs (process_group=), DTensor logits
    sharded on the classes over a CUDA mesh, InfoNCE's and SigLIP's gathered negatives."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from conftest import assert_close
    assert dist.get_backend() == "nccl" and world == 1
    group = dist.group.WORLD
    mesh = init_device_mesh("cuda", (world,))
    torch.manual_seed(0)
    n, d, v = 512, 256, 32000

    def check(name, dtype, inputs, fn):
        """fn(leaves, across) -> outputs; across=True: the cross-rank call."""
        one, ours = ([a.clone().requires_grad_() for a in inputs] for _ in range(2))
        expected, got = fn(one, False), fn(ours, True)
        (_weighted_sum(expected) + _weighted_sum(got)).backward()
        for a, e in [*zip(got, expected), *((p.grad, q.grad) for p, q in zip(ours, one))]:
            assert_close(a, e, dtype=dtype, msg=f"{name}, {dtype}")

    for backend in backends:
        for dtype in (torch.bfloat16, torch.float32):
            x = torch.randn(n, v, device="cuda", dtype=dtype) * 2
            h = torch.randn(n, d, device="cuda", dtype=dtype)
            w = (torch.randn(v, d, device="cuda") / d ** 0.5 * 3).to(dtype)
            t = _targets(n, v)
            opts = lambda across: dict(backend=backend,  # noqa: E731
                                       process_group=group if across else None)
            check(f"cross_entropy {backend}", dtype, (x,), lambda a, on: [
                fusedloss.cross_entropy(a[0], t, label_smoothing=0.1, z_loss=1e-4,
                                        **opts(on))])
            check(f"cross_entropy none + entropy {backend}", dtype, (x,), lambda a, on:
                  fusedloss.cross_entropy(a[0], t, reduction="none", return_entropy=True,
                                          **opts(on)))
            check(f"log_probs {backend}", dtype, (x,), lambda a, on: fusedloss.log_probs(
                a[0], t, return_entropy=True, temperature=0.8, **opts(on))[:2])
            check(f"linear_cross_entropy {backend}", dtype, (h, w), lambda a, on: [
                fusedloss.linear_cross_entropy(*a, t, **opts(on))])
            check(f"linear_log_probs {backend}", dtype, (h, w), lambda a, on:
                  fusedloss.linear_log_probs(*a, t, return_entropy=True, **opts(on))[:2])
            # DTensor logits sharded on the classes over the CUDA mesh (the leaf is the
            # DTensor; its gradient is sharded as it is)
            full = x.clone().requires_grad_()
            expected = fusedloss.cross_entropy(full, t, backend=backend)
            expected.backward()
            dx = distribute_tensor(x.clone(), mesh, [Shard(1)]).requires_grad_()
            loss = fusedloss.cross_entropy(dx, t, backend=backend)
            loss.backward()
            assert_close(loss.full_tensor(), expected, dtype=dtype)
            assert_close(dx.grad.full_tensor(), full.grad, dtype=dtype)
    q, k = (torch.nn.functional.normalize(torch.randn(1024, 256, device="cuda"), dim=1)
            for _ in range(2))
    for exchange in ("all_gather", "ring"):
        across = lambda on: dict(process_group=group, exchange=exchange) if on else {}  # noqa
        check(f"info_nce {exchange}", torch.float32, (q, k), lambda a, on: [
            fusedloss.info_nce(*a, symmetric=True, **across(on))])
        check(f"siglip_loss {exchange}", torch.float32, (q, k), lambda a, on: [
            fusedloss.siglip_loss(*a, 10.0, -10.0, **across(on))])


def test_nccl_single_gpu_group():
    """An NCCL group of one rank on this GPU (NCCL refuses two ranks on one device): the
    collectives of every cross-rank path run through NCCL on CUDA tensors."""
    from gloo_ranks import run_ranks
    import torch.distributed as dist
    if not dist.is_nccl_available():
        pytest.skip("this torch has no NCCL")
    here = fusedloss.available_backends(torch.device("cuda"))
    backends = [b for b in ("triton", "cuda") if b in here]
    assert backends, "neither the triton nor the cuda backend runs here"
    run_ranks(_nccl_rank, 1, backends, group_backend="nccl", timeout=200)


# ------------------------------------------------ a patched Llama and a TRL-style step
def _tiny_llama(vocab=32000):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():  # logits far from 0 (the default init gives about log V)
        model.get_output_embeddings().weight.mul_(20)
    return model


def _relative_error(ours, exact):
    return (ours.double() - exact.double()).norm().item() / exact.double().norm().item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_patched_llama_training_step(gpu_backend, dtype):
    """Two SGD steps of a small Llama (V=32000) patched by
    fusedloss.integrations.transformers.apply, padded batch: each step's loss and the
    gradient of every parameter no worse than twice the error of transformers' own loss
    on the same model in the same dtype, against the float64 model."""
    import fusedloss.integrations.transformers as fl_hf
    base = _tiny_llama()
    models = {kind: copy.deepcopy(base).to("cuda", dt) for kind, dt in
              (("ours", dtype), ("torch", dtype), ("exact", torch.float64))}
    fl_hf.apply(models["ours"], backend=gpu_backend)
    ids = torch.randint(0, 32000, (4, 128), device="cuda")
    labels, mask = ids.clone(), torch.ones_like(ids)
    labels[0, -40:], mask[0, -40:] = -100, 0
    labels[2, :30] = -100
    optimizers = {k: torch.optim.SGD(m.parameters(), lr=0.05) for k, m in models.items()}
    for step in range(2):
        losses, grads = {}, {}
        for kind, model in models.items():
            optimizers[kind].zero_grad()
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            losses[kind] = loss.detach()
            grads[kind] = torch.cat([p.grad.double().flatten() for p in model.parameters()])
            optimizers[kind].step()
        # (one rounding of the dtype allowed over torch's error: a scalar loss can round
        # exactly by chance)
        ulp = torch.finfo(dtype).eps
        err, torch_err = (_max_err(losses[k], losses["exact"]) for k in ("ours", "torch"))
        assert err <= 2 * torch_err + ulp * losses["exact"].abs().item(), \
            f"step {step} loss: {err:.3g} vs {torch_err:.3g}"
        err, torch_err = (_relative_error(grads[k], grads["exact"]) for k in ("ours", "torch"))
        assert err <= 2 * torch_err + ulp, f"step {step} grads: {err:.3g} vs {torch_err:.3g}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_trl_style_log_prob_step(dtype):
    """The step TRL's GRPO takes on the GPU: token log-probs and entropy over the LM head
    through TRL's ChunkedLogProbFunction interface (fusedloss's ChunkedLogProbs, what
    fusedloss.integrations.trl.apply() puts in its place), a clipped-ratio policy loss over
    the completion tokens minus an entropy bonus, backward: outputs and the gradients of
    the hidden states and the head no worse than twice eager torch's error."""
    from fusedloss.integrations import trl as fl_trl
    n, d, v, temperature = 4096, 1024, 151936 // 4, 0.9
    hidden = torch.randn(n, d, device="cuda").to(dtype)
    weight = (torch.randn(v, d, device="cuda") / d ** 0.5 * 3).to(dtype)
    t = torch.randint(0, v, (n,), device="cuda")
    completion = (torch.rand(n, device="cuda") > 0.3).double()
    old = torch.randn(n, device="cuda", dtype=torch.float64) * 0.1 - 5
    advantage = torch.randn(n, device="cuda", dtype=torch.float64)

    def objective(lp, ent):
        ratio = torch.exp(lp.double() - old)
        policy = -torch.min(ratio * advantage, ratio.clamp(0.8, 1.2) * advantage)
        return ((policy - 0.01 * ent.double()) * completion).sum() / completion.sum()

    def ours(xs, ws):
        return fl_trl.ChunkedLogProbs.apply(xs, ws, None, t, temperature, 32768, None, 1.0,
                                            ("entropy",))[:2]
    _log_probs_no_worse_than_torch(ours, (hidden, weight), t, temperature, objective)
