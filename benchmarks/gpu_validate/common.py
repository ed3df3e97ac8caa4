"""What every step shares: the statuses, the Step record, the run's Context (budget,
output folder, environment) with the one way to run a command under a step's time limit,
and the log readers the steps' notes are made from."""
import dataclasses
import datetime
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable
PYTEST = (PY, "-m", "pytest", "-p", "no:cacheprovider")
# This package as a command, for the steps' helpers that run in a child (--internal):
# the commands run in ROOT, so `-m` finds the package there.
INTERNAL = (PY, "-m", "benchmarks.gpu_validate", "--internal")
DEFAULT_ARCHS = "9.0"
# The peers the benchmarks compare with, carried as wheels (pip name: the module the
# providers import; verl's through benchmarks.providers.verl_module, without ray).
PEERS = {"liger-kernel": "liger_kernel", "cut-cross-entropy": "cut_cross_entropy",
         "trl": "trl.kernels", "verl": "verl.utils.kernel.linear_cross_entropy"}

PASS, FAIL, TIMEOUT, SKIP, ABSENT, NOT_RUN, DRY_OK = (
    "pass", "fail", "timeout", "skip", "absent", "not run", "dry ok")
OK_STATUSES = {PASS, SKIP}
DRY_OK_STATUSES = {DRY_OK, ABSENT, SKIP}


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


def missing(ctx):
    """A tool that is not here: absent in a dry run, a failure in a real one."""
    return ABSENT if ctx.dry else FAIL


def last_match(path, pattern, default="", start=0):
    """The last line of the log (from byte `start` on) that matches, stripped."""
    with open(path, "rb") as f:
        f.seek(start)
        lines = [ln.strip() for ln in f.read().decode(errors="replace").splitlines()]
    hits = [ln for ln in lines if re.search(pattern, ln)]
    return hits[-1] if hits else default


def first_error(path):
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


def stopped(step, rc, log, what):
    """Whether a step's command ended badly: a timeout (rc None) or a failure, which the
    step's status and note then say."""
    if rc is None:
        step.status = TIMEOUT
    elif rc != 0:
        step.status, step.note = FAIL, f"{what}exit {rc}: {first_error(log)}"
    return rc != 0


def shown(path):
    try:
        return str(Path(path).relative_to(ROOT))
    except ValueError:
        return str(path)


def pytest_tail(log, start=0):
    """pytest's last summary line ('== 3 failed, 1870 passed in 100.2s ==')."""
    line = last_match(log, r"\b(passed|failed|errors?|no tests ran|collected|deselected|"
                            r"skipped)\b.* in [\d.]+s", start=start)
    return line.strip("= ")
