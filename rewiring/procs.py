"""Child processes that never outlive their parent, and run folders that one process at a time uses.

A `kill -9` runs none of the parent's clean-up, so its children have to notice by themselves, or
they live on as orphans (a synthesis worker holds ~830 MB) and a restart can race them on the same
run folder:

- `die_with_parent()`, called first thing in a child, arms Linux's parent-death signal
  (`prctl(PR_SET_PDEATHSIG, SIGKILL)`); where there is none (not Linux), a daemon thread kills the
  child once `os.getppid()` changes. A multiprocessing child whose OS parent is a fork server, not
  the process that started it, also watches its starter's sentinel, which closes when that
  process dies.
- `exclusive_lock(path)` holds an `fcntl.flock` for a block. The kernel drops it when its holder
  dies, however it dies, so a stale lock file never blocks anyone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def arm_parent_death_signal(sig: int = signal.SIGKILL) -> bool:
    """Ask Linux to send `sig` to this process when its parent dies; False where prctl is missing.

    Linux sends it when the *thread* that started this process exits, so start children from a
    thread that outlives them (the main thread, or the thread that waits for them).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch(dead: Callable[[], bool], poll_seconds: float) -> None:
    def run() -> None:
        while not dead():
            time.sleep(poll_seconds)
        _kill_self()

    threading.Thread(target=run, name="die-with-parent", daemon=True).start()


def _die_with_starter() -> None:
    """A multiprocessing child forked by a fork server: its OS parent is the server, so the signal
    above follows the server; this follows the process that asked for the child."""
    starter = multiprocessing.parent_process()
    if starter is None or starter.pid == os.getppid():
        return

    def run() -> None:
        starter.join()  # returns when the starter's end of the sentinel pipe closes: it died
        _kill_self()

    threading.Thread(target=run, name="die-with-starter", daemon=True).start()


def die_with_parent(parent_pid: int | None = None, poll_seconds: float = 0.5) -> None:
    """Call first thing in a child process: it is killed (SIGKILL) when its parent dies, `kill -9`
    included, so that no orphan holds memory or a run folder.

    `parent_pid`: the parent's pid, as the parent saw it when it started the child, so that a parent
    that died before this call is noticed too (default: the parent now).
    """
    expected = os.getppid() if parent_pid is None else parent_pid
    if not arm_parent_death_signal(signal.SIGKILL):
        _watch(lambda: os.getppid() != expected, poll_seconds)
    if os.getppid() != expected:  # died before the signal was armed: re-parented already
        _kill_self()
    _die_with_starter()


class Locked(RuntimeError):
    """The lock is held by another live process."""

    def __init__(self, path: Path, pid: int | None) -> None:
        self.path = path
        self.pid = pid
        super().__init__(f"{path} is locked by a live process, pid {pid if pid is not None else '?'}")


def _holder(fd: int) -> int | None:
    """The pid the holder wrote into the lock file (it may not have written it yet)."""
    for _ in range(20):
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
        if text.isdigit():
            return int(text)
        time.sleep(0.01)
    return None


@contextmanager
def exclusive_lock(path: str | Path) -> Iterator[Path]:
    """Hold an exclusive `flock` on `path` (created, with this process's pid in it) for the block;
    `Locked` with the holder's pid when a live process holds it. Never waits."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise Locked(path, _holder(fd)) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)  # releases the lock


__all__ = ["Locked", "arm_parent_death_signal", "die_with_parent", "exclusive_lock"]
