"""Packaging: one version, setup.py's defaults, what a wheel holds, where the benchmark
runner writes. The wheel with the compiled extension takes minutes to build, so that test
runs only with FUSEDLOSS_TEST_WHEEL=1; the pure-Python wheel (FUSEDLOSS_NO_EXT=1) is
built every time."""
import ast
import importlib.metadata
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import fusedloss

ROOT = Path(__file__).resolve().parents[1]
SETUP = ast.parse((ROOT / "setup.py").read_text())
try:
    from fusedloss.benchmarks import __main__ as cli
except ImportError:  # a source checkout that is not installed
    sys.path.insert(0, str(ROOT))
    from benchmarks import __main__ as cli


def _setup_constant(name):
    for node in SETUP.body:
        if isinstance(node, ast.Assign) and [t.id for t in node.targets] == [name]:
            return ast.literal_eval(node.value)
    raise AssertionError(f"setup.py defines no {name}")


def test_one_version():
    """fusedloss.__version__ is the version: setup.py reads it rather than repeating it."""
    setup_call = next(n for n in ast.walk(SETUP) if isinstance(n, ast.Call)
                      and getattr(n.func, "id", None) == "setup")
    version = next(k.value for k in setup_call.keywords if k.arg == "version")
    assert not isinstance(version, ast.Constant), "setup.py repeats the version"
    try:
        installed = importlib.metadata.version("fusedloss")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("fusedloss is not installed (a bare source checkout)")
    assert fusedloss.__version__ == installed


def test_default_cuda_arch():
    """One architecture by default, the H100/H200's, documented and used."""
    default = _setup_constant("DEFAULT_CUDA_ARCHS")
    assert default == "9.0"
    assert f'"{default}"' in ast.get_docstring(SETUP)
    reads = [n for n in ast.walk(SETUP) if isinstance(n, ast.Call)
             and [ast.unparse(a) for a in n.args] == ["'FUSEDLOSS_CUDA_ARCHS'",
                                                      "DEFAULT_CUDA_ARCHS"]]
    assert reads, "FUSEDLOSS_CUDA_ARCHS is not read with DEFAULT_CUDA_ARCHS as its default"


def test_runner_writes_under_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = cli.default_out_dir()
    assert out == tmp_path / "fusedloss-bench-results"
    assert ROOT / "benchmarks" / "results" not in [out, *out.parents]


def _copy_sources(dst):
    shutil.copytree(ROOT, dst, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", "build", "dist", "*.egg-info", "*.so", "__pycache__", ".pytest_cache",
        "results", "fusedloss-bench-results", ".venv"))
    return dst


def _build_wheel(tmp_path, **env):
    src = _copy_sources(tmp_path / "src")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps",
         "-w", str(tmp_path / "wheels"), str(src)],
        capture_output=True, text=True, timeout=1800, env={**os.environ, **env})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    wheel, = (tmp_path / "wheels").glob("fusedloss-*.whl")
    return src, wheel


def _installed_name(src, path):
    """Where a source .py file lands in the wheel (setup.py's PACKAGE_DIRS; the kernels/
    folder through its link fusedloss/kernels)."""
    rel = path.relative_to(src).as_posix()
    folders = {**_setup_constant("PACKAGE_DIRS"), "fusedloss.kernels": "kernels"}
    for package, folder in folders.items():
        if rel.startswith(folder + "/"):
            return package.replace(".", "/") + rel[len(folder):]
    return None


def test_wheel_holds_every_package(tmp_path):
    """Every .py file of fusedloss, its subpackages, the kernels and the runner is in the
    wheel, with the version and the fusedloss-bench command."""
    src, wheel = _build_wheel(tmp_path, FUSEDLOSS_NO_EXT="1")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {name for path in src.rglob("*.py")
                if (name := _installed_name(src, path)) is not None}
    assert {"fusedloss/__init__.py", "fusedloss/kernels/cross_entropy.py",
            "fusedloss/benchmarks/__main__.py"} <= expected
    assert expected <= names, sorted(expected - names)
    info = f"fusedloss-{fusedloss.__version__}.dist-info"
    assert f"{info}/METADATA" in names, sorted(names)
    entry_points = zipfile.ZipFile(wheel).read(f"{info}/entry_points.txt").decode()
    assert "fusedloss-bench = fusedloss.benchmarks.__main__:main" in entry_points


@pytest.mark.skipif(os.environ.get("FUSEDLOSS_TEST_WHEEL") != "1",
                    reason="builds the CPU extension (minutes): set FUSEDLOSS_TEST_WHEEL=1")
def test_wheel_with_extension_loads_elsewhere(tmp_path):
    """`pip wheel --no-build-isolation .`: the wheel's extension loads from another
    directory, with the kernels and the runner beside it."""
    _, wheel = _build_wheel(tmp_path, FUSEDLOSS_NO_CUDA="1")
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = ("import fusedloss, fusedloss._C, fusedloss.kernels, fusedloss.benchmarks.report; "
            "print(fusedloss.__file__, fusedloss._C.__file__, "
            "fusedloss.available_backends('cpu'))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(site)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    package, extension, backends = proc.stdout.split(" ", 2)
    assert Path(package).parent == site / "fusedloss"
    assert Path(extension).parent == site / "fusedloss"
    assert "'cpu'" in backends
