"""Files shipped inside the installed package: the trained mini-LLaVA projector (`checkpoints/`) and the
experiment YAMLs (`experiments/`).

In the checkout they are top-level folders; pyproject maps them to the packages `hidrop.checkpoints` and
`hidrop.experiments`, so `importlib.resources` finds them the same way in an editable install and in an
installed wheel, whatever the working directory. Paths are written as in the checkout
(`checkpoints/mini_llava_projector`, `experiments/mini_llava_eval.yaml`): that is how YAMLs and docs name them.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path, PurePath
from typing import Optional

# the first folder of a checkout-relative path -> the package that ships that folder
SHIPPED = {"checkpoints": "hidrop.checkpoints", "experiments": "hidrop.experiments"}
YAML_SUFFIXES = (".yaml", ".yml")


def _root(folder: str) -> Optional[Path]:
    root = importlib.resources.files(SHIPPED[folder])
    return root if isinstance(root, Path) else None  # a zipped install has no file paths to hand out


def shipped_path(relpath: str | PurePath) -> Optional[Path]:
    """The installed copy of a checkout-relative path such as `checkpoints/mini_llava_projector`, or None
    when the package ships no such file or folder (absolute paths and `..` never match)."""

    path = PurePath(relpath)
    parts = path.parts
    if path.is_absolute() or len(parts) < 2 or parts[0] not in SHIPPED or ".." in parts:
        return None
    root = _root(parts[0])
    if root is None:
        return None
    candidate = root.joinpath(*parts[1:])
    return candidate if candidate.exists() and candidate.name != "__init__.py" else None


def shipped_experiments() -> list[str]:
    """The names of the shipped experiments (`mini_llava_eval`, ...), sorted."""

    root = _root("experiments")
    return sorted(p.stem for p in root.iterdir() if p.suffix in YAML_SUFFIXES) if root else []


def shipped_experiment(name: str | PurePath) -> Optional[Path]:
    """A shipped experiment YAML, named as in the checkout (`experiments/mini_llava_eval.yaml`), by its file
    name (`mini_llava_eval.yaml`) or bare (`mini_llava_eval`); None when there is no such experiment."""

    parts = PurePath(name).parts
    if PurePath(name).is_absolute() or not parts or (len(parts) == 2 and parts[0] != "experiments") or len(parts) > 2:
        return None
    file = parts[-1] if parts[-1].endswith(YAML_SUFFIXES) else parts[-1] + ".yaml"
    found = shipped_path(PurePath("experiments", file))
    return found if found is not None and found.is_file() else None
