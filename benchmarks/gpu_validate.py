"""GPU validation in one run on a bare GPU machine (project issue 13): build, test,
sanitize, benchmark, and a summary.

    bash benchmarks/gpu_validate.sh OUT_DIR [--dry-run] [--budget-s N] [--wheels DIR]

Steps, in this order; each writes its results under OUT_DIR as soon as it ends and runs
under its own time limit (its share of the budget, at most what is left once the
minimum times of the steps after it are set aside), so a hang costs one step, and a run
killed from outside still leaves every finished step's files and summary.md. The
benchmarks take whatever time is left, the full suite only if the quick one ends early:

  env         nvidia-smi, torch / Triton / CUDA versions, the device         env.txt
  build       FUSEDLOSS_CUDA_ARCHS=9.0 pip install --no-build-isolation
              --no-deps -e . (stops the run if it fails)                     build.log
  peers       liger-kernel / cut-cross-entropy from the wheels folder,
              never from the network (optional)                              peers.log
  tests       the whole suite, every backend required (test_gpu.py first:
              full sizes, bf16/fp16/fp32, N*V > 2^31)                        tests.log, tests.xml
  memcheck    compute-sanitizer --tool memcheck over the CUDA ops' tests     sanitizer.log
  racecheck   compute-sanitizer --tool racecheck over the shared-memory
              kernels' tests                                                 sanitizer.log
  bench       python -m benchmarks --device cuda --quick, one loss a run     bench-<device>.tar.gz
  bench-full  the full suite, only if the budget still allows (optional)     bench-<device>.tar.gz

OUT_DIR ends with at most 8 files (the device tool returns no more): summary.md, the
six logs above and one archive of the benchmark results (CSV/JSON/markdown/plots and the
runner's output per loss). Those names are removed from OUT_DIR at the start, so no
file is left from an earlier run.

--dry-run runs on a machine without a GPU and checks the same steps as far as that
allows: the environment is recorded, the build's tools are looked for (nothing is
built), wheels are checked with pip's --dry-run, pytest collects the GPU selections
(--collect-only), compute-sanitizer is looked for ("absent" when missing), and the
benchmark runner prints its plan (--list). Its summary marks every step dry.

Exit status: 0 when every required step passed (in a dry run: every check passed or
found its tool absent), 1 otherwise, 2 for bad arguments.
"""
import argparse
import ast
import csv
import dataclasses
import datetime
import importlib
import importlib.util
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
PYTEST = (PY, "-m", "pytest", "-p", "no:cacheprovider")
DEFAULT_BUDGET_S = 480  # about 8 minutes on an H200
DEFAULT_ARCHS = "9.0"
PEERS = {"liger-kernel": "liger_kernel", "cut-cross-entropy": "cut_cross_entropy"}
REQUIRED_BACKENDS = "reference,triton,cuda,cpu"
# The contract checks each loss inherits (tests/contract.py) that the sanitizers run on
# the cuda backend: opcheck calls every op its contract declares (and asserts it does),
# the float32 check runs the public function forward and backward.
SANITIZED_CHECKS = ("test_opcheck", "test_float32_matches_formula")
SANITIZER_ERRORS_EXIT = 86
# The losses with GPU targets (benchmarks/NOTES.md) are benchmarked first.
BENCH_FIRST = ("cross_entropy", "info_nce", "linear_cross_entropy")
OUT_FILE_LIMIT = 8

PASS, FAIL, TIMEOUT, SKIP, ABSENT, NOT_RUN, DRY_OK = (
    "pass", "fail", "timeout", "skip", "absent", "not run", "dry ok")
OK_STATUSES = {PASS, SKIP}
DRY_OK_STATUSES = {DRY_OK, ABSENT, SKIP}


# ------------------------------------------------------------------------- steps
@dataclasses.dataclass
class Step:
    name: str
    share_s: float     # the most this step may take
    min_s: float       # it is not started with less than this left for it
    kept: bool         # the steps before it leave it min_s of the budget
    required: bool     # the validation fails unless it passes
    fatal: bool        # a failure stops the run (nothing after it can work)
    log: str           # where its results are, under OUT_DIR
    run: object        # run(ctx, step) sets status and note
    status: str = "pending"
    note: str = ""
    seconds: float = 0.0
    limit_s: float = 0.0
    deadline: float = 0.0

    def left(self):
        return self.deadline - time.monotonic()


class Context:
    def __init__(self, args):
        self.out = args.out_dir
        self.dry = args.dry_run
        self.budget_s = args.budget_s
        self.wheels = args.wheels
        self.started = time.monotonic()
        self.started_at = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        self.scratch = Path(tempfile.mkdtemp(prefix="gpu_validate-"))
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", PIP_DISABLE_PIP_VERSION_CHECK="1",
                        PIP_NO_INPUT="1")
        if not self.dry:
            # Triton's interpreter (the tests' CPU fallback) must not leak into a GPU run.
            self.env.pop("TRITON_INTERPRET", None)
        self.device = {}     # from the env step
        self.plan = None     # the sanitizers' test selection, made once
        self.stopped_by = None

    def left(self):
        return self.budget_s - (time.monotonic() - self.started)

    def call(self, step, cmd, log, env=None, append=True):
        """Run cmd in the repository root, its output into `log` (appended), within the
        step's deadline. Returns its exit status, or None when it was killed at the
        deadline (with all its children: it runs in a process group of its own)."""
        timeout = step.left()
        with open(log, "a" if append else "w") as f:
            f.write(f"\n$ {shlex.join(str(c) for c in cmd)}\n")
            f.flush()
            if timeout <= 0:
                f.write("[gpu_validate] not started: the step's time is up\n")
                return None
            proc = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, stdout=f,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=env or self.env, start_new_session=True)
            try:
                return proc.wait(timeout)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                f.write(f"\n[gpu_validate] killed after {timeout:.0f} s: the limit of step "
                        f"{step.name}\n")
                return None


def _kill_group(proc):
    for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def _missing(ctx):
    """A tool that is not here: absent in a dry run, a failure in a real one."""
    return ABSENT if ctx.dry else FAIL


def _last_match(path, pattern, default="", start=0):
    """The last line of the log (from byte `start` on) that matches, stripped."""
    with open(path, "rb") as f:
        f.seek(start)
        lines = [ln.strip() for ln in f.read().decode(errors="replace").splitlines()]
    hits = [ln for ln in lines if re.search(pattern, ln)]
    return hits[-1] if hits else default


def _first_error(path):
    """The first compiler-style 'error:' line of a log, else its first ninja 'FAILED:'
    line, else a Python traceback's exception line, else its last line."""
    lines = Path(path).read_text(errors="replace").splitlines()
    for pattern in (r"(?i)\berror\b\s*:", r"^FAILED: "):
        hit = next((ln.strip() for ln in lines if re.search(pattern, ln)), None)
        if hit:
            return hit[:240]
    for i, ln in enumerate(lines):
        if ln.startswith("Traceback"):
            return next((x for x in lines[i + 1:] if x and not x[0].isspace()), ln)[:240]
    return next((ln.strip() for ln in reversed(lines) if ln.strip()), "(empty log)")[:240]


def _stopped(step, rc, log, what):
    """Whether a step's command ended badly: a timeout (rc None) or a failure, which the
    step's status and note then say."""
    if rc is None:
        step.status = TIMEOUT
    elif rc != 0:
        step.status, step.note = FAIL, f"{what}exit {rc}: {_first_error(log)}"
    return rc != 0


# ---------------------------------------------------------------------- a. env
def step_env(ctx, step):
    info_path = ctx.scratch / "env.json"
    rc = ctx.call(step, [PY, __file__, "--internal", "env", info_path], ctx.out / step.log,
                  append=False)
    if _stopped(step, rc, ctx.out / step.log, ""):
        return
    if not info_path.exists():
        step.status, step.note = FAIL, f"exit 0 but no {info_path.name} written"
        return
    ctx.device = json.loads(info_path.read_text())
    d = ctx.device
    if d["cuda"]:
        step.note = (f"{d['name']} (sm_{d['capability'].replace('.', '')}), torch {d['torch']}, "
                     f"CUDA {d['torch_cuda']}, triton {d['triton']}")
        archs = os.environ.get("FUSEDLOSS_CUDA_ARCHS", DEFAULT_ARCHS).replace(" ", "")
        if d["capability"] not in archs.split(";"):
            step.note += (f"; WARNING: the build targets {archs}, not this device's "
                          f"{d['capability']} (set FUSEDLOSS_CUDA_ARCHS)")
    else:
        step.note = (f"torch sees no CUDA device (torch {d['torch']}, nvidia-smi "
                     f"{'present' if d['nvidia_smi'] else 'absent'})")
    step.status = DRY_OK if ctx.dry else PASS if d["cuda"] else FAIL


def internal_env(out_json):
    """Print the environment (into env.txt) and write the facts later steps need."""
    import platform

    def sh(cmd, timeout=10):
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
            return (p.stdout + p.stderr).strip() or f"(no output, exit {p.returncode})"
        except FileNotFoundError:
            return "absent"
        except subprocess.TimeoutExpired:
            return f"(no answer in {timeout} s)"

    def section(title, text):
        print(f"## {title}\n{text}\n", flush=True)

    section("when, where", f"{datetime.datetime.now().astimezone().isoformat()}\n"
            f"{platform.node()} {platform.platform()}\npython {sys.version.split()[0]} "
            f"({sys.executable}), {os.cpu_count()} CPUs")
    section("git", sh(["git", "-C", str(ROOT), "log", "-1", "--format=%H %cI %s"]) + "\n" +
            sh(["git", "-C", str(ROOT), "status", "--short"]))
    smi = shutil.which("nvidia-smi")
    section("nvidia-smi", sh([smi]) if smi else "absent")
    if smi:
        section("nvidia-smi query", sh([smi, "--query-gpu=name,driver_version,memory.total,"
                                        "clocks.sm,clocks.mem,clocks.max.sm,temperature.gpu,"
                                        "power.draw,compute_mode", "--format=csv"]))
    cuda_bin = os.path.join(os.environ.get("CUDA_HOME") or "/usr/local/cuda", "bin")
    for tool in ("nvcc", "compute-sanitizer", "cuobjdump", "ncu", "ninja"):
        path = shutil.which(tool) or (os.path.join(cuda_bin, tool)
                                      if os.path.exists(os.path.join(cuda_bin, tool)) else None)
        print(f"{tool}: {path} {sh([path, '--version']).splitlines()[-1]}" if path
              else f"{tool}: absent")
    print()

    import torch
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "absent"
    info = {"torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "triton": triton_version, "cuda": torch.cuda.is_available(),
            "nvidia_smi": bool(smi), "name": None, "capability": None, "tag": "no-gpu"}
    lines = [f"torch {torch.__version__} (CUDA {torch.version.cuda}, cuDNN "
             f"{torch.backends.cudnn.version()}), triton {triton_version}",
             f"torch.cuda.is_available(): {info['cuda']}"]
    if info["cuda"]:
        p = torch.cuda.get_device_properties(0)
        info.update(name=p.name, capability=f"{p.major}.{p.minor}",
                    tag=re.sub(r"[^a-z0-9]+", "-", p.name.lower()).strip("-") or "cuda")
        lines += [f"device 0 of {torch.cuda.device_count()}: {p.name}, sm_{p.major}{p.minor}, "
                  f"{p.multi_processor_count} SMs, {p.total_memory / 2**30:.1f} GiB, L2 "
                  f"{getattr(p, 'L2_cache_size', 0) / 2**20:.0f} MiB"]
    section("torch", "\n".join(lines))
    from importlib import metadata
    pkgs = []
    for name in ("pytest", "pytest-xdist", "pytest-timeout", "setuptools", "ninja",
                 "matplotlib", "transformers", *PEERS):
        try:
            pkgs.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pkgs.append(f"{name} absent")
    section("python packages", "\n".join(pkgs))
    section("settings", "\n".join(f"{k}={os.environ[k]}" for k in sorted(os.environ)
                                  if k.startswith(("FUSEDLOSS_", "TRITON_", "CUDA_",
                                                   "TORCH_", "PYTORCH_"))) or "(none)")
    Path(out_json).write_text(json.dumps(info))


# -------------------------------------------------------------------- b. build
def step_build(ctx, step):
    log = ctx.out / step.log
    archs = os.environ.get("FUSEDLOSS_CUDA_ARCHS", DEFAULT_ARCHS)
    check = ctx.scratch / "buildcheck.json"
    rc = ctx.call(step, [PY, __file__, "--internal", "buildcheck", check], log, append=False)
    if _stopped(step, rc, log, "tool check "):
        return
    missing = json.loads(check.read_text())["missing"]
    if missing:
        step.status = _missing(ctx)
        step.note = "missing: " + "; ".join(missing)
        return
    cmd = [PY, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", "."]
    if ctx.dry:
        with open(log, "a") as f:
            f.write(f"\n[gpu_validate] dry run: would run FUSEDLOSS_CUDA_ARCHS={archs} "
                    f"{shlex.join(cmd)}\n")
        step.status, step.note = DRY_OK, "pip, nvcc, ninja and a CUDA torch found; not built"
        return
    rc = ctx.call(step, cmd, log, env=dict(ctx.env, FUSEDLOSS_CUDA_ARCHS=archs))
    if _stopped(step, rc, log, "pip "):
        return
    # The build skips the CUDA extension, with a log line, where it cannot make it: the
    # GPU run needs it, so import both extensions and list the ops with CUDA kernels.
    verify = ("import torch, fusedloss, fusedloss._C, fusedloss._C_cuda\n"
              "from fusedloss import _library as L\n"
              "ops = [n for n, o in L.OPS.items() if torch._C._dispatch_has_kernel_for_"
              "dispatch_key(f'{L.CPP_NS}::{o.kernel_op}', 'CUDA')]\n"
              "print('CUDA kernels for', len(ops), 'ops:', ', '.join(ops))\n")
    rc = ctx.call(step, [PY, "-c", verify], log)
    if rc != 0:
        step.status = TIMEOUT if rc is None else FAIL
        step.note = ("built, but the extensions do not import: " +
                     _last_match(log, r"Error|skipping the CUDA extension", "see the log"))
        return
    step.status = PASS
    step.note = f"sm {archs}; " + _last_match(log, r"^CUDA kernels for")


def internal_buildcheck(out_json):
    """What the build needs: pip, setuptools, a CUDA build of torch, nvcc, ninja."""
    missing = []
    # In a child: looking pip up here would make setuptools' distutils hack load the
    # standard library's distutils, which torch.utils.cpp_extension then refuses.
    for mod in ("pip", "setuptools"):
        probe = subprocess.run([sys.executable, "-c", f"import {mod}; print({mod}.__version__)"],
                               capture_output=True, text=True)
        print(f"{mod}: {probe.stdout.strip() if probe.returncode == 0 else 'MISSING'}")
        if probe.returncode != 0:
            missing.append(mod)
    import torch
    from torch.utils import cpp_extension
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}")
    if torch.version.cuda is None:
        missing.append(f"a CUDA build of torch (this one, {torch.__version__}, is CPU-only)")
    # setup.py's own search: CUDA_HOME, then /usr/local/cuda, then nvcc on the PATH.
    homes = [os.environ.get("CUDA_HOME"), "/usr/local/cuda"]
    nvcc = next((os.path.join(h, "bin", "nvcc") for h in homes
                 if h and os.path.exists(os.path.join(h, "bin", "nvcc"))), shutil.which("nvcc"))
    if nvcc:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
        print(f"nvcc: {nvcc}: {out.strip().splitlines()[-1] if out.strip() else '?'}")
    else:
        print("nvcc: MISSING")
        missing.append("nvcc (set CUDA_HOME to the CUDA toolkit)")
    ninja = cpp_extension.is_ninja_available()
    print(f"ninja: {'found' if ninja else 'MISSING'}")
    if not ninja:
        missing.append("ninja")
    Path(out_json).write_text(json.dumps({"missing": missing}))


# -------------------------------------------------------------------- c. peers
def step_peers(ctx, step):
    log = ctx.out / step.log
    folder = ctx.wheels
    wheels = sorted(folder.glob("*.whl")) if folder.is_dir() else []
    with open(log, "w") as f:
        f.write(f"wheels folder: {folder} ({len(wheels)} wheels)\n" +
                "".join(f"  {w.name}\n" for w in wheels))
    if not wheels:
        step.status = SKIP
        step.note = (f"no wheels in {_show(folder)}: " + ", ".join(PEERS) + " not installed "
                     "(their benchmark rows say 'not run')")
        return
    site = ctx.scratch / "site"
    cmd = [PY, "-m", "pip", "install", "--no-index", "--no-deps", "--no-compile",
           "--no-cache-dir", "--upgrade", "--target", site, *wheels]
    if ctx.dry:
        cmd.insert(4, "--dry-run")
    rc = ctx.call(step, cmd, log)
    if _stopped(step, rc, log, "pip "):
        return
    if ctx.dry:
        step.status, step.note = DRY_OK, f"{len(wheels)} wheels install cleanly (not installed)"
        return
    # Later steps (tests, benchmark workers) see the wheels through PYTHONPATH.
    ctx.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site),
                                                          ctx.env.get("PYTHONPATH")]))
    probe = ("import importlib, importlib.metadata as m\n"
             f"for dist, mod in {PEERS!r}.items():\n"
             "    try:\n"
             "        importlib.import_module(mod)\n"
             "        print(f'{dist}: {m.version(dist)} importable')\n"
             "    except Exception as e:\n"
             "        print(f'{dist}: not importable ({type(e).__name__}: {e})')\n")
    rc = ctx.call(step, [PY, "-c", probe], log)
    if rc is None:
        step.status = TIMEOUT
        return
    notes, broken = [], []
    found = {ln.split(":")[0]: ln for ln in log.read_text().splitlines()
             if ln.split(":")[0] in PEERS}
    for dist, mod in PEERS.items():
        carried = any(w.name.lower().startswith(mod + "-") for w in wheels)
        line = found.get(dist, f"{dist}: not probed")
        if carried and "not importable" in line:
            broken.append(dist)
        notes.append(line if carried or "not importable" not in line
                     else f"{dist}: not installed (no wheel)")
    step.note = "; ".join(notes)
    step.status = FAIL if rc != 0 or broken else PASS


def _show(path):
    try:
        return str(Path(path).relative_to(ROOT))
    except ValueError:
        return str(path)


# -------------------------------------------------------------------- d. tests
def suite_files():
    """Every test file, tests/test_gpu.py (the full-size GPU checks) first; never this
    script's own test (it would run the dry run inside the run)."""
    files = sorted(p for p in (ROOT / "tests").glob("test_*.py")
                   if p.name not in ("test_gpu.py", "test_gpu_validate.py"))
    return [ROOT / "tests" / "test_gpu.py", *files]


def _pytest_tail(log, start=0):
    """pytest's last summary line ('== 3 failed, 1870 passed in 100.2s ==')."""
    line = _last_match(log, r"\b(passed|failed|errors?|no tests ran|collected|deselected|"
                            r"skipped)\b.* in [\d.]+s", start=start)
    return line.strip("= ")


def step_tests(ctx, step):
    log, xml = ctx.out / "tests.log", ctx.out / "tests.xml"
    if ctx.dry:
        options = ["--collect-only", "-q"]
    else:
        options = ["-v", "-ra", "--durations=25"]
        if importlib.util.find_spec("xdist") is not None:
            options += ["-n", str(min(8, os.cpu_count() or 1))]
        if importlib.util.find_spec("pytest_timeout") is not None:
            options.append("--timeout=240")  # one hung test fails, not the whole step
    cmd = [*PYTEST, *options, f"--junitxml={xml}", *[_show(p) for p in suite_files()]]
    env = dict(ctx.env, FUSEDLOSS_REQUIRE_BACKENDS=REQUIRED_BACKENDS)
    with open(log, "w") as f:
        f.write(f"FUSEDLOSS_REQUIRE_BACKENDS={REQUIRED_BACKENDS}: a backend that cannot "
                "run fails its tests instead of skipping them\n")
    rc = ctx.call(step, cmd, log, env=env)
    step.note = _pytest_tail(log)
    if rc is None:
        step.status = TIMEOUT
        step.note = "killed at the limit; the tests that ended are in tests.log (-v)"
    elif rc != 0:
        step.status = FAIL
        step.note = f"pytest exit {rc}: {step.note}"
    else:
        step.status = DRY_OK if ctx.dry else PASS


# --------------------------------------------------------- e. compute-sanitizer
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
                      *[_show(p) for p in suite_files()]], plugins=[Collect()])
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


def _sanitizer_path():
    homes = [os.environ.get("CUDA_HOME"), "/usr/local/cuda"]
    return shutil.which("compute-sanitizer") or next(
        (os.path.join(h, "bin", "compute-sanitizer") for h in homes
         if h and os.path.exists(os.path.join(h, "bin", "compute-sanitizer"))), None)


def _sanitizer_plan(ctx, step, log):
    """The selection, made once for both tools; None (step marked failed) on error."""
    if ctx.plan is None:
        path = ctx.scratch / "plan.json"
        rc = ctx.call(step, [PY, __file__, "--internal", "plan", path], log)
        if rc != 0 or not path.exists():
            step.status = TIMEOUT if rc is None else FAIL
            step.note = f"test selection failed (exit {rc}): {_first_error(log)}"
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


def _sanitize(ctx, step, tool):
    log = ctx.out / step.log
    with open(log, "a") as f:
        f.write(f"\n{'=' * 30} {tool} {'=' * 30}\n")
    plan = _sanitizer_plan(ctx, step, log)
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
    summary = _last_match(log, r"ERROR SUMMARY: \d+ error", start=start)
    errors = int(re.search(r"(\d+) error", summary).group(1)) if summary else None
    hazards = _last_match(log, r"RACECHECK SUMMARY", start=start)
    unsupported = _last_match(log, r"Device not supported", start=start)
    tests = _pytest_tail(log, start)
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


# -------------------------------------------------------------- f. benchmarks
def bench_losses():
    """benchmarks.cases.LOSSES (read without importing torch), BENCH_FIRST first."""
    tree = ast.parse((ROOT / "benchmarks" / "cases.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "LOSSES"
                                                for t in node.targets):
            losses = list(ast.literal_eval(node.value))
            return sorted(losses, key=lambda x: (BENCH_FIRST + (x,)).index(x))
    raise RuntimeError("benchmarks/cases.py defines no LOSSES")


def _bench_archive(ctx):
    return ctx.out / f"bench-{'dry-run' if ctx.dry else ctx.device.get('tag') or 'cuda'}.tar.gz"


def _pack_bench(ctx):
    """Everything the runs wrote so far, as one archive (the device tool returns 8
    files at most); replaced atomically, so a kill leaves the previous one whole."""
    archive = _bench_archive(ctx)
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
        cmd = [PY, "-m", "benchmarks", "--device", "cuda", f"--{suite}", "--loss", *chunk,
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
            notes.append(f"{name}: exit {rc} ({_first_error(log)[:120]})")
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
    _bench(ctx, step, "quick")


def step_bench_full(ctx, step):
    _bench(ctx, step, "full")


# ------------------------------------------------------------------ g. summary
def steps_table():
    """The steps, with their time shares (seconds) and the files they write."""
    return [
        # name, share_s, min_s, kept, required, fatal, log, run
        Step("env", 30, 10, True, True, True, "env.txt", step_env),
        Step("build", 240, 60, True, True, True, "build.log", step_build),
        Step("peers", 30, 5, True, False, False, "peers.log", step_peers),
        Step("tests", 200, 60, True, True, False, "tests.log, tests.xml", step_tests),
        Step("memcheck", 75, 30, True, True, False, "sanitizer.log", step_memcheck),
        Step("racecheck", 60, 20, True, True, False, "sanitizer.log", step_racecheck),
        # The benchmarks take what is left: the quick suite, then the full one.
        Step("bench", math.inf, 30, True, False, False, "bench-<device>.tar.gz", step_bench),
        Step("bench-full", math.inf, 120, False, False, False, "bench-<device>.tar.gz",
             step_bench_full),
    ]


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
        log = s.log.replace("bench-<device>.tar.gz", _bench_archive(ctx).name)
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


# --------------------------------------------------------------------- driver
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
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[2:]))
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
        internal = {"env": internal_env, "buildcheck": internal_buildcheck,
                    "plan": internal_plan}
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


if __name__ == "__main__":
    sys.exit(main())
