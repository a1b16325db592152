"""Causal language models in Hugging Face format, built from their ``config.json`` with ``transformers``.

``model=hf model.path=DIR`` trains the causal LM described by ``DIR/config.json`` (Llama, Mistral,
GPT-2, Mixtral, ...). Its weights come from ``DIR``'s safetensors files, read one tensor at a time
(:class:`~tierflow.offload.runtime.weights.SafetensorsSource`); a directory with only a config
starts from the architecture's own random initialisation. Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from tierflow.trainer.config import HF_MODEL, ConfigError

__all__ = ["HF_MODEL", "HFCausalLM", "has_weights"]


def has_weights(path: Path) -> bool:
    """Whether ``path`` holds safetensors weights (else the model starts from random weights)."""
    return (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()


class HFCausalLM(nn.Module):
    """A ``transformers`` causal LM behind the trainer's contract: ``forward(tokens) -> logits``.

    Args:
        path: A directory with ``config.json`` (and usually safetensors weights).
        vocab_size: The data's vocabulary; the model's must be at least as large.
        **kwargs: Ignored size keys the trainer offers every model (``n_layer``...): the
            architecture comes from ``config.json``.

    Raises:
        ConfigError: no ``config.json``, ``transformers`` missing, or a vocabulary too small.
    """

    def __init__(self, path: str, vocab_size: int, **kwargs: Any) -> None:
        super().__init__()
        # transformers is an optional dependency (the hf extra), and slow to import.
        try:
            from transformers import AutoConfig, AutoModelForCausalLM
        except ImportError:
            raise ConfigError("model=hf needs the transformers package: pip install 'tierflow[hf]'") from None
        root = Path(path).expanduser()
        if not (root / "config.json").is_file():
            raise ConfigError(f"model.path={path} has no config.json; point it at a Hugging Face-format directory")
        try:
            config = AutoConfig.from_pretrained(str(root), local_files_only=True)
        except (OSError, ValueError, KeyError) as exc:
            raise ConfigError(f"model.path={path}: its config.json cannot be read by transformers ({exc})") from None
        if getattr(config, "vocab_size", vocab_size) < vocab_size:
            raise ConfigError(f"model.path={path} has vocab_size={config.vocab_size} but data.vocab_size={vocab_size}; "
                              f"use data.vocab_size<={config.vocab_size}")
        self.lm = AutoModelForCausalLM.from_config(config)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=tokens, use_cache=False).logits
