"""Testbed: which devices exist, how they are linked, and the planning constraints (pure data, stdlib only).

The TOML format is documented in docs/formats.md. Human units (memory_gib, bandwidth_mbit_s, latency_ms) exist
only in the file; they are converted once here to bytes, bytes/s and seconds.
Mbit = 1e6 bit and GiB = 2**30 bytes (never mix mega and mebi).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import tomllib

from edgeshard.config.errors import ConfigError
from edgeshard.config.units import GIB, MBIT_S  # noqa: F401 (re-exported: callers import them from here)

TOP_KEYS = {"name", "source", "cloud", "token_file", "defaults", "constraints", "device", "link", "description",
            "shared_cores"}
DEVICE_KEYS = {"name", "host", "port", "memory_gib", "kind", "cpu_share"}
LINK_KEYS = {"src", "dst", "bandwidth_mbit_s", "latency_ms", "directed"}
DEFAULT_KEYS = {"bandwidth_mbit_s", "latency_ms"}
CONSTRAINT_KEYS = {"context_tokens", "sequences", "memory_headroom", "exclude", "require", "max_stages"}
SHARED_CORES_KEYS = {"devices", "cores"}


def machine_cores() -> int:
    """The cores this process may run on (its CPU affinity; os.cpu_count where that is unknown): what
    `cores = "auto"` of a [[shared_cores]] table becomes when the testbed is loaded."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


@dataclass(frozen=True)
class Device:
    name: str
    memory_bytes: int
    host: str = "127.0.0.1"
    port: int = 0
    kind: str | None = None  # a known device kind for synthetic profiles (see synthetic.KINDS)
    cpu_share: float | None = None  # fraction of one core, for the emulated testbed

    @property
    def memory_gib(self) -> float:
        return self.memory_bytes / GIB


@dataclass(frozen=True)
class Link:
    """One direction src -> dst."""

    src: str
    dst: str
    bandwidth_bytes_s: float
    latency_s: float

    @property
    def bandwidth_mbit_s(self) -> float:
        return self.bandwidth_bytes_s / MBIT_S


@dataclass(frozen=True)
class SharedCores:
    """Devices that run on one machine and share its `cores` (docs/formats.md, [[shared_cores]]). In pipeline
    mode at most `cores` of them compute at once; the cost model charges the rest (costs.CostModel.contention)."""

    devices: tuple[str, ...]
    cores: float  # > 0; "auto" in the file is resolved to machine_cores() when it is loaded
    auto: bool = field(default=False, compare=False)  # the file said "auto" (dumps writes the resolved number)


@dataclass(frozen=True)
class Constraints:
    context_tokens: int = 1024  # tokens of KV cache reserved per sequence
    sequences: int = 1  # sequences in flight to reserve KV cache for
    memory_headroom: float = 0.0  # fraction of each device's memory kept free
    exclude: tuple[str, ...] = ()
    require: tuple[str, ...] = ()
    max_stages: int | None = None


@dataclass(frozen=True)
class Testbed:
    name: str
    source: str
    devices: tuple[Device, ...]
    default_bandwidth_bytes_s: float = 1000 * MBIT_S
    default_latency_s: float = 0.0005
    links: tuple[Link, ...] = ()  # explicit directed links; other pairs use the defaults
    constraints: Constraints = field(default_factory=Constraints)
    cloud: str | None = None  # the cloud device, for the Cloud-Edge baselines
    token_file: str | None = None  # shared secret for device servers
    path: str | None = None  # file it was read from, for messages
    shared_cores: tuple[SharedCores, ...] = ()  # devices sharing one machine's cores (disjoint groups)

    def _ipython_display_(self) -> None:  # Jupyter: edgeshard/show.py (bokeh and ipywidgets, imported lazily)
        from edgeshard.ui.show import show
        show(self)

    def sharing(self, name: str) -> SharedCores | None:
        """The [[shared_cores]] group a device belongs to, or None."""
        for g in self.shared_cores:
            if name in g.devices:
                return g
        return None

    def device(self, name: str) -> Device:
        for d in self.devices:
            if d.name == name:
                return d
        raise KeyError(f"{self.path or self.name}: no device named {name!r} (devices: {', '.join(self.names)})")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(d.name for d in self.devices)

    def link(self, src: str, dst: str) -> Link:
        for link in self.links:
            if link.src == src and link.dst == dst:
                return link
        return Link(src, dst, self.default_bandwidth_bytes_s, self.default_latency_s)

    def usable_memory_bytes(self, name: str) -> float:
        return self.device(name).memory_bytes * (1.0 - self.constraints.memory_headroom)

    def replace(self, **changes) -> "Testbed":
        return dataclasses.replace(self, **changes)

    def with_link(self, src: str, dst: str, bandwidth_mbit_s: float | None = None,
                  latency_ms: float | None = None, directed: bool = False) -> "Testbed":
        """A copy with the link src->dst (and dst->src unless directed) set; unspecified fields kept."""
        links = list(self.links)
        pairs = [(src, dst)] if directed else [(src, dst), (dst, src)]
        for a, b in pairs:
            old = self.link(a, b)
            new = Link(a, b,
                       old.bandwidth_bytes_s if bandwidth_mbit_s is None else bandwidth_mbit_s * MBIT_S,
                       old.latency_s if latency_ms is None else latency_ms / 1000)
            links = [lk for lk in links if (lk.src, lk.dst) != (a, b)] + [new]
        return self.replace(links=tuple(sorted(links, key=lambda lk: (lk.src, lk.dst))))  # as from_dict orders them

    def with_constraints(self, **changes) -> "Testbed":
        return self.replace(constraints=dataclasses.replace(self.constraints, **changes))


def as_testbed(testbed_or_path) -> Testbed:
    """A Testbed as given, or loaded from its TOML path (the one place that accepts either)."""
    return testbed_or_path if isinstance(testbed_or_path, Testbed) else load(testbed_or_path)


def load(path: str | Path) -> Testbed:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(str(path), f"cannot read testbed file: {e.strerror}", "check the path",
                          file=str(path)) from None
    return loads(text, str(path))


def loads(text: str, where: str = "<testbed>") -> Testbed:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(where, f"not valid TOML: {e}", "fix the syntax at the line shown", file=where) from None
    return from_dict(raw, where)


@dataclass(frozen=True)
class _Place:
    """Where a value of the file sits: `where` is the message's text ("file: device 'agx'"), the rest the same
    place as ConfigError's fields (errors.py), so an editor finds the field without reading the text."""

    where: str
    file: str
    section: str | None = None
    index: int | None = None

    def at(self, where: str | None = None, section: str | None = None, index: int | None = None) -> "_Place":
        return _Place(self.where if where is None else where, self.file,
                      self.section if section is None else section, self.index if index is None else index)

    def error(self, problem: str, fix: str = "", key: str | None = None) -> ConfigError:
        return ConfigError(self.where, problem, fix, file=self.file, section=self.section, index=self.index, key=key)


def _unknown(at: _Place, table: dict, allowed: set[str], what: str) -> None:
    extra = sorted(set(table) - allowed)
    if extra:
        raise at.error(f"unknown key {extra[0]!r} in {what}",
                       f"allowed keys: {', '.join(sorted(allowed))}; see docs/formats.md", key=extra[0])


def _number(at: _Place, table: dict, key: str, default=None, *, positive=True, integer=False,
            minimum: float | None = None, maximum: float | None = None):
    if key not in table:
        if default is None:
            raise at.error(f"missing required key {key!r}", f"add {key} = <value>", key)
        return default
    value = table[key]
    ok_types = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, ok_types) or (isinstance(value, float) and not math.isfinite(value)):
        kind = "an integer" if integer else "a number"
        raise at.error(f"{key} = {value!r} is not {kind}", f"set {key} to {kind}", key)
    if positive and value <= 0:
        raise at.error(f"{key} = {value!r} must be greater than zero", f"set a positive {key}", key)
    if minimum is not None and value < minimum:
        raise at.error(f"{key} = {value!r} is below {minimum}", f"set {key} >= {minimum}", key)
    if maximum is not None and value >= maximum:
        raise at.error(f"{key} = {value!r} must be below {maximum}", f"set {key} < {maximum}", key)
    return value


def _string(at: _Place, table: dict, key: str, default: str | None = None, required: bool = True) -> str | None:
    if key not in table:
        if required and default is None:
            raise at.error(f"missing required key {key!r}", f"add {key} = \"...\"", key)
        return default
    value = table[key]
    if not isinstance(value, str) or not value:
        raise at.error(f"{key} = {value!r} is not a non-empty string", f"set {key} to a quoted name", key)
    return value


def from_dict(raw: dict, where: str = "<testbed>") -> Testbed:
    top = _Place(where, where)
    _unknown(top, raw, TOP_KEYS, "the top level")
    name = _string(top, raw, "name")
    devices_raw = raw.get("device")
    if not isinstance(devices_raw, list) or not devices_raw:
        raise top.at(section="device").error("no [[device]] tables",
                                             "add at least one [[device]] with name and memory_gib")
    devices: list[Device] = []
    for i, d in enumerate(devices_raw):
        at = top.at(f"{where}: device[{i}]", "device", i)
        if not isinstance(d, dict):
            raise at.error("is not a table", "write it as [[device]]")
        _unknown(at, d, DEVICE_KEYS, "a [[device]]")
        dname = _string(at, d, "name")
        at = at.at(f"{where}: device {dname!r}")  # named from here on; index i still says which table
        if dname in {x.name for x in devices}:
            raise at.error("is defined twice", "give every [[device]] a unique name", "name")
        host = _string(at, d, "host", "127.0.0.1")
        port = _number(at, d, "port", 0, positive=False, integer=True, minimum=0)
        if port > 65535:
            raise at.error(f"port = {port} is not a TCP port", "use 1..65535, or 0 to pick a free one", "port")
        mem = _number(at, d, "memory_gib")
        kind = _string(at, d, "kind", required=False)
        share = d.get("cpu_share")
        if share is not None:
            share = _number(at, d, "cpu_share", maximum=None)
        devices.append(Device(dname, int(mem * GIB), host, port, kind, share))
    names = {d.name for d in devices}

    def known(at: _Place, key: str, value) -> str:
        if not isinstance(value, str) or value not in names:
            raise at.error(f"{key} = {value!r} is not a device of this testbed",
                           f"use one of: {', '.join(sorted(names))}", key)
        return value

    source = known(top, "source", _string(top, raw, "source"))
    cloud = known(top, "cloud", raw["cloud"]) if "cloud" in raw else None

    defaults = raw.get("defaults", {})
    if not isinstance(defaults, dict):
        raise top.at(section="defaults").error("defaults is not a table", "write it as [defaults]")
    at = top.at(f"{where}: [defaults]", "defaults")
    _unknown(at, defaults, DEFAULT_KEYS, "[defaults]")
    dbw = _number(at, defaults, "bandwidth_mbit_s", 1000)
    dlat = _number(at, defaults, "latency_ms", 0.5, positive=False, minimum=0)

    links: dict[tuple[str, str], Link] = {}
    links_raw = raw.get("link", [])
    if not isinstance(links_raw, list):
        raise top.at(section="link").error("link is not an array of tables", "write each link as [[link]]")
    for i, lk in enumerate(links_raw):
        at = top.at(f"{where}: link[{i}]", "link", i)
        if not isinstance(lk, dict):
            raise at.error("is not a table", "write it as [[link]]")
        _unknown(at, lk, LINK_KEYS, "a [[link]]")
        src = known(at, "src", _string(at, lk, "src"))
        dst = known(at, "dst", _string(at, lk, "dst"))
        if src == dst:
            raise at.error(f"src and dst are both {src!r}", "a link joins two different devices", "dst")
        bw = _number(at, lk, "bandwidth_mbit_s", dbw)
        lat = _number(at, lk, "latency_ms", dlat, positive=False, minimum=0)
        directed = lk.get("directed", False)
        if not isinstance(directed, bool):
            raise at.error(f"directed = {directed!r} is not true/false", "set directed = true or false", "directed")
        for a, b in [(src, dst)] if directed else [(src, dst), (dst, src)]:
            links[(a, b)] = Link(a, b, bw * MBIT_S, lat / 1000)

    c = raw.get("constraints", {})
    if not isinstance(c, dict):
        raise top.at(section="constraints").error("constraints is not a table", "write it as [constraints]")
    at = top.at(f"{where}: [constraints]", "constraints")
    _unknown(at, c, CONSTRAINT_KEYS, "[constraints]")

    def names_list(key: str) -> tuple[str, ...]:
        value = c.get(key, [])
        if not isinstance(value, list):
            raise at.error(f"{key} = {value!r} is not a list", f"write {key} = [\"device\", ...]", key)
        return tuple(known(at, key, v) for v in value)

    exclude, require = names_list("exclude"), names_list("require")
    if source in exclude:
        raise at.error(f"exclude names the source {source!r}",
                       "the source holds the prompt and runs unit 0; remove it from exclude", "exclude")
    both = sorted(set(exclude) & set(require))
    if both:
        raise at.error(f"{both[0]!r} is both excluded and required", "remove it from one of the lists", "exclude")
    max_stages = c.get("max_stages")
    if max_stages is not None:
        max_stages = _number(at, c, "max_stages", integer=True)
    constraints = Constraints(
        context_tokens=_number(at, c, "context_tokens", 1024, integer=True),
        sequences=_number(at, c, "sequences", 1, integer=True),
        memory_headroom=_number(at, c, "memory_headroom", 0.0, positive=False, minimum=0, maximum=1),
        exclude=exclude, require=require, max_stages=max_stages)
    token_file = _string(top, raw, "token_file", required=False)
    shared = _shared_cores(top, raw.get("shared_cores", []), known)
    return Testbed(name, source, tuple(devices), dbw * MBIT_S, dlat / 1000,
                   tuple(links[k] for k in sorted(links)), constraints, cloud, token_file, where, shared)


def _shared_cores(top: _Place, raw, known) -> tuple[SharedCores, ...]:
    if not isinstance(raw, list):
        raise top.at(section="shared_cores").error("shared_cores is not an array of tables",
                                                   "write each group as [[shared_cores]]")
    out: list[SharedCores] = []
    seen: dict[str, int] = {}
    for i, g in enumerate(raw):
        at = top.at(f"{top.where}: shared_cores[{i}]", "shared_cores", i)
        if not isinstance(g, dict):
            raise at.error("is not a table", "write it as [[shared_cores]]")
        _unknown(at, g, SHARED_CORES_KEYS, "a [[shared_cores]]")
        devs = g.get("devices")
        if not isinstance(devs, list) or not devs:
            raise at.error(f"devices = {devs!r} is not a non-empty list",
                           'write devices = ["device", ...]: the devices that run on this machine', "devices")
        names = tuple(known(at, "devices", d) for d in devs)
        for d in names:
            if d in seen:
                raise at.error(f"device {d!r} is also in shared_cores[{seen[d]}]",
                               "a device runs on one machine: list it in one [[shared_cores]] only", "devices")
            seen[d] = i
        cores = g.get("cores", "auto")
        auto = cores == "auto"
        if auto:
            cores = machine_cores()
        else:
            cores = _number(at, g, "cores")
        out.append(SharedCores(names, cores, auto))
    return tuple(out)


def _fmt(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, float):
        return repr(round(v, 9))
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return str(v)


def to_dict(tb: Testbed) -> dict:
    """The TOML structure of a testbed (links written per direction, directed = true where asymmetric)."""
    out: dict = {"name": tb.name, "source": tb.source}
    if tb.cloud:
        out["cloud"] = tb.cloud
    if tb.token_file:
        out["token_file"] = tb.token_file
    out["defaults"] = {"bandwidth_mbit_s": _clean(tb.default_bandwidth_bytes_s / MBIT_S),
                       "latency_ms": _clean(tb.default_latency_s * 1000)}
    c = tb.constraints
    cons: dict = {"context_tokens": c.context_tokens, "sequences": c.sequences, "memory_headroom": c.memory_headroom}
    if c.exclude:
        cons["exclude"] = list(c.exclude)
    if c.require:
        cons["require"] = list(c.require)
    if c.max_stages is not None:
        cons["max_stages"] = c.max_stages
    out["constraints"] = cons
    devs = []
    for d in tb.devices:
        e = {"name": d.name, "host": d.host, "port": d.port, "memory_gib": _clean(d.memory_gib)}
        if d.kind:
            e["kind"] = d.kind
        if d.cpu_share is not None:
            e["cpu_share"] = d.cpu_share
        devs.append(e)
    out["device"] = devs
    by = {(lk.src, lk.dst): lk for lk in tb.links}
    links, done = [], set()
    for (a, b), lk in sorted(by.items()):
        if (a, b) in done:
            continue
        back = by.get((b, a))
        entry = {"src": a, "dst": b, "bandwidth_mbit_s": _clean(lk.bandwidth_mbit_s), "latency_ms": _clean(lk.latency_s * 1000)}
        if back and back.bandwidth_bytes_s == lk.bandwidth_bytes_s and back.latency_s == lk.latency_s:
            done.add((b, a))
        else:
            entry["directed"] = True
        links.append(entry)
        done.add((a, b))
    if links:
        out["link"] = links
    if tb.shared_cores:  # "auto" is written as the number it was resolved to: a run folder keeps what it assumed
        out["shared_cores"] = [{"devices": list(g.devices), "cores": _clean(g.cores)} for g in tb.shared_cores]
    return out


def _clean(x: float):
    """Floats that are whole numbers are written as integers (14 not 14.0); others rounded to 9 digits."""
    r = round(x, 9)
    return int(r) if r == int(r) else r


def dumps(tb: Testbed) -> str:
    """Plain TOML for a testbed; loads(dumps(tb)) == tb up to the path."""
    d = to_dict(tb)
    lines = []
    for key in ("name", "source", "cloud", "token_file"):
        if key in d:
            lines.append(f"{key} = {_fmt(d[key])}")
    for table in ("defaults", "constraints"):
        lines += ["", f"[{table}]"] + [f"{k} = {_fmt(v)}" for k, v in d[table].items()]
    for arr in ("device", "link", "shared_cores"):
        for entry in d.get(arr, []):
            lines += ["", f"[[{arr}]]"] + [f"{k} = {_fmt(v)}" for k, v in entry.items()]
    return "\n".join(lines) + "\n"
