"""The sanitizers' test selection: which collected tests run under memcheck and racecheck,
made from the op registry (every op that declares a CUDA kernel must be called by a
selected opcheck) and the collected suite; made once (in a child, --internal plan) for
both tools."""
import importlib
import json
import sys
from pathlib import Path

from .common import FAIL, INTERNAL, TIMEOUT, first_error, shown
from .suite import suite_files

# The contract checks each loss inherits (tests/contract.py) that the sanitizers run on
# the cuda backend: opcheck calls every op its contract declares (and asserts it does),
# the float32 check runs the public function forward and backward.
SANITIZED_CHECKS = ("test_opcheck", "test_float32_matches_formula")


def internal_plan(out_json):
    """Collect the suite and report, per test, its file, function, contract ops and
    backend; and the ops of fusedloss._library.OPS that declare a CUDA kernel."""
    import pytest
    found = []

    class Collect:
        def pytest_collection_modifyitems(self, items):  # the pytest hook
            for it in items:
                params = getattr(getattr(it, "callspec", None), "params", {})
                backend = next((params[k] for k in ("backend", "kernel_backend", "gpu_backend")
                                if k in params), None)
                found.append({"id": it.nodeid, "file": it.nodeid.split("::")[0],
                              "test": getattr(it, "originalname", it.name),
                              "ops": list(getattr(it.cls, "ops", ()) or ()),
                              "backend": backend})

    rc = pytest.main(["--collect-only", "-qq", "-p", "no:cacheprovider",
                      *[shown(p) for p in suite_files()]], plugins=[Collect()])
    if rc != 0:
        sys.exit(f"collection failed (pytest exit {rc})")
    import torch
    from fusedloss import _library
    try:
        importlib.import_module("fusedloss._C_cuda")
        loaded = None
    except ImportError as exc:
        loaded = f"fusedloss._C_cuda does not import ({exc})"
    ops = []
    for op in _library.OPS.values():
        if "cuda" in op.backends:
            registered = None if loaded else torch._C._dispatch_has_kernel_for_dispatch_key(
                f"{_library.CPP_NS}::{op.kernel_op}", "CUDA")
            ops.append({"name": op.name, "kernel_op": op.kernel_op, "registered": registered})
    Path(out_json).write_text(json.dumps({"items": found, "cuda_ops": ops,
                                          "extension": loaded}))


def select_sanitized(plan):
    """The sanitizers' tests, from the op registry and the collected suite.

    memcheck: for every contract that declares one of the CUDA ops, its opcheck and
    float32 checks on the cuda backend (small shapes: the one-warp-per-row and strided
    row kernels, the sums, InfoNCE's kernels, every op including the in-place and
    backward ones), plus every cuda test of tests/test_gpu.py (rows longer than 1024:
    the block-per-row kernels, and N*V > 2^31 for the 64-bit offsets).
    racecheck (shared memory: the block reductions of the row kernels, the sum and
    InfoNCE kernels): the float32 checks, plus the first cuda test of each function of
    tests/test_gpu.py (one size per kernel: racecheck does not depend on the dtype).
    Returns (memcheck ids, racecheck ids, {op: ids that opcheck it}).
    """
    cuda_ops = {op["name"] for op in plan["cuda_ops"]}
    memcheck, racecheck, covers, seen = [], [], {name: [] for name in cuda_ops}, set()
    for it in plan["items"]:
        if it["backend"] != "cuda":
            continue
        if it["test"] in SANITIZED_CHECKS and cuda_ops & set(it["ops"]):
            memcheck.append(it["id"])
            if it["test"] == "test_opcheck":
                for op in cuda_ops & set(it["ops"]):
                    covers[op].append(it["id"])
            else:
                racecheck.append(it["id"])
        elif it["file"].endswith("tests/test_gpu.py"):
            memcheck.append(it["id"])
            if it["test"] not in seen:
                seen.add(it["test"])
                racecheck.append(it["id"])
    return memcheck, racecheck, covers


def sanitizer_plan(ctx, step, log):
    """The selection, made once for both tools; None (step marked failed) on error."""
    if ctx.plan is None:
        path = ctx.scratch / "plan.json"
        rc = ctx.call(step, [*INTERNAL, "plan", path], log)
        if rc != 0 or not path.exists():
            step.status = TIMEOUT if rc is None else FAIL
            step.note = f"test selection failed (exit {rc}): {first_error(log)}"
            return None
        plan = json.loads(path.read_text())
        memcheck, racecheck, covers = select_sanitized(plan)
        ctx.plan = {"raw": plan, "memcheck": memcheck, "racecheck": racecheck,
                    "covers": covers}
        with open(log, "a") as f:
            f.write("\nCUDA ops (fusedloss._library.OPS, backends including 'cuda'):\n")
            for op in plan["cuda_ops"]:
                ids = covers[op["name"]]
                f.write(f"  {op['name']} (kernels of {op['kernel_op']}, registered for CUDA: "
                        f"{op['registered']}): {', '.join(ids) or 'NO TEST'}\n")
            if plan["extension"]:
                f.write(f"  ({plan['extension']})\n")
            f.write(f"memcheck: {len(memcheck)} tests; racecheck: {len(racecheck)} tests\n")
    plan = ctx.plan
    uncovered = [op for op, ids in plan["covers"].items() if not ids]
    unregistered = [op["name"] for op in plan["raw"]["cuda_ops"] if op["registered"] is False]
    if not plan["covers"] or uncovered:
        step.status = FAIL
        step.note = ("no CUDA op in the registry" if not plan["covers"] else
                     "no selected test calls " + ", ".join(uncovered))
        return None
    if unregistered or (plan["raw"]["extension"] and not ctx.dry):
        step.status = FAIL
        step.note = (f"declared for CUDA but without a CUDA kernel: {', '.join(unregistered)}"
                     if unregistered else plan["raw"]["extension"])
        return None
    return plan
