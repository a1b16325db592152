"""How the training loop uses checkpointing: four calls, in this order.

    ckpt = start_checkpointing(cfg.checkpoint, parts, rt, persist_dir, config_hash=..., run_id=...)
    start = ckpt.restore()              # newest complete snapshot: memory, peers, disk (or 0)
    ... each step, after scheduler.step(): ckpt.after_step(step + 1)
    ckpt.finish(steps)                  # final snapshot, persist, drain; ckpt.abort() on error

Note [agreed signals]: SIGTERM (stop) and SIGUSR1 (persist now) reach ranks at different
moments. The handlers only set a flag; ``after_step`` combines the flags of all ranks with a
one-integer all-reduce, so every rank acts on them at the same step, and the snapshot and its
collective persist run in the same order everywhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import warnings
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch
import torch.distributed as dist

from tierflow.profiling import remove_hooks
from tierflow.trainer.checkpoint._erasure import shard_holders
from tierflow.trainer.checkpoint._signals import PERSIST, STOP, SignalFlags
from tierflow.trainer.checkpoint._state import ModuleState, StateSource
from tierflow.trainer.checkpoint.recovery import RestoreResult, restore_latest
from tierflow.trainer.checkpoint.snapshotter import Snapshotter
from tierflow.trainer.checkpoint.store import StoreClient, StoreError, default_store_dir, store_dir_problem
from tierflow.trainer.config import CheckpointConfig, ConfigError

__all__ = ["Checkpointer", "NoCheckpointing", "check_checkpoint_config", "check_restart_env", "open_checkpointer",
           "resolve_node_id",
           "run_config_hash", "start_checkpointing"]


def run_config_hash(cfg: Any) -> str:
    """A hash of what determines the training state (model, data, optimizer, trainer sections)."""
    parts = {k: asdict(getattr(cfg, k)) for k in ("model", "data", "optimizer", "trainer")}
    return hashlib.blake2b(json.dumps(parts, sort_keys=True, default=str).encode(), digest_size=16).hexdigest()


def run_identity(cfg: Any, world_size: int) -> str:
    """Who a run is, for its snapshots and persisted copies (Note [run identity]).

    Note [run identity]: snapshots were keyed by the config hash alone, so a second run with the
    same training config in another run root resumed from the first one's snapshots (and the
    first one's finish freed the second's), and a 1-rank run freed a 2-rank run's. The identity
    adds where the run lives (``logging.run_root``, ``logging.run_name``) and its world size, and
    leaves out the timestamp of a default run directory, so the same command (a torchrun restart,
    a rerun after a reboot) is the same run, and any other is not.
    """
    parts = {k: asdict(getattr(cfg, k)) for k in ("model", "data", "optimizer", "trainer")}
    parts["where"] = [str(Path(cfg.logging.run_root).expanduser().resolve()), cfg.logging.run_name or "", world_size]
    return hashlib.blake2b(json.dumps(parts, sort_keys=True, default=str).encode(), digest_size=16).hexdigest()


def default_persist_dir(cfg: Any, run_id: str) -> Path:
    """Where a run's persisted copies go without ``checkpoint.dir``: one place per run identity,
    ``<run_root>/checkpoints/<run>``, so a rerun of the same command finds them whatever its own
    (timestamped) run directory is."""
    name = cfg.logging.run_name or run_id[:16]
    return Path(cfg.logging.run_root).expanduser().resolve() / "checkpoints" / name


def resolve_node_id(value: str, rank: int, local_rank: int) -> str:
    """``auto`` -> ``$TIERFLOW_NODE_ID`` or the host name; ``%r``/``%l`` become the rank/local rank."""
    if value == "auto":
        value = os.environ.get("TIERFLOW_NODE_ID") or socket.gethostname().split(".")[0] or "node"
    return value.replace("%r", str(rank)).replace("%l", str(local_rank))


def check_checkpoint_config(cfg: CheckpointConfig, world_size: int) -> None:
    """What can be checked before any work: redundancy against the world size, the directories.

    Raises:
        ConfigError: listing every problem with the setting to change.
    """
    if not cfg.enabled:
        return
    p: List[str] = []
    group = cfg.data_shards + cfg.parity_shards
    if cfg.parity_shards and world_size > 1 and group > world_size:
        p.append(f"checkpoint.data_shards+checkpoint.parity_shards={cfg.data_shards}+{cfg.parity_shards} is larger "
                 f"than the world size {world_size}; each shard needs its own node: lower them (e.g. "
                 f"checkpoint.data_shards={max(1, world_size - 1)} checkpoint.parity_shards=1)")
    # The store's socket path must fit: checked before the store directory or anything else is made.
    node = resolve_node_id(cfg.node_id, int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")))
    problem = store_dir_problem(Path(cfg.store_dir) if cfg.store_dir else default_store_dir(), node)
    if problem is not None:
        p.append(problem)
    if cfg.dir:
        d = Path(cfg.dir).expanduser()
        try:
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            p.append(f"checkpoint.dir={cfg.dir} cannot be created ({exc.strerror}); choose a writable directory")
        else:
            if not os.access(d, os.W_OK | os.X_OK):
                p.append(f"checkpoint.dir={cfg.dir} is not writable; choose a writable directory")
    if p:
        raise ConfigError("; ".join(p))


class Checkpointer:
    """Snapshots, signals and recovery for one training run (one per rank)."""

    def __init__(self, cfg: CheckpointConfig, snap: Snapshotter, rt: Any, nodes: List[str]) -> None:
        self.cfg, self.snap, self.rt, self.nodes = cfg, snap, rt, nodes
        self.restored: Optional[RestoreResult] = None
        self._signals = SignalFlags()
        self._last_step: Optional[int] = None
        self._last_persisted: Optional[int] = None
        self._note: Dict[str, Any] = {}  # of the step after_step was last called for
        # The only place training can stall: right before an optimizer mutates captured state.
        self._hooks = [opt.register_step_pre_hook(lambda *_: snap.wait_safe())
                       for opt in snap.state.mutating_optimizers()]

    def restore(self) -> int:
        """Restore the newest complete snapshot (collective); returns the step to start from."""
        res = restore_latest(self.snap, gather=self.rt.gather, broadcast=self.rt.broadcast,
                             persist_dir=self.snap.persist_dir, nodes=self.nodes, restore=self.cfg.restore)
        self.restored = res
        details = self.rt.gather(None if res is None else f"rank {self.rt.rank} {res.detail}")
        if res is None:
            return 0
        self._last_step = res.step
        self._note = dict(res.note)  # kept by a snapshot of the same step (a resume with nothing left to train)
        self._last_persisted = res.step if res.source == "disk" else None
        if self.rt.is_main:
            print(f"tierflow: resumed from step {res.step} in {res.seconds:.2f} s: " + "; ".join(details), flush=True)
        return res.step

    def after_step(self, step: int, note: Optional[Dict[str, Any]] = None) -> None:
        """Call after ``scheduler.step()`` of every step (``step`` steps are done).

        ``note``: small JSON values to keep with this step's snapshot (the trainer's loss); a
        run resumed from it finds them in ``restored.note``.
        """
        self._note = dict(note or {})
        flags = self._signals.bits
        if self.rt.distributed:  # Note [agreed signals]
            t = torch.tensor([flags], dtype=torch.int64, device=self.rt.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flags = int(t.item())
        self._signals.bits &= ~flags
        cadence = step % self.cfg.every_steps == 0
        persist = bool(flags & (STOP | PERSIST)) or (
            cadence and self.cfg.persist_every > 0 and (step // self.cfg.every_steps) % self.cfg.persist_every == 0)
        if cadence or persist:
            self._snapshot(step, persist)
        if flags & STOP:
            self.snap.drain()
            if self.rt.is_main:
                print(f"tierflow: SIGTERM: step {step} persisted to {self.snap.last_persisted}; stopping", flush=True)
            self.abort()
            raise SystemExit(128 + signal.SIGTERM)

    def _snapshot(self, step: int, persist: bool) -> None:
        self.snap.snapshot(step, persist=persist, note=self._note)
        self._last_step = step
        if persist:
            self._last_persisted = step

    def finish(self, step: int) -> None:
        """End of training: a last snapshot (persisted if configured), wait for it, free memory."""
        want_persist = self.cfg.persist_on_finish and self._last_persisted != step
        if self._last_step != step or want_persist:
            self._snapshot(step, want_persist)
        self.snap.drain()
        self.snap.close()
        if self.cfg.free_on_finish:
            if self.rt.distributed:
                dist.barrier()  # no rank frees shards a peer might still be restoring from
            self.snap.free_all()
        self._release()

    def abort(self) -> None:
        """On error: stop taking snapshots without waiting for peers (they may be gone)."""
        self.snap._queue.put(None)
        self._release()

    def _release(self) -> None:
        remove_hooks(self._hooks)
        self._signals.restore()
        self.snap.store.close()

    def summary(self) -> Dict[str, Any]:
        s = self.snap
        out: Dict[str, Any] = {"snapshots": s.num_snapshots, "snapshot_stall_s": s.stall_s,
                               "snapshot_copy_s": s.copy_s, "checkpoints_persisted": s.num_persisted,
                               "last_checkpoint": str(s.last_persisted) if s.last_persisted else None}
        if self.restored is not None:
            out.update(resumed_from_step=self.restored.step, resumed_from=self.restored.source,
                       restore_s=self.restored.seconds)
        return out


def check_restart_env(environ: Optional[Dict[str, str]] = None) -> Optional[str]:
    """The warning to give when torchrun may restart this group without the rendezvous fix, else None.

    Note [restart rendezvous]: with torchrun's default shared rendezvous store, a restarted worker
    group can read its peers' addresses from the attempt before and hang in
    ``init_process_group`` (pytorch/pytorch#135712); ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` in
    torchrun's environment avoids it (``launch/torchrun.sh`` exports it). Workers inherit
    torchrun's environment, so a worker can tell whether its launcher had it.
    """
    env = os.environ if environ is None else environ
    try:
        restarts = int(env.get("TORCHELASTIC_MAX_RESTARTS", "0"))
    except ValueError:
        restarts = 0
    if restarts > 0 and env.get("TORCH_DISABLE_SHARE_RDZV_TCP_STORE") != "1":
        return (f"torchrun runs with --max-restarts {restarts} but without TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: "
                "a restarted group may hang in init_process_group (pytorch/pytorch#135712); launch with "
                "launch/torchrun.sh, or export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 before torchrun")
    return None


class NoCheckpointing:
    """The switched-off :class:`Checkpointer` (``checkpoint.enabled=false``): every call does nothing."""

    restored = None

    def restore(self) -> int:
        return 0

    def after_step(self, step: int, note: Optional[Dict[str, Any]] = None) -> None:
        pass

    def finish(self, step: int) -> None:
        pass

    def abort(self) -> None:
        pass

    def summary(self) -> Dict[str, Any]:
        return {}


def start_checkpointing(cfg: CheckpointConfig, parts: Any, rt: Any, persist_dir: Path, *,
                        config_hash: str, run_id: str) -> Union[Checkpointer, NoCheckpointing]:
    """Connect to (or start) this node's store and set up snapshots; a :class:`NoCheckpointing` when disabled.

    Collective: every rank calls it at the same point (it creates the checkpoint's gloo group).

    Raises:
        ConfigError: too few distinct nodes for ``data_shards + parity_shards``, or no store.
    """
    if not cfg.enabled:
        return NoCheckpointing()
    persist_dir = Path(cfg.dir).expanduser() if cfg.dir else Path(persist_dir)
    if getattr(parts, "placement", None) is not None:  # the state lives in a tier: it does not fit in memory
        from tierflow.trainer.checkpoint.streamed import StreamedCheckpointer

        return StreamedCheckpointer(cfg, parts, persist_dir, config_hash=config_hash)
    return open_checkpointer(cfg, ModuleState(parts.model, parts.optimizer, parts.scheduler), rt, persist_dir,
                             config_hash=config_hash, run_key=run_id[:12])


def open_checkpointer(cfg: CheckpointConfig, state: StateSource, rt: Any, persist_dir: Path, *,
                      config_hash: str, run_key: Optional[str] = None) -> Checkpointer:
    """Snapshots of any :class:`StateSource` (the trainer's model, a DeepSpeed engine, ...).

    Args:
        rt: the runtime: ``rank``, ``local_rank``, ``world_size``, ``distributed``, ``is_main``,
            ``device`` and the object collectives ``gather``/``broadcast`` (see ``trainer.dist``).
        persist_dir: where disk checkpoints go.
        config_hash: recorded in every snapshot; names this run's snapshots (its first 12
            characters) unless ``run_key`` does (Note [run identity]).

    Raises:
        ConfigError: too few distinct nodes for ``data_shards + parity_shards``, or no store.
    """
    warning = check_restart_env()
    if warning is not None and rt.is_main:
        warnings.warn(warning, stacklevel=2)
    node = resolve_node_id(cfg.node_id, rt.rank, rt.local_rank)
    nodes = rt.gather(node)
    k, m = cfg.data_shards, cfg.parity_shards
    holders = None
    if m > 0 and len(set(nodes)) == 1:  # one rank, or every rank on one machine: no other node exists
        if rt.is_main:
            warnings.warn(f"checkpoint.parity_shards={m} is ignored: all {rt.world_size} rank(s) sit on node "
                          f"{nodes[0]!r}, so no other node can hold shards; snapshots survive a crashed "
                          "process, not a lost machine (set checkpoint.parity_shards=0 to silence this)", stacklevel=2)
    elif m > 0:
        try:
            holders = [shard_holders(r, nodes, k, m) for r in range(rt.world_size)]
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    group = dist.new_group(backend="gloo", timeout=timedelta(minutes=10)) if rt.distributed else None
    try:
        store = StoreClient(Path(cfg.store_dir).expanduser() if cfg.store_dir else default_store_dir(), node,
                            idle_timeout_s=cfg.idle_timeout_s)
    except StoreError as exc:
        raise ConfigError(str(exc)) from None
    snap = Snapshotter(state=state, store=store, rank=rt.rank, world_size=rt.world_size, run_key=run_key or config_hash[:12],
                       config_hash=config_hash, holders=holders, k=k, m=m, group=group, persist_dir=Path(persist_dir),
                       keep=cfg.keep)
    return Checkpointer(cfg, snap, rt, nodes)
