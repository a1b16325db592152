"""Client side of the per-node snapshot store (the store itself is :mod:`tierflow.trainer.checkpoint._daemon`).

One store runs per node and user, found through the Unix socket ``<store_dir>/<node>.sock``;
``store_dir`` is an owner-only (0700) runtime directory. :class:`StoreClient` starts the store on
first use, asks it for named ``/dev/shm`` segments (0600) and maps them into the trainer, which
then writes snapshots straight into shared memory. The segments belong to the store, not to the
trainer: a trainer killed with SIGKILL leaves them intact for its restarted self.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import re
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

__all__ = ["Segment", "StoreClient", "StoreError", "default_store_dir", "list_stores", "prepare_store_dir",
           "segment_prefix", "stop_store", "store_dir_problem"]

_DAEMON = Path(__file__).with_name("_daemon.py")
_NODE_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_SUN_PATH_MAX = 107  # bytes of a Unix socket path: sockaddr_un.sun_path is 108 on Linux, with its NUL


class StoreError(RuntimeError):
    """The snapshot store could not be started or reached, or refused a request."""


def default_store_dir() -> Path:
    """``$XDG_RUNTIME_DIR/tierflow`` when set (per-user, tmpfs), else ``/tmp/tierflow-<uid>``."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    return Path(runtime) / "tierflow" if runtime else Path(f"/tmp/tierflow-{os.getuid()}")


def store_dir_problem(path: Path, node: Optional[str] = None) -> Optional[str]:
    """Why ``path`` cannot hold the socket ``<path>/<node>.sock``, or None; nothing is created.

    Args:
        path: the store directory (``~`` and symlinks are resolved, as the store does).
        node: the node id the socket is named after; None checks for the longest one (64 bytes).
    """
    path = Path(path).expanduser().resolve()
    node_bytes = len(node.encode()) if node is not None else 64
    socket_bytes = len(os.fsencode(str(path))) + 1 + node_bytes + len(".sock")
    if socket_bytes <= _SUN_PATH_MAX:
        return None
    return (f"the snapshot store directory {path} is too long for a Unix socket path: "
            f"{path}/{node if node is not None else '<node>'}.sock would be {socket_bytes} bytes, the limit is "
            f"{_SUN_PATH_MAX}; set checkpoint.store_dir to a path of at most "
            f"{_SUN_PATH_MAX - 1 - node_bytes - len('.sock')} bytes")


def prepare_store_dir(path: Path, node: Optional[str] = None) -> Path:
    """Create ``path`` owner-only, or check that an existing one is ours and make it 0700.

    Args:
        path: the store directory.
        node: the node whose socket it must hold (None: any, see :func:`store_dir_problem`).

    Raises:
        StoreError: it is too long for the socket path (checked before anything is created),
            belongs to another user, or cannot be created.
    """
    problem = store_dir_problem(path, node)
    if problem is not None:
        raise StoreError(problem)
    path = Path(path).expanduser().resolve()
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise StoreError(f"cannot create the snapshot store directory {path} ({exc.strerror}); "
                         "set checkpoint.store_dir to a writable directory") from None
    st = path.stat()
    if st.st_uid != os.getuid():
        raise StoreError(f"the snapshot store directory {path} belongs to uid {st.st_uid}; set checkpoint.store_dir "
                         "to a directory of your own")
    os.chmod(path, 0o700)
    return path


def segment_prefix(store_dir: Path, node: str) -> str:
    """Name prefix of every segment of one store: user, store directory (hashed) and node."""
    ns = hashlib.blake2b(str(Path(store_dir).resolve()).encode(), digest_size=4).hexdigest()
    return f"tierflow-{os.getuid()}-{ns}-{node}-"


@dataclass
class Segment:
    """One mapped shared-memory segment; ``buf`` is writable and ``size`` bytes long."""

    name: str
    path: str
    size: int
    mm: mmap.mmap

    @property
    def buf(self) -> memoryview:
        return memoryview(self.mm)

    def tensor(self):
        """The whole segment as a writable uint8 tensor (no copy)."""

        return torch.frombuffer(self.mm, dtype=torch.uint8)

    def close(self) -> None:
        try:
            self.mm.close()
        except BufferError:
            pass  # a tensor still views it; the mapping goes when that tensor does


def _map(path: str) -> mmap.mmap:
    fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
    try:
        st = os.fstat(fd)
        # A segment someone else owns, or that others may write, is never read or written
        # (its bytes could be anyone's): refused, as ssh refuses loose key files.
        if st.st_uid != os.geteuid() or st.st_mode & 0o077:
            raise StoreError(f"the snapshot segment {path} belongs to uid {st.st_uid} with mode "
                             f"{st.st_mode & 0o777:o}; only segments you own with mode 600 are used. Remove it "
                             f"(rm {path}) if it is not yours to keep")
        return mmap.mmap(fd, st.st_size)
    finally:
        os.close(fd)


class StoreClient:
    """A connection to this node's snapshot store, started on demand.

    Args:
        store_dir: owner-only runtime directory (see :func:`default_store_dir`).
        node: this node's id (letters, digits, ``_.-``).
        idle_timeout_s: a store started by this client exits after this long with no client.

    Raises:
        StoreError: the store cannot be started or reached within ``start_timeout_s``.

    Example:
        >>> client = StoreClient(default_store_dir(), "node0")   # doctest: +SKIP
        >>> seg = client.segment("r0-s0", 1 << 20)                # doctest: +SKIP
    """

    def __init__(self, store_dir: Path, node: str, *, idle_timeout_s: float = 600.0, start: bool = True,
                 start_timeout_s: float = 20.0) -> None:
        if not _NODE_RE.match(node):
            raise StoreError(f"checkpoint.node_id={node!r} must be 1-64 letters, digits or _.-")
        self.store_dir, self.node = prepare_store_dir(store_dir, node), node
        self.prefix = segment_prefix(self.store_dir, node)
        self.sock_path = self.store_dir / f"{node}.sock"
        self._lock = threading.Lock()
        self._segments: Dict[str, Segment] = {}
        self._sock = self._connect(idle_timeout_s, start, start_timeout_s)
        self._reader = self._sock.makefile("rb")

    def _connect(self, idle_timeout_s: float, start: bool, timeout_s: float) -> socket.socket:
        deadline, started = time.monotonic() + timeout_s, False
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(str(self.sock_path))
                return s
            except (FileNotFoundError, ConnectionRefusedError):
                s.close()
            if not start:
                raise StoreError(f"no snapshot store runs for node {self.node} in {self.store_dir}")
            if not started:
                self._spawn(idle_timeout_s)
                started = True
            if time.monotonic() > deadline:
                log = self.store_dir / f"{self.node}.log"
                raise StoreError(f"the snapshot store for node {self.node} did not start within {timeout_s:.0f} s; "
                                 f"see {log}")
            time.sleep(0.05)

    def _spawn(self, idle_timeout_s: float) -> None:
        log = os.open(self.store_dir / f"{self.node}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            subprocess.Popen([sys.executable, str(_DAEMON), "--dir", str(self.store_dir), "--node", self.node,
                              "--prefix", self.prefix, "--idle-timeout", str(idle_timeout_s), "--detach"],
                             stdin=subprocess.DEVNULL, stdout=log, stderr=log, close_fds=True,
                             start_new_session=True, cwd="/").wait(timeout=30)
        finally:
            os.close(log)

    def request(self, op: str, **fields: Any) -> Dict[str, Any]:
        with self._lock:
            try:
                self._sock.sendall((json.dumps({"op": op, **fields}) + "\n").encode())
                line = self._reader.readline()
            except OSError as exc:
                raise StoreError(f"lost the snapshot store of node {self.node} ({exc})") from None
        if not line:
            raise StoreError(f"the snapshot store of node {self.node} closed the connection")
        reply = json.loads(line)
        if not reply.get("ok"):
            raise StoreError(f"the snapshot store of node {self.node} refused {op}: {reply.get('error')}")
        return reply

    def segment(self, suffix: str, size: int) -> Segment:
        """The segment ``prefix + suffix``, at least ``size`` bytes, mapped (created or grown as needed)."""
        name = self.prefix + suffix
        seg = self._segments.get(name)
        if seg is not None and seg.size >= size:
            return seg
        path = self.request("alloc", name=name, size=int(size))["path"]
        if seg is not None:
            seg.close()
        mm = _map(path)
        seg = Segment(name, path, len(mm), mm)
        self._segments[name] = seg
        return seg

    def open_existing(self, name: str) -> Optional[Segment]:
        """Map a segment the store already holds (None when it is gone)."""
        if name in self._segments:
            return self._segments[name]
        try:
            mm = _map(os.path.join("/dev/shm", name))
        except (FileNotFoundError, ValueError):
            return None  # ValueError: an empty file cannot be mapped
        seg = Segment(name, os.path.join("/dev/shm", name), len(mm), mm)
        self._segments[name] = seg
        return seg

    def names(self) -> List[str]:
        return list(self.request("list")["names"])

    def free(self, names: List[str]) -> int:
        for n in names:
            seg = self._segments.pop(n, None)
            if seg is not None:
                seg.close()
        return int(self.request("free", names=list(names))["freed"]) if names else 0

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the store and wait until it has removed every segment it owns."""
        for seg in self._segments.values():
            seg.close()
        self._segments.clear()
        try:
            pid = int(self.request("ping")["pid"])
            self.request("stop")
        except StoreError:
            pid = None
        self.close()
        deadline = time.monotonic() + timeout_s
        while pid is not None and _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.02)  # it removes its segments, then exits

    def close(self) -> None:
        """Disconnect (the store keeps running and keeps the segments)."""
        for seg in self._segments.values():
            seg.close()
        self._segments.clear()
        try:
            self._reader.close()
            self._sock.close()
        except OSError:
            pass


def list_stores(store_dir: Path) -> List[Dict[str, Any]]:
    """Every store found in ``store_dir``: node, pid, whether it answers, segments and bytes held."""
    out = []
    for sock in sorted(Path(store_dir).glob("*.sock")):
        node = sock.stem
        try:
            c = StoreClient(store_dir, node, start=False, start_timeout_s=1.0)
        except StoreError:
            out.append({"node": node, "alive": False})
            continue
        try:
            info = c.request("ping")
        except StoreError:  # stopping right now
            out.append({"node": node, "alive": False})
            continue
        finally:
            c.close()
        out.append({"node": node, "alive": True, "pid": info["pid"], "segments": info["segments"],
                    "bytes": info["bytes"]})
    return out


def stop_store(store_dir: Path, node: str, timeout_s: float = 10.0) -> bool:
    """Stop the store of ``node`` (its segments are removed); False when none was running."""
    try:
        c = StoreClient(store_dir, node, start=False, start_timeout_s=1.0)
    except StoreError:
        return False
    c.stop(timeout_s)
    return True


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False
