"""Multi-process tests on gloo over 127.0.0.1: each test spawns its ranks itself, every run
bounded by a timeout, so that a hang fails instead of stalling CI."""
import datetime
import os
import socket
import traceback

import pytest
import torch.multiprocessing as mp

TIMEOUT_S = 300


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, rank, world_size, port, errors, args):
    import torch.distributed as dist
    os.environ.setdefault("TRITON_INTERPRET", "1")  # as conftest: Triton on CPU tensors
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world_size,
                                timeout=datetime.timedelta(seconds=TIMEOUT_S // 2))
        try:
            fn(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
    except BaseException:  # noqa: B902 - report anything, including a failed assert
        errors.put((rank, traceback.format_exc()))
        raise


def run_ranks(fn, world_size, *args, timeout=TIMEOUT_S):
    """Run fn(rank, world_size, *args) on `world_size` spawned ranks of a gloo group;
    fail with the first rank's traceback, or when they have not all ended in `timeout`."""
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    port = _free_port()
    procs = [ctx.Process(target=_entry, args=(fn, rank, world_size, port, errors, args),
                         daemon=True) for rank in range(world_size)]
    for p in procs:
        p.start()
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout)
    for p in procs:
        p.join(max(0.0, (deadline - datetime.datetime.now()).total_seconds()))
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
    if not errors.empty():
        rank, text = errors.get()
        pytest.fail(f"rank {rank} of {world_size} failed:\n{text}")
    if hung:
        pytest.fail(f"{len(hung)} of {world_size} ranks still running after {timeout} s "
                    "(a hang): killed")
    bad = [p.exitcode for p in procs if p.exitcode != 0]
    if bad:
        pytest.fail(f"ranks exited with {bad}")
