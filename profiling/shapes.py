"""Tensors whose size changes from one iteration to the next, and the sizes a plan reserves for them.

A mixture-of-experts layer that loops over its experts hands each expert the tokens routed to it,
so every activation an expert saves has a size that depends on the batch; a loader that yields
two sequence lengths does the same to every activation. The points and keys repeat (Note
[saved-tensor keys] numbers tensors by where and why they are made, never by size); only
``size_bytes`` differs. A plan made for the last profiled iteration's exact sizes would not apply
to the next iteration; a plan made for a *reservation* does, for every iteration whose tensors
are no larger.

Note [size reservations]: a key whose size differed among the profiled iterations, or whose
*family* varied (its siblings in a ``ModuleList``: ``blocks.0.experts.3[0]:saved1`` belongs to
``blocks.#.experts.#[0]:saved1``), reserves its largest profiled size times ``1 + headroom``.
Every other key keeps its exact size, so a static model plans exactly as before. The family
only decides *whether* a key varies, never how large it is: siblings may have different widths
(the stages of a U-Net) and must not inherit each other's sizes. Headroom is the memory-vs-
stability knob: more reserves memory a smaller batch does not use, less lets a batch larger than
any profiled one leave the plan (the runtime then learns the new size and plans again, see
:mod:`tierflow.offload.runtime.offload_runtime`).
"""

from __future__ import annotations

import math
import re
from dataclasses import replace
from typing import Dict, FrozenSet, Mapping, Tuple

from tierflow.profiling.trace import Category, LifetimeTrace

__all__ = ["SizeRange", "family_of", "observed_sizes", "merge_sizes", "plan_reservations", "reserved_sizes",
           "reserve_sizes", "temporary_scopes"]

#: (smallest, largest) size in bytes a key was seen with.
SizeRange = Tuple[int, int]

_INDEX = re.compile(r"(?<=\.)\d+(?=[.\[:]|$)|^\d+(?=[.\[:]|$)")


def family_of(key: str) -> str:
    """The key with every numeric module-path component replaced by ``#``.

    Example:
        >>> family_of("blocks.0.experts.3[0]:saved1")
        'blocks.#.experts.#[0]:saved1'
        >>> family_of("blocks.12.mlp.weight:exp_avg")
        'blocks.#.mlp.weight:exp_avg'
    """
    path, sep, rest = key.partition("[")
    if not sep:
        path, sep, rest = key.partition(":")
    return _INDEX.sub("#", path) + sep + rest


def observed_sizes(trace: LifetimeTrace) -> Dict[str, SizeRange]:
    """Per key, the smallest and largest size any of ``trace``'s records of it had."""
    out: Dict[str, SizeRange] = {}
    for r in trace.tensors:
        lo, hi = out.get(r.key, (r.size_bytes, r.size_bytes))
        out[r.key] = (min(lo, r.size_bytes), max(hi, r.size_bytes))
    return out


def merge_sizes(*ranges: Mapping[str, SizeRange]) -> Dict[str, SizeRange]:
    """The union of several :func:`observed_sizes` results (e.g. from successive profiles)."""
    out: Dict[str, SizeRange] = {}
    for sizes in ranges:
        for key, (lo, hi) in sizes.items():
            old = out.get(key)
            out[key] = (lo, hi) if old is None else (min(old[0], lo), max(old[1], hi))
    return out


def _varying(sizes: Mapping[str, SizeRange]) -> FrozenSet[str]:
    families = {family_of(k) for k, (lo, hi) in sizes.items() if lo != hi}
    return frozenset(k for k in sizes if family_of(k) in families)


def reserved_sizes(sizes: Mapping[str, SizeRange], headroom: float) -> Dict[str, int]:
    """Per key that varies (Note [size reservations]), the bytes a plan reserves for it.

    Args:
        sizes: From :func:`observed_sizes` (or :func:`merge_sizes`).
        headroom: Fraction above the largest size seen, e.g. 0.25.

    Returns:
        ``key -> bytes`` for varying keys only; keys not in it keep their traced size.

    Example:
        >>> reserved_sizes({"m.experts.0[0]:saved0": (800, 1000), "m.experts.1[0]:saved0": (900, 900),
        ...                 "head[0]:saved0": (64, 64)}, 0.25)
        {'m.experts.0[0]:saved0': 1250, 'm.experts.1[0]:saved0': 1125}
    """
    if not headroom >= 0:
        raise ValueError(f"headroom={headroom!r} must be a fraction >= 0, e.g. 0.25")
    return {k: int(math.ceil(sizes[k][1] * (1 + headroom))) for k in sorted(_varying(sizes))}


def _module_family(key: str) -> str:
    """``blocks.#.experts.#`` for ``blocks.0.experts.2[0]:saved1`` and for a temporary's key
    (``forward_post blocks.0.experts.2[0]:tmp3``: the label of the point it follows)."""
    return family_of(key.rpartition(" ")[2].partition("[")[0])


def plan_reservations(trace: LifetimeTrace, sizes: Mapping[str, SizeRange], headroom: float) -> Dict[str, int]:
    """The reservations a plan of ``trace`` makes (Note [size reservations]), by category.

    Saved activations are what the runtime finds by key and checks the size of: they are reserved
    when they vary. A temporary's key names the n-th allocation after a point, which may be another
    tensor in another iteration (ZeRO-3's gathers), so its sizes may "vary" without meaning; it is
    reserved only inside a module whose saved activations vary (an expert, its parent), where its
    size follows theirs. Everything else is planned at the last iteration's size.
    """
    categories = {r.key: r.category for r in trace.tensors}
    saved = {k: v for k, v in sizes.items() if categories.get(k) is Category.ACTIVATION}
    out = reserved_sizes(saved, headroom)
    modules = {_module_family(k) for k in out}
    if modules:
        def inside(key: str) -> bool:
            fam = _module_family(key)
            return any(fam == m or fam.startswith(m + ".") for m in modules)

        temporaries = {k: v for k, v in sizes.items() if categories.get(k) is Category.TEMPORARY and inside(k)}
        out.update(reserved_sizes(temporaries, headroom))
    return out


def temporary_scopes(trace: LifetimeTrace, reserved: Mapping[str, int]) -> Dict[str, str]:
    """Per reserved temporary, the module whose saved activations its size follows: the outermost
    module on its point's path whose family saves activations that vary.

    Note [temporaries follow their scope]: nobody sees a temporary's real size on a planned step
    (no operation is watched there), so the runtime accounts it as its scope's saved tensors turned
    out: at the largest fraction of their reservations any of them used. The scope is the
    outermost varying module, not the module the key names: a key names the last point before
    the allocation, and what a MoE layer makes between two experts (the next expert's tokens,
    gathered) is keyed after the previous expert. The largest fraction over the whole layer never
    reads below a temporary that grows with the tokens of any of its experts
    (``forward_post moe.experts.0[0]:tmp1`` has scope ``moe`` when ``moe`` saves varying tensors
    of its own, else ``moe.experts.0``).
    """
    categories = {r.key: r.category for r in trace.tensors}
    varying = {_module_family(k) for k in reserved if categories.get(k) is Category.ACTIVATION}
    out: Dict[str, str] = {}
    for key in reserved:
        if categories.get(key) is not Category.TEMPORARY:
            continue
        parts = key.rpartition(" ")[2].partition("[")[0].split(".")
        for n in range(1, len(parts) + 1):
            scope = ".".join(parts[:n])
            if family_of(scope) in varying:
                out[key] = scope
                break
    return out


def reserve_sizes(trace: LifetimeTrace, reserved: Mapping[str, int]) -> LifetimeTrace:
    """``trace`` with each record of a key in ``reserved`` resized to its reservation (never smaller)."""
    if not reserved:
        return trace
    tensors = tuple(replace(r, size_bytes=max(r.size_bytes, reserved[r.key])) if r.key in reserved else r
                    for r in trace.tensors)
    return replace(trace, tensors=tensors)
