"""Reading an experiment: a YAML file (bounded, duplicate keys refused) with `a.b=c` overrides applied,
validated into `ExperimentConfig`; and the dotted-name view of a config (MLflow params, Tune keys).

A path that is no file may name a shipped experiment (hidrop.assets), so the documented commands work
from any folder.
"""

from __future__ import annotations

import copy
from collections.abc import Hashable
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from hidrop.assets import shipped_experiment, shipped_experiments
from hidrop.errors import UserError
from hidrop.schedule import first_error_line
from hidrop_platform.config.credentials import move_credentials_to_env
from hidrop_platform.config.schema import ExperimentConfig
from hidrop_platform.config.training import near_miss


class ConfigError(UserError, ValueError):
    """A user mistake in an experiment file or override; the message is one line naming the field."""


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    """Set `a.b.c` in nested dicts/lists. A mapping whose own keys contain dots (tune.space) is matched
    greedily: `tune.space.schedule.stages.int` reaches the key "schedule.stages" under tune.space."""
    keys = dotted.split(".")
    node: Any = data
    i = 0
    while i < len(keys) - 1:
        if isinstance(node, list):
            node = node[int(keys[i])]
            i += 1
            continue
        for j in range(len(keys) - 1, i, -1):  # the longest dotted key this mapping already has
            joined = ".".join(keys[i:j])
            if j - i > 1 and joined in node:
                break
        else:
            joined, j = keys[i], i + 1
        node = node.setdefault(joined, {})
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"override {dotted!r}: {joined!r} is not a section")
        i = j
    last = keys[-1] if i == len(keys) - 1 else ".".join(keys[i:])
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


# Bounds on a YAML document, checked before anything is built: a 500-byte alias bomb ("billion laughs")
# expands to gigabytes when walked, and deep nesting overflows the (recursive) composer's stack.
MAX_YAML_BYTES = 1 << 20  # shipped experiments are a few KB
MAX_YAML_DEPTH = 64
MAX_YAML_NODES = 100_000  # counted with every alias expanded


class YamlLimitError(yaml.MarkedYAMLError):
    """A document over one of the bounds above (not malformed, refused)."""


class _BoundedLoader(yaml.SafeLoader):
    """yaml.safe_load's loader with the bounds above on nesting depth and alias-expanded size."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                mark = self.peek_event().start_mark
                raise YamlLimitError(None, None, f"nested deeper than {MAX_YAML_DEPTH} levels", mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_document(self, node):
        _check_expanded_size(node)
        return super().construct_document(node)


def _check_expanded_size(root: yaml.Node) -> None:
    """Count the nodes the document holds once every alias is expanded, and its depth then (memoised per
    node, so the walk itself stays cheap); refuse more than MAX_YAML_NODES or MAX_YAML_DEPTH, and aliases
    that contain themselves."""
    seen: dict[int, tuple[int, int]] = {}  # node -> (expanded size, expanded height)
    active: set[int] = set()

    def deeper(depth: int, height: int, node: yaml.Node) -> None:
        if depth + height > MAX_YAML_DEPTH:  # aliases nested in aliases stack their depths
            problem = f"nested deeper than {MAX_YAML_DEPTH} levels once its aliases (*name) are expanded"
            raise YamlLimitError(None, None, problem, node.start_mark)

    def walk(node: yaml.Node, depth: int) -> tuple[int, int]:
        key = id(node)
        if key in seen:
            deeper(depth, seen[key][1], node)
            return seen[key]
        if key in active:
            raise YamlLimitError(None, None, "an alias refers to a node that contains it", node.start_mark)
        total, height = 1, 1
        if isinstance(node, (yaml.SequenceNode, yaml.MappingNode)):
            deeper(depth, 1, node)
            active.add(key)
            children = node.value if isinstance(node, yaml.SequenceNode) else [n for kv in node.value for n in kv]
            for child in children:
                size, below = walk(child, depth + 1)
                total, height = total + size, max(height, below + 1)
                if total > MAX_YAML_NODES:
                    problem = f"more than {MAX_YAML_NODES} values once its aliases (*name) are expanded"
                    raise YamlLimitError(None, None, problem, node.start_mark)  # the innermost such node
            active.discard(key)
        seen[key] = (total, height)
        return total, height

    walk(root, 0)


def bounded_yaml(text: str, loader: type = _BoundedLoader) -> Any:
    """yaml.safe_load with the bounds above; YamlLimitError (a yaml.YAMLError) past them."""
    if len(text) > MAX_YAML_BYTES:
        raise YamlLimitError(None, None, f"{len(text)} characters; at most {MAX_YAML_BYTES} are read", None)
    return yaml.load(text, Loader=loader)  # a SafeLoader


class _UniqueKeyLoader(_BoundedLoader):
    """yaml.safe_load's loader, except that a key given twice in one mapping is an error (YAML would keep
    the last one without a word)."""


def _unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if not isinstance(key, Hashable):  # a list or mapping as a key: not a name of anything
            problem = f"a mapping key must be a plain value, not a {type(key).__name__}"
            raise yaml.constructor.ConstructorError(None, None, problem, key_node.start_mark)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (given twice in one mapping)", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Load, apply `a.b=c` overrides (values parsed as YAML), validate. Raises ConfigError (one line)."""
    return validate_config(load_config_data(path, overrides), str(path))


def validate_config(data: dict, where: str = "config") -> ExperimentConfig:
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as err:  # schedule errors raised while validating arrive wrapped here too
        raise ConfigError(f"{where}: {first_error_line(err)}") from None


def with_overrides(data: dict, overrides: dict[str, Any]) -> dict:
    """A deep copy of raw config data with {dotted name: value} applied (a search trial's config)."""

    data = copy.deepcopy(data)
    for key, value in overrides.items():
        try:
            _set_dotted(data, key, copy.deepcopy(value))
        except (IndexError, ValueError, TypeError, AttributeError):
            raise ConfigError(f"{key!r} does not name a field of the config") from None
    return data


def load_config_data(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """The YAML mapping with `a.b=c` overrides applied, not yet validated. A path that is no file from the
    working directory may name a shipped experiment: `experiments/mini_llava_eval.yaml` or `mini_llava_eval`
    load the installed package's copy (hidrop.assets), so the documented commands work from any folder."""
    path = Path(path)
    source = path if path.is_file() else shipped_experiment(path)
    if source is None:
        near = near_miss(path.stem, shipped_experiments()) if path.parent in (Path("."), Path("experiments")) else None
        hint = f" (did you mean the shipped experiment {near!r}?)" if near else ""
        raise ConfigError(f"{path}: no such experiment file{hint}")
    try:
        if source.stat().st_size > MAX_YAML_BYTES:
            raise ConfigError(f"{path}: {source.stat().st_size} bytes; an experiment file is at most {MAX_YAML_BYTES}")
        data = bounded_yaml(source.read_text(encoding="utf-8"), _UniqueKeyLoader)
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        what = "YAML refused" if isinstance(err, YamlLimitError) else "malformed YAML"
        raise ConfigError(f"{path}: {what}{where}: {getattr(err, 'problem', err)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like a.b=value")
        key, raw = item.split("=", 1)
        if not key.strip():
            raise ConfigError(f"override {item!r} names no field before '=' (e.g. train.max_steps=5)")
        try:
            value = bounded_yaml(raw)
        except YamlLimitError as err:
            raise ConfigError(f"override {key.strip()!r}: YAML refused: {err.problem}") from None
        except yaml.YAMLError:
            value = raw
        try:
            _set_dotted(data, key.strip(), value)
        except (IndexError, ValueError, TypeError, AttributeError):
            raise ConfigError(f"override {item!r}: {key.strip()!r} does not name a field of {path}") from None
    tracking = data.get("tracking")
    if isinstance(tracking, dict) and isinstance(tracking.get("uri"), str):  # the secret stays in the environment
        tracking["uri"] = move_credentials_to_env(tracking["uri"])
    return data


def flatten(config: ExperimentConfig) -> dict[str, Any]:
    """Dotted-name view of the resolved config (MLflow params, Tune keys)."""
    return flatten_data(config.model_dump(mode="json"))


def flatten_data(data: Any) -> dict[str, Any]:
    """Dotted names (list items by index) -> leaf values of plain config data."""
    out: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(f"{prefix}.{i}", v)
        else:
            out[prefix] = node

    walk("", data)
    return out
