"""In-memory snapshots of a DeepSpeed engine (ZeRO stages 0-3), with the trainer's recovery.

A user who trains with ``deepspeed.initialize`` adds four lines; the snapshots go to the same
per-node store, are spread to peers and persisted exactly as the trainer's own (see
``docs/checkpointing.md``)::

    engine, optimizer, _, scheduler = deepspeed.initialize(model=model, config=ds_config, ...)
    snaps = attach_snapshots(engine, {"every_steps": 1, "parity_shards": 1})   # CheckpointConfig keys
    start = snaps.restore()                    # newest complete snapshot (memory, peers, disk) or 0
    for step in range(start, steps):
        loss = loss_fn(engine(batch(step))); engine.backward(loss); engine.step()
        snaps.after_step(step + 1)             # copied in the background during the next step
    snaps.finish(steps)

What a snapshot of an engine holds (each rank its own; restored at the same world size):

* ``model.<name>``: the module's state dict (ZeRO 0-2: every rank holds the whole parameters);
  under ZeRO-3 ``model.rank<r>.<name>`` is this rank's *partition* of each parameter
  (``param.ds_tensor``, never gathered) and persistent parameters are held whole;
* ``optim[.rank<r>].<path>``: every tensor of ``engine.optimizer.state_dict()``, the ZeRO
  optimizer's per-rank state (fp32 master partitions and the partitioned Adam moments) or, at
  stage 0, the torch optimizer's. The rest of that dict (loss scaler, paddings, ...) is pickled,
  as DeepSpeed's own checkpoints pickle it (the only pickle in tierflow's snapshots: it is read
  after the segment's owner and checksum, or the copy's manifest, have been checked);
* the LR scheduler, the engine's step counters, the RNG states and the step.

Partitioned tensors carry the rank in their key because a disk checkpoint (DCP) keeps one copy
of equal keys across ranks. The copy waits, like the trainer's, in a step pre-hook of the torch
optimizer that ZeRO steps on its fp32 partitions: nothing captured changes before that.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from tierflow.offload.integrations.deepspeed import config_section, read_section
from tierflow.trainer.checkpoint._state import Captured, capture_rng, restore_rng
from tierflow.trainer.checkpoint.manager import Checkpointer, check_checkpoint_config, open_checkpointer
from tierflow.trainer.config import CheckpointConfig, ConfigError
from tierflow.trainer.distributed import Runtime

__all__ = ["DeepSpeedSnapshots", "DeepSpeedState", "attach_snapshots", "engine_config_hash", "snapshot_config"]

_COUNTERS = ("global_steps", "global_samples", "skipped_steps", "micro_steps")


@dataclass(frozen=True)
class _TensorRef:
    """Stands in the pickled optimizer state dict for a tensor stored in the payload."""

    key: str


def _split(obj: Any, path: str, out: List[Tuple[str, torch.Tensor]]) -> Any:
    """``obj`` with every tensor in nested dicts/lists/tuples replaced by a ``_TensorRef``."""
    if isinstance(obj, torch.Tensor):
        out.append((path, obj.detach()))
        return _TensorRef(path)
    if type(obj) is dict:
        return {k: _split(v, f"{path}/{k}", out) for k, v in obj.items()}
    if type(obj) in (list, tuple):
        return type(obj)(_split(v, f"{path}/{i}", out) for i, v in enumerate(obj))
    return obj


def _join(tree: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """The inverse of ``_split``, with fresh copies (never views of the snapshot buffer)."""
    if isinstance(tree, _TensorRef):
        return tensors[tree.key].clone()
    if type(tree) is dict:
        return {k: _join(v, tensors) for k, v in tree.items()}
    if type(tree) in (list, tuple):
        return type(tree)(_join(v, tensors) for v in tree)
    return tree


def _torch_optimizer(opt: Any) -> Optional[torch.optim.Optimizer]:
    """The torch optimizer that does the arithmetic (ZeRO and fp16 wrappers keep it in ``.optimizer``)."""
    for _ in range(4):
        if isinstance(opt, torch.optim.Optimizer):
            return opt
        opt = getattr(opt, "optimizer", None)
    return None


class DeepSpeedState:
    """One rank's training state inside a DeepSpeed engine (a snapshot ``StateSource``).

    Args:
        engine: the ``DeepSpeedEngine`` from ``deepspeed.initialize``.

    Raises:
        ValueError: the engine keeps optimizer state on NVMe or uses elastic ZeRO checkpoints
            (their state dicts need every rank's part), or has no optimizer.
    """

    def __init__(self, engine: Any) -> None:
        if getattr(engine, "module", None) is None or getattr(engine, "optimizer", None) is None:
            raise ValueError(f"attach_snapshots() needs a DeepSpeedEngine with an optimizer, got {type(engine).__name__}; "
                             "pass the engine deepspeed.initialize returned (with an optimizer configured)")
        self.engine = engine
        self.stage = int(engine.zero_optimization_stage())
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        opt = engine.optimizer
        problems = []
        if getattr(opt, "elastic_checkpoint", False):
            problems.append("zero_optimization.elastic_checkpoint=true (its state dict needs every rank's part); "
                            "set it to false")
        if getattr(opt, "swap_optimizer", False) or getattr(opt, "optimizer_swapper", None) is not None:
            problems.append("zero_optimization.offload_optimizer.device=nvme (the state lives in swap files); "
                            "use device cpu or none")
        self._inner = _torch_optimizer(opt)
        if self._inner is None:
            problems.append(f"no torch optimizer found inside {type(opt).__name__}, so nothing can wait for the "
                            "snapshot copy before the state changes")
        if problems:
            raise ValueError("in-memory snapshots cannot attach to this DeepSpeed engine: " + "; ".join(problems))

    def mutating_optimizers(self) -> List[torch.optim.Optimizer]:
        return [self._inner]

    def _model_tensors(self) -> List[Tuple[str, torch.Tensor]]:
        module = self.engine.module
        if self.stage < 3:
            return [(f"model.{k}", v.detach()) for k, v in module.state_dict().items()]
        out = []
        for name, p in module.named_parameters():
            out.append((f"model.rank{self.rank}.{name}", p.ds_tensor.detach()))
            if getattr(p, "ds_persist", False) and p.data.shape == p.ds_shape:  # kept whole on every rank
                out.append((f"model.persist.{name}", p.data.detach()))
        out += [(f"model.buffer.{name}", b.detach()) for name, b in module.named_buffers()]
        return out

    def capture(self, step: int, config_hash: str) -> Captured:
        """References to every tensor of the engine's state, and a copy of the rest (see the module doc)."""
        tensors = self._model_tensors()
        prefix = f"optim.rank{self.rank}" if self.stage > 0 else "optim"
        tree = _split(self.engine.optimizer.state_dict(), prefix, tensors)
        scheduler = self.engine.lr_scheduler
        meta = {"step": step, "config_hash": config_hash, "zero_stage": self.stage, "optim_tree": pickle.dumps(tree),
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "engine": {k: getattr(self.engine, k) for k in _COUNTERS if hasattr(self.engine, k)},
                "rng": capture_rng()}
        return Captured(step, tensors, meta)

    def apply(self, tensors: Dict[str, torch.Tensor], meta: Dict[str, Any], *, rng: Optional[Dict[str, Any]]) -> int:
        """Put a snapshot back into the engine (same world size and ZeRO stage); returns its step.

        Raises:
            ValueError: the snapshot was taken at another ZeRO stage or of another model.
        """
        if meta.get("zero_stage") != self.stage:
            raise ValueError(f"the snapshot was taken under ZeRO stage {meta.get('zero_stage')}, this engine runs "
                             f"stage {self.stage}; restore it with the DeepSpeed config it was taken with")
        engine = self.engine
        sd = _join(pickle.loads(meta["optim_tree"]), tensors)  # DeepSpeed's own objects (see the module doc)
        if self.stage == 0:
            engine.optimizer.load_state_dict(sd)
        else:
            # One state dict per data-parallel rank is expected; at the same world size each rank
            # reads only its own, and the fp32 master partitions come back bit for bit.
            engine.optimizer.load_state_dict([sd] * (dist.get_world_size() if dist.is_initialized() else 1),
                                             load_optimizer_states=True, load_from_fp32_weights=True)
        self._load_model(tensors)
        if engine.lr_scheduler is not None and meta.get("scheduler") is not None:
            engine.lr_scheduler.load_state_dict(meta["scheduler"])
        for key, value in meta.get("engine", {}).items():
            setattr(engine, key, value)
        if rng is not None:
            restore_rng(rng)
        return int(meta["step"])

    def _load_model(self, tensors: Dict[str, torch.Tensor]) -> None:
        module = self.engine.module
        if self.stage < 3:
            sd = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
            missing, unexpected = module.load_state_dict(sd, strict=False)
            if missing or unexpected:
                raise ValueError(f"the snapshot does not match the model (missing {sorted(missing)[:3]}, unexpected "
                                 f"{sorted(unexpected)[:3]}); restore it with the model it was taken with")
            return
        with torch.no_grad():
            for name, p in module.named_parameters():
                key = f"model.rank{self.rank}.{name}"
                if key not in tensors or tensors[key].shape != p.ds_tensor.shape:
                    raise ValueError(f"the snapshot holds no partition {key} of this shape; restore it with the "
                                     "model, DeepSpeed config and world size it was taken with")
                p.ds_tensor.copy_(tensors[key])
                whole = tensors.get(f"model.persist.{name}")
                if whole is not None and p.data.shape == whole.shape:
                    p.data.copy_(whole)  # materialised; otherwise gathered from its partitions at first use
            for name, b in module.named_buffers():
                b.copy_(tensors[f"model.buffer.{name}"])


def engine_config_hash(engine: Any) -> str:
    """A hash of what determines an engine's state: its DeepSpeed config, parameter names and shapes, world size."""
    raw = getattr(engine, "config", None)
    if isinstance(raw, (str, Path)) and Path(raw).is_file():
        raw = json.loads(Path(raw).read_text())
    shapes = [(n, tuple(getattr(p, "ds_shape", p.shape))) for n, p in engine.module.named_parameters()]
    world = dist.get_world_size() if dist.is_initialized() else 1
    blob = json.dumps({"config": raw if isinstance(raw, Mapping) else None, "shapes": shapes, "world": world},
                      sort_keys=True, default=str)
    return hashlib.blake2b(blob.encode(), digest_size=16).hexdigest()


class DeepSpeedSnapshots:
    """Snapshots of one engine: ``restore()``, ``after_step(step)``, ``finish(step)`` (see the module doc).

    ``checkpointer`` is the trainer's :class:`Checkpointer` underneath (None when disabled):
    SIGTERM persists and stops, SIGUSR1 persists, exactly as in ``tierflow train``.
    """

    def __init__(self, checkpointer: Optional[Checkpointer]) -> None:
        self.checkpointer = checkpointer

    def restore(self) -> int:
        """Restore the newest complete snapshot into the engine (collective); the step to continue from."""
        return self.checkpointer.restore() if self.checkpointer is not None else 0

    def after_step(self, step: int) -> None:
        """Call after every ``engine.step()`` that stepped the optimizer (``step`` steps are done)."""
        if self.checkpointer is not None:
            self.checkpointer.after_step(step)

    def finish(self, step: int) -> None:
        """A last snapshot (persisted if configured), wait until it is durable, free the memory."""
        if self.checkpointer is not None:
            self.checkpointer.finish(step)

    def abort(self) -> None:
        """Stop snapshotting without waiting for peers (on an error)."""
        if self.checkpointer is not None:
            self.checkpointer.abort()

    def summary(self) -> Dict[str, Any]:
        return self.checkpointer.summary() if self.checkpointer is not None else {}


def attach_snapshots(engine: Any, cfg: Union[CheckpointConfig, Mapping[str, Any], None] = None, *,
                     persist_dir: Optional[Union[str, Path]] = None,
                     config_hash: Optional[str] = None) -> DeepSpeedSnapshots:
    """Take in-memory snapshots of ``engine`` (collective: every rank calls it at the same point).

    Args:
        engine: the ``DeepSpeedEngine``; ``deepspeed.init_distributed`` must have run.
        cfg: a :class:`CheckpointConfig` or a dict of its keys (``enabled`` defaults to true here);
            None: the ``tierflow.checkpoint`` section of the engine's DeepSpeed config, else
            snapshots every 10 steps, no peer copies (see :func:`snapshot_config`).
        persist_dir: where disk checkpoints go (default: ``cfg.dir``, else ``./checkpoints``).
        config_hash: names this run's snapshots (default: a hash of the DeepSpeed config, the
            parameter shapes and the world size, so another configuration never restores them).

    Raises:
        ValueError: an unknown or bad key in ``cfg``, or an engine that cannot be snapshotted.
        ConfigError: too few distinct nodes for the peer shards, or no snapshot store.

    Example:
        >>> snaps = attach_snapshots(engine, {"every_steps": 1, "parity_shards": 1})  # doctest: +SKIP
    """
    cfg = snapshot_config(engine, cfg)
    if not cfg.enabled:
        return DeepSpeedSnapshots(None)

    state = DeepSpeedState(engine)
    distributed = dist.is_available() and dist.is_initialized()
    world = dist.get_world_size() if distributed else 1
    check_checkpoint_config(cfg, world)
    nccl = distributed and dist.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    rt = Runtime(rank=dist.get_rank() if distributed else 0, local_rank=int(os.environ.get("LOCAL_RANK", "0")),
                 world_size=world, device=device)
    where = Path(persist_dir or cfg.dir or "checkpoints").expanduser()
    ckpt = open_checkpointer(cfg, state, rt, where, config_hash=config_hash or engine_config_hash(engine))
    return DeepSpeedSnapshots(ckpt)


def snapshot_config(engine: Any, cfg: Union[CheckpointConfig, Mapping[str, Any], None] = None) -> CheckpointConfig:
    """The snapshot settings :func:`attach_snapshots` uses: ``cfg`` if given (it wins, and a
    ``tierflow.checkpoint`` section beside it is ignored with a warning), else that section of the
    engine's DeepSpeed config, else the defaults; ``enabled`` defaults to true.

    Raises:
        ValueError: an unknown or bad key, named with its path (``tierflow.checkpoint.every_steps``).
    """

    section = config_section(engine)
    from_section = read_section(section).checkpoint if section is not None else None  # validates the whole section
    if cfg is not None:
        if from_section is not None:
            warnings.warn("attach_snapshots: the tierflow.checkpoint section of the DeepSpeed config is ignored "
                          "because settings were passed explicitly; drop one of them", stacklevel=3)
        return _as_config(cfg)
    return _as_config(from_section, where="tierflow.checkpoint")


def _as_config(cfg: Union[CheckpointConfig, Mapping[str, Any], None], *,
               where: Optional[str] = None) -> CheckpointConfig:
    if isinstance(cfg, CheckpointConfig):
        return cfg

    values = {"enabled": True, **dict(cfg or {})}
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(CheckpointConfig), values))
    except OmegaConfBaseException as e:
        raise ValueError(f"{where or 'checkpoint settings for DeepSpeed'}: {str(e).splitlines()[0]}") from None
    except ConfigError as e:  # __post_init__ names keys checkpoint.<key>; in a DeepSpeed config they live elsewhere
        if where is None:
            raise
        raise ConfigError(f"{where}: {str(e).replace('checkpoint.', where + '.')}") from None
