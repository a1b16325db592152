"""Models that are not the built-in GPT, for the trainer's ``model._target_``: structures a user's
model may have that a GPT does not (``ZooLM``), and a Llama laid out as torchtitan lays it out
(``TitanLlama``)."""

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


def _rotations(head_dim: int, positions: int, theta: float = 10000.0) -> torch.Tensor:
    """Rotary embeddings as unit complex numbers, one row per position (a complex64 buffer)."""
    inverse = 1.0 / (theta ** (torch.arange(0, head_dim, 2).float() / head_dim))
    angles = torch.outer(torch.arange(positions).float(), inverse)
    return torch.polar(torch.ones_like(angles), angles)


def _rotate(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    turned = pairs * rotations[: x.shape[1]].view(1, x.shape[1], 1, -1)
    return torch.view_as_real(turned).flatten(3).type_as(x)


class _GroupedAttention(nn.Module):
    def __init__(self, d: int, heads: int, kv_heads: int) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, d // heads
        self.wq = nn.Linear(d, heads * self.head_dim, bias=False)
        self.wk = nn.Linear(d, kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(d, kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(heads * self.head_dim, d, bias=False)

    def forward(self, x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = _rotate(self.wq(x).view(b, t, self.heads, self.head_dim), rotations)
        k = _rotate(self.wk(x).view(b, t, self.kv_heads, self.head_dim), rotations)
        v = self.wv(x).view(b, t, self.kv_heads, self.head_dim)
        repeat = self.heads // self.kv_heads
        k, v = k.repeat_interleave(repeat, dim=2), v.repeat_interleave(repeat, dim=2)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return self.wo(y.transpose(1, 2).reshape(b, t, -1))


class _SwiGLU(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.w1, self.w3 = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, 3 * d, bias=False)
        self.w2 = nn.Linear(3 * d, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class _LlamaBlock(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.attention_norm, self.ffn_norm = nn.RMSNorm(d), nn.RMSNorm(d)
        self.attention = _GroupedAttention(d, heads, kv_heads=heads // 2)
        self.feed_forward = _SwiGLU(d)

    def forward(self, x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), rotations)
        return x + self.feed_forward(self.ffn_norm(x))


class TitanLlama(nn.Module):
    """A Llama laid out the way torchtitan lays one out: layers in an ``nn.ModuleDict``, rotary
    embeddings as a complex buffer (``torch.polar``), RMSNorm, grouped-query attention, a SwiGLU
    feed-forward and an untied output head."""

    def __init__(self, vocab_size: int, seq_len: int, d_model: int = 128, n_layer: int = 3, n_head: int = 4,
                 **_) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(vocab_size, d_model)
        self.register_buffer("rotations", _rotations(d_model // n_head, 2 * seq_len), persistent=False)
        self.layers = nn.ModuleDict({str(i): _LlamaBlock(d_model, n_head) for i in range(n_layer)})
        self.norm = nn.RMSNorm(d_model)
        self.output = nn.Linear(d_model, vocab_size, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.tok_embeddings(tokens)
        for layer in self.layers.values():
            h = layer(h, self.rotations)
        return self.output(self.norm(h))
