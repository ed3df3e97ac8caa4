"""Build fusedloss: the Python package, the CPU C++ extension always, and the CUDA
extension wherever nvcc and a CUDA build of torch are present.

The op schemas are written once, in Python (fusedloss/_library.py and the loss modules);
this build generates their C++ view, build/generated/fusedloss_schemas.h (one struct
per op, see csrc/common/op_boxing.h), so the C++ kernels read the same schemas. It also
generates the include lists that stand in for hand-kept ones (include_lists()): a new
loss's csrc/common/<loss>_ops.h and csrc/cpu/<loss>.h register themselves.

Environment variables:
  FUSEDLOSS_CUDA_ARCHS   compute capabilities for the CUDA build, ';'-separated. Default
                         "9.0" (DEFAULT_CUDA_ARCHS): the H100/H200 this project targets,
                         one architecture, as each one adds the device compilation of every
                         .cu file again; e.g. "8.0;9.0" adds the A100
  FUSEDLOSS_NO_CUDA=1    skip the CUDA extension even where it could be built
  FUSEDLOSS_NO_EXT=1     build no extension at all (the package keeps its reference
                         and Triton paths)
  MAX_JOBS               parallel compile jobs (default: the cores, at most one per 3 GiB
                         of memory); ninja (requirements.txt) runs them

Progress: pip shows a build's output only with -v or when the build fails, so the
`[fusedloss setup]` lines (what is built, for which architectures, what is skipped and
why, each source compiled, the time each extension took) are written to the terminal
(/dev/tty) as well as to stderr whenever stderr is not itself the terminal.

The version is fusedloss.__version__ (fusedloss/__init__.py), read from there.
"""
import glob
import os
import re
import shutil
import sys
import threading
import time

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
GENERATED = os.path.join(ROOT, "build", "generated")
DEFAULT_CUDA_ARCHS = "9.0"
# Python packages and their source folders: the benchmark runner lives at the top of the
# repository and installs as fusedloss.benchmarks. The Triton kernels live at the top too
# (kernels/) and install as fusedloss.kernels through the link fusedloss/kernels: the
# folder has no __init__.py, so that it never shadows Hugging Face's `kernels` package for
# a command started from the root (kernels/README.md), and setuptools' editable finder
# maps a folder without __init__.py only below a mapped package.
PACKAGE_DIRS = {"fusedloss": "fusedloss", "fusedloss.benchmarks": "benchmarks"}
NAMESPACE_PACKAGES = ["fusedloss.kernels"]


def _log(msg):
    """A `[fusedloss setup]` line on stderr (pip's log) and, when stderr is not the
    terminal (pip captures it), on the terminal too."""
    line = f"[fusedloss setup] {msg}"
    print(line, file=sys.stderr, flush=True)
    if sys.stderr.isatty():
        return
    try:
        with open("/dev/tty", "w") as tty:
            # A line of its own; the trailing space is for pip's spinner, which
            # overwrites the last character of the line it spins on.
            tty.write(f"\n{line} ")
    except OSError:  # no controlling terminal (CI): stderr is the log
        pass


def _version():
    with open(os.path.join(ROOT, "fusedloss", "__init__.py")) as f:
        return re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)


def _packages():
    """Every package under PACKAGE_DIRS, subpackages included (fusedloss.integrations...),
    and the NAMESPACE_PACKAGES."""
    return NAMESPACE_PACKAGES + [name + (f".{sub}" if sub else "")
                                 for name, folder in PACKAGE_DIRS.items()
                                 for sub in ["", *find_packages(os.path.join(ROOT, folder))]]


def _find_cuda_home():
    # torch guesses CUDA_HOME from the nvcc on PATH; a /usr/local/bin/nvcc symlink makes
    # it guess /usr/local, which has no CUDA headers. Prefer the real toolkit directory.
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    for cand in ("/usr/local/cuda",):
        if os.path.exists(os.path.join(cand, "bin", "nvcc")):
            return cand
    nvcc = shutil.which("nvcc")
    if nvcc:
        return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    return None


def _default_max_jobs():
    # The cores this process may run on (taskset, cpusets), not all the machine has.
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
        os.cpu_count() or 1
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gib = 8
    # nvcc and g++ on torch headers peak at about 3 GiB per job.
    return max(1, min(cores, int(mem_gib // 3)))


# Schema types -> (C++ member type, IValue accessor).
_CPP_TYPES = {"Tensor": ("at::Tensor", "toTensor()"),
              "Optional[Tensor]": ("std::optional<at::Tensor>", "toOptional<at::Tensor>()"),
              "float": ("double", "toDouble()"), "int": ("int64_t", "toInt()"),
              "bool": ("bool", "toBool()")}


def schema_header():
    """The C++ view of every op schema: a struct per op, read from the boxed stack."""
    os.environ["FUSEDLOSS_BUILDING"] = "1"  # no "extension missing" warning while building it
    sys.path.insert(0, ROOT)
    try:
        import torch
        import fusedloss  # noqa: F401  (defines every op)
        from fusedloss import _library
    finally:
        sys.path.remove(ROOT)
    lines = ["// Generated by setup.py from the op schemas of fusedloss (fusedloss._library.OPS).",
             "// Do not edit: change the schema in Python and rebuild.", "#pragma once", "",
             "#include <ATen/core/stack.h>", "", "#include <cstdint>", "#include <optional>", "",
             "namespace fusedloss {", "namespace schema {"]
    for op in _library.OPS.values():
        parsed = torch._C.parse_schema(f"{_library.CPP_NS}::{op.name}{op.schema}")
        args = parsed.arguments
        lines += ["", f"// {op.name}{op.schema}", f"struct {op.name} {{",
                  f"  static constexpr std::size_t kNumArgs = {len(args)};",
                  f"  static constexpr std::size_t kNumReturns = {len(parsed.returns)};"]
        for a in args:
            if str(a.type) not in _CPP_TYPES:
                raise RuntimeError(f"op {op.name}: no C++ type for schema type {a.type}")
            lines.append(f"  {_CPP_TYPES[str(a.type)][0]} {a.name};")
        inits = [f"{a.name}(arg(stack, {i}).{_CPP_TYPES[str(a.type)][1]})"
                 for i, a in enumerate(args)]
        lines += [f"  explicit {op.name}(const torch::jit::Stack& stack)",
                  "      : " + ",\n        ".join(inits) + " {}", " private:",
                  "  static const c10::IValue& arg(const torch::jit::Stack& s, std::size_t i) {",
                  "    return s[s.size() - kNumArgs + i];", "  }", "};"]
    lines += ["", "}  // namespace schema", "}  // namespace fusedloss", ""]
    return "\n".join(lines)


def include_lists():
    """{generated header: text} for the two lists of C++ files found by globbing:
    fusedloss_ops.h, every csrc/common/*_ops.h (each registers its ops; each device's
    register.cpp includes the list), and fusedloss_cpu_kernels.h, every csrc/cpu/*.h with a
    FUSEDLOSS_CPU_KERNEL line (each registers its kernel; cpu/isa_*.cpp compile the list once
    per instruction set)."""
    def listing(what, includes, first=()):
        return "\n".join(["// Generated by setup.py (include_lists): " + what,
                          "// Do not edit: add or remove the files and rebuild.", "#pragma once",
                          "", *first, *(f'#include "{h}"' for h in includes), ""])

    def rel(path):
        return os.path.relpath(path, os.path.join(ROOT, "csrc")).replace(os.sep, "/")

    ops = [rel(p) for p in sorted(glob.glob(os.path.join(ROOT, "csrc", "common", "*_ops.h")))]
    kernels = []
    for path in sorted(glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.h"))):
        with open(path) as f:
            if re.search(r"^FUSEDLOSS_CPU_KERNEL\(", f.read(), re.M):
                kernels.append(rel(path))
    return {
        "fusedloss_ops.h": listing("the host code and op registration of every loss.", ops),
        "fusedloss_cpu_kernels.h": listing(
            "every CPU kernel header (each cpu/isa_*.cpp compiles them).",
            kernels, first=['#include "cpu/vec.h"  // first: the vector overloads of '
                            "common/loss_math.h's primitives"]),
    }


def _write_if_changed(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if os.path.exists(path):
        with open(path) as f:
            if f.read() == text:
                return
    with open(path, "w") as f:
        f.write(text)


def _sources(*patterns):
    return sorted(os.path.relpath(p, ROOT) for pattern in patterns
                  for p in glob.glob(os.path.join(ROOT, "csrc", pattern)))


def _build_ext(BuildExtension, notes):
    """torch's BuildExtension (ninja), which first writes the schema header and says what it
    builds, then reports each source as it is compiled and the time each extension took."""
    class BuildExt(BuildExtension):
        def run(self):
            for note in notes:
                _log(note)
            _write_if_changed(os.path.join(GENERATED, "fusedloss_schemas.h"), schema_header())
            for name, text in include_lists().items():
                _write_if_changed(os.path.join(GENERATED, name), text)
            super().run()

        def build_extension(self, ext):
            started = time.time()
            _log(f"{ext.name}: compiling {len(ext.sources)} sources, "
                 f"{os.environ['MAX_JOBS']} at a time.")
            objects = self.compiler.object_filenames(ext.sources, output_dir=self.build_temp)
            compiled, stop = [], threading.Event()
            watcher = threading.Thread(target=self._watch, daemon=True,
                                       args=(ext, dict(zip(objects, ext.sources)), started,
                                             compiled, stop))
            watcher.start()
            try:
                super().build_extension(ext)
            finally:
                stop.set()
                watcher.join()
            _log(f"{ext.name}: built in {time.time() - started:.0f} s ({len(compiled)} of "
                 f"{len(ext.sources)} sources compiled, the others were up to date).")

        @staticmethod
        def _watch(ext, sources, started, compiled, stop):
            """Report each object file ninja writes (its compile finished)."""
            while True:
                stopped = stop.wait(1.0)
                for obj, src in sources.items():
                    if src not in compiled and os.path.exists(obj) and \
                            os.path.getmtime(obj) >= started - 1:
                        compiled.append(src)
                        _log(f"{ext.name}: compiled {src} ({len(compiled)}/{len(sources)}, "
                             f"{time.time() - started:.0f} s)")
                if stopped:
                    return
    return BuildExt


def _extensions():
    """Return (ext_modules, cmdclass), with a clear message for every part skipped."""
    if os.environ.get("FUSEDLOSS_NO_EXT") == "1":
        print("[fusedloss setup] FUSEDLOSS_NO_EXT=1: building no C++ extension (reference "
              "and Triton only).", file=sys.stderr)
        return [], {}
    cuda_home = _find_cuda_home()
    if cuda_home:
        os.environ.setdefault("CUDA_HOME", cuda_home)
    try:
        import torch
        from torch.utils.cpp_extension import (BuildExtension, CppExtension, CUDAExtension,
                                               is_ninja_available)
    except ImportError as exc:
        # Never a silent skip: without the extension `auto` would quietly run the slow
        # reference path.
        raise RuntimeError(
            f"[fusedloss setup] torch is not importable here ({exc}), so the C++ extension "
            "cannot be built. Install torch first and build with --no-build-isolation "
            "(pip install --no-build-isolation -e . or pip install --no-build-isolation .), "
            "or set FUSEDLOSS_NO_EXT=1 to install without it.") from exc

    # Said once, when build_ext runs (setup.py itself runs once per pip hook).
    notes = [] if is_ninja_available() else [
        "ninja was not found (pip install ninja): the sources compile one at a time."]
    os.environ.setdefault("MAX_JOBS", str(_default_max_jobs()))
    cxx_flags = ["-O3", "-std=c++20"]
    if sys.platform.startswith("linux"):
        cxx_flags.append("-fopenmp")
    include_dirs = [os.path.join(ROOT, "csrc"), GENERATED]

    exts = [CppExtension(
        "fusedloss._C", _sources("cpu/*.cpp"), include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"] if sys.platform.startswith("linux") else [])]

    skip_why = None
    if os.environ.get("FUSEDLOSS_NO_CUDA") == "1":
        skip_why = "FUSEDLOSS_NO_CUDA=1 is set"
    elif torch.version.cuda is None:
        skip_why = f"this torch ({torch.__version__}) is a CPU-only build"
    elif not cuda_home or not os.path.exists(os.path.join(cuda_home, "bin", "nvcc")):
        skip_why = "nvcc was not found (set CUDA_HOME to the CUDA toolkit)"
    if skip_why:
        notes.append(f"skipping the CUDA extension: {skip_why}. The CPU extension, the "
                     "Triton kernels and the reference path are unaffected.")
    else:
        archs = os.environ.get("FUSEDLOSS_CUDA_ARCHS", DEFAULT_CUDA_ARCHS)
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        notes.append(f"building the CUDA extension with nvcc from {cuda_home} for arch(s) "
                     f"{archs} (FUSEDLOSS_CUDA_ARCHS; default {DEFAULT_CUDA_ARCHS}).")
        exts.append(CUDAExtension(
            "fusedloss._C_cuda", _sources("cuda/*.cu", "cuda/*.cpp"), include_dirs=include_dirs,
            extra_compile_args={
                "cxx": ["-O3", "-std=c++20"],
                "nvcc": ["-O3", "-std=c++20", "--use_fast_math", "-lineinfo",
                         "--expt-relaxed-constexpr"],
            }))
    return exts, {"build_ext": _build_ext(BuildExtension, notes)}


ext_modules, cmdclass = _extensions()

setup(
    name="fusedloss",
    version=_version(),
    description="Fused softmax cross-entropy, focal and InfoNCE losses for PyTorch "
                "(Triton, CUDA C++ and CPU C++), checked against a pure-PyTorch reference.",
    python_requires=">=3.9",
    packages=_packages(),
    package_dir=PACKAGE_DIRS,
    install_requires=["torch>=2.5"],
    extras_require={"bench": ["matplotlib", "tqdm"], "test": ["pytest"],
                    "transformers": ["transformers"], "trl": ["trl"]},
    entry_points={"console_scripts": ["fusedloss-bench=fusedloss.benchmarks.__main__:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
