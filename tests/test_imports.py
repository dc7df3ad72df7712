"""Dependencies run one way: no two modules of t5like, launch or experiments import each other, directly or
through others. Imports inside functions count (they run); imports under `if TYPE_CHECKING:` do not."""
import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("t5like", "launch", "experiments")


def module_names() -> dict:
    names = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def imports_of(path: pathlib.Path, names: dict) -> set:
    tree = ast.parse(path.read_text())
    type_only = {id(node) for branch in ast.walk(tree) if isinstance(branch, ast.If)
                 and getattr(branch.test, "id", getattr(branch.test, "attr", "")) == "TYPE_CHECKING"
                 for stmt in branch.body for node in ast.walk(stmt)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from pkg import submodule` imports the submodule; `from module import name`, the module.
            subs = {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in names}
            found |= subs if len(subs) == len(node.names) else subs | {node.module}
    return {m for m in found if m in names}


def import_circles(names: dict) -> list:
    """Strongly connected components of more than one module (Tarjan). A module's own parent packages
    are not edges: Python runs a package's __init__ before any of its modules, by design."""
    graph = {m: {d for d in imports_of(p, names) if d != m and not m.startswith(d + ".")} for m, p in names.items()}
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return circles


def test_the_checker_finds_a_circle(tmp_path):
    for name, body in {"a": "from t5like import b\n", "b": "def f():\n    import t5like.a\n", "c": "import t5like.a\n"}.items():
        (tmp_path / "t5like").mkdir(exist_ok=True)
        (tmp_path / "t5like" / f"{name}.py").write_text(body)
    names = {f"t5like.{n}": tmp_path / "t5like" / f"{n}.py" for n in "abc"}
    assert import_circles(names) == [["t5like.a", "t5like.b"]]


def test_no_import_circles():
    assert import_circles(module_names()) == []
