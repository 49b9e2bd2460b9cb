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

__all__ = [
    "RunFolder",
    "RUN_FILES",
    "RUN_EXTRAS",
    "CONFIG_HEADER",
    "check_output_file",
    "describe_os_error",
    "probe_writable",
    "foreign_files",
    "remove_own_temporaries",
]

#: the files a run writes into its folder
RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json", "checkpoint.pt")
#: what else may be in a run folder: TensorBoard's events, and the files ``compare`` adds
RUN_EXTRAS = ("tensorboard", "robust.json", "hessian.json", "error.txt")
#: the first line of every ``config.yaml`` a run writes: how a later run knows it is ours
CONFIG_HEADER = "# largebatch run configuration: rewritten by each run in this folder"

# What io.atomic_write leaves behind when a crash cuts a save short: ".NAME.<random>.tmp".
_TEMPORARY = re.compile(r"\.(?P<name>.+)\.[A-Za-z0-9_]{8}\.tmp")


class RunFolder:
    """Exclusive use of folder ``path`` for one run (a context manager).

    Entering creates the folder (with its parents), checks that files can be written
    there, and takes the lock; a second process on the same folder gets a UsageError at
    once and touches nothing. Leaving releases the lock, and removes the folder if this
    process created it, still holds it and left it empty (a run that failed before
    writing anything leaves no trace).

    Races: each missing folder is made by one ``mkdir`` (atomic: of several processes,
    exactly one creates it), so a process knows what it created itself. A process that
    fails to take the lock removes nothing. After taking the lock, a process checks that
    the folder it locked is still the one at ``path`` (a holder that left may have removed
    an empty one in between) and starts over if not.
    """

    _ATTEMPTS = 20

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
        for _ in range(self._ATTEMPTS):
            if path.exists() and not path.is_dir():
                raise UsageError(f"{self.what} {path} is a file, not a folder; choose a folder")
            try:
                created = _make_folders(path)
                fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
            except FileNotFoundError:
                continue  # a parent was removed by another process as we made it: again
            except OSError as exc:
                raise UsageError(describe_os_error(exc, f"{self.what} {path}")) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)  # another process holds it: leave everything as it is
                if exc.errno in (errno.EWOULDBLOCK, errno.EACCES):
                    raise UsageError(
                        f"{self.what} {path} is in use by another largebatch process; wait "
                        "for it to finish or choose another folder"
                    ) from None
                raise UsageError(describe_os_error(exc, f"{self.what} {path}")) from None
            if _same_folder(fd, path):
                break
            os.close(fd)  # we locked a folder that its holder removed on leaving: again
        else:
            raise UsageError(f"{self.what} {path} keeps changing under us; choose another folder")
        self._fd, self._created = fd, created
        try:
            probe_writable(path)
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
        if self._fd is None:
            return
        # Removed while the lock is held, so no other process is using it; a process
        # that opened it meanwhile finds it gone once it has the lock, and starts over.
        for folder in self._created:  # innermost first; stops at the first non-empty one
            try:
                folder.rmdir()
            except OSError:
                break
        self._created = []
        os.close(self._fd)  # releases the lock
        self._fd = None


def _make_folders(path: Path) -> list[Path]:
    """Make ``path`` and its missing parents one ``mkdir`` at a time; return the folders
    this call created, innermost first (one that another process made is not ours)."""
    missing = [p for p in (path, *path.parents) if not p.exists()]
    created = []
    for folder in reversed(missing):  # outermost first
        try:
            folder.mkdir()
        except FileExistsError:
            continue
        created.append(folder)
    return created[::-1]


def _same_folder(fd: int, path: Path) -> bool:
    try:
        here, held = os.stat(path), os.fstat(fd)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (held.st_dev, held.st_ino)


_PROBE_PREFIX = ".largebatch-probe."


def probe_writable(folder: Path) -> None:
    """Create and remove a file in ``folder``: the only check that a read-only mount,
    /proc or a missing permission cannot fool."""
    try:
        fd, name = tempfile.mkstemp(prefix=_PROBE_PREFIX, dir=folder)
    except OSError as exc:  # name the folder, not the probe file that could not be made
        raise OSError(exc.errno, exc.strerror, str(folder)) from None
    os.close(fd)
    os.unlink(name)


def foreign_files(folder: str | Path) -> list[str]:
    """The entries of run folder ``folder`` that no run of ours wrote (sorted).

    A run may write into a folder only when this is empty. Our names count as ours only
    next to a ``config.yaml`` that a run wrote (it starts with :data:`CONFIG_HEADER`) or a
    checkpoint: a user's own ``metrics.jsonl`` or ``config.yaml`` in a folder is foreign.
    The temporaries of our own atomic saves are ours.
    """
    folder = Path(folder)
    names = sorted(os.listdir(folder))
    ours = {*RUN_FILES, *RUN_EXTRAS}
    run_was_here = "checkpoint.pt" in names or _written_by_a_run(folder / "config.yaml")
    return [
        name
        for name in names
        if not (name in ours and run_was_here)
        and not _own_temporary(name, ours)
        and not (name == "tensorboard" and _only_events(folder / name))
    ]


def _only_events(folder: Path) -> bool:
    """A TensorBoard folder that holds only event files (ours, from a run that stopped
    before its ``config.yaml``)."""
    return folder.is_dir() and all(
        p.name.startswith("events.out.tfevents.") for p in folder.iterdir()
    )


def _written_by_a_run(config: Path) -> bool:
    try:
        with open(config, encoding="utf-8", errors="replace") as f:
            return f.readline().rstrip("\n") == CONFIG_HEADER
    except OSError:
        return False


def _own_temporary(name: str, ours: set[str]) -> bool:
    match = _TEMPORARY.fullmatch(name)
    return bool(match and match["name"] in ours) or name.startswith(_PROBE_PREFIX)


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
        probe_writable(existing)
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
