"""The per-node snapshot store: a small long-lived process that owns shared-memory segments.

Run as a script (``python _daemon.py --dir D --node N --prefix P``), never imported by the
trainer, so it starts in a fraction of a second and needs nothing but the standard library. The
trainer starts it on demand, detached in its own session, so a trainer killed with SIGKILL, or
torchrun tearing down its worker group, leaves it and its segments alone.

What it owns: every file in ``/dev/shm`` whose name starts with its prefix (user id, store
directory hash, node id). Segments are created 0600 and adopted again by a restarted store, so
even a crashed store loses nothing while the node is up. Trainers map the segments and write
into them directly; the store only names, sizes, lists and frees them. It exits, removing its
segments, on ``stop``, on SIGTERM/SIGINT, or after ``--idle-timeout`` seconds with no client
connected.

Protocol: one JSON object per line over the Unix socket ``D/N.sock`` (the directory is 0700),
answered by one JSON line: ``{"ok": true, ...}`` or ``{"ok": false, "error": "..."}``.
Requests: ``ping``, ``alloc {name, size}``, ``list``, ``free {names}``, ``stop``.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import signal
import socketserver
import sys
import threading
import time

SHM_DIR = "/dev/shm"


class _Store:
    def __init__(self, prefix: str, shm_dir: str) -> None:
        self.prefix, self.shm_dir = prefix, shm_dir
        self.lock = threading.Lock()
        self.clients = 0
        self.last_activity = time.monotonic()

    def names(self) -> list:
        return sorted(n for n in os.listdir(self.shm_dir) if n.startswith(self.prefix))

    def _path(self, name: str) -> str:
        if not isinstance(name, str) or not name.startswith(self.prefix) or "/" in name or len(name) > 250:
            raise ValueError(f"segment name {name!r} is not one of this store's (prefix {self.prefix})")
        return os.path.join(self.shm_dir, name)

    def alloc(self, name: str, size: int) -> str:
        path = self._path(name)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            st = os.fstat(fd)
            if st.st_uid != os.getuid():
                raise PermissionError(f"{path} belongs to uid {st.st_uid}, not to this store's owner")
            if st.st_mode & 0o077:  # others could have written it: its bytes are not ours to trust
                raise PermissionError(f"{path} has mode {st.st_mode & 0o777:o}; segments are 600. Remove it")
            if st.st_size < size:
                os.ftruncate(fd, int(size))  # growing keeps the bytes already there
        finally:
            os.close(fd)
        return path

    def free(self, names: list) -> int:
        n = 0
        for name in names:
            try:
                os.unlink(self._path(name))
                n += 1
            except FileNotFoundError:
                pass
        return n

    def total_bytes(self) -> int:
        total = 0
        for name in self.names():
            try:
                total += os.stat(os.path.join(self.shm_dir, name)).st_size
            except FileNotFoundError:
                pass
        return total


def _serve(args: argparse.Namespace) -> int:
    os.umask(0o077)
    lock = open(os.path.join(args.dir, f"{args.node}.lock"), "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return 0  # another store already serves this node: nothing to do
    store = _Store(args.prefix, args.shm_dir)
    sock_path = os.path.join(args.dir, f"{args.node}.sock")
    pid_path = os.path.join(args.dir, f"{args.node}.pid")
    if os.path.exists(sock_path):
        os.unlink(sock_path)  # left by a store that died; we hold the lock, so it is stale
    stopping = threading.Event()

    class Handler(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            with store.lock:
                store.clients += 1
            try:
                for line in self.rfile:
                    reply = _dispatch(store, line, stopping)
                    self.wfile.write((json.dumps(reply) + "\n").encode())
                    self.wfile.flush()
                    if stopping.is_set():
                        break
            except (ConnectionError, OSError):
                pass
            finally:
                with store.lock:
                    store.clients -= 1
                    store.last_activity = time.monotonic()
            if stopping.is_set():
                threading.Thread(target=server.shutdown, daemon=True).start()

    class Server(socketserver.ThreadingUnixStreamServer):
        daemon_threads = True

    server = Server(sock_path, Handler)
    os.chmod(sock_path, 0o600)
    with open(pid_path, "w") as f:
        f.write(str(os.getpid()))

    def on_signal(signum, frame) -> None:
        stopping.set()
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    def watchdog() -> None:
        while not stopping.wait(0.5):
            with store.lock:
                idle = store.clients == 0 and time.monotonic() - store.last_activity > args.idle_timeout
            if idle:
                stopping.set()
                server.shutdown()

    threading.Thread(target=watchdog, daemon=True).start()
    print(f"tierflow snapshot store for node {args.node}: pid {os.getpid()}, socket {sock_path}, "
          f"{len(store.names())} segment(s) adopted", flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        freed = store.free(store.names())
        for path in (sock_path, pid_path):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        print(f"tierflow snapshot store for node {args.node}: stopped, {freed} segment(s) removed", flush=True)
    return 0


def _dispatch(store: _Store, line: bytes, stopping: threading.Event) -> dict:
    try:
        req = json.loads(line)
        op = req.get("op")
        with store.lock:
            store.last_activity = time.monotonic()
        if op == "ping":
            return {"ok": True, "pid": os.getpid(), "segments": len(store.names()), "bytes": store.total_bytes()}
        if op == "alloc":
            return {"ok": True, "path": store.alloc(req["name"], int(req["size"]))}
        if op == "list":
            return {"ok": True, "names": store.names()}
        if op == "free":
            return {"ok": True, "freed": store.free(list(req["names"]))}
        if op == "stop":
            stopping.set()
            return {"ok": True, "pid": os.getpid()}
        return {"ok": False, "error": f"unknown request {op!r}"}
    except Exception as exc:  # report every failure to the client instead of dying
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", required=True, help="owner-only runtime directory holding the socket")
    p.add_argument("--node", required=True, help="node id this store serves")
    p.add_argument("--prefix", required=True, help="name prefix of the /dev/shm segments it owns")
    p.add_argument("--idle-timeout", type=float, default=600.0, help="seconds without clients before exiting")
    p.add_argument("--shm-dir", default=SHM_DIR)
    p.add_argument("--detach", action="store_true", help="fork once more so the store is nobody's child")
    args = p.parse_args(argv)
    if args.detach and os.fork() > 0:
        os._exit(0)  # the starter reaps us at once; the store is adopted by init, never a zombie
    return _serve(args)


if __name__ == "__main__":
    sys.exit(main())
