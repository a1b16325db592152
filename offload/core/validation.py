"""Helpers for config validators that collect every problem before raising (see STYLE.md)."""

from __future__ import annotations

from typing import Iterable, List, Type

__all__ = ["one_of", "raise_if"]


def raise_if(problems: List[str], error: Type[Exception]) -> None:
    """Raise ``error`` with every problem, ``;``-separated, when there is any."""
    if problems:
        raise error("; ".join(problems))


def one_of(problems: List[str], key: str, value: str, valid: Iterable[str]) -> None:
    """Record a problem when ``value`` is not among ``valid``, naming the valid choices."""
    valid = list(valid)
    if value not in valid:
        problems.append(f"{key}={value!r} is not valid; choose one of: {', '.join(valid)}")
