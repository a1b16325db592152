"""Compose the Hydra config tree from ``conf/`` plus command-line overrides into a typed config.

We use Hydra's compose API rather than ``@hydra.main`` so that (a) every rank under torchrun
composes the same tree without each creating its own timestamped output folder, (b) nothing is
written before the config is known to be valid, and (c) Hydra's multi-line exceptions become one
line that names the key and what would be valid.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import List, Sequence, Tuple

from omegaconf import DictConfig, OmegaConf

from tierflow.trainer.config import ConfigError, TrainConfig, register_configs

__all__ = ["GROUPS", "config_dir", "group_options", "load_config"]

GROUPS = ("model", "data", "optimizer", "trainer", "logging", "offload", "tiers", "checkpoint")


def config_dir() -> Path:
    """The directory holding ``config.yaml`` (``$TIERFLOW_CONFIG_DIR`` wins when set)."""
    override = os.environ.get("TIERFLOW_CONFIG_DIR")
    if override:
        path = Path(override).expanduser().resolve()
        if not (path / "config.yaml").is_file():
            raise ConfigError(f"TIERFLOW_CONFIG_DIR={override} has no config.yaml; point it at a copy of conf/")
        return path
    return Path(str(resources.files("tierflow.conf")))


def group_options(group: str) -> List[str]:
    """The option names available for one config group, e.g. ``model`` -> ``[gpt1b, medium, ...]``."""
    return sorted(p.stem for p in (config_dir() / group).glob("*.yaml"))


def load_config(overrides: Sequence[str] = ()) -> Tuple[TrainConfig, DictConfig]:
    """Compose ``conf/config.yaml`` with ``overrides`` and validate it.

    Args:
        overrides: Hydra override strings, e.g. ``["model=small", "trainer.steps=50"]``.

    Returns:
        The typed config (every ``__post_init__`` has run) and the composed ``DictConfig`` (for
        saving alongside the run).

    Raises:
        ConfigError: one line naming the offending key and what would be valid.

    Example:
        >>> cfg, _ = load_config(["trainer.steps=10"])
        >>> cfg.trainer.steps
        10
    """
    # hydra is imported only when a config is composed (the library never needs it).
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    _check_keys(overrides)
    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(config_dir()), version_base=None):
            composed = compose("config", overrides=list(overrides))
    except ConfigError:
        raise
    except Exception as exc:  # Hydra raises several unrelated exception types
        raise ConfigError(_one_line(exc)) from None
    finally:
        GlobalHydra.instance().clear()
    # Build each group on its own so that every group's problems are reported, not just the first.
    parts, problems = {}, []
    for group in GROUPS:
        try:
            parts[group] = OmegaConf.to_object(composed[group])
        except ConfigError as exc:
            problems.append(str(exc))
        except Exception as exc:
            problems.append(_one_line(exc))
    if problems:
        raise ConfigError("; ".join(problems))
    typed = TrainConfig(**parts)
    return typed, composed


def _check_keys(overrides: Sequence[str]) -> None:
    """Name unknown keys and group options ourselves: Hydra's own message lists neither."""
    schema = OmegaConf.structured(TrainConfig)
    problems = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            problems.append(f"override {item!r} has no '='; write key=value, e.g. trainer.steps=100")
            continue
        if key.startswith(("+", "~", "hydra.", "hydra/")) or key == "hydra":
            continue
        if key in GROUPS:
            options = group_options(key)
            if value not in options:
                problems.append(f"unknown option {key}={value}; valid options for {key}: {', '.join(options)}")
            continue
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(schema, parent) if parent else schema
        if node is None and parent.startswith("model.kwargs"):
            continue
        if not isinstance(node, DictConfig) or (leaf not in node and not parent.startswith("model.kwargs")):
            where = parent or "the top level"
            valid = ", ".join(node.keys()) if isinstance(node, DictConfig) else ", ".join(GROUPS)
            problems.append(f"unknown config key {key!r}; valid keys under {where}: {valid}")
    if problems:
        raise ConfigError("; ".join(problems))


def _one_line(exc: BaseException) -> str:
    parts = []
    while exc is not None and len(parts) < 3:
        first = [line for line in str(exc).strip().splitlines() if "$VALUE" not in line]
        if first and first[0] not in parts:
            parts.append(first[0].rstrip("."))
        exc = exc.__cause__ or exc.__context__
    return ": ".join(parts) or "invalid configuration"
