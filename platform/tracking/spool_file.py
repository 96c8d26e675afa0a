"""The offline spool's file: MLflow records kept on local disk while the tracking store cannot be reached,
for `Tracker` to replay in order into the same run when it answers again (a spool left behind:
`hidrop_platform.tracking.spool`).

MLflow has no such buffer (its asynchronous logging retries in memory and gives up; a killed process loses
the queue), so this one is ours. A spool is a JSON-lines file: a header line (`op: run`, naming the store,
experiment and run), then one record per line. Artifacts are copied into `<name>.files/` beside it when
spooled, so later edits to the originals do not leak in, and paths are stored relative to the spool's
folder, so a spool can be moved as a whole. No pickles: JSON only.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

SPOOL_VERSION = 1


class Spool:
    """One run's pending records, mirrored in a file (rewritten atomically, or appended to)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.pending: list[dict] = []  # oldest first

    @property
    def files_dir(self) -> Path:
        return self.path.with_suffix(".files")

    def add(self, record: dict, header: dict) -> None:
        """Queue `record` behind the others (an artifact is copied in first)."""
        if record["op"] == "artifact" and not record.get("spooled"):
            record = self._copy_in(record)
        new_file = not self.pending or not self.path.exists()
        self.pending.append(record)
        if new_file:
            self.rewrite(header)
        else:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def rewrite(self, header: dict) -> None:
        """The whole file (header + what is still pending), atomically."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        with tmp.open("w", encoding="utf-8") as f:
            for record in [header] + self.pending:
                f.write(json.dumps(record) + "\n")
        os.replace(tmp, self.path)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
        shutil.rmtree(self.files_dir, ignore_errors=True)

    def artifact_path(self, record: dict) -> Path:
        """Where an artifact record's file is: in the spool's folder once spooled, else where it was."""
        local = Path(record["path"])
        return self.path.parent / local if record.get("spooled") else local

    def _copy_in(self, record: dict) -> dict:
        source = Path(record["path"])
        target_dir = self.files_dir / uuid.uuid4().hex[:12]
        target_dir.mkdir(parents=True, exist_ok=True)
        target = target_dir / source.name
        if source.is_dir():
            shutil.copytree(source, target)
        else:
            shutil.copy2(source, target)
        return {**record, "path": target.relative_to(self.path.parent).as_posix(), "spooled": True}

    @classmethod
    def read(cls, path: str | Path) -> tuple[dict, "Spool"]:
        """A spool file left behind: its header and its records (ValueError when it is not one)."""
        spool = cls(Path(path).resolve())
        lines = [json.loads(line) for line in spool.path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not lines or lines[0].get("op") != "run":
            raise ValueError(f"{spool.path}: not a tracking spool file (no header line)")
        spool.pending = lines[1:]
        for n, record in enumerate(spool.pending, start=2):
            problem = spool._outside(record)
            if problem:
                raise ValueError(f"{spool.path} line {n}: {problem}; nothing of this spool was replayed")
        return lines[0], spool

    def _outside(self, record: dict) -> str | None:
        """What in a record read back from disk points outside this spool (None when nothing does). A spool
        folder may be shared: a line must not make a sync upload any other file."""
        for key in ("artifact_path", "artifact_file"):  # where in the run: plain relative paths only
            value = record.get(key)
            plain = isinstance(value, str) and not Path(value).is_absolute() and ".." not in Path(value).parts
            if value is not None and not plain:
                return f"{key} {value!r} leaves the run's artifact folder"
        if record.get("op") != "artifact":
            return None
        path = record.get("path")
        if not record.get("spooled") or not isinstance(path, str) or Path(path).is_absolute():
            return f"artifact path {path!r} is not a file copied into the spool"
        if self.files_dir.is_symlink() or self.files_dir.resolve().parent != self.path.parent.resolve():
            return f"{self.files_dir} is a link out of the spool folder"  # resolving it would follow the link
        files = self.files_dir.resolve()
        target = (self.path.parent / path).resolve()  # follows links, so a link out is caught as well
        inside = [target, *target.rglob("*")] if target.is_dir() else [target]
        if any(p.is_symlink() or not p.resolve().is_relative_to(files) for p in inside):
            return f"artifact path {path!r} leads outside {files}"
        return None
