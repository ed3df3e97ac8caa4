"""Steps memcheck and racecheck: compute-sanitizer over the selected tests (selection.py),
both into sanitizer.log; a dry run collects the selection and looks for the tool."""
import os
import re
import shutil
import subprocess

from .common import ABSENT, DRY_OK, FAIL, PASS, PYTEST, TIMEOUT, last_match, pytest_tail
from .selection import sanitizer_plan

SANITIZER_ERRORS_EXIT = 86


def _sanitizer_path():
    homes = [os.environ.get("CUDA_HOME"), "/usr/local/cuda"]
    return shutil.which("compute-sanitizer") or next(
        (os.path.join(h, "bin", "compute-sanitizer") for h in homes
         if h and os.path.exists(os.path.join(h, "bin", "compute-sanitizer"))), None)


def _sanitize(ctx, step, tool):
    log = ctx.out / step.log
    with open(log, "a") as f:
        f.write(f"\n{'=' * 30} {tool} {'=' * 30}\n")
    plan = sanitizer_plan(ctx, step, log)
    if plan is None:
        _result_line(log, tool, step)
        return
    ids = plan[tool]
    sanitizer = _sanitizer_path()
    if ctx.dry:
        rc = ctx.call(step, [*PYTEST, "--collect-only", "-q", *ids], log)
        if rc != 0:
            step.status = TIMEOUT if rc is None else FAIL
            step.note = f"the selection does not collect (exit {rc})"
        elif sanitizer is None:
            step.status = ABSENT
            step.note = f"compute-sanitizer not found; {len(ids)} tests selected and collected"
        else:
            rc = ctx.call(step, [sanitizer, "--version"], log)
            step.status = DRY_OK if rc == 0 else FAIL
            step.note = f"{sanitizer} present; {len(ids)} tests selected and collected"
        _result_line(log, tool, step)
        return
    if sanitizer is None:
        step.status = FAIL
        step.note = "compute-sanitizer not found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin)"
        _result_line(log, tool, step)
        return
    # torch's caching allocator is off, so that an access past a tensor's end leaves its
    # cudaMalloc block instead of landing in a neighbour's. memcheck instruments every
    # kernel (a filter that matched nothing would pass silently); racecheck only
    # fusedloss's, whose names all hold "fusedloss" (namespace fusedloss::cuda): torch's
    # and cuBLAS's shared-memory kernels would multiply its time.
    cmd = [sanitizer, "--tool", tool, "--error-exitcode", SANITIZER_ERRORS_EXIT,
           "--print-limit", "50"]
    if tool == "racecheck":
        help_run = subprocess.run([sanitizer, "--help"], capture_output=True, text=True,
                                  timeout=30)
        if "--kernel-name" in help_run.stdout + help_run.stderr:
            cmd += ["--kernel-name", "kns=fusedloss"]
        else:
            with open(log, "a") as f:
                f.write("[gpu_validate] this compute-sanitizer has no --kernel-name: every "
                        "kernel is checked (slower)\n")
    env = dict(ctx.env, PYTORCH_NO_CUDA_MEMORY_CACHING="1", FUSEDLOSS_REQUIRE_BACKENDS="cuda")
    start = log.stat().st_size  # both tools share the log: read this run's part only
    rc = ctx.call(step, [*cmd, *PYTEST, "-q", "-ra", *ids], log, env=env)
    summary = last_match(log, r"ERROR SUMMARY: \d+ error", start=start)
    errors = int(re.search(r"(\d+) error", summary).group(1)) if summary else None
    hazards = last_match(log, r"RACECHECK SUMMARY", start=start)
    unsupported = last_match(log, r"Device not supported", start=start)
    tests = pytest_tail(log, start)
    skipped = re.search(r"(\d+) skipped", tests)
    if rc is None:
        step.status, what = TIMEOUT, "killed at the limit"
    elif rc == 0 and errors == 0 and skipped:  # a skipped test checked nothing
        step.status, what = FAIL, f"0 errors, but {skipped.group(1)} selected tests skipped"
    elif rc == 0 and errors == 0:
        step.status, what = PASS, "0 errors"
    elif errors:
        step.status, what = FAIL, f"{errors} errors"
    elif unsupported:
        step.status, what = FAIL, f"compute-sanitizer cannot run here: {unsupported}"
    else:
        step.status = FAIL
        what = f"exit {rc} ({'no error summary' if errors is None else '0 errors'})"
    step.note = "; ".join(filter(None, [what, tests, hazards.strip("= ")]))
    _result_line(log, tool, step)


def _result_line(log, tool, step):
    with open(log, "a") as f:
        f.write(f"\n{tool}: {step.status.upper()}: {step.note}\n")


def step_memcheck(ctx, step):
    _sanitize(ctx, step, "memcheck")


def step_racecheck(ctx, step):
    _sanitize(ctx, step, "racecheck")
