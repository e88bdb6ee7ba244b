"""Profile: measured (or synthetic) costs per (device, unit) and per link, with provenance. Stdlib only.

JSON format (docs/formats.md):
  {"schema": 1, "model": str, "dtype": str,
   "units": [{"name", "weight_bytes", "activation_bytes_per_token", "kv_bytes_per_token"}, ...],   # N units
   "devices": {name: {"decode_s": [N floats], "prefill_s_per_token": [N floats],
                      "step_overhead_s": float}},                  # step_overhead_s optional, default 0
   "links": [{"src", "dst", "bandwidth_mbit_s", "latency_ms"}, ...],      # optional, override the testbed
   "provenance": {...}}                                                      # free-form: how it was made
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from edgeshard.config import paths
from edgeshard.config.errors import ConfigError
from edgeshard.config.testbed import MBIT_S, Link

SCHEMA = 1
TOP_KEYS = {"schema", "model", "dtype", "units", "devices", "links", "provenance"}
UNIT_KEYS = {"name", "weight_bytes", "activation_bytes_per_token", "kv_bytes_per_token"}
DEVICE_KEYS = {"decode_s", "prefill_s_per_token", "step_overhead_s", "context_tokens", "memory_bytes"}
LINK_KEYS = {"src", "dst", "bandwidth_mbit_s", "latency_ms"}


@dataclass(frozen=True)
class Unit:
    """One entry of the model chain: 0 = embedding, 1..L = decoder layers, L+1 = final norm + lm_head."""

    name: str
    weight_bytes: int
    activation_bytes_per_token: int  # bytes of this unit's output per token (what a hop after it carries)
    kv_bytes_per_token: int  # KV cache bytes per token of context (0 for embedding and head)


@dataclass(frozen=True)
class DeviceCosts:
    decode_s: tuple[float, ...]  # per unit: one token at the profiled context
    prefill_s_per_token: tuple[float, ...]  # per unit: prompt processing time divided by prompt length
    context_tokens: int | None = None  # context length at which decode_s was measured
    memory_bytes: int | None = None  # usable memory the device reported (informational)
    # The runtime's own cost of one stage step on this device, beyond the forward pass of its units: receiving
    # and parsing the activation frame, the step's events, sending the result (profiler.measure_step). A pipeline
    # stage pays it every step, so it counts in the bottleneck (costs.CostModel.pipelined); 0 for synthetic
    # profiles and profiles made before it was measured.
    step_overhead_s: float = 0.0


@dataclass(frozen=True)
class Profile:
    model: str
    dtype: str
    units: tuple[Unit, ...]
    devices: dict[str, DeviceCosts]
    links: tuple[Link, ...] = ()
    provenance: dict = field(default_factory=dict)

    @property
    def n_units(self) -> int:
        return len(self.units)

    def _ipython_display_(self) -> None:  # Jupyter: edgeshard/show.py (bokeh and ipywidgets, imported lazily)
        from edgeshard.ui.show import show
        show(self)

    def link(self, src: str, dst: str) -> Link | None:
        for lk in self.links:
            if lk.src == src and lk.dst == dst:
                return lk
        return None

    def to_dict(self) -> dict:
        return {
            "schema": SCHEMA, "model": self.model, "dtype": self.dtype,
            "units": [{"name": u.name, "weight_bytes": u.weight_bytes,
                       "activation_bytes_per_token": u.activation_bytes_per_token,
                       "kv_bytes_per_token": u.kv_bytes_per_token} for u in self.units],
            "devices": {n: _device_dict(c) for n, c in sorted(self.devices.items())},
            "links": [{"src": lk.src, "dst": lk.dst, "bandwidth_mbit_s": lk.bandwidth_mbit_s,
                       "latency_ms": lk.latency_s * 1000} for lk in self.links],
            "provenance": self.provenance,
        }

    def dumps(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True) + "\n"

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.dumps())


def _device_dict(c: DeviceCosts) -> dict:
    out = {"decode_s": list(c.decode_s), "prefill_s_per_token": list(c.prefill_s_per_token)}
    if c.context_tokens is not None:
        out["context_tokens"] = c.context_tokens
    if c.memory_bytes is not None:
        out["memory_bytes"] = c.memory_bytes
    if c.step_overhead_s:
        out["step_overhead_s"] = c.step_overhead_s
    return out


def load(path: str | Path) -> Profile:
    raw = paths.read_json(path, "profile", "fix the file or re-run `edgeshard profile`")
    return from_dict(raw, str(path))


def _unknown(where: str, d: dict, allowed: set[str], **at) -> None:
    """at: ConfigError's file/section/index (errors.py) of the object checked."""
    extra = sorted(set(d) - allowed)
    if extra:
        raise ConfigError(where, f"unknown key {extra[0]!r}", f"allowed keys: {', '.join(sorted(allowed))}",
                          key=extra[0], **at)


def _nonneg(where: str, key: str, v, positive: bool = False, integer: bool = False, **at):
    ok = (int,) if integer else (int, float)
    if isinstance(v, bool) or not isinstance(v, ok) or not math.isfinite(v) or v < 0 or (positive and v == 0):
        need = "a positive" if positive else "a non-negative"
        raise ConfigError(where, f"{key} = {v!r} is not {need} {'integer' if integer else 'number'}",
                          f"set {key} to {need} value", key=key, **at)
    return v


def from_dict(raw: dict, where: str = "<profile>") -> Profile:
    top = {"file": where}
    if not isinstance(raw, dict):
        raise ConfigError(where, "top level is not a JSON object", "write a profile object", **top)
    _unknown(where, raw, TOP_KEYS, **top)
    if raw.get("schema") != SCHEMA:
        raise ConfigError(where, f"schema = {raw.get('schema')!r} is not supported", f"set \"schema\": {SCHEMA}",
                          key="schema", **top)
    for key in ("model", "dtype"):
        if not isinstance(raw.get(key), str) or not raw[key]:
            raise ConfigError(where, f"missing or empty {key!r}", f"add \"{key}\": \"...\"", key=key, **top)
    units_raw = raw.get("units")
    if not isinstance(units_raw, list) or len(units_raw) < 1:
        raise ConfigError(where, "\"units\" is missing or empty", "list the model's units (embedding, layers, head)",
                          section="units", **top)
    units = []
    for i, u in enumerate(units_raw):
        w, at = f"{where}: units[{i}]", {"file": where, "section": "units", "index": i}
        if not isinstance(u, dict):
            raise ConfigError(w, "is not an object", "write {\"name\": ..., \"weight_bytes\": ...}", **at)
        _unknown(w, u, UNIT_KEYS, **at)
        for key in UNIT_KEYS:
            if key not in u:
                raise ConfigError(w, f"missing required key {key!r}", f"add \"{key}\"", key=key, **at)
        if not isinstance(u["name"], str):
            raise ConfigError(w, f"name = {u['name']!r} is not a string", "give the unit a name", key="name", **at)
        units.append(Unit(u["name"], _nonneg(w, "weight_bytes", u["weight_bytes"], integer=True, **at),
                          _nonneg(w, "activation_bytes_per_token", u["activation_bytes_per_token"], positive=True,
                                  integer=True, **at),
                          _nonneg(w, "kv_bytes_per_token", u["kv_bytes_per_token"], integer=True, **at)))
    n = len(units)
    devs_raw = raw.get("devices")
    if not isinstance(devs_raw, dict) or not devs_raw:
        raise ConfigError(where, "\"devices\" is missing or empty", "profile at least one device",
                          section="devices", **top)
    devices = {}
    for name, d in devs_raw.items():
        w = f"{where}: devices.{name}"
        if not isinstance(d, dict):
            raise ConfigError(w, "is not an object", "write {\"decode_s\": [...], \"prefill_s_per_token\": [...]}")
        _unknown(w, d, DEVICE_KEYS)
        lists = []
        for key in ("decode_s", "prefill_s_per_token"):
            v = d.get(key)
            if not isinstance(v, list) or len(v) != n:
                raise ConfigError(w, f"{key} has {len(v) if isinstance(v, list) else 'no'} entries, the profile has {n} units",
                                  f"give one {key} per unit")
            lists.append(tuple(float(_nonneg(f"{w}.{key}[{i}]", key, x)) for i, x in enumerate(v)))
        ctx = d.get("context_tokens")
        mem = d.get("memory_bytes")
        devices[name] = DeviceCosts(lists[0], lists[1],
                                    None if ctx is None else _nonneg(w, "context_tokens", ctx, integer=True),
                                    None if mem is None else _nonneg(w, "memory_bytes", mem, integer=True),
                                    float(_nonneg(w, "step_overhead_s", d.get("step_overhead_s", 0.0))))
    links = []
    for i, lk in enumerate(raw.get("links", [])):
        w = f"{where}: links[{i}]"
        if not isinstance(lk, dict):
            raise ConfigError(w, "is not an object", "write {\"src\", \"dst\", \"bandwidth_mbit_s\", \"latency_ms\"}")
        _unknown(w, lk, LINK_KEYS)
        for key in LINK_KEYS:
            if key not in lk:
                raise ConfigError(w, f"missing required key {key!r}", f"add \"{key}\"")
        links.append(Link(str(lk["src"]), str(lk["dst"]),
                          _nonneg(w, "bandwidth_mbit_s", lk["bandwidth_mbit_s"], positive=True) * MBIT_S,
                          _nonneg(w, "latency_ms", lk["latency_ms"]) / 1000))
    prov = raw.get("provenance", {})
    if not isinstance(prov, dict):
        raise ConfigError(where, "provenance is not an object", "write \"provenance\": {...}")
    return Profile(raw["model"], raw["dtype"], tuple(units), devices, tuple(links), prov)


def check_against(profile: Profile, testbed, where: str = "profile") -> None:
    """Every usable device of the testbed must have costs; every link must name testbed devices."""
    names = set(testbed.names)
    for lk in profile.links:
        for end in (lk.src, lk.dst):
            if end not in names:
                raise ConfigError(where, f"link {lk.src}->{lk.dst} names {end!r}, which is not in testbed {testbed.name!r}",
                                  f"devices are: {', '.join(sorted(names))}")
    missing = [d for d in testbed.names if d not in profile.devices and d not in testbed.constraints.exclude]
    if missing:
        raise ConfigError(where, f"no costs for device {missing[0]!r} of testbed {testbed.name!r}",
                          "profile that device, or add it to [constraints] exclude")
