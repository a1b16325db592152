"""Weight sources for :func:`~tierflow.offload.runtime.materialize.materialize`, read one tensor at a time.

:class:`DcpSource` reads a ``torch.distributed.checkpoint`` directory (tierflow's own persisted
copies among them) with one partial ``load`` per tensor.

:class:`SafetensorsSource` reads a Hugging Face-format directory (``model.safetensors``, or shards
listed in ``model.safetensors.index.json``). Each tensor is read with ``pread`` from the byte range
the file's header gives, into a tensor of its own: nothing maps the file, so the process's resident
memory grows by one tensor, not by the shard (a mapped shard's touched pages count towards peak
RSS until it is unmapped). Every header is validated before any byte is used, and a problem names
the file and the tensor.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Set, Union

import torch

from tierflow.offload.runtime.materialize import MaterializeError, WeightSource

__all__ = ["DcpSource", "SafetensorsSource"]

#: safetensors dtype names (the format's spec) -> torch dtypes.
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_MAX_HEADER_BYTES = 100 << 20  # the format's own limit


@dataclass(frozen=True)
class _Entry:
    path: Path
    dtype: torch.dtype
    shape: tuple
    start: int  # absolute file offset of the first byte
    nbytes: int


def _read_header(path: Path) -> Dict[str, _Entry]:
    """Parse and check one ``.safetensors`` header (8-byte little-endian length, then JSON)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise MaterializeError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
            n = int.from_bytes(raw, "little")
            if n <= 0 or n > _MAX_HEADER_BYTES or 8 + n > size:
                raise MaterializeError(f"{path}: corrupt safetensors header length {n} (file has {size} bytes)")
            header = json.loads(f.read(n).decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MaterializeError(f"{path}: cannot read its safetensors header ({exc}); re-save the checkpoint") from None
    if not isinstance(header, dict):
        raise MaterializeError(f"{path}: the safetensors header is not a JSON object")
    base = 8 + n
    out: Dict[str, _Entry] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise MaterializeError(f"{path}: tensor {name!r} has a malformed header entry {info!r}") from None
        numel = 1
        for d in shape:
            numel *= d
        nbytes = numel * dtype.itemsize
        if begin < 0 or end - begin != nbytes or base + end > size:
            raise MaterializeError(f"{path}: tensor {name!r} claims bytes {begin}..{end} for {nbytes} bytes of "
                                   f"{tuple(shape)} {info['dtype']} in a {size}-byte file; the file is truncated or corrupt")
        out[name] = _Entry(path, dtype, shape, base + begin, nbytes)
    return out


class SafetensorsSource(WeightSource):
    """The tensors of a Hugging Face-format directory (or one ``.safetensors`` file), read lazily.

    Args:
        path: A directory with ``model.safetensors`` or ``model.safetensors.index.json`` plus its
            shards, or a single ``.safetensors`` file.
        prefix: Prepended to every name in the files (the model's state-dict names may sit under a
            wrapper, e.g. ``"lm."``).

    Raises:
        MaterializeError: no safetensors file, a missing shard, or a corrupt header.

    Example:
        >>> src = SafetensorsSource("/models/llama-1b")  # doctest: +SKIP
        >>> materialize(model, program, source=src)  # doctest: +SKIP
    """

    def __init__(self, path: Union[str, Path], prefix: str = "") -> None:
        path = Path(path).expanduser()
        if path.is_file():
            files = [path]
        elif (path / "model.safetensors.index.json").is_file():
            try:
                index = json.loads((path / "model.safetensors.index.json").read_text())
                files = sorted({path / shard for shard in index["weight_map"].values()})
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                raise MaterializeError(f"{path / 'model.safetensors.index.json'}: not a valid index ({exc})") from None
        elif (path / "model.safetensors").is_file():
            files = [path / "model.safetensors"]
        else:
            raise MaterializeError(f"{path} holds no model.safetensors nor model.safetensors.index.json; "
                                   "save the model with save_pretrained(..., safe_serialization=True)")
        for f in files:
            if not f.is_file():
                raise MaterializeError(f"{f} is listed in the index but missing; copy every shard of the checkpoint")
        self._entries: Dict[str, _Entry] = {}
        for f in files:
            for name, entry in _read_header(f).items():
                self._entries[prefix + name] = entry

    def names(self) -> Set[str]:
        return set(self._entries)

    def nbytes(self) -> int:
        """Bytes of every tensor in the source."""
        return sum(e.nbytes for e in self._entries.values())

    def read(self, name: str, like: torch.Tensor) -> torch.Tensor:
        e = self._entries[name]
        out = torch.empty(e.shape, dtype=e.dtype)
        view = memoryview(out.view(-1).view(torch.uint8).numpy()) if e.nbytes else memoryview(b"")
        fd = os.open(e.path, os.O_RDONLY)
        try:
            done = 0
            while done < e.nbytes:
                got = os.preadv(fd, [view[done:]], e.start + done)
                if got <= 0:
                    raise MaterializeError(f"{e.path}: tensor {name!r} ends early (read {done} of {e.nbytes} bytes)")
                done += got
        finally:
            os.close(fd)
        if like.dtype != e.dtype and torch.promote_types(e.dtype, like.dtype) == like.dtype:
            out = out.to(like.dtype)  # a bf16 checkpoint into an fp32 model: widening is exact
        return out


class DcpSource(WeightSource):
    """The tensors of a ``torch.distributed.checkpoint`` directory, loaded one at a time.

    A tierflow checkpoint (``checkpoint.dir/step-N``) keys the model's tensors as ``model.<name>``:
    pass ``prefix="model."`` to read them under the model's own names. DCP's ``.metadata`` is a
    pickle, so open only checkpoints you wrote yourself.

    Args:
        path: The checkpoint directory (holding ``.metadata``).
        prefix: Keys starting with it are offered without it; other keys are not offered.

    Raises:
        MaterializeError: no readable ``.metadata``.
    """

    def __init__(self, path: Union[str, Path], prefix: str = "") -> None:
        # torch.distributed.checkpoint is imported only when a checkpoint is read.
        from torch.distributed.checkpoint import FileSystemReader, TensorStorageMetadata

        self._path = Path(path).expanduser()
        if not (self._path / ".metadata").is_file():
            raise MaterializeError(f"{self._path} is not a torch.distributed.checkpoint directory (no .metadata)")
        try:
            self._reader = _cached_reader(FileSystemReader, self._path)
            metadata = self._reader.read_metadata()
        except Exception as exc:  # a truncated or foreign pickle raises anything
            raise MaterializeError(f"{self._path / '.metadata'} cannot be read ({type(exc).__name__}: {exc})") from None
        self._keys: Dict[str, str] = {}
        self._meta: Dict[str, tuple] = {}
        for key, md in metadata.state_dict_metadata.items():
            if isinstance(md, TensorStorageMetadata) and key.startswith(prefix):
                self._keys[key[len(prefix):]] = key
                self._meta[key[len(prefix):]] = (tuple(md.size), md.properties.dtype)

    def names(self) -> Set[str]:
        return set(self._keys)

    def nbytes(self) -> int:
        """Bytes of every tensor offered."""
        return sum(int(torch.Size(shape).numel()) * dtype.itemsize for shape, dtype in self._meta.values())

    def read(self, name: str, like: torch.Tensor) -> torch.Tensor:
        from torch.distributed.checkpoint import load

        shape, dtype = self._meta[name]
        out = torch.empty(shape, dtype=dtype)
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
                load({self._keys[name]: out}, storage_reader=self._reader, no_dist=True)
        except Exception as exc:
            raise MaterializeError(f"{self._path}: tensor {name!r} cannot be read ({type(exc).__name__}: {exc}); "
                                   "the checkpoint is incomplete or corrupt") from None
        if like.dtype != dtype and torch.promote_types(dtype, like.dtype) == like.dtype:
            out = out.to(like.dtype)
        return out


def _cached_reader(base: type, path: Path):
    """A ``FileSystemReader`` that unpickles ``.metadata`` once: every partial ``load`` asks for it,
    and a checkpoint of N tensors would otherwise read it N times."""

    class _Reader(base):  # type: ignore[misc, valid-type]
        _metadata = None

        def read_metadata(self):
            if self._metadata is None:
                self._metadata = super().read_metadata()
            return self._metadata

    return _Reader(str(path))
