"""Who is measured: the one table of providers.

A provider turns a case into a callable `loss = fn(*case.make_inputs(device))`. Every
fusedloss backend that can run on the device is a provider ("fusedloss-<backend>"),
beside eager PyTorch ("torch", the baseline of the speed-up and memory ratio columns),
torch.compile of that eager code ("torch.compile"), and peer libraries when importable.

"fusedloss-reference" (the library's pure-PyTorch oracle) is not run by default: it is
eager PyTorch computed in float32, so it adds nothing to "torch" but time. Name it in
--providers to include it. The Triton interpreter (Triton on CPU tensors) is never run.
"""
import dataclasses
import functools
import importlib.machinery
import importlib.util
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from . import llama
from .cases import IGNORE_INDEX, LlamaStep


FUSEDLOSS_FUNCTIONS = {"cross_entropy": "cross_entropy", "focal": "focal_loss",
                       "sigmoid_focal": "sigmoid_focal_loss", "info_nce": "info_nce",
                       "linear_cross_entropy": "linear_cross_entropy", "jsd": "jsd",
                       "linear_jsd": "linear_jsd", "siglip": "siglip_loss",
                       "linear_log_probs": "linear_log_probs"}


# ---------------------------------------------------------------- eager PyTorch baselines
def focal_torch(x, target, gamma, ignore_index):
    """Softmax focal loss as plain PyTorch: log_softmax, gather, mean over counted rows."""
    logp = F.log_softmax(x, dim=1)
    counted = target != ignore_index
    logp_t = logp.gather(1, torch.where(counted, target, 0).unsqueeze(1)).squeeze(1)
    rows = -((1 - logp_t.exp()) ** gamma) * logp_t
    return (rows * counted).sum() / counted.sum()


def sigmoid_focal_torch(x, target, alpha, gamma, reduction):
    """torchvision.ops.sigmoid_focal_loss's formula (torchvision is not a dependency)."""
    p = torch.sigmoid(x)
    ce = F.binary_cross_entropy_with_logits(x, target, reduction="none")
    p_t = p * target + (1 - p) * (1 - target)
    loss = ce * (1 - p_t) ** gamma
    loss = (alpha * target + (1 - alpha) * (1 - target)) * loss
    return loss.mean() if reduction == "mean" else loss.sum()


def info_nce_torch(query, key, temperature, symmetric):
    """open_clip's pattern: the N x N logits, then cross_entropy in one or both directions."""
    logits = query @ key.T / temperature
    labels = torch.arange(query.shape[0], device=query.device)
    loss = F.cross_entropy(logits, labels)
    return (loss + F.cross_entropy(logits.T, labels)) / 2 if symmetric else loss


def siglip_torch(image, text, logit_scale, logit_bias):
    """open_clip's SigLipLoss: the N x N logits and labels, logsigmoid, sum / N."""
    logits = logit_scale * image @ text.T + logit_bias
    n = image.shape[0]
    labels = 2 * torch.eye(n, device=image.device, dtype=image.dtype) - 1
    return -F.logsigmoid(labels * logits).sum() / n


def linear_cross_entropy_torch(x, w, target, **kwargs):
    """The LM head and its loss as eager PyTorch composes them: the whole logits."""
    return F.cross_entropy(F.linear(x, w), target, **kwargs)


def jsd_torch(student, teacher, target, beta, temperature, ignore_index):
    """Distillation as eager PyTorch composes it: two log_softmaxes and F.kl_div (forward
    KL at beta 0, reverse at 1, the mixture's two KL terms otherwise), then the mean over
    the counted rows."""
    log_s = F.log_softmax(student / temperature, -1)
    log_t = F.log_softmax(teacher / temperature, -1)
    if beta == 0:
        rows = F.kl_div(log_s, log_t, reduction="none", log_target=True).sum(-1)
    elif beta == 1:
        rows = F.kl_div(log_t, log_s, reduction="none", log_target=True).sum(-1)
    else:
        log_m = torch.log(beta * log_t.exp() + (1 - beta) * log_s.exp())
        rows = (beta * F.kl_div(log_m, log_t, reduction="none", log_target=True)
                + (1 - beta) * F.kl_div(log_m, log_s, reduction="none", log_target=True)).sum(-1)
    counted = target != ignore_index
    return (rows * counted).sum() / counted.sum()


def linear_jsd_torch(xs, ws, xt, wt, target, **kwargs):
    """Both LM heads' whole logits, then jsd_torch."""
    return jsd_torch(F.linear(xs, ws), F.linear(xt, wt), target, **kwargs)


# ---------------------------------------------------------------- RL: token log-probs
# The linear_log_probs case times what an RL trainer's backward sees: per-token log-probs
# and entropy, both with an upstream gradient (fixed random ones, the same for every
# provider), reduced here to the scalar the runner differentiates.
def rl_objective(log_probs, entropy):
    gen = torch.Generator(device=log_probs.device).manual_seed(1)
    g = torch.randn(log_probs.shape, device=log_probs.device, generator=gen)
    h = torch.randn(log_probs.shape, device=log_probs.device, generator=gen)
    return (log_probs.float() * g).sum() + (entropy.float() * h).sum()


def log_probs_torch(x, w, target, temperature):
    """Eager PyTorch: the whole logits, float32 log-softmax, gather, and the entropy."""
    logp = F.log_softmax(F.linear(x, w).float() / temperature, -1)
    picked = logp.gather(-1, target[:, None]).squeeze(-1)
    return rl_objective(picked, -(logp.exp() * logp).sum(-1))


def _fusedloss_log_probs(fn, x, w, target, **kwargs):
    out = fn(x, w, target, return_entropy=True, **kwargs)
    return rl_objective(out.log_probs, out.entropy)


def _trl(case):
    from trl.kernels import ChunkedLogProbFunction
    t = case.loss_kwargs()["temperature"]

    def fn(x, w, target):  # TRL's call in add_fused_lm_head (its vocabulary tile: 32768)
        out = ChunkedLogProbFunction.apply(x, w, None, target, t, 32768, None, 1.0,
                                           ("entropy",))
        return rl_objective(out[0], out[1])
    return fn


def _trl_unavailable(device_type, case):
    if case.loss != "linear_log_probs":
        return "TRL's ChunkedLogProbFunction is the log-probs case only"
    if importlib.util.find_spec("trl") is None:
        return "TRL is not installed (pip install trl)"
    return None


def verl_module(relative):
    """A module of the installed verl (relative: its name under verl), None where verl is
    not installed. verl's own __init__ needs ray, a dependency of its trainer, not of its
    kernels: where it does not import, verl and verl.utils stand in as bare packages over
    the installed files, so that the module and what it imports (verl.utils.device,
    verl.plugin) load unchanged."""
    spec = importlib.util.find_spec("verl")
    if spec is None:
        return None
    name = f"verl.{relative}"
    try:
        return importlib.import_module(name)
    except ImportError:
        pass
    import pathlib
    import sys
    import types
    for stale in [m for m in sys.modules if m == "verl" or m.startswith("verl.")]:
        del sys.modules[stale]  # what the failed import left
    root = pathlib.Path(spec.submodule_search_locations[0])
    for package, path in (("verl", root), ("verl.utils", root / "utils")):
        module = types.ModuleType(package)
        module.__spec__ = importlib.machinery.ModuleSpec(package, None, is_package=True)
        module.__path__ = module.__spec__.submodule_search_locations = [str(path)]
        sys.modules[package] = module
    return importlib.import_module(name)


def _verl_torch(case):
    function = verl_module("utils.experimental.torch_functional").FusedLinearForPPOFunction
    t = case.loss_kwargs()["temperature"]

    def fn(x, w, target):  # verl's pure-torch path, its default chunk of 512 rows
        return rl_objective(*function.apply(x, w, target, t, 512))
    return fn


def _verl_unavailable(device_type, case):
    if case.loss != "linear_log_probs":
        return "verl's fused log-probs are the log-probs case only"
    if importlib.util.find_spec("verl") is None:
        return "verl is not installed (pip install verl)"
    return None


def _verl_triton(case):
    kernel = verl_module("utils.kernel.linear_cross_entropy").linear_cross_entropy
    t = float(case.loss_kwargs()["temperature"])
    return lambda x, w, target: rl_objective(*kernel(x, w, target, t, "none"))


def _verl_triton_unavailable(device_type, case):
    why = _verl_unavailable(device_type, case)
    if why is None and device_type != "cuda":
        return "verl's Triton kernel runs on CUDA only"
    if why is None and case.d % 128:
        return "verl's Triton kernel needs a hidden size that is a multiple of 128"
    if why is None:
        try:
            verl_module("utils.kernel.kernels")
        except Exception as exc:  # noqa: BLE001 (any import failure is a reason not to run)
            return f"verl's kernel does not import here ({type(exc).__name__}: {exc})"
    return why


def _eager(case):
    kwargs = case.loss_kwargs()
    if case.loss == "cross_entropy":
        return torch.nn.CrossEntropyLoss(**kwargs)
    fn = {"focal": focal_torch, "sigmoid_focal": sigmoid_focal_torch,
          "info_nce": info_nce_torch, "linear_cross_entropy": linear_cross_entropy_torch,
          "jsd": jsd_torch, "linear_jsd": linear_jsd_torch, "siglip": siglip_torch,
          "linear_log_probs": log_probs_torch}
    return functools.partial(fn[case.loss], **kwargs)


def _compiled(case):
    return torch.compile(_eager(case))


# ---------------------------------------------------------------- fusedloss
def _fusedloss(backend, case):
    import fusedloss
    fn = getattr(fusedloss, FUSEDLOSS_FUNCTIONS[case.loss])
    if case.loss == "linear_log_probs":
        return functools.partial(_fusedloss_log_probs, fn, **case.loss_kwargs(),
                                 backend=backend)
    return functools.partial(fn, **case.loss_kwargs(), backend=backend)


def _fusedloss_unavailable(backend, device_type, case):
    import fusedloss  # noqa: F401  (defines the ops)
    from fusedloss import _backends, _library
    if backend == "triton" and (device_type == "cpu" or _backends.triton_interpret()):
        return "Triton on CPU tensors (TRITON_INTERPRET=1) is the interpreter: never timed"
    # The loss's op, where one has the loss's name or its function's: a backend that does
    # not implement it (siglip and jsd have no CUDA C++ kernel) is left out, not an error.
    op = _library.OPS.get(case.loss) or _library.OPS.get(FUSEDLOSS_FUNCTIONS.get(case.loss))
    return _backends.unavailable_reason(backend, device_type, op)


def _fusedloss_inplace(backend, case):
    return functools.partial(_fusedloss(backend, case), inplace_backward=True)


def _fusedloss_inplace_unavailable(backend, device_type, case):
    if case.loss != "cross_entropy":
        return "inplace_backward is a cross-entropy option"
    return _fusedloss_unavailable(backend, device_type, case)


# ---------------------------------------------------------------- torch's fused LM head
def _torch_lce(chunked, case):
    options = torch.nn.LinearCrossEntropyOptions() if chunked else None
    return functools.partial(F.linear_cross_entropy, options=options, **case.loss_kwargs())


def _torch_lce_unavailable(chunked, device_type, case):
    if case.loss != "linear_cross_entropy":
        return "torch's F.linear_cross_entropy is the linear + cross-entropy case only"
    if not hasattr(F, "linear_cross_entropy"):
        return f"this torch ({torch.__version__}) has no F.linear_cross_entropy"
    if chunked and case.label_smoothing:
        return ("torch's chunked path refuses label smoothing (it falls back to the "
                "reference path with a warning)")
    return None


# ---------------------------------------------------------------- peer libraries
def _liger(case):
    if case.loss in ("jsd", "linear_jsd"):
        kw = case.loss_kwargs()
        if case.loss == "linear_jsd":
            from liger_kernel.transformers import LigerFusedLinearJSD
            return LigerFusedLinearJSD(jsd_beta=kw["beta"], ignore_index=kw["ignore_index"],
                                       temperature=kw["temperature"])
        from liger_kernel.transformers import LigerJSD  # it takes log-probabilities
        loss = LigerJSD(beta=kw["beta"], ignore_index=kw["ignore_index"])
        t = kw["temperature"]
        return lambda s, te, target: loss(F.log_softmax(s / t, -1), F.log_softmax(te / t, -1),
                                          target)
    if case.loss == "linear_cross_entropy":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        loss = LigerFusedLinearCrossEntropyLoss(**case.loss_kwargs())
        return lambda x, w, target: loss(w, x, target)
    from liger_kernel.transformers import LigerCrossEntropyLoss
    return LigerCrossEntropyLoss(**case.loss_kwargs(), reduction="mean")


def _liger_unavailable(device_type, case):
    if importlib.util.find_spec("liger_kernel") is None:
        return "liger-kernel is not installed (pip install liger-kernel)"
    if device_type != "cuda":
        return "liger-kernel runs on CUDA only"
    if case.loss not in ("cross_entropy", "linear_cross_entropy", "jsd", "linear_jsd"):
        return f"liger-kernel has no {case.loss} loss"
    return None


def _cce(case):
    from cut_cross_entropy import linear_cross_entropy
    return lambda x, w, target: linear_cross_entropy(x, w, target, ignore_index=IGNORE_INDEX)


def _cce_unavailable(device_type, case):
    if importlib.util.find_spec("cut_cross_entropy") is None:
        return "cut-cross-entropy is not installed (pip install cut-cross-entropy)"
    if device_type != "cuda":
        return "cut-cross-entropy runs on CUDA only"
    # CCE never materialises the logits: it takes hidden states and the classifier weight.
    if case.loss != "linear_cross_entropy":
        return "cut-cross-entropy fuses the classifier matmul: the linear case only"
    if case.label_smoothing:
        return "cut-cross-entropy has no label smoothing"
    return None


def _always(device_type, case):
    return None


# ---------------------------------------------------------------- past one device
def _dist_fusedloss(backend, case):
    import torch.distributed as dist

    import fusedloss
    group = dist.group.WORLD
    if case.loss == "cross_entropy":
        return functools.partial(fusedloss.cross_entropy, process_group=group,
                                 backend=backend, **case.loss_kwargs())
    fn = fusedloss.siglip_loss if case.loss == "siglip" else fusedloss.info_nce
    return functools.partial(fn, process_group=group, exchange=case.exchange,
                             **case.loss_kwargs())


def _dist_slice(case):
    """Each rank's single-device fused call on its own slice of the logits, no collective
    (its targets folded into the slice's classes): the per-rank baseline of the
    vocab-parallel target, run as the ranks run, side by side on the same cores."""
    import fusedloss
    kwargs = case.loss_kwargs()

    def fn(x, target):
        local = torch.where(target == kwargs["ignore_index"], target, target % x.shape[1])
        return fusedloss.cross_entropy(x, local, **kwargs)
    return fn


def _dist_gather(case):
    """The gather-everything baseline: all the logits (or keys and queries) on every rank,
    with gradients (torch.distributed.nn), then the single-device loss."""
    import torch.distributed as dist
    from torch.distributed.nn.functional import all_gather

    kwargs = case.loss_kwargs()
    if case.loss == "cross_entropy":
        def fn(x, target):
            return F.cross_entropy(torch.cat(all_gather(x), dim=1), target, **kwargs)
        return fn
    if case.loss == "siglip":  # open_clip's SigLipLoss with its gather exchange
        def fn(image, text, logit_scale, logit_bias):
            rank, n = dist.get_rank(), image.shape[0]
            logits = logit_scale * image @ torch.cat(all_gather(text)).T + logit_bias
            labels = -torch.ones_like(logits)
            labels[:, rank * n:(rank + 1) * n] += 2 * torch.eye(n, dtype=logits.dtype)
            return -F.logsigmoid(labels * logits).sum() / n
        return fn

    def fn(q, k):
        rank, n = dist.get_rank(), q.shape[0]
        qs, ks = torch.cat(all_gather(q)), torch.cat(all_gather(k))
        labels = torch.arange(n, device=q.device) + rank * n
        logits = q @ ks.T / kwargs["temperature"]
        loss = F.cross_entropy(logits, labels)
        if kwargs["symmetric"]:
            loss = (loss + F.cross_entropy(k @ qs.T / kwargs["temperature"], labels)) / 2
        return loss
    return fn


def _dist_unavailable(device_type, case):
    if device_type != "cpu":
        return "the distributed cases run gloo ranks on this machine's CPU cores"
    return None


def _dist_reference_unavailable(device_type, case):
    if case.loss != "cross_entropy":
        return "the vocab-parallel cross-entropy only"
    return _dist_unavailable(device_type, case)


# ---------------------------------------------------------------- end to end: a training step
# The llama_step case (cases.LlamaStep) is a training step of a small Llama through
# transformers (benchmarks/llama.py): these providers run it, and only they do.
def _llama_step_unavailable(device_type, case):
    if importlib.util.find_spec("transformers") is None:
        return "transformers is not installed (pip install transformers)"
    if not isinstance(case, LlamaStep):
        return ("llama_step runs the suites' sizes only; other sizes: "
                "python -m benchmarks.e2e --help")
    return None


@dataclasses.dataclass(frozen=True)
class Provider:
    name: str
    build: Optional[Callable]            # case -> fn(*inputs) -> scalar loss
    unavailable: Callable = _always      # (device type, case) -> why it cannot run, or None
    default: bool = True                 # run when --providers is not given
    distributed: bool = False            # runs on world > 1 cases (and only on them)
    end_to_end: bool = False             # runs the llama_step case (and only it)

    # Module-level functions only (functools.partial of them is fine): a Provider is
    # pickled into the worker process that measures a case.


PROVIDERS = [
    *[Provider(f"fusedloss-{b}", functools.partial(_fusedloss, b),
               functools.partial(_fusedloss_unavailable, b), default=b != "reference")
      for b in ("cpu", "cuda", "triton", "reference")],
    # inplace_backward=True: the gradient is written over the logits (no N x C buffer).
    *[Provider(f"fusedloss-{b}-inplace", functools.partial(_fusedloss_inplace, b),
               functools.partial(_fusedloss_inplace_unavailable, b))
      for b in ("cpu", "cuda", "triton")],
    Provider("torch", _eager),
    Provider("torch.compile", _compiled),
    # torch 2.14's F.linear_cross_entropy: its reference path and its chunked path.
    Provider("torch-lce", functools.partial(_torch_lce, False),
             functools.partial(_torch_lce_unavailable, False)),
    Provider("torch-lce-chunked", functools.partial(_torch_lce, True),
             functools.partial(_torch_lce_unavailable, True)),
    Provider("liger", _liger, _liger_unavailable),
    # RL post-training's chunked log-probs: TRL's (Triton on a GPU, torch ops elsewhere),
    # verl's pure-torch function and its Triton kernel (GPU).
    Provider("trl", _trl, _trl_unavailable),
    Provider("verl-torch", _verl_torch, _verl_unavailable),
    Provider("verl-triton", _verl_triton, _verl_triton_unavailable),
    Provider("cut-cross-entropy", _cce, _cce_unavailable),
    # Over `world` gloo ranks: fusedloss's process_group path, and gathering everything.
    Provider("fusedloss-dist", functools.partial(_dist_fusedloss, "auto"), _dist_unavailable,
             distributed=True),
    # The same algorithm in torch ops (vocab-parallel cross-entropy only).
    Provider("fusedloss-dist-reference", functools.partial(_dist_fusedloss, "reference"),
             _dist_reference_unavailable, distributed=True),
    Provider("gather", _dist_gather, _dist_unavailable, distributed=True),
    Provider("fusedloss-slice", _dist_slice, _dist_reference_unavailable, distributed=True),
    # One training step of a small Llama, its loss three ways (llama.PATCHES).
    *[Provider(name, functools.partial(llama.runner_step, patch=name),
               _llama_step_unavailable, end_to_end=True) for name in llama.PATCHES],
]
BASELINE = "torch"
DIST_BASELINE = "gather"  # the baseline of the world > 1 cases
ALIASES = {"eager": "torch", "compile": "torch.compile", "cce": "cut-cross-entropy",
           "liger-kernel": "liger"}


def select(names=None):
    """The providers named (aliases and bare backend names allowed, "fusedloss" for all of
    its default backends), or the default ones."""
    by_name = {p.name: p for p in PROVIDERS}
    if not names:
        return [p for p in PROVIDERS if p.default]
    chosen = []
    for name in names:
        name = ALIASES.get(name, name)
        if name == "fusedloss":
            found = [p for p in PROVIDERS if p.name.startswith("fusedloss-") and p.default]
        elif name in by_name or f"fusedloss-{name}" in by_name:
            found = [by_name.get(name) or by_name[f"fusedloss-{name}"]]
        else:
            raise ValueError(f"unknown provider {name!r}; choose from "
                             f"{', '.join(by_name)} (or a bare backend name, or 'fusedloss')")
        chosen += [p for p in found if p not in chosen]
    return chosen


def plan(providers, device_type, cases, named=False):
    """[(case, providers that can run it)], and a note for every provider left out.
    Unless the providers were `named` (--providers), a case that lists its own providers
    (case.providers: the first suite's short cases) runs only those."""
    notes, runs = {}, []
    for case in cases:
        kept = None if named or not case.providers else select(case.providers)
        able = []
        for p in providers:
            if p.distributed != (case.world > 1) or p.end_to_end != (case.loss == "llama_step"):
                continue  # the distributed (end-to-end) providers run the world > 1
                #           (llama_step) cases, and only they
            why = p.unavailable(device_type, case)
            if why is None and kept is not None and p not in kept:
                why = "left out of some cases of this suite to keep it short (--suite full " \
                      "runs it on every case)"
            if why is None:
                able.append(p)
            else:
                notes.setdefault(f"{p.name}: {why}", None)
        runs.append((case, able))
    return runs, list(notes)
