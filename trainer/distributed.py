"""Process-group setup for torchrun: which rank we are, which device we own, how ranks talk."""

from __future__ import annotations

import atexit
import os
import sys
import traceback
from dataclasses import dataclass
from typing import Any, List, NoReturn, Optional

import torch
import torch.distributed as dist

__all__ = ["Runtime", "end_process", "env_world_size", "exit_if_left_failed", "init_runtime", "shutdown_runtime"]


@dataclass(frozen=True)
class Runtime:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> List[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        out: List[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of a scalar tensor over ranks (a copy; ``value`` is untouched)."""
        if not self.distributed:
            return value
        out = value.detach().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out / self.world_size


def env_world_size() -> int:
    """The world size torchrun announced (1 when launched plainly); readable before any setup."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_runtime(device: str = "auto", *, group: bool = False) -> Runtime:
    """Join the process group torchrun describes (gloo on CPU, nccl on CUDA) and pick our device.

    Args:
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
        group: Start a process group of one when launched without torchrun (FSDP2 needs one).

    Raises:
        ValueError: ``device=cuda`` on a machine without CUDA.
    """
    global _held_group
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    world_size = env_world_size()
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise ValueError("trainer.device=cuda but no CUDA device is visible; use trainer.device=cpu or auto")
    if use_cuda:
        # cuBLAS needs this set before its first use to be deterministic.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo",
                                device_id=dev if use_cuda else None)
        _held_group = True
    elif group and not dist.is_initialized():  # one process: an in-memory store, no port to find
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", store=dist.HashStore(), rank=0, world_size=1,
                                device_id=dev if use_cuda else None)
        _held_group = True
    return Runtime(rank=rank, local_rank=local_rank, world_size=world_size, device=dev)


_left_failed = False  # this process left a group of several ranks because its run failed
_held_group = False  # this process started a process group (it may have left it since)


def shutdown_runtime(rt: Runtime, *, failed: bool = False) -> None:
    """Leave the process group: after a barrier when the run ended well; at once when it
    failed, since the peers may be inside a collective this rank will never join (a barrier
    would hang; leaving makes their collective fail, so the launcher sees every rank stop).
    A failed rank then ends through :func:`exit_if_left_failed`."""
    global _left_failed
    if dist.is_available() and dist.is_initialized():
        if rt.distributed and not failed:
            dist.barrier()
        _left_failed = _left_failed or (failed and rt.distributed)
        dist.destroy_process_group()


def exit_if_left_failed(code: int, *, show_traceback: bool = False) -> int:
    """End the process now, with ``code``, when its run failed in a group of several ranks;
    else return ``code``. Call it once the failure has been reported (or, for an unexpected
    error, with ``show_traceback``: it prints the one being handled first).

    Note [a failed rank exits without destructors]: ``destroy_process_group`` forgets the group,
    but DDP's reducer still holds it, and the reducer dies with the failed run's frames, when the
    error is dropped. gloo's destructor then joins its worker threads while holding the GIL; a
    worker that was dropping the work of an all-reduce the failure interrupted needs the GIL to
    release that work's tensors. Both wait for ever (seen in CI and reproduced: the failing rank
    in ``~ProcessGroupGloo`` -> ``thread::join``, its worker in ``~AsyncAllreduceWork`` ->
    ``gil_scoped_acquire``), and the peers wait in their collective. Everything the run owns was
    closed while the error unwound (tiers, snapshots, the group), so such a rank flushes its
    output, runs the exit handlers (temporary directories, finalizers) and leaves through
    ``os._exit``, before any of those frames is freed.
    """
    if not _left_failed:
        return code
    if show_traceback:
        traceback.print_exc()
    _leave(code)


def end_process(code: int, *, held_group: Optional[bool] = None) -> NoReturn:
    """End a command-line process with ``code``: through :func:`sys.exit`, or, when it has held a
    process group, as a failed rank leaves (Note [a finished rank exits without destructors]).
    For ``__main__`` blocks and console scripts only: a function called from a user's program
    returns instead.

    Args:
        code: the exit status.
        held_group: whether this process held a group; None: whether :func:`init_runtime` started
            one (a script that called ``init_process_group`` itself passes True).

    Note [a finished rank exits without destructors]: a rank whose run ended well, its group
    destroyed, still aborted now and then after its last line ("terminate called without an
    active exception": seen in CI, in the FSDP2 benchmark's peer without tierflow, and in
    benchmarks/gloo_hidden_buffers.py, whether or not the group was destroyed). That is gloo's C++
    state torn down while the interpreter finalizes: work objects that gloo's threads still hold
    need the GIL to release their tensors, and a worker thread still joinable when its owner is
    destroyed ends the process (pytorch/pytorch#179291 and #190489 describe the same). The run's
    results are written and its tiers and snapshots closed by then, so such a process runs what
    a normal exit runs, less the destructors, and leaves through ``os._exit``.
    """
    if _held_group if held_group is None else held_group:
        _leave(code)
    sys.exit(code)


def _leave(code: int) -> NoReturn:
    sys.stdout.flush()
    sys.stderr.flush()
    atexit._run_exitfuncs()  # what a normal exit runs, less the destructors of live objects
    os._exit(code)
