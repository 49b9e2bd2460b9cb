"""Output paths the user names: checked before any work, locked while a run writes them.

- :class:`RunFolder` gives one process exclusive use of a run folder. The lock is an
  ``flock`` on the folder itself, so the operating system drops it when the process ends,
  however it ends: a crashed run never leaves its folder locked. The folder is created
  if needed and removed again if the run wrote nothing into it.
- :func:`check_output_file` checks, before any work, that a result file can be written.
- :func:`describe_os_error` turns an ``OSError`` on a user's path into one line that says
  what to do; the command line prints it as ``error: ...``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import tempfile
from pathlib import Path
from types import TracebackType

from largebatch.errors import UsageError

__all__ = ["RunFolder", "check_output_file", "describe_os_error", "remove_own_temporaries"]

# What io.atomic_write leaves behind when a crash cuts a save short: ".NAME.<random>.tmp".
_TEMPORARY = re.compile(r"\.(?P<name>.+)\.[A-Za-z0-9_]{8}\.tmp")


class RunFolder:
    """Exclusive use of folder ``path`` for one run (a context manager).

    Entering creates the folder (with its parents), checks that files can be written
    there, and takes the lock; a second process on the same folder gets a UsageError at
    once. Leaving releases the lock, and removes the folder if this run created it and
    left it empty (a run that failed before writing anything leaves no trace).
    """

    def __init__(self, path: str | Path, what: str = "--out") -> None:
        self.empty = str(path).strip() == ""
        self.path = Path(path)
        self.what = what
        self._fd: int | None = None
        self._created: list[Path] = []

    def __enter__(self) -> RunFolder:
        path = self.path
        if self.empty:
            raise UsageError(f"{self.what} must name a folder, got an empty string")
        if path.exists() and not path.is_dir():
            raise UsageError(f"{self.what} {path} is a file, not a folder; choose a folder")
        missing = [p for p in (path, *path.parents) if not p.exists()]
        try:
            path.mkdir(parents=True, exist_ok=True)
            self._created = missing  # innermost first
            self._fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as exc:
            self._remove_created()
            raise UsageError(describe_os_error(exc, f"{self.what} {path}")) from None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            self.__exit__(None, None, None)
            if exc.errno in (errno.EWOULDBLOCK, errno.EACCES):
                raise UsageError(
                    f"{self.what} {path} is in use by another largebatch process; wait for "
                    "it to finish or choose another folder"
                ) from None
            raise UsageError(describe_os_error(exc, f"{self.what} {path}")) from None
        try:
            _probe_writable(path)
        except OSError as exc:
            self.__exit__(None, None, None)
            raise UsageError(describe_os_error(exc, f"{self.what} {path}")) from None
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the lock
            self._fd = None
        self._remove_created()

    def _remove_created(self) -> None:
        for folder in self._created:  # innermost first; stops at the first non-empty one
            try:
                folder.rmdir()
            except OSError:
                break
        self._created = []


def _probe_writable(folder: Path) -> None:
    """Create and remove a file in ``folder``: the only check that a read-only mount,
    /proc or a missing permission cannot fool."""
    try:
        fd, name = tempfile.mkstemp(prefix=".largebatch-probe.", dir=folder)
    except OSError as exc:  # name the folder, not the probe file that could not be made
        raise OSError(exc.errno, exc.strerror, str(folder)) from None
    os.close(fd)
    os.unlink(name)


def remove_own_temporaries(folder: str | Path, names: tuple[str, ...]) -> list[Path]:
    """Delete the temporaries that an interrupted atomic save of ``names`` left in
    ``folder``; any other file, a user's own ``.*.tmp`` included, stays."""
    removed = []
    for path in Path(folder).glob(".*.tmp"):
        match = _TEMPORARY.fullmatch(path.name)
        if match and match["name"] in names:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path)
    return removed


def check_output_file(path: str | Path | None, what: str = "--out") -> None:
    """Check, before any work, that a result file can be written at ``path``.

    ``None`` is no file. The path must not be an existing folder, and its nearest existing
    folder must accept new files (the missing ones are made when the result is written,
    so a run that fails before then leaves nothing behind).
    """
    if path is None:
        return
    if str(path).strip() == "":
        raise UsageError(f"{what} must name a file, got an empty string")
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{what} {path} is a folder; name a file, e.g. {path / 'result.json'}")
    existing = next(p for p in (*path.absolute().parents, Path("/")) if p.exists())
    try:
        if not existing.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(existing))
        _probe_writable(existing)
    except OSError as exc:
        raise UsageError(describe_os_error(exc, f"{what} {path}")) from None


_ADVICE = {
    errno.ENOSPC: "free some space (a run continues with --resume)",
    errno.EDQUOT: "free some space (a run continues with --resume)",
    errno.EROFS: "choose a place on a writable file system",
    errno.EACCES: "choose a place you may write to",
    errno.EPERM: "choose a place you may write to",
    errno.ENOENT: "it cannot be created there; choose another place",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EISDIR: "it is a folder; name a file",
    errno.EEXIST: "something is already there",
    errno.ENAMETOOLONG: "the name is too long",
    errno.EFBIG: "the file grew beyond the size allowed here",
}


def describe_os_error(exc: OSError, subject: str | None = None) -> str:
    """One line for an OSError: what failed, on which path, and what to do."""
    where = subject or (f"{exc.filename}" if exc.filename is not None else "a file")
    reason = exc.strerror or type(exc).__name__
    text = f"{where}: {reason}"
    if subject is not None and exc.filename is not None and str(exc.filename) not in subject:
        text += f" ({exc.filename})"
    advice = _ADVICE.get(exc.errno)
    return f"{text}; {advice}" if advice else text
