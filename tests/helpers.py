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


class BranchyTiedLM(nn.Module):
    """Two parallel branches joined by a product, a residual, and an output head tied to the embedding."""

    def __init__(self, vocab_size: int, hidden: int = 32) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab_size, hidden)
        self.left = nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.GELU(), nn.Linear(2 * hidden, hidden))
        self.right = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, hidden), nn.Tanh())
        self.mix = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, vocab_size, bias=False)
        self.out.weight = self.emb.weight  # tied: one parameter used by two modules

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.emb(tokens)
        h = h + self.mix(self.left(h) * self.right(h))
        return self.out(h)


class DataDependentLM(nn.Module):
    """Control flow that changes per step: an extra block runs only when the batch's token sum is
    odd; with ``reorder``, both blocks always run and an odd sum runs the extra one first.

    A step that skips the extra block the trace has stays on the plan (Note [module calls not
    made]); one that runs a call the trace lacks, or the calls in another order, leaves it."""

    def __init__(self, vocab_size: int, hidden: int = 32, reorder: bool = False) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab_size, hidden)
        self.body = nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.GELU(), nn.Linear(2 * hidden, hidden))
        self.extra = nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.Tanh(), nn.Linear(2 * hidden, hidden))
        self.out = nn.Linear(hidden, vocab_size)
        self.reorder = reorder

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.emb(tokens)
        odd = int(tokens.sum()) % 2
        if self.reorder:
            for block in (self.extra, self.body) if odd else (self.body, self.extra):
                h = h + block(h)
        else:
            h = h + self.body(h)
            if odd:
                h = h + self.extra(h)
        return self.out(h)


def disk_fills_at(fail_at: int):
    """An NVMe-tier I/O backend that fails every write from the ``fail_at``-th on (counting from 1)
    with ENOSPC, like a disk filling mid-transfer. ``.writes`` counts the writes tried."""
    import errno
    import os

    from tierflow.offload.tiers._nvme_io import PosixIO

    class DiskFillsAt(PosixIO):
        def __init__(self) -> None:
            self.fail_at, self.writes = fail_at, 0

        def write(self, ctx, file, buf, offset):
            self.writes += 1
            if self.writes >= self.fail_at:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            super().write(ctx, file, buf, offset)

    return DiskFillsAt()


def fake_numa_sysfs(root, cpulists):
    """A /sys/devices/system/node tree under ``root``: node N lists CPUs ``cpulists[N]`` ("" for a
    memory-only node, how a CXL expander appears), 16 GiB each, distance 10 to itself."""
    n = len(cpulists)
    for node, cpus in cpulists.items():
        d = root / f"node{node}"
        d.mkdir(parents=True)
        (d / "cpulist").write_text(cpus + "\n")
        (d / "meminfo").write_text(f"Node {node} MemTotal: 16777216 kB\nNode {node} MemFree: 8388608 kB\n")
        (d / "distance").write_text(" ".join(["10", "20"] + ["30"] * (n - 2)) + "\n")
    return root
