"""One writer per store path, for a store's whole life: exclusive to lay out, shared to fill.

Two runs that write one store at once must never mix: sweep B (overwrite=True) replacing the
store that sweep A is still filling left a store labelled with B's metric holding A's values.
So every store path has a lock file beside it (`NAME.lock`, `flock`), taken in one of two
modes:

- **exclusive**, for the seconds it takes to lay a store out, replace it, or save a result;
- **shared**, by a sweep, from the moment its store is laid out (or found with its own
  configuration) until its last chunk is written. Shards of one sweep share it; nothing can
  replace the store under them.

    with path_lock(path, purpose="saving a result"):    # exclusive, for the block
        ...
    lock = PathLock(path)                               # a sweep's, held across calls
    lock.try_take(shared=True, purpose="filling a sweep's store")
    ...
    lock.close()

The kernel drops an `flock` when its holder dies, even by kill -9, so a lock is never left
behind. The lock *file* is removed by the last holder to let go cleanly, so a finished run leaves
only its store: a holder that closes takes the lock exclusively (so no other process holds
it), unlinks the file while it still holds it, and only then lets go. A process
that opened the file before it was unlinked finds, once it holds the lock, that the path names
another file or none, and takes the lock again on the file now at the path; so two processes
never hold the "same" lock on two files. A holder killed before its close leaves the file, which
the next run takes over and removes.

A process that wants the lock exclusively waits for another exclusive holder (that lasts
seconds) up to `LOCK_TIMEOUT`, then names it; one that finds sweeps holding it shared is
refused at once, with their pid and host, since a sweep may run for hours.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from ..errors import UserError

LOCK_TIMEOUT = 600.0
"""Seconds to wait for another process laying out or saving the same path before naming it."""


class StoreError(UserError):
    """A store that cannot be written or read as asked."""


class StoreInUse(StoreError):
    """A sweep holds the store: it cannot be replaced or overwritten while it runs."""


_HELD: set[str] = set()
"""Lock files this process holds exclusively: taking one again inside its block does not
deadlock (`assemble` calls `save` under its own lock)."""


class PathLock:
    """The lock file of one store path, open for this process (see the module docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file = path.with_name(path.name + ".lock")
        self.file.parent.mkdir(parents=True, exist_ok=True)
        self.handle = open(self.file, "a+")  # noqa: SIM115 (held across calls, closed by close())
        self.mode: str | None = None

    def _current(self) -> bool:
        """True when the open handle is the file at the path (not one that a closing holder unlinked)."""
        try:
            here, there = os.fstat(self.handle.fileno()), os.stat(self.file)
        except FileNotFoundError:
            return False
        return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)

    def _reopen(self) -> None:
        """Open the file now at the path (creating it), dropping the handle of an unlinked one."""
        self.handle.close()
        self.handle = open(self.file, "a+")  # noqa: SIM115

    def try_take(self, *, shared: bool, purpose: str) -> bool:
        """Take the lock without waiting; True if taken. Records who holds it and why."""
        while True:
            try:
                fcntl.flock(self.handle, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            if self._current():
                break
            fcntl.flock(self.handle, fcntl.LOCK_UN)  # a file its last holder removed: take the new one
            self._reopen()
        self.mode = "shared" if shared else "exclusive"
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "purpose": purpose,
            "since": time.time(),
            "mode": self.mode,
        }
        if not shared:  # alone: the records of earlier holders are history
            self.handle.seek(0)
            self.handle.truncate()
        self.handle.write(json.dumps(record) + "\n")  # "a+": appended, one line per holder
        self.handle.flush()
        return True

    def release(self) -> None:
        fcntl.flock(self.handle, fcntl.LOCK_UN)
        self.mode = None

    def close(self) -> None:
        """Let go of the lock; the last holder removes the lock file (module docstring)."""
        if self.handle.closed:
            return
        if self.mode is not None:
            try:  # alone with it? (a shared holder's failed upgrade only lets go a little earlier)
                fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pass
            else:
                if self._current():
                    with contextlib.suppress(FileNotFoundError):
                        self.file.unlink()
        self.handle.close()  # releases the flock
        self.mode = None

    def held_by_sweeps(self) -> bool:
        """True when the lock is held shared only (by sweeps), not by an exclusive holder."""
        if self.mode is not None:
            return False
        if not self._current():
            self._reopen()
        try:
            fcntl.flock(self.handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(self.handle, fcntl.LOCK_UN)
        return True

    def holders(self) -> str:
        """The processes that hold the lock now, by pid, host and purpose."""
        try:
            lines = self.file.read_text().splitlines()
        except OSError:
            lines = []
        records = []
        for line in lines:
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
        holding = _pids_holding(self.file)
        here = socket.gethostname()
        live = []
        for record in records:
            pid, host = record.get("pid"), record.get("host")
            if pid == os.getpid() and host == here:
                continue
            if host == here and (not _alive(pid) or (holding is not None and pid not in holding)):
                continue
            live.append(record)
        if not live:
            return "another process"
        described = [
            f"process {r.get('pid', '?')} on {r.get('host', '?')} ({r.get('purpose', 'writing')})"
            for r in live[-3:]
        ]
        return ", ".join(described)


def _alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _pids_holding(file: Path) -> set[int] | None:
    """Pids of processes holding an flock on `file`, from /proc/locks (None where unreadable)."""
    try:
        inode = file.stat().st_ino
        table = Path("/proc/locks").read_text()
    except OSError:
        return None
    pids = set()
    for line in table.splitlines():
        parts = line.split()
        if len(parts) >= 6 and parts[1] == "FLOCK" and parts[5].rsplit(":", 1)[-1] == str(inode):
            with contextlib.suppress(ValueError):
                pids.add(int(parts[4]))
    return pids


def refusal(path: Path, lock: PathLock, wait: float, *, sweeps: bool) -> StoreError:
    """The error for a path whose lock another process holds: `sweeps` hold it shared (refused
    at once), or an exclusive holder outlasted `wait` seconds."""
    if sweeps:
        return StoreInUse(
            f"{path} is being written by a sweep ({lock.holders()}), which holds {lock.file.name} "
            "until its last chunk is written; it cannot be replaced or overwritten while it runs. Wait "
            "for it to finish, or write to another path."
        )
    return StoreError(
        f"{path} is being written by {lock.holders()}, which still holds {lock.file.name} after "
        f"{wait:g} s. Wait for it to finish, or write to another path."
    )


@contextlib.contextmanager
def path_lock(path: Path, *, purpose: str, timeout: float | None = None) -> Iterator[None]:
    """Hold the lock of `path` exclusively for the block.

    Waits up to `timeout` seconds (default `LOCK_TIMEOUT`) for another exclusive holder, then
    raises a `StoreError` naming it; a path that sweeps hold shared is refused at once
    (`StoreInUse`). A holder that died released the lock with its last breath.
    """
    from .store import boundary  # the OS errors of creating the lock file, said plainly

    mine = str(path.with_name(path.name + ".lock").absolute())
    if mine in _HELD:  # this process holds it already (e.g. `assemble` calling `save`)
        yield
        return
    wait = LOCK_TIMEOUT if timeout is None else timeout
    with boundary(path, "create"):
        lock = PathLock(path)
    try:
        deadline, sweeps = time.monotonic() + wait, 0
        while not lock.try_take(shared=False, purpose=purpose):
            # twice in a row, so that an exclusive holder finishing in between is not taken for one
            sweeps = sweeps + 1 if lock.held_by_sweeps() else 0
            if sweeps >= 2 or time.monotonic() > deadline:
                raise refusal(path, lock, wait, sweeps=sweeps >= 2)
            time.sleep(0.05)
        _HELD.add(mine)
        try:
            yield
        finally:
            _HELD.discard(mine)
    finally:
        lock.close()
