"""Plan: ordered stages + objective + predicted costs; JSON I/O and diffs. Stdlib only.

plan.json is byte-identical for identical inputs: keys sorted, floats written by repr, no timestamps.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError


@dataclass(frozen=True)
class Stage:
    device: str
    start: int  # first unit (inclusive)
    stop: int  # one past the last unit

    def __post_init__(self):
        if self.start < 0 or self.stop <= self.start:
            raise ValueError(f"stage {self.device}[{self.start}, {self.stop}) is empty or negative")


@dataclass(frozen=True)
class Plan:
    objective: str
    strategy: str
    stages: tuple[Stage, ...]
    predicted: dict  # CostModel.evaluate output; {} when the plan is infeasible
    model: str = ""
    testbed: str = ""
    workload: dict = field(default_factory=dict)
    notes: tuple[str, ...] = ()  # why devices were left out, why a baseline failed
    feasible: bool = True  # False: a baseline whose stages do not fit (OOM) or cannot be formed

    def device_of_unit(self) -> list[str]:
        out = []
        for s in self.stages:
            out += [s.device] * (s.stop - s.start)
        return out

    def to_dict(self) -> dict:
        return {"objective": self.objective, "strategy": self.strategy, "model": self.model,
                "testbed": self.testbed, "workload": self.workload, "feasible": self.feasible,
                "stages": [{"device": s.device, "start": s.start, "stop": s.stop} for s in self.stages],
                "predicted": self.predicted, "notes": list(self.notes)}

    def dumps(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True) + "\n"

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.dumps())


def from_dict(raw: dict, where: str = "<plan>") -> Plan:
    try:
        stages = tuple(Stage(s["device"], int(s["start"]), int(s["stop"])) for s in raw["stages"])
        return Plan(raw["objective"], raw["strategy"], stages, raw.get("predicted", {}), raw.get("model", ""),
                    raw.get("testbed", ""), raw.get("workload", {}), tuple(raw.get("notes", ())),
                    raw.get("feasible", True))
    except KeyError as e:
        raise ConfigError(where, f"missing required key {e.args[0]!r}", "write plans with `edgeshard plan -o`") from None
    except (TypeError, ValueError) as e:
        raise ConfigError(where, f"malformed stages: {e}", "each stage needs device, start < stop") from None


def load(path: str | Path) -> Plan:
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except OSError as e:
        raise ConfigError(str(path), f"cannot read plan: {e.strerror}", "check the path") from None
    except json.JSONDecodeError as e:
        raise ConfigError(str(path), f"not valid JSON: {e}", "write plans with `edgeshard plan -o`") from None
    return from_dict(raw, str(path))


DIFF_KEYS = ("latency_s", "e2e_s", "bottleneck_s", "throughput_tokens_per_s")


def diff(a: Plan, b: Plan) -> dict:
    """What changed from plan a to plan b: unit ranges that moved device, and cost deltas.

    {"moved": [{"start", "stop", "from", "to"}], "costs": {key: {"a", "b", "delta", "ratio"}},
     "devices_added": [...], "devices_removed": [...]}
    """
    ua, ub = a.device_of_unit(), b.device_of_unit()
    if len(ua) != len(ub):
        raise ValueError(f"plans cover {len(ua)} and {len(ub)} units: they are for different models")
    moved, i = [], 0
    while i < len(ua):
        if ua[i] == ub[i]:
            i += 1
            continue
        j = i
        while j < len(ua) and ua[j] == ua[i] and ub[j] == ub[i]:
            j += 1
        moved.append({"start": i, "stop": j, "from": ua[i], "to": ub[i]})
        i = j
    costs = {}
    for key in DIFF_KEYS:
        va, vb = a.predicted.get(key), b.predicted.get(key)
        if va is None or vb is None:
            continue
        costs[key] = {"a": va, "b": vb, "delta": vb - va, "ratio": (vb / va) if va else None}
    da, db = {s.device for s in a.stages}, {s.device for s in b.stages}
    return {"moved": moved, "costs": costs, "devices_added": sorted(db - da), "devices_removed": sorted(da - db)}


def format_diff(a: Plan, b: Plan, name_a: str = "A", name_b: str = "B") -> str:
    d = diff(a, b)
    lines = [f"{name_a}: {a.strategy}/{a.objective}  ->  {name_b}: {b.strategy}/{b.objective}"]
    if not d["moved"]:
        lines.append("no unit changed device")
    for m in d["moved"]:
        lines.append(f"  units [{m['start']}, {m['stop']}) moved {m['from']} -> {m['to']}")
    if d["devices_added"]:
        lines.append("  devices added: " + ", ".join(d["devices_added"]))
    if d["devices_removed"]:
        lines.append("  devices removed: " + ", ".join(d["devices_removed"]))
    for key, c in d["costs"].items():
        ratio = f" ({c['ratio']:.3f}x)" if c["ratio"] else ""
        lines.append(f"  {key:<24} {c['a']:.6g} -> {c['b']:.6g}  delta {c['delta']:+.6g}{ratio}")
    return "\n".join(lines)
