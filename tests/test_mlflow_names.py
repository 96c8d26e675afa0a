"""No module but hidrop_platform.tracking.names spells an MLflow name. Checked on the source's syntax tree,
in every place a name reaches MLflow or is read back from it:
- the keys of a dict literal or comprehension handed to log_metrics / log_params / set_tags / Tracker(tags=)
  / close_if_running, and the artifact path of log_artifact / log_dict / log_text / download_artifacts;
- the key of a lookup on a run's data (`run.data.tags.get(K)`, `.params[K]`, `_tag(run, K)`);
- and anywhere at all, a string equal to a name that could mean nothing else (a tag or param with a dot in
  it, a per-benchmark prefix, an artifact path)."""

import ast
from pathlib import Path

import hidrop_platform.tracking.names as names

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted([*(ROOT / "platform").rglob("*.py"), *(ROOT / "dashboards").rglob("*.py")])
OWNER = ROOT / "platform" / "tracking" / "names.py"
WRITE_DICT = {"log_metrics", "log_params", "set_tags", "close_if_running"}
WRITE_PATH = {"log_artifact": 1, "log_dict": 1, "log_text": 1, "download_artifacts": 1}
RUN_DATA = {"tags", "params", "metrics"}
VALUES = {v for k, v in vars(names).items() if k.isupper() and isinstance(v, str)}
UNMISTAKABLE = {v for v in VALUES if "/" in v or v.startswith(("hidrop.", "schedule.", "mlflow.", "eval.published"))}
UNMISTAKABLE |= {names.STOPPED_EARLY, names.INTERRUPTED}
# variables that collect metrics before they are logged (and reported to Tune)
METRIC_DICTS = {"metrics", "scores"}


def _literal_prefix(node) -> str | None:
    """The leading literal text of a str constant or f-string key, else None."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant):
        return node.values[0].value
    return None


def _dict_keys(node) -> list:
    if isinstance(node, ast.Dict):
        return [k for k in node.keys if k is not None]
    if isinstance(node, ast.DictComp):
        return [node.key]
    if isinstance(node, ast.BinOp):  # {...} | {...}
        return _dict_keys(node.left) + _dict_keys(node.right)
    return []


def _called(node: ast.Call) -> str:
    f = node.func
    return f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""


def _on_run_data(node) -> bool:
    """`x.data.tags` / `x.data.params` / `x.data.metrics`."""
    return (
        isinstance(node, ast.Attribute)
        and node.attr in RUN_DATA
        and isinstance(node.value, ast.Attribute)
        and node.value.attr == "data"
    )


def violations(path: Path, root: Path = ROOT) -> list[str]:
    tree = ast.parse(path.read_text())
    found = []

    def flag(node, text):
        found.append(f"{path.relative_to(root)}:{node.lineno}: {text!r}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = _called(node)
            if name in WRITE_DICT or name == "Tracker":
                args = list(node.args) + [kw.value for kw in node.keywords if kw.arg in (None, "tags", "params")]
                for arg in args:
                    for key in _dict_keys(arg):
                        text = _literal_prefix(key)
                        if text:
                            flag(key, text)
                    if name == "set_tags" and isinstance(arg, ast.Dict):  # status values too
                        for value in arg.values:
                            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                                flag(value, value.value)
            if name in WRITE_PATH and len(node.args) > WRITE_PATH[name]:
                text = _literal_prefix(node.args[WRITE_PATH[name]])
                if text is not None:
                    flag(node, text)
            if name == "_tag" and len(node.args) >= 2 and _literal_prefix(node.args[1]) is not None:
                flag(node, _literal_prefix(node.args[1]))
            if name == "get" and isinstance(node.func, ast.Attribute) and _on_run_data(node.func.value) and node.args:
                if _literal_prefix(node.args[0]) is not None:
                    flag(node, _literal_prefix(node.args[0]))
        elif isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
            if isinstance(target, ast.Name) and target.id in METRIC_DICTS:
                for key in _dict_keys(node.value):
                    if _literal_prefix(key):
                        flag(key, _literal_prefix(key))
            elif (
                isinstance(target, ast.Subscript)
                and isinstance(target.value, ast.Name)
                and target.value.id in METRIC_DICTS
                and _literal_prefix(target.slice)
            ):
                flag(target, _literal_prefix(target.slice))
        elif isinstance(node, ast.Subscript) and _on_run_data(node.value):
            if _literal_prefix(node.slice) is not None:
                flag(node, _literal_prefix(node.slice))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in UNMISTAKABLE:
            flag(node, node.value)
    return sorted(set(found))


def test_no_mlflow_name_is_spelled_outside_its_module():
    assert SOURCES and OWNER in SOURCES
    bad = [v for path in SOURCES if path != OWNER for v in violations(path)]
    assert not bad, "MLflow names spelled outside hidrop_platform.tracking.names:\n" + "\n".join(bad)


def test_the_check_finds_what_it_looks_for(tmp_path):
    """The checker itself, on planted code: every kind of spelling it claims to catch."""
    planted = tmp_path / "planted.py"
    planted.write_text(
        "tracker.log_metrics({'loss': 1.0, f'score/{b}': 2.0})\n"
        "Tracker(uri, exp, tags={'stage': 'x'})\n"
        "tracker.log_artifact(path, 'pareto')\n"
        "run.data.tags.get('attempts')\n"
        "run.data.params['model.path']\n"
        "_tag(run, 'device_type')\n"
        "x = 'hidrop.kind'\n"
        "ok = {'loss': 1.0}\n"  # a plain dict is not MLflow's
        "tracker.set_tags({STATUS: 'finished'})\n"
        "metrics = {'lr': 0.1}\n"
        "metrics[f'learned_keep/{i}'] = 1\n"
        "done = r['status'] in ('finished', 'stopped_early')\n"
    )
    found = violations(planted, root=tmp_path)
    texts = sorted(f.split(": ", 1)[1] for f in found)
    want = [
        "'attempts'",
        "'device_type'",
        "'finished'",
        "'hidrop.kind'",
        "'learned_keep/'",
        "'loss'",
        "'lr'",
        "'model.path'",
        "'pareto'",
        "'score/'",
        "'stage'",
        "'stopped_early'",
    ]
    assert texts == want, found
