"""Multi-process tests on gloo over 127.0.0.1: each test spawns its ranks itself, every run
bounded by a timeout, so that a hang fails instead of stalling CI. (tests/test_gpu.py runs
one rank of an NCCL group the same way.)"""
import datetime
import os
import socket
import time
import traceback
from multiprocessing.connection import wait

import pytest
import torch.multiprocessing as mp

TIMEOUT_S = 300


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, rank, world_size, port, errors, done, args, group_backend):
    import torch.distributed as dist
    if group_backend == "gloo":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # as conftest: Triton on CPU tensors
    else:  # nccl: a GPU a rank
        import torch
        torch.cuda.set_device(rank)
    try:
        dist.init_process_group(group_backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world_size,
                                timeout=datetime.timedelta(seconds=TIMEOUT_S // 2))
        try:
            fn(rank, world_size, *args)
            done.put(rank)
        finally:
            dist.destroy_process_group()
    except BaseException:  # noqa: B902 - report anything, including a failed assert
        errors.put((rank, traceback.format_exc()))
        raise


def run_ranks(fn, world_size, *args, timeout=TIMEOUT_S, group_backend="gloo"):
    """Run fn(rank, world_size, *args) on `world_size` spawned ranks of a gloo (or, with
    group_backend="nccl", an NCCL) group; fail with the first rank's traceback, or when they
    have not all ended in `timeout`."""
    ctx = mp.get_context("spawn")
    errors, done = ctx.SimpleQueue(), ctx.SimpleQueue()
    port = _free_port()
    procs = [ctx.Process(target=_entry, args=(fn, rank, world_size, port, errors, done, args,
                                               group_backend),
                         daemon=True) for rank in range(world_size)]
    for p in procs:
        p.start()
    # Wait until every rank has done its work, one has failed (the others may wait on it
    # until the group's own timeout), or the deadline. A rank whose work is done gets a
    # grace period to leave: torch 2.5's gloo can hang in destroy_process_group after it.
    deadline = time.monotonic() + timeout
    finished = set()
    while time.monotonic() < deadline:
        wait([p.sentinel for p in procs if p.is_alive()], timeout=0.2)
        while not done.empty():
            finished.add(done.get())
        if any(p.exitcode not in (None, 0) for rank, p in enumerate(procs)
               if rank not in finished):
            break
        if all(rank in finished or not p.is_alive() for rank, p in enumerate(procs)):
            for p in procs:
                p.join(10)
            break
    while not done.empty():
        finished.add(done.get())
    hung = [p for rank, p in enumerate(procs) if p.is_alive() and rank not in finished]
    # A rank that died after its work was done and checked (torch 2.14's FSDP2 on gloo
    # sometimes aborts at interpreter exit: "terminate called without an active
    # exception") is not a failure of the test.
    bad = [p.exitcode for rank, p in enumerate(procs)
           if p.exitcode not in (None, 0) and rank not in finished]
    for p in procs:
        if p.is_alive():
            p.kill()
    if not errors.empty():
        rank, text = errors.get()
        pytest.fail(f"rank {rank} of {world_size} failed:\n{text}")
    if bad:
        pytest.fail(f"ranks exited with {bad}" + (f"; {len(hung)} killed" if hung else ""))
    if hung:
        pytest.fail(f"{len(hung)} of {world_size} ranks still running after {timeout} s "
                    "(a hang): killed")
