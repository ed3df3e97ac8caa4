"""What comes out: derived columns, CSV/JSON/markdown files, the table, the plots."""
import csv
import datetime
import json
import math
import re
import shutil
from collections import defaultdict
from pathlib import Path

from .cases import AXES
from .providers import BASELINE, DIST_BASELINE

META = ["timestamp", "device", "device_name", "threads", "torch_version", "triton_version",
        "fusedloss_version", "git_commit"]
CASE = ["loss", "n", "c", "dtype", "label_smoothing", "ignore_frac", "symmetric", "d",
        "world", "exchange", "options"]
TIMES = [f"{step}_ms{q}" for step in ("fwd", "bwd", "fwdbwd") for q in ("", "_p20", "_p80")]
COLUMNS = [*META, *CASE, "provider", "status", *TIMES, "peak_mem_mib", "min_bytes", "gbps",
           "copy_gbps", "bw_frac", "flops", "tflops", "speedup", "mem_ratio", "repeats", "note"]


def _case_key(row):
    return tuple(row.get(k) for k in CASE)  # .get: results written before a column existed


def finalize(rows, meta):
    """Every row gets the run's metadata and the columns derived from its times:
    bandwidth, its fraction of the copy bandwidth, TFLOP/s, and ratios to the case's
    baseline (eager torch; gathering everything for the world > 1 cases)."""
    baseline = {_case_key(r): r for r in rows
                if r["provider"] in (BASELINE, DIST_BASELINE) and r["status"] == "ok"}
    out = []
    for row in rows:
        row = {**{k: meta.get(k) for k in META}, "copy_gbps": meta.get("copy_gbps"), **row}
        t = row.get("fwdbwd_ms")
        if row["status"] == "ok" and t:
            row["gbps"] = row["min_bytes"] / (t / 1e3) / 1e9
            row["bw_frac"] = row["gbps"] / row["copy_gbps"] if row["copy_gbps"] else None
            row["tflops"] = row["flops"] / (t / 1e3) / 1e12 if row["flops"] else None
            base = baseline.get(_case_key(row))
            if base:
                row["speedup"] = base["fwdbwd_ms"] / t
                if base.get("peak_mem_mib") and row.get("peak_mem_mib") is not None:
                    row["mem_ratio"] = row["peak_mem_mib"] / base["peak_mem_mib"]
        out.append({k: row.get(k) for k in COLUMNS})
    return out


# ---------------------------------------------------------------- files
def device_tag(meta):
    if meta["device"] == "cpu":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", meta["device_name"].lower()).strip("-") or "cuda"


def write(rows, meta, notes, out_dir):
    """<tag>-<timestamp>.{csv,json,md} and copies as latest-<tag>.*; returns the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = device_tag(meta)
    stamp = datetime.datetime.fromisoformat(meta["timestamp"]).strftime("%Y%m%d-%H%M%S")
    run = out_dir / f"{tag}-{stamp}"
    with open(run.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    with open(run.with_suffix(".json"), "w") as f:
        json.dump({"meta": meta, "notes": notes, "rows": rows}, f, indent=1)
    run.with_suffix(".md").write_text(markdown(rows, meta, notes))
    paths = [run.with_suffix(s) for s in (".csv", ".json", ".md")]
    for path in list(paths):
        latest = out_dir / f"latest-{tag}{path.suffix}"
        shutil.copyfile(path, latest)
        paths.append(latest)
    return paths


def load(path):
    """(rows, meta, notes) from a results .json or .csv written by `write`."""
    path = Path(path)
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        return data["rows"], data.get("meta", {}), data.get("notes", [])
    with open(path, newline="") as f:
        rows = [{k: _parse(v) for k, v in r.items()} for r in csv.DictReader(f)]
    meta = {k: rows[0][k] for k in META} if rows else {}
    return rows, meta, []


def _parse(text):
    if text in ("", "None"):
        return None
    if text in ("True", "False"):
        return text == "True"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


# ---------------------------------------------------------------- the table
HEADER = ["loss", "N x C", "dtype", "options", "provider", "fwd ms", "bwd ms",
          "fwd+bwd ms [p20, p80]", "peak MiB", "GB/s", "% copy", "TFLOP/s", "speed-up",
          "mem ratio", "status"]


def fmt_num(value, suffix=""):
    """A number for a table cell (no decimals from 100 up, 1 from 10, 2 from 0.1, else 3),
    "-" for none."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    digits = 0 if abs(value) >= 100 else 1 if abs(value) >= 10 else 2 if abs(value) >= 0.1 \
        else 3
    return f"{value:.{digits}f}{suffix}"


def _cells(row):
    ok, num = row["status"] == "ok", fmt_num
    spread = f" [{num(row['fwdbwd_ms_p20'])}, {num(row['fwdbwd_ms_p80'])}]" if ok else ""
    return [row["loss"], f"{row['n']}x{row['c']}", row["dtype"], row["options"] or "",
            row["provider"], num(row["fwd_ms"]), num(row["bwd_ms"]),
            num(row["fwdbwd_ms"]) + spread, num(row["peak_mem_mib"]), num(row["gbps"]),
            num(row["bw_frac"] * 100 if row["bw_frac"] is not None else None),
            num(row["tflops"]), num(row["speedup"], "x"), num(row["mem_ratio"], "x"),
            row["status"]]


def table(rows, markdown=False):
    """The results as aligned plain text, or as a markdown table."""
    body = [_cells(r) for r in rows]
    if markdown:
        lines = ["| " + " | ".join(HEADER) + " |",
                 "|" + "|".join("---" if i < 5 else "---:" for i in range(len(HEADER))) + "|"]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in body])
    widths = [max(len(x) for x in col) for col in zip(HEADER, *body)]
    fmt = lambda r: "  ".join(x.ljust(w) if i < 5 else x.rjust(w)  # noqa: E731
                              for i, (x, w) in enumerate(zip(r, widths))).rstrip()
    return "\n".join([fmt(HEADER), fmt(["-" * w for w in widths])] + [fmt(r) for r in body])


def summary(meta):
    copy = meta.get("copy_gbps")
    return (f"{meta.get('device_name')} ({meta.get('device')}, {meta.get('threads')} threads), "
            f"torch {meta.get('torch_version')}, triton {meta.get('triton_version')}, "
            f"fusedloss {meta.get('fusedloss_version')}, commit {meta.get('git_commit')}, "
            f"{meta.get('timestamp')}; copy bandwidth "
            f"{fmt_num(copy) if copy else '-'} GB/s")


def markdown(rows, meta, notes):
    text = [f"Benchmark: {summary(meta)}.", "", table(rows, markdown=True), ""]
    if notes:
        text += ["Not run:", *[f"- {n}" for n in notes], ""]
    text.append("Columns: see benchmarks/README.md.")
    return "\n".join(text) + "\n"


# ---------------------------------------------------------------- plots
def _sweeps(rows):
    """Groups of rows where one size varies and all else is fixed, with >= 3 sizes:
    {(x axis, title, file label): rows}."""
    groups = defaultdict(list)
    for row in rows:
        what = f"{row['loss']} {row['dtype']} {row['options'] or ''}".strip()
        groups[("c", f"{what}, N={row['n']}", f"{what}-vs-C-N{row['n']}")].append(row)
        groups[("n", f"{what}, C={row['c']}", f"{what}-vs-N-C{row['c']}")].append(row)
    return {k: v for k, v in groups.items() if len({r[k[0]] for r in v}) >= 3}


def plot(rows, out_dir, stem):
    """One PNG per sweep: fwd+bwd time (with its p20-p80 band) and peak memory against the
    size, one line per provider (sizes that ran out of memory named in the legend); and
    <stem>-cases.png, bars for every case no sweep shows (<stem>-llama_step.png for the
    end-to-end step), so that every run has its plots.
    Returns the paths written."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    paths = []
    sweeps = _sweeps(rows)
    swept = {id(r) for group in sweeps.values() for r in group}
    rest = [r for r in rows if id(r) not in swept]
    # The end-to-end training step (seconds, not milliseconds) gets bars of its own.
    # Its bars start at 0 (one case: a log scale would exaggerate the differences).
    for name, part in (("cases", [r for r in rest if r["loss"] != "llama_step"]),
                       ("llama_step", [r for r in rest if r["loss"] == "llama_step"])):
        if part:
            paths.append(_bars(plt, part, Path(out_dir) / f"{stem}-{name}.png",
                               log=name == "cases"))
    for (axis, title, label), group in sorted(sweeps.items()):
        fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
        for provider in dict.fromkeys(r["provider"] for r in group):
            mine = sorted((r for r in group if r["provider"] == provider), key=lambda r: r[axis])
            ok = [r for r in mine if r["status"] == "ok"]
            oom = [r[axis] for r in mine if r["status"] == "OOM"]
            name = provider + (f" (OOM at {', '.join(map(str, oom))})" if oom else "")
            xs = [r[axis] for r in ok]
            line, = ax_t.plot(xs, [r["fwdbwd_ms"] for r in ok], marker="o", label=name)
            ax_t.fill_between(xs, [r["fwdbwd_ms_p20"] for r in ok],
                              [r["fwdbwd_ms_p80"] for r in ok], color=line.get_color(),
                              alpha=0.2)
            mem = [(r[axis], r["peak_mem_mib"]) for r in ok if r["peak_mem_mib"] is not None]
            ax_m.plot(*(zip(*mem) if mem else ([], [])), marker="o", color=line.get_color())
        sizes = sorted({r[axis] for r in group})
        for ax, ylabel in ((ax_t, "fwd+bwd time (ms)"), (ax_m, "peak memory above inputs (MiB)")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks(sizes, [str(x) for x in sizes])
            ax.xaxis.set_minor_locator(ticker.NullLocator())
            for fmt in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
                fmt(ticker.LogFormatter(labelOnlyBase=False))
            ax.set_xlabel(AXES[group[0]["loss"]][0 if axis == "n" else 1])
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
        ax_t.legend(fontsize="small")
        fig.suptitle(f"{title} ({group[0]['device_name']})")
        fig.tight_layout()
        path = Path(out_dir) / f"{stem}-{re.sub(r'[^A-Za-z0-9.=-]+', '_', label)}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def _bars(plt, rows, path, log=True):
    """fwd+bwd time (p20-p80 as error bars) and peak memory of each case, a bar per provider
    (where a provider could not run a case, its status instead); log: log-scale axes."""
    by_case = {_case_key(r): r for r in rows}
    cases = list(by_case)
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    found = {(_case_key(r), r["provider"]): r for r in rows}
    width = 0.8 / len(providers)
    fig, (ax_t, ax_m) = plt.subplots(2, 1, sharex=True, figsize=(
        min(30, max(7, 1.5 + 0.3 * len(cases) * len(providers))), 7))
    for i, provider in enumerate(providers):
        offset = (i - (len(providers) - 1) / 2) * width
        mine = [(j + offset, found[case, provider]) for j, case in enumerate(cases)
                if (case, provider) in found]
        ok = [(x, r) for x, r in mine if r["status"] == "ok"]
        for x, r in mine:  # what a log-scale bar cannot show, in words
            ax, text = (ax_t, r["status"]) if r["status"] != "ok" else (ax_m, "0 MiB")
            if r["status"] != "ok" or r["peak_mem_mib"] == 0:
                ax.text(x, 0.02, text, rotation=90, ha="center", va="bottom",
                        fontsize="small", transform=ax.get_xaxis_transform())
        ax_t.bar([x for x, _ in ok], [r["fwdbwd_ms"] for _, r in ok], width, color=f"C{i}",
                 label=provider, yerr=[[r["fwdbwd_ms"] - r["fwdbwd_ms_p20"] for _, r in ok],
                                       [r["fwdbwd_ms_p80"] - r["fwdbwd_ms"] for _, r in ok]])
        mem = [(x, r["peak_mem_mib"]) for x, r in ok if r["peak_mem_mib"]]
        ax_m.bar([x for x, _ in mem], [m for _, m in mem], width, color=f"C{i}")
    ax_t.legend(fontsize="small")
    for ax, ylabel in ((ax_t, "fwd+bwd time (ms)"), (ax_m, "peak memory above inputs (MiB)")):
        if log:
            ax.set_yscale("log")
        ax.set_ylabel(ylabel)
        ax.grid(True, axis="y", which="both", alpha=0.3)
    labels = [f"{r['loss']}\n{r['n']}x{r['c']} {r['dtype']}\n{r['options'] or ''}".strip()
              for r in by_case.values()]
    ax_m.set_xticks(range(len(cases)), labels, fontsize="small")
    fig.suptitle(f"fwd+bwd time and peak memory per case ({rows[0]['device_name']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
