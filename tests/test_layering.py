"""The import layers (ARCHITECTURE.md, "Layers"), read from the source with ``ast``: nothing is imported.

im2rec_tools takes only xception_mx's base (errors, fileio, console, installed), which imports nothing else of
either package;
the model builders (model.py, aligned.py) sit below the registry; no cycle among the modules' top-level imports.
"""
import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("xception_mx", "im2rec_tools")
BASE = {"xception_mx.errors", "xception_mx.fileio", "xception_mx.console", "xception_mx.installed"}


def _modules() -> dict[str, Path]:
    """Dotted name -> file, for every module of both packages (a package's ``__init__`` under its own name)."""
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = _modules()


def _nodes(tree: ast.AST, top_level: bool):
    """Every node, or (``top_level``) those run when the module loads: not inside functions or TYPE_CHECKING."""
    for node in ast.iter_child_nodes(tree):
        if top_level and isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            continue
        if top_level and isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        yield node
        yield from _nodes(node, top_level)


def imports(name: str, top_level: bool = False) -> set[str]:
    """The modules of both packages (and any other, by its dotted name) that module ``name`` imports."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in _nodes(ast.parse(path.read_text(encoding="utf-8")), top_level):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1])
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module
            for alias in node.names:  # `from . import data` imports the module xception_mx.data
                found.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in MODULES else target)
    return found


def _ours(names: set[str], package: str) -> set[str]:
    return {n for n in names if n == package or n.startswith(package + ".")}


def test_the_parser_sees_the_imports():
    assert "xception_mx.errors" in imports("xception_mx.console", top_level=True)
    assert "xception_mx.data" in imports("xception_mx.score", top_level=True)  # `from . import data`
    assert "im2rec_tools.headers" in imports("xception_mx.records", top_level=True)
    assert "xception_mx.plan" in imports("xception_mx.cli") - imports("xception_mx.cli", top_level=True)


def test_im2rec_tools_takes_only_the_base_of_xception_mx():
    for name in (n for n in MODULES if n.split(".")[0] == "im2rec_tools"):
        extra = _ours(imports(name), "xception_mx") - BASE
        assert not extra, f"{name} imports {sorted(extra)}: im2rec_tools may take only {sorted(BASE)}"


def test_the_base_imports_nothing_above_it():
    for name in sorted(BASE):
        above = (_ours(imports(name), "xception_mx") - BASE) | _ours(imports(name), "im2rec_tools")
        assert not above, f"{name} imports {sorted(above)}: the base may import only {sorted(BASE - {name})}"


def test_the_model_builders_sit_below_the_registry():
    for name in ("xception_mx.model", "xception_mx.aligned"):
        assert "xception_mx.registry" not in imports(name), f"{name} imports the registry, which sits above it"


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle_at_module_level():
    graph = {name: imports(name, top_level=True) & MODULES.keys() for name in MODULES}
    assert any(graph.values())
    cycle = _cycle(graph)
    assert cycle is None, "module-level import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def _lengths():
    """(lines, "module:function") for every function of both packages, and (lines, module) for every module."""
    functions, modules = [], []
    for name, path in MODULES.items():
        source = path.read_text(encoding="utf-8")
        modules.append((len(source.splitlines()), name))
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                functions.append((node.end_lineno - node.lineno + 1, f"{name}:{node.name}"))
    return functions, modules


def test_no_function_over_60_lines_and_no_module_over_400():
    functions, modules = _lengths()
    assert [f for f in functions if f[0] > 60] == []
    assert [m for m in modules if m[0] > 400] == []


def test_the_training_loop_writes_nothing_itself():
    """What rank 0 writes is the writer's: the trainer neither branches on its rank nor calls a file writer."""
    source = MODULES["xception_mx.train"].read_text(encoding="utf-8")
    assert "is_writer" not in source
    called = {node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
              for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Call)}
    writers = {"atomic_write_text", "append_synced", "dump_yaml", "save_state", "export_atomic", "plot_curves",
               "truncate_jsonl", "open", "write", "remove", "prune"}
    assert called & writers == set()
