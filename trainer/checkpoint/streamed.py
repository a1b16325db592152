"""Checkpoints of a training state that lives in the tiers: written to disk and read back one tensor
at a time, never gathered whole into RAM.

A model built into a tier (its state does not fit the budget) cannot take in-memory snapshots:
each would need a copy of the whole state in RAM. Its checkpoints go straight to disk instead, in
the same torch.distributed.checkpoint layout, manifest and atomic rename as every persisted copy
(:mod:`tierflow.trainer.checkpoint.persist`), so one verification and one set of tools serve both.

Note [streamed under the runtime]: writing and reading run inside the offload runtime's
``resident()`` block, under its online policy. DCP resolves one tensor just before writing it;
:class:`_FetchingPlanner` hands it a clone, and the clone (a torch operation) brings the tensor
back from its tier first; once written it is dropped, and whatever came back is evicted again as
the budget requires. Each tensor gets a file of its own: DCP's writer holds every tensor of a file
until that file is complete, so one file per rank would hold the whole state. Reading, each tensor is loaded alone (``DcpSource``) and copied into the live
parameter, or becomes the optimizer's state tensor, which the policy may evict at once. References
to the live tensors are taken *before* the block: even a ``detach`` inside it is an operation that
would bring its tensor back.
"""

from __future__ import annotations

import signal
import time
import warnings
from pathlib import Path
from typing import Any, Callable, ContextManager, Dict, List, Optional, Tuple

import torch

from tierflow.offload.runtime.weights import DcpSource
from tierflow.trainer.checkpoint._codec import decode
from tierflow.trainer.checkpoint._signals import STOP, SignalFlags
from tierflow.trainer.checkpoint._state import capture, optimizer_param_names, restore_rng
from tierflow.trainer.checkpoint.persist import META_KEY, _rng_key, newest_verified, save_checkpoint
from tierflow.trainer.checkpoint.recovery import RestoreResult
from tierflow.trainer.config import CheckpointConfig

__all__ = ["StreamedCheckpointer", "load_streamed", "save_streamed"]



def _fetching_planner():
    from torch.distributed.checkpoint import DefaultSavePlanner

    class _FetchingPlanner(DefaultSavePlanner):
        """Note [streamed under the runtime]: each tensor is fetched from its tier as DCP writes it."""

        def resolve_data(self, write_item: Any) -> Any:
            obj = super().resolve_data(write_item)
            return obj.clone() if isinstance(obj, torch.Tensor) else obj

    return _FetchingPlanner()


def save_streamed(root: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, *,
                  config_hash: str, note: Dict[str, Any], keep: int,
                  resident: Callable[[], ContextManager[Any]]) -> Path:
    """Persist the training state of ``step`` to ``root/step-N``, one tensor at a time.

    Args:
        resident: The offload runtime's ``resident`` (Note [streamed under the runtime]).

    Returns:
        The checkpoint's final directory.
    """
    cap = capture(model, optimizer, scheduler, step, config_hash)  # references only, outside the block
    cap.meta["note"] = dict(note)
    with resident():
        return save_checkpoint(root, step, dict(cap.tensors), cap.meta, rank=0, world_size=1, keep=keep,
                               planner=_fetching_planner(), file_per_tensor=True)


def load_streamed(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, *,
                  resident: Callable[[], ContextManager[Any]]) -> Tuple[int, Dict[str, Any]]:
    """Load a persisted checkpoint into the live objects, one tensor at a time (verify it first).

    Returns:
        The step it was taken after and the note kept with it.

    Raises:
        ValueError: it does not match the model (a missing or extra tensor).
    """
    src = DcpSource(path)
    byte = torch.empty(0, dtype=torch.uint8)
    meta = decode(src.read(META_KEY, byte).numpy().tobytes())
    rng = decode(src.read(_rng_key(0), byte).numpy().tobytes())  # written by one process: rank 0
    live = model.state_dict()  # references, outside the block (Note [streamed under the runtime])
    names = optimizer_param_names(model, optimizer)
    params = {n: p for n, p in zip(names, (p for g in optimizer.param_groups for p in g["params"]))}
    wanted = {f"model.{k}" for k in live}
    saved_optim = [k for k in src.names() if k.startswith("optim.")]
    missing = sorted(wanted - src.names())
    extra = sorted(k for k in src.names() - wanted if k.startswith("model.")
                   or (k.startswith("optim.") and k[len("optim."):].rpartition(".")[0] not in params))
    if missing or extra:
        raise ValueError(f"the checkpoint {path} does not match the model (missing {missing[:3]}, unexpected "
                         f"{extra[:3]}); restore it with the configuration it was taken with")
    ids = {n: i for i, n in enumerate(names)}
    groups = [{**g, "params": [ids[n] for n in g["params"]]} for g in meta["param_groups"]]
    optimizer.load_state_dict({"state": {}, "param_groups": groups})  # hyperparameters; states below
    with resident(), torch.no_grad():
        for key, dst in live.items():
            dst.copy_(src.read(f"model.{key}", dst))  # brings the parameter back first, if it is away
        for key in saved_optim:
            fqn, _, name = key[len("optim."):].rpartition(".")
            optimizer.state[params[fqn]][name] = src.read(key, byte)  # the policy may evict it at once
        for fqn, scalars in meta["optim_scalars"].items():
            optimizer.state[params[fqn]].update(scalars)
    if scheduler is not None and meta.get("scheduler") is not None:
        scheduler.load_state_dict(meta["scheduler"])
    restore_rng(rng)
    return int(meta["step"]), dict(meta.get("note") or {})


class StreamedCheckpointer:
    """The checkpointer of a single-process run whose state lives in the tiers (see the module docstring).

    Every ``checkpoint.every_steps`` steps, on SIGUSR1, on SIGTERM (then it stops) and at the end
    (``persist_on_finish``) the state is persisted to ``dir``; a start resumes from the newest copy
    that verifies. There are no in-memory snapshots: the state does not fit in memory.
    """

    streamed = True

    def __init__(self, cfg: CheckpointConfig, parts: Any, persist_dir: Path, *, config_hash: str) -> None:
        self.cfg, self.parts, self.dir, self.config_hash = cfg, parts, Path(persist_dir), config_hash
        if cfg.parity_shards > 0:
            warnings.warn(f"checkpoint.parity_shards={cfg.parity_shards} is ignored: the training state lives in the "
                          "tiers, so its checkpoints are streamed to disk and no snapshot is held in memory or on "
                          "peers", stacklevel=3)
        self.restored: Optional[RestoreResult] = None
        self._resident: Callable[[], ContextManager[Any]] = _no_runtime
        self._signals = SignalFlags()
        self._last_persisted: Optional[int] = None
        self._note: Dict[str, Any] = {}  # of the step after_step was last called for (the loss)
        self._persisted: List[Tuple[int, float]] = []  # (step, seconds)

    def restore(self, offload: Any = None) -> int:
        """Resume from the newest persisted copy that verifies; returns the step to start from.

        Args:
            offload: The offload runtime the state lives under (its ``resident``).
        """
        if offload is not None:
            self._resident = offload.resident
        if self.cfg.restore == "none":
            return 0
        found = newest_verified(self.dir)
        if not found:
            return 0
        _, path = found[0]
        t0 = time.perf_counter()
        p = self.parts
        step, note = load_streamed(path, p.model, p.optimizer, p.scheduler, resident=self._resident)
        seconds = time.perf_counter() - t0
        self.restored = RestoreResult(step=step, source="disk", seconds=seconds,
                                      detail=f"streamed from {path}", note=note)
        self._last_persisted, self._note = step, dict(note)
        print(f"tierflow: resumed from step {step} in {seconds:.2f} s: streamed from {path}", flush=True)
        return step

    def after_step(self, step: int, note: Optional[Dict[str, Any]] = None) -> None:
        """Call after ``scheduler.step()`` of every step (``step`` steps are done)."""
        self._note = dict(note or {})
        flags, self._signals.bits = self._signals.bits, 0
        if step % self.cfg.every_steps == 0 or flags:
            self._persist(step)
        if flags & STOP:
            print(f"tierflow: SIGTERM: step {step} persisted to {self.dir}; stopping", flush=True)
            self.abort()
            raise SystemExit(128 + signal.SIGTERM)

    def _persist(self, step: int) -> None:
        t0 = time.perf_counter()
        p = self.parts
        save_streamed(self.dir, step, p.model, p.optimizer, p.scheduler, config_hash=self.config_hash, note=self._note,
                      keep=self.cfg.keep, resident=self._resident)
        self._persisted.append((step, time.perf_counter() - t0))
        self._last_persisted = step

    def finish(self, step: int) -> None:
        """End of training: persist the last step (``persist_on_finish``)."""
        if self.cfg.persist_on_finish and self._last_persisted != step:
            self._persist(step)
        self.abort()

    def abort(self) -> None:
        self._signals.restore()

    def summary(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"snapshots": 0, "checkpoints_persisted": len(self._persisted),
                               "checkpoint_streamed": True,
                               "checkpoint_persist_s": round(sum(s for _, s in self._persisted), 3),
                               "last_checkpoint": str(self.dir / f"step-{self._last_persisted:08d}")
                               if self._last_persisted is not None else None}
        if self.restored is not None:
            out.update(resumed_from_step=self.restored.step, resumed_from="disk", restore_s=self.restored.seconds)
        return out


def _no_runtime() -> ContextManager[Any]:
    raise RuntimeError("StreamedCheckpointer.restore(offload) must be given the offload runtime first")
