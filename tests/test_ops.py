"""The op layer and the backend table: schemas, registration, extension builds, choice."""
import os
import shutil

import pytest
import torch

import fusedloss
from fusedloss import _backends, ops

NVCC = shutil.which("nvcc") or os.path.exists("/usr/local/cuda/bin/nvcc")


def test_triton_namespace_carries_every_op():
    for name, schema in ops.SCHEMAS.items():
        op = getattr(torch.ops.fusedloss_triton, name).default
        assert str(op._schema).startswith(f"fusedloss_triton::{name}(")


def test_cpp_schemas_match_the_python_table():
    if _backends.unavailable_reason("cpu", "cpu") is not None:
        pytest.skip("the C++ extension is not built here")
    ops.namespace("cpu")
    for name in ops.SCHEMAS:
        cpp = str(getattr(torch.ops.fusedloss, name).default._schema)
        py = str(getattr(torch.ops.fusedloss_triton, name).default._schema)
        assert cpp.split("::", 1)[1] == py.split("::", 1)[1]


@pytest.mark.skipif(not NVCC or torch.version.cuda is None,
                    reason="needs nvcc and a CUDA build of torch")
def test_cuda_extension_built_where_nvcc_is_present():
    """setup.py must build fusedloss._C_cuda wherever it can (CI compiles it on a machine
    with nvcc but no GPU) and every op must have a CUDA kernel registered."""
    if os.environ.get("FUSEDLOSS_NO_CUDA") == "1" or os.environ.get("FUSEDLOSS_NO_EXT") == "1":
        pytest.skip("the CUDA build was switched off by the environment")
    import fusedloss._C_cuda  # noqa: F401
    for name in ops.SCHEMAS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fusedloss::{name}", "CUDA"), name
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fusedloss::{name}", "CPU"), name


def test_cpu_extension_has_cpu_kernels():
    if _backends.unavailable_reason("cpu", "cpu") is not None:
        pytest.skip("the C++ extension is not built here")
    for name in ops.SCHEMAS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fusedloss::{name}", "CPU"), name


def test_auto_choice_on_cpu():
    x, t = torch.randn(3, 5), torch.tensor([0, 1, 2])
    expected = "cpu" if _backends.unavailable_reason("cpu", "cpu") is None else "reference"
    assert _backends.resolve("auto", "cpu") == expected
    assert _backends.resolve("auto", "cpu", needs_reference="x") == "reference"
    torch.testing.assert_close(fusedloss.cross_entropy(x, t),
                               torch.nn.functional.cross_entropy(x, t))


def test_unknown_and_unavailable_backends():
    with pytest.raises(ValueError, match="backend must be"):
        _backends.resolve("gpu", "cpu")
    if not _backends.triton_interpret():
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            _backends.resolve("triton", "cpu")
    with pytest.raises(RuntimeError, match="CUDA tensors only"):
        _backends.resolve("cuda", "cpu")
    assert "reference" in fusedloss.available_backends("cpu")


def test_compiled_first_call_in_a_fresh_process():
    """torch.compile(fullgraph=True) as the very first use of a C++ backend: loading the
    extension and registering its fake kernels must happen outside the traced graph."""
    import subprocess
    import sys
    if _backends.unavailable_reason("cpu", "cpu") is not None:
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
