"""Attach tierflow to a DeepSpeed engine: planned activation offload under any ZeRO stage.

DeepSpeed keeps owning what it owns (parameters, gradients and optimizer states, partitioned and
offloaded by ZeRO); tierflow adds what DeepSpeed does not plan: which *activations* leave the device
during forward and when each one comes back in backward, profiled on the real model and held to a
device budget. Two lines around an existing loop::

    engine, optimizer, _, _ = deepspeed.initialize(model=model, config=ds_config, ...)
    tf = offload.deepspeed_plugin.attach(engine)            # reads ds_config["tierflow"]
    for batch in loader:
        with tf.step(batch):
            loss = loss_fn(engine(batch)); engine.backward(loss); engine.step()
    tf.close()

The ``tierflow`` section of the DeepSpeed config (DeepSpeed ignores keys it does not know)::

    "tierflow": {
      "offload": {"policy": "lifetime", "device_budget_fraction": 0.5},   # OffloadConfig keys
      "tiers":   {"host": {"enabled": true, "budget_bytes": 8000000000}}  # TiersConfig keys
    }

Note [activations only under DeepSpeed]: ZeRO-3 gathers a parameter just before its module runs
and frees it after; a plan that also moved parameters or gradients would race those hooks. The
runtime is therefore built with ``movable={"activation"}``: everything else is traced (its bytes
count against the budget) but only DeepSpeed moves it.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, Mapping, Optional, Union

from offload.config import TiersConfig
from offload.engine import TierEngine
from offload.plan_config import OffloadConfig

__all__ = ["DeepSpeedOffload", "attach", "parse_section"]

SECTION = "tierflow"


def parse_section(section: Optional[Mapping[str, Any]]) -> "tuple[OffloadConfig, TiersConfig]":
    """The OffloadConfig and TiersConfig a ``tierflow`` config section describes.

    Raises:
        ValueError: an unknown key or a bad value, named with its path (``tierflow.offload.policy``).
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    section = dict(section or {})
    unknown = sorted(set(section) - {"offload", "tiers"})
    if unknown:
        raise ValueError(f"{SECTION}: unknown key(s) {unknown}; the section takes 'offload' and 'tiers'")
    offload = dict(section.get("offload") or {"policy": "lifetime", "device_budget_fraction": 0.5})
    tiers = dict(section.get("tiers") or {"host": {"enabled": True}})
    out = []
    for name, schema, values in (("offload", OffloadConfig, offload), ("tiers", TiersConfig, tiers)):
        try:
            out.append(OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), values)))
        except OmegaConfBaseException as e:
            raise ValueError(f"{SECTION}.{name}: {str(e).splitlines()[0]}") from None
    return out[0], out[1]


def _section_of(engine: Any) -> Optional[Mapping[str, Any]]:
    raw = getattr(engine, "config", None)  # what the user passed to deepspeed.initialize
    if isinstance(raw, (str, Path)) and Path(raw).is_file():
        raw = json.loads(Path(raw).read_text())
    return raw.get(SECTION) if isinstance(raw, Mapping) else None


class DeepSpeedOffload:
    """tierflow's runtime attached to one DeepSpeed engine (see the module docstring).

    Args:
        engine: What ``deepspeed.initialize`` returned first (a ``DeepSpeedEngine``).
        offload: Policy and budgets; the budget is per rank.
        tiers: Tier settings (opened and closed here) or an open :class:`TierEngine` (yours to close).
    """

    def __init__(self, engine: Any, offload: OffloadConfig, tiers: Union[TiersConfig, TierEngine]) -> None:
        from offload.runtime import OffloadRuntime

        module = getattr(engine, "module", None)
        if module is None:
            raise ValueError(f"attach() needs the DeepSpeedEngine returned by deepspeed.initialize, "
                             f"got {type(engine).__name__}")
        self.engine = engine
        self.zero_stage = int(engine.zero_optimization_stage()) if hasattr(engine, "zero_optimization_stage") else 0
        # Note [activations only under DeepSpeed]
        self.runtime = OffloadRuntime(module, None, offload, tiers=tiers, movable=frozenset({"activation"}))

    @contextmanager
    def step(self, inputs: Any = None) -> Iterator[None]:
        """One training iteration: ``engine(batch)``, ``engine.backward(loss)``, ``engine.step()`` inside."""
        with self.runtime.step(inputs):
            yield

    @property
    def last_report(self):
        return self.runtime.last_report

    def summary(self) -> Dict[str, Any]:
        return {"zero_stage": self.zero_stage, **self.runtime.summary()}

    def save_plan(self, directory: Union[str, Path], *, plot: bool = True) -> Dict[str, Path]:
        return self.runtime.save_plan(directory, plot=plot)

    def close(self) -> None:
        self.runtime.close()

    def __enter__(self) -> "DeepSpeedOffload":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def attach(engine: Any, section: Optional[Mapping[str, Any]] = None, *,
           tiers: Optional[TierEngine] = None) -> DeepSpeedOffload:
    """Attach planned activation offload to ``engine``.

    Args:
        engine: The ``DeepSpeedEngine``.
        section: The ``tierflow`` settings; default: the ``tierflow`` section of the config the engine
            was initialised with, else lifetime policy at half the unconstrained peak on the host tier.
        tiers: An open TierEngine to use instead of the section's ``tiers``.

    Raises:
        ValueError: a bad ``tierflow`` section, or not a DeepSpeed engine.

    Example:
        >>> tf = attach(engine, {"offload": {"policy": "lifetime", "device_budget_fraction": 0.5}})  # doctest: +SKIP
    """
    offload, tiers_cfg = parse_section(section if section is not None else _section_of(engine))
    return DeepSpeedOffload(engine, offload, tiers if tiers is not None else tiers_cfg)
