"""Typed configuration of a training run.

The dataclasses here are the source of truth: they are registered with Hydra's ConfigStore as the
schema of the config tree, and the YAML files in ``conf/`` only select a group option and override
values. Each component receives its own small config; nothing downstream sees the whole tree.

Every dataclass validates itself in ``__post_init__`` and reports *all* of its problems at once in a
single :class:`ConfigError` line that names the key and what would be valid.
"""

from __future__ import annotations

import warnings
from dataclasses import MISSING, Field, dataclass, field, fields
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore

from tierflow.offload.core.validation import one_of, raise_if
from tierflow.offload.optim.optimizer import TieredOptimizerConfig  # optimizer.tiered is owned by the tiered optimizer
from tierflow.offload.runtime.config import OffloadConfig  # the offload group is owned by the runtime
from tierflow.offload.tiers.config import TiersConfig  # the tiers group is owned by the tier engine

__all__ = [
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "LoggingConfig",
    "ModelConfig",
    "OffloadConfig",
    "OptimizerConfig",
    "TiersConfig",
    "TrainConfig",
    "TrainerConfig",
    "micro_batch_size",
]

BUILTIN_MODEL = "tierflow.trainer.model.GPT"
HF_MODEL = "tierflow.trainer.hf.HFCausalLM"


class ConfigError(ValueError):
    """A user's configuration is wrong; the message says which key and what would be valid."""



def _positive(problems: List[str], key: str, value: float) -> None:
    if value <= 0:
        problems.append(f"{key}={value} must be > 0")




def _default_of(f: Field) -> Any:
    return f.default_factory() if f.default is MISSING and f.default_factory is not MISSING else f.default


@dataclass(kw_only=True)
class ModelConfig:
    """The model to train.

    ``_target_`` names an ``nn.Module`` class. The built-in GPT gets every size key below; a user's
    own module gets ``kwargs`` plus whichever of ``vocab_size``, ``seq_len`` and the size keys its
    constructor accepts by name. Its ``forward(tokens[B, T]) -> logits[B, T, vocab]`` contract is the
    one the trainer relies on. ``path`` holds the weights to start from (read one tensor at a time):
    safetensors shards or a torch.distributed.checkpoint directory; with ``model=hf`` it is a
    Hugging Face-format directory whose ``config.json`` also gives the architecture.
    """

    _target_: str = BUILTIN_MODEL
    n_layer: int = 2
    n_head: int = 4
    d_model: int = 128
    mlp_ratio: int = 4
    dropout: float = 0.0
    path: Optional[str] = None
    kwargs: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        p: List[str] = []
        if self._target_ == HF_MODEL and not self.path:
            p.append("model.path is required with model=hf: a directory with config.json and safetensors weights")
        for key in ("n_layer", "n_head", "d_model", "mlp_ratio"):
            _positive(p, f"model.{key}", getattr(self, key))
        if self.n_head > 0 and self.d_model > 0 and self.d_model % self.n_head:
            p.append(
                f"model.d_model={self.d_model} is not divisible by model.n_head={self.n_head}; "
                f"choose n_head among {', '.join(str(h) for h in _divisors(self.d_model))}"
            )
        if not 0.0 <= self.dropout < 1.0:
            p.append(f"model.dropout={self.dropout} must be in [0, 1)")
        if "." not in self._target_:
            p.append(f"model._target_={self._target_!r} must be a dotted path like mypkg.MyModule")
        raise_if(p, ConfigError)


@dataclass(kw_only=True)
class DataConfig:
    """Where tokens come from.

    ``kind=synthetic``: a seeded sparse Markov language (see :mod:`tierflow.trainer.data`), each token
    followed by one of ``branching`` successors. ``kind=tokens``: a flat file of ``dtype`` tokens
    (a numpy memmap) at ``path``; its last ``val_fraction`` is held out for evaluation.
    """

    kind: str = "synthetic"
    vocab_size: int = 256
    seq_len: int = 64
    branching: int = 4
    path: Optional[str] = None
    dtype: str = "uint16"
    val_fraction: float = 0.05

    def __post_init__(self) -> None:
        p: List[str] = []
        one_of(p, "data.kind", self.kind, ["synthetic", "tokens"])
        _positive(p, "data.vocab_size", self.vocab_size)
        _positive(p, "data.seq_len", self.seq_len)
        one_of(p, "data.dtype", self.dtype, ["uint16", "uint32"])
        if self.kind == "synthetic" and not 1 <= self.branching <= self.vocab_size:
            p.append(f"data.branching={self.branching} must be in [1, data.vocab_size={self.vocab_size}]")
        if self.kind == "tokens":
            if not self.path:
                p.append("data.path is required with data=tokens; pass data.path=/path/to/tokens.bin")
            if not 0.0 < self.val_fraction < 1.0:
                p.append(f"data.val_fraction={self.val_fraction} must be in (0, 1)")
            if self.dtype == "uint16" and self.vocab_size > 2**16:
                p.append(f"data.vocab_size={self.vocab_size} does not fit data.dtype=uint16; use data.dtype=uint32")
        raise_if(p, ConfigError)


@dataclass(kw_only=True)
class OptimizerConfig:
    """Optimizer and learning-rate schedule (linear warm-up, then cosine down to ``min_lr_ratio``).

    ``tiered.enabled=true`` keeps the optimizer state in the run's ``tiers`` (``docs/optimizer.md``).
    """

    name: str = "adamw"
    lr: float = 3e-3
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    momentum: float = 0.9
    schedule: str = "cosine"
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    tiered: TieredOptimizerConfig = field(default_factory=TieredOptimizerConfig)

    def __post_init__(self) -> None:
        p: List[str] = []
        one_of(p, "optimizer.name", self.name, ["adamw", "sgd"])
        one_of(p, "optimizer.schedule", self.schedule, ["cosine", "constant"])
        _positive(p, "optimizer.lr", self.lr)
        _positive(p, "optimizer.eps", self.eps)
        for key in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, key) < 1.0:
                p.append(f"optimizer.{key}={getattr(self, key)} must be in [0, 1)")
        if self.weight_decay < 0:
            p.append(f"optimizer.weight_decay={self.weight_decay} must be >= 0")
        if self.warmup_steps < 0:
            p.append(f"optimizer.warmup_steps={self.warmup_steps} must be >= 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            p.append(f"optimizer.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        raise_if(p, ConfigError)


@dataclass(kw_only=True)
class TrainerConfig:
    """The loop: how long, how big a batch, how precise, how often to evaluate.

    ``global_batch`` sequences make one optimizer step; they are split over ``grad_accum``
    micro-steps and over the ranks, so each rank runs micro-batches of
    ``global_batch / (grad_accum * world_size)`` sequences. ``profile_iterations > 0`` traces
    that many steps (after ``profile_warmup`` untraced ones) with the lifetime tracer and writes
    the trace and its report into the run directory; the tracer detaches afterwards.
    ``parallel`` says how several ranks share the model: ``ddp`` replicates it, ``fsdp2`` shards
    parameters, gradients and optimizer states per block with ``fully_shard`` (docs/fsdp2.md).
    """

    steps: int = 200
    global_batch: int = 32
    grad_accum: int = 1
    grad_clip: float = 1.0
    precision: str = "auto"
    seed: int = 1337
    eval_every: int = 50
    eval_batches: int = 4
    device: str = "auto"
    deterministic: bool = True
    profile_iterations: int = 0
    profile_warmup: int = 1
    parallel: str = "ddp"

    def __post_init__(self) -> None:
        p: List[str] = []
        one_of(p, "trainer.parallel", self.parallel, ["ddp", "fsdp2"])
        for key in ("steps", "global_batch", "grad_accum", "eval_batches"):
            _positive(p, f"trainer.{key}", getattr(self, key))
        for key in ("profile_iterations", "profile_warmup"):
            if getattr(self, key) < 0:
                p.append(f"trainer.{key}={getattr(self, key)} must be >= 0")
        if self.profile_iterations > 0 and self.profile_warmup + self.profile_iterations > self.steps:
            p.append(f"trainer.profile_warmup+trainer.profile_iterations={self.profile_warmup}+"
                     f"{self.profile_iterations} exceeds trainer.steps={self.steps}; profile fewer iterations "
                     "or train more steps")
        if self.grad_clip < 0:
            p.append(f"trainer.grad_clip={self.grad_clip} must be >= 0 (0 disables clipping)")
        if self.eval_every < 0:
            p.append(f"trainer.eval_every={self.eval_every} must be >= 0 (0 evaluates only at the end)")
        one_of(p, "trainer.precision", self.precision, ["auto", "fp32", "bf16", "bf16_master"])
        if self.device not in ("auto", "cpu", "cuda"):
            p.append(f"trainer.device={self.device!r} is not valid; choose one of: auto, cpu, cuda")
        if self.global_batch > 0 and self.grad_accum > 0 and self.global_batch % self.grad_accum:
            p.append(
                f"trainer.global_batch={self.global_batch} is not divisible by trainer.grad_accum="
                f"{self.grad_accum}; choose grad_accum among {', '.join(str(d) for d in _divisors(self.global_batch))}"
            )
        raise_if(p, ConfigError)


@dataclass(kw_only=True)
class LoggingConfig:
    """Where metrics and run files go.

    ``backend=wandb`` logs offline into the run directory unless ``project`` is set (then online);
    ``mode`` forces ``offline``/``online``. ``logging=none`` keeps only the local metrics file.
    """

    backend: str = "wandb"
    project: Optional[str] = None
    entity: Optional[str] = None
    mode: str = "auto"
    run_root: str = "runs"
    run_name: Optional[str] = None
    progress: bool = True
    plot: bool = True

    def __post_init__(self) -> None:
        p: List[str] = []
        one_of(p, "logging.backend", self.backend, ["wandb", "none"])
        one_of(p, "logging.mode", self.mode, ["auto", "offline", "online"])
        if self.run_name is not None and ("/" in self.run_name or self.run_name in ("", ".", "..")):
            p.append(f"logging.run_name={self.run_name!r} must be a plain directory name")
        raise_if(p, ConfigError)


@dataclass(kw_only=True)
class CheckpointConfig:
    """In-memory snapshots, their copies on peers, disk checkpoints and automatic recovery.

    Every ``every_steps`` optimizer steps the state is snapshotted into shared memory owned by a
    per-node store process (it survives the trainer), copied in the background during the next
    forward/backward. With ``parity_shards = m > 0`` each snapshot is also spread over peers on
    other nodes as ``data_shards = k`` data + ``m`` parity shards (``k = 1``: ``m`` full
    replicas), so losing any ``m`` nodes still allows recovery. Every ``persist_every``
    snapshots (0: never by cadence), on SIGUSR1, on SIGTERM and at the end
    (``persist_on_finish``) the snapshot is also written to ``dir`` in
    torch.distributed.checkpoint format. On start the newest complete snapshot is restored:
    ``restore=auto`` tries memory (local, then peers) then disk. ``node_id`` names this rank's
    node (``auto``: ``$TIERFLOW_NODE_ID`` or the host name; ``%r``/``%l`` expand to the rank/local rank).

    Trade-off: each snapshot holds two copies of the state per rank in host memory (double
    buffer), plus ``2 * (k + m - 1) / k`` shard copies per peer.
    """

    enabled: bool = False
    every_steps: int = 10
    data_shards: int = 1
    parity_shards: int = 0
    persist_every: int = 0
    persist_on_finish: bool = True
    dir: Optional[str] = None
    keep: int = 2
    restore: str = "auto"
    node_id: str = "auto"
    store_dir: Optional[str] = None
    idle_timeout_s: float = 600.0
    free_on_finish: bool = True

    def __post_init__(self) -> None:
        p: List[str] = []
        _positive(p, "checkpoint.every_steps", self.every_steps)
        _positive(p, "checkpoint.data_shards", self.data_shards)
        _positive(p, "checkpoint.keep", self.keep)
        _positive(p, "checkpoint.idle_timeout_s", self.idle_timeout_s)
        for key in ("parity_shards", "persist_every"):
            if getattr(self, key) < 0:
                p.append(f"checkpoint.{key}={getattr(self, key)} must be >= 0 (0 turns it off)")
        if self.data_shards > 1 and self.parity_shards == 0:
            p.append(f"checkpoint.data_shards={self.data_shards} without parity spreads no redundancy; "
                     "set checkpoint.parity_shards >= 1 or data_shards=1")
        one_of(p, "checkpoint.restore", self.restore, ["auto", "memory", "disk", "none"])
        bare = self.node_id.replace("%r", "").replace("%l", "")
        if not bare or any(not (c.isalnum() or c in "_.-") for c in bare):
            p.append(f"checkpoint.node_id={self.node_id!r} must be auto or letters, digits and _.- "
                     "(%r and %l expand to the rank and local rank)")
        raise_if(p, ConfigError)
        if not self.enabled:  # a setting of snapshots that are off would be silently ignored
            changed = [f"checkpoint.{f.name}={getattr(self, f.name)}" for f in fields(self)
                       if f.name != "enabled" and getattr(self, f.name) != _default_of(f)]
            if changed:
                warnings.warn(f"{', '.join(changed)} ignored: snapshots are off; add checkpoint=memory to take them",
                              stacklevel=2)


@dataclass(kw_only=True)
class TrainConfig:
    """The whole tree. Only the entry point holds it; components get their own part."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    offload: OffloadConfig = field(default_factory=OffloadConfig)
    tiers: TiersConfig = field(default_factory=TiersConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


def micro_batch_size(cfg: TrainerConfig, world_size: int) -> int:
    """Sequences per rank per micro-step.

    Raises:
        ConfigError: when ``world_size`` ranks cannot share ``global_batch / grad_accum`` evenly.
    """
    per_step = cfg.global_batch // cfg.grad_accum
    if per_step % world_size:
        unit = cfg.grad_accum * world_size
        nearest = max(unit, round(cfg.global_batch / unit) * unit)
        raise ConfigError(
            f"world size {world_size} does not divide trainer.global_batch/trainer.grad_accum="
            f"{cfg.global_batch}/{cfg.grad_accum}={per_step} sequences per step; make trainer.global_batch "
            f"a multiple of grad_accum*world_size={unit} (e.g. trainer.global_batch={nearest})"
        )
    return per_step // world_size


def _divisors(n: int) -> List[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def register_configs() -> None:
    """Register the schema with Hydra's ConfigStore (idempotent)."""
    ConfigStore.instance().store(name="tierflow_schema", node=TrainConfig)
