"""Plan: ordered stages + objective + predicted costs; JSON I/O and diffs. Stdlib only.

plan.json is byte-identical for identical inputs: keys sorted, floats written by repr, no timestamps.
A hand-written plan needs only "stages" (docs/formats.md); `edgeshard plan ... --from` judges it with the one
cost evaluator (costs.CostModel) and fills in its predictions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from edgeshard.config import paths
from edgeshard.config.errors import ConfigError, PlanError


@dataclass(frozen=True)
class Stage:
    device: str
    start: int  # first unit (inclusive)
    stop: int  # one past the last unit

    def __post_init__(self):
        if self.start < 0 or self.stop <= self.start:
            raise ValueError(f"stage {self.device}[{self.start}, {self.stop}) is empty or negative")


FEASIBLE, OOM, INFEASIBLE = "feasible", "oom", "infeasible"
STATUSES = (FEASIBLE, OOM, INFEASIBLE)  # oom: stages that would run but do not fit a device's memory;
# infeasible: no stages at all, or stages that break a rule other than memory (coverage, source, constraints)
STATUS_SHORT = {FEASIBLE: "ok", OOM: "OOM", INFEASIBLE: "n/a"}  # table cells (ui/report.py, ui/plots.py, compare)


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
    # Why a plan cannot run, as data (plots, report, cli and widgets read these, never the notes' text):
    # status one of STATUSES (None: derived from feasible, "infeasible" when False); reasons the rules broken,
    # e.g. ("stage agx[0, 34) needs 25.10 GiB, agx holds 16.00 GiB",); () for a feasible plan.
    status: str | None = None
    reasons: tuple[str, ...] = ()

    def __post_init__(self):
        status = self.status or (FEASIBLE if self.feasible else INFEASIBLE)
        if status not in STATUSES:
            raise ValueError(f"plan status {status!r} is not one of {', '.join(STATUSES)}")
        object.__setattr__(self, "status", status)
        object.__setattr__(self, "feasible", status == FEASIBLE)  # one truth: feasible follows the status
        object.__setattr__(self, "reasons", tuple(self.reasons))

    @property
    def oom(self) -> bool:
        return self.status == OOM

    def _ipython_display_(self) -> None:  # Jupyter: edgeshard/show.py (bokeh and ipywidgets, imported lazily)
        from edgeshard.ui.show import show
        show(self)

    def device_of_unit(self) -> list[str]:
        out = []
        for s in self.stages:
            out += [s.device] * (s.stop - s.start)
        return out

    def to_dict(self) -> dict:
        return {"objective": self.objective, "strategy": self.strategy, "model": self.model,
                "testbed": self.testbed, "workload": self.workload, "feasible": self.feasible,
                "stages": [{"device": s.device, "start": s.start, "stop": s.stop} for s in self.stages],
                "predicted": self.predicted, "notes": list(self.notes), "status": self.status,
                "reasons": list(self.reasons)}

    def dumps(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True) + "\n"

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.dumps())


PLAN_KEYS = ("objective", "strategy", "model", "testbed", "workload", "feasible", "stages", "predicted", "notes",
             "status", "reasons")  # status, reasons: since plan status became data; older files lack them
STAGE_KEYS = ("device", "start", "stop")
MANUAL = "manual"  # the strategy of a hand-written plan (a file with only "stages", optionally "objective")


_JSON_TYPE = {str: "string", dict: "object", bool: "boolean (true or false)", list: "list"}


def _objectives() -> tuple[str, ...]:
    from edgeshard.planning.costs import OBJECTIVES  # costs imports this module: import it when a plan is read
    return OBJECTIVES


def _stage(raw, i: int, where: str) -> Stage:
    key = f"{where}: stages[{i}]"
    at = {"file": where, "section": "stages", "index": i}
    if not isinstance(raw, dict):
        raise ConfigError(key, f"is {json.dumps(raw)}, not an object",
                          'write each stage as {"device": "NAME", "start": FIRST_UNIT, "stop": ONE_PAST_LAST}', **at)
    for k in raw:
        if k not in STAGE_KEYS:
            raise ConfigError(key, f"unknown key {k!r}", f"a stage has only {', '.join(STAGE_KEYS)}", key=k, **at)
    for k in STAGE_KEYS:
        if k not in raw:
            raise ConfigError(key, f"missing required key {k!r}", f"a stage needs {', '.join(STAGE_KEYS)}", key=k,
                              **at)
    if not isinstance(raw["device"], str) or not raw["device"]:
        raise ConfigError(f"{key}.device", f"{raw['device']!r} is not a device name", "use a device name of the testbed",
                          key="device", **at)
    for k in ("start", "stop"):
        v = raw[k]
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ConfigError(f"{key}.{k}", f"{v!r} is not a unit index", "use a whole number >= 0", key=k, **at)
    if raw["stop"] <= raw["start"]:
        raise ConfigError(key, f"[{raw['start']}, {raw['stop']}) on {raw['device']!r} is empty",
                          "stages are half-open unit ranges [start, stop) with start < stop", key="stop", **at)
    return Stage(raw["device"], raw["start"], raw["stop"])


def from_dict(raw: dict, where: str = "<plan>") -> Plan:
    """A plan from its JSON object. Only "stages" is required: a hand-written plan may give just the stages
    (and "objective", default "latency"); its strategy is then "manual" and its predictions empty until
    `edgeshard plan TESTBED PROFILE --from PLAN.json` fills them in. Unknown keys are errors."""
    hint = "write plans with `edgeshard plan -o`, or by hand with only \"stages\" (docs/formats.md)"
    if not isinstance(raw, dict):
        raise ConfigError(where, f"is a JSON {type(raw).__name__}, not an object", hint, file=where)
    for k in raw:
        if k not in PLAN_KEYS:
            raise ConfigError(where, f"unknown key {k!r}", f"a plan has only {', '.join(PLAN_KEYS)}", file=where, key=k)
    if "stages" not in raw:
        raise ConfigError(where, "missing required key 'stages'", hint, file=where, key="stages")
    if not isinstance(raw["stages"], list):
        raise ConfigError(f"{where}: stages", "is not a list", "write a list of {\"device\", \"start\", \"stop\"} objects",
                          file=where, key="stages")
    stages = tuple(_stage(s, i, where) for i, s in enumerate(raw["stages"]))
    objective = raw.get("objective", "latency")
    if objective not in _objectives():
        raise ConfigError(f"{where}: objective", f"{objective!r} is not an objective",
                          f"use one of {', '.join(_objectives())}", file=where, key="objective")
    types = {"strategy": str, "model": str, "testbed": str, "workload": dict, "feasible": bool, "predicted": dict,
             "notes": list, "status": str, "reasons": list}
    for k, t in types.items():
        if k in raw and not isinstance(raw[k], t):
            raise ConfigError(f"{where}: {k}", f"{raw[k]!r} is not a JSON {_JSON_TYPE[t]}",
                              "fix the value or leave the key out", file=where, key=k)
    feasible = raw.get("feasible", True)
    status = raw.get("status")  # absent in files written before it existed: derived from "feasible"
    if status is not None and status not in STATUSES:
        raise ConfigError(f"{where}: status", f"{status!r} is not a plan status", f"use one of {', '.join(STATUSES)}",
                          file=where, key="status")
    if status is not None and "feasible" in raw and (status == FEASIBLE) != feasible:
        raise ConfigError(f"{where}: status", f"{status!r} contradicts feasible = {json.dumps(feasible)}",
                          "fix one of them or leave status out", file=where, key="status")
    strategy = raw.get("strategy") or MANUAL
    return Plan(objective, strategy, stages, raw.get("predicted", {}), raw.get("model", ""),
                raw.get("testbed", ""), raw.get("workload", {}), tuple(str(n) for n in raw.get("notes", ())),
                feasible, status, tuple(str(r) for r in raw.get("reasons", ())))


def load(path: str | Path) -> Plan:
    raw = paths.read_json(path, "plan", "fix the syntax at the line shown, or write plans with `edgeshard plan -o`")
    return from_dict(raw, str(path))


DIFF_KEYS = ("latency_s", "e2e_s", "bottleneck_s", "throughput_tokens_per_s")


def diff(a: Plan, b: Plan) -> dict:
    """What changed from plan a to plan b: unit ranges that moved device, and cost deltas.

    {"moved": [{"start", "stop", "from", "to"}], "costs": {key: {"a", "b", "delta", "ratio"}},
     "devices_added": [...], "devices_removed": [...]}
    """
    ua, ub = a.device_of_unit(), b.device_of_unit()
    if len(ua) != len(ub):
        raise PlanError(f"the plans cover {len(ua)} and {len(ub)} units: they are for different models "
                        "(compare plans for the same model)")
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
