"""The run folder and what a run writes there; output paths the user names.

- :class:`RunFolder` gives one process exclusive use of a run folder. The lock is an
  ``flock`` on the folder itself, so the operating system drops it when the process ends,
  however it ends: a crashed run never leaves its folder locked. The folder is created
  if needed and removed again if the run wrote nothing into it.
- :func:`run_folder` holds it for a run (rank 0), refusing a folder that holds a run
  (without resume) or files that no run of ours wrote (:func:`foreign_files`).
- :class:`RunWriter` writes ``config.yaml``, ``metrics.jsonl``, ``summary.json``
  (:func:`summary`) and the TensorBoard scalars, and prints the table
  (:data:`TABLE_HEADER`, :func:`format_row`).
- :func:`check_output_file` checks, before any work, that a result file can be written.
- :func:`describe_os_error` turns an ``OSError`` on a user's path into one line that says
  what to do; the command line prints it as ``error: ...``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import math
import os
import re
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from largebatch.checkpoint import SHARDS
from largebatch.config import CONFIG_HEADER, TrainConfig, save_config
from largebatch.controllers import BatchController
from largebatch.distributed import World, broadcast_object
from largebatch.errors import UsageError
from largebatch.io import append_jsonl, atomic_write_json, write_jsonl

__all__ = [
    "RunFolder",
    "run_folder",
    "RunWriter",
    "TABLE_HEADER",
    "table_header",
    "format_row",
    "summary",
    "RUN_FILES",
    "RUN_EXTRAS",
    "CONFIG_HEADER",
    "check_output_file",
    "describe_os_error",
    "probe_writable",
    "foreign_files",
    "WORLD_FILE",
    "remove_own_temporaries",
]

#: the files a run writes into its folder
RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json", "checkpoint.pt")
#: the processes a run asks for when its batch outgrew them (config ``max_accumulation``)
WORLD_FILE = "world.json"
#: what else may be in a run folder: TensorBoard's events, a sharded checkpoint's folder
#: (:data:`largebatch.checkpoint.SHARDS`), the request for a larger world, and the files
#: ``compare`` adds
RUN_EXTRAS = ("tensorboard", SHARDS, WORLD_FILE, "robust.json", "hessian.json", "error.txt")

# What io.atomic_write leaves behind when a crash cuts a save short: ".NAME.<random>.tmp".
_TEMPORARY = re.compile(r"\.(?P<name>.+)\.[A-Za-z0-9_]{8}\.tmp")


class RunFolder:
    """Exclusive use of folder ``path`` for one run (a context manager).

    Entering creates the folder (with its parents), takes the lock, and checks that files
    can be written there; a second process on the same folder gets a UsageError at
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
        created: list[Path] = []
        for _ in range(self._ATTEMPTS):
            if path.is_symlink() and not path.exists():
                raise UsageError(f"{self.what} {path} is a link to nothing; choose a folder")
            if path.exists() and not path.is_dir():
                raise UsageError(f"{self.what} {path} is a file, not a folder; choose a folder")
            try:
                created = [*_make_folders(path), *created]  # innermost first
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
        _HELD.add(fd)
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
        _HELD.discard(self._fd)
        os.close(self._fd)  # releases the lock
        self._fd = None


# The descriptors of the run folders this process holds. A process forked from it (a
# data-reading worker) closes its copies at once: a lock taken with flock belongs to
# every copy of its descriptor, so a worker that outlived a killed run would otherwise
# hold the folder until it noticed and exited.
_HELD: set[int] = set()


def _close_held_in_child() -> None:
    for fd in _HELD:
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()


os.register_at_fork(after_in_child=_close_held_in_child)


@contextlib.contextmanager
def run_folder(
    out: str | None, world: World, resume: bool = False, what: str = "--out"
) -> Iterator[None]:
    """Hold run folder ``out`` for the block (rank 0 takes its lock; every rank learns
    whether that worked). Refused here, before any data is read: a second process on the
    same folder, a folder holding a run when ``resume`` is off, and a folder holding files
    that no run of ours wrote (unless resuming the run in it). ``out=None`` holds nothing."""
    with contextlib.ExitStack() as held:
        problem = None
        if world.is_main and out is not None:
            try:
                held.enter_context(RunFolder(out, what))
                _check_claim(Path(out), resume, what)
            except UsageError as exc:
                held.close()
                problem = str(exc)
            except OSError as exc:  # a folder we may not list, say: one line, on every rank
                held.close()
                problem = describe_os_error(exc, f"{what} {out}")
        problem = broadcast_object(problem, world)
        if problem is not None:
            raise UsageError(problem)
        yield


def _check_claim(out: Path, resume: bool, what: str) -> None:
    if resume and (out / "checkpoint.pt").exists():
        return  # the run's own folder: only our files are rewritten
    if (out / "checkpoint.pt").exists() or (out / "summary.json").exists():
        if resume:  # a summary without the checkpoint to continue from
            raise UsageError(
                f"{out} holds a finished run's summary.json but no checkpoint.pt to resume "
                f"from; choose another {what}"
            )
        resume_it = "--resume" if what == "--out" else "resume=True"
        raise UsageError(
            f"{out} already holds a run; pass {resume_it} to continue it or choose another {what}"
        )
    foreign = foreign_files(out)
    if foreign:
        shown = ", ".join(foreign[:5]) + (
            f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
        )
        raise UsageError(
            f"{what} {out} holds files that no largebatch run wrote ({shown}); nothing was "
            "changed; choose an empty or new folder"
        )


class RunWriter:
    """What a run writes into its folder, and the table it prints (a context manager).

    :meth:`start` (once the run has restored its progress) writes ``config.yaml`` (the
    config ``record``), rewrites ``metrics.jsonl`` from the progress's history (the
    checkpoint's history is the truth: it drops epochs logged after its last save),
    starts the TensorBoard scalars (first: a folder it cannot write to changes nothing)
    and prints the run's line, the header and the epochs so far. :meth:`record` appends
    an epoch's record and prints its row; :meth:`finish` writes ``summary.json`` at the
    run's end. Only rank 0 writes; ``out`` None writes nothing.
    """

    def __init__(
        self,
        out: str | Path | None,
        record: Mapping[str, Any],
        world: World,
        echo: Callable[[str], None],
        scalars: Callable[[Path], Any] | None = None,
        bits: bool = False,
    ) -> None:
        self.out = Path(out) if out is not None and world.is_main else None
        self.bits = bits  # a language model's table (table_header)
        self.config_record, self.echo, self.make_scalars = record, echo, scalars
        self.scalars: Any = None
        self._closing = contextlib.ExitStack()

    def __enter__(self) -> RunWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._closing.__exit__(*exc_info)

    def start(self, history: list[dict[str, Any]], line: str) -> None:
        out = self.out
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            if self.make_scalars is not None:
                self.scalars = self._closing.enter_context(self.make_scalars(out / "tensorboard"))
            remove_own_temporaries(out, RUN_FILES)  # left by a save that a crash cut short
            save_config(self.config_record, out / "config.yaml")
            write_jsonl(out / "metrics.jsonl", history)
        self.echo(line)
        self.echo(table_header(self.bits))
        for record in history:
            self.echo(format_row(record))

    def record(self, record: dict[str, Any]) -> None:
        if self.out is not None:
            append_jsonl(self.out / "metrics.jsonl", record)
        if self.scalars is not None:
            self.scalars.epoch(record)
        self.echo(format_row(record))

    def finish(self, result: dict[str, Any]) -> None:
        if self.out is not None:
            atomic_write_json(self.out / "summary.json", result)
            self.echo(
                f"results in {self.out}/ (metrics.jsonl, summary.json, checkpoint.pt, config.yaml)"
            )


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
        and name != "error.txt"  # compare's note of a run that failed before writing
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


def _number(value: float | None, width: int, spec: str) -> str:
    return f"{value:>{width}{spec}}" if value is not None else f"{'-':>{width}}"


def format_row(record: dict[str, Any]) -> str:
    """An epoch's row of the table: a language model's (a record with ``test_bits``) shows
    the test loss in bits per token where the accuracy stands (:func:`table_header`)."""
    last = record["test_bits"] if "test_bits" in record else record["test_acc"]
    return (
        f"{record['epoch']:>5} {record['batch_size']:>7} {record['lr']:>9.4g} "
        f"{record['updates']:>8} {record['train_loss']:>10.4f} "
        f"{_number(record['train_acc'], 9, '.4f')} {_number(record['test_loss'], 9, '.4f')} "
        f"{_number(last, 8, '.4f')} {_number(record.get('eigenvalue'), 9, '.3g')} "
        f"{record['wall_s']:>8.1f}"
    )


def table_header(bits: bool = False) -> str:
    """The table's header; ``bits``: a language model's, ``test_bits`` (bits per token,
    per byte for ``text``) in the accuracy's place."""
    return (
        f"{'epoch':>5} {'batch':>7} {'lr':>9} {'updates':>8} {'train_loss':>10} "
        f"{'train_acc':>9} {'test_loss':>9} {'test_bits' if bits else 'test_acc':>8} "
        f"{'eigval':>9} {'wall_s':>8}"
    )


TABLE_HEADER = table_header()


def summary(config: TrainConfig, state: Any, controller: BatchController) -> dict[str, Any]:
    """``summary.json``: what the run was and where it ended (``state``: its progress)."""
    history = state.history
    last = history[-1] if history else {}
    accuracies = [r["test_acc"] for r in history if r.get("test_acc") is not None]
    return {
        "method": controller.name,
        "dataset": config.dataset,
        "model": config.model,
        "seed": config.seed,
        "epochs": state.epoch,
        "final_test_acc": last.get("test_acc", math.nan),
        "best_test_acc": max(accuracies, default=None if history else math.nan),
        "final_test_loss": last.get("test_loss", math.nan),
        "final_train_loss": last.get("train_loss", math.nan),
        "updates": state.updates,
        "samples": state.samples,
        "wall_s": state.wall_s,
        "hessian_s": state.hessian_s,
        "measure_s": state.measure_s,
        "final_batch_size": last.get("batch_size", controller.decision().batch_size),
        "base_batch_size": config.batch_size,
        "rollbacks": len(state.rollbacks),
        "max_batch_size": config.max_batch_size,
        # the LR scaling rule in force (lr_scaling auto resolved by optimizer), if any
        "lr_scaling": getattr(getattr(controller, "inner", controller), "lr_rule", None),
    }
