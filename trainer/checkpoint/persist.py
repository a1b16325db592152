"""Disk checkpoints in torch.distributed.checkpoint (DCP) format, written atomically.

Layout of ``<dir>``::

    step-00000120/          a complete checkpoint: DCP files, .metadata, tierflow.json
    .tmp-step-00000130/     being written (or abandoned by a crash): never chosen

Note [metadata last]: every rank writes its DCP files into ``.tmp-step-N``; DCP's coordinator
writes ``.metadata`` only after every rank's files are written; then rank 0 writes
``tierflow.json``, fsyncs and renames the directory to ``step-N``. A checkpoint is chosen only
when its name is final *and* both files are there, so a half-written one never is.

The state is a flat dict keyed by parameter *names* (see :mod:`tierflow.trainer.checkpoint._state`), so
it loads at any world size: model and optimizer tensors are replicated under DDP and DCP stores
them once; each rank's RNG state is its own key; a rank without one (a larger world) takes rank
0's. The meta and RNG states are JSON in uint8 tensors (Note [no pickles] in ``_codec``), so DCP
pickles nothing of ours.

Note [verify before parsing]: ``tierflow.json``, written last, is the copy's manifest: the size
and XXH3-64 of every other file. Before anything in a copy is parsed (DCP's ``.metadata`` is a
pickle), :func:`verify_checkpoint` checks that the directory and every file belong to this user
and are not writable by group or others (as ssh treats key files), and that every file matches
the manifest. :func:`newest_verified` skips a copy that fails, with a warning naming the problem,
for the next older one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import xxhash

from tierflow.trainer.checkpoint._codec import decode, encode

__all__ = ["CheckpointCorruptError", "find_checkpoints", "load_checkpoint", "newest_verified", "save_checkpoint",
           "verify_checkpoint"]

MANIFEST = "tierflow.json"


class CheckpointCorruptError(RuntimeError):
    """No persisted copy passed verification (Note [verify before parsing])."""

_NAME = re.compile(r"^step-(\d{8,})$")
META_KEY = "tierflow.meta"


def _rng_key(rank: int) -> str:
    return f"tierflow.rng.rank{rank}"


def find_checkpoints(root: Path) -> List[Tuple[int, Path]]:
    """Complete checkpoints under ``root``, newest first (Note [metadata last])."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _NAME.match(p.name)
        if m and (p / ".metadata").is_file() and (p / MANIFEST).is_file():
            out.append((int(m.group(1)), p))
    return sorted(out, reverse=True)


def save_checkpoint(root: Path, step: int, tensors: Dict[str, torch.Tensor], meta: Dict[str, Any], *, rank: int,
                    world_size: int, group: Optional[dist.ProcessGroup] = None, keep: int = 2,
                    planner: Any = None, file_per_tensor: bool = False) -> Path:
    """Write one DCP checkpoint of ``step`` (collective over ``group`` when ``world_size > 1``).

    Args:
        root: the checkpoint directory (created 0700).
        tensors: this rank's named tensors (views of a host snapshot are fine: DCP copies them).
        meta: the snapshot meta; its ``rng`` is stored under this rank's key, the rest once.
        keep: complete checkpoints to keep; older ones are removed after this one is complete.
        planner: DCP's ``SavePlanner`` (default: DCP's own); the streamed checkpointer's fetches each
            tensor from its tier as it is written.
        file_per_tensor: One file per tensor rather than one per rank: DCP's writer holds every
            tensor of a file until the file is done, so only this keeps one tensor in memory.

    Returns:
        The final directory ``root/step-N``.
    """
    root = Path(root)
    tmp, final = root / f".tmp-step-{step:08d}", root / f"step-{step:08d}"
    distributed = world_size > 1
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Copies abandoned by a crash during persistence (never chosen, Note [metadata last]):
        # one save runs at a time per directory, so every other .tmp-step-* is stale.
        for stale in root.glob(".tmp-step-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(mode=0o700)
    if distributed:
        dist.barrier(group=group)
    shared = {k: v for k, v in meta.items() if k not in ("rng", "layout")}
    state: Dict[str, Any] = _as_shards(tensors, meta.get("shards") or {}, rank, world_size)
    state[META_KEY] = _as_tensor(encode(shared))
    state[_rng_key(rank)] = _as_tensor(encode(meta["rng"]))
    # torch.distributed.checkpoint is imported only when a copy is persisted or loaded.
    from torch.distributed.checkpoint import FileSystemWriter, save

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to save in a single process")
        writer = FileSystemWriter(str(tmp), sync_files=True, single_file_per_rank=not file_per_tensor)
        save(state, storage_writer=writer, process_group=group,
             no_dist=not distributed, planner=planner)
    if distributed:
        dist.barrier(group=group)
    if rank == 0:
        for p in tmp.rglob("*"):
            os.chmod(p, 0o700 if p.is_dir() else 0o600)
        info = {"step": step, "world_size": world_size, "time": time.time(), "format": "torch.distributed.checkpoint",
                "files": {str(p.relative_to(tmp)): _file_digest(p) for p in sorted(tmp.rglob("*")) if p.is_file()}}
        with open(tmp / MANIFEST, "w", opener=lambda p, f: os.open(p, f, 0o600)) as f:
            json.dump(info, f)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        for _, old in find_checkpoints(root)[keep:]:
            shutil.rmtree(old, ignore_errors=True)
    if distributed:
        dist.barrier(group=group)
    return final


def _as_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)


def _file_digest(path: Path) -> Dict[str, Any]:
    h = xxhash.xxh3_64()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
            size += len(chunk)
    return {"bytes": size, "xxh3": h.hexdigest()}


def _loose(path: Path) -> Optional[str]:
    """Why ``path`` must not be trusted (another owner, group/other-writable, a link), or None."""
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        return f"{path} is a symbolic link"
    if st.st_uid != os.geteuid():
        return f"{path} belongs to uid {st.st_uid}, not to you (uid {os.geteuid()})"
    if st.st_mode & 0o022:
        return f"{path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):o}); chmod go-w it"
    return None


def verify_checkpoint(path: Path) -> Optional[str]:
    """Why the persisted copy ``path`` must not be loaded, or None when it verifies
    (Note [verify before parsing]). Reads every file once; parses nothing but the manifest (JSON)."""
    path = Path(path)
    problem = _loose(path)
    if problem:
        return problem
    manifest = path / MANIFEST
    try:
        problem = _loose(manifest)
        if problem:
            return problem
        files = json.loads(manifest.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"its manifest {manifest} is missing or unreadable ({type(exc).__name__}); it was written by an " \
               "older tierflow or damaged"
    present = {str(p.relative_to(path)) for p in path.rglob("*") if p.is_file() and p.name != MANIFEST}
    if not isinstance(files, dict) or present != set(files):
        extra, missing = sorted(present - set(files or {})), sorted(set(files or {}) - present)
        return f"its files differ from its manifest (unlisted: {extra[:3]}, missing: {missing[:3]})"
    for name, want in sorted(files.items()):
        f = path / name
        problem = _loose(f)
        if problem:
            return problem
        if _file_digest(f) != want:
            return f"{f} does not match its manifest (size or XXH3-64 checksum): truncated or changed"
    return None


def newest_verified(root: Path) -> List[Tuple[int, Path]]:
    """``[(step, path)]`` of the newest complete copy under ``root`` that verifies (empty when
    there is none); each newer one that fails is skipped with a warning.

    Raises:
        CheckpointCorruptError: copies exist and none verifies (one line naming each and why).
    """
    tried = []
    for step, path in find_checkpoints(root):
        problem = verify_checkpoint(path)
        if problem is None:
            return [(step, path)]
        warnings.warn(f"skipping the persisted checkpoint {path}: {problem}", stacklevel=2)
        tried.append(f"{path.name} ({problem})")
    if tried:
        raise CheckpointCorruptError(f"no persisted checkpoint under {root} verifies; tried {'; '.join(tried)}. "
                                     "Restore a good copy there, or set checkpoint.restore=none to start afresh")
    return []


def _as_shards(tensors: Dict[str, torch.Tensor], shards: Dict[str, List[int]], rank: int,
               world_size: int) -> Dict[str, Any]:
    """Note [sharded snapshots]: each shard written as a DTensor over a mesh of the ranks, so DCP's
    metadata says which rows of the full tensor it holds and the copy loads at any world size.
    The mesh is only a description here (no process group is set up for it)."""
    if not shards:
        return dict(tensors)
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor, Shard

    mesh = DeviceMesh("cpu", torch.arange(world_size), _init_backend=False, _rank=rank)
    out: Dict[str, Any] = {}
    for key, t in tensors.items():
        shape = shards.get(key)
        if shape is None:
            out[key] = t
            continue
        full = torch.Size(shape)
        out[key] = DTensor.from_local(t, mesh, [Shard(0)], run_check=False, shape=full,
                                      stride=torch.empty(full, device="meta").stride())
    return out


def load_checkpoint(path: Path, rank: int) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """This rank's named tensors and meta (with its RNG) from a checkpoint, at any world size.

    Needs no process group: every rank reads what it needs on its own. Verify it first
    (:func:`verify_checkpoint`): DCP's ``.metadata`` is a pickle.
    """
    # torch.distributed.checkpoint is imported only when a copy is persisted or loaded.
    from torch.distributed.checkpoint import BytesStorageMetadata, FileSystemReader, TensorStorageMetadata, load

    reader = FileSystemReader(str(path))
    metadata = reader.read_metadata()
    rng_key = _rng_key(rank) if _rng_key(rank) in metadata.state_dict_metadata else _rng_key(0)
    state: Dict[str, Any] = {}
    for key, md in metadata.state_dict_metadata.items():
        if isinstance(md, TensorStorageMetadata) and (not key.startswith("tierflow.rng.") or key == rng_key):
            state[key] = torch.empty(md.size, dtype=md.properties.dtype)
        elif isinstance(md, BytesStorageMetadata):
            raise ValueError(f"{path} holds pickled objects ({key}): not a copy this tierflow wrote; "
                             "it is not loaded")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
        load(state, storage_reader=reader, no_dist=True)
    meta = decode(state.pop(META_KEY).numpy().tobytes())
    meta["rng"] = decode(state.pop(rng_key).numpy().tobytes())
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}, meta
