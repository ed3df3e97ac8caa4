"""End to end: one training step (forward, backward, AdamW step) of a small Llama (or, with
--model mixtral, a mixture of experts with its router's auxiliary loss on) built from a
config (no download), with its loss computed three ways:

  hf                   transformers' own: the (B, T, V) logits, then ForCausalLMLoss
  hf-fusedloss-ce      fusedloss.integrations.transformers.apply(model, fused_linear=False):
                       the logits, then fusedloss.cross_entropy
  hf-fusedloss-linear  fusedloss.integrations.transformers.apply(model): no logits,
                       fusedloss.linear_cross_entropy from the hidden states

    python -m benchmarks.e2e                              # 8 x 512 tokens, D 256, 4 layers, V 32000
    python -m benchmarks.e2e --batch 2 --seq 256          # smaller
    python -m benchmarks.e2e --model mixtral              # a mixture of experts
    python -m benchmarks --loss llama_step                # in the runner's table

Here each provider runs in a fresh worker process (as the runner's cases do): the step
time is the median, with the 20th and 80th percentiles, of `steps` steps after `warmup`;
tokens/s is batch x seq over that median; peak memory is the worker's peak above its
baseline after the imports, so it holds the model, its gradients, AdamW's state and the
step's activations (measure.peak_memory_mib: the RSS high-water mark on a CPU,
max_memory_allocated on a GPU).

In the runner (`--loss llama_step`, cases.LlamaStep, the "hf*" providers) the same step is
split as every case is: "fwd" is the previous step's AdamW update plus the forward, "bwd"
the backward, and peak memory is above what is live before the step (the model, its
gradients and AdamW's state), i.e. the step's activations.
"""
import argparse
import sys
from concurrent.futures import ProcessPoolExecutor

import torch

from . import llama, measure, report
from .llama import build, parameter_count, step_flops  # noqa: F401  (e2e's names, kept)

PROVIDERS = tuple(llama.PATCHES)
SIZES = {"batch": 8, "seq": 512, "hidden": 256, "layers": 4, "vocab": 32000}


def measure_step(provider, *, batch, seq, hidden, layers, vocab, device="cpu",
                 dtype="float32", steps=5, warmup=2, model="llama"):
    """In this process: step time and peak memory of `provider` (see the module docstring)."""
    import fusedloss.integrations.transformers  # noqa: F401  (imports: in the baseline)
    import transformers  # noqa: F401
    device, out = torch.device(device), {}

    def run():
        net, optimizer = llama.build(provider, hidden=hidden, layers=layers, vocab=vocab,
                                     seq=seq, device=device, dtype=dtype, model=model)
        ids = llama.token_ids(batch, seq, vocab, device)
        step = lambda: llama.train_step(net, optimizer, ids)  # noqa: E731
        measure.time_segments(device, warmup, lambda: None, step)
        (out["times"],) = measure.time_segments(device, steps, lambda: None, step)

    peak = measure.peak_memory_mib(device, run)
    median, p20, p80 = measure.percentiles(out["times"])
    return {"provider": provider, "status": "ok", "step_ms": median, "step_ms_p20": p20,
            "step_ms_p80": p80, "tokens_per_s": batch * seq / (median / 1e3),
            "peak_mem_mib": peak}


def run(providers=PROVIDERS, **kwargs):
    """measure_step for each provider, each in a fresh worker process; a failure is a row
    with its status ("OOM" or "error") and a note."""
    rows = []
    for provider in providers:
        with ProcessPoolExecutor(1, mp_context=measure.spawn_context()) as pool:
            try:
                rows.append(pool.submit(measure_step, provider, **kwargs).result())
            except Exception as exc:  # a worker killed (OOM killer) is a BrokenProcessPool
                status, note = measure.failure(exc)
                rows.append({"provider": provider, "status": status, "note": note})
    return rows


def table(rows):
    """Plain-text table; speed-up and memory ratio against "hf"."""
    num = report.fmt_num
    base = next((r for r in rows if r["provider"] == "hf" and r["status"] == "ok"), None)
    header = ["provider", "step ms [p20, p80]", "tokens/s", "peak MiB", "speed-up",
              "mem ratio", "status"]
    body = []
    for r in rows:
        if r["status"] != "ok":
            body.append([r["provider"], "-", "-", "-", "-", "-", f"{r['status']}: {r['note']}"])
            continue
        speedup = base["step_ms"] / r["step_ms"] if base else None
        ratio = r["peak_mem_mib"] / base["peak_mem_mib"] \
            if base and base["peak_mem_mib"] and r["peak_mem_mib"] is not None else None
        body.append([r["provider"],
                     f"{num(r['step_ms'])} [{num(r['step_ms_p20'])}, {num(r['step_ms_p80'])}]",
                     num(r["tokens_per_s"]), num(r["peak_mem_mib"]), num(speedup, "x"),
                     num(ratio, "x"), "ok"])
    widths = [max(len(x) for x in col) for col in zip(header, *body)]
    fmt = lambda cells: "  ".join(  # noqa: E731
        x.ljust(w) if i == 0 else x.rjust(w) for i, (x, w) in enumerate(zip(cells, widths)))
    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(r) for r in body])


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.e2e", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default in SIZES.items():
        p.add_argument(f"--{name}", type=int, default=default, help=f"default {default}")
    p.add_argument("--device", choices=["cpu", "cuda"],
                   help="default: cuda when available, else cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="default: float32 on a CPU, bfloat16 on a GPU")
    p.add_argument("--steps", type=int, default=5, help="timed steps (default 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    p.add_argument("--providers", nargs="+", choices=list(PROVIDERS), default=list(PROVIDERS))
    p.add_argument("--model", choices=llama.MODELS, default="llama",
                   help="llama (default) or mixtral (4 experts, 2 per token, aux loss on)")
    args = p.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("float32" if device == "cpu" else "bfloat16")
    sizes = {name: getattr(args, name) for name in SIZES}
    print(f"{args.model} training step: batch {args.batch} x seq {args.seq} tokens, hidden "
          f"{args.hidden}, {args.layers} layers, vocab {args.vocab}, {dtype} on {device}; "
          f"{args.steps} timed steps after {args.warmup}", flush=True)
    rows = run(args.providers, **sizes, device=device, dtype=dtype, steps=args.steps,
               warmup=args.warmup, model=args.model)
    print(table(rows))
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
