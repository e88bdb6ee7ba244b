"""Generate over a deployed ring (run/deploy.py): submit prompts, collect tokens from the devices' events.

    gen = generate(dep, config, record, stop_event)     # -> Generation(results, events, stopped)

The controller only submits prompt text to the source (which tokenises it) and reads events; activations go
device to device. "sequential" keeps one sequence in flight, "pipeline" up to config.max_in_flight (None: all);
each finished sequence lets the next prompt in. Every event of this run goes through record(ev) as it arrives
(run/runtime.Run writes it to events.jsonl and hands it to the caller).
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from edgeshard.run.deploy import Deployment
from edgeshard.run.parameters import RunConfig

DRAIN_TIMEOUT_S = 5.0  # after the last token: wait this long at most for trailing events
WATCHDOG_S = 2.0  # no event for this long: ping the devices to notice a dead one


@dataclass
class Generation:
    """results: one dict per prompt, {"prompt", "token_ids", "text", "token_latency_s", "prompt_tokens",
    "stop_reason"} (+ "logits", an array (tokens, vocab), with debug_logits). events: every recorded event, in
    arrival order, on the controller's clock. stopped: the caller stopped it before every sequence finished."""
    results: list[dict]
    events: list[dict] = field(default_factory=list)
    stopped: bool = False


def generate(dep: Deployment, config: RunConfig, record: Callable[[dict], None],
             stop_event: threading.Event) -> Generation:
    """Run every prompt to its end (or until stop_event); raise on a device error or a dead device."""
    from edgeshard.device.client import DeviceError

    prompts = config.prompts
    n = len(prompts)
    source = dep.clients[dep.names[0]]
    gen = Generation([{"prompt": p, "token_ids": [], "text": "", "token_latency_s": []} for p in prompts])
    results = gen.results
    last_t = {}  # seq -> time of its request or last token: the next token's latency starts there
    received = {name: 0 for name in dep.names}  # events per device, to drain up to the device's own count
    next_seq, in_flight, finished = 0, set(), set()
    limit = config.in_flight

    def submit_more():
        nonlocal next_seq
        while next_seq < n and len(in_flight) < limit:
            seq = next_seq
            next_seq += 1
            in_flight.add(seq)
            source.submit(seq, prompts[seq], {"max_new_tokens": config.max_new_tokens, "t_submit": time.time()})

    def take(name, ev):
        received[name] += 1
        ev = dep.fix_clock(name, ev)
        gen.events.append(ev)
        record(ev)
        return ev

    submit_more()
    quiet_since = time.time()
    while len(finished) < n:
        if stop_event.is_set():
            gen.stopped = True
            dep.cancel_all()
            break
        try:
            name, ev = dep.inbox.get(timeout=0.1)
        except queue.Empty:
            if time.time() - quiet_since > WATCHDOG_S:
                quiet_since = time.time()
                for nm, c in dep.clients.items():
                    try:
                        c.ping()
                    except DeviceError as e:
                        raise dep.dead(nm, str(e)) from None
            continue
        quiet_since = time.time()
        kind = ev.get("type")
        if kind == "_closed":
            raise dep.dead(name, f"its event stream closed ({ev.get('error') or 'connection lost'})")
        if ev.get("run") != dep.run_id:
            continue  # a stale event of an earlier run
        ev = take(name, ev)
        if kind == "error":
            raise RuntimeError(f"device {ev.get('device', name)!r}: {ev.get('message')}"
                               + (f" (sequence {ev['seq']})" if ev.get("seq") is not None else ""))
        elif kind == "request":
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
    _drain(dep, received, take)
    if config.debug_logits and not gen.stopped:
        import numpy as np

        last = dep.names[-1]
        vocab = dep.loads[last]["vocab"]
        for seq in range(n):
            raw = dep.clients[last].debug_logits(seq)
            results[seq]["logits"] = np.frombuffer(raw, dtype=np.float32).reshape(-1, vocab)
    return gen


def _drain(dep: Deployment, received: dict, take) -> None:
    """Trailing events (sends/recvs of the last token) until every device's count is in, DRAIN_TIMEOUT_S at most."""
    from edgeshard.device.client import DeviceError

    deadline = time.time() + DRAIN_TIMEOUT_S
    want = {}
    for nm in dep.names:
        try:
            want[nm] = dep.clients[nm].stats()["events_emitted"]
        except DeviceError:
            want[nm] = received[nm]
    while any(received[nm] < want[nm] for nm in dep.names) and time.time() < deadline:
        try:
            name, ev = dep.inbox.get(timeout=0.05)
        except queue.Empty:
            continue
        if ev.get("type") == "_closed" or ev.get("run") != dep.run_id:
            continue
        take(name, ev)
