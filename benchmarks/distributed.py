"""The world > 1 cases: `case.world` spawned gloo ranks on this machine, each measuring
its own fwd+bwd (benchmarks.measure.measure_provider on its own share of the inputs) in
one process per rank, so that each rank's peak memory is its own RSS high-water mark. A
row is the slowest rank's times and the largest rank's peak memory."""
import datetime
import os
import socket
import tempfile

from . import measure

TIMEOUT_S = 900


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank, port, case, providers, repeats, warmup, results, log_path):
    measure.output_to(log_path)
    import torch
    import torch.distributed as dist
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // case.world))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=case.world,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))
    device = torch.device("cpu")
    try:
        inputs = case.make_inputs(device, rank=rank)
        for p in providers:
            results.put((rank, measure.measure_provider(case, p, inputs, device, repeats,
                                                        warmup)))
    finally:
        dist.destroy_process_group()


def run_case(case, providers, repeats, warmup, on_row=None):
    """Rows of `providers` on a world > 1 case (status "timeout" or "error" for all of them
    when a rank hangs or dies)."""
    ctx = measure.spawn_context()
    results = ctx.SimpleQueue()
    port = _free_port()
    with tempfile.NamedTemporaryFile("r", suffix=".log") as log:
        procs = [ctx.Process(target=_rank, daemon=True, args=(
            r, port, case, providers, repeats, warmup, results, log.name))
            for r in range(case.world)]
        for p in procs:
            p.start()
        deadline = datetime.datetime.now() + datetime.timedelta(seconds=TIMEOUT_S)
        for p in procs:
            p.join(max(0.0, (deadline - datetime.datetime.now()).total_seconds()))
        hung = [p for p in procs if p.is_alive()]
        failed = [p for p in procs if p in hung or p.exitcode != 0]
        for p in hung:
            p.kill()
        tail = measure.log_tail(log) if failed else ""
    per_rank = {}
    while not results.empty():
        rank, row = results.get()
        per_rank.setdefault(row["provider"], []).append(row)
    rows = []
    for p in providers:
        got = per_rank.get(p.name, [])
        if len(got) < case.world or failed:
            status = "timeout" if hung else "error"
            row = measure.case_row(case, p.name, status,
                                   f"{len(failed)} of {case.world} ranks failed or hung: "
                                   f"{tail}"[:300])
        elif any(r["status"] != "ok" for r in got):
            row = next(r for r in got if r["status"] != "ok")
        else:
            row = dict(got[0])
            for key in [k for k in row if k.endswith("_ms") or "_ms_p" in k]:
                row[key] = max(r[key] for r in got)
            peaks = [r["peak_mem_mib"] for r in got if r["peak_mem_mib"] is not None]
            row["peak_mem_mib"] = max(peaks) if peaks else None
        rows.append(row)
        if on_row:
            on_row(row)
    return rows
