"""The rooms and which way their imports run, read from the source (function-local imports included):
no cycle inside platform/; platform/ reaches dashboards/ only from the command-line entry points that
launch a report (cli, demo); hidrop/ never imports ray, mlflow, deepspeed or the platform."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"hidrop_platform": ROOT / "platform", "hidrop_dashboards": ROOT / "dashboards"}
ENTRY_POINTS = ("hidrop_platform.cli", "hidrop_platform.demo")  # these modules and the ones below them


def _modules() -> dict[str, Path]:
    """Every module of the two packages by dotted name, subpackages included (`pkg/__init__.py` is `pkg`)."""
    found = {}
    for pkg, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            found[".".join((pkg, *(parts[:-1] if parts[-1] == "__init__" else parts)))] = path
    return found


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)  # `from pkg import module`
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: {m for m in _imports(path) if m in modules and m != name} for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle, or [] (depth-first search with colours)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return []


def test_no_import_cycle_inside_platform_and_dashboards():
    graph = _graph()
    assert "hidrop_platform.tune.driver" in graph and "hidrop_dashboards.report" in graph
    assert _cycle(graph) == []
    # the search itself finds a planted cycle
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_platform_reaches_dashboards_only_from_entry_points():
    graph = _graph()
    reaching = {
        m
        for m, deps in graph.items()
        if m.startswith("hidrop_platform.") and any(d.startswith("hidrop_dashboards.") for d in deps)
    }
    assert all(m.startswith(ENTRY_POINTS) for m in reaching), sorted(reaching)


def test_hidrop_stays_free_of_the_platform_stack():
    forbidden = ("ray", "mlflow", "deepspeed", "hidrop_platform", "hidrop_dashboards")
    for path in sorted((ROOT / "hidrop").rglob("*.py")):
        bad = sorted(m for m in _imports(path) if m.split(".")[0] in forbidden)
        assert not bad, (path.relative_to(ROOT), bad)


def test_only_the_tracking_package_imports_mlflow():
    """Writers and readers reach MLflow through hidrop_platform.tracking (its names: tracking.names)."""
    importers = {name for name, path in _modules().items() if any(m.split(".")[0] == "mlflow" for m in _imports(path))}
    assert importers and all(m.startswith("hidrop_platform.tracking.") for m in importers), sorted(importers)


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


# what runs inside Ray workers: a training worker and its hooks, a Tune trial
WORKER_SIDE = ("hidrop_platform.train.worker", "hidrop_platform.train.hooks", "hidrop_platform.tune.trial")


def test_worker_side_never_reaches_the_cli_or_dashboards():
    graph = _graph()
    for module in WORKER_SIDE:
        bad = sorted(m for m in _reachable(graph, module) if m.startswith(("hidrop_platform.cli", "hidrop_dashboards")))
        assert not bad, (module, bad)
    # the walk itself follows chains: a planted path through two modules is found
    assert _reachable({"a": {"b"}, "b": {"c"}, "c": set()}, "a") == {"b", "c"}


def _catches(path: Path, name: str) -> bool:
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ExceptHandler) and node.type is not None:
            types = node.type.elts if isinstance(node.type, ast.Tuple) else [node.type]
            if any(getattr(t, "id", getattr(t, "attr", None)) == name for t in types):
                return True
    return False


def test_only_the_cli_entry_point_catches_user_error():
    """Every one-line error derives from hidrop.errors.UserError and is printed in one place."""
    catchers = {name for name, path in _modules().items() if _catches(path, "UserError")}
    catchers |= {str(p.relative_to(ROOT)) for p in (ROOT / "hidrop").rglob("*.py") if _catches(p, "UserError")}
    assert catchers == {"hidrop_platform.cli.app"}, sorted(catchers)
