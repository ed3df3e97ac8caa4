"""Step env: nvidia-smi, torch / Triton / CUDA versions and the device, into env.txt; the
facts later steps need (the device's name and capability) come back as JSON."""
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from .common import DEFAULT_ARCHS, DRY_OK, FAIL, INTERNAL, PASS, PEERS, ROOT, stopped


def step_env(ctx, step):
    info_path = ctx.scratch / "env.json"
    rc = ctx.call(step, [*INTERNAL, "env", info_path], ctx.out / step.log,
                  append=False)
    if stopped(step, rc, ctx.out / step.log, ""):
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
