"""Note [hidden collective buffers]: memory a CPU collective holds that no operation shows.

gloo, the process group of CPU tensors, does not gather or scatter in place. An all-gather copies
into a flat buffer the size of its output and copies that into the output at the end; a
reduce-scatter copies its whole input first. Both buffers are allocated and freed in C++ on
gloo's own thread, so no dispatch mode sees them, yet they are resident memory while the
collective runs (measured on 2 ranks: an all-gather of a 200 MiB output raised the peak RSS by
202 MiB, a reduce-scatter of a 200 MiB input by 202 MiB; an all-reduce, a broadcast and an
all-to-all by nothing). Under FSDP2 every block's gather and every block's gradient
reduce-scatter is one such collective, so a rank held one block's full parameters or gradients
more than the runtime counted: on a 6-layer GPT of width 2048 (a 200 MiB block) a rank under a
1 GiB budget peaked 326 MiB above it, in RSS, while its computed peak read 1,018 MiB.

The tracer and the online policy count such a buffer as a temporary of that size, made by the
collective and freed at the next operation that touches the collective's output: a collective may
run asynchronously (FSDP2 prefetches the next block's gather during this block's backward), and
whatever reads its output waits for it first (FSDP2's copy-out after its wait, a functional
collective's ``wait_tensor``). So the plan leaves room for it and the figures include it. CUDA
tensors (NCCL, in place) have none.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from tierflow.profiling._table import RecordTable
from tierflow.profiling._tensors import flat_tensors

__all__ = ["COLLECTIVE_NAMESPACES", "HiddenBuffers", "hidden_buffer_bytes", "hidden_buffer_ends"]

#: Namespaces of the process-group operations a dispatch mode sees (``dist.*`` and functional).
COLLECTIVE_NAMESPACES = frozenset({"c10d", "_c10d_functional"})


def _kind(func: Any) -> str:
    """``"gather"``, ``"scatter"`` or ``""`` for an operation of :data:`COLLECTIVE_NAMESPACES`."""
    name = func._schema.name.rpartition("::")[2]
    if "all_gather" in name or "allgather" in name:
        return "gather"
    if "reduce_scatter" in name:
        return "scatter"
    return ""


def _cpu_bytes(tensors: Sequence[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t.device.type == "cpu")


def hidden_buffer_bytes(func: Any, args: Sequence[Any]) -> int:
    """Bytes of the buffer a CPU collective allocates out of sight (0 for any other operation).

    Known before the operation runs, so room can be made for it first: an all-gather's output
    (``c10d`` ops take it as their first argument; a functional one is its input times the group
    size), a reduce-scatter's input (``c10d``: the second argument; functional: the first).
    """
    if func.namespace not in COLLECTIVE_NAMESPACES:
        return 0
    kind = _kind(func)
    if not kind or not args:
        return 0
    if func.namespace == "c10d":
        return _cpu_bytes(flat_tensors(args[0] if kind == "gather" else args[1], []))
    size = _cpu_bytes(flat_tensors(args[0], []))
    group_size = args[1] if kind == "gather" and len(args) > 1 and isinstance(args[1], int) else 1
    return size * group_size


def hidden_buffer_ends(func: Any, args: Sequence[Any], out: Any) -> List[torch.UntypedStorage]:
    """The storages whose next use frees the hidden buffer: the collective's outputs."""
    outputs = flat_tensors(args[0], []) if func.namespace == "c10d" else flat_tensors(out, [])
    return [t.untyped_storage() for t in outputs if t.device.type == "cpu"]


class HiddenBuffers:
    """The tracer's open hidden buffers: each a row of ``table`` until its collective's output is used."""

    def __init__(self, table: RecordTable) -> None:
        self.table = table
        self.rows: Dict[int, int] = {}  # id(output storage) -> row; a plain dict, tested on the hot path

    def made(self, func: Any, args: Sequence[Any], out: Any, new_key: Callable[[], str],
             iteration: Optional[int]) -> None:
        """After a collective ran: a row for its hidden buffer, if it has one."""
        nbytes = hidden_buffer_bytes(func, args)
        if nbytes:
            row = self.table.hidden(nbytes, torch.device("cpu"), new_key(), iteration=iteration)
            for st in hidden_buffer_ends(func, args, out):
                self.rows[id(st)] = row

    def used(self, storage: torch.UntypedStorage) -> None:
        """An operation reads ``storage``: the buffer of a collective that wrote it is gone."""
        row = self.rows.pop(id(storage), None)
        if row is not None and self.table.freed[row] is None:
            self.table.end(row)

    def end_all(self) -> None:
        """The iteration ends: every collective of it was waited for."""
        for row in set(self.rows.values()):
            if self.table.freed[row] is None:
                self.table.end(row)
        self.rows.clear()
