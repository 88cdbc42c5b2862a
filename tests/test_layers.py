"""The project's layers, read from its source: every import (function-level ones included) of
every module, as a graph of the project's own modules.

    core  ->  the models (image_tokenizers, vqvae, pixels, priors, transformer, pixelcnn)
          ->  pipeline  ->  the scripts, benchmarks, experiments, tests

Imports point down only, and there is no cycle anywhere.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOUNDATION = ("core",)
MODELS = ("image_tokenizers", "vqvae", "pixels", "priors", "transformer", "pixelcnn")
SKIP = {".git", "__pycache__", ".pytest_cache"}


def project_modules(root=ROOT):
    """{dotted module name: path} of every .py file of the project."""
    modules = {}
    for path in root.rglob("*.py"):
        relative = path.relative_to(root)
        if SKIP & set(relative.parts):
            continue
        parts = list(relative.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if parts:
            modules[".".join(parts)] = path
    return modules


def import_graph(modules):
    """{module: set of project modules it imports}. `import a.b.c` and `from a.b import c`
    count as importing the deepest project module named, and every package above it (Python
    runs a package's __init__ before its modules)."""
    def resolve(name):
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    def with_parents(name):
        parts = name.split(".")
        return {".".join(parts[:i]) for i in range(1, len(parts) + 1)} & set(modules)

    graph = {}
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        explicit, implied = set(), set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from . import x, from ..a import b
                    up = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                # `from a import b`: the module a.b if there is one, else a (resolve)
                names = [f"{base}.{alias.name}" for alias in node.names]
            for name in names:
                target = resolve(name)
                if target:
                    explicit.add(target)
                    implied |= with_parents(target)
        # a module's own packages run before it: implied, not an import of its own making
        # (an explicit `import priors` inside priors/base.py still counts)
        graph[module] = (explicit | (implied - with_parents(module))) - {module}
    return graph


def cycles(graph):
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


@pytest.fixture(scope="module")
def graph():
    return import_graph(project_modules())


def top(module):
    return module.split(".")[0]


def test_the_scan_sees_function_level_imports(tmp_path):
    (tmp_path / "a.py").write_text("def f():\n    import b\n")
    (tmp_path / "b.py").write_text("from a import f\n")
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "m.py").write_text("from . import n\n")
    (tmp_path / "pkg" / "n.py").write_text("import pkg\n")
    found = import_graph(project_modules(tmp_path))
    assert found["a"] == {"b"} and found["b"] == {"a"}
    assert found["pkg.m"] == {"pkg.n"}  # its own package `pkg` runs first: implied
    assert found["pkg.n"] == {"pkg"}  # an explicit import of its package counts
    assert cycles(found) == [["a", "b"]]


def test_no_import_cycle(graph):
    assert cycles(graph) == []


def test_the_foundation_imports_nothing_of_the_project(graph):
    bad = {m: sorted(t for t in targets if top(t) not in FOUNDATION)
           for m, targets in graph.items() if top(m) in FOUNDATION}
    assert {m: t for m, t in bad.items() if t} == {}


def test_the_models_import_only_the_foundation_and_models(graph):
    bad = {m: sorted(t for t in targets if top(t) not in FOUNDATION + MODELS)
           for m, targets in graph.items() if top(m) in MODELS}
    assert {m: t for m, t in bad.items() if t} == {}


def test_pipeline_imports_no_script_benchmark_or_test(graph):
    allowed = FOUNDATION + MODELS + ("pipeline",)
    bad = {m: sorted(t for t in targets if top(t) not in allowed)
           for m, targets in graph.items() if top(m) == "pipeline"}
    assert {m: t for m, t in bad.items() if t} == {}


def test_the_models_do_not_import_mlflow():
    for path in (p for package in MODELS for p in (ROOT / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module or ""])
                assert not any(n.split(".")[0] == "mlflow" for n in names), path
