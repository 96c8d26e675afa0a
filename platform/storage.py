"""The folders this project writes under a storage path, and the rules that keep it inside them.

- A run or sweep name is one plain path component (`check_name`): it can never reach outside
  `storage_path`, and an odd character is refused in one line before Ray starts.
- Every folder we create carries an owner mark (`OWNER_MARK`). Nothing is continued, moved aside or
  cleaned up in a folder without it: an unrelated folder that happens to have the same name is refused.
- One driver at a time per folder (`hold`): an advisory lock that the kernel drops when the driver dies
  (SIGKILL included), so a crashed run never blocks its own resume.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import stat
import tempfile
from pathlib import Path
from typing import Iterable, Iterator, Optional

from hidrop.errors import UserError

OWNER_MARK = ".hidrop-owned"
LOCK_SUFFIX = ".hidrop.lock"
MAX_NAME = 128
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+=-]*")


class StorageError(UserError, RuntimeError):
    """A name or folder this project must not use (one line for the CLI)."""


def check_name(name: str) -> str:
    """`name` itself when it is one safe path component; else a one-line ValueError (pydantic puts the
    field in front)."""
    if not isinstance(name, str) or not name:
        raise ValueError("must be a folder name, not empty")
    if len(name) > MAX_NAME:
        raise ValueError(f"is {len(name)} characters long; at most {MAX_NAME}")
    if not _NAME.fullmatch(name) or name in (".", ".."):
        raise ValueError(
            f"{ascii(name)} is not a plain folder name: use letters, digits and _ . + = - "
            "(no '/', '..', spaces or control characters), not starting with '.' or '-'"
        )
    return name


def is_ours(folder: Path, legacy: Iterable[str] = ()) -> bool:
    """Whether `folder` was written by this project: it has the owner mark, or (runs made before the
    mark existed) a file matching one of the `legacy` patterns, which only we write."""
    return (folder / OWNER_MARK).is_file() or any(any(folder.glob(pattern)) for pattern in legacy)


def refuse_foreign(folder: Path, what: str, legacy: Iterable[str] = ()) -> None:
    """Raise StorageError when `folder` exists and is not ours: a file, or a folder with content and no
    owner mark."""
    if folder.exists():
        if not folder.is_dir():
            raise StorageError(f"{folder} is a file, not a {what} folder; choose another name")
        try:
            foreign = not is_ours(folder, legacy) and any(folder.iterdir())
        except OSError as e:
            raise StorageError(f"cannot read {folder} ({e.strerror})") from None
        if foreign:
            raise StorageError(
                f"{folder} already exists and was not created by hidrop (no {OWNER_MARK}); "
                f"it is left as it is: choose another {what} name"
            )


def claim(folder: Path, what: str, legacy: Iterable[str] = ()) -> None:
    """Create `folder` with its owner mark, or accept it when it is ours or empty (`refuse_foreign`)."""
    refuse_foreign(folder, what, legacy)
    folder.mkdir(parents=True, exist_ok=True)
    mark = folder / OWNER_MARK
    if not mark.exists():
        mark.write_text(json.dumps({"what": what}) + "\n")


@contextlib.contextmanager
def hold(folder: Path, what: str) -> Iterator[None]:
    """Hold `folder` for this process: a second driver on the same run or sweep is refused at once. The
    lock file sits beside the folder, so it holds while `--restart` moves an earlier run aside. Storage
    that cannot lock (some network mounts) runs unlocked, with a warning."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    lock = folder.parent / f".{folder.name}{LOCK_SUFFIX}"
    fd = _open_lock(lock)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
            raise StorageError(
                f"{what} is already running in {folder} (process {holder}); wait for it to end, or use another name"
            ) from None
        except OSError as e:  # ENOLCK, EOPNOTSUPP: the file system has no flock
            print(f"warning: cannot lock {lock} ({e.strerror}); a second {what} would not be refused", flush=True)
        else:
            with contextlib.suppress(OSError):  # a lock file shared read-only: the pid is only for messages
                os.ftruncate(fd, 0)
                os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def _open_lock(lock: Path) -> int:
    """The lock file, opened without following a link (a planted link must not make us write elsewhere);
    read-only when a teammate created it (flock works on either)."""
    flags = os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        try:
            fd = os.open(lock, flags | os.O_RDWR, 0o666)
        except PermissionError:
            fd = os.open(lock, flags | os.O_RDONLY, 0o666)
    except OSError as e:  # ELOOP: a link
        raise StorageError(f"cannot use the lock file {lock} ({e.strerror}); remove it if it is not hidrop's") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise StorageError(f"{lock} is not a plain file; remove it if it is not hidrop's")
    return fd


def write_problem(path: str | Path, folder: bool = True) -> Optional[str]:
    """Why `path` cannot be written as a folder (`folder`) or a file, or None; creates nothing that stays.
    Commands ask before their work: an error after minutes of evaluation or training loses it. Storage
    URIs (s3://, gs://) are the storage's to check."""

    if "://" in str(path):
        return None
    path = Path(os.path.abspath(path))
    if os.path.exists(path):  # os.path's tests never raise (a folder we may not list)
        if folder and not path.is_dir():
            return f"{path} is a file, not a folder"
        if not folder and path.is_dir():
            return f"{path} is a folder, not a file"
        probe = path if not folder else None
        parent = path if folder else None
    else:
        parent = next(p for p in path.parents if os.path.exists(p))
        if not os.path.isdir(parent):
            return f"{parent} is a file, not a folder"
        probe = None
    try:
        if probe is not None and not probe.is_file():  # a pipe or device: opening one may block
            if not os.access(probe, os.W_OK):
                raise PermissionError(13, "Permission denied")
        elif probe is not None:
            open(probe, "a").close()  # opening to append changes nothing
        else:
            with tempfile.NamedTemporaryFile(dir=parent, prefix=".hidrop-probe-"):
                pass
    except OSError as e:
        return f"cannot write to {probe or parent} ({e.strerror or type(e).__name__})"
    return None
