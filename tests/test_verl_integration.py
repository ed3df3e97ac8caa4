"""fusedloss.integrations.verl: the drop-in for verl's linear_cross_entropy against the
formula, against verl's own pure-torch FusedLinearForPPOFunction where verl is installed,
and apply() / restore() at verl's hook points."""
import sys
import types

import pytest
import torch
import torch.nn.functional as F

import fusedloss.integrations.verl as fl_verl
from conftest import assert_close
from fusedloss.benchmarks.providers import verl_module


def formula(hidden, weight, labels, temperature=1.0, bias=None):
    logits = F.linear(hidden.reshape(-1, hidden.shape[-1]), weight, bias) / temperature
    logp = torch.log_softmax(logits, -1)
    picked = logp.gather(-1, labels.reshape(-1, 1)).squeeze(-1)
    return picked, -(logp.exp() * logp).sum(-1)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("shape", [(2, 7, 13), (9, 5)], ids=["BTD", "ND"])
def test_drop_in_matches_formula(backend, device, reduction, shape):
    """Any hidden size (13: verl's kernel needs a multiple of 128), a bias, 3-D input."""
    torch.manual_seed(0)
    v = 31
    hidden = torch.randn(shape, dtype=torch.float64, device=device)
    weight = torch.randn(v, shape[-1], dtype=torch.float64, device=device) * 2
    bias = torch.randn(v, dtype=torch.float64, device=device)
    labels = torch.randint(0, v, shape[:-1], device=device)
    ours = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    refs = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    lp, ent = fl_verl.linear_cross_entropy(ours[0], ours[1], labels, 0.8, reduction,
                                           bias=ours[2], backend=backend)
    e_lp, e_ent = formula(refs[0], refs[1], labels, 0.8, refs[2])
    e_lp = {"none": e_lp, "sum": e_lp.sum(), "mean": e_lp.mean()}[reduction]
    assert lp.shape == e_lp.shape and ent.shape == (labels.numel(),)
    assert_close(lp, e_lp)
    assert_close(ent, e_ent)
    assert (lp <= 0).all()
    g = torch.randn_like(e_lp)
    ((lp * g).sum() + ent.sum()).backward()
    ((e_lp * g).sum() + e_ent.sum()).backward()
    for a, e in zip(ours, refs):
        assert_close(a.grad, e.grad)


def test_refusals():
    h, w, t = torch.randn(4, 8), torch.randn(5, 8), torch.tensor([0, 1, 2, 3])
    with pytest.raises(ValueError, match="reduction"):
        fl_verl.linear_cross_entropy(h, w, t, 1.0, "avg")
    with pytest.raises(ValueError, match="labels"):
        fl_verl.linear_cross_entropy(h, w, t[:3])
    with pytest.raises(RuntimeError, match="not initialized"):  # a group, without one
        fl_verl.linear_cross_entropy(h, w, t, dist_process_group=object())


def test_same_as_verls_fused_linear_for_ppo():
    verl = verl_module("utils.experimental.torch_functional")  # verl's own file
    if verl is None:
        pytest.skip("verl is not installed")
    torch.manual_seed(0)
    h, w = torch.randn(3, 10, 16), torch.randn(53, 16)
    t = torch.randint(0, 53, (3, 10))
    g, k = torch.randn(3, 10), torch.randn(3, 10)
    results = []
    for fn in (verl.FusedLinearForPPOFunction, fl_verl.FusedLinearForPPOFunction):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        lp, ent = fn.apply(hh, ww, t, 0.9, 4)
        ((lp * g).sum() + (ent * k).sum()).backward()
        results.append((lp, ent, hh.grad, ww.grad))
    for ours, theirs in zip(results[1], results[0]):
        assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=2e-6)


@pytest.fixture
def stub_verl(monkeypatch):
    """A stand-in for the verl modules apply() patches (verl itself needs ray): the same
    module names and attributes, and an installed version."""
    names = ["verl", "verl.utils", "verl.utils.kernel", fl_verl._KERNEL, "verl.utils.experimental",
             fl_verl._TORCH, "verl.models", "verl.models.mcore", fl_verl._BOUND[0]]
    modules = {name: types.ModuleType(name) for name in names}
    originals = object(), object(), object()
    modules[fl_verl._KERNEL].linear_cross_entropy = originals[0]
    modules[fl_verl._TORCH].FusedLinearForPPOFunction = originals[1]
    modules[fl_verl._BOUND[0]].linear_cross_entropy = originals[2]
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(fl_verl.importlib.metadata, "version",
                        lambda name: "0.9.1" if name == "verl" else None)
    return modules, originals


def test_apply_and_restore_at_the_hook_points(stub_verl, monkeypatch):
    modules, originals = stub_verl
    fl_verl.apply()
    fl_verl.apply()  # idempotent
    try:
        assert modules[fl_verl._KERNEL].linear_cross_entropy is fl_verl.linear_cross_entropy
        assert modules[fl_verl._BOUND[0]].linear_cross_entropy is fl_verl.linear_cross_entropy
        assert modules[fl_verl._TORCH].FusedLinearForPPOFunction is \
            fl_verl.FusedLinearForPPOFunction
    finally:
        fl_verl.restore()
    assert modules[fl_verl._KERNEL].linear_cross_entropy is originals[0]
    assert modules[fl_verl._TORCH].FusedLinearForPPOFunction is originals[1]
    assert modules[fl_verl._BOUND[0]].linear_cross_entropy is originals[2]
    monkeypatch.setattr(fl_verl.importlib.metadata, "version", lambda name: "0.3.0")
    with pytest.raises(RuntimeError, match="0.9.1"):
        fl_verl.apply()
    assert modules[fl_verl._KERNEL].linear_cross_entropy is originals[0]
