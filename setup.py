"""Build fusedloss: the Python package, the CPU C++ extension always, and the CUDA
extension wherever nvcc and a CUDA build of torch are present.

Environment variables:
  FUSEDLOSS_CUDA_ARCHS   compute capabilities for the CUDA build, ';'-separated
                         (default "8.0;9.0"; CI uses "9.0" to keep the build short)
  FUSEDLOSS_NO_CUDA=1    skip the CUDA extension even where it could be built
  FUSEDLOSS_NO_EXT=1     build no extension at all (the package keeps its reference
                         and Triton paths)
  MAX_JOBS               parallel compile jobs (default: bounded by cores and memory)
"""
import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _log(msg):
    print(f"[fusedloss setup] {msg}", file=sys.stderr, flush=True)


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
    cores = os.cpu_count() or 1
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gib = 8
    # nvcc and g++ on torch headers peak at about 3 GiB per job.
    return max(1, min(cores, int(mem_gib // 3)))


def _extensions():
    """Return (ext_modules, cmdclass), with a clear message for every part skipped."""
    if os.environ.get("FUSEDLOSS_NO_EXT") == "1":
        _log("FUSEDLOSS_NO_EXT=1: building no C++ extension (reference and Triton only).")
        return [], {}
    cuda_home = _find_cuda_home()
    if cuda_home:
        os.environ.setdefault("CUDA_HOME", cuda_home)
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError as exc:
        _log(f"torch is not importable ({exc}); building no C++ extension. "
             "Install torch first and build with --no-build-isolation.")
        return [], {}

    os.environ.setdefault("MAX_JOBS", str(_default_max_jobs()))
    cxx_flags = ["-O3", "-std=c++20"]
    if sys.platform.startswith("linux"):
        cxx_flags.append("-fopenmp")
    include_dirs = [os.path.join(ROOT, "csrc")]

    cpu_sources = [os.path.relpath(p, ROOT) for p in
                   [os.path.join(ROOT, "csrc", "fusedloss.cpp")]
                   + sorted(glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
                   if os.path.exists(p)]
    exts = []
    if cpu_sources:
        exts.append(CppExtension(
            "fusedloss._C", cpu_sources, include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"] if sys.platform.startswith("linux") else []))
    else:
        _log("no C++ sources under csrc/: building no CPU extension.")

    cuda_sources = sorted(os.path.relpath(p, ROOT)
                          for p in glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    skip_why = None
    if os.environ.get("FUSEDLOSS_NO_CUDA") == "1":
        skip_why = "FUSEDLOSS_NO_CUDA=1 is set"
    elif torch.version.cuda is None:
        skip_why = f"this torch ({torch.__version__}) is a CPU-only build"
    elif not cuda_home or not os.path.exists(os.path.join(cuda_home, "bin", "nvcc")):
        skip_why = "nvcc was not found (set CUDA_HOME to the CUDA toolkit)"
    elif not cuda_sources:
        skip_why = "there are no .cu sources under csrc/cuda/"
    if skip_why:
        _log(f"skipping the CUDA extension: {skip_why}. The CPU extension, the Triton "
             "kernels and the reference path are unaffected.")
    else:
        archs = os.environ.get("FUSEDLOSS_CUDA_ARCHS", "8.0;9.0")
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        _log(f"building the CUDA extension with nvcc from {cuda_home} for arch(s) {archs} "
             f"(MAX_JOBS={os.environ['MAX_JOBS']}).")
        exts.append(CUDAExtension(
            "fusedloss._C_cuda", cuda_sources, include_dirs=include_dirs,
            extra_compile_args={
                "cxx": ["-O3", "-std=c++20"],
                "nvcc": ["-O3", "-std=c++20", "--use_fast_math", "-lineinfo",
                         "--expt-relaxed-constexpr"],
            }))
    return exts, ({"build_ext": BuildExtension.with_options(use_ninja=True)} if exts else {})


ext_modules, cmdclass = _extensions()

setup(
    name="fusedloss",
    version="0.1.0",
    description="Fused softmax cross-entropy, focal and InfoNCE losses for PyTorch "
                "(Triton, CUDA C++ and CPU C++), checked against a pure-PyTorch reference.",
    python_requires=">=3.9",
    packages=["fusedloss", "fusedloss.kernels", "fusedloss.benchmarks"],
    package_dir={"fusedloss": "fusedloss", "fusedloss.kernels": "kernels",
                 "fusedloss.benchmarks": "benchmarks"},
    install_requires=["torch>=2.5"],
    extras_require={"bench": ["matplotlib", "tqdm"], "test": ["pytest"]},
    entry_points={"console_scripts": ["fusedloss-bench=fusedloss.benchmarks.__main__:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
