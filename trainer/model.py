"""The built-in decoder-only transformer and the builder that also trains a user's own module.

GPT: token + learned position embeddings, ``n_layer`` pre-norm blocks (causal self-attention
through ``scaled_dot_product_attention``, then a GELU MLP), a final LayerNorm and a head tied to
the token embedding. Written for clarity over cleverness; nanoGPT is the model to compare with.
"""

from __future__ import annotations

import importlib
import inspect
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from tierflow.offload.runtime.materialize import MaterializeError, WeightSource, materialize, record_init
from tierflow.offload.runtime.weights import DcpSource, SafetensorsSource
from tierflow.trainer.config import BUILTIN_MODEL, ConfigError, ModelConfig
from tierflow.trainer.hf import HF_MODEL, HFCausalLM, has_weights

__all__ = ["GPT", "GPTConfig", "build_model", "count_parameters", "weight_source"]


@dataclass(frozen=True, kw_only=True)
class GPTConfig:
    vocab_size: int
    seq_len: int
    n_layer: int
    n_head: int
    d_model: int
    mlp_ratio: int = 4
    dropout: float = 0.0


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        # [B, T, C] -> [B, H, T, C/H]
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.up = nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model, bias=False)
        self.down = nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model, bias=False)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.down(F.gelu(self.up(x))))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Decoder-only transformer: ``forward(tokens[B, T]) -> logits[B, T, vocab_size]``.

    Example:
        >>> model = GPT(GPTConfig(vocab_size=256, seq_len=64, n_layer=2, n_head=4, d_model=128))
        >>> model(torch.zeros(1, 8, dtype=torch.long)).shape
        torch.Size([1, 8, 256])
    """

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.head.weight = self.tok_emb.weight  # tied: one tensor, one gradient
        self.apply(self._init_weights)
        # GPT-2's scaled init of the projections that write into the residual stream.
        for name, p in self.named_parameters():
            if name.endswith(("proj.weight", "down.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        if t > self.cfg.seq_len:
            raise ValueError(f"sequence of {t} tokens exceeds the model's seq_len={self.cfg.seq_len}")
        pos = torch.arange(t, device=tokens.device)
        x = self.drop(self.tok_emb(tokens) + self.pos_emb(pos))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def count_parameters(model: nn.Module) -> int:
    """Unique parameter elements (a tied weight counts once)."""
    return sum(p.numel() for p in model.parameters())


def build_model(cfg: ModelConfig, *, vocab_size: int, seq_len: int,
                device: Optional[torch.device] = None,
                place_for: Optional[Callable[[nn.Module], Optional[Callable]]] = None,
                dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Build the module ``cfg._target_`` names.

    The built-in GPT gets every size key. A user's module gets ``cfg.kwargs`` plus each of
    ``vocab_size``, ``seq_len``, ``n_layer``, ``n_head``, ``d_model``, ``mlp_ratio``, ``dropout``
    that its constructor takes by name (or all of them if it takes ``**kwargs``); ``model=hf``
    builds the causal LM of ``model.path``. With ``model.path``, the weights are loaded from it,
    one tensor at a time: safetensors shards, or a torch.distributed.checkpoint directory
    (tierflow's ``checkpoint.dir/step-N`` among them).

    With ``device``, the model is constructed on the meta device and materialised one tensor at a
    time straight onto ``device`` (:func:`~tierflow.offload.runtime.materialize.materialize`):
    initialisation consumes the random generator exactly as eager construction does, so the
    weights are bit-identical, and host memory never holds a second copy of the model. Without
    ``device`` the module is constructed eagerly where the caller's device context says.
    ``place_for(meta_model)`` may return a ``place`` for ``materialize`` (a ``TierPlacement``:
    the parameters then go straight into a tier); it sees the model on the meta device first,
    so it can size the training state before any memory is used. ``dtype`` casts floating-point
    parameters and buffers as ``model.to(dtype)`` would, one tensor at a time.

    Raises:
        ConfigError: the target cannot be imported, is not an ``nn.Module``, or rejects its
            arguments; a weight file is missing or corrupt.
    """
    build = _constructor(cfg, vocab_size=vocab_size, seq_len=seq_len)
    if device is None:
        return build() if dtype is None else build().to(dtype)
    try:
        source = weight_source(cfg)
    except MaterializeError as exc:
        raise ConfigError(f"model.path={cfg.path}: {exc}") from None
    try:
        model, program = record_init(build)
    except ConfigError:
        raise
    except Exception as exc:  # a constructor that cannot run on the meta device: build it eagerly instead
        warnings.warn(f"{cfg._target_} cannot be built on the meta device ({type(exc).__name__}: {exc}); "
                      "building it eagerly in memory", stacklevel=2)
        model = build()
        if source is not None:
            _load_eagerly(model, source)
        return model.to(device) if dtype is None else model.to(device=device, dtype=dtype)
    place = place_for(model) if place_for is not None else None
    try:
        materialize(model, program, device=device, source=source, place=place, dtype=dtype)
    except MaterializeError as exc:
        raise ConfigError(f"{cfg._target_}: {exc}") from None
    return model


def weight_source(cfg: ModelConfig) -> Optional[WeightSource]:
    """The weights ``model.path`` holds: safetensors shards (Hugging Face format) or a DCP checkpoint."""
    if cfg.path is None:
        return None
    path = Path(cfg.path).expanduser()
    if has_weights(path):
        return SafetensorsSource(path, prefix="lm." if cfg._target_ == HF_MODEL else "")
    if (path / ".metadata").is_file():  # a torch.distributed.checkpoint, e.g. tierflow's checkpoint.dir/step-N
        return DcpSource(path, prefix="model.")
    if cfg._target_ == HF_MODEL:
        return None  # config.json only: the architecture's own random initialisation
    raise MaterializeError(f"{path} holds neither safetensors weights nor a torch.distributed.checkpoint")


def _load_eagerly(model: nn.Module, source: WeightSource) -> None:
    with torch.no_grad():
        for name, t in model.state_dict(keep_vars=True).items():
            if name in source.names():
                t.copy_(source.read(name, t))


def _constructor(cfg: ModelConfig, *, vocab_size: int, seq_len: int) -> Callable[[], nn.Module]:
    """A checked, argument-bound constructor of ``cfg._target_`` (raises ConfigError when it cannot be)."""
    offered = dict(
        vocab_size=vocab_size, seq_len=seq_len, n_layer=cfg.n_layer, n_head=cfg.n_head,
        d_model=cfg.d_model, mlp_ratio=cfg.mlp_ratio, dropout=cfg.dropout,
    )
    if cfg._target_ == BUILTIN_MODEL:
        if cfg.kwargs:
            warnings.warn(f"model.kwargs {sorted(cfg.kwargs)} are ignored by the built-in GPT", stacklevel=3)
        return lambda: GPT(GPTConfig(**offered))
    if cfg._target_ == HF_MODEL:
        return lambda: HFCausalLM(cfg.path, vocab_size=vocab_size, **cfg.kwargs)
    module_name, _, class_name = cfg._target_.rpartition(".")
    try:  # importlib, not hydra's get_class: that one logs the error a second time, over several lines
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"model._target_={cfg._target_!r} cannot be imported ({type(exc).__name__}: {exc}); "
                          "give the dotted path of an nn.Module class on PYTHONPATH") from None
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ConfigError(f"model._target_={cfg._target_!r} is not an nn.Module subclass")
    params = inspect.signature(cls).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    kwargs = {k: v for k, v in offered.items() if takes_any or k in params}
    kwargs.update(cfg.kwargs)

    def build() -> nn.Module:
        try:
            return cls(**kwargs)
        except TypeError as exc:
            raise ConfigError(f"model._target_={cfg._target_} rejected its arguments {sorted(kwargs)}: {exc}; "
                              "pass constructor arguments as +model.kwargs.NAME=VALUE") from None

    return build
