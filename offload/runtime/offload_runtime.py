"""``OffloadRuntime``: profile a few real iterations, plan, then run every later iteration under the plan.

Wrap your own loop's step; nothing else in it changes::

    rt = OffloadRuntime(model, optimizer, OffloadConfig(policy="lifetime", device_budget_fraction=0.5),
                        tiers=TiersConfig(host=HostTierConfig(enabled=True, budget_bytes=8 << 30)))
    for batch in batches:
        with rt.step(batch):
            loss = loss_fn(model(batch)); loss.backward(); optimizer.step(); optimizer.zero_grad()
    rt.close()

Steps ``0 .. profile_warmup-1`` are warm-up, the next ``profile_iterations`` run under the
:class:`~tierflow.profiling.LifetimeTracer`; when the last of them ends the plan is made from the last
traced iteration and validated (a budget no plan can meet raises :class:`PlanningError` there,
before training goes on). Every later step runs under the plan (:mod:`tierflow.offload.runtime._exec`);
an iteration that differs from the trace falls back for its remainder, and after
``reprofile_after`` such iterations the runtime profiles and plans again.

Note [budget from step 0]: warm-up and profiling steps (re-profiling too) run under the online
executor (Note [online executor] in ``_exec``): demand paging and budgeted eviction, no plan. The
budget is ``device_budget_bytes`` when given. Given as a fraction of the unconstrained peak, which
no one knows before the trace, it is that fraction of the training state (parameters, gradients,
optimizer states: a lower bound of the peak) until the plan replaces it with the fraction of the
traced peak; only a budget in bytes is enforced strictly before the plan (the summary's peak covers
every step either way). Without a budget below the peak nothing moves before the plan.

Note [every step is measured]: every step kind reports the peak its memory held (``StepReport.
device_peak_bytes``; on CPU it equals a tracer's measurement of the same step within 1%:
``tests/test_accounting.py``). Warm-up and profiled steps are counted by the online executor, which
sees every operation; so it runs them even without a budget (an unbounded one: it never evicts).

A model whose parameters were materialised straight into a tier (``TierPlacement``) is adopted
with :meth:`OffloadRuntime.adopt`: its parameters stay there until a step needs them.
"""

from __future__ import annotations

import sys
import time
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional, Tuple, Union

import torch
from torch import nn

from tierflow.offload.core.hardware import HardwareModel
from tierflow.offload.core.names import TierName, kind_of
from tierflow.offload.plan.explain import explain_plan, plot_plan
from tierflow.offload.plan.types import Action, OffloadPlan, PlanningError
from tierflow.offload.runtime._exec import BudgetExceededError, Executor
from tierflow.offload.runtime._grads import own_gradient_storages, settle_fsdp2
from tierflow.offload.runtime._planning import host_block_threshold, plan_trace
from tierflow.offload.runtime._residency import Residency, TransferStats
from tierflow.offload.runtime._schedule import MOVABLE
from tierflow.offload.runtime.config import OffloadConfig
from tierflow.offload.runtime.materialize import TierPlacement
from tierflow.offload.runtime.report import StepReport, add_to_totals, new_totals, nominal_hardware, warn_reserved_above
from tierflow.offload.tiers._memory import map_large_allocations, trim_freed_memory
from tierflow.offload.tiers.base import Tier
from tierflow.offload.tiers.config import HostTierConfig, TiersConfig
from tierflow.offload.tiers.engine import TierEngine
from tierflow.profiling import TraceWindow, held_storage, local_tensor, remove_hooks, save_trace
from tierflow.profiling.shapes import SizeRange, merge_sizes, observed_sizes

UNBOUNDED = sys.maxsize // 4  # the online executor's budget when there is none: it only counts

__all__ = ["BudgetExceededError", "OffloadRuntime", "StepReport", "nominal_hardware"]


class OffloadRuntime:
    """Executes an offload plan inside your training loop (see the module docstring).

    Args:
        model: The module being trained (offloading acts on it; pass the inner module, not DDP).
        optimizer: Its optimizer (or None).
        config: Policy, budgets, profiling and fallback settings (the ``offload`` config group).
        tiers: A :class:`TiersConfig` (the runtime opens and closes its tiers), an open
            :class:`TierEngine` (yours to close), or None for a host tier with default settings.
        hardware: The HardwareModel to plan with; default: the tiers config's preset or
            ``hardware_file``, else :func:`nominal_hardware` of the open tiers.
        tracer_config: Settings of the profiling tracer.
        movable: Categories the plan may move (default: parameters, gradients, optimizer states,
            activations). ``{"activation", "grad"}`` keeps the model and optimizer state resident
            between steps, for code that reads it there (in-memory snapshots, say).

    Raises:
        ValueError: bad arguments; TierConfigError: a tier cannot open.

    Example:
        >>> rt = OffloadRuntime(model, opt, OffloadConfig(policy="lifetime", device_budget_fraction=0.5))  # doctest: +SKIP
        >>> with rt.step(batch):  # doctest: +SKIP
        ...     model(batch).sum().backward(); opt.step(); opt.zero_grad()
    """

    def __init__(self, model: nn.Module, optimizer: Optional[torch.optim.Optimizer], config: OffloadConfig,
                 tiers: Union[TiersConfig, TierEngine, None] = None, hardware: Optional[HardwareModel] = None,
                 tracer_config: Any = None, movable: Optional[frozenset] = None) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if isinstance(model, nn.parallel.DistributedDataParallel):
            raise ValueError("pass the module inside DistributedDataParallel (ddp.module), not the wrapper")
        if not isinstance(config, OffloadConfig):
            raise ValueError(f"config must be an OffloadConfig, got {type(config).__name__}")
        if any(p.device.type == "meta" for p in model.parameters()):
            raise ValueError("the model has parameters on the meta device: materialise it first (into a tier with "
                             "TierPlacement, then OffloadRuntime.adopt), and create its optimizer after that")
        self.model, self.optimizer, self.config = model, optimizer, config
        first = next(model.parameters(), None)
        self.device = first.device if first is not None else torch.device("cpu")
        self._owns_engine = not isinstance(tiers, TierEngine)
        if config.policy == "none":
            self.engine = tiers if isinstance(tiers, TierEngine) else None
        elif isinstance(tiers, TierEngine):
            self.engine = tiers
        else:
            if tiers is None:
                tiers = TiersConfig(host=HostTierConfig(enabled=True))
            self.engine = TierEngine(tiers)
        if hardware is None and isinstance(tiers, TiersConfig):
            hardware = tiers.hardware_model()
        if hardware is None and self.engine is not None:
            hardware = nominal_hardware(self.engine, self.device)
        self.hardware = hardware
        self._tracer_config = tracer_config
        self._movable = frozenset(movable if movable is not None else MOVABLE)
        if getattr(optimizer, "overlap_backward", False) and self._movable & {"param", "grad"}:
            # Note [no shrinking under an early step]: a tiered optimizer that overlaps backward
            # reads gradients and parameters on its own thread while backward runs; a storage the
            # executor shrank at its free point meanwhile would be read empty, or half-copied.
            # Those stay on the device; activations (and states, which the optimizer streams
            # itself) still move.
            self._movable -= {"param", "grad"}
            warnings.warn("tierflow offload: the optimizer updates during backward (overlap_backward); parameters "
                          "and gradients stay on the device, activations still move", stacklevel=2)
        self.trace = None  # the profiled trace (all profiled iterations)
        self.plan: Optional[OffloadPlan] = None
        self.planning_trace = None  # the one iteration the plan was made for
        self._executor: Optional[Executor] = None
        self._window: Optional[TraceWindow] = None  # the iterations being profiled
        self._warmup_left = config.profile_warmup
        self._first_planned = True
        self._divergent_since_plan = 0
        self._reprofile_after = config.reprofile_after
        self._sizes: Dict[str, SizeRange] = {}  # every size each key was seen with (Note [size reservations])
        self._warned = self._warned_reserved = False
        self.step_index = 0
        self.last_report: Optional[StepReport] = None
        self.totals: Dict[str, Any] = new_totals()
        params = dict(model.named_parameters())

        def version_of(key: str) -> Optional[int]:
            p = params.get(key)
            return None if p is None else p._version  # parameters keep clean copies (Note [clean copies])

        self.residency = Residency(self._tier_for, config.max_inflight_transfers, version_of=version_of)
        # Before the tracer's and the executor's hooks, so both see the same storages.
        self._grad_hooks = own_gradient_storages(model) if config.policy != "none" else []
        if config.policy != "none":
            settle_fsdp2(model)
        self._closed = False
        self._online: Optional[Executor] = None  # Note [budget from step 0]
        self._out_of_core = False  # the state does not fit the budget: never bring it all back
        self._budget_before_plan: Optional[int] = None
        if config.policy != "none":
            self._budget_before_plan, strict = self._online_budget()
            # Note [every step is measured]
            budget = self._budget_before_plan if self._budget_before_plan is not None else UNBOUNDED
            self._online = Executor(model, optimizer, self.residency, None, None, recompute=set(), skipped=set(),
                                    budget_bytes=budget, on_divergence=self._on_divergence,
                                    movable=self._movable, tier=self._online_tier(), strict=strict)
            self._out_of_core = budget < self._state_bytes()
            if self.device.type == "cpu":
                map_large_allocations()  # the device is RAM: a freed tensor's memory must leave RSS

    # ---- before the first step -------------------------------------------------------------

    def _state_bytes(self) -> int:
        """Parameters, their gradients and optimizer states, in bytes (states estimated before the
        first step: two per parameter for Adam-like optimizers, one for the others)."""
        def nbytes(p: torch.Tensor) -> int:  # this rank's shard of a sharded parameter (Note [local shards])
            local = local_tensor(p)
            return local.numel() * local.element_size()

        params = [p for p in self.model.parameters()]
        total = sum(nbytes(p) for p in params)
        total += sum(nbytes(p) for p in params if p.requires_grad)
        if self.optimizer is not None:
            stepped = [p for g in self.optimizer.param_groups for p in g["params"]]
            per_param = 2 if "adam" in type(self.optimizer).__name__.lower() else 1
            total += per_param * sum(nbytes(p) for p in stepped)
        return total

    def _online_budget(self) -> Tuple[Optional[int], bool]:
        """(budget in bytes before the plan, whether it is strict): Note [budget from step 0]."""
        c = self.config
        if c.device_budget_bytes is not None:
            return int(c.device_budget_bytes), True
        if c.device_budget_fraction is not None and c.device_budget_fraction < 1:
            return int(c.device_budget_fraction * self._state_bytes()), False
        return None, False

    def _online_tier(self) -> str:
        """Where the online executor evicts to: below RAM on a CPU run (NVMe, then NUMA), the
        fastest open tier on a GPU run."""
        order = ("nvme", "numa", "host") if self.device.type == "cpu" else ("host", "numa", "nvme")
        opened = self.engine.tiers if self.engine is not None else {}
        return str(TierName.first(next((k for k in order if k in opened), "host")))

    def adopt(self, placement: TierPlacement, tier: str) -> int:
        """Take over parameters materialised into ``tier`` by ``placement`` (their storages are
        empty; their bytes wait in its slots): they stay there until a step needs them. Returns
        the bytes adopted. Buffers are not adopted (place only parameters).

        Raises:
            ValueError: a placed tensor is not a parameter of the model.
        """
        params = dict(self.model.named_parameters())
        total = 0
        for name, (slot, shape, dtype) in placement.slots.items():
            p = params.get(name)
            if p is None:
                raise ValueError(f"{name!r} was placed in the tier but is not a parameter of the model; "
                                 "place only parameters")
            nbytes = int(torch.Size(shape).numel()) * dtype.itemsize
            self.residency.adopt(name, held_storage(p), nbytes, tier, slot)
            total += nbytes
        placement.slots.clear()  # the slots belong to the residency table now
        self._out_of_core = True
        return total

    # ---- the step --------------------------------------------------------------------------

    @contextmanager
    def step(self, inputs: Any = None) -> Iterator[None]:
        """One training iteration (forward, backward, optimizer step) runs inside this block.

        Args:
            inputs: This step's input tensors (nested lists/tuples allowed); the tracer keys them
                as inputs and the runtime never treats them as activations.

        Raises:
            PlanningError: after the last profiling step, when no plan meets the budget.
            BudgetExceededError: a diverged iteration cannot be kept under the budget.
        """
        if self._closed:
            raise RuntimeError("the OffloadRuntime is closed; create a new one")
        start = time.perf_counter()
        self.residency.stats = TransferStats()
        if self.device.type == "cuda":
            # Each step reports its own allocated and reserved peaks; the run's are the largest of
            # them (``summary()``): code that reads the allocator's peak across steps takes those.
            torch.cuda.reset_peak_memory_stats(self.device)
        executor, mode = self._executor, "off"
        if self.config.policy == "none":
            yield
        elif executor is None and (self._warmup_left > 0 or self._first_step_makes_state()):
            mode, executor = "warmup", self._online
            with executor.iteration(inputs) if executor is not None else nullcontext():
                yield
            self._warmup_left = max(self._warmup_left - 1, 0)
        elif executor is None:
            mode, executor = "profile", self._online
            with self._profiling(inputs):
                yield
        else:
            first, self._first_planned = self._first_planned, False
            with executor.iteration(inputs, first=first):
                yield
            mode = "fallback" if executor.diverged else "planned"
            if executor.diverged:
                self._first_planned = True  # everything came back: the next iteration re-enters the plan
        self.last_report = self._report(mode, executor, time.perf_counter() - start)
        self.step_index += 1
        outgrown = executor.account.outgrown if mode in ("planned", "fallback") else {}
        if outgrown:
            self._sizes = merge_sizes(self._sizes, {k: (b, b) for k, b in outgrown.items()})
        if mode == "fallback" and outgrown:
            # A tensor larger than its reservation and the plan's slack: plan again for the sizes
            # seen (Note [size reservations]); no new profile is needed.
            self.totals["replans"] += 1
            self._plan_for_sizes()
        elif mode == "fallback" and self._reprofile_after and self._divergent_since_plan >= self._reprofile_after:
            self._reprofile()

    def _first_step_makes_state(self) -> bool:
        """Note [never trace the first step]: an optimizer creates its states lazily, inside its
        first step, so that iteration is not the steady one (its states are born mid-iteration
        and live past its end, which no cyclic plan can page: the feasible budget measured 71% of
        the peak against 12% one step later). With ``profile_warmup=0`` that step is warm-up."""
        return self.step_index == 0 and self.optimizer is not None and not self.optimizer.state

    @contextmanager
    def _profiling(self, inputs: Any) -> Iterator[None]:
        online = self._online
        if self._window is None:
            hooks = (online.pack, online.unpack) if online is not None else None
            self._window = TraceWindow(self.model, self.optimizer, num_iterations=self.config.profile_iterations,
                                       config=self._tracer_config, saved_hooks=hooks,
                                       moving=self.residency if online is not None else None)
        window = self._window
        try:
            # The tracer first, then the online executor: its fault-in mode is the inner one, so
            # the tracer sees every operation with its storages back (Note [tracing under a budget]).
            with window.iteration(inputs), \
                    online.iteration(inputs, saved_hooks=False) if online is not None else nullcontext():
                yield
        except BaseException:
            self._window = None  # a failed step spends the window: the trace must be of consecutive iterations
            raise
        if window.complete:
            self._window = None
            self._make_plan(window.trace)

    @contextmanager
    def resident(self) -> Iterator[None]:
        """Every tensor in place for code that runs between steps (evaluation, a digest, a save).

        Under a plan some tensors wait in a tier across the step boundary (their storage is empty
        then); inside this block they are back, and the next step re-enters the plan from its start.
        When the training state does not fit the budget they are not all brought back: the block
        runs under the online executor, so an operation that reads a tensor brings it back first
        and the budget holds (code that reads raw bytes rather than through torch operations must
        ``clone()`` a tensor first).

        Example:
            >>> with rt.resident():  # doctest: +SKIP
            ...     val_loss = evaluate(model)
        """
        if self._closed:
            yield
            return
        if self._out_of_core and self._online is not None:
            self._first_planned = True
            with self._between_steps(), self._online.iteration(None):
                yield
            return
        if self.residency.entries:
            self._counting_bytes_in(self.residency.arrive_all)
            self._first_planned = True  # the next iteration evicts what the plan keeps away at its start
        yield

    @contextmanager
    def _between_steps(self) -> Iterator[None]:
        """Count what moves between steps (evaluation, a digest, close) into the run's totals."""
        stats, self.residency.stats = self.residency.stats, TransferStats()
        try:
            yield
        finally:
            for name in ("bytes_in", "bytes_out"):
                for tier, b in getattr(self.residency.stats, name).items():
                    self.totals[name][tier] = self.totals[name].get(tier, 0) + b
            self.residency.stats = stats

    def _counting_bytes_in(self, bring_back: Callable[[], Any]) -> Any:
        """Run ``bring_back`` between steps, adding what it moves to the run's totals."""
        with self._between_steps():
            return bring_back()

    def _make_plan(self, trace) -> None:
        self.trace = trace
        self._sizes = merge_sizes(self._sizes, observed_sizes(trace))
        self._plan_for_sizes()

    def _plan_for_sizes(self) -> None:
        """Plan the profiled trace for every size seen so far (Note [size reservations])."""
        planned = plan_trace(self.trace, self._sizes, self.config, self.hardware, self._movable)
        for tier in sorted({d.tier for d in planned.plan.decisions if d.action is Action.SWAP}):
            self._tier_for(tier)  # every tier the plan uses is open, or fail now
        if self._executor is not None:
            self._executor.remove(restore=False)  # the new plan's first step settles what it left
        self.plan, self.planning_trace = planned.plan, planned.trace
        self.totals["reserved_keys"] = planned.num_reserved
        self._executor = Executor(self.model, self.optimizer, self.residency, planned.plan, planned.schedule,
                                  recompute=planned.recompute, skipped=planned.skipped,
                                  budget_bytes=planned.plan.device_budget_bytes, on_divergence=self._on_divergence,
                                  movable=self._movable)
        self._first_planned, self._divergent_since_plan = True, 0
        if self.device.type == "cpu":
            map_large_allocations(host_block_threshold(planned.plan))  # Note [a plan that moves nothing]

    def _on_divergence(self, reason: str) -> None:
        self._divergent_since_plan += 1
        self.totals["divergent_iterations"] += 1
        if not self._warned:
            self._warned = True
            warnings.warn(f"tierflow offload: step {self.step_index} diverged from the profiled trace ({reason}); "
                          f"the rest of such iterations runs on the fallback policy"
                          + (f", re-profiling after {self._reprofile_after} of them"
                             if self.config.reprofile_after else ""), stacklevel=2)

    def _reprofile(self) -> None:
        self._executor.remove(restore=False)  # the online executor takes over where it left things
        self._executor = None
        self._warmup_left = 0
        if self.device.type == "cpu":  # the online policy keeps the budget: RSS follows what is live again
            map_large_allocations()
            trim_freed_memory()
        self.totals["reprofiles"] += 1
        self._reprofile_after *= 2  # back off: a model that is simply dynamic is not profiled every few steps

    def _tier_for(self, name: str) -> Tier:
        kind = kind_of(name)
        if self.engine is None or kind not in self.engine.tiers:
            raise PlanningError(f"the plan moves tensors to tier {name!r}, which is not open; enable it "
                                f"(tiers.{kind}.enabled=true) or plan with the tiers that are")
        return self.engine.tiers[kind]

    # ---- reports ---------------------------------------------------------------------------

    def _report(self, mode: str, executor: Optional[Executor], step_s: float) -> StepReport:
        stats = self.residency.stats
        fb = executor.fallback if executor is not None else None
        peak, hits, fallbacks, reason, resident, absent = 0, 0, stats.on_demand, "", (), ()
        if executor is not None:
            resident, absent = tuple(executor.account.resident_at()), tuple(executor.account.absent_at)
            peak = max(max(resident, default=0), executor.tracked_peak)
            hits, fallbacks, reason = executor.hits, fallbacks + executor.fallback_evictions, executor.reason
            if self.device.type == "cuda":
                peak = int(torch.cuda.max_memory_allocated(self.device))
        reserved = int(torch.cuda.max_memory_reserved(self.device)) if self.device.type == "cuda" else 0
        if mode == "planned" and self.plan is not None and not self._warned_reserved:
            self._warned_reserved = warn_reserved_above(self.step_index, peak, reserved, self.plan.device_budget_bytes)
        report = StepReport(step=self.step_index, mode=mode, bytes_out=tuple(sorted(stats.bytes_out.items())),
                            bytes_in=tuple(sorted(stats.bytes_in.items())), stall_s=stats.stall_s, step_s=step_s,
                            device_peak_bytes=peak, device_reserved_peak_bytes=reserved, plan_hits=hits,
                            fallbacks=fallbacks,
                            plan_missed=executor.missed if executor is not None else 0, divergence=reason,
                            fallback_evicted=tuple(sorted(fb.evicted_bytes.items())) if fb is not None else (),
                            fallback_settled_peak_bytes=fb.settled_peak if fb is not None else 0,
                            resident_by_interval=resident, absent_by_interval=absent)
        add_to_totals(self.totals, report)
        return report

    def summary(self) -> Dict[str, Any]:
        """Totals over every step so far, with the plan's budget and the unconstrained peak."""
        out = {"policy": self.config.policy, **{k: (dict(v) if isinstance(v, dict) else v) for k, v in self.totals.items()}}
        if self._budget_before_plan is not None:
            out["online_budget_bytes"] = self._budget_before_plan
            out["out_of_core"] = self._out_of_core
        if self.plan is not None:
            out.update(device_budget_bytes=self.plan.device_budget_bytes,
                       unconstrained_peak_bytes=self.plan.unconstrained_peak_bytes,
                       predicted_peak_bytes=self.plan.predicted_device_peak_bytes,
                       predicted_slowdown=self.plan.slowdown, decisions=len(self.plan.decisions),
                       hardware=self.plan.hardware)
        return out

    def save_plan(self, directory: Union[str, Path], *, plot: bool = True) -> Dict[str, Path]:
        """Write ``plan.json``, ``plan.txt`` (the explanation), ``plan.png`` and ``trace.tftrace``
        (owner-only) into ``directory``; returns their paths (empty before a plan exists)."""
        if self.plan is None:
            return {}

        directory = Path(directory)
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        paths = {"plan": self.plan.save(directory / "plan.json"), "trace": save_trace(self.trace, directory / "trace.tftrace")}
        text = directory / "plan.txt"
        text.write_text(explain_plan(self.plan) + "\n")
        text.chmod(0o600)
        paths["explanation"] = text
        if plot:
            paths["plot"] = plot_plan(self.planning_trace, self.plan, directory / "plan.png")
        return paths

    def close(self, restore: bool = True) -> None:
        """Bring every tensor back, remove every hook, close the tiers the runtime opened. Idempotent.

        Args:
            restore: False leaves what waits in a tier there (its bytes are lost when the tiers
                close): for a training state that does not fit, once nothing needs it any more.
        """
        if self._closed:
            return
        self._closed = True
        try:
            if self._window is not None:
                self._window.close()
            for executor in (self._executor, self._online):
                if executor is not None:
                    executor.remove(restore=False)
            remove_hooks(self._grad_hooks)
            failed = self._counting_bytes_in(self.residency.arrive_what_can) if restore else None
            self.residency.free_clean()
        finally:
            if self.engine is not None and self._owns_engine:
                self.engine.close()
        if failed is not None and sys.exc_info()[0] is None:  # called in a finally of a failure: that one counts
            raise failed

    def __enter__(self) -> "OffloadRuntime":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

