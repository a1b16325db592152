"""Which CPU kernel updates Adam/AdamW sub-groups: the wrapped torch optimizer, or DeepSpeedCPUAdam.

``cpu_kernel=torch`` keeps the optimizer the user passed (bit-identical to it). ``deepspeed``
replaces a ``torch.optim.Adam``/``AdamW`` by a ``DeepSpeedCPUAdam`` over the same parameter groups
and hyperparameters (bit-identical to plain DeepSpeedCPUAdam, not to torch: the two kernels round
differently). ``auto`` times both on the same synthetic state (interleaved, min of several) and keeps
the faster; the choice and both timings are recorded in :class:`KernelChoice`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from tierflow.offload.core.errors import TierConfigError

__all__ = ["KernelChoice", "choose_cpu_kernel", "deepspeed_cpu_adam"]


@dataclass(frozen=True)
class KernelChoice:
    """The CPU update kernel in use and why.

    Attributes:
        name: ``torch`` (the wrapped optimizer) or ``deepspeed`` (DeepSpeedCPUAdam).
        reason: one line.
        torch_s, deepspeed_s: measured seconds per update of the sample (``auto`` only, else 0).
    """

    name: str
    reason: str
    torch_s: float = 0.0
    deepspeed_s: float = 0.0


def deepspeed_cpu_adam() -> Tuple[Optional[type], str]:
    """``(DeepSpeedCPUAdam, "")`` when its CPU extension loads here, else ``(None, why)``."""
    try:
        # deepspeed is optional (the deepspeed extra) and slow to import: only when its kernels are asked for.
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        from deepspeed.ops.op_builder import CPUAdamBuilder

        CPUAdamBuilder().load(verbose=False)
    except Exception as exc:  # noqa: BLE001 - any import or build failure means "not available"
        return None, f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
    return DeepSpeedCPUAdam, ""


def _convertible(opt: torch.optim.Optimizer) -> str:
    """Why ``opt`` cannot be replaced by DeepSpeedCPUAdam ('' when it can)."""
    if type(opt) not in (torch.optim.Adam, torch.optim.AdamW):
        return f"{type(opt).__name__} is not torch.optim.Adam or AdamW"
    if any(len(s) for s in opt.state.values()):
        return "the optimizer already has state (wrap it before its first step)"
    for g in opt.param_groups:
        for flag in ("amsgrad", "maximize", "capturable", "differentiable"):
            if g.get(flag):
                return f"{flag}=True has no DeepSpeedCPUAdam equivalent"
        if any(p.device.type != "cpu" or p.dtype != torch.float32 for p in g["params"]):
            return "DeepSpeedCPUAdam needs fp32 parameters on the CPU"
        if isinstance(g["lr"], torch.Tensor):
            return "a tensor learning rate has no DeepSpeedCPUAdam equivalent"
    return ""


def _as_deepspeed(opt: torch.optim.Optimizer, cls: type) -> torch.optim.Optimizer:
    adamw = isinstance(opt, torch.optim.AdamW) or opt.param_groups[0].get("decoupled_weight_decay", False)
    groups = [{k: v for k, v in g.items() if k in ("params", "lr", "betas", "eps", "weight_decay")}
              for g in opt.param_groups]
    d = opt.defaults
    return cls(groups, lr=d["lr"], betas=d["betas"], eps=d["eps"], weight_decay=d["weight_decay"],
               adamw_mode=adamw, bias_correction=True, amsgrad=False)


def choose_cpu_kernel(opt: torch.optim.Optimizer, setting: str, *, sample_numel: int = 1 << 22,
                      rounds: int = 5) -> Tuple[torch.optim.Optimizer, KernelChoice]:
    """The optimizer whose ``step()`` the tiered optimizer runs, per ``cpu_kernel``.

    Args:
        opt: the wrapped optimizer (no state yet, or its state is converted as is).
        setting: ``torch``, ``deepspeed`` or ``auto``.
        sample_numel: fp32 elements of the synthetic state ``auto`` times both kernels on.
        rounds: timed updates per kernel (interleaved; the minimum counts).

    Raises:
        TierConfigError: ``deepspeed`` where DeepSpeedCPUAdam cannot stand in or cannot load.
    """
    if setting == "torch" or type(opt).__name__ == "DeepSpeedCPUAdam":
        return opt, KernelChoice("torch", f"the wrapped {type(opt).__name__} as it is")
    why = _convertible(opt)
    cls, missing = deepspeed_cpu_adam() if not why else (None, "")
    if setting == "deepspeed":
        if why or cls is None:
            raise TierConfigError(f"optimizer.tiered.cpu_kernel=deepspeed cannot be used: {why or missing}; "
                                  "use cpu_kernel=torch (or install deepspeed with a C++ compiler for its cpu_adam op)")
        return _as_deepspeed(opt, cls), KernelChoice("deepspeed", "cpu_kernel=deepspeed")
    if why or cls is None:
        why = why or f"DeepSpeedCPUAdam unavailable: {missing}"
        return opt, KernelChoice("torch", f"cpu_kernel=auto kept torch: {why}")
    torch_s, ds_s = _race(opt, cls, sample_numel, rounds)
    if ds_s < torch_s:
        return _as_deepspeed(opt, cls), KernelChoice(
            "deepspeed", f"cpu_kernel=auto: DeepSpeedCPUAdam {ds_s * 1e3:.1f} ms vs {type(opt).__name__} "
                         f"{torch_s * 1e3:.1f} ms per {sample_numel} elements", torch_s, ds_s)
    return opt, KernelChoice("torch", f"cpu_kernel=auto: {type(opt).__name__} {torch_s * 1e3:.1f} ms vs "
                                      f"DeepSpeedCPUAdam {ds_s * 1e3:.1f} ms per {sample_numel} elements",
                                      torch_s, ds_s)


def _race(opt: torch.optim.Optimizer, cls: type, numel: int, rounds: int) -> Tuple[float, float]:
    """Min seconds per update of ``numel`` elements: the torch optimizer's class and flags vs DeepSpeed."""
    gen = torch.Generator().manual_seed(0)
    group = {k: v for k, v in opt.param_groups[0].items() if k != "params"}

    def sample() -> torch.nn.Parameter:
        p = torch.nn.Parameter(torch.randn(numel, generator=gen))
        p.grad = torch.randn(numel, generator=gen)
        return p

    def like_opt(p: torch.nn.Parameter) -> torch.optim.Optimizer:
        twin = type(opt)([p])
        twin.param_groups[0].update(group)  # the same flags (fused, foreach...) and hyperparameters
        return twin

    kernels = {"torch": like_opt(sample()), "deepspeed": _as_deepspeed(like_opt(sample()), cls)}
    best = {name: float("inf") for name in kernels}
    for k in kernels.values():
        k.step()  # state created outside the timing
    for _ in range(rounds):
        for name, k in kernels.items():
            t0 = time.perf_counter()
            k.step()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best["torch"], best["deepspeed"]
