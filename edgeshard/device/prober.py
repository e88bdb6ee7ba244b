"""The prober of a device (edgeshard/device/service.py wires it): what edgeshard/run/profiler.py measures on
the devices beyond unit costs.

- measure_link: latency (PING/PONG) and bandwidth (a burst of BULK frames, answered by one BULK_ACK) of our link
  to another device, through our shaping as a run sends.
- The other end of those probes: PONG and BULK_ACK go back on the connection the probe came on.
- measure_step: the runtime's own cost of a stage step, a ring on this device alone through the stage worker's
  own code (edgeshard/device/stage.py).
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
from collections.abc import Callable

from edgeshard.device import wire
from edgeshard.device.stage import ACT_HEADROOM_BYTES, StageWorker

PROBE_FRAME_BYTES = 1 << 16  # BULK frames of measure_link; also the largest BULK frame a device accepts
STEP_PROBE_PEER = "\x00step-probe"  # measure_step's ring: this device as its own next stage (no device has this name)


class Prober:
    """Link and step measurements. stage: the device's StageWorker (its name, shaping, links and compute lock).
    on_frame: the data-plane dispatcher, reader of the connections measure_link dials (it routes PONG and
    BULK_ACK back here, on_reply)."""

    def __init__(self, stage: StageWorker, on_frame: Callable):
        self.stage = stage
        self._on_frame = on_frame
        self.lock = threading.Lock()  # guards counter
        self.counter = 0  # probes started by this process (part of each probe's id)
        self.waiters: dict[int, queue.Queue] = {}  # probe id -> the PONG / BULK_ACK frames of that probe
        self.bulk: dict[tuple, dict] = {}  # (id(conn), probe id) -> {"first", "last", "bytes", "frames"}
        self.reply_links: dict[int, wire.Link] = {}  # id(conn) -> link replying on an accepted connection

    # ------------------------------------------------------------------ the answering side
    def _reply_link(self, conn: wire.Connection) -> wire.Link:
        """Replies (probe echoes) go back on the connection they came on, shaped as our link to that peer."""
        link = self.reply_links.get(id(conn))
        if link is None:
            s = self.stage.shaping.get(conn.peer, {})
            link = wire.Link(conn, s.get("bandwidth_bytes_s"), s.get("latency_s", 0.0))
            self.reply_links[id(conn)] = link
        return link

    def drop_reply_link(self, conn: wire.Connection) -> None:
        """conn closed: close the link that replied on it, if any."""
        link = self.reply_links.pop(id(conn), None)
        if link:
            link.close()

    def on_frame(self, conn: wire.Connection, f: wire.Frame) -> None:
        """A PING, BULK, PONG or BULK_ACK frame, in its connection's reader thread. Frame fields: PING (seq i,
        aux probe id); BULK (seq = frames in the burst, position = index, aux probe id); replies echo them."""
        k = f.kind
        if k == wire.PING:
            self._reply_link(conn).send(wire.PONG, f.seq, f.position, f.aux,
                                        json.dumps({"t_recv": f.t_recv}).encode())
        elif k == wire.BULK:
            key = (id(conn), f.aux)
            b = self.bulk.setdefault(key, {"first": f.t_recv, "bytes": 0, "frames": 0})
            if f.position > 0:  # the first frame only starts the clock
                b["bytes"] += f.nbytes
            b["frames"] += 1
            b["last"] = f.t_recv
            if f.position == f.seq - 1:  # the last frame of the burst
                self.bulk.pop(key, None)
                self._reply_link(conn).send(wire.BULK_ACK, f.seq, f.position, f.aux, json.dumps(b).encode())
        elif k in (wire.PONG, wire.BULK_ACK):
            q = self.waiters.get(f.aux)
            if q is not None:
                q.put(f)

    # ------------------------------------------------------------------ measurements
    def measure_link(self, spec: dict) -> dict:
        """Measure our link to another device over the data plane (through our shaping, as the run sends).
        spec: dst, host, port of the other device's data plane; pings, target_s (how long the second burst should
        take), max_bytes (its cap)."""
        name, host, port = spec["dst"], spec["host"], int(spec["port"])
        pings = int(spec.get("pings", 20))
        target_s = float(spec.get("target_s", 0.5))
        max_bytes = int(spec.get("max_bytes", 256 << 20))
        s = self.stage.shaping.get(name, {})
        conn = wire.dial(host, port, self.stage.secret, {"from": self.stage.name, "role": "probe"}, peer=name,
                         limits=self.stage.limits)
        with self.lock:
            self.counter += 1
            pid = (os.getpid() << 20) + self.counter
        q: queue.Queue = queue.Queue()
        self.waiters[pid] = q
        conn.start_reader(self._on_frame, None, name="probe")
        link = wire.Link(conn, s.get("bandwidth_bytes_s"), s.get("latency_s", 0.0))
        try:
            rtts, one_way = [], []
            for i in range(pings):
                t0 = time.time()
                link.send(wire.PING, i, 0, pid)
                f = q.get(timeout=30)
                t1 = time.time()
                rtts.append(t1 - t0)
                one_way.append(json.loads(bytes(f.payload))["t_recv"] - t0)

            def burst(total: int) -> dict:
                frames = max(2, -(-total // PROBE_FRAME_BYTES))
                chunk = bytes(PROBE_FRAME_BYTES)
                for j in range(frames):
                    link.send(wire.BULK, frames, j, pid, chunk)
                f = q.get(timeout=600)
                b = json.loads(bytes(f.payload))
                dt = b["last"] - b["first"]
                return {"bytes": b["bytes"], "seconds": dt, "bandwidth_bytes_s": b["bytes"] / dt if dt > 0 else None}

            first = burst(1 << 20)
            bw = first["bandwidth_bytes_s"] or 1e9
            second = burst(int(min(max_bytes, max(1 << 20, bw * target_s))))
            rtts.sort()
            one_way.sort()

            def med(xs: list) -> float:
                return xs[len(xs) // 2]

            return {"src": self.stage.name, "dst": name, "rtt_s": med(rtts), "rtt_min_s": rtts[0],
                    "one_way_s": med(one_way), "pings": pings,
                    "bandwidth_bytes_s": second["bandwidth_bytes_s"] or first["bandwidth_bytes_s"],
                    "bulk_bytes": second["bytes"], "bulk_seconds": second["seconds"],
                    "shaping": s, "frame_bytes": PROBE_FRAME_BYTES + wire.HEADER_BYTES}
        finally:
            self.waiters.pop(pid, None)
            link.close()
            conn.close()

    def measure_step(self, spec: dict, host: str, port: int) -> dict:
        """The runtime's own cost of one stage step here, beyond the forward pass (profile step_overhead_s).

        A ring on this device alone, through the run's own code: `in_flight` activation frames of
        `activation_bytes` go out to our own data server (host, port); each arrival is a real step (the
        dispatcher, then StageWorker.on_frame: recv event, the compute lock, frame parse; StageWorker.compute with
        an identity stage: compute event, then StageWorker.send to the next stage, which is us again, through a
        wire.Link shaped with `latency_s` as the run's links are). With several frames in flight the device keeps
        stepping, so what a step costs is what a pipelined stage pays on top of its units: returned as wall time
        per step (step_s) and process CPU time per step, all threads (cpu_per_step_s; the profiler scales it by
        the device's slowdown on the CPU, as it does the units). A controller subscribed to our events (the
        profiler) gets them pushed as in a run. Measured over the `steps` steps after `warmup`. Not during a run:
        it replaces the stage and configuration, as profile_units drops the stage (the next run loads and
        configures again).
        """
        import torch

        stage = self.stage
        steps, warmup = int(spec.get("steps", 200)), int(spec.get("warmup", 20))
        in_flight = int(spec.get("in_flight", 8))
        if steps < 1 or warmup < 1 or in_flight < 1:
            raise ValueError(f"measure_step needs steps, warmup and in_flight >= 1; got {steps}, {warmup}, "
                             f"{in_flight}")
        floats = max(1, int(spec["activation_bytes"]) // 4)
        if floats * 4 + ACT_HEADROOM_BYTES > wire.MAX_PAYLOAD:
            raise ValueError(f"measure_step: activation_bytes {spec['activation_bytes']} is too large")
        done = threading.Event()
        marks: list[tuple[float, float]] = []  # (wall, process CPU) at the warm-up step and the last one

        class Echo:  # the identity stage: counts steps, ends the ring after the last
            n = 0

            def forward(_, seq, x, position):
                Echo.n += 1
                if Echo.n in (warmup, warmup + steps):
                    marks.append((time.perf_counter(), time.process_time()))
                if Echo.n == warmup + steps:
                    stage.epoch = (stage.epoch + 1) & 0xFF  # this step's frames keep the old epoch: dropped on arrival
                    done.set()
                return x

            def reset(_, seq):
                pass

        with stage.compute_lock:
            epoch = stage.install(Echo(), {"run_id": "measure_step", "stage": 0, "is_source": False,
                                           "is_last": False, "next": {"name": STEP_PROBE_PEER}})
            stage.limits.set(wire.ACT, floats * 4 + ACT_HEADROOM_BYTES)  # the probe's frames (1, 1, floats) fp32
            stage.shaping[STEP_PROBE_PEER] = {"bandwidth_bytes_s": None, "latency_s": float(spec.get("latency_s", 0))}
            link = stage.dial(STEP_PROBE_PEER, host, port)
        x = torch.zeros((1, 1, floats), dtype=torch.float32)
        for seq in range(in_flight):
            stage.send(STEP_PROBE_PEER, wire.ACT, seq, 0, 0, x, epoch)
        ok = done.wait(float(spec.get("timeout_s", 120)))
        with stage.compute_lock:
            stage.epoch = (stage.epoch + 1) & 0xFF
            stage.model, stage.cfg = None, {}
            stage.set_act_limit(None)
            stage.forget_link(STEP_PROBE_PEER)
        link.close()
        link.conn.close()
        if not ok:
            raise TimeoutError(f"device {stage.name!r}: {warmup + steps} probe steps did not finish in time")
        (w0, c0), (w1, c1) = marks
        return {"step_s": (w1 - w0) / steps, "cpu_per_step_s": (c1 - c0) / steps, "steps": steps,
                "warmup": warmup, "in_flight": in_flight, "activation_bytes": floats * 4,
                "latency_s": float(spec.get("latency_s", 0))}
