"""The event outbox of a device (edgeshard/device/service.py wires it): events queued by the compute path and
pushed to the subscribed controllers in EVENTS frames (edgeshard/device/wire.py), JSON lines.

Event schema: edgeshard/run/metrics.py. A controller subscribes by opening a data connection whose hello says
{"role": "events"}; it leaves when that connection closes or a send to it fails.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable

from edgeshard.device import wire

EVENT_BACKLOG = 500_000  # events kept while no controller is subscribed
EVENTS_FRAME_BYTES = 4 << 20  # event batches go out in EVENTS frames of at most this (< wire.EVENTS_MAX_BYTES)
FLUSH_S = 0.02  # events are pushed to the controller in batches at most this old
log = logging.getLogger("edgeshard.serve")


class Outbox:
    """Queued events and the controllers they go to, with the thread that pushes them.

    device, run_id: read at each emit (configure renames a device and starts a new run), stamped on every event
    as "device" (unless the event names one) and "run".
    """

    def __init__(self, device: Callable[[], str], run_id: Callable[[], object]):
        self._device, self._run_id = device, run_id
        self.subscribers: list[wire.Connection] = []
        self.events: list[dict] = []
        self.cond = threading.Condition()  # guards events, subscribers, n_emitted, _urgent
        self.n_emitted = 0  # events of the current run (the controller drains until it has them all)
        self._urgent = False
        threading.Thread(target=self._push_loop, name="events", daemon=True).start()

    def emit(self, ev: dict, urgent: bool = False) -> None:
        """Queue an event for the subscribed controllers. Events go out in batches every FLUSH_S (so pushing
        them costs the compute path one thread wake-up per batch, not one per event); urgent ones at once."""
        ev.setdefault("device", self._device())
        ev["run"] = self._run_id()
        with self.cond:
            if len(self.events) < EVENT_BACKLOG:
                self.events.append(ev)
            self.n_emitted += 1
            if urgent:
                self._urgent = True
                self.cond.notify()

    def new_run(self, start: Callable[[], None]) -> None:
        """Forget the events of an earlier run that nobody collected and restart the count. start() runs under
        the outbox's lock (it installs the new run's configuration, so no event is stamped with the old run id
        and counted in the new one)."""
        with self.cond:
            start()
            self.events = []
            self.n_emitted = 0

    def subscribe(self, conn: wire.Connection) -> None:
        with self.cond:
            self.subscribers.append(conn)
            self.cond.notify()

    def unsubscribe(self, conn: wire.Connection) -> None:
        with self.cond:
            if conn in self.subscribers:
                self.subscribers.remove(conn)

    def _push_loop(self) -> None:
        """Every FLUSH_S (or at once for an urgent event) send what accumulated. A timer, not a wake-up per
        event: the compute path never waits for this thread."""
        while True:
            with self.cond:
                if not self._urgent:
                    self.cond.wait(FLUSH_S)
                if not (self.events and self.subscribers):
                    self._urgent = False
                    continue
                batch, self.events, self._urgent = self.events, [], False
                subs = list(self.subscribers)
            for n, data in event_frames(batch, EVENTS_FRAME_BYTES):
                for c in subs:
                    try:
                        c.send(wire.EVENTS, aux=n, payload=data)
                    except wire.WireError:
                        self.unsubscribe(c)


def event_frames(batch: list[dict], max_bytes: int):
    """(events, payload) pairs: the batch as JSON lines, split so that no payload exceeds max_bytes. An event
    that alone is larger is left out (logged): no receiver would take it."""
    lines, size = [], 0
    for ev in batch:
        line = json.dumps(ev, separators=(",", ":")).encode()
        if len(line) > max_bytes:
            log.warning("event of %d bytes (type %s) exceeds an EVENTS frame (%d bytes): not sent", len(line),
                        ev.get("type"), max_bytes)
            continue
        if lines and size + 1 + len(line) > max_bytes:
            yield len(lines), b"\n".join(lines)
            lines, size = [], 0
        size += len(line) + (1 if lines else 0)
        lines.append(line)
    if lines:
        yield len(lines), b"\n".join(lines)
