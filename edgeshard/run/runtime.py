"""Runtime: deploy a plan's shards on device servers and generate, in sequential or pipeline mode.

    result = run(testbed, plan, "smollm2-135m", ["Hello"], max_new_tokens=16, state=launch_state)
    r = Run(testbed, plan, model, prompts, 16, mode="pipeline", state=state).start()   # notebook: returns at once
    for ev in r: ...            # events as they arrive (or r.events, a queue.Queue); r.stop() stops the run
    r.wait()                    # the result dict

What goes where (ARCHITECTURE.md, runtime): the controller (this module) talks rpyc to each device for control
only. It sends the raw prompt text to the source device, which tokenises it (prompt token ids never leave the
source) and detokenises the generated ids (the text comes back in the source's events). Activations go stage to
stage over the data plane; the last stage samples and returns the 8-byte token id to the source (a ring). The
controller never carries activations; it receives the devices' events (data plane, EVENTS frames), appends each
one to run_dir/events.jsonl as it arrives (flushed per line), and passes it to on_event and the events queue.

Modes: "sequential" submits one prompt at a time (per-token latency); "pipeline" keeps up to max_in_flight
(default: all) sequences in flight; each sequence's next step enters the first stage as soon as its token is back.

Run folder (default runs/<timestamp>-<strategy>-<objective>/): testbed.toml, profile.json (if given), plan.json,
parameters.json, environment.json, events.jsonl, summary.json (metrics.summarize + results).
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import platform
import queue
import random
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from edgeshard.config import paths
from edgeshard.config import plan as planm
from edgeshard.config import testbed as tbm
from edgeshard.config.errors import ConfigError, PlanError
from edgeshard.run import metrics

MODES = ("sequential", "pipeline")
DRAIN_TIMEOUT_S = 5.0  # after the last token: wait this long at most for trailing events
WATCHDOG_S = 2.0  # no event for this long: ping the devices to notice a dead one


class RunStopped(Exception):
    pass


def _n_units(model: str) -> int:
    from edgeshard.config import catalog

    if model in catalog.MODELS:
        return catalog.get(model).n_units
    from edgeshard.device.model import spec_for  # a local folder: needs its config.json

    return spec_for(model).n_units


def check_plan(tb: tbm.Testbed, plan: planm.Plan, model: str) -> None:
    """A plan the runtime can execute on this testbed and model, or a PlanError naming what is wrong."""
    bad = []
    if not plan.stages:
        raise PlanError("the plan has no stages")
    for s in plan.stages:
        if s.device not in tb.names:
            bad.append(f"stage device {s.device!r} is not in testbed {tb.name!r} (devices: {', '.join(tb.names)})")
    if plan.stages[0].device != tb.source:
        bad.append(f"the first stage runs on {plan.stages[0].device!r}, not on the source {tb.source!r} "
                   f"(the source holds the prompt and the embedding)")
    names = [s.device for s in plan.stages]
    for d in sorted({n for n in names if names.count(n) > 1}):
        bad.append(f"device {d!r} holds more than one stage (one shard per device)")
    n = _n_units(model)
    pos = 0
    for s in plan.stages:
        if s.start != pos:
            bad.append(f"stage {s.device}[{s.start}, {s.stop}) does not start at unit {pos}")
        pos = s.stop
    if pos != n:
        bad.append(f"the stages end at unit {pos}; model {model!r} has {n} units")
    if plan.model and plan.model != model:
        bad.append(f"the plan was made for model {plan.model!r}, not {model!r}")
    if bad:
        raise PlanError("cannot run this plan: " + "; ".join(bad))


def _load_inputs(testbed, plan) -> tuple[tbm.Testbed, planm.Plan]:
    tb = tbm.as_testbed(testbed)
    pl = plan if isinstance(plan, planm.Plan) else planm.load(plan)
    return tb, pl


def _token_file(tb: tbm.Testbed, state: dict | None) -> str | None:
    if state and state.get("token_file"):
        return state["token_file"]
    if tb.token_file:
        p = Path(tb.token_file)
        if not p.is_absolute() and tb.path:
            p = Path(tb.path).parent / p
        return str(p)
    return None


def _address(tb: tbm.Testbed, state: dict | None, name: str) -> tuple[str, int]:
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
    """The shaping a device applies per destination: the state's links enforced by "app"."""
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


def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment() -> dict:
    root = paths.REPO
    sha = dirty = None
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=5).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                    capture_output=True, text=True, timeout=5).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return {"python": platform.python_version(), "platform": platform.platform(), "hostname": socket.gethostname(),
            "torch": _version("torch"), "transformers": _version("transformers"), "rpyc": _version("rpyc"),
            "numpy": _version("numpy"), "edgeshard": _version("edgeshard"), "git_sha": sha, "git_dirty": dirty}


def _boot_id() -> str:
    try:
        return open("/proc/sys/kernel/random/boot_id").read().strip()
    except OSError:
        return ""


def default_run_dir(plan: planm.Plan, base: str | Path = "runs") -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    name = f"{stamp}-{plan.strategy}-{plan.objective}".replace("/", "_")
    p, i = Path(base) / name, 1
    while p.exists():
        i += 1
        p = Path(base) / f"{name}-{i}"
    return p


class Run:
    """One execution of a plan. start() runs it in a background thread; run_sync() in the caller's thread.

    events: queue.Queue of event dicts (metrics.py schema, plus "request"/"seq_done"/"error" extras; a token
    event carries its detokenised "text" piece), then None when the run ends; filled for runs started with
    start() (use on_event with run_sync()). Iterating a started Run yields the events. stop() stops generation
    on every device; wait() then returns the partial result (result["stopped"] is True).
    """

    def __init__(self, testbed, plan, model: str, prompts: list, max_new_tokens: int, mode: str = "sequential",
                 state: dict | None = None, dtype: str = "float32", temperature: float = 0.0, top_p: float = 1.0,
                 seed: int = 0, chat: bool = False, run_dir: str | Path | None = None,
                 on_event: Callable[[dict], None] | None = None, stop_event: threading.Event | None = None,
                 debug_logits: bool = False, max_in_flight: int | None = None, profile=None,
                 command: list[str] | None = None, runs_base: str | Path = "runs", write_run_dir: bool = True):
        if mode not in MODES:
            raise ValueError(f"mode {mode!r} is not one of {', '.join(MODES)}")
        if not prompts:
            raise ValueError("no prompts: give at least one")
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens = {max_new_tokens!r} must be a positive integer")
        self.tb, self.plan = _load_inputs(testbed, plan)
        self.model, self.prompts, self.max_new_tokens, self.mode = model, list(prompts), max_new_tokens, mode
        self.state, self.dtype, self.seed, self.chat = state, dtype, seed, chat
        self.temperature, self.top_p = temperature, top_p
        self.on_event, self.debug = on_event, debug_logits
        self.stop_event = stop_event or threading.Event()
        self.max_in_flight = max_in_flight if mode == "pipeline" else 1
        self.profile, self.command = profile, command
        self.write_run_dir = write_run_dir
        self.run_dir = Path(run_dir) if run_dir else (default_run_dir(self.plan, runs_base) if write_run_dir else None)
        if self.run_dir is not None:
            self.run_dir = self.run_dir.resolve()  # printed and recorded: absolute, valid from any directory
        self.events: queue.Queue = queue.Queue()
        self.result: dict | None = None
        self.error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._done = threading.Event()
        self._feed_queue = False  # the events queue is filled for started (background) runs
        self.clients: dict = {}
        check_plan(self.tb, self.plan, model)

    # --- notebook API ------------------------------------------------------------------------------------
    def start(self) -> "Run":
        if self._thread is not None:
            raise RuntimeError("this run was already started")

        def target():
            try:
                self.run_sync()
            except BaseException as e:  # kept for wait()
                self.error = e

        self._feed_queue = True
        self._thread = threading.Thread(target=target, name="edgeshard-run", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop generating (every device drops its work); wait() then returns the partial result."""
        self.stop_event.set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> dict:
        if self._thread is None:
            raise RuntimeError("start() the run first")
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"the run is still going after {timeout} s")
        if self.error is not None:
            raise self.error
        return self.result

    def __iter__(self):
        while True:
            ev = self.events.get()
            if ev is None:
                return
            yield ev

    # --- the run -------------------------------------------------------------------------------------------
    def run_sync(self) -> dict:
        try:
            return self._execute()
        finally:
            self._done.set()
            self.events.put(None)

    def _connect(self) -> None:
        from edgeshard.device import auth
        from edgeshard.device.client import DeviceClient
        from edgeshard.testbeds import diagnosis

        secret = auth.load_secret(_token_file(self.tb, self.state))
        errors = {}

        def one(name):
            host, port = _address(self.tb, self.state, name)
            try:
                self.clients[name] = DeviceClient(name, host, port, secret,
                                                  diagnose=lambda n=name: diagnosis(self.state, n))
            except Exception as e:
                errors[name] = e

        self._parallel(one, [s.device for s in self.plan.stages])
        if errors:
            for c in self.clients.values():
                c.close()
            name, e = sorted(errors.items())[0]
            raise RuntimeError(f"device {name!r}: {e}") from e
        self.secret = secret

    @staticmethod
    def _parallel(fn, items) -> None:
        threads = [threading.Thread(target=fn, args=(x,), daemon=True) for x in items]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def _write_inputs(self) -> None:
        d = self.run_dir
        d.mkdir(parents=True, exist_ok=True)
        if self.tb.path and Path(self.tb.path).is_file():
            shutil.copyfile(self.tb.path, d / "testbed.toml")
        else:
            (d / "testbed.toml").write_text(tbm.dumps(self.tb))
        if self.profile is not None:
            if isinstance(self.profile, (str, Path)):
                shutil.copyfile(self.profile, d / "profile.json")
            else:
                (d / "profile.json").write_text(self.profile.dumps())
        self.plan.save(d / "plan.json")
        params = {"model": self.model, "prompts": self.prompts, "mode": self.mode, "seed": self.seed,
                  "max_new_tokens": self.max_new_tokens, "dtype": self.dtype, "temperature": self.temperature,
                  "top_p": self.top_p, "chat": self.chat, "max_in_flight": self.max_in_flight,
                  "debug_logits": self.debug, "command": self.command or sys.argv, "run_id": self.run_id,
                  "testbed": self.tb.name, "testbed_state": self.state}
        (d / "parameters.json").write_text(json.dumps(params, indent=1, default=str) + "\n")

    def _execute(self) -> dict:
        self.run_id = f"{int(time.time() * 1000):x}-{random.getrandbits(24):06x}"
        epoch = random.randint(1, 255)
        stages = self.plan.stages
        names = [s.device for s in stages]
        self._connect()
        events_file = None
        subs = []
        try:
            if self.write_run_dir:
                self._write_inputs()
                events_file = open(self.run_dir / "events.jsonl", "a", buffering=1)
            infos = {}

            def info(name):
                infos[name] = self.clients[name].info()

            self._parallel(info, names)
            here = _boot_id()
            # clock offsets (device clock - controller clock); zero on this machine (one clock)
            offsets = {}
            for name in names:
                if infos[name].get("boot_id") == here and here:
                    offsets[name] = 0.0
                else:
                    t0 = time.time()
                    dt = self.clients[name].ping()["time_s"]
                    offsets[name] = dt - (t0 + time.time()) / 2
            self.offsets = offsets
            env = environment()
            env["devices"] = infos
            env["clock_offsets_s"] = offsets
            if self.write_run_dir:
                (self.run_dir / "environment.json").write_text(json.dumps(env, indent=1) + "\n")

            # 1. shards (in parallel: loading is the slow part)
            loads, load_err = {}, {}

            def load(stage):
                try:
                    loads[stage.device] = self.clients[stage.device].load_stage(
                        self.model, stage.start, stage.stop, self.dtype, self.seed)
                except Exception as e:
                    load_err[stage.device] = e

            self._parallel(load, stages)
            if load_err:
                name, e = sorted(load_err.items())[0]
                stage = next(s for s in stages if s.device == name)
                if not self._alive(name):  # e.g. OOM-killed while loading: say so, with what the kernel knows
                    raise self._dead(name, f"while loading stage [{stage.start}, {stage.stop}) of {self.model}: "
                                           f"{e}") from e
                raise RuntimeError(str(e) if str(e).startswith("device") else f"device {name!r}: {e}") from e
            self.loads = loads
            # 2. the ring
            addr = {n: (infos[n].get("host") if infos[n].get("host") not in (None, "0.0.0.0", "::")
                        else self.clients[n].host, infos[n]["data_port"]) for n in names}
            for i, s in enumerate(stages):
                nxt = stages[i + 1].device if i + 1 < len(stages) else None
                cfg = {"run_id": self.run_id, "epoch": epoch, "name": s.device, "stage": i, "n_stages": len(stages),
                       "is_source": i == 0, "is_last": nxt is None, "model": self.model,
                       "next": {"name": nxt, "host": addr[nxt][0], "port": addr[nxt][1]} if nxt else None,
                       "source": {"name": names[0], "host": addr[names[0]][0], "port": addr[names[0]][1]},
                       "links": shaping_for(self.state, s.device),
                       "sampling": {"temperature": self.temperature, "top_p": self.top_p, "seed": self.seed},
                       "max_new_tokens": self.max_new_tokens, "chat": self.chat, "debug_logits": self.debug}
                self.clients[s.device].configure(cfg)
            # 3. event streams
            inbox: queue.Queue = queue.Queue()
            closing = threading.Event()

            def handler_for(name):
                def handler(conn, frame):
                    for line in bytes(frame.payload).split(b"\n"):
                        if line:
                            inbox.put((name, json.loads(line)))
                return handler

            def closed_for(name):
                def on_close(conn, err):
                    if not closing.is_set():
                        inbox.put((name, {"type": "_closed", "error": str(err) if err else None}))
                return on_close

            for name in names:
                subs.append(self.clients[name].subscribe(handler_for(name), closed_for(name)))
            # 4. generate
            try:
                out = self._generate(inbox, events_file, names, loads)
            except BaseException:  # an error, a dead device, Ctrl-C: the others must not keep generating
                for c in self.clients.values():
                    try:
                        c.cancel()
                    except Exception:
                        pass
                raise
            finally:
                closing.set()
            return out
        finally:
            for c in subs:
                c.close()
            if events_file:
                events_file.close()
            for c in self.clients.values():
                c.close()

    def _fix_clock(self, name: str, ev: dict) -> dict:
        off = self.offsets.get(ev.get("device", name), 0.0)
        if off:
            for k in ("start_s", "end_s", "t_s"):
                if k in ev:
                    ev[k] -= off
        return ev

    def _alive(self, name: str) -> bool:
        try:
            self.clients[name].ping()
            return True
        except Exception:
            return False

    def _dead(self, name: str, why: str) -> RuntimeError:
        from edgeshard.testbeds import failure
        return RuntimeError(f"{failure(self.state, name)}; it failed during the run: {why}")

    def _generate(self, inbox: queue.Queue, events_file, names: list[str], loads: dict) -> dict:
        from edgeshard.device.client import DeviceError

        n = len(self.prompts)
        source = self.clients[names[0]]
        results = [{"prompt": p, "token_ids": [], "text": "", "token_latency_s": []} for p in self.prompts]
        requests, last_t = {}, {}
        received = {name: 0 for name in names}
        events: list[dict] = []
        next_seq, in_flight, finished = 0, set(), set()
        limit = self.max_in_flight or n
        stopped = False

        def submit_more():
            nonlocal next_seq
            while next_seq < n and len(in_flight) < limit:
                seq = next_seq
                next_seq += 1
                in_flight.add(seq)
                source.submit(seq, self.prompts[seq], {"max_new_tokens": self.max_new_tokens, "t_submit": time.time()})

        def record(name, ev):
            received[name] += 1
            ev = self._fix_clock(name, ev)
            events.append(ev)
            if events_file:
                events_file.write(json.dumps(ev, separators=(",", ":")) + "\n")
            if self._feed_queue:
                self.events.put(ev)
            if self.on_event:
                self.on_event(ev)
            return ev

        submit_more()
        quiet_since = time.time()
        while len(finished) < n:
            if self.stop_event.is_set():
                stopped = True
                for c in self.clients.values():
                    try:
                        c.cancel()
                    except DeviceError:
                        pass
                break
            try:
                name, ev = inbox.get(timeout=0.1)
            except queue.Empty:
                if time.time() - quiet_since > WATCHDOG_S:
                    quiet_since = time.time()
                    for nm, c in self.clients.items():
                        try:
                            c.ping()
                        except DeviceError as e:
                            raise self._dead(nm, str(e)) from None
                continue
            quiet_since = time.time()
            kind = ev.get("type")
            if kind == "_closed":
                raise self._dead(name, f"its event stream closed ({ev.get('error') or 'connection lost'})")
            if ev.get("run") != self.run_id:
                continue  # a stale event of an earlier run
            ev = record(name, ev)
            if kind == "error":
                raise RuntimeError(f"device {ev.get('device', name)!r}: {ev.get('message')}"
                                   + (f" (sequence {ev['seq']})" if ev.get("seq") is not None else ""))
            elif kind == "request":
                requests[ev["seq"]] = ev["t_s"]
                last_t[ev["seq"]] = ev["t_s"]
            elif kind == "token":
                seq = ev["seq"]
                r = results[seq]
                r["token_ids"].append(ev["token_id"])
                r["text"] += ev.get("text", "")
                r["token_latency_s"].append(ev["t_s"] - last_t.get(seq, ev["t_s"]))
                last_t[seq] = ev["t_s"]
            elif kind == "seq_done":
                seq = ev["seq"]
                r = results[seq]
                r["token_ids"], r["text"] = ev["token_ids"], ev["text"]
                r["prompt_tokens"], r["stop_reason"] = ev.get("prompt_tokens"), ev.get("reason")
                finished.add(seq)
                in_flight.discard(seq)
                submit_more()
        # drain trailing events (sends/recvs of the last token) until every device's count is in
        deadline = time.time() + DRAIN_TIMEOUT_S
        want = {}
        for nm in names:
            try:
                want[nm] = self.clients[nm].stats()["events_emitted"]
            except DeviceError:
                want[nm] = received[nm]
        while any(received[nm] < want[nm] for nm in names) and time.time() < deadline:
            try:
                name, ev = inbox.get(timeout=0.05)
            except queue.Empty:
                continue
            if ev.get("type") == "_closed" or ev.get("run") != self.run_id:
                continue
            record(name, ev)
        if self.debug and not stopped:
            import numpy as np

            last = names[-1]
            vocab = loads[last]["vocab"]
            for seq in range(n):
                raw = self.clients[last].debug_logits(seq)
                results[seq]["logits"] = np.frombuffer(raw, dtype=np.float32).reshape(-1, vocab)
        summary = metrics.summarize(events)
        self.result = {"results": results, "run_dir": str(self.run_dir) if self.run_dir else None,
                       "summary": summary, "stopped": stopped, "run_id": self.run_id, "mode": self.mode}
        if self.write_run_dir:
            out = dict(summary)
            out["results"] = [{k: v for k, v in r.items() if k != "logits"} for r in results]
            out.update({"mode": self.mode, "stopped": stopped, "model": self.model, "plan_predicted": self.plan.predicted,
                        "stages": [{"device": s.device, "start": s.start, "stop": s.stop} for s in self.plan.stages],
                        "load": loads})
            (self.run_dir / "summary.json").write_text(json.dumps(out, indent=1) + "\n")
        return self.result


def run(testbed, plan, model: str, prompts: list, max_new_tokens: int, mode: str = "sequential",
        state: dict | None = None, dtype: str = "float32", temperature: float = 0.0, top_p: float = 1.0,
        seed: int = 0, chat: bool = False, run_dir: str | Path | None = None,
        on_event: Callable[[dict], None] | None = None, stop_event: threading.Event | None = None,
        **kw) -> dict:
    """Deploy and generate (blocking). Returns {"results": [{"prompt", "token_ids", "text", "token_latency_s",
    ...}], "run_dir", "summary", "stopped"}. Extra keywords: debug_logits, max_in_flight, profile, command,
    runs_base, write_run_dir (see Run)."""
    return Run(testbed, plan, model, prompts, max_new_tokens, mode, state, dtype, temperature, top_p, seed, chat,
               run_dir, on_event, stop_event, **kw).run_sync()
