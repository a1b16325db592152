"""The tracer's mutable record table: one row per tensor storage, appended in the dispatch hot path.

Columnar lists (not objects) because a traced iteration of a large model appends hundreds of
thousands of rows and every microsecond per operation shows up in the traced step time. The
table is the only place that holds references (weak ones) to live storages; :meth:`close` drops
them all, after which no callback of ours can run again.
"""

from __future__ import annotations

import weakref
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn

from tierflow.profiling._tensors import held_storage, storage_of
from tierflow.profiling.keys import StorageMap
from tierflow.profiling.trace import Category, TensorRecord, grad_key, state_key

__all__ = ["RecordTable", "ShrinkWatch", "StepKeys", "register_existing"]


# Note [allocations no operation shows]: almost anything allocated inside an iteration is seen when
# it is allocated, so the tracer takes a storage it has not seen as made before the iteration
# began. Not everything, though: under FSDP2 the gloo process group copies each reduce-scatter
# input in C++ and splits the copy, a block's full gradients never seen allocated. Taken as inputs
# alive since the iteration began, these copies put 42 MB of phantom memory under every interval
# of a 6-block ``small`` model. What the data pipeline made is consumed in forward; a storage first
# seen in backward is taken as allocated there.
#
# Note [what the optimizer holds]: an optimizer may keep memory between steps that is not in its
# ``state``: the tiered optimizer's staging buffers, its step counters (replaced every step), a
# learning rate held as a tensor. Its first step under tracing reads that memory first, so
# iteration 0 took it as inputs made at its start, while every later iteration, which knows it
# already, found leftovers of the iteration before: every run with the tiered optimizer next to
# the runtime warned that its profiled iterations differ. A storage first read inside the step is
# therefore recorded as existing before tracing (:meth:`RecordTable.hold`), as the parameters and
# the state are; the check that iterations repeat leaves such memory out (its pattern is the
# optimizer's, not the graph's), and the plan counts whatever of it is alive, never moving it.
#
# Note [temporaries of the step]: a temporary's key is the label of the point before it plus an
# ordinal, so two temporaries born in one interval in the other order swap keys. The tiered
# optimizer's step is one interval that walks its sub-groups in alternating order (Note [staging
# cache]), so every other step made its scratch and step counters in another order: the runs
# warned that their profiled iterations differ, and the planner, which reserves room for a key
# whose size changes (a dynamic shape), reserved the largest of the swapped sizes for each. A
# temporary made inside ``optimizer.step()`` is therefore keyed by its size, dtype and how many
# of that kind came before it in the step, which no order of sub-groups of equal sizes changes;
# and the check that iterations repeat compares the temporaries born in one interval as a set
# (same sizes, lifetimes and uses, in any order), since even within one size the step's counters
# that it keeps and those it drops at once come in the sub-groups' order.


class StepKeys:
    """Keys of the temporaries of one iteration's optimizer step (Note [temporaries of the step])."""

    def __init__(self) -> None:
        self._seen: Dict[Tuple[int, torch.dtype], int] = {}

    def __call__(self, label: str, storage: torch.UntypedStorage, tensor: torch.Tensor) -> str:
        kind = (storage.nbytes(), tensor.dtype)
        n = self._seen[kind] = self._seen.get(kind, -1) + 1
        return f"{label}:tmp{kind[0]}B{str(tensor.dtype).removeprefix('torch.')}#{n}"


class _StorageRef(weakref.ref):
    """A weak reference that remembers which row its storage owns (the free callback needs it)."""

    __slots__ = ("row", "sid")


class RecordTable:
    """Rows of tensor storages seen while tracing; frees are recorded by weakref callbacks.

    ``point`` and ``tick`` are the clock the tracer advances: every allocation, free and point
    takes the next tick (see Note [ticks] in :mod:`tierflow.profiling.trace`).
    """

    def __init__(self) -> None:
        self.key: List[str] = []
        self.category: List[Category] = []
        self.size_bytes: List[int] = []
        self.dtype: List[str] = []
        self.device: List[str] = []
        self.iteration: List[Optional[int]] = []
        self.created: List[Optional[int]] = []
        self.freed: List[Optional[int]] = []
        self.uses: List[List[int]] = []
        self.created_tick: List[int] = []
        self.freed_tick: List[Optional[int]] = []
        self._live: Dict[int, _StorageRef] = {}
        self.point = -1  # index of the last point emitted
        self.tick = 0
        self.closed = False

    def __len__(self) -> int:
        return len(self.key)

    def row_of(self, storage: torch.UntypedStorage) -> Optional[int]:
        """The row of a live storage, or None when the table has never seen it."""
        ref = self._live.get(id(storage))
        return None if ref is None else ref.row

    def add(self, storage: torch.UntypedStorage, tensor: torch.Tensor, category: Category, key: str, *,
            iteration: Optional[int], created: Optional[int], created_tick: int, nbytes: Optional[int] = None) -> int:
        """Start tracking ``storage`` (of ``nbytes`` on the device, default its size now); returns its row."""
        row = self._append(key, category, storage.nbytes() if nbytes is None else nbytes, tensor.dtype, tensor.device,
                           iteration=iteration, created=created, created_tick=created_tick)
        ref = _StorageRef(storage, self._on_free)
        ref.row, ref.sid = row, id(storage)
        self._live[ref.sid] = ref
        return row

    def hidden(self, nbytes: int, device: torch.device, key: str, *, iteration: Optional[int]) -> int:
        """A temporary of ``nbytes`` with no storage to watch, made now (Note [hidden collective
        buffers]); :meth:`end` records it freed. Returns its row."""
        return self._append(key, Category.TEMPORARY, nbytes, torch.uint8, device, iteration=iteration,
                            created=self.point, created_tick=self.next_tick())

    def end(self, row: int) -> None:
        """Record ``row`` freed now (a :meth:`hidden` one, or one whose storage died or shrank)."""
        self.tick += 1
        self.freed[row] = self.point
        self.freed_tick[row] = self.tick

    def _append(self, key: str, category: Category, nbytes: int, dtype: torch.dtype, device: torch.device, *,
                iteration: Optional[int], created: Optional[int], created_tick: int) -> int:
        row = len(self.key)
        self.key.append(key)
        self.category.append(category)
        self.size_bytes.append(nbytes)
        self.dtype.append(str(dtype).removeprefix("torch."))
        self.device.append(str(device))
        self.iteration.append(iteration)
        self.created.append(created)
        self.freed.append(None)
        self.uses.append([])
        self.created_tick.append(created_tick)
        self.freed_tick.append(None)
        return row

    def next_tick(self) -> int:
        self.tick += 1
        return self.tick

    def use(self, row: int) -> None:
        uses = self.uses[row]
        # Points only grow, so comparing with the last entry keeps the list sorted and distinct.
        if not uses or uses[-1] != self.point:
            uses.append(self.point)

    def reclassify(self, row: int, category: Category, key: str) -> None:
        self.category[row] = category
        self.key[row] = key

    def hold(self, rows: Iterable[int]) -> None:
        """Take ``rows``, which the optimizer step read first, as memory that existed before tracing
        (Note [what the optimizer holds])."""
        for row in rows:
            self.key[row] = f"held{self.iteration[row]}:{self.key[row]}"
            self.iteration[row], self.created[row], self.created_tick[row] = None, None, -1

    def release(self, row: int, storage: torch.UntypedStorage) -> None:
        """Record ``row`` freed now although its storage lives on, shrunk to nothing (Note
        [storages that shrink]); the storage is unknown again."""
        ref = self._live.get(id(storage))
        if ref is not None and ref.row == row:
            del self._live[id(storage)]
        self.end(row)

    def _on_free(self, ref: _StorageRef) -> None:
        # Runs when the storage is deallocated, possibly on the autograd thread: only appends.
        self._live.pop(ref.sid, None)
        self.end(ref.row)

    def close(self) -> None:
        """Drop every weak reference: their callbacks can no longer fire (zero cost afterwards)."""
        self._live.clear()
        self.closed = True

    def records(self) -> Tuple[TensorRecord, ...]:
        """Frozen records of every row that took part in the trace, in row order.

        Rows freed before the first point (a storage released between attaching and the first
        iteration) never took part and are left out.
        """
        out = []
        for row in range(len(self.key)):
            freed = self.freed[row]
            if freed is not None and freed < 0:
                continue
            out.append(TensorRecord(
                key=self.key[row], category=self.category[row], size_bytes=self.size_bytes[row],
                dtype=self.dtype[row], device=self.device[row], iteration=self.iteration[row],
                created=self.created[row], freed=freed, uses=tuple(self.uses[row]),
                created_tick=self.created_tick[row], freed_tick=self.freed_tick[row]))
        return tuple(out)


class ShrinkWatch:
    """Note [storages that shrink]: storages that may be freed without dying.

    FSDP2 frees a gathered parameter by shrinking its storage to zero bytes
    (``untyped_storage().resize_(0)``) and grows the same storage at the next gather; no operation
    shows either, and the storage never dies. Taken as one tensor alive for the whole iteration,
    FSDP2's gathered parameters made 79 MB of a 108 MB feasible floor on ``model=small`` over 2
    ranks. The tracer watches every storage it saw before the iteration or saw regrown inside it;
    at every point, a watched one (never a parameter, gradient, state or activation: those are the
    runtime's to move) that is empty now is recorded freed, and the next operation that touches it
    again starts a new temporary. Storages the runtime holds away (tracing under a budget) are not
    freed: they are waiting, not gone. Kept across iterations (a storage shrinks at one's end).
    """

    def __init__(self) -> None:
        self._rows: Dict[int, weakref.ref] = {}  # row -> its storage
        self._shrunk = StorageMap()  # shrunk to nothing: regrown, they are new allocations

    def __bool__(self) -> bool:
        return bool(self._rows)

    def watch(self, row: int, storage: torch.UntypedStorage) -> None:
        self._rows[row] = weakref.ref(storage)

    def shrunk_before(self, tensors: Iterable[torch.Tensor]) -> None:
        """Storages shrunk to nothing before tracing began (FSDP2's gathered parameters between
        steps): their regrowth is an allocation from the first traced iteration on, as it is in
        every later one, not a tensor that was there before."""
        for t in tensors:
            st = t.untyped_storage()
            if st.nbytes() == 0:
                self._shrunk.add(st)

    def regrown(self, storage: torch.UntypedStorage) -> bool:
        """True (once) for a storage released here that holds bytes again."""
        if storage in self._shrunk:
            self._shrunk.discard(storage)
            return True
        return False

    def release_empty(self, table: RecordTable,
                      away: Optional[Callable[[torch.UntypedStorage], int]]) -> List[int]:
        """Record every watched, live, empty storage freed in ``table``; returns their rows."""
        released = []
        for row, ref in list(self._rows.items()):
            st = ref()
            if st is None or table.freed[row] is not None or \
                    table.category[row] not in (Category.INPUT, Category.TEMPORARY):
                del self._rows[row]
            elif st.nbytes() == 0 and (away is None or not away(st)):
                del self._rows[row]
                table.release(row, st)
                self._shrunk.add(st)
                released.append(row)
        return released


def register_existing(table: RecordTable, model: nn.Module, optimizer: Optional[torch.optim.Optimizer],
                      name_of: Callable[[torch.Tensor], str],
                      away_bytes: Optional[Callable[[torch.UntypedStorage], int]] = None) -> None:
    """Rows for what exists before tracing: parameters, buffers, gradients, optimizer states.

    A storage shared by two of them (a tied weight) is registered once, under the first name.
    ``away_bytes`` gives the device size of a storage a runtime holds away (it is empty now:
    Note [tracing under a budget] in :mod:`tierflow.profiling.tracer`).
    """
    def add(t: torch.Tensor, category: Category, key: str) -> None:
        st, nbytes = storage_of(t), None
        if st is None and away_bytes is not None and t.device.type != "meta" and not t.is_sparse:
            st = held_storage(t)
            nbytes = away_bytes(st) or None
            st = st if nbytes else None
        if st is not None and table.row_of(st) is None:
            table.add(st, t, category, key, iteration=None, created=None, created_tick=-1, nbytes=nbytes)

    for name, p in model.named_parameters():
        add(p, Category.PARAM, name)
    for name, b in model.named_buffers():
        add(b, Category.BUFFER, name)
    for name, p in model.named_parameters():
        if p.grad is not None:
            add(p.grad, Category.GRAD, grad_key(name))
    if optimizer is not None:
        for param, state in optimizer.state.items():
            for state_name, value in state.items():
                if isinstance(value, torch.Tensor):
                    add(value, Category.OPTIMIZER_STATE, state_key(name_of(param), state_name))
