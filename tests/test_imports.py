"""The package's structure: deepspeed behind one package (dreamprm/engine/), no import circles."""

import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "dreamprm"


def module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def top_level_imports(path: Path) -> tuple[set[str], set[str]]:
    """(dreamprm modules, other top-level packages) imported when the module is imported (not inside functions)."""
    ours, others = set(), set()
    for node in ast.parse(path.read_text()).body:
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for n in names:
            (ours if n.startswith("dreamprm") else others).add(n if n.startswith("dreamprm") else n.split(".")[0])
    modules = {module_name(p) for p in PKG.rglob("*.py")}
    return {n for n in ours if n in modules}, others


def test_deepspeed_is_imported_by_the_engine_package_only():
    importers = sorted(module_name(p) for p in PKG.rglob("*.py")
                       if any(line.strip().startswith(("import deepspeed", "from deepspeed"))
                              for line in p.read_text().splitlines()))
    assert importers and all(m.startswith("dreamprm.engine.") for m in importers), importers


def test_no_import_circles():
    graph = {module_name(p): top_level_imports(p)[0] for p in PKG.rglob("*.py")}
    graph = {m: {d for d in deps if d != m} for m, deps in graph.items()}
    state, cycles = {}, []

    def visit(m, stack):
        state[m] = "open"
        for d in sorted(graph.get(m, ())):
            if state.get(d) == "open":
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d, stack + [d])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles


def test_light_modules_do_not_pull_in_the_training_stack():
    """config/errors/metrics/evaluate serve `--help`, config errors and `evaluate --scores`: no torch, no deepspeed."""
    code = ("import sys, dreamprm.config, dreamprm.errors, dreamprm.metrics, dreamprm.evaluate; "
            "print(sorted(m for m in ('torch', 'deepspeed', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
