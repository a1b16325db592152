"""The tiered optimizer: any ``torch.optim`` optimizer with its state in host, NUMA/CXL and NVMe tiers.

``TieredOptimizer`` wraps an optimizer *instance* (Adam, AdamW, SGD, Adagrad, DeepSpeedCPUAdam, a
user's own class) and keeps its per-parameter state out of the optimizer, in sub-groups of about
``subgroup_bytes`` parameter bytes, each packed into one slot of a tier. The update itself is the
wrapped optimizer's own ``step()`` run on just that sub-group's parameters (its state swapped into
``optimizer.state``), so the result is bit-identical to the plain optimizer with the same
implementation flags (foreach / fused / single-tensor). How a step moves the state is in
``offload/optim/_pipeline.py``; the per-sub-group update in ``offload/optim/_update.py``; the
overlap with backward in ``offload/optim/_backward.py``.

Example:
    >>> import torch
    >>> from offload import TieredOptimizer, TieredOptimizerConfig, TiersConfig, HostTierConfig
    >>> model = torch.nn.Linear(64, 64)
    >>> tiers = TiersConfig(host=HostTierConfig(enabled=True, budget_bytes=1 << 22, slab_bytes=1 << 20))
    >>> with TieredOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), tiers=tiers,
    ...                      config=TieredOptimizerConfig(paths=["host"], subgroup_bytes=8192)) as opt:
    ...     model(torch.randn(8, 64)).sum().backward()
    ...     opt.step()
    ...     opt.num_subgroups
    2

Note [atomic step]: a step either completes for every sub-group or leaves parameters and state as
they were when a tier fails. State on a tier that does I/O (nvme, numa) goes to a *fresh* slot and
the old one is freed only after every write of the step has finished (so such a tier holds up to
twice its share of the state during a step: budget for it); new parameter values wait aside until
then. State in host memory (host tier, resident) is updated in place only after all of that
succeeded, so it needs neither a second copy nor an undo copy. If any reservation, read or write
fails, the fresh slots are freed, the new parameters dropped, and :class:`TieredStepError` says
what failed; fix the cause and call ``step()`` again. ``atomic_step=False`` updates parameters in
place at once (no copy of them) and a failure then leaves a partly applied step, which the error says.
"""

from __future__ import annotations

import collections
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Dict, List, Mapping, Optional, Tuple, Union

import torch

from tierflow.offload.core.errors import ChecksumError, TierConfigError, TierError
from tierflow.offload.core.hardware import HardwareModel
from tierflow.offload.optim._backward import EarlyStep, GradReadiness, changed_grads
from tierflow.offload.optim._kernel import choose_cpu_kernel
from tierflow.offload.optim._pipeline import IN_PLACE_TIERS, StepPipeline, StepRun
from tierflow.offload.optim._state import StateInTiers, local_binding, predict_state_bytes
from tierflow.offload.optim._update import SubgroupUpdater
from tierflow.offload.optim.placement import (
    PathSpec,
    SubGroup,
    UpdateCosts,
    UpdatePlacement,
    link_bandwidth,
    partition_subgroups,
    path_bandwidth,
    place_updates,
    step_order,
)
from tierflow.offload.tiers.base import Tier
from tierflow.offload.tiers.config import TiersConfig
from tierflow.offload.tiers.engine import TierEngine
from tierflow.profiling import local_tensor

__all__ = ["TieredOptimizer", "TieredOptimizerConfig", "TieredStepError"]

MiB = 1 << 20


class TieredStepError(TierError):
    """A tiered optimizer step failed; the message says where, what state is left, and what to do."""


@dataclass(kw_only=True)
class TieredOptimizerConfig:
    """Settings of the tiered optimizer (``optimizer.tiered`` in a run's config).

    Attributes:
        enabled: wrap the run's optimizer (used by ``tierflow.trainer.optim.build_optimizer``).
        paths: tiers sub-group state is striped over, by bandwidth (``host``, ``numa``, ``nvme``);
            each must be enabled in the ``tiers`` config.
        subgroup_bytes: parameter bytes per sub-group. Larger sub-groups mean fewer, larger I/Os;
            each staging buffer holds one sub-group's state (about 2x this for Adam).
        resident_bytes: state bytes kept in local DRAM and updated in place (hot state, no I/O).
        num_buffers: staging buffers (>= 2): one updating, ``num_buffers - 2`` (at least 1) being
            prefetched, the rest draining writes. Memory: ``num_buffers`` x largest sub-group state.
        max_inflight_per_path: sub-group transfers in flight at once on one path.
        alternate_order: reverse the sub-group order every step (Note [staging cache]).
        atomic_step: keep parameters and state at the previous step when a tier fails
            (Note [atomic step]); costs a copy of the nvme/numa sub-groups' parameters during a step.
        update_device: ``auto`` (performance model), ``cpu`` or ``device`` (parameters on CUDA).
        device_budget_bytes: device memory free during the update for device-side updates.
        overlap_backward: update sub-groups on a worker thread as their gradients become final
            during backward (``offload/optim/_backward.py``). Costs room for a second copy of the
            state of every tier, host included, and a copy of the parameters during a step.
        backward_passes_per_step: backward passes per step (gradient accumulation): gradients are
            final after this many; set it to ``trainer.grad_accum``.
        cpu_kernel: ``torch`` (the wrapped optimizer), ``deepspeed`` (DeepSpeedCPUAdam for
            torch Adam/AdamW; its rounding, not torch's) or ``auto`` (the faster, measured).
        local_numa: ``auto`` binds staging buffers and resident state to the NUMA node(s) of the
            CPUs running the update when the machine has several nodes; ``off`` never binds.
    """

    KEY: ClassVar[str] = "optimizer.tiered"

    enabled: bool = False
    paths: List[str] = field(default_factory=lambda: ["nvme"])
    subgroup_bytes: int = 64 * MiB
    resident_bytes: int = 0
    num_buffers: int = 3
    max_inflight_per_path: int = 2
    alternate_order: bool = True
    atomic_step: bool = True
    update_device: str = "auto"
    device_budget_bytes: int = 0
    overlap_backward: bool = False
    backward_passes_per_step: int = 1
    cpu_kernel: str = "torch"
    local_numa: str = "auto"

    def __post_init__(self) -> None:
        k, p = self.KEY, []
        valid = ("host", "numa", "nvme")
        bad = [x for x in self.paths if x not in valid]
        if bad or not self.paths:
            p.append(f"{k}.paths={list(self.paths)} must list one or more of: {', '.join(valid)}")
        if len(set(self.paths)) != len(self.paths):
            p.append(f"{k}.paths={list(self.paths)} names a tier twice")
        if self.subgroup_bytes <= 0:
            p.append(f"{k}.subgroup_bytes={self.subgroup_bytes} must be > 0 (e.g. {64 * MiB})")
        if self.resident_bytes < 0:
            p.append(f"{k}.resident_bytes={self.resident_bytes} must be >= 0")
        if self.num_buffers < 2:
            p.append(f"{k}.num_buffers={self.num_buffers} must be >= 2 (3 overlaps read, update and write)")
        if self.max_inflight_per_path < 1:
            p.append(f"{k}.max_inflight_per_path={self.max_inflight_per_path} must be >= 1")
        for key, value, choices in (("update_device", self.update_device, ("auto", "cpu", "device")),
                                    ("cpu_kernel", self.cpu_kernel, ("torch", "deepspeed", "auto")),
                                    ("local_numa", self.local_numa, ("auto", "off"))):
            if value not in choices:
                p.append(f"{k}.{key}={value!r} is not valid; choose one of: {', '.join(choices)}")
        if self.device_budget_bytes < 0:
            p.append(f"{k}.device_budget_bytes={self.device_budget_bytes} must be >= 0")
        if self.backward_passes_per_step < 1:
            p.append(f"{k}.backward_passes_per_step={self.backward_passes_per_step} must be >= 1 "
                     "(the trainer's grad_accum)")
        if self.overlap_backward and not self.atomic_step:
            p.append(f"{k}.overlap_backward=true needs {k}.atomic_step=true (early updates must be undoable)")
        if p:
            raise TierConfigError("; ".join(p))


class TieredOptimizer(torch.optim.Optimizer):
    """Wraps ``optimizer``; its per-parameter state lives in tiers, streamed by sub-group.

    Args:
        optimizer: any ``torch.optim.Optimizer`` instance whose ``step()`` updates each parameter
            from its own gradient and ``optimizer.state[p]`` only (all of ``torch.optim`` except
            LBFGS; DeepSpeedCPUAdam; most user optimizers). It must not have taken a step yet,
            or its state is moved into the tiers at once.
        config: sub-group size, paths, buffers, atomicity, overlap, CPU kernel.
        tiers: a :class:`TierEngine` (shared, not closed here), a :class:`TiersConfig` (an engine
            is opened and closed with this optimizer), or a mapping of tier kind to :class:`Tier`.
        hardware: calibrated links for path striping and update placement; default: the tiers
            config's ``hardware_model()``, else equal weights.

    Raises:
        TierConfigError: a path is not among the enabled tiers, or the optimizer is unsupported.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, config: Optional[TieredOptimizerConfig] = None,
                 tiers: Union[TierEngine, TiersConfig, Mapping[str, Tier]],
                 hardware: Optional[HardwareModel] = None) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"TieredOptimizer wraps a torch.optim.Optimizer instance, got {type(optimizer).__name__}; "
                            f"build it first, e.g. TieredOptimizer(torch.optim.AdamW(model.parameters()), ...)")
        if isinstance(optimizer, (torch.optim.LBFGS, TieredOptimizer)):
            raise TierConfigError(f"{type(optimizer).__name__} cannot be tiered: its step is not separable by "
                                  "parameter")
        cfg = self.config = config or TieredOptimizerConfig()
        self._own_engine: Optional[TierEngine] = None
        sysfs_root = "/sys/devices/system/node"
        if isinstance(tiers, TiersConfig):
            hardware = hardware or tiers.hardware_model()
            self._own_engine = TierEngine(tiers)
            tiers = self._own_engine
        self._engine: Optional[TierEngine] = tiers if isinstance(tiers, TierEngine) else None
        if isinstance(tiers, TierEngine):
            hardware = hardware or tiers.config.hardware_model()
            sysfs_root = tiers.config.numa.sysfs_root
            tiers = tiers.tiers
        self._tiers: Dict[str, Tier] = dict(tiers)
        missing = [p for p in cfg.paths if p not in self._tiers]
        if missing:
            self._close_engine()
            raise TierConfigError(f"{TieredOptimizerConfig.KEY}.paths lists {missing}, which are not enabled "
                                  f"(enabled: {', '.join(self._tiers) or 'none'}); set tiers.<kind>.enabled=true")
        try:
            self.inner, self.cpu_kernel = choose_cpu_kernel(optimizer, cfg.cpu_kernel)  # KernelChoice: which and why
        except BaseException:
            self._close_engine()
            raise
        # Share the hyperparameters: an LR scheduler on this object steers the wrapped optimizer.
        self.defaults = self.inner.defaults
        self.param_groups = self.inner.param_groups
        self.state = StateInTiers(self._has_state)  # the state lives in the tiers; see state_dict()
        for name in ("step_pre", "step_post", "state_dict_pre", "state_dict_post", "load_state_dict_pre",
                     "load_state_dict_post"):
            setattr(self, f"_optimizer_{name}_hooks", collections.OrderedDict())
        self._patch_step_function()
        self._params = [p for g in self.inner.param_groups for p in g["params"]]
        if cfg.overlap_backward and any(local_tensor(p) is not p and p.is_cuda for p in self._params):
            self._close_engine()
            raise TierConfigError(f"{TieredOptimizerConfig.KEY}.overlap_backward=true cannot check the gradients of "
                                  "sharded CUDA parameters (FSDP2) for changes after an early update (it hashes a "
                                  "shard's bytes on the host); set it to false")
        group_of = [gi for gi, g in enumerate(self.inner.param_groups) for _ in g["params"]]
        self.subgroups: Tuple[SubGroup, ...] = partition_subgroups(
            [(gi, local_tensor(p).numel() * p.element_size()) for gi, p in zip(group_of, self._params)],
            cfg.subgroup_bytes)  # a DTensor's bytes on this rank are its shard's (Note [sharded state])
        self.local_nodes, bind = local_binding(cfg.local_numa, sysfs_root)
        self._updater = SubgroupUpdater(self.inner, self._params, self.subgroups)
        self._pipe = StepPipeline(self._updater, self._tiers, [self._path_spec(hardware, p) for p in cfg.paths],
                                  resident_bytes=cfg.resident_bytes, num_buffers=cfg.num_buffers,
                                  max_inflight_per_path=cfg.max_inflight_per_path, bind=bind,
                                  config_key=TieredOptimizerConfig.KEY)
        self._hardware = hardware
        self._closed = False
        self.num_steps = 0
        self.num_redone_steps = 0
        self._ready: Optional[GradReadiness] = None
        self._early: Optional[EarlyStep] = None
        if cfg.overlap_backward:
            self._ready = GradReadiness(self._params, self.subgroups, cfg.backward_passes_per_step, self._start_early)
        if any(len(s) for s in optimizer.state.values()):
            self.load_state_dict(optimizer.state_dict())
        else:  # a state that cannot fit is refused now, not at the first step
            self._pipe.check_room([predict_state_bytes(self.inner, [(group_of[i], self._params[i]) for i in g.param_ids])
                                   for g in self.subgroups])

    # --- public API ---------------------------------------------------------------------------

    @property
    def num_subgroups(self) -> int:
        return len(self.subgroups)

    @property
    def overlap_backward(self) -> bool:
        """Whether updates start during backward (False after a step found its gradients changed)."""
        return self._ready is not None

    @property
    def cpu_update_bytes_per_s(self) -> float:
        """Measured CPU update rate: parameter + state bytes per second (exponential average)."""
        return self._updater.cpu_update_bytes_per_s

    @property
    def counters(self) -> Dict[str, Any]:
        """I/O and time counters: reads, cache hits, writes, bytes, in-place updates, seconds."""
        return {**self._pipe.counters, "update_s": self._updater.update_s, "redone_steps": self.num_redone_steps}

    def placement(self) -> Dict[str, List[int]]:
        """Sub-group indices per path (``resident`` for hot state kept in local DRAM)."""
        out: Dict[str, List[int]] = {}
        for i, rec in enumerate(self._pipe.records):
            out.setdefault(rec.path or "none", []).append(i)
        return out

    def update_placement(self, costs: Optional[UpdateCosts] = None) -> UpdatePlacement:
        """Where each sub-group is updated (CPU or device), from the performance model.

        ``costs`` defaults to this machine: the measured CPU update rate, the hardware model's PCIe
        links and ``device_budget_bytes``; CPU-resident parameters are always updated on the CPU.
        """
        rate = self.cpu_update_bytes_per_s or 1e9
        if costs is None:
            on_device = bool(self._params) and self._params[0].is_cuda
            h2d = d2h = 0.0
            if self._hardware is not None and on_device:
                h2d = link_bandwidth(self._hardware, "host", "device")
                d2h = link_bandwidth(self._hardware, "device", "host")
            costs = UpdateCosts(cpu_update_bytes_per_s=rate, host_to_device_bytes_per_s=h2d,
                                device_to_host_bytes_per_s=d2h,
                                device_update_bytes_per_s=50 * rate if on_device else 0.0,
                                device_free_bytes=self.config.device_budget_bytes, params_on_device=on_device)
        state = [rec.layout.nbytes if rec.layout else 0 for rec in self._pipe.records]
        force = None if self.config.update_device == "auto" else self.config.update_device
        return place_updates(state, [g.param_bytes for g in self.subgroups], costs, force=force)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:  # type: ignore[override]
        """One optimizer step over every sub-group (Note [atomic step]).

        With ``overlap_backward`` part of it may already have run during backward; this finishes it.

        Raises:
            TieredStepError: a tier failed; parameters and state are as before this call.
        """
        self._check_open()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        where = self._where()
        run = self._finish_early() if self._early is not None else None
        if run is None:
            run = self._copy_phase(self._order(), where)
        self._pipe.commit(run)
        copy_all = self._ready is not None
        in_place = [i for i in self._order() if self._pipe.in_place(i, copy_all=copy_all) and i not in run.pending]
        if in_place:  # Note [in-place update]: nothing from here on does I/O
            self._pipe.update_in_place(in_place, where)
        self.num_steps += 1
        if self._ready is not None:
            self._ready.reset()
        self._pipe.trim(copy_all=copy_all)
        return loss

    def state_dict(self) -> Dict[str, Any]:
        """The wrapped optimizer's ordinary state dict (loadable by a plain optimizer of its class).

        Every sub-group is read back from its tier into new host tensors.
        """
        self._check_idle()
        try:
            for i in range(len(self.subgroups)):
                for p, s in zip(self._updater.sub_params(i), self._pipe.read_states(i)):
                    if s:
                        self.inner.state[p] = s
            return self.inner.state_dict()
        finally:
            self.inner.state.clear()

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load a plain optimizer state dict (or one from :meth:`state_dict`) into the tiers."""
        self._check_idle()
        self.inner.load_state_dict(dict(state_dict))
        self.param_groups = self.inner.param_groups  # load_state_dict makes new group dicts
        run = StepRun()
        try:
            for i in range(len(self.subgroups)):
                states = [self.inner.state.pop(p, {}) for p in self._updater.sub_params(i)]
                if any(states):
                    self._pipe.store(run, i, states, self._pipe.take_buffer(set()))
            self._pipe.drain(run)
        except BaseException as exc:
            self._pipe.rollback(run)
            raise self._step_error(exc, loading=True) from exc
        finally:
            self.inner.state.clear()
        self._pipe.commit(run)
        self._pipe.trim(copy_all=self._ready is not None)

    @property
    def engine(self) -> Optional[TierEngine]:
        """The TierEngine whose tiers hold this optimizer's state (None when it was given bare tiers).

        Either the caller's (the trainer opens one engine for the optimizer and the plan runtime,
        so one host budget is shared) or the one it opened from a TiersConfig, which closes with it.
        """
        return self._engine

    def close(self) -> None:
        """Free every slot (removing swap files when this optimizer opened the tiers). Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._ready is not None:
            self._ready.remove()
        if self._early is not None:
            self._pipe.rollback(self._early.join()[0])
            self._early = None
        self._pipe.close()
        self._close_engine()

    def __enter__(self) -> "TieredOptimizer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"TieredOptimizer({type(self.inner).__name__}, {len(self.subgroups)} sub-groups over "
                f"{'+'.join(self.config.paths)}, step {self.num_steps})")

    # --- the two ways a copy phase runs -------------------------------------------------------

    def _copy_phase(self, order: Tuple[int, ...], where: Optional[Tuple[str, ...]]) -> StepRun:
        """Stream every copy-phase sub-group now and drain its writes (Note [atomic step])."""
        run = StepRun()
        copy_all = self._ready is not None
        try:
            self._pipe.stream(run, [i for i in order if not self._pipe.in_place(i, copy_all=copy_all)], where,
                              aside=self.config.atomic_step, depth=self._depth())
            self._pipe.drain(run)
        except BaseException as exc:
            self._pipe.rollback(run)
            error = self._step_error(exc)
            if error is exc:
                raise
            raise error from exc
        return run

    def _start_early(self) -> None:
        """Called by the first final gradient of a step: stream sub-groups as they become ready."""
        if not self._closed and self._early is None:
            order = [i for i in self._ready.predicted_order() if not self._pipe.in_place(i, copy_all=True)]
            self._early = EarlyStep(self._pipe, self._ready, order, self._where(), self._depth())

    def _finish_early(self) -> Optional[StepRun]:
        """Finish the copy phase begun during backward; None when it must be redone (Note [overlap ...])."""
        run, errors = self._early.join()
        self._early = None
        changed = changed_grads(run.grads, self._updater.sub_params) if not errors else []
        if not errors and not changed and not self._ready.overrun:
            try:
                self._pipe.drain(run)
                return run
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)
        self._pipe.rollback(run)
        if errors:
            error = self._step_error(errors[0])
            if error is errors[0]:
                raise error
            raise error from errors[0]
        why = (f"gradients of sub-groups {changed[:5]} changed after their early update" if changed else
               f"gradients accumulated more than backward_passes_per_step={self.config.backward_passes_per_step} times")
        warnings.warn(f"{TieredOptimizerConfig.KEY}.overlap_backward: {why} (gradient clipping or unscaling between "
                      f"backward and step(), or more backward passes per step than configured); this step was redone "
                      f"from the final gradients, exactly, and overlap is off from now on. Set "
                      f"{TieredOptimizerConfig.KEY}.backward_passes_per_step to trainer.grad_accum, or turn "
                      f"overlap_backward off when clipping", stacklevel=3)
        self.num_redone_steps += 1
        self._ready.remove()
        self._ready = None
        return None

    # --- helpers ------------------------------------------------------------------------------

    def _has_state(self) -> bool:
        pipe = getattr(self, "_pipe", None)
        return pipe is not None and any(rec.layout is not None for rec in pipe.records)

    def _order(self) -> Tuple[int, ...]:
        return step_order(len(self.subgroups), self.num_steps, alternate=self.config.alternate_order)

    def _depth(self) -> int:
        return max(1, self.config.num_buffers - 2)

    def _where(self) -> Optional[Tuple[str, ...]]:
        return self.update_placement().where if self._params and self._params[0].is_cuda else None

    def _path_spec(self, hardware: Optional[HardwareModel], kind: str) -> PathSpec:
        # Copy-phase tiers hold two copies during an atomic step; in-place ones one (two with overlap).
        copies = 2 if self.config.atomic_step and (kind not in IN_PLACE_TIERS or self.config.overlap_backward) else 1
        return PathSpec(kind, path_bandwidth(hardware, kind), self._tiers[kind].capacity_bytes // copies)

    def _step_error(self, exc: BaseException, *, loading: bool = False) -> BaseException:
        if not isinstance(exc, TierError):
            return exc  # a bug or an interrupt: re-raised as it is (the step was still undone)
        what = "load_state_dict" if loading else f"step {self.num_steps + 1}"
        if loading or self.config.atomic_step:
            left = "parameters and optimizer state are unchanged (as after the previous step)"
        else:
            left = "parameters of sub-groups updated before the failure already hold the new step (atomic_step=false)"
        if isinstance(exc, ChecksumError):  # its message says what to do: the bytes in the tier are lost
            return TieredStepError(f"tiered optimizer {what} failed: {exc}; {left}")
        return TieredStepError(f"tiered optimizer {what} failed: {exc}; {left}. Fix the cause (free disk space, raise "
                               f"the tier's budget, or change {TieredOptimizerConfig.KEY}.paths) and call step() again")

    def _check_open(self) -> None:
        if self._closed:
            raise TierError("the tiered optimizer is closed; build a new one (or load_state_dict into it)")

    def _check_idle(self) -> None:
        self._check_open()
        if self._early is not None:
            raise TierError("a step is in progress (overlap_backward began it during backward); call step() first")

    def _close_engine(self) -> None:
        if self._own_engine is not None:
            self._own_engine.close()
            self._own_engine = None
