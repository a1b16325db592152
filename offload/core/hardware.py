"""The HardwareModel: what each link moves per second, what it costs to start, what each tier holds.

Pure data, written by ``tierflow calibrate`` (measured) or by a preset in ``conf/tiers`` (vendor
figures, with their sources) and read by the planner and the simulator. Names follow one scheme:
tiers are ``device``, ``host``, ``numa:<node>`` and ``nvme:<index>``; a link is ``"<src>-><dst>"``.

Example:
    >>> hw = HardwareModel(name="toy", tiers=(TierModel(name="host", kind="host", capacity_bytes=1 << 30),),
    ...                    links=(LinkModel(src="host", dst="device", bandwidth_bytes_per_s=25e9, latency_s=1e-5),))
    >>> round(hw.link("host", "device").transfer_s(25_000_000), 6)
    0.00101
    >>> HardwareModel.from_json(hw.to_json()) == hw
    True
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any, Dict, List, Mapping, Sequence, Tuple

from tierflow.offload.core.errors import TierConfigError

__all__ = ["HardwareModel", "LinkModel", "LinkSample", "TierModel", "fit_link"]

TIER_KINDS = ("device", "host", "numa", "nvme")
SCHEMA_VERSION = 1


@dataclass(frozen=True)
class LinkSample:
    """One calibration measurement: ``concurrency`` transfers of ``nbytes`` each, in parallel.

    Attributes:
        nbytes: bytes of one transfer.
        concurrency: transfers in flight at once.
        seconds: wall time per transfer, averaged over repeats (all concurrent ones finished).
    """

    nbytes: int
    concurrency: int
    seconds: float

    @property
    def bandwidth_bytes_per_s(self) -> float:
        """Aggregate bytes per second of the link during this sample."""
        return self.nbytes * self.concurrency / self.seconds


@dataclass(frozen=True)
class LinkModel:
    """One direction of one link: ``time(n) = latency_s + n / bandwidth_bytes_per_s``.

    Attributes:
        src, dst: tier names (``device``, ``host``, ``numa:<node>``, ``nvme:<index>``).
        bandwidth_bytes_per_s: sustained bandwidth at ``best_concurrency``.
        latency_s: fixed cost of one transfer (set-up, queueing, first byte).
        best_concurrency: transfers in flight that reached the bandwidth.
        samples: the measurements the model was fitted to (empty for presets).
        source: where the figures come from (``measured by tierflow calibrate`` or a datasheet).
    """

    src: str
    dst: str
    bandwidth_bytes_per_s: float
    latency_s: float
    best_concurrency: int = 1
    samples: Tuple[LinkSample, ...] = ()
    source: str = ""

    @property
    def name(self) -> str:
        return f"{self.src}->{self.dst}"

    def transfer_s(self, nbytes: int) -> float:
        """Predicted seconds to move ``nbytes`` over this link alone."""
        return self.latency_s + nbytes / self.bandwidth_bytes_per_s


@dataclass(frozen=True)
class TierModel:
    """Capacity of one tier.

    Attributes:
        name: ``device``, ``host``, ``numa:<node>`` or ``nvme:<index>``.
        kind: one of ``device``, ``host``, ``numa``, ``nvme``.
        capacity_bytes: bytes the tier may hold (its budget, or the free space measured).
        detail: what it is (a GPU name, a node's CPUs, a directory).
    """

    name: str
    kind: str
    capacity_bytes: int
    detail: str = ""


@dataclass(frozen=True)
class HardwareModel:
    """Per-link bandwidth and latency plus per-tier capacity of one machine.

    Attributes:
        name: a label (preset name or host name).
        tiers: capacities, one per tier.
        links: link models, one per direction.
        source: how the model was obtained.
        created: ISO timestamp of the measurement (empty for presets).
    """

    name: str
    tiers: Tuple[TierModel, ...] = ()
    links: Tuple[LinkModel, ...] = ()
    source: str = ""
    created: str = ""

    def __post_init__(self) -> None:
        problems = self.validate()
        if problems:
            raise TierConfigError("; ".join(problems))

    def validate(self) -> List[str]:
        """Every problem of this model at once (empty when it is consistent)."""
        return _problems(self.tiers, self.links)

    def link(self, src: str, dst: str) -> LinkModel:
        """The model of ``src -> dst``.

        Raises:
            KeyError: naming the links that do exist.
        """
        for link in self.links:
            if link.src == src and link.dst == dst:
                return link
        raise KeyError(f"no link {src}->{dst} in hardware model {self.name!r}; it has: "
                       f"{', '.join(l.name for l in self.links) or 'none'}")

    def tier(self, name: str) -> TierModel:
        """The capacity record of tier ``name`` (KeyError naming the tiers that exist)."""
        for t in self.tiers:
            if t.name == name:
                return t
        raise KeyError(f"no tier {name!r} in hardware model {self.name!r}; it has: "
                       f"{', '.join(t.name for t in self.tiers) or 'none'}")

    # --- JSON -------------------------------------------------------------------------------

    def to_dict(self) -> Dict[str, Any]:
        """Plain dict (lists, not tuples) with a ``schema_version`` key."""
        data = json.loads(json.dumps(asdict(self)))  # tuples become lists, as in the file
        data["schema_version"] = SCHEMA_VERSION
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "HardwareModel":
        """Build from :meth:`to_dict` output (or a preset's ``hardware`` block).

        Raises:
            TierConfigError: listing every missing or unknown key and every inconsistency.
        """
        problems = cls.problems_in_dict(data)
        if problems:
            raise TierConfigError("; ".join(problems))
        return cls._build(data)

    @classmethod
    def problems_in_dict(cls, data: Mapping[str, Any]) -> List[str]:
        """Every problem of a dict form at once, without raising."""
        if not isinstance(data, Mapping):
            return [f"a hardware model is a JSON object, not {type(data).__name__}; re-run tierflow calibrate"]
        p: List[str] = []
        for key in ("tiers", "links"):  # each is a list of objects; anything else would raise deep inside
            value = data.get(key)
            if value is not None and not (isinstance(value, list) and all(isinstance(x, Mapping) for x in value)):
                p.append(f"{key} must be a list of objects, not {json.dumps(value)[:60]}")
        for i, link in enumerate(data.get("links") or () if not p else ()):
            samples = link.get("samples")
            if samples is not None and not (isinstance(samples, list) and all(isinstance(s, Mapping) for s in samples)):
                p.append(f"links[{i}].samples must be a list of objects, not {json.dumps(samples)[:60]}")
        if p:
            return p
        version = data.get("schema_version", SCHEMA_VERSION)
        if version != SCHEMA_VERSION:
            p.append(f"schema_version={version} is not supported (expected {SCHEMA_VERSION}); re-run tierflow calibrate")
        _check_keys(p, "hardware", data, HardwareModel, extra=("schema_version",))
        for i, t in enumerate(data.get("tiers") or ()):
            _check_keys(p, f"tiers[{i}]", t, TierModel)
        for i, link in enumerate(data.get("links") or ()):
            _check_keys(p, f"links[{i}]", link, LinkModel)
            for j, s in enumerate(link.get("samples") or () if isinstance(link, Mapping) else ()):
                _check_keys(p, f"links[{i}].samples[{j}]", s, LinkSample)
        if p:
            return p
        try:
            tiers, links = cls._parts(data)
        except (TypeError, ValueError) as exc:
            return [f"malformed hardware model: {exc}"]
        return _problems(tiers, links)

    @staticmethod
    def _parts(data: Mapping[str, Any]) -> Tuple[Tuple[TierModel, ...], Tuple[LinkModel, ...]]:
        tiers = tuple(TierModel(**dict(t)) for t in data.get("tiers") or ())
        links = tuple(
            LinkModel(**{**dict(l), "samples": tuple(LinkSample(**dict(s)) for s in l.get("samples") or ())})
            for l in data.get("links") or ()
        )
        return tiers, links

    @classmethod
    def _build(cls, data: Mapping[str, Any]) -> "HardwareModel":
        tiers, links = cls._parts(data)
        return cls(name=str(data["name"]), tiers=tiers, links=links, source=str(data.get("source", "")),
                   created=str(data.get("created", "")))

    @classmethod
    def from_json(cls, text: str) -> "HardwareModel":
        return cls.from_dict(json.loads(text))

    def save(self, path: str) -> None:
        """Write the JSON form atomically (a crash never leaves half a file)."""
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(self.to_json() + "\n")
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> "HardwareModel":
        """Read a model written by :meth:`save`.

        Raises:
            FileNotFoundError: saying how to produce one.
            TierConfigError: when the file is not a valid model.
        """
        if not os.path.isfile(path):
            raise FileNotFoundError(f"hardware model {path} does not exist; write one with `tierflow calibrate --out {path}`")
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise TierConfigError(f"hardware model {path} is not UTF-8 JSON ({exc}); re-run tierflow calibrate") from None
        problems = cls.problems_in_dict(data)
        if problems:
            raise TierConfigError(f"hardware model {path}: " + "; ".join(problems))
        return cls._build(data)


def _problems(tiers: Sequence[TierModel], links: Sequence[LinkModel]) -> List[str]:
    p: List[str] = []
    names = [t.name for t in tiers]
    if len(set(names)) != len(names):
        p.append(f"tiers name a tier twice: {names}")
    for t in tiers:
        if t.kind not in TIER_KINDS:
            p.append(f"tier {t.name!r} has kind {t.kind!r}; choose one of: {', '.join(TIER_KINDS)}")
        elif t.name != t.kind and not t.name.startswith(t.kind + ":"):
            p.append(f"tier {t.name!r} must be named {t.kind!r} or '{t.kind}:<id>'")
        if t.capacity_bytes < 0:
            p.append(f"tier {t.name!r} has capacity_bytes={t.capacity_bytes}; must be >= 0")
    seen = set()
    for link in links:
        if link.name in seen:
            p.append(f"link {link.name!r} appears twice")
        seen.add(link.name)
        if not (link.bandwidth_bytes_per_s > 0 and math.isfinite(link.bandwidth_bytes_per_s)):
            p.append(f"link {link.name!r} has bandwidth_bytes_per_s={link.bandwidth_bytes_per_s}; must be > 0")
        if not (link.latency_s >= 0 and math.isfinite(link.latency_s)):
            p.append(f"link {link.name!r} has latency_s={link.latency_s}; must be >= 0")
        if link.best_concurrency < 1:
            p.append(f"link {link.name!r} has best_concurrency={link.best_concurrency}; must be >= 1")
        if link.src == link.dst:
            p.append(f"link {link.name!r} goes from a tier to itself")
        unknown = [end for end in (link.src, link.dst) if names and end not in names]
        if unknown:
            p.append(f"link {link.name!r} names tier(s) {unknown} that are not in tiers ({', '.join(names)})")
    return p


def _check_keys(p: List[str], where: str, data: Any, kind: type, extra: Sequence[str] = ()) -> None:
    if not isinstance(data, Mapping):
        p.append(f"{where} must be a mapping, got {type(data).__name__}")
        return
    known = {f.name for f in fields(kind)} | set(extra)
    required = {f.name for f in fields(kind) if f.default is MISSING and f.default_factory is MISSING}
    for key in sorted(set(data) - known):
        p.append(f"{where} has unknown key {key!r}; valid keys: {', '.join(sorted(known))}")
    for key in sorted(required - set(data)):
        p.append(f"{where} is missing {key!r}")



def fit_link(samples: Sequence[LinkSample]) -> Tuple[float, float, int]:
    """Fit ``time = latency + nbytes / bandwidth`` to calibration samples.

    Bandwidth is the best aggregate bandwidth over concurrency levels, measured at the largest
    transfer size (where latency matters least); latency is the least-squares intercept of
    single-stream time against size, clamped at zero.

    Args:
        samples: measurements of one link (at least one).

    Returns:
        ``(bandwidth_bytes_per_s, latency_s, best_concurrency)``.

    Raises:
        ValueError: when ``samples`` is empty.
    """
    if not samples:
        raise ValueError("fit_link needs at least one sample; calibrate the link first")
    largest = max(s.nbytes for s in samples)
    at_largest = [s for s in samples if s.nbytes == largest]
    best = max(at_largest, key=lambda s: s.bandwidth_bytes_per_s)
    bandwidth = best.bandwidth_bytes_per_s
    single = [s for s in samples if s.concurrency == min(x.concurrency for x in samples)]
    latency = _intercept([(s.nbytes, s.seconds) for s in single], bandwidth)
    return bandwidth, latency, best.concurrency


def _intercept(points: List[Tuple[int, float]], bandwidth: float) -> float:
    if len({x for x, _ in points}) >= 2:
        n = len(points)
        mx = sum(x for x, _ in points) / n
        my = sum(y for _, y in points) / n
        sxx = sum((x - mx) ** 2 for x, _ in points)
        slope = sum((x - mx) * (y - my) for x, y in points) / sxx
        return max(0.0, my - slope * mx)
    # One size only: whatever the bandwidth does not explain is latency.
    x, y = points[0]
    return max(0.0, y - x / bandwidth)
