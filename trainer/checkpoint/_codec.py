"""The small rest of a training state (step, hyperparameters, scheduler, RNG states) as JSON, never pickle.

Snapshots in shared memory and persisted checkpoints carry this next to their tensors. Reading
it must not be able to run code, whoever wrote the bytes (Note [no pickles]): ``json.loads``
builds only dicts, lists, strings and numbers, and the tags below rebuild only tuples, bytes,
numpy arrays, CPU tensors and non-finite floats from them. A value of any other type is refused
when it is written, with its path in the state, so nothing is silently dropped.

Note [no pickles]: a crafted snapshot segment or ``tierflow`` metadata ran a shell command when it
was unpickled (the fault-injection issue). tierflow's own files hold JSON and raw tensor bytes
only; DCP's ``.metadata`` (a pickle written by torch) is read only after the copy's owner, mode
and manifest have been checked (:mod:`tierflow.trainer.checkpoint.persist`).
"""

from __future__ import annotations

import base64
import json
import math
from typing import Any

import numpy as np
import torch

__all__ = ["decode", "encode"]


def encode(value: Any) -> bytes:
    """``value`` as UTF-8 JSON bytes.

    Raises:
        TypeError: a value that is not None, bool, int, float, str, bytes, list, tuple, dict,
            a numpy array or scalar, or a tensor; the message names where it is.
    """
    return json.dumps(_to_json(value, "state"), separators=(",", ":"), allow_nan=False).encode()


def decode(data: bytes) -> Any:
    """The value :func:`encode` wrote.

    Raises:
        ValueError: the bytes are not such a value (corrupt or foreign).
    """
    try:
        return _from_json(json.loads(bytes(data).decode()))
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"the state's metadata is not tierflow's JSON ({type(exc).__name__}: {exc})") from None


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _to_json(v: Any, where: str) -> Any:
    if v is None or isinstance(v, (bool, str)):
        return v
    if isinstance(v, int):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else {"float": repr(v)}
    if isinstance(v, list):
        return [_to_json(x, f"{where}[{i}]") for i, x in enumerate(v)]
    if isinstance(v, tuple):
        return {"tuple": [_to_json(x, f"{where}[{i}]") for i, x in enumerate(v)]}
    if isinstance(v, dict):
        return {"dict": [[_to_json(k, f"{where} key"), _to_json(x, f"{where}[{k!r}]")] for k, x in v.items()]}
    if isinstance(v, (bytes, bytearray)):
        return {"bytes": _b64(bytes(v))}
    if isinstance(v, np.ndarray):
        return {"ndarray": [v.dtype.str, list(v.shape), _b64(np.ascontiguousarray(v).tobytes())]}
    if isinstance(v, np.generic):
        return _to_json(v.item(), where)
    if isinstance(v, torch.Tensor):
        t = v.detach().cpu().contiguous()
        return {"tensor": [str(t.dtype).removeprefix("torch."), list(t.shape),
                           _b64(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")]}
    raise TypeError(f"{where} is a {type(v).__name__}, which a checkpoint's metadata cannot hold (JSON types, "
                    "bytes, numpy arrays and tensors only)")


def _from_json(v: Any) -> Any:
    if isinstance(v, list):
        return [_from_json(x) for x in v]
    if not isinstance(v, dict):
        return v
    (tag, body), = v.items()
    if tag == "tuple":
        return tuple(_from_json(x) for x in body)
    if tag == "dict":
        return {_from_json(k): _from_json(x) for k, x in body}
    if tag == "float":
        if body not in ("inf", "-inf", "nan"):
            raise ValueError(f"bad float {body!r}")
        return float(body)
    if tag == "bytes":
        return base64.b64decode(body, validate=True)
    if tag == "ndarray":
        dtype, shape, raw = body
        return np.frombuffer(base64.b64decode(raw, validate=True), dtype=np.dtype(dtype)).reshape(shape).copy()
    if tag == "tensor":
        dtype, shape, raw = body
        dt = getattr(torch, dtype)
        if not isinstance(dt, torch.dtype):
            raise ValueError(f"bad dtype {dtype!r}")
        data = bytearray(base64.b64decode(raw, validate=True))
        flat = torch.frombuffer(data, dtype=dt) if data else torch.empty(0, dtype=dt)
        return flat.reshape(shape).clone()
    raise ValueError(f"unknown tag {tag!r}")
