"""tierflow inside other frameworks' training loops.

:mod:`tierflow.offload.integrations.deepspeed`: planned activation offload for a
``deepspeed.initialize`` engine (ZeRO 0-3) and the tiered optimizer as its client optimizer.
DeepSpeed itself is imported only when one of these functions is called.
"""

from tierflow.offload.integrations import deepspeed

__all__ = ["deepspeed"]
