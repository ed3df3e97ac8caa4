"""fusedloss-bench / python -m benchmarks: time and memory of every loss, every provider.

    python -m benchmarks                      # the first suite: one case per loss, minutes
    python -m benchmarks --suite full         # every loss with its options (CPU: ~20 min)
    python -m benchmarks --loss cross_entropy --shapes 4096x32000 --label-smoothing 0.1
    python -m benchmarks --providers cpu torch --repeats 3 --out /tmp/bench
    python -m benchmarks --plot-only benchmarks/results/latest-cpu.json

Results, table and plots go to ./fusedloss-bench-results/ under the current directory, or
to --out DIR (--out benchmarks/results refreshes the committed results of a checkout).
"""
import argparse
import datetime
import importlib.util
import subprocess
import sys
import time
from pathlib import Path

import torch

from . import cases as cases_mod, distributed, measure, progress, providers as providers_mod, \
    report

# The suites before --suite existed, by their old flags: the same cases under new names.
OLD_SUITE_FLAGS = {"quick": "full", "full": "large"}


def _names(values):
    """['a,b', 'c'] -> ['a', 'b', 'c']: lists may be given with spaces or commas."""
    return [name for value in values or [] for name in value.split(",") if name]


def parse_args(argv):
    p = argparse.ArgumentParser(prog="fusedloss-bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"],
                   help="default: cuda when available, else cpu")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--suite", choices=cases_mod.SUITE_NAMES,
                      help="first (the default): one case per loss family, 1 to 2.5 "
                           "minutes on 2 CPU cores; full: every loss with its options "
                           "against every provider (about 20 minutes on 2 CPU cores); "
                           "large: size sweeps")
    for old, new in OLD_SUITE_FLAGS.items():
        size.add_argument(f"--{old}", dest="suite", action="store_const", const=new,
                          help=f"the old name of --suite {new}")
    p.add_argument("--loss", nargs="+", action="extend", metavar="LOSS",
                   help=f"losses to run (default all): {', '.join(cases_mod.LOSSES)}")
    p.add_argument("--shapes", type=cases_mod.parse_shapes, metavar="NxC[,NxC...]",
                   help="run these shapes instead of the suite (C is V, or D for info_nce)")
    p.add_argument("--dtype", nargs="+", action="extend",
                   help="float32, bfloat16, float16 (default: the suite's; with --shapes "
                        "float32 on a CPU, bfloat16 on a GPU)")
    p.add_argument("--label-smoothing", type=float, default=0.0, help="with --shapes")
    p.add_argument("--ignore-frac", type=float, default=0.0,
                   help="with --shapes: fraction of rows with target ignore_index")
    p.add_argument("--symmetric", action="store_true", help="with --shapes: info_nce both ways")
    p.add_argument("--hidden", type=int, default=512, metavar="D",
                   help="with --shapes: the hidden size of linear_cross_entropy (default 512)")
    p.add_argument("--providers", "--backends", nargs="+", action="extend",
                   dest="providers", metavar="NAME",
                   help="providers to run, by name or bare fusedloss backend name "
                        f"({', '.join(p.name for p in providers_mod.PROVIDERS)}); "
                        "default: all but fusedloss-reference")
    p.add_argument("--repeats", type=int,
                   help="timed steps per provider (default "
                        f"{measure.REPEATS['cpu']} on a CPU, {measure.REPEATS['cuda']} on a GPU)")
    p.add_argument("--out", type=Path,
                   help="results directory (default ./fusedloss-bench-results/ under the "
                        "current directory; the committed benchmarks/results/ only when "
                        "named here)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--plot-only", type=Path, metavar="FILE",
                   help="re-plot a results .json/.csv (next to it) and print its table")
    p.add_argument("--list", action="store_true", help="print the plan and exit")
    p.add_argument("--skip-suite", choices=cases_mod.SUITE_NAMES,
                   help="leave out the cases of that suite (run --suite full, then "
                        "--suite large --skip-suite full)")
    p.add_argument("--time-budget", type=float, metavar="S",
                   help="start no case that would likely end past S seconds (elapsed plus "
                        "the longest case so far); the cases left are listed as not run")
    args = p.parse_args(argv)
    args.loss, args.dtype, args.providers = map(_names, (args.loss, args.dtype, args.providers))
    return args


def default_out_dir():
    """./fusedloss-bench-results/ under the current directory, from a checkout or an
    installed package alike: a run never writes over the committed benchmarks/results/
    (nor into site-packages) unless --out names it."""
    return Path.cwd() / "fusedloss-bench-results"


def _git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _versions():
    import fusedloss
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "absent"
    return {"torch_version": torch.__version__, "triton_version": triton_version,
            "fusedloss_version": getattr(fusedloss, "__version__", "unknown"),
            "git_commit": _git_commit()}


def plot_only(path):
    rows, meta, notes = report.load(path)
    print(f"{report.summary(meta)}\n\n{report.table(rows)}")
    for png in report.plot(rows, path.parent, path.stem):
        print(f"wrote {png}")
    return 0


def plan(args, device):
    """(suite, [(case, providers)], notes, repeats) for the parsed arguments."""
    suite = args.suite or "first"
    cases = cases_mod.select_cases(device, suite, args.loss, args.dtype, args.shapes,
                                   label_smoothing=args.label_smoothing,
                                   ignore_frac=args.ignore_frac, symmetric=args.symmetric,
                                   d=args.hidden)
    if args.skip_suite:
        skip = set(cases_mod.select_cases(device, args.skip_suite, args.loss, args.dtype))
        cases = [case for case in cases if case not in skip]
    runs, notes = providers_mod.plan(providers_mod.select(args.providers), device, cases,
                                     named=bool(args.providers))
    return suite, runs, notes, args.repeats or measure.REPEATS[device]


def measure_runs(runs, device, repeats, notes, time_budget=None):
    """The rows of every case, each case in its own worker process(es), under a progress
    bar; cases not started within time_budget seconds are added to `notes`."""
    warmup, by_name = measure.WARMUP[device], {p.name: p for p in providers_mod.PROVIDERS}
    costs = [progress.case_seconds(case, able, device, repeats) for case, able in runs]
    print(f"rough estimate: {sum(costs) / 60:.1f} minutes (the bar corrects it as it goes)")
    bar = progress.Bar(sum(costs))
    rows, started, longest = [], time.perf_counter(), 0.0
    try:
        for i, ((case, able), cost) in enumerate(zip(runs, costs)):
            case_started = time.perf_counter()
            if time_budget is not None and case_started - started + longest > time_budget:
                notes += [f"{c.loss} {c.n}x{c.c} {c.dtype} {c.options}: past the time budget "
                          f"({time_budget:g} s)" for c, _ in runs[i:]]
                break
            bar.case(i + 1, len(runs), f"{case.loss} {case.n}x{case.c} {case.dtype} "
                                       f"{case.options}".rstrip(), cost)

            def on_row(row, case=case):
                provider = by_name[row["provider"]]
                bar.advance(progress.run_seconds(case, provider, device, repeats))
            if case.world > 1:  # gloo ranks, each its own process
                rows += distributed.run_case(case, able, repeats, warmup, on_row=on_row)
            else:
                rows += measure.run_case_isolated(case, able, device, repeats, warmup,
                                                  on_row=on_row)
            bar.end_case()  # the worker's start, and any run that gave no row
            longest = max(longest, time.perf_counter() - case_started)
    finally:
        bar.close()
    return rows


def closing_line(suite, device):
    """What to run after the first suite (None after the others)."""
    if suite != "first":
        return None
    full = "about 20 minutes on 2 CPU cores" if device == "cpu" else "the GPU target sizes"
    return ("This was the first suite, one case per loss family. The full suite: "
            f"fusedloss-bench --suite full ({full}; --suite large adds size sweeps). "
            "The GPU suite: fusedloss-bench --suite full on a machine with a CUDA GPU, or "
            "from a checkout on a bare GPU machine bash benchmarks/gpu_validate.sh OUT_DIR "
            "(build, tests, sanitizers, then the GPU suites).")


def main(argv=None):
    started = time.perf_counter()
    args = parse_args(argv)
    if args.plot_only:
        return plot_only(args.plot_only)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available() and not args.list:
        sys.exit("fusedloss-bench: --device cuda, but torch sees no CUDA device")
    if not args.no_plots and not args.list and importlib.util.find_spec("matplotlib") is None:
        sys.exit("fusedloss-bench: the plots need matplotlib (pip install matplotlib); "
                 "or pass --no-plots")
    suite, runs, notes, repeats = plan(args, device)
    if not runs and args.loss and not args.shapes:
        sys.exit(f"fusedloss-bench: the {suite} suite has no {' or '.join(args.loss)} case "
                 f"on {device}; --suite full has every loss")
    print(f"fusedloss-bench: {len(runs)} cases ({device}, "
          f"{suite if not args.shapes else 'custom'} suite), "
          f"{sum(len(able) for _, able in runs)} provider runs, {repeats} timed steps each")
    for note in notes:
        print(f"  not run: {note}")
    if args.list:
        for case, able in runs:
            print(f"  {case.loss:20} {f'{case.n}x{case.c}':13} {case.dtype:9} "
                  f"{case.options:15} {', '.join(p.name for p in able)}")
        return 0

    meta = {"timestamp": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "device": device, "suite": suite if not args.shapes else "custom",
            "repeats": repeats, "argv": sys.argv[1:], **_versions(),
            **measure.probe_device(device)}
    rows = report.finalize(measure_runs(runs, device, repeats, notes, args.time_budget), meta)
    meta["wall_s"] = round(time.perf_counter() - started, 1)  # start to the last case
    out = args.out or default_out_dir()
    paths = report.write(rows, meta, notes, out)
    if not args.no_plots:
        paths += report.plot(rows, out, f"latest-{report.device_tag(meta)}")
    print(f"\n{report.summary(meta)}\n\n{report.table(rows)}\n")
    for path in paths:
        print(f"wrote {path}")
    print(f"wall time {time.perf_counter() - started:.0f} s")
    line = closing_line(suite if not args.shapes else None, device)
    if line:
        print(f"\n{line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
