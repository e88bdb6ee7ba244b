"""The device server (`edgeshard serve`): rpyc control plane + data plane + one compute worker.

Control (rpyc, explicit `exposed_` methods only; JSON strings in and out; no pickle, no public attrs, never
classic mode; HMAC handshake in the authenticator before rpyc speaks):
    ping, info, load_stage, configure, submit, cancel, debug_logits, profile_units, measure_link, measure_step,
    set_links, stats.
Data plane (wire.py frames on the port `info` reports; same handshake):
    ACT (activations, stage -> next stage), TOKEN (last stage -> source), END (free a sequence's KV cache),
    PING/PONG and BULK/BULK_ACK (link probes), EVENTS (device -> controller, JSON lines).
    Every frame is bounded before its payload is allocated (wire.FrameLimits, shared by all of this device's
    connections): control kinds wire.CONTROL_MAX_BYTES, BULK the probe's frame (prober.PROBE_FRAME_BYTES), ACT
    what the configured stage can send or receive (StageWorker.set_act_limit in stage.py;
    wire.ACT_UNCONFIGURED_BYTES until a stage is configured). A larger frame gets an ERROR and its connection
    is dropped.

A Node is one device process, wired from four parts, each in its own module of edgeshard/device/:
    outbox.py  Outbox: events queued and pushed to subscribed controllers in EVENTS frames (schema:
               edgeshard/run/metrics.py); every device timestamps its compute, sends and receives (time.time()).
    stage.py   StageWorker: the loaded StageModel, the run's configuration and epoch, links to the next stage,
               forward + send, sampling on the last stage, KV per sequence, the one worker thread (a device
               never runs two forwards at once).
    source.py  SourceSession: the source's sequences and tokenizer (the generation ring is described there).
    prober.py  Prober: link latency/bandwidth (measure_link, and the answers to other devices' probes) and
               measure_step.
The Node itself holds the data server and routes each frame kind to its part.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
import time

import rpyc
from rpyc.utils.authenticators import AuthenticationError
from rpyc.utils.server import ThreadedServer

from edgeshard.device import auth, wire
from edgeshard.device.outbox import Outbox
from edgeshard.device.prober import PROBE_FRAME_BYTES, Prober
from edgeshard.device.source import SourceSession
from edgeshard.device.stage import StageWorker

PROTOCOL_CONFIG = {
    "allow_pickle": False,
    "allow_public_attrs": False,
    "allow_all_attrs": False,
    "allow_setattr": False,
    "allow_delattr": False,
    "allow_exposed_attrs": True,
    "import_custom_exceptions": False,
    "instantiate_custom_exceptions": False,
    "instantiate_oldstyle_exceptions": False,
    "sync_request_timeout": 3600,  # server -> client requests (none are made); loads and profiles are long
}
log = logging.getLogger("edgeshard.serve")


def _boot_id() -> str:
    try:
        return open("/proc/sys/kernel/random/boot_id").read().strip()
    except OSError:
        return ""


def detected_memory_bytes() -> int | None:
    """Memory this process may use: MemAvailable, capped by a cgroup (v1 or v2) limit."""
    avail = None
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = open(path).read().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < (1 << 60):
            avail = min(avail, int(text)) if avail else int(text)
    return avail


class Node:
    """One device process: the data server and the parts it routes frames to (outbox, stage worker, source
    session, prober). The control plane (DeviceService) calls the methods below."""

    def __init__(self, host: str, secret: bytes, device: str = "cpu", name: str = "", data_port: int = 0,
                 memory_bytes: int | None = None, auth_timeout: float = auth.DEFAULT_TIMEOUT_S):
        self.host, self.device = host, device
        self.declared_memory_bytes = memory_bytes
        self.started = time.time()
        # What this device accepts on any data connection (shared: configure() changes the ACT entry). A device
        # never receives EVENTS (it sends them), so they get the control cap.
        self.limits = wire.FrameLimits(act=wire.ACT_UNCONFIGURED_BYTES, bulk=PROBE_FRAME_BYTES,
                                       events=wire.CONTROL_MAX_BYTES)
        self.counters = {"frames_in": 0, "frames_out": 0, "computes": 0, "errors": 0}
        # The parts read the name and the run id when they stamp an event (configure changes both).
        self.outbox = Outbox(lambda: self.stage.name, lambda: self.stage.cfg.get("run_id"))
        self.stage = StageWorker(name or socket.gethostname(), device, secret, self.limits, self.outbox,
                                 self.counters, self._on_frame, self._on_close)
        self.source = SourceSession(self.stage)
        self.stage.source = self.source
        self.prober = Prober(self.stage, self._on_frame)
        # last: frames may arrive as soon as it listens
        self.data = wire.DataServer(host, data_port, secret, self._on_frame, self._on_close,
                                    auth_timeout=auth_timeout, log=log.warning, on_open=self._on_open,
                                    limits=self.limits)

    @property
    def name(self) -> str:
        return self.stage.name

    # ------------------------------------------------------------------ data plane
    def _on_open(self, conn: wire.Connection) -> None:
        if conn.hello.get("role") == "events":
            self.outbox.subscribe(conn)

    def _on_close(self, conn: wire.Connection, err) -> None:
        if isinstance(err, wire.FrameRefused) and not conn.hello:  # a connection we dialed (the server logs its own)
            log.warning("data plane: dropped %s: %s", conn.peer, err)
        self.outbox.unsubscribe(conn)
        self.prober.drop_reply_link(conn)

    def _on_frame(self, conn: wire.Connection, f: wire.Frame) -> None:
        """Runs in the connection's reader thread, for accepted and dialed connections alike. Stage work runs
        right here, under the compute lock: no hand-off to another thread between a frame's arrival and its
        forward pass."""
        self.counters["frames_in"] += 1
        k = f.kind
        if k in (wire.ACT, wire.TOKEN, wire.END):
            self.stage.on_frame(conn, f)
        elif k in (wire.PING, wire.BULK, wire.PONG, wire.BULK_ACK):
            self.prober.on_frame(conn, f)
        elif k == wire.ERROR:  # a peer refused a frame of ours (and dropped the connection): fail the run loudly
            try:
                msg = str(f.json().get("message"))
            except (ValueError, AttributeError):
                msg = bytes(f.payload[:200]).decode(errors="replace")
            self.counters["errors"] += 1
            log.warning("data plane: %s refused a frame: %s", conn.peer, msg)
            self.outbox.emit({"type": "error", "seq": f.seq, "t_s": time.time(),
                              "message": f"{conn.peer} refused a frame from {self.name}: {msg}"}, urgent=True)

    # ------------------------------------------------------------------ control (called from rpyc threads)
    def info(self) -> dict:
        import platform

        mem = detected_memory_bytes()
        return {"name": self.name, "pid": os.getpid(), "host": self.host, "data_port": self.data.port,
                "device": self.device, "hostname": socket.gethostname(), "boot_id": _boot_id(),
                "python": platform.python_version(), "memory_bytes": self.declared_memory_bytes or mem,
                "detected_memory_bytes": mem, "stage": self.stage.spec, "uptime_s": time.time() - self.started,
                "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "time_s": time.time()}

    def load_stage(self, spec: dict) -> dict:
        return self.stage.load(spec)

    def configure(self, cfg: dict) -> dict:
        return self.stage.configure(cfg)

    def submit(self, seq: int, prompt, opts: dict) -> None:
        self.source.submit(seq, prompt, opts)

    def cancel(self) -> dict:
        return self.stage.cancel()

    def set_links(self, shaping: dict) -> None:
        self.stage.set_shaping(shaping)

    def profile_units(self, spec: dict) -> dict:
        return self.stage.profile_units(spec)

    def measure_link(self, spec: dict) -> dict:
        return self.prober.measure_link(spec)

    def measure_step(self, spec: dict) -> dict:
        return self.prober.measure_step(spec, self.data.host, self.data.port)

    def debug_logits(self, seq: int) -> bytes:
        return self.stage.debug_logits(seq)

    def stats(self) -> dict:
        st = self.stage
        return {"counters": dict(self.counters), "queue": st.work.qsize(), "seqs": sorted(self.source.seqs),
                "events_emitted": self.outbox.n_emitted, "run_id": st.cfg.get("run_id"),
                "epoch": st.epoch, "links": {k: {"shaped": v.shaped, "pending": v.pending()} for k, v in st.out.items()},
                "subscribers": len(self.outbox.subscribers), "frame_limits": self.limits.as_dict(),
                "context_tokens": st.context_tokens}


def _j(obj) -> str:
    return json.dumps(obj, separators=(",", ":"))


class DeviceService(rpyc.Service):
    """The control plane. Only these exposed_ methods are reachable; every argument and result is a str,
    bytes, int or float (JSON for structure)."""

    def __init__(self, node: Node):
        super().__init__()
        self._node = node

    def exposed_ping(self) -> str:
        return _j({"name": self._node.name, "pid": os.getpid(), "time_s": time.time()})

    def exposed_info(self) -> str:
        return _j(self._node.info())

    def exposed_load_stage(self, spec: str) -> str:
        return _j(self._node.load_stage(json.loads(spec)))

    def exposed_configure(self, cfg: str) -> str:
        return _j(self._node.configure(json.loads(cfg)))

    def exposed_submit(self, seq: int, prompt: str, opts: str = "{}") -> str:
        """prompt: the raw text; or, with opts {"token_ids": true}, a JSON list of ids (no tokenizer)."""
        o = json.loads(opts)
        self._node.submit(int(seq), json.loads(prompt) if o.get("token_ids") else str(prompt), o)
        return "ok"

    def exposed_cancel(self) -> str:
        return _j(self._node.cancel())

    def exposed_measure_step(self, spec: str) -> str:
        return _j(self._node.measure_step(json.loads(spec)))

    def exposed_debug_logits(self, seq: int) -> bytes:
        return self._node.debug_logits(int(seq))

    def exposed_profile_units(self, spec: str) -> str:
        return _j(self._node.profile_units(json.loads(spec)))

    def exposed_measure_link(self, spec: str) -> str:
        return _j(self._node.measure_link(json.loads(spec)))

    def exposed_set_links(self, links: str) -> str:
        self._node.set_links(json.loads(links))
        return "ok"

    def exposed_stats(self) -> str:
        return _j(self._node.stats())


def make_authenticator(secret: bytes, timeout: float = auth.DEFAULT_TIMEOUT_S):
    def authenticator(sock):
        try:
            auth.server_handshake(sock, secret, b"control", timeout)
        except (auth.AuthError, OSError) as e:
            log.warning("control: refused %s: %s", _peer(sock), e)
            raise AuthenticationError(str(e)) from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock, None
    return authenticator


def _peer(sock) -> str:
    try:
        h, p = sock.getpeername()[:2]
        return f"{h}:{p}"
    except OSError:
        return "?"


DEVICE_ROLE_ENV = "EDGESHARD_ROLE"  # read by model.py before it prepares weights


def serve(host: str, port: int, token_file: str | None = None, device: str = "cpu", name: str | None = None,
          data_port: int = 0, memory_gib: float | None = None, auth_timeout: float = auth.DEFAULT_TIMEOUT_S,
          ready=None) -> None:
    """Run a device server until the process is killed (blocking).

    token_file None: $EDGESHARD_HOME/token (~/.cache/edgeshard/token), created with a random secret (0600)
    if missing. Prints one ready line: `edgeshard serve: device NAME control H:P data H:D pid N ready`.
    """
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"--device {device!r}: use cpu or cuda")
    if device != "cpu":
        import torch

        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: CUDA is not available to this torch ({torch.__version__})")
    path = auth.ensure_token_file(None) if token_file is None else token_file
    secret = auth.load_secret(path)
    # torch (imported on the first load) takes its thread count from OMP_NUM_THREADS, set by the launcher
    node = Node(host, secret, device, name or "", data_port,
                int(memory_gib * 2**30) if memory_gib else None, auth_timeout)
    server = ThreadedServer(DeviceService(node), hostname=host, port=port,
                            authenticator=make_authenticator(secret, auth_timeout),
                            protocol_config=dict(PROTOCOL_CONFIG), logger=logging.getLogger("edgeshard.rpyc"))
    line = (f"edgeshard serve: device {node.name} control {server.host}:{server.port} "
            f"data {node.data.host}:{node.data.port} pid {os.getpid()} ready")
    (ready or (lambda s: print(s, flush=True)))(line)
    try:
        server.start()
    finally:
        node.data.close()


def build_parser(prog: str = "edgeshard serve") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description="Serve this device's shard (control: rpyc; data: binary frames).")
    ap.add_argument("--host", default="127.0.0.1", help="address to bind (control and data); default 127.0.0.1")
    ap.add_argument("--port", type=int, default=18861, help="control port (0: pick a free one); default 18861")
    ap.add_argument("--token-file", help="shared secret (default $EDGESHARD_HOME/token, created if missing)")
    ap.add_argument("--device", default="cpu", help="torch device for the shard: cpu or cuda")
    ap.add_argument("--data-port", type=int, default=0, help="data plane port (default 0: a free one)")
    ap.add_argument("--name", help="device name (the controller sets it per run)")
    ap.add_argument("--memory-gib", type=float, help="memory to report (default: what the machine has free)")
    ap.add_argument("--auth-timeout", type=float, default=auth.DEFAULT_TIMEOUT_S,
                    help="seconds a new connection has to authenticate")
    ap.add_argument("--log-level", default="WARNING")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # A device process never converts weights (model.py, ALLOW_PREPARE): its memory share is sized for its shard.
    os.environ[DEVICE_ROLE_ENV] = "device"
    logging.basicConfig(level=getattr(logging, args.log_level.upper(), logging.WARNING),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        serve(args.host, args.port, args.token_file, args.device, args.name, args.data_port, args.memory_gib,
              args.auth_timeout)
    except (auth.AuthError, ValueError, OSError) as e:
        print(f"edgeshard serve: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
