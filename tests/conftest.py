"""Backend parametrization shared by every loss's tests.

Each test taking the `backend` fixture runs once per backend, on the device that backend
serves here: "reference" and "cpu" on the CPU; "triton" on CUDA, or on the CPU under
TRITON_INTERPRET=1; "cuda" on CUDA. A backend this machine lacks is skipped with the
reason, unless FUSEDLOSS_REQUIRE_BACKENDS names it (CI does: a missing build then fails
instead of silently skipping).
"""
import os

import torch

# Without a GPU, the Triton backend is tested in Triton's interpreter on CPU tensors. The
# flag must be set before any @triton.jit kernel is defined, i.e. before fusedloss imports
# its kernels (it does so lazily, on first use).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from fusedloss import _backends  # noqa: E402

REQUIRED = {b for b in os.environ.get("FUSEDLOSS_REQUIRE_BACKENDS", "").split(",") if b}


def backend_device(backend):
    if backend in ("triton", "cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    if backend == "cuda":
        return torch.device("cuda")
    return torch.device("cpu")


def _skip_or_fail(backend, why):
    if backend in REQUIRED:
        pytest.fail(f"backend {backend!r} is required here (FUSEDLOSS_REQUIRE_BACKENDS) but "
                    f"unavailable: {why}")
    pytest.skip(f"backend {backend!r} unavailable: {why}")


def _available(name):
    why = _backends.unavailable_reason(name, backend_device(name))
    if why is not None:
        _skip_or_fail(name, why)
    return name


@pytest.fixture(params=list(_backends.BACKENDS))
def backend(request):
    return _available(request.param)


@pytest.fixture(params=[b for b in _backends.BACKENDS if b != "reference"])
def kernel_backend(request):
    """The backends that run through torch.library ops (everything but the reference)."""
    return _available(request.param)


@pytest.fixture
def cpu_backends():
    """Every backend that runs on CPU tensors here, for the multi-process tests, which loop
    over them in one spawn of their ranks (a required one missing fails)."""
    missing = {b: _backends.unavailable_reason(b, torch.device("cpu")) for b in REQUIRED
               if backend_device(b).type == "cpu"}
    missing = {b: why for b, why in missing.items() if why is not None}
    if missing:
        pytest.fail(f"required backends unavailable on the CPU: {missing}")
    return _backends.available_backends(torch.device("cpu"))


@pytest.fixture
def device(request):
    name = request.node.callspec.params.get("backend") or \
        request.node.callspec.params.get("kernel_backend")
    return backend_device(name)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tolerances(dtype):
    """(rtol, atol) against a float64 oracle."""
    return {torch.float64: (1e-9, 1e-12), torch.float32: (1e-5, 1e-6),
            torch.bfloat16: (2e-2, 2e-2), torch.float16: (4e-3, 4e-3)}[dtype]


def assert_close(actual, expected, dtype=None, **kwargs):
    rtol, atol = tolerances(dtype or actual.dtype)
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), rtol=rtol,
                               atol=atol, equal_nan=True, **kwargs)


def assert_refusals(fn, base, cases, **fixed):
    """Each (overrides, error type, text) case: fn(**base | overrides, **fixed) raises that
    error type with a message containing the text (the argument's name)."""
    for overrides, error, name in cases:
        with pytest.raises(error, match=name):
            fn(**{**base, **overrides}, **fixed)


def assert_matches(ours, expected, ours_leaves, expected_leaves, dtype=None):
    """Same values and shape, and the same gradients for a random upstream gradient."""
    assert ours.shape == expected.shape
    assert_close(ours, expected, dtype)
    g = torch.randn_like(ours.double())
    (ours * g.to(ours.dtype)).sum().backward()
    (expected * g.to(expected.dtype)).sum().backward()
    for a, b in zip(ours_leaves, expected_leaves):
        assert_close(a.grad, b.grad, dtype)
