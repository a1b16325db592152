"""Models that fail on purpose, for launcher and recovery tests (importable by worker processes)."""

import os
import signal
from pathlib import Path

import torch
from torch import nn

from tierflow.trainer.model import GPT, GPTConfig


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


class CorruptSwapOnceLM(GPT):
    """The built-in GPT, except that at forward call ``corrupt_at_call`` it flips every byte of
    every swap file under ``swap_dir`` (where its parameters wait), once: ``marker`` remembers it."""

    def __init__(self, vocab_size: int, seq_len: int, swap_dir: str, marker: str, corrupt_at_call: int = 6,
                 n_layer: int = 2, n_head: int = 4, d_model: int = 128) -> None:
        super().__init__(GPTConfig(vocab_size=vocab_size, seq_len=seq_len, n_layer=n_layer, n_head=n_head,
                                   d_model=d_model))
        self.swap_dir, self.marker = Path(swap_dir), Path(marker)
        self.corrupt_at_call = corrupt_at_call
        self.calls = 0

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.corrupt_at_call and not self.marker.exists():
            self.marker.touch()
            for path in self.swap_dir.glob("tierflow-swap-*/swap.bin"):
                data = bytearray(path.read_bytes())
                path.write_bytes(bytes(b ^ 0xFF for b in data))
        return super().forward(tokens)


class FullTierOnRankLM(nn.Module):
    """A bigram LM whose rank ``rank`` raises ``TierFullError`` at forward call ``at_call``, while
    its peers go on into the step's all-reduce: a failure on one rank after training started."""

    def __init__(self, vocab_size: int, at_call: int = 3, rank: int = 1, hidden: int = 32) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab_size, hidden)
        self.out = nn.Linear(hidden, vocab_size)
        self.at_call, self.rank, self.calls = at_call, rank, 0

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        from tierflow.offload import TierFullError

        self.calls += 1
        if self.calls == self.at_call and int(os.environ.get("RANK", "0")) == self.rank:
            raise TierFullError("nvme tier: out of room on this rank only (injected by the test)")
        return self.out(torch.tanh(self.emb(tokens)))


class KillOnceGPT(GPT):
    """The built-in GPT, except that its process SIGKILLs itself on forward call ``kill_at_call``,
    once: ``marker`` remembers it, and the same command run again trains normally."""

    def __init__(self, vocab_size: int, seq_len: int, marker: str, kill_at_call: int = 6, n_layer: int = 2,
                 n_head: int = 4, d_model: int = 128, kill_rank: int = -1) -> None:
        super().__init__(GPTConfig(vocab_size=vocab_size, seq_len=seq_len, n_layer=n_layer, n_head=n_head,
                                   d_model=d_model))
        self.marker, self.kill_at_call, self.calls = Path(marker), kill_at_call, 0
        self.kill_rank = kill_rank  # -1: whichever rank gets there first

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        mine = self.kill_rank in (-1, int(os.environ.get("RANK", "0")))
        if self.calls == self.kill_at_call and mine and not self.marker.exists():
            self.marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)
        return super().forward(tokens)
