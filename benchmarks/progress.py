"""The runner's progress bar, with an estimate of the time left.

The bar counts estimated seconds, not runs: a torch.compile run or a large case weighs
more than a small eager one. The estimates are rough on purpose; the time left shown is
(estimated work left) x (real seconds per estimated second so far), so the bar corrects
them for this machine and its load as the run goes. With tqdm missing, a line per case.
"""
import sys
import time

from . import measure

WORKER_S = 4.0          # a fresh worker process: interpreter, torch and fusedloss imports
TRANSFORMERS_S = 12.0   # importing transformers, building the model for each provider
COMPILE_S = 15.0        # torch.compile's first compile of a loss in a fresh worker
# What one fwd+bwd step moves and computes per second, roughly (eager PyTorch, fused
# kernels and torch.compile together; the 2-core CPU figures are from benchmarks/results).
BYTES_PER_S = {"cpu": 1.5e9, "cuda": 1e12}
FLOPS_PER_S = {"cpu": 1.5e11, "cuda": 2e14}


def run_seconds(case, provider, device, repeats):
    """Rough seconds of one provider on one case: its steps, and its compile if any."""
    steps = measure.WARMUP[device] + 1 + repeats
    step = case.min_bytes() / BYTES_PER_S[device] + case.flops() / FLOPS_PER_S[device]
    return steps * step * case.world + (COMPILE_S if provider.name == "torch.compile" else 0)


def case_seconds(case, providers, device, repeats):
    """Rough seconds of a case: its worker processes (one per rank), then its providers."""
    start = WORKER_S * case.world + (TRANSFORMERS_S if case.loss == "llama_step" else 0)
    return start + sum(run_seconds(case, p, device, repeats) for p in providers)


class Bar:
    """tqdm over estimated seconds, or a line per case without it."""

    FORMAT = "{percentage:3.0f}%|{bar}| {elapsed} elapsed, ~{remaining} left{postfix}"

    def __init__(self, total_s):
        self.total, self.done, self.case_left = total_s, 0.0, 0.0
        self.started = time.perf_counter()
        try:
            from tqdm import tqdm
        except ImportError:  # tqdm comes with the "bench" extra
            self.tqdm = None
        else:  # smoothing=0: the rate over the whole run, the fairest with uneven steps
            self.tqdm = tqdm(total=total_s, bar_format=self.FORMAT, smoothing=0,
                             dynamic_ncols=True, file=sys.stderr)

    def case(self, index, count, text, seconds):
        """A case starts: `seconds` is its estimate, which its advances then spend."""
        self.case_left = seconds
        if self.tqdm is not None:
            self.tqdm.set_postfix_str(f"case {index}/{count}: {text}")
            return
        left = self.left_s()
        print(f"[{index}/{count}] {text}  ({time.perf_counter() - self.started:.0f} s elapsed"
              + (f", about {left:.0f} s left)" if left is not None else ")"),
              file=sys.stderr, flush=True)

    def advance(self, seconds):
        seconds = max(0.0, min(seconds, self.case_left))
        self.case_left -= seconds
        self.done += seconds
        if self.tqdm is not None:
            self.tqdm.update(seconds)

    def end_case(self):
        self.advance(self.case_left)

    def left_s(self):
        """Seconds left at the rate so far; None before anything is done."""
        elapsed = time.perf_counter() - self.started
        return elapsed * (self.total - self.done) / self.done if self.done else None

    def close(self):
        if self.tqdm is not None:
            self.tqdm.close()
