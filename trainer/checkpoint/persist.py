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
0's.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

__all__ = ["find_checkpoints", "load_checkpoint", "save_checkpoint"]

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
        if m and (p / ".metadata").is_file() and (p / "tierflow.json").is_file():
            out.append((int(m.group(1)), p))
    return sorted(out, reverse=True)


def save_checkpoint(root: Path, step: int, tensors: Dict[str, torch.Tensor], meta: Dict[str, Any], *, rank: int,
                    world_size: int, group: Optional[dist.ProcessGroup] = None, keep: int = 2) -> Path:
    """Write one DCP checkpoint of ``step`` (collective over ``group`` when ``world_size > 1``).

    Args:
        root: the checkpoint directory (created 0700).
        tensors: this rank's named tensors (views of a host snapshot are fine: DCP copies them).
        meta: the snapshot meta; its ``rng`` is stored under this rank's key, the rest once.
        keep: complete checkpoints to keep; older ones are removed after this one is complete.

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
    state: Dict[str, Any] = dict(tensors)
    state[META_KEY] = pickle.dumps(shared)
    state[_rng_key(rank)] = pickle.dumps(meta["rng"])
    # torch.distributed.checkpoint is imported only when a copy is persisted or loaded.
    from torch.distributed.checkpoint import FileSystemWriter, save

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to save in a single process")
        save(state, storage_writer=FileSystemWriter(str(tmp), sync_files=True), process_group=group,
             no_dist=not distributed)
    if distributed:
        dist.barrier(group=group)
    if rank == 0:
        for p in tmp.rglob("*"):
            os.chmod(p, 0o700 if p.is_dir() else 0o600)
        info = {"step": step, "world_size": world_size, "time": time.time(), "format": "torch.distributed.checkpoint"}
        with open(tmp / "tierflow.json", "w", opener=lambda p, f: os.open(p, f, 0o600)) as f:
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


def load_checkpoint(path: Path, rank: int) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """This rank's named tensors and meta (with its RNG) from a checkpoint, at any world size.

    Needs no process group: every rank reads what it needs on its own.
    """
    # torch.distributed.checkpoint is imported only when a copy is persisted or loaded.
    from torch.distributed.checkpoint import BytesStorageMetadata, FileSystemReader, TensorStorageMetadata, load

    reader = FileSystemReader(str(path))
    metadata = reader.read_metadata()
    rng_key = _rng_key(rank) if _rng_key(rank) in metadata.state_dict_metadata else _rng_key(0)
    state: Dict[str, Any] = {}
    for key, md in metadata.state_dict_metadata.items():
        if isinstance(md, TensorStorageMetadata):
            state[key] = torch.empty(md.size, dtype=md.properties.dtype)
        elif isinstance(md, BytesStorageMetadata) and key in (META_KEY, rng_key):
            state[key] = b""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
        load(state, storage_reader=reader, no_dist=True)
    meta = pickle.loads(state.pop(META_KEY))
    meta["rng"] = pickle.loads(state.pop(rng_key))
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}, meta
