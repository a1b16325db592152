"""Models that are not the built-in GPT, for the trainer's ``model._target_``: structures a user's
model may have that a GPT does not."""

import torch
import torch.nn.functional as F
from torch import nn


class _Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.up = nn.Linear(d, 3 * d + 1)  # an odd width: FSDP2 pads the shards
        self.down = nn.Linear(3 * d + 1, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(F.gelu(self.up(self.norm(x))))


class _Stage(nn.Module):
    """A stage of a hierarchical model: its own projection, then a ModuleList of blocks."""

    def __init__(self, d: int, depth: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d, d, bias=False)
        self.blocks = nn.ModuleList(_Block(d) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        for block in self.blocks:
            x = block(x)
        return x


class ZooLM(nn.Module):
    """A language model built the ways models in the wild are: blocks in an ``nn.Sequential``
    (timm), stages holding blocks (a hierarchical model), one layer applied twice through a
    ``ModuleList`` (ALBERT), a weight tied across two stacks, a norm of the root sharing the last
    encoder block's weight, the head tied to the embedding,
    a frozen positional table, BatchNorm statistics updated by forward, a parameter forward never
    uses, and constants written as data."""

    def __init__(self, vocab_size: int, seq_len: int, d_model: int = 64, n_layer: int = 2, **_) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Parameter(torch.randn(seq_len, d_model) * 0.02, requires_grad=False)
        self.encoder = nn.Sequential(*(_Block(d_model) for _ in range(n_layer)))
        self.stages = nn.ModuleList(_Stage(d_model, depth=2) for _ in range(2))
        shared = _Block(d_model)
        self.repeated = nn.ModuleList([shared, shared])
        self.stages[1].blocks[0].up.weight = self.encoder[0].up.weight  # tied across stacks
        self.out_norm = nn.LayerNorm(d_model)
        self.out_norm.weight = self.encoder[-1].norm.weight  # held by the root and by a block
        self.norm = nn.BatchNorm1d(d_model)
        self.gain = nn.Parameter(torch.tensor([1.25]))
        self.unused = nn.Linear(d_model, 3)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self.head.weight = self.tok.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.tok(tokens) + self.pos[: tokens.shape[1]]
        x = self.encoder(x)
        for stage in self.stages:
            x = stage(x)
        for layer in self.repeated:
            x = layer(x)
        x = self.norm(self.out_norm(x).transpose(1, 2)).transpose(1, 2)
        return self.head(x * self.gain)
