"""The op layer and the backends: one schema per op, its C++ view, registration, coverage
by the shared contract, backends resolved per op, and the build's warnings."""
import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fusedloss
from contract import LossContract
from fusedloss import _backends, _library

ROOT = Path(__file__).resolve().parents[1]
NVCC = shutil.which("nvcc") or os.path.exists("/usr/local/cuda/bin/nvcc")
HAVE_CPP = _backends.unavailable_reason("cpu", "cpu") is None


def test_every_op_in_both_namespaces_with_one_schema():
    for name, op in _library.OPS.items():
        for ns in (_library.CPP_NS, _library.TRITON_NS):
            schema = str(getattr(getattr(torch.ops, ns), name).default._schema)
            assert schema == f"{ns}::{name}{op.schema}"


def test_generated_cpp_schemas_match_the_python_ones():
    """setup.py generates the C++ view of the schemas at build time; the header of this
    build has one struct per op with the Python schema's arguments, in order."""
    header = ROOT / "build" / "generated" / "fusedloss_schemas.h"
    if not header.exists():
        pytest.skip("no source build here (an installed package)")
    text = header.read_text()
    for name, op in _library.OPS.items():
        assert f"// {name}{op.schema}" in text
        struct = text.split(f"struct {name} {{", 1)[1].split("};", 1)[0]
        members = [line.split()[-1].rstrip(";") for line in struct.splitlines()
                   if line.startswith("  ") and line.rstrip().endswith(";")
                   and "static" not in line and "return" not in line]
        assert members == list(op.arg_names)


def _contracts():
    found = []
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        module = importlib.import_module(path.stem)
        found += [v for v in vars(module).values() if isinstance(v, type)
                  and issubclass(v, LossContract) and v is not LossContract]
    return found


def test_every_op_is_held_to_the_contract():
    """The contracts together opcheck every op of the library (and each loss declares
    exactly the ops its samples call)."""
    covered = {name for contract in _contracts() for name in contract.ops}
    assert covered == set(_library.OPS)


@pytest.mark.skipif(not NVCC or torch.version.cuda is None,
                    reason="needs nvcc and a CUDA build of torch")
def test_cuda_extension_built_where_nvcc_is_present():
    """setup.py must build fusedloss._C_cuda wherever it can (CI compiles it on a machine
    with nvcc but no GPU) and every op that declares "cuda" must have a CUDA kernel."""
    if os.environ.get("FUSEDLOSS_NO_CUDA") == "1" or os.environ.get("FUSEDLOSS_NO_EXT") == "1":
        pytest.skip("the CUDA build was switched off by the environment")
    import fusedloss._C_cuda  # noqa: F401
    _check_kernels("CUDA", "cuda")


def _check_kernels(key, backend):
    """Every op declaring `backend` has a kernel at `key` (a composite op: the op it builds
    on), and no op has one it does not declare."""
    for name, op in _library.OPS.items():
        has = torch._C._dispatch_has_kernel_for_dispatch_key(f"fusedloss::{op.kernel_op}", key)
        assert has == (backend in op.backends), name


def test_cpu_kernels_registered_as_declared():
    if not HAVE_CPP:
        pytest.skip("the C++ extension is not built here")
    _check_kernels("CPU", "cpu")


def test_auto_choice_on_cpu():
    x, t = torch.randn(3, 5), torch.tensor([0, 1, 2])
    op = fusedloss.cross_entropy.__globals__["CROSS_ENTROPY"]
    expected = "cpu" if HAVE_CPP else "reference"
    assert _backends.resolve(op, "auto", "cpu") == expected
    assert _backends.resolve(op, "auto", "cpu", needs_reference="x") == "reference"
    torch.testing.assert_close(fusedloss.cross_entropy(x, t),
                               torch.nn.functional.cross_entropy(x, t))


def test_unknown_and_unavailable_backends():
    op = _library.OPS["cross_entropy"]
    with pytest.raises(ValueError, match="backend must be"):
        _backends.resolve(op, "gpu", "cpu")
    if not _backends.triton_interpret():
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            _backends.resolve(op, "triton", "cpu")
    with pytest.raises(RuntimeError, match="CUDA tensors only"):
        _backends.resolve(op, "cuda", "cpu")
    assert "reference" in fusedloss.available_backends("cpu")


@pytest.fixture(scope="module")
def partial_op():
    """An op that only Triton implements, as a new loss may ship."""
    return _library.Op("test_triton_only", "(Tensor x) -> Tensor",
                       outputs=lambda a: (torch.empty_like(a.x),),
                       backends=("triton",)).define()


def test_backends_are_resolved_per_op(partial_op):
    # auto never picks a backend that lacks the op: on CPU tensors, the reference.
    assert _backends.resolve(partial_op, "auto", "cpu") == "reference"
    with pytest.raises(RuntimeError, match=r"test_triton_only.*backend='cpu'.*no cpu kernel "
                                           r"for test_triton_only.*'reference', 'triton'"):
        _backends.resolve(partial_op, "cpu", "cpu")
    assert "cpu" not in _backends.available_backends("cpu", partial_op)
    assert not torch._C._dispatch_has_kernel_for_dispatch_key("fusedloss::test_triton_only",
                                                              "CPU")


def test_backward_op_is_not_differentiable():
    q = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(4, 8, dtype=torch.float64)
    scale = torch.tensor(2.0, dtype=torch.float64)
    rows = torch.ones(4, dtype=torch.float64)
    lse = torch.logsumexp(2.0 * q.detach() @ k.T, 1)
    out = torch.ops.fusedloss_triton.info_nce_backward(
        rows, rows.new_empty(0), q, k, None, None, scale, lse, lse.new_empty(0), False) \
        if _backends.triton_interpret() or torch.cuda.is_available() else None
    if out is None:
        pytest.skip("no Triton here")
    with pytest.raises(RuntimeError, match="not differentiable"):
        out[0].sum().backward()


def test_compiled_first_call_in_a_fresh_process():
    """torch.compile(fullgraph=True) as the very first use of a C++ backend: loading the
    extension must happen outside the traced graph."""
    if not HAVE_CPP:
        pytest.skip("the C++ extension is not built here")
    code = (
        "import torch, fusedloss\n"
        "x = torch.randn(4, 9, requires_grad=True); t = torch.tensor([0, 3, -100, 8])\n"
        "f = torch.compile(lambda x: fusedloss.cross_entropy(x, t, backend='cpu'),\n"
        "                  fullgraph=True)\n"
        "y = f(x); y.backward()\n"
        "torch.testing.assert_close(y, torch.nn.functional.cross_entropy(x, t))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_warns_when_the_extension_is_missing(tmp_path):
    """A source tree whose C++ extension was not built warns once at import, naming the
    fix, instead of silently running the reference path."""
    shutil.copytree(ROOT / "fusedloss", tmp_path / "fusedloss",
                    ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    (tmp_path / "csrc").mkdir()
    code = ("import sys, warnings\n"
            # An editable install's import hook would find the checkout's built extension.
            "sys.meta_path[:] = [f for f in sys.meta_path\n"
            "                    if '__editable__' not in getattr(f, '__module__', '')\n"
            "                    and '__editable__' not in type(f).__module__]\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    import fusedloss, fusedloss.cross_entropy\n"
            "print('|'.join(str(x.message) for x in w))\n")
    env = {k: v for k, v in os.environ.items()
           if k not in ("FUSEDLOSS_NO_EXT", "FUSEDLOSS_BUILDING")}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env={**env, "PYTHONPATH": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("fusedloss._C is not built") == 1
    assert "pip install --no-build-isolation" in proc.stdout
