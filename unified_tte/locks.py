"""Exclusive locks on what a command writes: a training run folder, a trace file, an eval cache.

    from unified_tte.locks import lock_folder, lock_file
    with lock_folder("runs/x", "tte train"):        # RUN_DIR/.tte.lock
        ...
    with lock_file("traces.jsonl", "tte traces"):   # traces.jsonl.lock beside it
        ...

A second process that asks for a held lock is refused at once with `InUse` (exit 2): "runs/x is
in use by pid N on HOST since T (tte train); wait for it to finish, or remove runs/x/.tte.lock if
that process is gone". The lock is the kernel's `flock` on the lock file, so it goes with its
process however that process ends (kill -9 included); the file also records the holder's host,
pid, command and start time for that message. A lock file left by a process that is gone (its
flock released, the record still there) is stale: on the same host it is taken over with a
warning naming the old holder; a record from another host is refused, since this host cannot
tell whether that process still runs. Release removes the lock file (and a folder the lock
itself created, if nothing else was written there).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
import warnings
from pathlib import Path
from typing import Iterator

from .errors import InUse

FOLDER_LOCK = ".tte.lock"     # the lock file inside a locked folder
FILE_LOCK_SUFFIX = ".lock"    # appended to a locked file's name for its lock file


@contextlib.contextmanager
def lock_folder(folder: str | os.PathLike, command: str, read_only: bool = False) -> Iterator[Path]:
    """Hold `folder` for `command`; yields the folder. A writer's folder is created when missing.
    `read_only`: the command only reads the folder (`tte export` of a run); where this process
    may not create the lock file there, it only checks that no writer holds the folder."""
    folder = Path(folder)
    created = not read_only and not folder.exists()
    if not read_only:
        folder.mkdir(parents=True, exist_ok=True)
    try:
        with _held(folder / FOLDER_LOCK, folder, command, read_only):
            yield folder
    finally:
        if created:
            with contextlib.suppress(OSError):
                folder.rmdir()   # only succeeds when the command wrote nothing there


@contextlib.contextmanager
def lock_file(path: str | os.PathLike, command: str) -> Iterator[Path]:
    """Hold the file `path` (which need not exist yet) for `command`; yields the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _held(path.with_name(path.name + FILE_LOCK_SUFFIX), path, command):
        yield path


def holder(lock_path: Path) -> dict | None:
    """The record a lock file holds ({host, pid, command, since}), or None if unreadable."""
    try:
        record = json.loads(lock_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _describe(record: dict | None) -> str:
    if not record:
        return "another process (its record is not written yet)"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.get("since", 0)))
    return f"pid {record.get('pid')} on {record.get('host')} since {since} ({record.get('command')})"


@contextlib.contextmanager
def _held(lock_path: Path, target: Path, command: str, read_only: bool = False) -> Iterator[None]:
    try:
        fd = _acquire(lock_path, target)
    except OSError as exc:
        if not (read_only and exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS)):
            raise
        with _no_writer(lock_path, target):
            yield
        return
    try:
        record = {"host": socket.gethostname(), "pid": os.getpid(), "command": command, "since": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        os.fsync(fd)
        yield
    finally:
        # Unlink while still holding the flock: a waiter that opened this inode finds it gone
        # from the path afterwards and starts over on a fresh file (see _acquire).
        with contextlib.suppress(OSError):
            lock_path.unlink()
        os.close(fd)


@contextlib.contextmanager
def _no_writer(lock_path: Path, target: Path) -> Iterator[None]:
    """A reader in a folder it may not write: every writer creates the lock file, so none there
    means no writer; one there is held (flock works on a read-only descriptor) while it reads."""
    try:
        fd = os.open(lock_path, os.O_RDONLY)
    except FileNotFoundError:
        yield
        return
    try:
        _flock_or_refuse(fd, lock_path, target)
        yield
    finally:
        os.close(fd)


def _flock_or_refuse(fd: int, lock_path: Path, target: Path) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise
        raise InUse(f"{target} is in use by {_describe(holder(lock_path))}; wait for it to finish, "
                    f"or remove {lock_path} if that process is gone") from None


def _acquire(lock_path: Path, target: Path) -> int:
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            _flock_or_refuse(fd, lock_path, target)
        except BaseException:
            os.close(fd)
            raise
        try:
            same = os.stat(lock_path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:   # the holder released (unlinked) it between our open and our flock
            os.close(fd)
            continue
        stale = holder(lock_path)
        if stale and stale.get("host") not in (None, socket.gethostname()):
            os.close(fd)
            raise InUse(f"{lock_path} says {target} is in use by {_describe(stale)}; this host cannot "
                        f"tell whether that process still runs: wait for it to finish, or remove {lock_path} "
                        "if that process is gone")
        if stale:
            warnings.warn(f"{lock_path}: took over a stale lock of {_describe(stale)}: that process is gone "
                          "(killed, or its machine restarted)", stacklevel=5)
        return fd
