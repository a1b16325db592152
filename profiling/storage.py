"""A trace on disk: one compact, versioned file (``.tftrace``).

Layout::

    b"TFTRACE\\0"                 8 bytes, the magic
    header length                 4 bytes, unsigned little-endian
    header                        JSON (utf-8): format, version, what was traced, enum tables,
                                  and where each array sits in the payload with its dtype
    payload                       zlib-compressed: the column arrays back to back, then the
                                  string table (JSON list); CRC-32 of the compressed bytes is in
                                  the header

The header is readable with ``head -c 2000 trace.tftrace``; arrays load with one ``frombuffer``
each, so a trace of 100k tensors loads in well under a second. Files are written owner-only
(0600), atomically (a temporary file, then rename).
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path
from typing import Any, Dict, List, Tuple, Union

import numpy as np

from tierflow.profiling.trace import Category, LifetimeTrace, Phase, Point, PointKind, TensorRecord, validate_trace

__all__ = ["FORMAT_VERSION", "TraceFileError", "load_trace", "save_trace"]

FORMAT_VERSION = 1
_MAGIC = b"TFTRACE\0"
_FORMAT = "tierflow-lifetime-trace"
_ENUMS = {"category": Category, "point_kind": PointKind, "phase": Phase}


class TraceFileError(ValueError):
    """A trace file is missing, of another format version, or damaged; the message says what to do."""


def _column_arrays(trace: LifetimeTrace) -> Tuple[Dict[str, np.ndarray], List[str], Dict[str, List[str]]]:
    strings: Dict[str, int] = {}

    def sid(s: str) -> int:
        return strings.setdefault(s, len(strings))

    tables = {"dtype": sorted({r.dtype for r in trace.tensors}), "device": sorted({r.device for r in trace.tensors})}
    index = {name: {v: i for i, v in enumerate(values)} for name, values in tables.items()}
    enum_index = {name: {m: i for i, m in enumerate(enum)} for name, enum in _ENUMS.items()}
    pts, recs = trace.points, trace.tensors

    def col(values: Any, dtype: str) -> np.ndarray:
        return np.asarray(list(values), dtype=dtype)

    def opt(v: Any) -> int:
        return -1 if v is None else v

    arrays = {
        "point_kind": col((enum_index["point_kind"][p.kind] for p in pts), "<u1"),
        "point_name": col((sid(p.name) for p in pts), "<i4"),
        "point_call": col((p.call_index for p in pts), "<i4"),
        "point_iteration": col((p.iteration for p in pts), "<i4"),
        "point_phase": col((enum_index["phase"][p.phase] for p in pts), "<u1"),
        "point_compute_s": col((p.compute_s for p in pts), "<f8"),
        "point_tick": col((p.tick for p in pts), "<i8"),
        "tensor_key": col((sid(r.key) for r in recs), "<i4"),
        "tensor_category": col((enum_index["category"][r.category] for r in recs), "<u1"),
        "tensor_size_bytes": col((r.size_bytes for r in recs), "<i8"),
        "tensor_dtype": col((index["dtype"][r.dtype] for r in recs), "<u2"),
        "tensor_device": col((index["device"][r.device] for r in recs), "<u2"),
        "tensor_iteration": col((opt(r.iteration) for r in recs), "<i4"),
        "tensor_created": col((opt(r.created) for r in recs), "<i4"),
        "tensor_freed": col((opt(r.freed) for r in recs), "<i4"),
        "tensor_created_tick": col((r.created_tick for r in recs), "<i8"),
        "tensor_freed_tick": col((opt(r.freed_tick) for r in recs), "<i8"),
        "tensor_num_uses": col((len(r.uses) for r in recs), "<i4"),
        "tensor_uses": col((u for r in recs for u in r.uses), "<i4"),
    }
    return arrays, list(strings), tables


def save_trace(trace: LifetimeTrace, path: Union[str, Path]) -> Path:
    """Write ``trace`` to ``path`` (owner-only, atomically).

    Args:
        trace: The trace; it is validated first.
        path: Destination file, conventionally ``trace.tftrace``; its directory must exist.

    Returns:
        The path written.

    Raises:
        ValueError: the trace is inconsistent (every problem listed), or the directory is missing.
    """
    problems = validate_trace(trace)
    if problems:
        raise ValueError(f"refusing to save an inconsistent trace ({len(problems)} problems): " + "; ".join(problems[:20]))
    path = Path(path)
    if not path.parent.is_dir():
        raise ValueError(f"cannot write {path}: directory {path.parent} does not exist; create it first")
    arrays, strings, tables = _column_arrays(trace)
    layout, chunks, offset = [], [], 0
    for name, arr in arrays.items():
        data = arr.tobytes()
        layout.append({"name": name, "dtype": arr.dtype.str, "count": int(arr.size), "offset": offset})
        chunks.append(data)
        offset += len(data)
    string_bytes = json.dumps(strings, ensure_ascii=False).encode()
    raw = b"".join(chunks) + string_bytes
    payload = zlib.compress(raw, 6)
    header = {
        "format": _FORMAT, "version": FORMAT_VERSION,
        "model": trace.model, "optimizer": trace.optimizer, "device": trace.device,
        "num_iterations": trace.num_iterations, "num_points": len(trace.points), "num_tensors": len(trace.tensors),
        "enums": {name: [m.value for m in enum] for name, enum in _ENUMS.items()}, "tables": tables,
        "arrays": layout, "strings": {"offset": offset, "bytes": len(string_bytes)},
        "payload": {"compression": "zlib", "bytes": len(payload), "raw_bytes": len(raw), "crc32": zlib.crc32(payload)},
    }
    head = json.dumps(header, separators=(",", ":")).encode()
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(_MAGIC + struct.pack("<I", len(head)) + head + payload)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _corrupt(path: Path, what: str) -> TraceFileError:
    return TraceFileError(f"{path} is corrupt ({what}); re-run `tierflow profile` to write a new trace")


def _read_header(path: Path, blob: bytes) -> Tuple[Dict[str, Any], int]:
    if not blob.startswith(_MAGIC):
        raise TraceFileError(f"{path} is not a tierflow trace file (wrong magic bytes); pass a .tftrace file "
                             "written by `tierflow profile` or tierflow.profiling.save_trace")
    if len(blob) < len(_MAGIC) + 4:
        raise _corrupt(path, "truncated header")
    (n,) = struct.unpack_from("<I", blob, len(_MAGIC))
    start = len(_MAGIC) + 4
    if start + n > len(blob):
        raise _corrupt(path, "truncated header")
    try:
        header = json.loads(blob[start:start + n])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise _corrupt(path, "unreadable header") from None
    if not isinstance(header, dict) or header.get("format") != _FORMAT:
        raise _corrupt(path, "header does not describe a lifetime trace")
    version = header.get("version")
    if version != FORMAT_VERSION:
        raise TraceFileError(f"{path} is trace format version {version}; this tierflow reads version "
                             f"{FORMAT_VERSION}: re-run `tierflow profile` to write it in this version, or read it "
                             "with the tierflow that wrote it")
    return header, start + n


def load_trace(path: Union[str, Path]) -> LifetimeTrace:
    """Read a trace written by :func:`save_trace`.

    Args:
        path: The ``.tftrace`` file.

    Returns:
        The trace, equal to the one saved.

    Raises:
        TraceFileError: the file is missing, not a trace, of another format version, or damaged.
    """
    path = Path(path)
    try:
        blob = path.read_bytes()
    except FileNotFoundError:
        raise TraceFileError(f"trace file {path} does not exist; run `tierflow profile` first or pass the path "
                             "of a trace.tftrace file") from None
    except IsADirectoryError:
        raise TraceFileError(f"{path} is a directory; pass the trace file inside it (e.g. {path}/trace.tftrace)") \
            from None
    header, start = _read_header(path, blob)
    try:
        meta = header["payload"]
        payload = blob[start:]
        if len(payload) != meta["bytes"]:
            raise _corrupt(path, f"payload is {len(payload)} bytes, header says {meta['bytes']}: truncated or appended")
        if zlib.crc32(payload) != meta["crc32"]:
            raise _corrupt(path, "checksum mismatch")
        raw = zlib.decompress(payload)
        if len(raw) != meta["raw_bytes"]:
            raise _corrupt(path, "decompressed size differs from the header")
        arrays = {}
        for spec in header["arrays"]:
            dtype = np.dtype(spec["dtype"])
            end = spec["offset"] + spec["count"] * dtype.itemsize
            if end > header["strings"]["offset"]:
                raise _corrupt(path, f"array {spec['name']} runs past the array section")
            arrays[spec["name"]] = np.frombuffer(raw, dtype=dtype, count=spec["count"], offset=spec["offset"])
        s = header["strings"]
        strings = json.loads(raw[s["offset"]:s["offset"] + s["bytes"]])
        return _build(header, arrays, strings)
    except TraceFileError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, zlib.error) as exc:
        raise _corrupt(path, f"{type(exc).__name__}: {exc}") from None


def _lookup(table: List[Any], index: np.ndarray) -> List[Any]:
    """``[table[i] for i in index]`` at numpy speed (an index out of range raises IndexError)."""
    values = np.empty(len(table), dtype=object)
    values[:] = table
    return values[index].tolist()


def _optional(arr: np.ndarray) -> List[Any]:
    """Values with -1 read back as None."""
    out = arr.astype(object)
    out[arr < 0] = None
    return out.tolist()


def _build(header: Dict[str, Any], a: Dict[str, np.ndarray], strings: List[str]) -> LifetimeTrace:
    enums = {name: [enum(v) for v in header["enums"][name]] for name, enum in _ENUMS.items()}
    points = tuple(map(Point, _lookup(enums["point_kind"], a["point_kind"]), _lookup(strings, a["point_name"]),
                       a["point_call"].tolist(), a["point_iteration"].tolist(),
                       _lookup(enums["phase"], a["point_phase"]), a["point_compute_s"].tolist(),
                       a["point_tick"].tolist()))
    counts = a["tensor_num_uses"]
    if int(counts.sum()) != a["tensor_uses"].size or (counts < 0).any():
        raise ValueError("use counts do not match the uses array")
    flat = tuple(a["tensor_uses"].tolist())  # slicing a tuple yields tuples: no per-record conversion
    offsets = np.concatenate([[0], np.cumsum(counts)]).tolist()
    uses = [flat[lo:hi] for lo, hi in zip(offsets[:-1], offsets[1:])]
    tables = header["tables"]
    tensors = tuple(map(
        TensorRecord, _lookup(strings, a["tensor_key"]), _lookup(enums["category"], a["tensor_category"]),
        a["tensor_size_bytes"].tolist(), _lookup(tables["dtype"], a["tensor_dtype"]),
        _lookup(tables["device"], a["tensor_device"]), _optional(a["tensor_iteration"]),
        _optional(a["tensor_created"]), _optional(a["tensor_freed"]), uses, a["tensor_created_tick"].tolist(),
        _optional(a["tensor_freed_tick"])))
    if len(points) != header["num_points"] or len(tensors) != header["num_tensors"]:
        raise ValueError("point or tensor count differs from the header")
    return LifetimeTrace(points=points, tensors=tensors, num_iterations=header["num_iterations"],
                         model=header["model"], optimizer=header["optimizer"], device=header["device"])
