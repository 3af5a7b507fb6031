"""Facts of the package's shape, read from its source with ``ast``: no import circle among
csp_inductor's modules, no module over 400 lines, no function over 80, a ``Backend`` class
under 200, an attention function that reads only the forward's step. Every ``.py`` file under
``csp_inductor/`` counts, ``kernels/`` (the ``csp_inductor/kernels`` link) included."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "csp_inductor"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80
MAX_BACKEND_LINES = 200


def modules() -> dict[str, tuple[Path, ast.Module]]:
    """``{dotted name: (path, syntax tree)}`` of every module of the package (the kernels
    link followed)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")) + sorted((PACKAGE / "kernels").glob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = (path, ast.parse(path.read_text(), str(path)))
    return found


def _where(path: Path, node: ast.AST) -> str:
    return f"{path.relative_to(PACKAGE.parent)}:{node.lineno}"


def _size(node: ast.AST) -> int:
    return node.end_lineno - node.lineno + 1


def _imports(name: str, path: Path, tree: ast.Module, known) -> set[str]:
    """The package's modules ``name`` imports, anywhere but under ``if TYPE_CHECKING:``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    skipped = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for child in node.body
        for n in ast.walk(child)
    }
    out = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            # from a import b: module a.b if it is one, else a (b a name in it)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base
                       for a in node.names]  # fmt: skip
        else:
            continue
        for target in targets:
            while target and target not in known:  # import a.b.c: the deepest known module
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def test_no_import_circle():
    found = modules()
    graph = {name: _imports(name, path, tree, found) for name, (path, tree) in found.items()}
    state: dict[str, str] = {}  # "open" while on the depth-first path, "done" after

    def visit(name: str, path: list[str]) -> list[str] | None:
        state[name] = "open"
        for dep in sorted(graph[name]):
            if state.get(dep) == "open":
                return [*path[path.index(dep) :], dep]
            if dep not in state and (cycle := visit(dep, [*path, dep])):
                return cycle
        state[name] = "done"
        return None

    for name in sorted(graph):
        if name not in state:
            cycle = visit(name, [name])
            assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_no_module_over_400_lines():
    long = [
        f"{path.relative_to(PACKAGE.parent)}: {len(path.read_text().splitlines())} lines"
        for path, _ in modules().values()
        if len(path.read_text().splitlines()) > MAX_MODULE_LINES
    ]
    assert not long, f"modules over {MAX_MODULE_LINES} lines:\n" + "\n".join(long)


def test_no_function_over_80_lines():
    long = [
        f"{_where(path, node)} {node.name}(): {_size(node)} lines"
        for path, tree in modules().values()
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and _size(node) > MAX_FUNCTION_LINES
    ]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(long)


def test_backend_class_under_200_lines():
    """Wherever a class named ``Backend`` lives in the package."""
    backends = [
        (path, node)
        for path, tree in modules().values()
        for node in ast.walk(tree)
        if isinstance(node, ast.ClassDef) and node.name == "Backend"
    ]
    assert backends, "no class named Backend in the package"
    long = [
        f"{_where(path, node)} Backend: {_size(node)} lines"
        for path, node in backends
        if _size(node) >= MAX_BACKEND_LINES
    ]
    assert not long, f"Backend not under {MAX_BACKEND_LINES} lines:\n" + "\n".join(long)


def test_the_attention_reads_only_the_step_and_its_cache():
    """The attention function and its helpers reach the backend only for the running forward's
    step (``module.csp_backend.step``), and the rest through it."""
    path = PACKAGE / "transformers_attention.py"
    tree = ast.parse(path.read_text())
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    reads = {
        f"{_where(path, node)}: .csp_backend.{getattr(parents[node], 'attr', '')}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and node.attr == "csp_backend"
    }
    assert reads and all(read.endswith(".csp_backend.step") for read in reads), sorted(reads)
    assert "backend" not in {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
