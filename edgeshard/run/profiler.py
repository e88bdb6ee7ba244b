"""Profiler: measure what the planner needs, on the devices themselves (`edgeshard profile TESTBED --model M`).

- Per device: decode time of every unit (one token at `context_tokens` of cache) and prefill time per token
  (`prefill_tokens` at once) over `repeats`, measured by model.unit_timings inside the device process (on the
  CPU: median CPU time per unit x the device's wall/CPU slowdown, unbiased on a throttled device; see there)
  (over rpyc; the device loads the model in chunks that fit half its memory, dropping a loaded stage first). One device at a time, so devices
  that share a machine do not disturb each other's timings.
- Per ordered device pair (a, b): device a probes b over the data plane, through the shaping the runtime
  applies (wire.Link): latency from small PING frames (one-way from timestamps when both devices share a clock,
  else half the round trip), bandwidth from a burst of 64 KiB frames timed at the receiver.
- Per device: the runtime's own cost per stage step beyond the forward pass (step_overhead_s: frame receive and
  parse, the step's events, the send), from a ring of activation frames through the device's own data path
  with an identity stage (service.Node.measure_step), events pushed to the profiler as in a run. The planner's
  throughput objective adds it to every pipelined stage (costs.py).
- Unit sizes (weights, activation and KV bytes per token) come from the catalog's exact architecture numbers.
- Which devices share a machine (provenance "hosts"): devices reporting the same boot id run on one kernel, and
  where that is the profiler's own machine, its cores (testbed.machine_cores). Units are still measured one
  device at a time: the cost of sharing cores in a pipeline is the testbed's to declare ([[shared_cores]]) and
  the cost model's to charge; costs.unmodelled_sharing reads "hosts" to say when a prediction ignores it.

Caching: the finished profile is stored under cache_dir (default $EDGESHARD_HOME/profiles or
~/.cache/edgeshard/profiles) by a key of everything that affects it (model, dtype, parameters, the testbed's
devices and links, how links are enforced, the devices' hosts, the code of the measuring modules, torch and
transformers versions). Every measurement is appended to <key>.partial.jsonl the moment it arrives; a profile
interrupted by a crash resumes from there and loses nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import statistics
import time
from pathlib import Path

from edgeshard import testbeds
from edgeshard.config import catalog, paths
from edgeshard.config import testbed as tbm
from edgeshard.config.profile import DeviceCosts, Link, Profile
from edgeshard.device import wire
from edgeshard.run.deploy import address as _address
from edgeshard.run.deploy import boot_id as _boot_id
from edgeshard.run.deploy import shaping_for
from edgeshard.run.deploy import token_file as _token_file
from edgeshard.run.folder import _version, environment

SCHEME = 3  # bump when what a measurement means changes (2: CPU units = CPU time x slowdown, model.unit_timings;
#            3: + step_overhead_s per device)
# The step probe (measure_step): steps timed after a warm-up, frames in flight so the device never waits (more
# than the delay thread's latency / step time), and the delay on its self-link: any delay sends through the
# shaped path's thread, as a run's delayed links do; its length only has to stay under in_flight x a step.
STEP_PROBE_STEPS, STEP_PROBE_WARMUP, STEP_PROBE_IN_FLIGHT = 200, 20, 8
STEP_PROBE_MAX_LATENCY_S = 0.001
_CODE_FILES = ("device/model.py", "run/profiler.py", "device/service.py", "device/stage.py", "device/prober.py",
               "device/wire.py")


def default_cache_dir() -> Path:
    return paths.home() / "profiles"


def code_version() -> str:
    h = hashlib.sha256()
    root = paths.PACKAGE
    for f in _CODE_FILES:
        try:
            h.update((root / f).read_bytes())
        except OSError:
            pass
    return h.hexdigest()[:16]


def _spec(model: str) -> catalog.ModelSpec:
    return catalog.spec(model)  # the one lookup (catalog name or local Hugging Face folder); no torch needed


def cache_key(tb: tbm.Testbed, model: str, state: dict | None, dtype: str, context_tokens: int, prefill_tokens: int,
              repeats: int, devices: list[str]) -> str:
    """Everything that changes a measurement: model, dtype, parameters, devices, links, enforcement, code."""
    st_devs = (state or {}).get("devices", {})
    desc = {
        "scheme": SCHEME, "model": model, "dtype": dtype, "context_tokens": context_tokens,
        "prefill_tokens": prefill_tokens, "repeats": repeats, "code": code_version(),
        "torch": _version("torch"), "transformers": _version("transformers"), "host": socket.gethostname(),
        "mode": (state or {}).get("mode"),
        "devices": [{"name": d.name, "memory_bytes": d.memory_bytes, "kind": d.kind, "cpu_share": d.cpu_share,
                     "address": st_devs.get(d.name, {}).get("address", d.host),
                     "device": st_devs.get(d.name, {}).get("device", "cpu")}
                    for d in tb.devices if d.name in devices],
        "links": sorted(((lk["src"], lk["dst"], lk.get("bandwidth_mbit_s"), lk.get("latency_ms"),
                          lk.get("bandwidth_by"), lk.get("latency_by")) for lk in (state or {}).get("links", [])),
                        key=str) if state else [(a, b, tb.link(a, b).bandwidth_bytes_s, tb.link(a, b).latency_s)
                                                for a in devices for b in devices if a != b],
    }
    return hashlib.sha256(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _chunks(units, memory_bytes: float, fraction: float = 0.5) -> list[tuple[int, int]]:
    """Contiguous unit ranges whose weights fit `fraction` of the device's memory (at least one unit each)."""
    out, start, acc = [], 0, 0
    budget = memory_bytes * fraction
    for i, u in enumerate(units):
        if i > start and acc + u.weight_bytes > budget:
            out.append((start, i))
            start, acc = i, 0
        acc += u.weight_bytes
    out.append((start, len(units)))
    return out


def machines(infos: dict[str, dict]) -> list[dict]:
    """Devices grouped by the machine they run on (same boot id: one kernel; else same hostname), in device order:
    [{"hostname", "devices", "cores"}]. cores: this machine's (testbed.machine_cores) where the devices run on the
    profiler's own machine, else what the device reports ("cpu_count"), else None."""
    here = _boot_id()
    out: dict = {}
    for n, info in infos.items():
        key = info.get("boot_id") or info.get("hostname") or n
        h = out.setdefault(key, {"hostname": info.get("hostname"), "devices": [], "cores": None})
        h["devices"].append(n)
        if here and info.get("boot_id") == here:
            h["cores"] = tbm.machine_cores()
        elif isinstance(info.get("cpu_count"), int) and h["cores"] is None:
            h["cores"] = info["cpu_count"]
    return list(out.values())


class _Partial:
    """Append-only record of measurements (one JSON object per line, flushed), for resume after a crash."""

    def __init__(self, path: Path):
        self.path = path
        self.done: dict[str, dict] = {}
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                    self.done[rec["id"]] = rec
                except (json.JSONDecodeError, KeyError):
                    continue  # a line cut by the crash
        self.resumed = len(self.done)
        self.f = open(path, "a", buffering=1)

    def add(self, rid: str, data: dict) -> dict:
        rec = {"id": rid, "t_s": time.time(), **data}
        self.f.write(json.dumps(rec) + "\n")
        self.f.flush()
        os.fsync(self.f.fileno())
        self.done[rid] = rec
        return rec

    def close(self) -> None:
        self.f.close()


def profile(testbed, model: str, state: dict | None, dtype: str = "float32", context_tokens: int = 128,
            prefill_tokens: int = 32, repeats: int = 5, cache_dir: str | Path | None = None, progress: bool = True,
            devices: list[str] | None = None, link_target_s: float = 0.3, pings: int = 20,
            use_cache: bool = True) -> Profile:
    """Measure a profile on the running devices of a testbed (state from launch/emulate; None: testbed ports)."""
    from edgeshard.device import auth
    from edgeshard.device.client import DeviceClient

    tb = tbm.as_testbed(testbed)
    dtype = catalog.canonical_dtype(dtype)
    spec = _spec(model)
    units = spec.units(dtype)
    names = list(devices or [d for d in tb.names if d not in tb.constraints.exclude])
    key = cache_key(tb, model, state, dtype, context_tokens, prefill_tokens, repeats, names)
    cdir = Path(cache_dir or default_cache_dir())
    cdir.mkdir(parents=True, exist_ok=True)
    final = cdir / f"{model.replace('/', '_')}-{dtype}-{key}.json"
    if use_cache and final.exists():
        from edgeshard.config.profile import load

        pr = load(final)
        pr.provenance["cache"] = {"hit": True, "file": str(final), "key": key}
        return pr
    partial = _Partial(cdir / f"{model.replace('/', '_')}-{dtype}-{key}.partial.jsonl")
    secret = auth.load_secret(_token_file(tb, state))
    t_start = time.time()
    clients: dict[str, DeviceClient] = {}
    plan_chunks = {}
    infos = {}
    try:
        for n in names:
            host, port = _address(tb, state, n)
            clients[n] = DeviceClient(n, host, port, secret, timeout=600,
                                      diagnose=lambda n=n: testbeds.diagnosis(state, n))
            infos[n] = clients[n].info()
            mem = tb.device(n).memory_bytes
            plan_chunks[n] = _chunks(units, min(mem, infos[n].get("detected_memory_bytes") or mem))
        pairs = [(a, b) for a in names for b in names if a != b]
        total = sum(len(c) for c in plan_chunks.values()) + len(names) + len(pairs)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, desc=f"profile {model} on {tb.name}", unit="step")
        decode = {n: [None] * len(units) for n in names}
        slowdown = {n: [] for n in names}  # wall / CPU time of each chunk's back-to-back passes (model.unit_timings)
        prefill = {n: [None] * len(units) for n in names}
        for n in names:
            for a, b in plan_chunks[n]:
                rid = f"units:{n}:{a}:{b}"
                rec = partial.done.get(rid)
                if rec is None:
                    if bar:
                        bar.set_postfix_str(f"{n} units [{a}, {b})")
                    r = clients[n].profile_units(model, a, b, dtype, context_tokens, prefill_tokens, repeats)
                    rec = partial.add(rid, {"device": n, "start": a, "stop": b, "result": r})
                slowdown[n].append(rec["result"].get("slowdown", 1.0))
                for i, u in enumerate(range(a, b)):
                    decode[n][u] = rec["result"]["decode_s"][i]
                    prefill[n][u] = rec["result"]["prefill_s_per_token"][i]
                if bar:
                    bar.update(1)
        step = {}
        act_bytes = max(u.activation_bytes_per_token for u in units)
        for n in names:
            rid = f"step:{n}"
            rec = partial.done.get(rid)
            if rec is None:
                if bar:
                    bar.set_postfix_str(f"{n} step overhead")
                delays = [s["latency_s"] for s in shaping_for(state, n).values() if s.get("latency_s")]
                lat = min(min(delays), STEP_PROBE_MAX_LATENCY_S) if delays else 0.0
                events = clients[n].subscribe(lambda conn, f: None)  # pushed to us, as to a run's controller
                try:
                    r = clients[n].measure_step(act_bytes, lat, STEP_PROBE_STEPS, STEP_PROBE_WARMUP,
                                                STEP_PROBE_IN_FLIGHT)
                finally:
                    events.close()
                rec = partial.add(rid, {"device": n, "result": r})
            # as the units: on the CPU, CPU time x the device's slowdown (the probe's few ms of CPU fit into one
            # quota period, so its wall time would miss the throttling); elsewhere its wall time
            r = rec["result"]
            on_cpu = infos[n].get("device", "cpu") == "cpu"
            step[n] = r["cpu_per_step_s"] * statistics.median(slowdown[n]) if on_cpu else r["step_s"]
            if bar:
                bar.update(1)
        same_clock = {n: infos[n].get("boot_id") for n in names}
        links, raw_links = [], {}
        for a, b in pairs:
            rid = f"link:{a}:{b}"
            rec = partial.done.get(rid)
            if rec is None:
                if bar:
                    bar.set_postfix_str(f"link {a}->{b}")
                clients[a].set_links(shaping_for(state, a))
                host, _ = _address(tb, state, b)
                m = clients[a].measure_link(b, host, infos[b]["data_port"], pings=pings, target_s=link_target_s)
                rec = partial.add(rid, {"src": a, "dst": b, "result": m})
            m = rec["result"]
            bw = m["bandwidth_bytes_s"]
            one_clock = same_clock[a] and same_clock[a] == same_clock[b]
            lat = m["one_way_s"] if one_clock else m["rtt_s"] / 2
            lat = max(0.0, lat - wire.HEADER_BYTES / bw)  # a PING is one header: keep only the fixed part
            links.append(Link(a, b, bw, lat))
            raw_links[f"{a}->{b}"] = {**m, "latency_from": "one_way" if one_clock else "rtt/2"}
            if bar:
                bar.update(1)
        if bar:
            bar.close()
        hosts = machines(infos)
        dev_costs = {n: DeviceCosts(tuple(decode[n]), tuple(prefill[n]), context_tokens,
                                    infos[n].get("memory_bytes"), step[n]) for n in names}
        env = environment()
        prov = {
            "method": "measured", "tool": "edgeshard.run.profiler", "scheme": SCHEME, "code_version": code_version(),
            "cache": {"hit": False, "key": key, "file": str(final), "resumed_measurements": partial.resumed},
            "started_s": t_start, "wall_s": time.time() - t_start,
            "parameters": {"context_tokens": context_tokens, "prefill_tokens": prefill_tokens, "repeats": repeats,
                           "link_target_s": link_target_s, "pings": pings},
            "unit_sizes": f"edgeshard.config.catalog ({spec.source or spec.name})",
            "compute": "model.unit_timings on each device (CPU: median CPU time per unit x the device's wall/CPU "
                       "slowdown; CUDA: median wall time; one device at a time)",
            "step_overhead": "service.Node.measure_step on each device: a ring of "
                             f"{STEP_PROBE_IN_FLIGHT} activation frames through its own data path with an identity "
                             f"stage, {STEP_PROBE_STEPS} steps after {STEP_PROBE_WARMUP}, events subscribed; CPU: "
                             "process CPU time per step x the device's median slowdown of its unit passes; "
                             "CUDA: wall time per step",
            "step_measurements": {n: partial.done[f"step:{n}"]["result"] for n in names},
            "links": "measured by the source device of each pair over the data plane, through its shaping",
            "testbed": tb.name, "testbed_mode": (state or {}).get("mode"),
            "link_enforcement": {f"{lk['src']}->{lk['dst']}": {"bandwidth_by": lk.get("bandwidth_by"),
                                                                "latency_by": lk.get("latency_by")}
                                 for lk in (state or {}).get("links", [])},
            "devices": {n: {k: infos[n].get(k) for k in ("hostname", "device", "pid", "omp_num_threads",
                                                         "detected_memory_bytes")} for n in names},
            "link_measurements": raw_links, "environment": env,
            "hosts": hosts,
        }
        pr = Profile(model, dtype, tuple(units), dev_costs, tuple(links), prov)
        tmp = final.with_suffix(".tmp")
        tmp.write_text(pr.dumps())
        os.replace(tmp, final)
        partial.close()
        partial.path.unlink(missing_ok=True)
        return pr
    finally:
        if not partial.f.closed:
            partial.close()
        for c in clients.values():
            c.close()
