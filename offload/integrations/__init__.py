"""tierflow inside other frameworks' training loops.

:mod:`tierflow.offload.integrations.deepspeed`: planned activation offload for a
``deepspeed.initialize`` engine (ZeRO 0-3) and the tiered optimizer as its client optimizer.
DeepSpeed itself is imported only when one of these functions is called.
:mod:`tierflow.offload.integrations.fsdp2`: FSDP2 per block (``shard_blocks``), then the same runtime
on each rank's shards.
"""

from tierflow.offload.integrations import deepspeed, fsdp2

__all__ = ["deepspeed", "fsdp2"]
