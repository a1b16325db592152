"""Everything that can be checked before a run does any work, and the dry run.

Each check fails with one line naming the key and what would be valid (``ConfigError``), or with
the numbers (``TierConfigError`` for a node whose RAM cannot hold its ranks and host tiers).
"""

from __future__ import annotations

import warnings
from typing import Any, Dict

import psutil
import torch

from tierflow.offload.runtime.materialize import MaterializeError
from tierflow.offload.tiers.capacity import check_host_memory, host_demand, ranks_on_this_node
from tierflow.trainer.build import model_name, uses_tiers
from tierflow.trainer.checkpoint import check_checkpoint_config
from tierflow.trainer.config import ConfigError, TrainConfig, micro_batch_size
from tierflow.trainer.data import TokenSource, build_source
from tierflow.trainer.distributed import env_world_size
from tierflow.trainer.model import build_model, count_parameters, weight_source

__all__ = ["check_before_work", "dry_run", "resident_training_state_bytes"]


def check_before_work(cfg: TrainConfig) -> TokenSource:
    """Batch split over ranks, the token file, the model target, checkpoint settings and host RAM.

    Returns:
        The token source (built here because opening it is one of the checks).
    """
    micro_batch_size(cfg.trainer, env_world_size())
    if cfg.offload.policy == "none" and (cfg.tiers.preset not in ("none", "host") or cfg.tiers.hardware_file):
        warnings.warn(f"tiers={cfg.tiers.preset} (hardware_file={cfg.tiers.hardware_file}) is not used: "
                      "offload.policy=none moves nothing; choose a policy, e.g. offload=lifetime", stacklevel=3)
    check_checkpoint_config(cfg.checkpoint, env_world_size())
    # Under FSDP2 the fp32 shards are the masters (Note [mixed precision on shards]): nothing to stage.
    if cfg.trainer.precision == "bf16_master" and cfg.optimizer.tiered.enabled and cfg.trainer.parallel != "fsdp2":
        raise ConfigError("trainer.precision=bf16_master keeps fp32 master weights in the optimizer state, which "
                          "the tiered optimizer does not stage yet; use optimizer.tiered.enabled=false (offloading "
                          "pages masters and moments through the tiers), trainer.precision=bf16, or "
                          "trainer.parallel=fsdp2 (whose fp32 shards are the masters)")
    source = build_source(cfg.data, cfg.trainer.seed)
    _check_model_builds(cfg)
    _check_host_memory(cfg)  # every rank of this node with its host tiers must fit, before any tier opens
    return source


def dry_run(cfg: TrainConfig) -> Dict[str, Any]:
    """Check config, data and model construction (on the meta device: no memory) without training."""
    world = env_world_size()
    micro = micro_batch_size(cfg.trainer, world)
    source = build_source(cfg.data, cfg.trainer.seed)
    with torch.device("meta"):
        model = build_model(cfg.model, vocab_size=cfg.data.vocab_size, seq_len=cfg.data.seq_len)
    n = count_parameters(model)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"model": model_name(cfg), "parameters": n, "param_bytes": param_bytes,
            # fp32 weights + grads + AdamW's two moments: the training state offloading will move.
            "training_state_bytes": param_bytes * 4 if cfg.optimizer.name == "adamw" else param_bytes * 3,
            "world_size": world, "micro_batch": micro, "grad_accum": cfg.trainer.grad_accum,
            "tokens_per_step": cfg.trainer.global_batch * cfg.data.seq_len, "data": source.describe()}


def _check_host_memory(cfg: TrainConfig) -> None:
    """Refuse (TierConfigError, with the numbers) a node whose ranks and host tiers cannot fit in RAM.

    A rank's process memory is estimated as its RSS now plus, when it trains on the CPU, the
    model's training state (weights, gradients, optimizer moments), which lives in host RAM too.
    """
    if not uses_tiers(cfg) or not (cfg.tiers.host.enabled or cfg.tiers.numa.enabled):
        return
    process = psutil.Process().memory_info().rss + resident_training_state_bytes(cfg)
    check_host_memory(host_demand(cfg.tiers, ranks_on_node=ranks_on_this_node(), process_bytes_per_rank=process))


def resident_training_state_bytes(cfg: TrainConfig) -> int:
    """The training state a rank keeps in its own RAM (beyond its host tiers, counted apart).

    On a GPU, none: weights, gradients and optimizer states live on the device. On the CPU the
    weights and gradients are process memory; so are the optimizer's states, unless the tiered
    optimizer keeps them in the tiers (NVMe is not RAM; a host or NUMA tier is counted by its
    budget), so they are not counted twice.
    """
    on_cpu = cfg.trainer.device == "cpu" or (cfg.trainer.device == "auto" and not torch.cuda.is_available())
    if not on_cpu:
        return 0
    report = dry_run(cfg)
    if cfg.optimizer.tiered.enabled:
        return report["param_bytes"] * 2  # weights and gradients
    budget = cfg.offload.device_budget_bytes
    if cfg.offload.policy != "none" and budget is not None and budget < report["training_state_bytes"]:
        return budget  # the device is RAM: offloading keeps the resident state within the budget
    return report["training_state_bytes"]


def _check_model_builds(cfg: TrainConfig) -> None:
    """Build the model on the meta device so a bad ``model._target_`` fails before any work, and
    read the headers of the weights ``model.path`` names (a missing or corrupt file fails here)."""
    try:
        weight_source(cfg.model)
    except MaterializeError as exc:
        raise ConfigError(f"model.path={cfg.model.path}: {exc}") from None
    try:
        with torch.device("meta"):
            build_model(cfg.model, vocab_size=cfg.data.vocab_size, seq_len=cfg.data.seq_len)
    except (NotImplementedError, RuntimeError):
        pass  # a module that cannot be built on meta is checked by the real build instead
