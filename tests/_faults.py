"""Models that fail on purpose, for launcher and recovery tests (importable by worker processes)."""

import os
import signal
from pathlib import Path

import torch
from torch import nn


class KillOnceLM(nn.Module):
    """A bigram LM whose process SIGKILLs itself on forward call ``kill_at_call`` of rank ``kill_rank``.

    Only once: the kill leaves ``marker`` behind, and a restarted process finding it trains normally.
    """

    def __init__(self, vocab_size: int, marker: str, kill_at_call: int = 3, kill_rank: int = 1,
                 hidden: int = 32) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab_size, hidden)
        self.out = nn.Linear(hidden, vocab_size)
        self.marker = Path(marker)
        self.kill_at_call = kill_at_call
        self.kill_rank = kill_rank
        self.calls = 0

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if (self.calls == self.kill_at_call and int(os.environ.get("RANK", "0")) == self.kill_rank
                and not self.marker.exists()):
            self.marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)
        return self.out(torch.tanh(self.emb(tokens)))
