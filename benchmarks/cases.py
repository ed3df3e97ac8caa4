"""What is measured: the benchmark cases, their inputs, and the bytes and FLOPs each must move.

A case is one loss at one size, dtype and option set. `shape` is (N, C): N rows and C
classes (the vocabulary V for cross-entropy) for the softmax losses, N anchors by C
classes for sigmoid focal, N (query, key) pairs of dimension D = C for InfoNCE, N (image,
text) pairs of dimension D = C for SigLIP, and N tokens against a vocabulary of C for
linear_cross_entropy and linear_log_probs, whose hidden size is `d`. The suites are the
table SUITES below.
"""
import dataclasses
import itertools

import torch

from . import llama

LOSSES = ("cross_entropy", "focal", "sigmoid_focal", "info_nce", "linear_cross_entropy", "jsd",
          "linear_jsd", "siglip", "linear_log_probs", "llama_step")
ALIASES = {"ce": "cross_entropy", "softmax_focal": "focal", "infonce": "info_nce",
           "lce": "linear_cross_entropy", "flce": "linear_cross_entropy", "kl": "jsd",
           "distill": "jsd", "fljsd": "linear_jsd", "log_probs": "linear_log_probs",
           "logprobs": "linear_log_probs"}
IGNORE_INDEX = -100
DTYPES = ("float32", "bfloat16", "float16")
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
# Axis labels for tables and plots: (what N is, what C is).
AXES = {"cross_entropy": ("N rows", "V classes"), "focal": ("N rows", "C classes"),
        "sigmoid_focal": ("N anchors", "C classes"), "info_nce": ("N pairs", "D dim"),
        "linear_cross_entropy": ("N tokens", "V classes"), "jsd": ("N rows", "V classes"),
        "linear_jsd": ("N tokens", "V classes"), "siglip": ("N pairs", "D dim"),
        "linear_log_probs": ("N tokens", "V classes"),
        "llama_step": ("N tokens", "V vocabulary")}


@dataclasses.dataclass(frozen=True)
class Case:
    loss: str
    n: int
    c: int
    dtype: str = "float32"
    label_smoothing: float = 0.0   # cross_entropy, linear_cross_entropy
    ignore_frac: float = 0.0       # cross_entropy, focal: this fraction of rows is ignored
    symmetric: bool = False        # info_nce: both directions
    d: int = 0                     # linear_cross_entropy: the hidden size
    world: int = 1                 # > 1: that many gloo ranks (benchmarks/distributed.py)
    exchange: str = ""             # info_nce across ranks: "all_gather" or "ring"
    beta: float = 0.5              # jsd, linear_jsd: 0 forward KL, 1 reverse KL
    threads: int = 0               # > 0: torch's CPU threads (default: all; per rank: a share)
    # The providers a suite runs on this case unless --providers names others (names as
    # --providers takes them); empty: every default provider. Not part of the case's
    # identity: the same case in two suites is one case.
    providers: tuple = dataclasses.field(default=(), compare=False)

    @property
    def torch_dtype(self):
        return getattr(torch, self.dtype)

    @property
    def options(self):
        """The options, short, for tables: 'ls=0.1 ign=25%', 'sym', or ''."""
        parts = [f"D={self.d}"] if self.d else []
        if self.label_smoothing:
            parts.append(f"ls={self.label_smoothing:g}")
        if self.ignore_frac:
            parts.append(f"ign={self.ignore_frac:.0%}")
        if self.symmetric:
            parts.append("sym")
        if self.loss in ("jsd", "linear_jsd"):
            parts.append(f"beta={self.beta:g}")
        if self.world > 1:
            parts.append(f"P={self.world}" + (f" {self.exchange}" if self.exchange else ""))
        if self.threads:
            parts.append(f"T={self.threads}")
        return " ".join(parts)

    def loss_kwargs(self):
        """Keyword arguments of the fusedloss call; the eager baselines read the same."""
        if self.loss in ("cross_entropy", "linear_cross_entropy"):
            return {"label_smoothing": self.label_smoothing, "ignore_index": IGNORE_INDEX}
        if self.loss == "focal":
            return {"gamma": 2.0, "ignore_index": IGNORE_INDEX}
        if self.loss == "sigmoid_focal":
            return {"alpha": 0.25, "gamma": 2.0, "reduction": "mean"}
        if self.loss in ("jsd", "linear_jsd"):
            return {"beta": self.beta, "temperature": 1.0, "ignore_index": IGNORE_INDEX}
        if self.loss == "siglip":
            return {}  # reduction "mean", open_clip's
        if self.loss == "linear_log_probs":
            return {"temperature": 1.0}
        return {"temperature": 0.07, "symmetric": self.symmetric}

    def make_inputs(self, device, rank=0):
        """The loss's positional tensor arguments; the floating ones require grad. With
        world > 1, rank `rank`'s share: its slice of the classes (cross_entropy: N x C/P
        logits, global targets), or its own N rows (info_nce: N per rank)."""
        gen = torch.Generator(device=device).manual_seed(0)
        n, c, dtype = self.n, self.c, self.torch_dtype
        if self.world > 1 and self.loss == "cross_entropy":
            x = torch.randn(n, c, device=device, dtype=dtype, generator=gen)
            width = c // self.world
            x = x[:, rank * width:(rank + 1) * width].clone().requires_grad_()
            return x, self._class_targets(device, gen)
        if self.world > 1:  # info_nce: every rank its own rows
            gen.manual_seed(rank)
        if self.loss in ("linear_cross_entropy", "linear_jsd", "linear_log_probs"):
            x = torch.randn(n, self.d, device=device, generator=gen).to(dtype)
            w = (torch.randn(c, self.d, device=device, generator=gen) / self.d ** 0.5).to(dtype)
            if self.loss == "linear_jsd":  # a frozen teacher of the same sizes
                xt = torch.randn(n, self.d, device=device, generator=gen).to(dtype)
                wt = (torch.randn(c, self.d, device=device, generator=gen)
                      / self.d ** 0.5).to(dtype)
                return (x.requires_grad_(), w.requires_grad_(), xt, wt,
                        self._class_targets(device, gen))
            return x.requires_grad_(), w.requires_grad_(), self._class_targets(device, gen)
        if self.loss == "jsd":  # student logits (trained) and a frozen teacher's
            s = torch.randn(n, c, device=device, dtype=dtype, generator=gen).requires_grad_()
            t = torch.randn(n, c, device=device, dtype=dtype, generator=gen)
            return s, t, self._class_targets(device, gen)
        if self.loss in ("info_nce", "siglip"):
            q, k = (torch.nn.functional.normalize(
                torch.randn(n, c, device=device, generator=gen), dim=1).to(dtype)
                for _ in range(2))
            if self.loss == "siglip":  # image, text, and SigLIP's initial scale and bias
                return (q.requires_grad_(), k.requires_grad_(),
                        torch.tensor(10.0, device=device, requires_grad=True),
                        torch.tensor(-10.0, device=device, requires_grad=True))
            return q.requires_grad_(), k.requires_grad_()
        x = torch.randn(n, c, device=device, dtype=dtype, generator=gen).requires_grad_()
        if self.loss == "sigmoid_focal":
            target = (torch.rand(n, c, device=device, generator=gen) < 0.05).to(dtype)
            return x, target
        return x, self._class_targets(device, gen)

    def _class_targets(self, device, gen):
        """Class indices with a fraction ignore_frac of the rows set to ignore_index."""
        n = self.n
        target = torch.randint(0, self.c, (n,), device=device, generator=gen)
        ignored = torch.randperm(n, device=device, generator=gen)[:round(self.ignore_frac * n)]
        target[ignored] = IGNORE_INDEX
        return target

    def min_bytes(self):
        """Bytes fwd+bwd must move at the least: every input read once, every gradient
        written once (for the softmax losses: the logits, their gradient, the targets)."""
        s = self.torch_dtype.itemsize
        if self.loss in ("linear_cross_entropy", "linear_log_probs"):
            return 2 * (self.n + self.c) * self.d * s + 8 * self.n  # x, W; their gradients
        if self.loss == "linear_jsd":  # the student's as above, and read the teacher's
            return 3 * (self.n + self.c) * self.d * s + 8 * self.n
        if self.loss == "jsd":  # read both logits, write the student's gradient
            return 3 * self.n * self.c * s + 8 * self.n
        if self.loss in ("info_nce", "siglip"):
            return 2 * 2 * self.n * self.c * s      # read q, k; write dq, dk
        if self.loss == "sigmoid_focal":
            return 3 * self.n * self.c * s          # read x, targets; write dx
        return 2 * self.n * self.c * s + 8 * self.n  # read x, write dx, read int64 targets

    def flops(self):
        """Matmul FLOPs of fwd+bwd: InfoNCE (logits, dq, dk: 3 x 2 N^2 D), linear
        cross-entropy (logits, dx, dW: 3 x 2 N D V); 0 for the rest."""
        if self.loss == "linear_cross_entropy":
            return 6 * self.n * self.d * self.c
        if self.loss == "linear_jsd":  # both heads' logits, then dx and dW of the student
            return 8 * self.n * self.d * self.c
        if self.loss == "linear_log_probs":  # the logits twice (the backward recomputes
            return 8 * self.n * self.d * self.c  # them: upstream unknown), dx, dW
        return 6 * self.n * self.n * self.c * self.world \
            if self.loss in ("info_nce", "siglip") else 0


def _grid(loss, ns, cs, dtypes, **options):
    return [Case(loss, n, c, dtype, **options)
            for dtype, n, c in itertools.product(dtypes, ns, cs)]


# ---------------------------------------------------------------- end to end: a training step
# One training step of a small Llama through transformers (benchmarks/llama.py), run by
# the "hf*" providers only. Its sizes: N tokens in sequences of `seq`, vocabulary C, hidden d.
@dataclasses.dataclass(frozen=True)
class LlamaStep(Case):
    seq: int = 512
    layers: int = 4

    def __post_init__(self):
        if self.d < 1 or self.n % self.seq:
            raise ValueError(f"a llama_step case needs a hidden size d >= 1 and N a multiple "
                             f"of seq={self.seq}, got d={self.d}, N={self.n}")

    @property
    def options(self):
        return f"D={self.d} L={self.layers} T={self.seq}"

    def sizes(self):
        return dict(batch=self.n // self.seq, seq=self.seq, hidden=self.d, layers=self.layers,
                    vocab=self.c)

    def make_inputs(self, device, rank=0):
        """The token ids, which are the labels too: (N / seq, seq)."""
        s = self.sizes()
        return (llama.token_ids(s["batch"], s["seq"], s["vocab"], device),)

    def min_bytes(self):
        return llama.step_min_bytes(**self.sizes(), itemsize=self.torch_dtype.itemsize)

    def flops(self):
        return llama.step_flops(**self.sizes())


# The one table of cases: (device type, suite) -> cases. A CPU runs float32 only.
#   first  the default: one case of each loss family, fusedloss against eager torch
#          (torch.compile on cross-entropy only: its first compile in a fresh worker takes
#          10-25 s a case on 2 cores), sized so that the whole run, worker starts and
#          plots included, ends within 2.5 minutes on 2 CPU cores shared with other work
#          (68 to 90 s measured at a load of 2 to 4); the Llama step alone would take
#          ~35 s there, so it is left to `full`;
#   full   every loss with its options against every provider (about 20 minutes on 2
#          CPU cores); on a GPU the sizes the kernels are tuned for;
#   large  size sweeps on top of that.
# Sweeps with >= 3 sizes get plots of time and memory against that size.
#   parallel  the vocab-parallel target: per rank of P=2 (one thread each) against one
#          process (one thread) on one rank's slice of the classes, alone, and as
#          "fusedloss-slice": every rank's single-device call on its slice at once (the
#          same cores and memory bus shared as the vocab-parallel ranks share them).
SUITE_NAMES = ("first", "full", "large", "parallel")
FIRST_PROVIDERS = ("fusedloss", "torch")
# Past one device, on this machine's cores (gloo ranks): vocab-parallel cross-entropy
# (N x V split over the ranks) and InfoNCE at a fixed batch per rank, as P grows.
DISTRIBUTED = [
    *[Case("cross_entropy", 4096, 32000, world=p, ignore_frac=0.25) for p in (2, 4)],
    *[Case("info_nce", 2048, 512, symmetric=True, world=p, exchange=x)
      for p in (2, 4) for x in ("all_gather", "ring")],
    *[Case("siglip", 2048, 512, world=2, exchange=x) for x in ("all_gather", "ring")],
]

SUITES = {
    ("cpu", "first"): [
        Case("cross_entropy", 1024, 32000, providers=FIRST_PROVIDERS + ("torch.compile",)),
        Case("focal", 2048, 8192, providers=FIRST_PROVIDERS),
        Case("sigmoid_focal", 16384, 80, providers=FIRST_PROVIDERS),
        Case("info_nce", 1024, 512, symmetric=True, providers=FIRST_PROVIDERS),
        Case("linear_cross_entropy", 256, 32000, d=256, providers=FIRST_PROVIDERS),
        Case("jsd", 256, 32000, beta=0.0, providers=FIRST_PROVIDERS),
        Case("siglip", 1024, 512, providers=FIRST_PROVIDERS),
        Case("linear_log_probs", 256, 32000, d=256, providers=FIRST_PROVIDERS),
        Case("cross_entropy", 256, 32000, world=2),
    ],
    ("cpu", "full"): [  # about 20 minutes on 2 cores, torch.compile warm-up included
        *_grid("cross_entropy", [1024], [8192, 16384, 32000, 65536], ["float32"]),
        Case("cross_entropy", 4096, 32000, label_smoothing=0.1),  # the C++ kernel's target
        Case("cross_entropy", 4096, 32000, label_smoothing=0.1, ignore_frac=0.25),
        Case("focal", 4096, 8192),
        Case("sigmoid_focal", 65536, 80),
        *_grid("info_nce", [2048], [512], ["float32"], symmetric=False),
        *_grid("info_nce", [2048], [512], ["float32"], symmetric=True),
        # bf16 against fp32 on the CPU row kernel, and the fused LM head: the target case
        # with and without label smoothing (torch's chunked path cannot smooth).
        *_grid("cross_entropy", [8192], [32000], ["float32", "bfloat16"]),
        Case("linear_cross_entropy", 4096, 32000, d=512, ignore_frac=1 / 7),
        Case("linear_cross_entropy", 4096, 32000, d=512, label_smoothing=0.1,
             ignore_frac=1 / 7),
        # Distillation: the JSD target case, forward KL, and both heads fused.
        Case("jsd", 4096, 32000),
        Case("jsd", 4096, 32000, beta=0.0, ignore_frac=1 / 7),
        Case("linear_jsd", 4096, 32000, d=512),
        Case("siglip", 8192, 512),  # the tiled SigLIP's target case
        # RL post-training: token log-probs and entropy over the LM head, both upstream
        # gradients (the log-probs issue's target case, float32 and bfloat16).
        *_grid("linear_log_probs", [4096], [32000], ["float32", "bfloat16"], d=512),
        *DISTRIBUTED,
        LlamaStep("llama_step", 8 * 512, 32000, d=256),  # end to end: one training step
    ],
    ("cpu", "parallel"): [
        Case("cross_entropy", 4096, 16000, threads=1, providers=("fusedloss-cpu", "torch")),
        Case("cross_entropy", 4096, 32000, world=2, providers=(
            "fusedloss-dist", "fusedloss-slice", "fusedloss-dist-reference", "gather")),
    ],
    ("cpu", "large"): [
        *_grid("cross_entropy", [1024], [8192, 16384, 32000, 65536, 128256], ["float32"]),
        *_grid("cross_entropy", [1024, 2048, 4096, 8192], [32000], ["float32"],
               label_smoothing=0.1),
        Case("cross_entropy", 4096, 32000, ignore_frac=0.25),
        *_grid("focal", [4096], [1000, 8192, 32000], ["float32"]),
        *_grid("sigmoid_focal", [16384, 65536, 262144], [80], ["float32"]),
        *_grid("info_nce", [1024, 2048, 4096, 8192], [512], ["float32"], symmetric=True),
        Case("info_nce", 4096, 512),
        *_grid("linear_cross_entropy", [4096], [8192, 16384, 32000], ["float32"], d=512,
               ignore_frac=1 / 7),
        *_grid("linear_cross_entropy", [8192], [32000], ["float32", "bfloat16"], d=1024),
        *_grid("jsd", [4096], [8192, 16384, 32000], ["float32"]),
        *_grid("jsd", [4096], [32000], ["float32"], beta=0.0),
        *_grid("jsd", [4096], [32000], ["float32"], beta=1.0),
        *_grid("linear_jsd", [4096], [8192, 16384, 32000], ["float32"], d=512),
        *_grid("siglip", [2048, 4096, 8192], [512], ["float32"]),
        *DISTRIBUTED,
        LlamaStep("llama_step", 8 * 512, 32000, d=256),
    ],
    ("cuda", "first"): [
        Case("cross_entropy", 4096, 128256, "bfloat16",
             providers=FIRST_PROVIDERS + ("torch.compile",)),
        Case("focal", 4096, 32000, "bfloat16", providers=FIRST_PROVIDERS),
        Case("sigmoid_focal", 262144, 80, "bfloat16", providers=FIRST_PROVIDERS),
        Case("info_nce", 16384, 512, "bfloat16", symmetric=True, providers=FIRST_PROVIDERS),
        Case("linear_cross_entropy", 8192, 128256, "bfloat16", d=4096,
             providers=FIRST_PROVIDERS),
        Case("jsd", 4096, 128256, "bfloat16", providers=FIRST_PROVIDERS),
        Case("siglip", 16384, 512, "bfloat16", providers=FIRST_PROVIDERS),
        Case("linear_log_probs", 8192, 151936, "bfloat16", d=4096, providers=FIRST_PROVIDERS),
        LlamaStep("llama_step", 8 * 512, 32000, "bfloat16", d=256),
    ],
    ("cuda", "full"): [
        *_grid("cross_entropy", [4096], [32000, 128256, 256000], ["bfloat16"]),
        Case("cross_entropy", 4096, 128256, "bfloat16", label_smoothing=0.1, ignore_frac=0.25),
        Case("cross_entropy", 4096, 128256, "float32"),
        Case("focal", 4096, 32000, "bfloat16"),
        Case("sigmoid_focal", 262144, 80, "bfloat16"),
        *_grid("info_nce", [16384, 65536], [512], ["bfloat16"], symmetric=True),
        Case("linear_cross_entropy", 16384, 128256, "bfloat16", d=4096),
        Case("jsd", 4096, 128256, "bfloat16"),
        Case("linear_jsd", 8192, 128256, "bfloat16", d=4096),
        *_grid("siglip", [16384, 65536], [512], ["bfloat16"]),
        Case("linear_log_probs", 16384, 151936, "bfloat16", d=4096),  # the RL target case
        LlamaStep("llama_step", 8 * 512, 32000, "bfloat16", d=256),
    ],
    ("cuda", "large"): [
        *_grid("cross_entropy", [4096], [32000, 50257, 128256, 151936, 256000],
               ["bfloat16", "float16", "float32"]),
        *_grid("cross_entropy", [4096], [32000, 128256, 256000], ["bfloat16"],
               label_smoothing=0.1),
        *_grid("cross_entropy", [4096], [32000, 128256, 256000], ["bfloat16"],
               ignore_frac=0.25),
        *_grid("cross_entropy", [1024, 2048, 8192, 16384], [128256], ["bfloat16"]),
        *_grid("focal", [4096], [1000, 8192, 32000, 128256], ["bfloat16", "float32"]),
        *_grid("sigmoid_focal", [16384, 65536, 262144, 1048576], [80],
               ["bfloat16", "float32"]),
        *_grid("info_nce", [4096, 16384, 65536, 131072], [512], ["bfloat16"]),
        *_grid("info_nce", [4096, 16384, 65536, 131072], [512], ["bfloat16"], symmetric=True),
        *_grid("info_nce", [16384, 65536], [1024], ["bfloat16"], symmetric=True),
        *_grid("linear_cross_entropy", [4096, 8192, 16384], [128256], ["bfloat16"], d=4096),
        Case("linear_cross_entropy", 16384, 128256, "bfloat16", d=4096, label_smoothing=0.1,
             ignore_frac=0.25),
        *_grid("jsd", [4096], [32000, 128256, 256000], ["bfloat16", "float32"]),
        *_grid("jsd", [4096], [128256], ["bfloat16"], beta=0.0),
        *_grid("linear_jsd", [4096, 8192, 16384], [128256], ["bfloat16"], d=4096),
        *_grid("siglip", [16384, 32768, 65536], [512], ["bfloat16"]),
        Case("siglip", 16384, 512, "float32"),
        LlamaStep("llama_step", 8 * 512, 32000, "bfloat16", d=256),
    ],
}


def parse_shapes(text):
    """'4096x32000,1024x128256' -> [(4096, 32000), (1024, 128256)]."""
    shapes = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        try:
            n, c = (int(v) for v in item.lower().split("x"))
        except ValueError:
            raise ValueError(f"a shape is NxC, e.g. 4096x32000; got {item!r}") from None
        shapes.append((n, c))
    return shapes


def select_cases(device_type, suite, losses=None, dtypes=None, shapes=None, **options):
    """The suite's cases for this device, filtered by losses and dtypes; or, when shapes
    are given, every loss x shape x dtype (float32 on a CPU, bfloat16 on a GPU by default),
    with `options` (label_smoothing, ignore_frac, symmetric) where the loss has them."""
    losses = [_canonical(name, ALIASES, LOSSES, "loss") for name in losses or []]
    dtypes = [_canonical(name, DTYPE_ALIASES, DTYPES, "dtype") for name in dtypes or []]
    if shapes:
        dtypes = dtypes or ["float32" if device_type == "cpu" else "bfloat16"]
        return [Case(loss, n, c, dtype,
                     **{k: v for k, v in options.items() if k in OPTIONS_OF[loss]})
                for loss, (n, c), dtype in itertools.product(losses or LOSSES, shapes, dtypes)]
    return [case for case in SUITES[(device_type, suite)]
            if (not losses or case.loss in losses) and (not dtypes or case.dtype in dtypes)]


OPTIONS_OF = {"cross_entropy": ("label_smoothing", "ignore_frac"), "focal": ("ignore_frac",),
              "sigmoid_focal": (), "info_nce": ("symmetric",),
              "linear_cross_entropy": ("label_smoothing", "ignore_frac", "d"),
              "jsd": ("ignore_frac",), "linear_jsd": ("ignore_frac", "d"), "siglip": (),
              "linear_log_probs": ("d",),
              "llama_step": ()}  # --shapes builds a plain Case: the hf providers refuse it


def _canonical(name, aliases, names, what):
    name = aliases.get(name, name)
    if name not in names:
        raise ValueError(f"unknown {what} {name!r}; choose from {', '.join(names)}")
    return name
