"""One training process per run folder: an OS file lock on `<out_dir>/run.lock`.

Two processes training into one folder would both append to metrics.jsonl and both save checkpoints, and one of
them fails late. The lock is an OS lock (`fcntl.flock` on POSIX, `msvcrt.locking` on Windows) held on an open
file: the OS releases it when the holder exits or is killed, so a SIGKILLed run leaves no stale lock. The file
itself stays; it holds the last holder's pid, host and start time, which the error for a busy folder quotes.
"""
from __future__ import annotations

import datetime
import json
import os
import pathlib
import socket

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None
    import msvcrt

LOCK_FILE = "run.lock"
# Windows locks are mandatory: a locked byte cannot be read by others. Locking one byte far past the holder's
# note leaves the note readable (locking past the end of a file is allowed there).
_WINDOWS_LOCK_OFFSET = 1 << 30


class RunFolderBusy(ValueError):
    """Another process holds the run folder's lock (is training in it)."""


class RunFolderLock:
    """An exclusive lock on a run folder, as a context manager; `acquire` raises `RunFolderBusy` at once."""

    def __init__(self, out_dir):
        self.path = pathlib.Path(out_dir) / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> RunFolderLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            else:
                os.lseek(fd, _WINDOWS_LOCK_OFFSET, os.SEEK_SET)
                msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            holder = _read_note(fd)
            os.close(fd)
            raise RunFolderBusy(f"run folder {self.path.parent} is in use by another training process ({holder}); "
                                "wait for it, stop it, or use a new out_dir") from None
        note = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                           "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")})
        self.fd = fd  # held from here on: release() frees it even if the note below cannot be written
        try:
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, (note + "\n").encode())
        except OSError:
            self.release()
            raise
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        if fcntl is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        else:
            os.lseek(self.fd, _WINDOWS_LOCK_OFFSET, os.SEEK_SET)
            msvcrt.locking(self.fd, msvcrt.LK_UNLCK, 1)
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> RunFolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_note(fd: int) -> str:
    """The holder as "pid P on host H since T", from the note it wrote; a hint when there is none yet."""
    os.lseek(fd, 0, os.SEEK_SET)
    try:
        note = json.loads(os.read(fd, 4096).decode())
        return f"pid {note['pid']} on host {note['host']} since {note['started']}"
    except (ValueError, KeyError, TypeError, OSError):
        return "holder unknown: it has not written its pid yet"
