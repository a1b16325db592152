"""In-memory checkpointing and automatic recovery.

Snapshots of the training state go, lazily and in the background, into shared memory owned by a
per-node store process (:mod:`tierflow.trainer.checkpoint.store`); they are spread over peers with
erasure coding, persisted in torch.distributed.checkpoint format, and restored on start from
local memory, then peers, then disk. ``docs/checkpointing.md`` has the whole picture;
:mod:`tierflow.trainer.checkpoint.deepspeed` attaches the same snapshots to a DeepSpeed engine.
"""

from tierflow.trainer.checkpoint._state import ModuleState, StateSource
from tierflow.trainer.checkpoint.manager import (
    Checkpointer,
    NoCheckpointing,
    check_checkpoint_config,
    check_restart_env,
    default_persist_dir,
    open_checkpointer,
    resolve_node_id,
    run_config_hash,
    run_identity,
    start_checkpointing,
)
from tierflow.trainer.checkpoint.persist import find_checkpoints, load_checkpoint, save_checkpoint
from tierflow.trainer.checkpoint.recovery import RestorePlan, RestoreResult, choose_restore, restore_latest
from tierflow.trainer.checkpoint.snapshotter import Holding, SnapshotHandle, Snapshotter, reference_tier_state
from tierflow.trainer.checkpoint.store import StoreClient, StoreError, default_store_dir, list_stores, stop_store

__all__ = ["Checkpointer", "Holding", "NoCheckpointing", "ModuleState", "RestorePlan", "RestoreResult", "SnapshotHandle", "Snapshotter",
           "StateSource", "StoreClient", "StoreError", "check_checkpoint_config", "check_restart_env", "choose_restore",
           "default_persist_dir", "default_store_dir", "find_checkpoints", "list_stores", "load_checkpoint", "open_checkpointer",
           "reference_tier_state", "restore_latest", "resolve_node_id", "run_config_hash", "run_identity", "save_checkpoint",
           "start_checkpointing", "stop_store"]
