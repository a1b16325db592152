"""Attach tierflow to a DeepSpeed engine: planned activation offload, snapshots, the tiered optimizer.

DeepSpeed keeps owning what it owns (parameters, gradients and, under ZeRO, optimizer states,
partitioned and offloaded by ZeRO); tierflow adds what DeepSpeed does not plan: which *activations*
leave the device during forward and when each one comes back in backward, profiled on the real
model and held to a device budget. At ZeRO stage 0 the optimizer may also be tierflow's
:class:`TieredOptimizer`, its states streamed through host, NUMA and NVMe tiers. A few lines
around an existing loop::

    opt = tierflow.offload.integrations.deepspeed.tiered_optimizer(model, ds_config, lr=3e-4)  # ZeRO stage 0 only
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config)
    tf = tierflow.offload.integrations.deepspeed.attach(engine)            # reads ds_config["tierflow"]
    for batch in loader:
        with tf.step(batch):
            loss = loss_fn(engine(batch)); engine.backward(loss); engine.step()
    tf.close(); opt.close()

The ``tierflow`` section of the DeepSpeed config (DeepSpeed ignores keys it does not know)::

    "tierflow": {
      "offload":    {"policy": "lifetime", "device_budget_fraction": 0.5},   # OffloadConfig keys
      "tiers":      {"host": {"enabled": true, "budget_bytes": 8000000000}}, # TiersConfig keys
      "optimizer":  {"paths": ["host"], "subgroup_bytes": 67108864},          # TieredOptimizerConfig keys
      "checkpoint": {"every_steps": 1, "parity_shards": 1}                    # CheckpointConfig keys
    }

``checkpoint`` is read by ``tierflow.trainer.checkpoint.deepspeed.attach_snapshots`` (its schema lives in
``trainer``, which ``offload`` does not import); here it is only checked to be a mapping.

Note [activations only under DeepSpeed]: ZeRO-3 gathers a parameter just before its module runs
and frees it after; a plan that also moved parameters or gradients would race those hooks. The
runtime is therefore built with ``movable={"activation"}``: everything else is traced (its bytes
count against the budget) but only DeepSpeed (or the tiered optimizer, for its states) moves it.

Note [client optimizer only at stage 0]: DeepSpeed steps a client ``torch.optim.Optimizer`` as
given only when no wrapper takes it over: ZeRO stage 0 with fp32 parameters. ZeRO 1 and 2 set each
param group's ``params`` to one flat fp32 partition, ZeRO-3 to per-sub-group fp32 partitions, and
the fp16/bf16 wrappers to fp32 master copies. The tiered optimizer partitions its sub-groups and
their tier slots over the parameters it was built with, so after such a rewrite it would step
parameters that no longer receive gradients: a silently wrong result (measured: ZeRO-2 with
``zero_allow_untested_optimizer=true`` trains, with other losses). It is therefore refused before
any parameter changes: by :func:`tiered_optimizer` when the config shows the stage, by
:func:`attach` when the engine wrapped it, and by a step pre-hook that finds the param groups
rewritten. ZeRO's own ``offload_optimizer`` is the way to offload optimizer states at stages 1-3.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Union

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from tierflow.offload.core.errors import TierConfigError
from tierflow.offload.core.hardware import HardwareModel
from tierflow.offload.optim.optimizer import TieredOptimizer, TieredOptimizerConfig
from tierflow.offload.runtime.config import OffloadConfig
from tierflow.offload.runtime.offload_runtime import OffloadRuntime
from tierflow.offload.tiers.config import TiersConfig
from tierflow.offload.tiers.engine import TierEngine

__all__ = ["DeepSpeedOffload", "TierflowSection", "attach", "config_section", "client_optimizer_problems",
           "parse_section", "read_section", "tiered_optimizer"]

SECTION = "tierflow"
SECTION_KEYS = ("offload", "tiers", "optimizer", "checkpoint")
_DEFAULT_OFFLOAD = {"policy": "lifetime", "device_budget_fraction": 0.5}
_DEFAULT_TIERS = {"host": {"enabled": True}}


@dataclass(frozen=True)
class TierflowSection:
    """What the ``tierflow`` section of a DeepSpeed config describes, validated.

    Attributes:
        offload: planned activation offload (:func:`attach`).
        tiers: the tiers both the offload runtime and the tiered optimizer use.
        optimizer: the tiered optimizer (:func:`tiered_optimizer`); ``enabled`` defaults to true here,
            and false makes :func:`tiered_optimizer` return the plain optimizer; ``paths`` defaults
            to every tier ``tiers`` enables.
        checkpoint: ``CheckpointConfig`` keys for ``attach_snapshots`` (None when absent); validated there.
    """

    offload: OffloadConfig
    tiers: TiersConfig
    optimizer: TieredOptimizerConfig
    checkpoint: Optional[Mapping[str, Any]] = None


def _structured(schema: type, values: Mapping[str, Any], path: str, own_key: Optional[str] = None) -> Any:
    """``schema`` built from ``values`` with every error naming its key under ``path``."""

    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), dict(values)))
    except OmegaConfBaseException as e:
        raise ValueError(f"{path}: {str(e).splitlines()[0]}") from None
    except TierConfigError as e:  # __post_init__ names keys by the trainer's config path; use the section's
        message = str(e)
        if own_key and f"{own_key}." in message:
            raise TierConfigError(message.replace(f"{own_key}.", f"{path}.")) from None
        raise TierConfigError(f"{path}: {message}") from None


def read_section(section: Optional[Mapping[str, Any]]) -> TierflowSection:
    """The validated contents of a ``tierflow`` config section (None or {}: every default).

    Raises:
        ValueError: an unknown key or a bad value, named with its path (``tierflow.optimizer.paths``).

    Example:
        >>> read_section({"optimizer": {"paths": ["host"]}}).optimizer.paths
        ['host']
    """
    if section is not None and not isinstance(section, Mapping):
        raise ValueError(f"{SECTION} must be a mapping of {', '.join(SECTION_KEYS)}, got {type(section).__name__}")
    section = dict(section or {})
    unknown = sorted(set(section) - set(SECTION_KEYS))
    if unknown:
        raise ValueError(f"{SECTION}: unknown key(s) {unknown}; the section takes {', '.join(map(repr, SECTION_KEYS))}")
    for key in SECTION_KEYS:
        if section.get(key) is not None and not isinstance(section[key], Mapping):
            raise ValueError(f"{SECTION}.{key} must be a mapping of its config's keys, got "
                             f"{type(section[key]).__name__}")
    offload = _structured(OffloadConfig, section.get("offload") or _DEFAULT_OFFLOAD, f"{SECTION}.offload")
    tiers = _structured(TiersConfig, section.get("tiers") or _DEFAULT_TIERS, f"{SECTION}.tiers")
    # Note [optimizer paths default to the enabled tiers]: the trainer's default (nvme) would be
    # refused by the default tiers (host only); here a section names its tiers once.
    enabled = [kind for kind in ("nvme", "numa", "host") if getattr(tiers, kind).enabled]
    optimizer = _structured(TieredOptimizerConfig, {"enabled": True, "paths": enabled or ["host"],
                                                    **(section.get("optimizer") or {})},
                            f"{SECTION}.optimizer", TieredOptimizerConfig.KEY)
    checkpoint = section.get("checkpoint")
    return TierflowSection(offload, tiers, optimizer, dict(checkpoint) if checkpoint is not None else None)


def parse_section(section: Optional[Mapping[str, Any]]) -> "tuple[OffloadConfig, TiersConfig]":
    """The OffloadConfig and TiersConfig a ``tierflow`` config section describes (see :func:`read_section`).

    Raises:
        ValueError: an unknown key or a bad value, named with its path (``tierflow.offload.policy``).
    """
    parsed = read_section(section)
    return parsed.offload, parsed.tiers


def config_section(source: Any) -> Optional[Mapping[str, Any]]:
    """The ``tierflow`` section of a DeepSpeed config: a dict, a JSON file's path, or an engine's config.

    Returns None when there is none (or the config is not a mapping DeepSpeed kept, e.g. an argparse
    namespace), so every default applies.
    """
    raw = _ds_config(source)
    return raw.get(SECTION) if raw is not None else None


def _ds_config(source: Any) -> Optional[Mapping[str, Any]]:
    direct = isinstance(source, (Mapping, str, Path)) or source is None
    raw = source if direct else getattr(source, "config", None)
    if isinstance(raw, (str, Path)) and direct and not Path(raw).is_file():
        raise ValueError(f"DeepSpeed config file {str(raw)!r} does not exist; pass the dict or the JSON file's path "
                         "that deepspeed.initialize gets")
    if isinstance(raw, (str, Path)) and Path(raw).is_file():
        raw = json.loads(Path(raw).read_text())
    return raw if isinstance(raw, Mapping) else None


# --- the tiered optimizer as DeepSpeed's client optimizer -------------------------------------------

def client_optimizer_problems(ds_config: Any) -> List[str]:
    """Why DeepSpeed would not step a client optimizer as given under ``ds_config`` (empty: it would).

    Pure: reads ``zero_optimization.stage``, ``fp16.enabled`` and ``bf16.enabled`` (Note [client
    optimizer only at stage 0]). A value DeepSpeed resolves later (``"auto"``) is not a problem here;
    the step pre-hook that :func:`tiered_optimizer` installs still catches it.
    """
    raw = _ds_config(ds_config) or {}
    problems = []
    stage = (raw.get("zero_optimization") or {}).get("stage", 0)
    if isinstance(stage, int) and stage >= 1:
        problems.append(f"zero_optimization.stage={stage} (ZeRO replaces the param groups with flat fp32 partitions)")
    for key in ("fp16", "bf16", "bfloat16"):
        if (raw.get(key) or {}).get("enabled") is True:
            problems.append(f"{key}.enabled=true (DeepSpeed's mixed-precision wrapper replaces the param groups with "
                            "fp32 master copies)")
    return problems


def _refusal(why: str) -> str:
    return (f"the tiered optimizer cannot be DeepSpeed's client optimizer with {why}: it would update parameters that "
            f"no longer receive gradients, a silently wrong result (Note [client optimizer only at stage 0] in "
            f"offload/integrations/deepspeed.py). Either keep the tiered optimizer with ZeRO stage 0 and fp32 parameters, "
            f"or let DeepSpeed build the optimizer (its \"optimizer\" config section) and offload its states with "
            f"zero_optimization.offload_optimizer.device=cpu or nvme")


class _ParamGroupGuard:
    """Step pre-hook: refuses a step once a wrapper has replaced the parameters the optimizer was built on."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.params = [p for g in optimizer.param_groups for p in g["params"]]

    def __call__(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        now = [p for g in optimizer.param_groups for p in g["params"]]
        if len(now) != len(self.params) or any(a is not b for a, b in zip(now, self.params)):
            shapes = sorted({tuple(p.shape) for p in now})[:3]
            raise ValueError(_refusal(f"a DeepSpeed wrapper that replaced its param groups ({len(self.params)} "
                                      f"parameters became {len(now)} tensors of shapes {shapes}: ZeRO stage >= 1 "
                                      f"or fp16/bf16)") + "; this step was refused before any parameter changed")


def tiered_optimizer(params: Union[torch.nn.Module, Iterable[Any]], ds_config: Any = None, *,
                     base: Callable[..., torch.optim.Optimizer] = torch.optim.AdamW,
                     tiers: Optional[TierEngine] = None, hardware: Optional[HardwareModel] = None,
                     **base_kwargs: Any) -> torch.optim.Optimizer:
    """A :class:`TieredOptimizer` configured by ``ds_config["tierflow"]``, to pass to ``deepspeed.initialize``.

    Builds ``base(params, **base_kwargs)`` and wraps it with the ``tierflow.optimizer`` settings on the
    ``tierflow.tiers`` tiers (opened here, closed with the optimizer; :func:`attach` shares them).
    Works where DeepSpeed steps a client optimizer as given: ZeRO stage 0 with fp32 parameters
    (Note [client optimizer only at stage 0]); anything else is refused before a parameter changes.

    Args:
        params: the model, or its parameters / param groups (as for any torch optimizer).
        ds_config: the DeepSpeed config (dict or JSON path) that ``deepspeed.initialize`` gets; None:
            the defaults, and the stage is checked only at the first step.
        base: the optimizer class (or factory) to tier, e.g. ``torch.optim.AdamW`` (default), ``SGD``.
        tiers: an open TierEngine to use instead of ``tierflow.tiers`` (yours to close).
        hardware: calibrated links for striping the state over several paths.
        **base_kwargs: the base optimizer's hyperparameters (``lr``, ``weight_decay``, ...).

    Returns:
        The tiered optimizer; the plain ``base`` optimizer when ``tierflow.optimizer.enabled`` is false.
        Close it (``opt.close()``) after :meth:`DeepSpeedOffload.close`, when training is over.

    Raises:
        ValueError: ``ds_config`` sets a ZeRO stage >= 1 or fp16/bf16, or a bad ``tierflow`` key
            (named with its path); TierConfigError: a path whose tier is not enabled.

    Example:
        >>> opt = tiered_optimizer(model, ds_config, lr=3e-4, weight_decay=0.1)  # doctest: +SKIP
        >>> engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config)  # doctest: +SKIP
    """
    raw_section = config_section(ds_config) or {}
    section = read_section(raw_section)
    problems = client_optimizer_problems(ds_config)
    if problems and section.optimizer.enabled:
        raise ValueError(_refusal(" and ".join(problems)))
    if isinstance(params, torch.nn.Module):
        params = params.parameters()
    inner = base(params, **base_kwargs)
    if not section.optimizer.enabled:
        return inner
    raw = _ds_config(ds_config) or {}
    if raw.get("optimizer") is not None:
        warnings.warn("the DeepSpeed config's \"optimizer\" section is ignored by DeepSpeed when a client optimizer "
                      "is passed (this tiered optimizer uses base and its keyword arguments); remove it to avoid "
                      "confusion", stacklevel=2)
    cfg = section.optimizer
    accum = raw.get("gradient_accumulation_steps")
    if "backward_passes_per_step" not in (raw_section.get("optimizer") or {}) and isinstance(accum, int) and accum > 1:
        cfg = dataclasses.replace(cfg, backward_passes_per_step=accum)  # gradients are final after accum passes
    if tiers is None:
        off = [p for p in cfg.paths if not getattr(section.tiers, p).enabled]
        if off:
            raise TierConfigError(f"{SECTION}.optimizer.paths lists {off}, which {SECTION}.tiers does not enable; set "
                                  f"{SECTION}.tiers.{off[0]}.enabled=true (with its settings) or choose other paths")
    opt = TieredOptimizer(inner, config=cfg, tiers=tiers if tiers is not None else section.tiers, hardware=hardware)
    opt.register_step_pre_hook(_ParamGroupGuard(opt))  # Note [client optimizer only at stage 0]
    return opt


# --- activation offload -----------------------------------------------------------------------------

class DeepSpeedOffload:
    """tierflow's runtime attached to one DeepSpeed engine (see the module docstring).

    Args:
        engine: What ``deepspeed.initialize`` returned first (a ``DeepSpeedEngine``).
        offload: Policy and budgets; the budget is per rank.
        tiers: Tier settings (opened and closed here) or an open :class:`TierEngine` (yours to close).
        hardware: the links the planner prices transfers with (default: from ``tiers``).
    """

    def __init__(self, engine: Any, offload: OffloadConfig, tiers: Union[TiersConfig, TierEngine], *,
                 hardware: Optional[HardwareModel] = None) -> None:
        module = getattr(engine, "module", None)
        if module is None:
            raise ValueError(f"attach() needs the DeepSpeedEngine returned by deepspeed.initialize, "
                             f"got {type(engine).__name__}")
        self.engine = engine
        self.zero_stage = int(engine.zero_optimization_stage()) if hasattr(engine, "zero_optimization_stage") else 0
        self.shares_tiers = isinstance(tiers, TierEngine)
        # Note [activations only under DeepSpeed]
        self.runtime = OffloadRuntime(module, None, offload, tiers=tiers, hardware=hardware,
                                      movable=frozenset({"activation"}))

    @contextmanager
    def step(self, inputs: Any = None) -> Iterator[None]:
        """One training iteration: ``engine(batch)``, ``engine.backward(loss)``, ``engine.step()`` inside."""
        with self.runtime.step(inputs):
            yield

    @property
    def last_report(self):
        return self.runtime.last_report

    def summary(self) -> Dict[str, Any]:
        return {"zero_stage": self.zero_stage, "shares_tiers": self.shares_tiers, **self.runtime.summary()}

    def save_plan(self, directory: Union[str, Path], *, plot: bool = True) -> Dict[str, Path]:
        return self.runtime.save_plan(directory, plot=plot)

    def close(self) -> None:
        self.runtime.close()

    def __enter__(self) -> "DeepSpeedOffload":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _check_client_optimizer(engine: Any) -> None:
    """Refuse an engine that wrapped a tiered client optimizer (Note [client optimizer only at stage 0])."""
    basic = getattr(engine, "basic_optimizer", None)
    if isinstance(basic, TieredOptimizer) and getattr(engine, "optimizer", None) is not basic:
        stage = engine.zero_optimization_stage() if hasattr(engine, "zero_optimization_stage") else "?"
        raise ValueError(_refusal(f"ZeRO stage {stage}, whose {type(engine.optimizer).__name__} took it over"))


def attach(engine: Any, section: Optional[Mapping[str, Any]] = None, *,
           tiers: Optional[TierEngine] = None) -> DeepSpeedOffload:
    """Attach planned activation offload to ``engine``.

    When the engine's optimizer is a tiered optimizer that opened its own tiers (as
    :func:`tiered_optimizer` does), the runtime uses those same open tiers: one host budget, one set
    of swap directories (close the runtime first, then the optimizer).

    Args:
        engine: The ``DeepSpeedEngine``.
        section: The ``tierflow`` settings; default: the ``tierflow`` section of the config the engine
            was initialised with, else lifetime policy at half the unconstrained peak on the host tier.
        tiers: An open TierEngine to use instead of the section's ``tiers``.

    Raises:
        ValueError: a bad ``tierflow`` section, not a DeepSpeed engine, or a tiered client optimizer
            that ZeRO or a mixed-precision wrapper took over.

    Example:
        >>> tf = attach(engine, {"offload": {"policy": "lifetime", "device_budget_fraction": 0.5}})  # doctest: +SKIP
    """
    parsed = read_section(section if section is not None else config_section(engine))
    _check_client_optimizer(engine)
    optimizer = getattr(engine, "optimizer", None)
    if tiers is None and isinstance(optimizer, TieredOptimizer) and optimizer.engine is not None:
        tiers = optimizer.engine
    if tiers is not None:
        return DeepSpeedOffload(engine, parsed.offload, tiers, hardware=tiers.config.hardware_model())
    return DeepSpeedOffload(engine, parsed.offload, parsed.tiers)
