"""Small user-defined modules the trainer must accept through model._target_."""

import torch
from torch import nn


class BigramLM(nn.Module):
    """A toy LM that predicts from the current token only (causal by construction)."""

    def __init__(self, vocab_size: int, hidden: int = 32) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab_size, hidden)
        self.out = nn.Linear(hidden, vocab_size)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.emb(tokens)))


class NotAModule:
    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
