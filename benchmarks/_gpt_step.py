"""One training step of the built-in GPT as the runtime benchmarks drive it, with or without
activation checkpointing of every block (the peer the plan runtime is measured against).

Shared by ``offload_runtime.py`` (CPU) and ``gpu_offload.py`` (CUDA).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def train_step(model, opt, x: torch.Tensor, per_block_checkpoint: bool = False) -> torch.Tensor:
    """Forward, backward and optimizer step on ``x``; returns the loss (detached)."""
    if per_block_checkpoint:
        t = x.shape[1]
        h = model.drop(model.tok_emb(x) + model.pos_emb(torch.arange(t, device=x.device)))
        for block in model.blocks:
            h = checkpoint(block, h, use_reentrant=False)
        logits = model.head(model.ln_f(h))
    else:
        logits = model(x)
    loss = F.cross_entropy(logits.flatten(0, 1), x.flatten())
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()
