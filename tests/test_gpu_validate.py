"""The GPU validation script (benchmarks/gpu_validate.sh) as CI checks it, without a GPU:
its dry run (every step, the files it leaves, the summary), its refusal of bad arguments,
its budget, its per-step time limit and its choice of the sanitizers' tests."""
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_validate.sh"
STEPS = ["env", "build", "peers", "tests", "memcheck", "racecheck", "bench", "bench-large"]
DRY_RUN_TIMEOUT_S = 300

try:
    from fusedloss.benchmarks.gpu_validate import common, driver, selection, summary
except ImportError:  # a source checkout that is not installed
    sys.path.insert(0, str(ROOT))
    from benchmarks.gpu_validate import common, driver, selection, summary


def _run(*args, timeout=60):
    env = dict(os.environ, PYTHON=sys.executable)  # the script runs on this interpreter
    return subprocess.run(["bash", str(SCRIPT), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT, env=env)


def _rows(summary):
    """{step: (status, mode)} from the summary's table."""
    rows = {}
    for line in summary.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] not in ("step",) and not cells[0].startswith("-"):
            rows[cells[0]] = (cells[1], cells[2])
    return rows


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_validate") / "out"
    started = time.monotonic()
    proc = _run(out, "--dry-run", timeout=DRY_RUN_TIMEOUT_S)
    return proc, out, time.monotonic() - started


def test_every_step_is_in_the_table():
    """The dry run below covers the table of steps: every step module's step is in it."""
    table = driver.steps_table()
    assert [s.name for s in table] == STEPS
    runs = {s.run for s in table}
    for module in {s.run.__module__ for s in table}:
        steps = [f for name, f in vars(sys.modules[module]).items()
                 if name.startswith("step_") and callable(f)]
        assert steps and set(steps) <= runs, module


def test_dry_run_passes_and_summarises_every_step(dry_run):
    proc, out, seconds = dry_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = (out / "summary.md").read_text()
    assert "DRY RUN" in summary and "result: PASS" in summary
    rows = _rows(summary)
    assert list(rows) == STEPS
    for name, (status, mode) in rows.items():
        assert status in ("dry ok", "absent", "skip"), (name, status)
        assert mode == "dry", name
    # The summary is printed last.
    assert proc.stdout.rstrip().endswith(summary.rstrip().splitlines()[-1])
    print(f"dry run: {seconds:.0f} s")


def test_dry_run_files(dry_run):
    _, out, _ = dry_run
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == sorted(["summary.md", "env.txt", "build.log", "peers.log", "tests.log",
                            "tests.xml", "sanitizer.log", "bench-dry-run.tar.gz"])
    assert len(files) <= summary.OUT_FILE_LIMIT  # what the device tool returns at most
    assert "tests collected" in (out / "tests.log").read_text()
    sanitizer = (out / "sanitizer.log").read_text()
    for tool in ("memcheck", "racecheck"):
        assert re.search(rf"^{tool}: (DRY OK|ABSENT): ", sanitizer, re.M), tool
    # Every op that declares a CUDA kernel is named, with the test that calls it.
    from fusedloss import _library
    for op in _library.OPS.values():
        if "cuda" in op.backends:
            assert re.search(rf"^  {op.name} \(.*\): tests/\S+\[cuda\]", sanitizer, re.M), op.name


@pytest.mark.parametrize("args, message", [
    ([], "the following arguments are required: OUT_DIR"),
    (["{out}", "--budget-s", "abc"], "invalid float value"),
    (["{out}", "--budget-s", "0"], "--budget-s must be a positive number"),
    (["{out}", "--frobnicate"], "unrecognized arguments: --frobnicate"),
    (["{file}"], "exists and is not a directory"),
    (["{out}", "--wheels", "{out}/none"], "is not a directory"),
    ([""], "OUT_DIR is empty"),
])
def test_bad_arguments_are_refused(tmp_path, args, message):
    (tmp_path / "file").write_text("")
    args = [a.format(out=tmp_path / "out", file=tmp_path / "file") for a in args]
    proc = _run(*args)
    assert proc.returncode == 2
    assert message in proc.stderr and "usage: gpu_validate.sh" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_spent_budget_runs_nothing_and_says_so(tmp_path):
    proc = _run(tmp_path, "--dry-run", "--budget-s", "1")
    assert proc.returncode == 1
    rows = _rows((tmp_path / "summary.md").read_text())
    assert list(rows) == STEPS
    assert {status for status, _ in rows.values()} == {"not run"}
    assert "budget spent" in (tmp_path / "summary.md").read_text()


def test_step_limit_kills_the_whole_process_group(tmp_path):
    ctx = common.Context(driver.parse_args([str(tmp_path), "--dry-run"]))
    step = common.Step("slow", 1, 0, True, True, False, "slow.log", None)
    step.deadline = time.monotonic() + 1
    pid_file = tmp_path / "pid"
    try:
        started = time.monotonic()
        rc = ctx.call(step, ["bash", "-c", f"sleep 60 & echo $! > {pid_file}; wait"],
                      tmp_path / "slow.log")
        assert rc is None and time.monotonic() - started < 15
        assert "killed after" in (tmp_path / "slow.log").read_text()
        stat = Path(f"/proc/{pid_file.read_text().strip()}/stat")
        assert not stat.exists() or stat.read_text().split(")")[-1].split()[0] in "ZX"
    finally:
        shutil.rmtree(ctx.scratch, ignore_errors=True)


def test_sanitizer_selection_from_the_registry():
    item = lambda id_, test, ops=(), backend="cuda": {  # noqa: E731
        "id": id_, "file": id_.split("::")[0], "test": test, "ops": list(ops),
        "backend": backend}
    plan = {"cuda_ops": [{"name": n} for n in ("a", "a_backward", "b", "c")], "items": [
        item("tests/test_a.py::TestA::test_opcheck[cuda]", "test_opcheck", ["a", "a_backward"]),
        item("tests/test_a.py::TestA::test_opcheck[cpu]", "test_opcheck", ["a"], "cpu"),
        item("tests/test_a.py::TestA::test_float32_matches_formula[cuda]",
             "test_float32_matches_formula", ["a", "a_backward"]),
        item("tests/test_a.py::TestA::test_gradcheck[cuda]", "test_gradcheck", ["a"]),
        item("tests/test_b.py::TestB::test_float32_matches_formula[cuda]",
             "test_float32_matches_formula", ["b"]),
        item("tests/test_c.py::test_other[cuda]", "test_other"),
        item("tests/test_gpu.py::test_big[cuda-1]", "test_big"),
        item("tests/test_gpu.py::test_big[cuda-2]", "test_big"),
        item("tests/test_gpu.py::test_big[triton-1]", "test_big", backend="triton"),
    ]}
    memcheck, racecheck, covers = selection.select_sanitized(plan)
    assert memcheck == ["tests/test_a.py::TestA::test_opcheck[cuda]",
                        "tests/test_a.py::TestA::test_float32_matches_formula[cuda]",
                        "tests/test_b.py::TestB::test_float32_matches_formula[cuda]",
                        "tests/test_gpu.py::test_big[cuda-1]",
                        "tests/test_gpu.py::test_big[cuda-2]"]
    assert racecheck == ["tests/test_a.py::TestA::test_float32_matches_formula[cuda]",
                         "tests/test_b.py::TestB::test_float32_matches_formula[cuda]",
                         "tests/test_gpu.py::test_big[cuda-1]"]
    # Only opcheck proves an op is called: b (no opcheck) and c (no contract) are not.
    assert {op: bool(ids) for op, ids in covers.items()} == {
        "a": True, "a_backward": True, "b": False, "c": False}
