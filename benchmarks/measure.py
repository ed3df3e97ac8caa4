"""How it is measured: timing, peak memory, copy bandwidth, and one process per case.

Every case runs in a fresh spawned worker process that measures its providers one after
the other: a crash, a hang or the kernel's OOM killer costs one row, not the run, and the
worker's peak RSS is the CPU's memory measurement. Per provider, in the worker:
  1. build it and run fwd+bwd WARMUP times (torch.compile compiles, Triton autotunes);
  2. peak memory of one fwd+bwd above what was live before it (inputs included):
     CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats;
     CPU:  VmHWM after resetting it to VmRSS (/proc/self/clear_refs), minus that VmRSS;
  3. `repeats` timed fwd+bwd steps: stamps before the forward, between forward and
     backward, after the backward (CUDA events on a GPU, time.perf_counter on a CPU);
     gradients are set to None between steps, so each backward allocates its gradient.
Out of memory is a row with status "OOM": a torch.OutOfMemoryError, MemoryError or
RuntimeError saying so, or the worker killed by SIGKILL (the kernel's OOM killer).
"""
import gc
import multiprocessing
import os
import signal
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

import torch

WARMUP = {"cpu": 2, "cuda": 3}
REPEATS = {"cpu": 5, "cuda": 20}
PROVIDER_TIMEOUT_S = 900
# Without this glibc keeps freed blocks under its (adaptive, up to 32 MiB) mmap threshold
# for reuse, and a step that reuses them never raises the RSS: peaks would read low.
WORKER_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


# ---------------------------------------------------------------- timing
def _stamp(device):
    if device.type == "cuda":
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event
    return time.perf_counter()


def _ms(start, end):
    return start.elapsed_time(end) if isinstance(start, torch.cuda.Event) \
        else (end - start) * 1e3


def time_segments(device, repeats, before, *segments):
    """Run `before` untimed, then `segments` back to back, `repeats` times.
    Returns one list of times in ms per segment."""
    marks = []
    for _ in range(repeats):
        before()
        stamps = [_stamp(device)]
        for segment in segments:
            segment()
            stamps.append(_stamp(device))
        marks.append(stamps)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return [[_ms(m[i], m[i + 1]) for m in marks] for i in range(len(segments))]


def percentiles(samples):
    """(median, 20th, 80th percentile)."""
    q = torch.tensor(samples, dtype=torch.float64).quantile(
        torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64))
    return tuple(q.tolist())


# ---------------------------------------------------------------- memory
def _proc_status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} is not in /proc/self/status")


def _reset_rss_peak():
    """Set VmHWM to the current VmRSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_memory_mib(device, step):
    """Peak memory of one call of `step` above what was live before it, in MiB; None
    where the platform cannot tell."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    if not _reset_rss_peak():
        return None
    base = _proc_status_kib("VmRSS")
    step()
    # The kernel updates VmHWM lazily: when the step frees more than it held at its peak,
    # the mark can read a few pages below `base`. Nothing measurable was allocated then.
    return max(0, _proc_status_kib("VmHWM") - base) / 1024


# ---------------------------------------------------------------- one case, in process
def is_oom(exc):
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text
                                              or "can't allocate memory" in text)


def failure(exc):
    """(status, note) for an exception raised while measuring."""
    lines = str(exc).strip().splitlines()
    note = f"{type(exc).__name__}: {lines[0] if lines else ''}"
    return ("OOM" if is_oom(exc) else "error"), note[:300]


def case_row(case, provider_name, status, note="", **metrics):
    return {"loss": case.loss, "n": case.n, "c": case.c, "dtype": case.dtype,
            "label_smoothing": case.label_smoothing, "ignore_frac": case.ignore_frac,
            "symmetric": case.symmetric, "d": case.d, "world": case.world,
            "exchange": case.exchange, "options": case.options,
            "min_bytes": case.min_bytes(), "flops": case.flops(),
            "provider": provider_name, "status": status, "note": note, **metrics}


def measure_provider(case, provider, inputs, device, repeats, warmup):
    """One provider on one case's inputs: a row with times, peak memory and status."""
    leaves = [t for t in inputs if t.requires_grad]
    box = {}

    def clear_grads():
        for t in leaves:
            t.grad = None

    def forward():
        box["loss"] = fn(*inputs)

    def backward():
        box.pop("loss").backward()

    try:
        fn = provider.build(case)
        time_segments(device, warmup, clear_grads, forward, backward)
        clear_grads()
        peak = peak_memory_mib(device, lambda: (forward(), backward()))
        fwd, bwd = time_segments(device, repeats, clear_grads, forward, backward)
    except Exception as exc:  # MemoryError and torch.OutOfMemoryError included
        return case_row(case, provider.name, *failure(exc))
    finally:
        box.clear()
        clear_grads()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    metrics = {"peak_mem_mib": peak, "repeats": repeats}
    for name, samples in (("fwd", fwd), ("bwd", bwd),
                          ("fwdbwd", [a + b for a, b in zip(fwd, bwd)])):
        metrics[f"{name}_ms"], metrics[f"{name}_ms_p20"], metrics[f"{name}_ms_p80"] = \
            percentiles(samples)
    return case_row(case, provider.name, "ok", **metrics)


def run_case(case, providers, device, repeats, warmup, send):
    """Measure `providers` on `case` in this process. send(("start", name)) before each
    provider and send(("row", row)) after it."""
    device = torch.device(device)
    torch.manual_seed(0)
    if case.threads:
        torch.set_num_threads(case.threads)
    try:
        inputs = case.make_inputs(device)
    except Exception as exc:
        status, note = failure(exc)
        for p in providers:
            send(("row", case_row(case, p.name, status, f"allocating the inputs: {note}")))
        return
    for p in providers:
        send(("start", p.name))
        send(("row", measure_provider(case, p, inputs, device, repeats, warmup)))


# ---------------------------------------------------------------- one case, isolated
def output_to(log_path):
    """Send this process's stdout and stderr to `log_path`: a worker's compiler chatter
    and warnings must not break the parent's progress bar."""
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def log_tail(log, lines=3):
    return " | ".join(log.read().strip().splitlines()[-lines:])


def _worker(conn, log_path, case, providers, device, repeats, warmup):
    output_to(log_path)
    run_case(case, providers, device, repeats, warmup, conn.send)
    conn.close()


def spawn_context():
    os.environ.update(WORKER_ENV)  # read by the worker's C library at its start
    return multiprocessing.get_context("spawn")


def run_case_isolated(case, providers, device, repeats, warmup, on_row=None,
                      timeout_s=PROVIDER_TIMEOUT_S):
    """run_case in a spawned worker process. A worker that dies or hangs gives the
    provider it was measuring a row ("OOM" when killed by SIGKILL, else "error" or
    "timeout") and a new worker goes on with the providers after it."""
    ctx = spawn_context()
    rows, remaining = [], list(providers)

    def add(row):
        rows.append(row)
        if on_row:
            on_row(row)

    while remaining:
        reader, writer = ctx.Pipe(duplex=False)
        with tempfile.NamedTemporaryFile("r", suffix=".log") as log:
            proc = ctx.Process(target=_worker, daemon=True, args=(
                writer, log.name, case, remaining, device, repeats, warmup))
            proc.start()
            writer.close()
            current, timed_out = None, False
            while True:
                if not reader.poll(timeout_s):
                    timed_out = True
                    proc.kill()
                    break
                try:
                    kind, payload = reader.recv()
                except EOFError:  # the worker exited
                    break
                if kind == "start":
                    current = payload
                else:
                    add(payload)
                    remaining = [p for p in remaining if p.name != payload["provider"]]
                    current = None
            proc.join()
            reader.close()
            if not remaining:
                break
            tail = log_tail(log)
        if timed_out:
            status, note = "timeout", f"no result within {timeout_s} s"
        elif proc.exitcode == -signal.SIGKILL:
            status, note = "OOM", "the worker was killed (SIGKILL), most likely out of memory"
        else:
            status, note = "error", f"the worker died (exit code {proc.exitcode}): {tail}"
        # The provider being measured failed; without one, the worker died before any.
        victims = remaining[:1] if current else remaining
        for p in victims:
            add(case_row(case, p.name, status, note[:300]))
        remaining = remaining[len(victims):]
    return rows


# ---------------------------------------------------------------- the device
def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or platform.machine() or "unknown CPU"


def _probe(device_type, repeats):
    device = torch.device(device_type)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_model()
    # Copy bandwidth: one read and one write of a buffer far larger than any cache.
    numel = (1 << 30 if device.type == "cuda" else 1 << 28) // 4
    src = torch.ones(numel, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    (times,) = time_segments(device, repeats, lambda: None, lambda: dst.copy_(src))
    return {"device_name": name, "threads": torch.get_num_threads(),
            "copy_gbps": 2 * src.nbytes / (percentiles(times)[0] / 1e3) / 1e9}


def probe_device(device_type, repeats=10):
    """Device name, CPU threads and copy bandwidth (GB/s). A GPU is probed from a worker
    process: a CUDA context in the runner would hold GPU memory through every case."""
    if device_type == "cpu":
        return _probe(device_type, repeats)
    with ProcessPoolExecutor(1, mp_context=spawn_context()) as pool:
        return pool.submit(_probe, device_type, repeats).result()
