"""One writer per run directory: `run.lock` holds an exclusive `flock` for the life of the process.

The kernel drops the flock when its holder dies, however it dies, so a lock left by a killed
process is known to be stale and is taken over. The file also names the holder (pid, host, start
time, command) for the message a second process prints; where a filesystem ignores flock, that
record is checked instead (same host and the pid still running with the same start time).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from ..errors import UserError

fcntl: ModuleType | None
try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: the pid record alone
    fcntl = None

LOCK_NAME = "run.lock"


def _proc_start(pid: int) -> str | None:
    """The kernel's start time of `pid` (Linux), which tells a reused pid from the original."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(holder: dict) -> bool:
    pid = int(holder.get("pid", -1))
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    start = _proc_start(pid)
    return start is None or holder.get("proc_start") in (None, start)


def describe(holder: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} (started {started})"


class RunLock:
    """The exclusive lock of one run directory (see the module docstring)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.path = self.root / LOCK_NAME
        self.fd: int | None = None

    def acquire(self, log: Callable[[str], None] = print) -> None:
        for _ in range(20):  # retried only when the file is replaced under us
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                locked = self._flock(fd)
                holder = self._read(fd, wait=not locked)
                if not locked or (holder and holder.get("host") == socket.gethostname()
                                  and holder.get("pid") != os.getpid() and _alive(holder)):
                    raise UserError(f"run directory {self.root} is in use by {describe(holder or {})}"
                                    f"{': ' + holder['command'] if holder and holder.get('command') else ''}"
                                    ": wait for it to finish or pass another run directory (-r)")
                if os.fstat(fd).st_ino != os.stat(self.path).st_ino:
                    os.close(fd)
                    continue
                if holder:
                    log(f"run {self.root}: taking over the lock left by {describe(holder)}, which is gone")
                self._write(fd)
                self.fd = fd
                return
            except BaseException:
                if self.fd != fd:
                    os.close(fd)
                raise
        raise UserError(f"could not lock {self.path}: another process keeps replacing it; pass another run directory")

    def release(self) -> None:
        """Empty the record (an empty file is a clean release) and drop the flock."""
        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, 0)
            os.fsync(self.fd)
        except OSError:
            pass
        os.close(self.fd)  # closing drops the flock
        self.fd = None

    @staticmethod
    def _flock(fd: int) -> bool:
        if fcntl is None:
            return True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        except OSError:  # a filesystem without flock: the pid record decides
            return True

    @staticmethod
    def _read(fd: int, wait: bool) -> dict | None:
        """The holder's record; a holder that just took the lock may not have written it yet."""
        for _ in range(20 if wait else 1):
            os.lseek(fd, 0, os.SEEK_SET)
            raw = os.read(fd, 65536)
            try:
                return json.loads(raw) if raw.strip() else None
            except ValueError:
                pass
            time.sleep(0.05)
        return None

    @staticmethod
    def _write(fd: int) -> None:
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
              "proc_start": _proc_start(os.getpid()), "command": " ".join(["refusalscope", *sys.argv[1:]])[:300]}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(me).encode())
        os.fsync(fd)
