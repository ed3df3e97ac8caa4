"""Steps bench and bench-large: the benchmark runner on the GPU (`--suite full`, then
`--suite large` if the budget allows), one loss a run so that a run cut by the limit costs
one loss's rows; everything packed into one archive after each run."""
import ast
import csv
import os
import tarfile

from .common import DRY_OK, FAIL, PASS, PY, ROOT, TIMEOUT, first_error

# The losses with GPU targets (benchmarks/NOTES.md) are benchmarked first.
BENCH_FIRST = ("cross_entropy", "info_nce", "linear_cross_entropy")


def bench_losses():
    """benchmarks.cases.LOSSES (read without importing torch), BENCH_FIRST first."""
    tree = ast.parse((ROOT / "benchmarks" / "cases.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "LOSSES"
                                                for t in node.targets):
            losses = list(ast.literal_eval(node.value))
            return sorted(losses, key=lambda x: (BENCH_FIRST + (x,)).index(x))
    raise RuntimeError("benchmarks/cases.py defines no LOSSES")


def bench_archive(ctx):
    return ctx.out / f"bench-{'dry-run' if ctx.dry else ctx.device.get('tag') or 'cuda'}.tar.gz"


def _pack_bench(ctx):
    """Everything the runs wrote so far, as one archive (the device tool returns 8
    files at most); replaced atomically, so a kill leaves the previous one whole."""
    archive = bench_archive(ctx)
    tmp = archive.with_name(archive.name + ".tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        tar.add(ctx.scratch / "bench", arcname="bench")
    os.replace(tmp, archive)


def _row_counts(bench_dir, before):
    """Status counts of the rows of the results CSV a run added; fusedloss rows not ok."""
    new = [p for p in bench_dir.glob("*.csv") if not p.name.startswith("latest-")
           and p not in before]
    counts, bad = {}, []
    for path in new:
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                counts[row["status"]] = counts.get(row["status"], 0) + 1
                if row["provider"].startswith("fusedloss") and row["status"] != "ok":
                    bad.append(f"{row['provider']} {row['n']}x{row['c']} {row['status']}")
    return counts, bad


def _bench(ctx, step, suite):
    bench_dir = ctx.scratch / "bench"
    bench_dir.mkdir(exist_ok=True)
    # One run per loss, so that a run cut by the limit costs one loss's rows, not all
    # (the runner writes its files at the end). A dry run lists every plan in one call.
    losses = bench_losses()
    chunks = [losses] if ctx.dry else [[loss] for loss in losses]
    done, notes, failed = [], [], False
    for chunk in chunks:
        name = "+".join(chunk) if len(chunk) < len(losses) else "all"
        log = bench_dir / f"{suite}-{name}.log"
        cmd = [PY, "-m", "benchmarks", "--device", "cuda", "--suite", suite, "--loss", *chunk,
               "--out", bench_dir, *(["--list"] if ctx.dry else [])]
        before = set(bench_dir.glob("*.csv"))
        rc = ctx.call(step, cmd, log, append=False)
        if rc is None:
            notes.append(f"{name}: timeout")
            step.status = TIMEOUT
            _pack_bench(ctx)
            break
        counts, bad = _row_counts(bench_dir, before)
        if rc != 0:
            failed = True
            notes.append(f"{name}: exit {rc} ({first_error(log)[:120]})")
        elif bad:
            failed = True
            notes.append(f"{name}: {', '.join(bad)}")
        elif counts:
            notes.append(f"{name}: " + " ".join(f"{n} {s}" for s, n in sorted(counts.items())))
        elif ctx.dry:
            notes.append(f"{suite} plans of {len(chunk)} losses listed (--list)")
        done += chunk
        _pack_bench(ctx)
    left_out = [loss for loss in losses if loss not in done]
    if left_out:
        notes.append("not run: " + ", ".join(left_out))
    if step.status != TIMEOUT:
        step.status = FAIL if failed else (DRY_OK if ctx.dry else PASS)
    step.note = "; ".join(notes)


def step_bench(ctx, step):
    _bench(ctx, step, "full")


def step_bench_large(ctx, step):
    _bench(ctx, step, "large")
