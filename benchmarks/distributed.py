"""The world > 1 cases: `case.world` spawned gloo ranks on this machine, each measuring
its own fwd+bwd (benchmarks.measure.measure_provider on its own share of the inputs) in
one process per rank, so that each rank's peak memory is its own RSS high-water mark. A
row is the slowest rank's times and the largest rank's peak memory.

Also, on its own (`python -m benchmarks.distributed`, see tp_head): the loss over a
ColwiseParallel LM head three ways, torch's loss_parallel and fusedloss's two."""
import argparse
import dataclasses
import datetime
import os
import socket
import tempfile

from . import cases, measure

TIMEOUT_S = 900


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank, port, case, providers, repeats, warmup, results, log_path):
    measure.output_to(log_path)
    import torch
    import torch.distributed as dist
    torch.set_num_threads(case.threads or max(1, (os.cpu_count() or 1) // case.world))
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


# ---------------------------------------------------------------- a tensor-parallel LM head
# `python -m benchmarks.distributed [--n N --d D --v V --world P]`: per rank, the time and
# peak memory of fwd+bwd of the loss over a ColwiseParallel LM head (its weight Shard(0)
# over the ranks, the hidden states replicated: each rank computes its N x V/P logits),
# three ways: torch's loss_parallel over the DTensor logits, fusedloss.cross_entropy over
# the same DTensor logits, and the fused head, linear_cross_entropy with the DTensor weight
# (no logits at all). Rows as the runner's, one per way.
@dataclasses.dataclass(frozen=True)
class TPHeadCase(cases.Case):
    def make_inputs(self, device, rank=0):
        """Rank `rank`'s share: the hidden states (N x D, the same on every rank), its
        contiguous V/P rows of the head, the global targets."""
        import torch
        gen = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(self.n, self.d, device=device, generator=gen)
        w = torch.randn(self.c, self.d, device=device, generator=gen) / self.d ** 0.5
        rows = self.c // self.world
        w = w[rank * rows:(rank + 1) * rows].clone()
        return x.requires_grad_(), w.requires_grad_(), self._class_targets(device, gen)


@dataclasses.dataclass(frozen=True)
class TPHeadProvider:  # as providers.Provider: a name, and build(case) -> fn(*inputs)
    name: str
    build: object


def _mesh():
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    return init_device_mesh("cpu", (dist.get_world_size(),))


def _dtensors(mesh, x, w):
    """The hidden states replicated and the head's rows Shard(0)."""
    from torch.distributed.tensor import DTensor, Replicate, Shard
    return (DTensor.from_local(x, mesh, [Replicate()]),
            DTensor.from_local(w, mesh, [Shard(0)]))


class _BackwardInLossParallel:
    """loss_parallel's backward must run inside its context too: the runner's
    loss.backward() does so here."""

    def __init__(self, loss):
        self.loss = loss

    def backward(self):
        from torch.distributed.tensor.parallel import loss_parallel
        with loss_parallel():
            self.loss.backward()


def _tp_loss_parallel(case):
    import torch.nn.functional as F
    from torch.distributed.tensor.parallel import loss_parallel
    mesh = _mesh()

    def fn(x, w, target):
        with loss_parallel():
            logits = F.linear(*_dtensors(mesh, x, w))      # (N, V) Shard(1)
            return _BackwardInLossParallel(F.cross_entropy(logits, target,
                                                           **case.loss_kwargs()))
    return fn


def _tp_fusedloss_logits(case):
    import torch.nn.functional as F

    import fusedloss
    mesh = _mesh()
    return lambda x, w, target: fusedloss.cross_entropy(F.linear(*_dtensors(mesh, x, w)),
                                                        target, **case.loss_kwargs())


def _tp_fusedloss_head(case):
    import fusedloss
    mesh = _mesh()
    return lambda x, w, target: fusedloss.linear_cross_entropy(*_dtensors(mesh, x, w), target,
                                                               **case.loss_kwargs())


TP_HEAD_PROVIDERS = [TPHeadProvider("torch loss_parallel", _tp_loss_parallel),
                     TPHeadProvider("fusedloss DTensor logits", _tp_fusedloss_logits),
                     TPHeadProvider("fusedloss fused head", _tp_fusedloss_head)]


def tp_head(n=4096, d=512, v=32000, world=2, repeats=3, warmup=1):
    """Rows of the three ways on one TPHeadCase (ignore_frac 1/7: padding)."""
    if v % world:
        raise ValueError(f"V={v} must be a multiple of the ranks ({world}): each rank's rows "
                         "are a DTensor's even Shard(0)")
    case = TPHeadCase("linear_cross_entropy", n, v, d=d, world=world, ignore_frac=1 / 7)
    return run_case(case, TP_HEAD_PROVIDERS, repeats, warmup)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Per-rank time and peak memory of the "
                                     "loss over a ColwiseParallel LM head, three ways.")
    for name, default in (("n", 4096), ("d", 512), ("v", 32000), ("world", 2),
                          ("repeats", 3), ("warmup", 1)):
        parser.add_argument(f"--{name}", type=int, default=default)
    args = parser.parse_args(argv)
    print(f"ColwiseParallel LM head, fwd+bwd, float32: N={args.n} D={args.d} V={args.v} over "
          f"{args.world} gloo ranks, {max(1, (os.cpu_count() or 1) // args.world)} thread(s) "
          f"each; {measure._cpu_model()}")
    print(f"{'':26} {'median ms':>10} {'peak MiB/rank':>14}  status")
    for row in tp_head(args.n, args.d, args.v, args.world, args.repeats, args.warmup):
        ms, peak = row.get("fwdbwd_ms"), row.get("peak_mem_mib")
        print(f"{row['provider']:26} {ms if ms is None else f'{ms:.0f}':>10} "
              f"{peak if peak is None else f'{peak:.0f}':>14}  {row['status']} {row['note']}")


if __name__ == "__main__":
    main()
