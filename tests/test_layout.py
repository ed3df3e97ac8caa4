"""The repository's layout: no import circles in fusedloss/ or benchmarks/, and nothing in
the repository root that shadows an installed package (run from the root, Python puts
the root first on sys.path)."""
import ast
import importlib.metadata
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Source folders and the package each one is imported as from the repository root.
PACKAGES = {"fusedloss": ROOT / "fusedloss", "fusedloss.kernels": ROOT / "kernels",
            "benchmarks": ROOT / "benchmarks"}


def _module_name(package, folder, path):
    parts = [package, *path.relative_to(folder).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules():
    """{module name: path} of every module of the packages (fusedloss.kernels is the
    repository's kernels/ folder; the link to it in fusedloss/ is not followed)."""
    found = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            if not path.resolve().is_relative_to(folder.resolve()):
                continue
            found[_module_name(package, folder, path)] = path
    return found


def _imports(name, path, modules):
    """The project modules that module `name` imports, at module level or inside a
    function (a circle through a deferred import is still a circle)."""
    is_package = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")
                anchor = anchor[:len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            if target.startswith("fusedloss.benchmarks"):  # the runner, as installed
                target = target[len("fusedloss."):]
            while target and target not in modules:  # a name inside a module
                target = target.rpartition(".")[0]
            # A package's own __init__ is imported on the way to any of its modules: an
            # edge to it would be a circle of every submodule, so only real targets count.
            if target and target != name and not name.startswith(target + "."):
                out.add(target)
    return out


def _circle(graph):
    """One import circle as a list of modules, or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_circles():
    modules = _modules()
    assert {"fusedloss.cross_entropy", "fusedloss.kernels.cross_entropy", "benchmarks.cases",
            "benchmarks.__main__"} <= modules.keys()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    circle = _circle(graph)
    assert circle is None, "import circle: " + " -> ".join(circle)
    # The layers the packages' docstrings name: the bottom ones import no sibling above.
    assert not graph["fusedloss._library"] - {"fusedloss"}
    assert graph["fusedloss.reference"] <= {"fusedloss", "fusedloss._library"}
    assert not {m for m in graph["benchmarks.measure"] if m.startswith("benchmarks.")}
    assert "benchmarks.cases" in graph["benchmarks.providers"]
    assert "benchmarks.providers" in graph["benchmarks.report"]


def test_the_circle_finder_finds_a_circle():
    """The check above can fail: a planted circle through a deferred import is found."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert _circle(graph) == ["a", "b", "c", "a"]
    assert _circle({"a": {"b"}, "b": set()}) is None


def _installed_top_levels():
    """Top-level import names provided by installed distributions other than fusedloss."""
    return {name for name, dists in importlib.metadata.packages_distributions().items()
            if any(d.lower() != "fusedloss" for d in dists)}


def test_root_folders_never_shadow_installed_packages():
    """A folder of the root is a regular package (an __init__.py) only where no installed
    distribution has a top-level package of that name; kernels/ is not one at all, since
    Hugging Face's `kernels` (a transformers dependency) has that name: without an
    __init__.py it is at most a namespace portion, which never hides a regular package."""
    assert not (ROOT / "kernels" / "__init__.py").exists()
    installed = _installed_top_levels()
    regular = {p.name for p in ROOT.iterdir() if (p / "__init__.py").exists()}
    assert not regular & (installed - {"fusedloss"}), regular & installed


def test_test_modules_never_shadow_installed_packages():
    """pytest puts tests/ first on sys.path (its conftest), so a test helper named as an
    installed package hides it: tests/multiprocess.py once hid the `multiprocess` package
    that `datasets` (a TRL dependency) imports."""
    installed = _installed_top_levels()
    names = {p.stem for p in (ROOT / "tests").glob("*.py")}
    assert not names & installed, names & installed


def _run_from_root(code):
    """Run `code` as a script started from the repository root (the root first on
    sys.path, as for `python -m pytest` or `python -m benchmarks` there)."""
    script = f"import sys; sys.path.insert(0, {str(ROOT)!r})\n{code}"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env=env)


@pytest.mark.skipif(importlib.util.find_spec("kernels") is None or
                    not _installed_top_levels() >= {"kernels"},
                    reason="Hugging Face's kernels package is not installed")
def test_import_kernels_from_the_root_finds_hugging_face_kernels():
    proc = _run_from_root("import kernels, fusedloss.kernels.cross_entropy as k\n"
                          "print(kernels.__file__); print(k.__name__)")
    assert proc.returncode == 0, proc.stderr[-3000:]
    hf_file, name = proc.stdout.split()
    assert not Path(hf_file).resolve().is_relative_to(ROOT), hf_file
    assert name == "fusedloss.kernels.cross_entropy"


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                    reason="transformers is not installed")
def test_transformers_model_from_the_root():
    """A transformers model built and trained one step from the repository root (where
    transformers imports Hugging Face's `kernels`), patched and unpatched alike."""
    proc = _run_from_root("""
import copy, torch, transformers
import fusedloss.integrations.transformers as fl_hf
torch.manual_seed(0)
config = transformers.LlamaConfig(vocab_size=61, hidden_size=16, intermediate_size=32,
                                  num_hidden_layers=1, num_attention_heads=2,
                                  num_key_value_heads=1, max_position_embeddings=32)
model = transformers.AutoModelForCausalLM.from_config(config)
ours = fl_hf.apply(copy.deepcopy(model))
ids = torch.randint(0, 61, (2, 9))
a, b = model(input_ids=ids, labels=ids).loss, ours(input_ids=ids, labels=ids).loss
a.backward(); b.backward()
torch.testing.assert_close(a, b)
for p, q in zip(model.parameters(), ours.parameters()):
    torch.testing.assert_close(p.grad, q.grad)
import sys; print("kernels" in sys.modules and sys.modules["kernels"].__file__)
""")
    assert proc.returncode == 0, proc.stderr[-3000:]
