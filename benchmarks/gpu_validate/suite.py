"""Step tests: the whole suite with every backend required, tests/test_gpu.py (full sizes,
bf16/fp16/fp32, N*V > 2^31) first, into tests.log and tests.xml; a dry run collects it."""
import importlib.util
import os

from .common import DRY_OK, FAIL, PASS, PYTEST, ROOT, TIMEOUT, pytest_tail, shown

REQUIRED_BACKENDS = "reference,triton,cuda,cpu"


def suite_files():
    """Every test file, tests/test_gpu.py (the full-size GPU checks) first; never this
    script's own test (it would run the dry run inside the run)."""
    files = sorted(p for p in (ROOT / "tests").glob("test_*.py")
                   if p.name not in ("test_gpu.py", "test_gpu_validate.py"))
    return [ROOT / "tests" / "test_gpu.py", *files]


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
    cmd = [*PYTEST, *options, f"--junitxml={xml}", *[shown(p) for p in suite_files()]]
    env = dict(ctx.env, FUSEDLOSS_REQUIRE_BACKENDS=REQUIRED_BACKENDS)
    with open(log, "w") as f:
        f.write(f"FUSEDLOSS_REQUIRE_BACKENDS={REQUIRED_BACKENDS}: a backend that cannot "
                "run fails its tests instead of skipping them\n")
    rc = ctx.call(step, cmd, log, env=env)
    step.note = pytest_tail(log)
    if rc is None:
        step.status = TIMEOUT
        step.note = "killed at the limit; the tests that ended are in tests.log (-v)"
    elif rc != 0:
        step.status = FAIL
        step.note = f"pytest exit {rc}: {step.note}"
    else:
        step.status = DRY_OK if ctx.dry else PASS
