"""The package's structure: deepspeed behind one module (or the engine package), no import circles.

Every import counts, wherever it stands: a function-local import closes a circle as surely as a
top-level one, only later (at the call), so the readers below walk the whole syntax tree."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "dreamprm"


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, root: Path) -> list[tuple[str, ...]]:
    """Every import in the file, anywhere in it (function bodies, branches, try blocks), relative
    ones resolved. Each entry lists the names it may load, the one to count first: `from P import n`
    loads the module P.n where there is one, else P for its name n. A parent package is not counted
    for its submodule: it is initialised first, and a submodule's import needs nothing from it."""
    me = module_name(path, root)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name,) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module
            out += [(f"{base}.{a.name}", base) for a in node.names]
    return out


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the package's own modules it imports (itself left out)."""
    files = {module_name(p, root): p for p in root.rglob("*.py")}
    graph = {}
    for m, p in files.items():
        found = (next((n for n in names if n in files), None) for names in imports(p, root))
        graph[m] = {n for n in found if n is not None and n != m}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted: every
    module in one imports, directly or not, every other."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(m):
        index[m] = low[m] = len(index)
        stack.append(m)
        on_stack.add(m)
        for d in sorted(graph.get(m, ())):
            if d not in index:
                visit(d)
                low[m] = min(low[m], low[d])
            elif d in on_stack:
                low[m] = min(low[m], index[d])
        if low[m] == index[m]:
            comp = []
            while True:
                d = stack.pop()
                on_stack.discard(d)
                comp.append(d)
                if d == m:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for m in sorted(graph):
        if m not in index:
            visit(m)
    return sorted(out)


def describe(graph: dict[str, set[str]], comps: list[list[str]]) -> str:
    """One block per circle: each member and the members it imports."""
    return "\n".join(f"import circle of {len(c)} modules:\n" + "\n".join(
        f"  {m} -> {', '.join(sorted(graph[m] & set(c)))}" for m in c) for c in comps)


def importers_of(root: Path, top: str) -> list[str]:
    """The modules under root with an import of the package `top` or anything in it, anywhere."""
    return sorted(module_name(p, root) for p in root.rglob("*.py")
                  if any(n.split(".")[0] == top for names in imports(p, root) for n in names))


def test_deepspeed_is_imported_by_the_engine_only():
    importers = importers_of(PKG, "deepspeed")
    assert importers, "no module imports deepspeed: the reader missed the engine's import"
    assert all(m == "dreamprm.engine" or m.startswith("dreamprm.engine.") for m in importers), importers


def test_no_import_circles():
    graph = import_graph(PKG)
    comps = circles(graph)
    assert not comps, describe(graph, comps)


def _package(root: Path, files: dict[str, str]) -> Path:
    pkg = root / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for name, text in files.items():
        (pkg / name).write_text(text)
    return pkg


def test_a_function_local_import_closing_a_circle_is_found(tmp_path):
    """a.py imports b inside a function (relative), b.py imports a at the top: one circle."""
    pkg = _package(tmp_path, {"a.py": "def f():\n    from .b import g\n    return g\n",
                              "b.py": "import pkg.a\n\n\ndef g():\n    return pkg.a\n",
                              "c.py": "try:\n    from pkg import a\nexcept ImportError:\n    a = None\n"})
    graph = import_graph(pkg)
    assert graph == {"pkg": set(), "pkg.a": {"pkg.b"}, "pkg.b": {"pkg.a"}, "pkg.c": {"pkg.a"}}
    assert circles(graph) == [["pkg.a", "pkg.b"]]
    assert describe(graph, circles(graph)) == "import circle of 2 modules:\n  pkg.a -> pkg.b\n  pkg.b -> pkg.a"
    (pkg / "a.py").write_text("def f():\n    return 1\n")  # the same package without that import
    assert circles(import_graph(pkg)) == []


def test_a_function_local_deepspeed_import_is_seen(tmp_path):
    pkg = _package(tmp_path, {"engine.py": "import deepspeed\n",
                              "late.py": "def f():\n    from deepspeed.runtime import zero\n    return zero\n",
                              "plain.py": "import deepspeedish\n"})
    assert importers_of(pkg, "deepspeed") == ["pkg.engine", "pkg.late"]


def test_relative_imports_resolve_from_a_subpackage(tmp_path):
    """A package re-exporting its submodule's names is not a circle with it; a name taken from a
    package makes the package a dependency."""
    pkg = _package(tmp_path, {"top.py": "from .sub import x\n", "names.py": "from pkg.sub import y\n"})
    (pkg / "sub").mkdir()
    (pkg / "sub" / "__init__.py").write_text("from .x import y\n")
    (pkg / "sub" / "x.py").write_text("def y():\n    from .. import top\n    from . import z\n")
    (pkg / "sub" / "z.py").write_text("")
    graph = import_graph(pkg)
    assert graph == {"pkg": set(), "pkg.top": {"pkg.sub.x"}, "pkg.names": {"pkg.sub"},
                     "pkg.sub": {"pkg.sub.x"}, "pkg.sub.x": {"pkg.top", "pkg.sub.z"}, "pkg.sub.z": set()}
    assert circles(graph) == [["pkg.sub.x", "pkg.top"]]


def test_light_modules_do_not_pull_in_the_training_stack():
    """config/errors/metrics/evaluate serve `--help`, config errors and `evaluate --scores`: no torch, no deepspeed."""
    code = ("import sys, dreamprm.config, dreamprm.errors, dreamprm.metrics, dreamprm.evaluate; "
            "print(sorted(m for m in ('torch', 'deepspeed', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("module", ["dreamprm.bilevel", "dreamprm.dist"])
def test_bilevel_and_process_group_modules_do_not_load_deepspeed(module):
    """The bilevel step and the process group live outside the DeepSpeed wrapper (issue 20)."""
    code = f"import sys, {module}; print('deepspeed' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
