"""The run: the table of steps with their time shares, each step under its limit, the
arguments, and main()."""
import argparse
import math
import os
import shutil
import sys
import time
from pathlib import Path

from . import bench, build, env, peers, sanitizer, selection, suite
from .common import ABSENT, DRY_OK, FAIL, NOT_RUN, PASS, ROOT, Context, Step
from .summary import OUTPUTS, failing, write_summary

DEFAULT_BUDGET_S = 480  # about 8 minutes on an H200
USAGE = sys.modules[__package__].__doc__  # the package's docstring: usage and steps


def steps_table():
    """The steps, with their time shares (seconds) and the files they write."""
    return [
        # name, share_s, min_s, kept, required, fatal, log, run
        Step("env", 30, 10, True, True, True, "env.txt", env.step_env),
        Step("build", 240, 60, True, True, True, "build.log", build.step_build),
        Step("peers", 30, 5, True, False, False, "peers.log", peers.step_peers),
        Step("tests", 200, 60, True, True, False, "tests.log, tests.xml", suite.step_tests),
        Step("memcheck", 75, 30, True, True, False, "sanitizer.log", sanitizer.step_memcheck),
        Step("racecheck", 60, 20, True, True, False, "sanitizer.log",
             sanitizer.step_racecheck),
        # The benchmarks take what is left: the full suite, then the large one.
        Step("bench", math.inf, 30, True, False, False, "bench-<device>.tar.gz",
             bench.step_bench),
        Step("bench-large", math.inf, 120, False, False, False, "bench-<device>.tar.gz",
             bench.step_bench_large),
    ]


def run_steps(ctx, steps):
    for i, step in enumerate(steps):
        if ctx.stopped_by:
            step.status, step.note = NOT_RUN, f"stopped after {ctx.stopped_by}"
            continue
        reserve = sum(s.min_s for s in steps[i + 1:] if s.kept)
        allowed = min(step.share_s, ctx.left() - reserve)
        if allowed < step.min_s:
            step.status = NOT_RUN
            step.note = (f"budget spent: {max(ctx.left(), 0):.0f} s left, {reserve:.0f} s of "
                         f"it kept for the steps after this one; needs {step.min_s:.0f} s")
            write_summary(ctx, steps)
            continue
        step.limit_s = allowed
        step.deadline = time.monotonic() + allowed
        print(f"[gpu_validate] {step.name}: start (limit {allowed:.0f} s)", flush=True)
        start = time.monotonic()
        try:
            step.run(ctx, step)
        except Exception as exc:  # a bug or an unreadable file: the step fails, not the run
            step.status, step.note = FAIL, f"{type(exc).__name__}: {exc}"
        step.seconds = time.monotonic() - start
        print(f"[gpu_validate] {step.name}: {step.status} in {step.seconds:.1f} s"
              f"{': ' + step.note if step.note else ''}", flush=True)
        if step.fatal and step.status not in (PASS, DRY_OK, ABSENT):
            ctx.stopped_by = f"{step.name}: {step.status}"
            print(f"[gpu_validate] STOPPING: step {step.name}: {step.status}; see "
                  f"{ctx.out / step.log}", flush=True)
        write_summary(ctx, steps)


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="gpu_validate.sh", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=USAGE.split("\n\n")[0],
        epilog="\n\n".join(USAGE.split("\n\n")[2:]))
    p.add_argument("out_dir", metavar="OUT_DIR",
                   help="where the logs, the summary and the results go (created if needed)")
    p.add_argument("--dry-run", action="store_true",
                   help="check every step without a GPU (nothing is built or run on one)")
    p.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S, metavar="N",
                   help=f"seconds for the whole run (default {DEFAULT_BUDGET_S}); later "
                        "optional steps are skipped when it is spent")
    p.add_argument("--wheels", type=Path, metavar="DIR",
                   help="folder of peer wheels (default: $FUSEDLOSS_WHEELS, else .whl in the "
                        "repository root, where the device tool's carry puts them)")
    args = p.parse_args(argv)
    if not args.out_dir.strip():
        p.error("OUT_DIR is empty")
    args.out_dir = Path(args.out_dir)
    if not args.budget_s > 0:
        p.error(f"--budget-s must be a positive number of seconds, got {args.budget_s:g}")
    if args.out_dir.exists() and not args.out_dir.is_dir():
        p.error(f"OUT_DIR {args.out_dir} exists and is not a directory")
    if args.wheels is not None and not args.wheels.is_dir():
        p.error(f"--wheels {args.wheels} is not a directory")
    args.wheels = (args.wheels or Path(os.environ.get("FUSEDLOSS_WHEELS") or ROOT / ".whl"))
    args.out_dir = args.out_dir.resolve()
    args.wheels = args.wheels.resolve()
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--internal"]:
        internal = {"env": env.internal_env, "buildcheck": build.internal_buildcheck,
                    "plan": selection.internal_plan}
        internal[argv[1]](*argv[2:])
        return 0
    args = parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name in OUTPUTS:
        (args.out_dir / name).unlink(missing_ok=True)
    for old in args.out_dir.glob("bench-*.tar.gz*"):
        old.unlink()
    ctx = Context(args)
    steps = steps_table()
    print(f"[gpu_validate] {'DRY RUN, ' if ctx.dry else ''}budget {ctx.budget_s:.0f} s, "
          f"results in {ctx.out}", flush=True)
    try:
        write_summary(ctx, steps)
        run_steps(ctx, steps)
    finally:
        for s in steps:
            if s.status == "pending":
                s.status, s.note = NOT_RUN, "interrupted"
        text = write_summary(ctx, steps, final=True)
        shutil.rmtree(ctx.scratch, ignore_errors=True)
    print("\n" + text, flush=True)
    return 1 if failing(ctx, steps) else 0

