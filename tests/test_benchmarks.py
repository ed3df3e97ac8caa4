"""The benchmark runner, end to end on tiny CPU cases: files, columns, plots, and out of
memory as a result row. No timing is asserted: only that the numbers are there."""
import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
try:
    from fusedloss.benchmarks import (__main__ as cli, cases, distributed, measure, progress,
                                      providers, report)
except ImportError:  # a source checkout that is not installed
    sys.path.insert(0, str(ROOT))
    from benchmarks import (__main__ as cli, cases, distributed, measure, progress, providers,
                            report)

TINY = cases.Case("cross_entropy", 16, 50)


def test_end_to_end_cpu(tmp_path):
    """A run with no --out writes under the current directory (here tmp_path)."""
    shapes = "32x64,32x128,32x256"  # three sizes: a sweep plot
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--device", "cpu", "--loss", "cross_entropy",
         "--shapes", shapes, "--label-smoothing", "0.1", "--providers", "torch,reference",
         "--repeats", "2"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(
            p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "fusedloss-bench-results"

    with open(out / "latest-cpu.csv", newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == report.COLUMNS
    assert len(rows) == 3 * 2
    assert {r["provider"] for r in rows} == {"torch", "fusedloss-reference"}
    assert {r["status"] for r in rows} == {"ok"}, [r["note"] for r in rows]
    for row in rows:
        assert row["device"] == "cpu" and row["device_name"] and row["git_commit"]
        assert row["label_smoothing"] == "0.1"
        for column in ("fwd_ms", "bwd_ms", "fwdbwd_ms", "fwdbwd_ms_p20", "fwdbwd_ms_p80",
                       "peak_mem_mib", "gbps", "bw_frac", "speedup", "copy_gbps"):
            assert float(row[column]) >= 0, column

    data = json.loads((out / "latest-cpu.json").read_text())
    assert data["meta"]["torch_version"] == torch.__version__
    assert [r["provider"] for r in data["rows"]] == [r["provider"] for r in rows]
    assert set(data["rows"][0]) == set(report.COLUMNS)
    assert len(list(out.glob("cpu-*.csv"))) == 1  # the run's own copy
    assert "| cross_entropy |" in (out / "latest-cpu.md").read_text()
    assert list(out.glob("latest-cpu-cross_entropy*vs-C*.png"))
    assert not list(out.glob("*-cases.png"))  # every case is in the sweep plot
    assert "fwd+bwd ms" in proc.stdout  # the table

    # --plot-only re-plots a results file next to it.
    results = tmp_path / "again" / "run.json"
    results.parent.mkdir()
    results.write_text((out / "latest-cpu.json").read_text())
    assert cli.main(["--plot-only", str(results)]) == 0
    assert list(results.parent.glob("run-cross_entropy*.png"))


def _row(n, c, provider, status="ok"):
    return {**dict.fromkeys(report.COLUMNS), "loss": "cross_entropy", "n": n, "c": c,
            "dtype": "float32", "options": "", "provider": provider, "status": status,
            "device_name": "test", "fwdbwd_ms": 2.0, "fwdbwd_ms_p20": 1.5,
            "fwdbwd_ms_p80": 2.5, "peak_mem_mib": 1.0}


def test_every_run_has_plots(tmp_path):
    """Cases outside a sweep of three sizes (a --shapes run of one or two) get a bar chart;
    a sweep gets its line plot and no bar chart."""
    single = [_row(16, 64, "torch"), _row(16, 64, "fusedloss-cpu"),
              _row(16, 64, "liger", "OOM")]
    paths = report.plot(single, tmp_path, "one")
    assert paths == [tmp_path / "one-cases.png"]
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    sweep = [_row(8, c, p) for c in (64, 128, 256) for p in ("torch", "fusedloss-cpu")]
    paths = report.plot(sweep + single, tmp_path, "mixed")
    assert sorted(p.name for p in paths) == ["mixed-cases.png",
                                             "mixed-cross_entropy_float32-vs-C-N8.png"]
    assert report.plot(sweep, tmp_path, "swept") == [
        tmp_path / "swept-cross_entropy_float32-vs-C-N8.png"]


def _raising(exc):
    def fn(*inputs):
        raise exc
    return fn


@pytest.mark.parametrize("exc, status", [
    (MemoryError(), "OOM"),
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), "OOM"),
    (RuntimeError("[enforce fail] DefaultCPUAllocator: can't allocate memory"), "OOM"),
    (ValueError("a bug"), "error"),
])
def test_failure_is_a_row(exc, status):
    broken = providers.Provider("broken", lambda case: _raising(exc))
    messages = []
    measure.run_case(TINY, [broken, providers.select(["torch"])[0]], "cpu", repeats=1,
                     warmup=1, send=messages.append)
    rows = [payload for kind, payload in messages if kind == "row"]
    assert [r["provider"] for r in rows] == ["broken", "torch"]
    assert rows[0]["status"] == status and type(exc).__name__ in rows[0]["note"]
    assert rows[1]["status"] == "ok"  # the next provider still runs


def _killed_by_the_kernel(case):
    os.kill(os.getpid(), signal.SIGKILL)


def test_killed_worker_is_oom():
    """A worker killed by SIGKILL (the OOM killer's signal) gives an OOM row, and a fresh
    worker measures the providers after it."""
    killed = providers.Provider("killed", _killed_by_the_kernel)
    rows = measure.run_case_isolated(TINY, [killed, providers.select(["torch"])[0]], "cpu",
                                     repeats=1, warmup=1)
    assert [(r["provider"], r["status"]) for r in rows] == [("killed", "OOM"), ("torch", "ok")]


def test_skip_suite_and_time_budget(tmp_path, capsys, monkeypatch):
    """--skip-suite leaves out another suite's cases; --time-budget starts no case past it
    and lists the cases left as not run."""
    monkeypatch.setattr(measure, "probe_device", lambda device: {"device_name": "test"})
    assert cli.main(["--device", "cuda", "--suite", "large", "--skip-suite", "full",
                     "--list"]) == 0
    plan = capsys.readouterr().out
    large = cases.select_cases("cuda", "large")
    left = [c for c in large if c not in set(cases.select_cases("cuda", "full"))]
    assert 0 < len(left) < len(large) and f"{len(left)} cases (cuda, large" in plan

    assert cli.main(["--device", "cpu", "--loss", "ce", "--shapes", "8x16,8x32",
                     "--providers", "torch", "--time-budget", "0", "--no-plots",
                     "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "latest-cpu.json").read_text())
    assert data["rows"] == []
    assert sum("past the time budget" in note for note in data["notes"]) == 2


def test_plots_need_matplotlib_before_the_run(tmp_path, monkeypatch):
    """Without matplotlib a run that would plot stops before measuring, naming the fix."""
    find_spec = cli.importlib.util.find_spec
    monkeypatch.setattr(cli.importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else find_spec(name, *a))
    monkeypatch.setattr(measure, "run_case_isolated",
                        lambda *a, **k: pytest.fail("measured without matplotlib"))
    args = ["--device", "cpu", "--loss", "ce", "--shapes", "8x16", "--providers", "torch",
            "--out", str(tmp_path)]
    with pytest.raises(SystemExit, match="pip install matplotlib.*--no-plots"):
        cli.main(args)
    assert not any(tmp_path.iterdir())


# The loss families of the first suite: a loss and its fused-linear form are one family
# where the brief of that suite says so (JSD and linear JSD).
FAMILIES = {"cross_entropy": "cross-entropy", "focal": "focal", "sigmoid_focal": "sigmoid focal",
            "info_nce": "InfoNCE", "linear_cross_entropy": "linear cross-entropy",
            "jsd": "JSD", "linear_jsd": "JSD", "siglip": "SigLIP"}


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_first_suite_has_one_case_per_loss_family(device):
    single = [c for c in cases.select_cases(device, "first")
              if c.world == 1 and c.loss in FAMILIES]
    assert sorted(FAMILIES[c.loss] for c in single) == sorted(set(FAMILIES.values()))


def _fake_row(case, providers_, device, repeats, warmup, on_row=None):
    rows = []
    for p in providers_:
        times = {f"{step}_ms{q}": 1.0 for step in ("fwd", "bwd", "fwdbwd")
                 for q in ("", "_p20", "_p80")}
        rows.append(measure.case_row(case, p.name, "ok", peak_mem_mib=1.0, repeats=repeats,
                                     **times))
        if on_row:
            on_row(rows[-1])
    return rows


def test_default_run_is_the_first_suite_and_names_the_full_one(tmp_path, capsys,
                                                               monkeypatch):
    """With no arguments: the first suite, a bar (plain lines without tqdm), the table,
    and a closing line naming --suite full and the GPU suite. Nothing is measured here."""
    monkeypatch.setattr(measure, "probe_device", lambda device: {"device_name": "test"})
    monkeypatch.setattr(measure, "run_case_isolated", _fake_row)
    monkeypatch.setattr(distributed, "run_case", lambda case, able, *a, **k: _fake_row(
        case, able, "cpu", *a, **k))
    monkeypatch.setitem(sys.modules, "tqdm", None)  # the plain-line fallback
    assert cli.main(["--device", "cpu", "--no-plots", "--out", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    first = cases.select_cases("cpu", "first")
    assert f"{len(first)} cases (cpu, first suite)" in out
    assert f"[{len(first)}/{len(first)}]" in err and "s left)" in err
    data = json.loads((tmp_path / "latest-cpu.json").read_text())
    assert data["meta"]["suite"] == "first"
    assert {r["loss"] for r in data["rows"]} == {c.loss for c in first}
    closing = out.rstrip().splitlines()[-1]
    assert "--suite full" in closing and "GPU" in closing


def test_old_suite_flags_name_the_same_cases(capsys):
    """--quick and --full, from before --suite, run what they ran: now full and large."""
    for old, new in (("--quick", "full"), ("--full", "large")):
        assert cli.parse_args([old]).suite == new
    with pytest.raises(SystemExit):
        cli.parse_args(["--quick", "--suite", "first"])
    capsys.readouterr()


def test_progress_estimate_weighs_compile_and_corrects_itself(monkeypatch):
    case = cases.Case("cross_entropy", 1024, 32000)
    eager, compiled = providers.select(["torch", "compile"])
    assert progress.run_seconds(case, compiled, "cpu", 5) > \
        progress.run_seconds(case, eager, "cpu", 5) + progress.COMPILE_S / 2
    monkeypatch.setitem(sys.modules, "tqdm", None)
    bar = progress.Bar(100.0)
    assert bar.left_s() is None
    bar.case(1, 2, "first", 50.0)
    bar.advance(80.0)  # no more than the case's estimate
    assert bar.done == 50.0
    bar.started -= 10.0  # 10 s for the first half: about 10 s left
    assert 9.0 < bar.left_s() < 11.5
