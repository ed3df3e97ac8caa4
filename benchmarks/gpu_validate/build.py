"""Step build: FUSEDLOSS_CUDA_ARCHS=9.0 pip install --no-build-isolation --no-deps -e .,
then both extensions imported (a failure stops the run: nothing after it can work). A dry
run looks for the build's tools only."""
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from .common import (DEFAULT_ARCHS, DRY_OK, FAIL, INTERNAL, PASS, PY, TIMEOUT, last_match,
                     missing, stopped)


def step_build(ctx, step):
    log = ctx.out / step.log
    archs = os.environ.get("FUSEDLOSS_CUDA_ARCHS", DEFAULT_ARCHS)
    check = ctx.scratch / "buildcheck.json"
    rc = ctx.call(step, [*INTERNAL, "buildcheck", check], log, append=False)
    if stopped(step, rc, log, "tool check "):
        return
    absent = json.loads(check.read_text())["missing"]
    if absent:
        step.status = missing(ctx)
        step.note = "missing: " + "; ".join(absent)
        return
    cmd = [PY, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", "."]
    if ctx.dry:
        with open(log, "a") as f:
            f.write(f"\n[gpu_validate] dry run: would run FUSEDLOSS_CUDA_ARCHS={archs} "
                    f"{shlex.join(cmd)}\n")
        step.status, step.note = DRY_OK, "pip, nvcc, ninja and a CUDA torch found; not built"
        return
    rc = ctx.call(step, cmd, log, env=dict(ctx.env, FUSEDLOSS_CUDA_ARCHS=archs))
    if stopped(step, rc, log, "pip "):
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
                     last_match(log, r"Error|skipping the CUDA extension", "see the log"))
        return
    step.status = PASS
    step.note = f"sm {archs}; " + last_match(log, r"^CUDA kernels for")


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
