"""summary.md: the steps' table, rewritten after every step (so a run killed from outside
still leaves it), and the result: which steps fail the validation."""
import time

from .bench import bench_archive
from .common import DRY_OK_STATUSES, NOT_RUN, OK_STATUSES, TIMEOUT

OUT_FILE_LIMIT = 8  # the device tool returns no more files
OUTPUTS = ("summary.md", "env.txt", "build.log", "peers.log", "tests.log", "tests.xml",
           "sanitizer.log")


def failing(ctx, steps):
    """The steps that fail the validation: any that failed, and a required one that did
    not pass (an optional step may be skipped or cut short by the budget)."""
    good = DRY_OK_STATUSES if ctx.dry else OK_STATUSES
    return [s.name for s in steps if s.status not in good and
            (s.required or s.status not in (NOT_RUN, TIMEOUT))]


def summary(ctx, steps, final):
    used = time.monotonic() - ctx.started
    d = ctx.device
    device = (f"{d['name']} (sm_{d['capability'].replace('.', '')})" if d.get("cuda")
              else "no GPU" if d else "not recorded yet")
    if final:
        bad = failing(ctx, steps)
        result = f"FAIL ({', '.join(bad)})" if bad else "PASS"
    else:
        result = "in progress (this file is rewritten after every step)"
    mode = ("**DRY RUN**: no step used a GPU; each checked its commands, selections and "
            "files only" if ctx.dry else "run")
    lines = ["# GPU validation summary", "", f"- mode: {mode}",
             f"- started {ctx.started_at} on {device}; budget {ctx.budget_s:.0f} s, used "
             f"{used:.0f} s",
             f"- result: {result}", "",
             "| step | status | mode | seconds | limit s | log | note |",
             "|---|---|---|---:|---:|---|---|"]
    for s in steps:
        log = s.log.replace("bench-<device>.tar.gz", bench_archive(ctx).name)
        note = s.note.replace("|", "/").replace("\n", " ")
        lines.append(f"| {s.name} | {s.status} | {'dry' if ctx.dry else 'run'} | "
                     f"{s.seconds:.1f} | {s.limit_s:.0f} | {log} | {note} |")
    files = [p for p in ctx.out.rglob("*") if p.is_file()]
    if len(files) + (0 if (ctx.out / "summary.md").exists() else 1) > OUT_FILE_LIMIT:
        lines += ["", f"WARNING: OUT_DIR holds {len(files)} files; the device tool returns "
                      f"at most {OUT_FILE_LIMIT}."]
    return "\n".join(lines) + "\n"


def write_summary(ctx, steps, final=False):
    text = summary(ctx, steps, final)
    (ctx.out / "summary.md").write_text(text)
    return text
