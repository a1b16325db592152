"""Token sources: a synthetic language the model can really learn, and a user's own token file.

Both sources are *addressed*, not iterated: the global batch of optimizer step ``s`` is a pure
function of ``(seed, split, s)``. A data position is therefore just a step number (what a snapshot
records), and every rank slices its share of the same global batch, so the samples a run sees do
not depend on the world size or on gradient accumulation.
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path
from typing import List, Tuple

import numpy as np
import torch

from tierflow.trainer.config import ConfigError, DataConfig

__all__ = ["ShardedLoader", "SyntheticMarkov", "TokenFile", "TokenSource", "build_source"]

Batch = Tuple[torch.Tensor, torch.Tensor]


def _stream_seed(seed: int, split: str, step: int) -> int:
    digest = hashlib.blake2b(f"{seed}:{split}:{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class TokenSource:
    """A source of ``[batch, seq_len + 1]`` int64 windows (inputs are ``[:, :-1]``, targets ``[:, 1:]``)."""

    vocab_size: int
    seq_len: int

    def global_batch(self, split: str, step: int, batch: int) -> torch.Tensor:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError


class SyntheticMarkov(TokenSource):
    """A seeded first-order Markov language with ``branching`` successors per token.

    The transition table is drawn once from ``seed`` (distinct successors per token, their probabilities
    from a flat Dirichlet), the first token of each sequence is uniform. A model that learns the
    table reaches :attr:`entropy_floor` nats per token; a model that learns nothing stays at
    ``log(vocab_size)``.
    """

    def __init__(self, cfg: DataConfig, seed: int) -> None:
        self.vocab_size, self.seq_len, self.seed = cfg.vocab_size, cfg.seq_len, seed
        g = torch.Generator().manual_seed(_stream_seed(seed, "language", 0))
        v, k = cfg.vocab_size, cfg.branching
        # Distinct successors per row in O(V*k): a random row shift plus k distinct shared offsets.
        shift = torch.randint(v, (v, 1), generator=g)
        self.successors = (shift + torch.randperm(v, generator=g)[:k]) % v
        weights = -torch.log(torch.rand(v, k, generator=g, dtype=torch.float64).clamp_min(1e-12))
        self.probs = weights / weights.sum(dim=1, keepdim=True)
        self.cdf = self.probs.cumsum(dim=1)
        self.cdf[:, -1] = 1.0
        self.entropy_floor = self._expected_loss_floor()

    def _expected_loss_floor(self) -> float:
        """Mean over positions of H(X[t+1] | X[t]) with X[0] uniform: the best achievable loss."""
        v = self.vocab_size
        row_entropy = -(self.probs * self.probs.log()).sum(dim=1)
        dist = torch.full((v,), 1.0 / v, dtype=torch.float64)
        total = 0.0
        for _ in range(self.seq_len):
            total += float(dist @ row_entropy)
            flow = (dist[:, None] * self.probs).flatten()
            dist = torch.zeros(v, dtype=torch.float64).index_add_(0, self.successors.flatten(), flow)
        return total / self.seq_len

    def global_batch(self, split: str, step: int, batch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(_stream_seed(self.seed, split, step))
        out = torch.empty(batch, self.seq_len + 1, dtype=torch.long)
        out[:, 0] = torch.randint(self.vocab_size, (batch,), generator=g)
        draws = torch.rand(self.seq_len, batch, 1, generator=g, dtype=torch.float64)
        for t in range(self.seq_len):
            prev = out[:, t]
            choice = torch.searchsorted(self.cdf[prev], draws[t]).clamp_max(self.cdf.shape[1] - 1)
            out[:, t + 1] = self.successors[prev].gather(1, choice).squeeze(1)
        return out

    def describe(self) -> str:
        return (f"synthetic Markov language, vocab {self.vocab_size}, loss floor {self.entropy_floor:.3f} nats "
                f"(uniform {math.log(self.vocab_size):.3f})")


class TokenFile(TokenSource):
    """Random windows from a flat binary file of uint16/uint32 tokens (a numpy memmap).

    The file is split by position: the first ``1 - val_fraction`` of it is ``train``, the rest
    ``val``. Windows start at seeded random offsets inside their split.

    Raises:
        ConfigError: the file is missing, empty, not a whole number of tokens, or a split is
            shorter than one window.
    """

    def __init__(self, cfg: DataConfig, seed: int) -> None:
        self.vocab_size, self.seq_len, self.seed = cfg.vocab_size, cfg.seq_len, seed
        path = Path(cfg.path or "").expanduser()
        if not path.is_file():
            raise ConfigError(f"data.path={cfg.path} does not exist or is not a file; "
                              "pass data.path=/path/to/tokens.bin (a flat uint16/uint32 token file)")
        itemsize = np.dtype(cfg.dtype).itemsize
        size = os.path.getsize(path)
        if size == 0 or size % itemsize:
            raise ConfigError(f"data.path={path} holds {size} bytes, not a whole number of {cfg.dtype} tokens; "
                              "check data.dtype (uint16 or uint32)")
        self.path = path
        top = _max_token(path, np.dtype(cfg.dtype))
        if top >= cfg.vocab_size:  # found before any work, not at the batch that happens to hold it
            raise ConfigError(f"data.path={path} contains token id {top} >= data.vocab_size={cfg.vocab_size}; "
                              f"set data.vocab_size to at least {top + 1}")
        self.tokens = np.memmap(path, dtype=cfg.dtype, mode="r")
        n = len(self.tokens)
        n_val = int(n * cfg.val_fraction)
        self.bounds = {"train": (0, n - n_val), "val": (n - n_val, n)}
        window = cfg.seq_len + 1
        for split, (lo, hi) in self.bounds.items():
            if hi - lo < window:
                raise ConfigError(f"data.path={path} has {hi - lo} {split} tokens (of {n}), fewer than "
                                  f"data.seq_len+1={window}; use a longer file, a smaller data.seq_len "
                                  "or another data.val_fraction")

    def global_batch(self, split: str, step: int, batch: int) -> torch.Tensor:
        lo, hi = self.bounds[split]
        g = torch.Generator().manual_seed(_stream_seed(self.seed, split, step))
        starts = torch.randint(lo, hi - self.seq_len, (batch,), generator=g).numpy()
        rows = np.stack([np.asarray(self.tokens[s : s + self.seq_len + 1], dtype=np.int64) for s in starts])
        out = torch.from_numpy(rows)
        top = int(out.max())
        if top >= self.vocab_size:
            raise ConfigError(f"data.path={self.path} contains token id {top} >= data.vocab_size="
                              f"{self.vocab_size}; set data.vocab_size to at least {top + 1}")
        return out

    def describe(self) -> str:
        n = len(self.tokens)
        return f"token file {self.path} ({n:,} tokens, vocab {self.vocab_size})"


def _max_token(path: Path, dtype: np.dtype, chunk_bytes: int = 64 << 20) -> int:
    """The largest token id in the file, read in chunks (not mapped: a mapping's pages would count in RSS)."""
    top = 0
    chunk_bytes -= chunk_bytes % dtype.itemsize
    with open(path, "rb") as f:
        while True:
            buf = f.read(chunk_bytes)
            if not buf:
                return top
            top = max(top, int(np.frombuffer(buf, dtype=dtype).max()))


def build_source(cfg: DataConfig, seed: int) -> TokenSource:
    return SyntheticMarkov(cfg, seed) if cfg.kind == "synthetic" else TokenFile(cfg, seed)


class ShardedLoader:
    """This rank's micro-batches of each optimizer step.

    Micro-step ``m`` of rank ``r`` takes rows ``[(m * world + r) * micro, ... + micro)`` of the
    step's global batch, so the union over ranks and micro-steps is exactly the global batch.
    """

    def __init__(self, source: TokenSource, *, global_batch: int, grad_accum: int, rank: int,
                 world_size: int, device: torch.device) -> None:
        self.source, self.global_batch, self.grad_accum = source, global_batch, grad_accum
        self.rank, self.world_size, self.device = rank, world_size, device
        self.micro_batch = global_batch // (grad_accum * world_size)

    def micro_batches(self, step: int, split: str = "train") -> List[Batch]:
        rows = self.source.global_batch(split, step, self.global_batch)
        out = []
        for m in range(self.grad_accum):
            start = (m * self.world_size + self.rank) * self.micro_batch
            chunk = rows[start : start + self.micro_batch].to(self.device, non_blocking=True)
            out.append((chunk[:, :-1], chunk[:, 1:]))
        return out
