"""One training step, evaluation, and the parameter digest that proves bit-identity."""

from __future__ import annotations

import hashlib
from contextlib import nullcontext
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from tierflow.offload import SubgroupStepper
from tierflow.offload.integrations.fsdp2 import is_sharded
from tierflow.trainer.data import Batch, ShardedLoader
from tierflow.trainer.distributed import Runtime

__all__ = ["evaluate", "parameter_digest", "train_step"]


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, micro_batches: Sequence[Batch],
               amp_dtype: Optional[torch.dtype], grad_clip: float,
               step: Optional[SubgroupStepper] = None) -> torch.Tensor:
    """One optimizer step over ``micro_batches``; returns the mean loss (a detached 0-d tensor).

    With ``step`` (a :class:`~tierflow.offload.optim.SubgroupStepper`) clipping and the update run
    one sub-group at a time, bit-identically to ``clip_grad_norm_`` and ``optimizer.step()``;
    without clipping or accumulation, inside backward (``SubgroupStepper.fused_into_backward``).
    """
    accum = len(micro_batches)
    total = torch.zeros((), device=micro_batches[0][0].device)
    # Nothing needs every gradient first (no clipping, one micro-batch, no DDP reduction): each
    # sub-group is updated inside backward as soon as its gradients are final, the same bits.
    # Under DDP or FSDP2 a gradient is final only after its reduction: both update after backward.
    # FSDP2's gradients are DTensors: their norms are partial sums that DTensor reduces over the
    # ranks where the total is first used, as in torch's clip_grad_norm_ (the same operations).
    reduced = isinstance(model, DDP) or is_sharded(model)
    fused = step is not None and grad_clip <= 0 and accum == 1 and not reduced
    # With clipping, each gradient's norm is taken as it becomes final (in the last backward).
    early_norms = step is not None and grad_clip > 0 and not reduced
    for i, (inputs, targets) in enumerate(micro_batches):
        # DDP all-reduces gradients only on the last micro-batch of the step.
        sync = nullcontext() if i == accum - 1 or not isinstance(model, DDP) else model.no_sync()
        streamed = step.fused_into_backward() if fused else \
            step.norms_in_backward() if early_norms and i == accum - 1 else nullcontext()
        with sync, streamed:
            loss = _loss(model, inputs, targets, amp_dtype)
            (loss / accum).backward()
        total += loss.detach()
    if fused:
        pass  # updated in backward
    elif step is not None and grad_clip > 0:  # clipping streamed sub-group by sub-group
        step.clip_and_step(model.parameters(), grad_clip)
    else:
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        (step or optimizer.step)()
    optimizer.zero_grad(set_to_none=True)
    return total / accum


@torch.no_grad()
def evaluate(model: nn.Module, loader: ShardedLoader, num_batches: int, amp_dtype: Optional[torch.dtype],
             rt: Runtime) -> float:
    """Mean loss over the first ``num_batches`` global batches of the ``val`` split (the same every time)."""
    model.eval()
    total = torch.zeros((), device=rt.device)
    count = 0
    for i in range(num_batches):
        for inputs, targets in loader.micro_batches(i, split="val"):
            total += _loss(model, inputs, targets, amp_dtype)
            count += 1
    model.train()
    return rt.mean(total / count).item()


def _loss(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, amp_dtype: Optional[torch.dtype]) -> torch.Tensor:
    with torch.autocast(device_type=inputs.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        logits = model(inputs)
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def parameter_digest(model: nn.Module) -> str:
    """SHA-256 over every parameter's bytes in name order: equal digests mean bit-identical weights."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        h.update(name.encode())
        # A copy made by an operation: a tensor waiting in a tier comes back for it (one at a time).
        # A sharded (FSDP2) parameter is gathered first: a collective, so every rank digests.
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        h.update(full.detach().to("cpu", copy=True).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
