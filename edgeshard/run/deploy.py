"""Deploy a plan on the testbed's device servers: connect, load the stages in parallel, configure the ring,
subscribe to the devices' events. run/runtime.Run calls the steps in this order; run/generate.py then drives it.

    dep = Deployment.connect(tb, plan, state, run_id)   # one DeviceClient per stage device (rpyc control)
    env_devices = dep.probe()                            # device info + clock offsets (environment.json)
    dep.load(model, dtype, seed)                         # every stage's shard, in parallel (the slow part)
    dep.configure_ring(config, state)                    # who sends to whom; sampling; the app-level shaping
    dep.subscribe()                                      # events -> dep.inbox: (device name, event dict)
    ...
    dep.close()

Also the connection helpers the profiler shares (run/profiler.py): token_file, address, boot_id, shaping_for.
"""

from __future__ import annotations

import json
import queue
import random
import threading
import time
from pathlib import Path

from edgeshard.config import plan as planm
from edgeshard.config import testbed as tbm
from edgeshard.config.errors import ConfigError
from edgeshard.run.parameters import RunConfig


def token_file(tb: tbm.Testbed, state: dict | None) -> str | None:
    """The shared secret's file: the running testbed's, else the testbed file's (relative to that file)."""
    if state and state.get("token_file"):
        return state["token_file"]
    if tb.token_file:
        p = Path(tb.token_file)
        if not p.is_absolute() and tb.path:
            p = Path(tb.path).parent / p
        return str(p)
    return None


def address(tb: tbm.Testbed, state: dict | None, name: str) -> tuple[str, int]:
    """(host, control port) of a device: from the testbed state when given, else the testbed's own port."""
    if state is not None:
        d = state.get("devices", {}).get(name)
        if d is None:
            raise ConfigError("testbed state", f"device {name!r} is not running in testbed {tb.name!r} "
                              f"(running: {', '.join(state.get('devices', {}))})", "bring the testbed up again")
        return d["address"], int(d["port"])
    d = tb.device(name)
    if not d.port:
        raise ConfigError(tb.path or tb.name, f"device {name!r} has no port and no testbed state was given",
                          "bring the testbed up (`edgeshard testbed up`) or set port = ... for the device")
    return d.host, d.port


def shaping_for(state: dict | None, src: str) -> dict:
    """The shaping a device applies per destination: the state's links enforced by "app".
    Shape: {dst: {"bandwidth_bytes_s": float, "latency_s": float}} (either key may be absent)."""
    out = {}
    for lk in (state or {}).get("links", []):
        if lk.get("src") != src:
            continue
        s = {}
        if lk.get("bandwidth_by") == "app" and lk.get("bandwidth_mbit_s"):
            s["bandwidth_bytes_s"] = float(lk["bandwidth_mbit_s"]) * tbm.MBIT_S
        if lk.get("latency_by") == "app" and lk.get("latency_ms"):
            s["latency_s"] = float(lk["latency_ms"]) / 1000
        if s:
            out[lk["dst"]] = s
    return out


def boot_id() -> str:
    """This machine's boot id: a device reporting the same one shares this clock (no offset to measure)."""
    try:
        return open("/proc/sys/kernel/random/boot_id").read().strip()
    except OSError:
        return ""


def parallel(fn, items) -> None:
    """fn(x) for every x, each in its own thread; returns when all have. fn records its own errors."""
    threads = [threading.Thread(target=fn, args=(x,), daemon=True) for x in items]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def new_run_id() -> str:
    """Milliseconds since the epoch + 24 random bits, in hex: unique per run, sortable by start."""
    return f"{int(time.time() * 1000):x}-{random.getrandbits(24):06x}"


class Deployment:
    """The plan's devices for one run: their clients, what they said about themselves, and their event inbox.

    names: stage devices in plan order (names[0] is the source). clients: name -> DeviceClient.
    infos: name -> info() dict. offsets: name -> device clock - controller clock (s). loads: name ->
    load_stage() dict (its "vocab" is the logits' width). inbox: queue of (name, event dict); a closed event
    stream arrives as {"type": "_closed", "error": str | None}.
    """

    def __init__(self, tb: tbm.Testbed, plan: planm.Plan, state: dict | None, run_id: str, clients: dict):
        self.tb, self.plan, self.state, self.run_id = tb, plan, state, run_id
        self.names = [s.device for s in plan.stages]
        self.clients = clients
        self.epoch = random.randint(1, 255)  # tags this run's data-plane frames
        self.infos: dict[str, dict] = {}
        self.offsets: dict[str, float] = {}
        self.loads: dict[str, dict] = {}
        self.inbox: queue.Queue = queue.Queue()
        self.closing = threading.Event()  # set before the streams close on purpose: not a dead device
        self._subs: list = []

    @classmethod
    def connect(cls, tb: tbm.Testbed, plan: planm.Plan, state: dict | None, run_id: str) -> "Deployment":
        """Authenticated clients to every stage device, in parallel; the first failure (by name) raises."""
        from edgeshard.device import auth
        from edgeshard.device.client import DeviceClient
        from edgeshard.testbeds import diagnosis

        secret = auth.load_secret(token_file(tb, state))
        clients, errors = {}, {}

        def one(name):
            host, port = address(tb, state, name)
            try:
                clients[name] = DeviceClient(name, host, port, secret, diagnose=lambda n=name: diagnosis(state, n))
            except Exception as e:
                errors[name] = e

        parallel(one, [s.device for s in plan.stages])
        if errors:
            for c in clients.values():
                c.close()
            name, e = sorted(errors.items())[0]
            raise RuntimeError(f"device {name!r}: {e}") from e
        return cls(tb, plan, state, run_id, clients)

    def probe(self) -> dict:
        """Each device's info and clock offset; returns {"devices": infos, "clock_offsets_s": offsets}."""

        def info(name):
            self.infos[name] = self.clients[name].info()

        parallel(info, self.names)
        here = boot_id()
        for name in self.names:  # zero on this machine (one clock); else the midpoint of a ping
            if here and self.infos[name].get("boot_id") == here:
                self.offsets[name] = 0.0
            else:
                t0 = time.time()
                dt = self.clients[name].ping()["time_s"]
                self.offsets[name] = dt - (t0 + time.time()) / 2
        return {"devices": self.infos, "clock_offsets_s": self.offsets}

    def load(self, model: str, dtype: str, seed: int) -> None:
        """Every stage's shard, in parallel (loading is the slow part). A device that died while loading (e.g.
        OOM-killed) is named with what the testbed knows about its death."""
        errors = {}

        def one(stage):
            try:
                self.loads[stage.device] = self.clients[stage.device].load_stage(model, stage.start, stage.stop,
                                                                                 dtype, seed)
            except Exception as e:
                errors[stage.device] = e

        parallel(one, self.plan.stages)
        if errors:
            name, e = sorted(errors.items())[0]
            stage = next(s for s in self.plan.stages if s.device == name)
            if not self.alive(name):
                raise self.dead(name, f"while loading stage [{stage.start}, {stage.stop}) of {model}: {e}") from e
            raise RuntimeError(str(e) if str(e).startswith("device") else f"device {name!r}: {e}") from e

    def configure_ring(self, config: RunConfig) -> None:
        """Tell each stage its place in the ring: the next device's data address (the last stage's next is the
        source, which gets the token id back), sampling, and the links it shapes itself."""
        stages, names = self.plan.stages, self.names
        addr = {}
        for n in names:  # a device bound to a wildcard address is reached where its control port was
            host = self.infos[n].get("host")
            addr[n] = (host if host not in (None, "0.0.0.0", "::") else self.clients[n].host, self.infos[n]["data_port"])
        for i, s in enumerate(stages):
            nxt = stages[i + 1].device if i + 1 < len(stages) else None
            cfg = {"run_id": self.run_id, "epoch": self.epoch, "name": s.device, "stage": i, "n_stages": len(stages),
                   "is_source": i == 0, "is_last": nxt is None, "model": config.model,
                   "next": {"name": nxt, "host": addr[nxt][0], "port": addr[nxt][1]} if nxt else None,
                   "source": {"name": names[0], "host": addr[names[0]][0], "port": addr[names[0]][1]},
                   "links": shaping_for(self.state, s.device),
                   "sampling": {"temperature": config.temperature, "top_p": config.top_p, "seed": config.seed},
                   "max_new_tokens": config.max_new_tokens, "chat": config.chat, "debug_logits": config.debug_logits}
            self.clients[s.device].configure(cfg)

    def subscribe(self) -> None:
        """Every device's event stream (data plane EVENTS frames, one JSON event per line) into self.inbox."""

        def handler_for(name):
            def handler(conn, frame):
                for line in bytes(frame.payload).split(b"\n"):
                    if line:
                        self.inbox.put((name, json.loads(line)))
            return handler

        def closed_for(name):
            def on_close(conn, err):
                if not self.closing.is_set():
                    self.inbox.put((name, {"type": "_closed", "error": str(err) if err else None}))
            return on_close

        for name in self.names:
            self._subs.append(self.clients[name].subscribe(handler_for(name), closed_for(name)))

    # --- during the run -------------------------------------------------------------------------------------
    def fix_clock(self, name: str, ev: dict) -> dict:
        """An event's times moved onto the controller's clock (in place)."""
        off = self.offsets.get(ev.get("device", name), 0.0)
        if off:
            for k in ("start_s", "end_s", "t_s"):
                if k in ev:
                    ev[k] -= off
        return ev

    def alive(self, name: str) -> bool:
        try:
            self.clients[name].ping()
            return True
        except Exception:
            return False

    def dead(self, name: str, why: str) -> RuntimeError:
        """The error for a device that stopped answering: why it died (testbeds.failure) and when."""
        from edgeshard.testbeds import failure
        return RuntimeError(f"{failure(self.state, name)}; it failed during the run: {why}")

    def cancel_all(self) -> None:
        """Every device drops its work (best effort: a dead one cannot)."""
        for c in self.clients.values():
            try:
                c.cancel()
            except Exception:
                pass

    def close(self) -> None:
        self.closing.set()
        for s in self._subs:
            s.close()
        self._subs = []
        for c in self.clients.values():
            c.close()
