"""Temporary directories tierflow owns: one per process, removed at exit, and when a process was
killed, at the next start of any tierflow process.

Libraries that tierflow drives make directories in the system temp dir and remove them only at a
clean exit: importing wandb makes ``tmp*wandb-media`` and ``tmp*wandb-artifacts`` (starting it, one
more for a moment), torch elastic's agent a ``torchelastic_*`` log tree (never removed). A run
killed with SIGKILL left one set per run. They are made inside the process's scratch directory
instead, ``<temp>/tierflow-tmp-<uid>/<kind>-<pid>-XXXXXXXX/``, so what a killed run leaves is
provably ours and can go; the root goes too once it is empty.

Note [whose scratch directory]: next to each scratch directory ``D`` lies ``D.lock``, which its
process holds ``flock``-ed for its whole life; the kernel drops the lock when the process dies,
SIGKILL included. A cleaner removes ``D`` only after taking that lock without waiting, so a
directory a live process uses is never touched, a reused pid cannot fool it and no clock is
involved. The lock file is made, locked and checked to be still linked before ``D`` is made (a
cleaner may take a brand-new lock file for a dead one's and unlink it; the maker then retries), and
removed only after ``D`` is gone, so no ``D`` ever lies there without its lock file.
Directories in the system temp dir that tierflow did not make this way (say, left by a version
before this one) are never removed: an empty ``tmp*wandb-media`` may belong to a live process.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import stat
import tempfile
import warnings
import weakref
from pathlib import Path
from typing import Iterator, Optional, Tuple

_LOCK = ".lock"
_own: Optional["_Scratch"] = None


def scratch_root() -> Path:
    """``<tempfile.gettempdir()>/tierflow-tmp-<uid>``: where every scratch directory of this user lies."""
    return Path(tempfile.gettempdir()) / f"tierflow-tmp-{os.getuid()}"


def process_scratch_dir(kind: str = "run") -> Optional[Path]:
    """This process's scratch directory (0700), made on first call and removed at interpreter exit.

    Stale ones of killed processes are removed first. ``kind`` names the directory for people
    looking at the temp dir (``run``, ``torchrun``).

    Returns:
        The directory, or None (with a warning) when the scratch root is unusable (another user's,
        a symlink, not writable): the caller then leaves temp files where they would go anyway.
    """
    global _own
    if _own is not None and _own.pid == os.getpid():
        return _own.path
    for _ in range(100):  # another process's exit may remove the empty root under our feet: retry
        try:
            usable = _usable_root()
        except FileNotFoundError:
            continue
        if usable is None:
            return None
        root, checked = usable
        _remove_stale(root)
        made = _make(root, checked, kind)
        if made is not None:
            _own = _Scratch(*made)  # a forked child gets its own on its first call
            return _own.path
    raise AssertionError(f"could not make a scratch directory in {scratch_root()}")


def remove_stale_scratch(root: Optional[Path] = None) -> int:
    """Remove the scratch directories of processes that are gone (Note [whose scratch directory]).

    Returns:
        How many were removed.
    """
    root = scratch_root() if root is None else root
    try:
        if not _is_ours(root.lstat()):
            return 0  # never look inside another user's
    except OSError:  # no root yet
        return 0
    removed = _remove_stale(root)
    with contextlib.suppress(OSError):
        root.rmdir()  # only when empty; a maker racing with this retries (see _make)
    return removed


def _remove_stale(root: Path) -> int:
    try:
        locks = [p for p in root.iterdir() if p.name.endswith(_LOCK)]
    except OSError:
        return 0
    removed = 0
    for lock in locks:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_NOFOLLOW)
        except OSError:
            continue  # removed meanwhile
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # BlockingIOError: its process lives
            os.close(fd)
            continue
        try:
            if not _still_linked(fd, lock):
                continue  # another cleaner was first
            directory = lock.with_name(lock.name[: -len(_LOCK)])
            shutil.rmtree(directory, ignore_errors=True)
            if not directory.exists():  # else kept, with its lock file, for a later try
                os.unlink(lock)
                removed += 1
        finally:
            os.close(fd)
    return removed


@contextlib.contextmanager
def default_tempdir(path: Optional[Path]) -> Iterator[None]:
    """Make ``path`` the default directory of :mod:`tempfile` in this process while inside.

    For imports that make temp directories (wandb): everything else still uses the system temp
    dir. ``tempfile.tempdir`` is process-wide, so a thread making temp files meanwhile also gets
    ``path``; that is harmless, the directory lives until exit. None leaves the default alone.
    """
    if path is None:
        yield
        return
    saved = tempfile.tempdir
    tempfile.tempdir = str(path)
    try:
        yield
    finally:
        tempfile.tempdir = saved


def _make(root: Path, checked: os.stat_result, kind: str) -> Optional[Tuple[int, Path, Path]]:
    """Lock file, lock, check, directory (Note [whose scratch directory]); None when raced."""
    try:
        fd, name = tempfile.mkstemp(prefix=f"{kind}-{os.getpid()}-", suffix=_LOCK, dir=root)
    except FileNotFoundError:
        return None
    lock = Path(name)
    # The root was checked to be ours, but an empty root can be removed (and made again by anyone)
    # between that check and mkstemp; once our lock file is in it, it can no longer be removed.
    if not _same_file(root, checked):
        os.close(fd)
        return None
    fcntl.flock(fd, fcntl.LOCK_EX)  # waits only for a cleaner that took it for a dead one's
    path = lock.with_name(lock.name[: -len(_LOCK)])
    if _still_linked(fd, lock):
        try:
            path.mkdir(mode=0o700)
            return fd, path, lock
        except FileExistsError:  # a directory a cleaner could not remove
            os.unlink(lock)
    os.close(fd)
    return None


class _Scratch:
    """One process's scratch directory; its open, locked lock file marks it live."""

    def __init__(self, fd: int, path: Path, lock: Path) -> None:
        self.pid, self.path = os.getpid(), path
        # A finalizer, not atexit: finalizers run newest first, so the temp directories of modules
        # imported later (wandb's, made inside this one) are cleaned up before this one goes.
        self._finalizer = weakref.finalize(self, _remove, self.pid, fd, path, lock)


def _remove(pid: int, fd: int, path: Path, lock: Path) -> None:
    if os.getpid() != pid:  # a forked child exiting through atexit: the parent still uses it
        return
    shutil.rmtree(path, ignore_errors=True)
    if not path.exists():
        with contextlib.suppress(OSError):
            os.unlink(lock)
    os.close(fd)  # drops the lock; a leftover is then stale
    with contextlib.suppress(OSError):
        path.parent.rmdir()


def _still_linked(fd: int, lock: Path) -> bool:
    """True when ``lock`` is still the file behind ``fd`` (no cleaner has unlinked it)."""
    try:
        return os.stat(lock, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _usable_root() -> Optional[Tuple[Path, os.stat_result]]:
    """The scratch root, made if needed, with its stat; None (warned) when it is not usable."""
    root = scratch_root()
    try:
        root.mkdir(mode=0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        warnings.warn(f"cannot create {root} ({exc.strerror}); temporary files stay in the system temp dir",
                      stacklevel=3)
        return None
    st = root.lstat()
    if not _is_ours(st):
        # In a shared /tmp someone else may have made it first: never write into another user's.
        warnings.warn(f"{root} is not a directory of yours; temporary files stay in the system temp dir "
                      "(remove it, or set TMPDIR to a directory of your own)", stacklevel=3)
        return None
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(root, 0o700)
    return root, st


def _is_ours(st: os.stat_result) -> bool:
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid()


def _same_file(path: Path, st: os.stat_result) -> bool:
    try:
        now = path.lstat()
    except FileNotFoundError:
        return False
    return (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino)
