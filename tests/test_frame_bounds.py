"""Data-plane frame bounds (issue 8, "Data-plane bounds"): every frame is checked against the receiver's limits
before its payload is allocated; a frame outside them is answered with ERROR and its connection dropped.

The device tests run a real device server process (`python -m edgeshard.device.service`) with a stage of the
random-weight tiny-llama (hidden 64, fp32) and talk to its data port over loopback. The process runs under an
8 GiB address-space limit, so a device that did allocate what a header announces fails there instead of taking
8 GiB of a shared machine.
"""

import json
import os
import queue
import resource
import select
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgeshard.device import auth, outbox, prober, service, stage, wire
from edgeshard.device.client import DeviceClient, DeviceError

SECRET = b"0123456789abcdef0123456789abcdef"
ROOT = Path(__file__).resolve().parent.parent
HIDDEN = 64  # tiny-llama
MIB = 1 << 20


# ---------------------------------------------------------------------------------------------------- helpers
def _raw(port: int, secret: bytes = SECRET, hello: bool = True) -> socket.socket:
    """An authenticated data-plane socket (HELLO sent unless hello=False), for hand-made headers."""
    sock = auth.connect("127.0.0.1", port, secret, b"data", timeout=10)
    if hello:
        body = b'{"from":"tester","role":"test"}'
        sock.sendall(wire.pack_header(wire.HELLO, 0, 0, 0, wire.BYTES, (), len(body)) + body)
    sock.settimeout(10)
    return sock


def _read_all(sock: socket.socket) -> bytes:
    """Everything the peer sends until it closes (a reset after its last bytes counts as a close)."""
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    sock.close()
    return data


def _refusal(port: int, header: bytes, hello: bool = True) -> dict:
    """Send one header (no payload); the peer must answer with exactly one ERROR frame and close."""
    sock = _raw(port, hello=hello)
    sock.sendall(header)
    data = _read_all(sock)
    assert len(data) >= wire.HEADER_BYTES, f"no ERROR frame came back (got {data!r})"
    fields = wire.HEADER.unpack(data[:wire.HEADER_BYTES])
    assert fields[0] == wire.MAGIC and fields[1] == wire.ERROR, fields
    assert len(data) == wire.HEADER_BYTES + fields[-1], "anything but one ERROR frame before the close"
    return json.loads(data[wire.HEADER_BYTES:])


def _header(kind, dtype, shape, nbytes, ndim=None, flags=0, seq=0):
    dims = tuple(shape) + (0,) * (4 - len(shape))
    return wire.HEADER.pack(wire.MAGIC, kind, dtype, len(shape) if ndim is None else ndim, flags, seq, 0, 0,
                            *dims, nbytes)


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _ping(conn: wire.Connection, seq: int) -> None:
    """The connection is alive and in sync: a PING gets its PONG (the device replies on the same connection)."""
    conn.send(wire.PING, seq)
    f = conn.recv()
    assert (f.kind, f.seq) == (wire.PONG, seq), (f.kind, bytes(f.payload[:300]))


# ---------------------------------------------------------------------------------------------------- wire level
@pytest.fixture
def plain_server():
    got = queue.Queue()
    srv = wire.DataServer("127.0.0.1", 0, SECRET, lambda c, f: got.put(f), auth_timeout=5)
    yield srv, got
    srv.close()


def test_control_kinds_and_header_fields_are_checked(plain_server):
    srv, got = plain_server
    cases = [  # (header, what the message must say)
        (_header(wire.PING, wire.BYTES, (), 1 << 30), "limit"),
        (_header(wire.TOKEN, wire.INT64, (1 << 27,), 1 << 30), "limit"),
        (_header(wire.ERROR, wire.BYTES, (), wire.CONTROL_MAX_BYTES + 1), "limit"),
        (_header(wire.ACT, wire.FLOAT32, (1, 3, 64), 100), "announces 100 bytes"),  # shape says 768
        (_header(wire.ACT, wire.FLOAT32, (1, 1, 1, 1), 4, ndim=5), "ndim 5"),
        (_header(wire.ACT, wire.FLOAT32, (1, -2, 64), 512), "shape entries"),
        (_header(wire.ACT, wire.FLOAT32, (1, 2, 0, 7), 0, ndim=2), "shape entries"),  # stray unused entry
        (_header(99, wire.BYTES, (), 0), "unknown frame kind"),
        (_header(wire.PING, 77, (), 0), "unknown dtype"),
    ]
    for header, needle in cases:
        msg = _refusal(srv.port, header)
        assert needle in msg["message"], msg
    big = _refusal(srv.port, _header(wire.PING, wire.BYTES, (), 1 << 30))
    assert big == {"message": big["message"], "kind": "ping", "nbytes": 1 << 30, "limit": wire.CONTROL_MAX_BYTES}
    # the HELLO itself is bounded
    hello = _refusal(srv.port, _header(wire.HELLO, wire.BYTES, (), 8 << 30), hello=False)
    assert (hello["kind"], hello["nbytes"], hello["limit"]) == ("hello", 8 << 30, wire.CONTROL_MAX_BYTES)
    assert got.empty()
    # and the server still serves: frames within the limits pass
    conn = wire.dial("127.0.0.1", srv.port, SECRET, {"from": "tester"}, timeout=5)
    conn.send(wire.PING, 1, payload=bytes(wire.CONTROL_MAX_BYTES))
    assert got.get(timeout=5).seq == 1
    conn.close()


def test_reader_reports_the_refusal(plain_server):
    """A Connection's reader thread ends with FrameRefused (not a silent close) when it refuses a frame."""
    srv, _ = plain_server
    small = wire.FrameLimits(bulk=1000)
    sink = wire.DataServer("127.0.0.1", 0, SECRET, lambda c, f: None, limits=small, auth_timeout=5)
    try:
        conn = wire.dial("127.0.0.1", sink.port, SECRET, {"from": "tester"}, limits=wire.FrameLimits(bulk=1000))
        conn.send(wire.BULK, payload=bytes(1001))
        f = conn.recv()
        assert f.kind == wire.ERROR and f.json()["limit"] == 1000 and f.json()["kind"] == "bulk"
        with pytest.raises(wire.WireError):
            conn.recv()
        # the receiving end of a dialed connection checks too
        closed = queue.Queue()
        srv2 = wire.DataServer("127.0.0.1", 0, SECRET,
                               lambda c, fr: c.send(wire.BULK, payload=bytes(2000)), auth_timeout=5)
        c2 = wire.dial("127.0.0.1", srv2.port, SECRET, {"from": "tester"}, limits=wire.FrameLimits(bulk=1000))
        c2.start_reader(lambda c, fr: None, lambda c, err: closed.put(err))
        c2.send(wire.PING)
        err = closed.get(timeout=10)
        assert isinstance(err, wire.FrameRefused) and err.nbytes == 2000 and err.limit == 1000
        srv2.close()
    finally:
        sink.close()


def test_event_batches_go_out_in_bounded_frames():
    batch = [{"type": "token", "seq": i, "text": "x" * (i % 50)} for i in range(2000)]
    batch.insert(700, {"type": "huge", "text": "y" * 20_000})  # alone larger than a frame: left out
    frames = list(outbox.event_frames(batch, 10_000))
    assert len(frames) > 5
    assert all(len(p) <= 10_000 for _, p in frames)
    lines = [json.loads(x) for _, p in frames for x in p.split(b"\n")]
    assert [ev["seq"] for ev in lines] == list(range(2000))
    assert sum(n for n, _ in frames) == 2000
    assert outbox.EVENTS_FRAME_BYTES <= wire.EVENTS_MAX_BYTES  # what the controller's connection accepts


def test_unconfigured_device_takes_no_large_activations():
    node = service.Node("127.0.0.1", SECRET, name="fresh")
    try:
        assert node.limits.max_bytes(wire.ACT) == wire.ACT_UNCONFIGURED_BYTES
        assert node.limits.max_bytes(wire.BULK) == prober.PROBE_FRAME_BYTES
        msg = _refusal(node.data.port, _header(wire.ACT, wire.FLOAT32, (1, 1024, 64), 1024 * 64 * 4))
        assert (msg["kind"], msg["limit"]) == ("act", wire.ACT_UNCONFIGURED_BYTES)
        msg = _refusal(node.data.port, _header(wire.BULK, wire.BYTES, (), prober.PROBE_FRAME_BYTES + 1))
        assert msg["limit"] == prober.PROBE_FRAME_BYTES
    finally:
        node.data.close()


# ---------------------------------------------------------------------------------------------------- a device
def _limit_address_space():
    resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))


@pytest.fixture(scope="module")
def device(tmp_path_factory):
    """A device server process with stage [1, 3) of tiny-llama loaded; a sink DataServer as its next stage."""
    d = tmp_path_factory.mktemp("bounds")
    token = auth.create_token_file(d / "token")
    secret = auth.load_secret(token)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    log = open(d / "device.log", "w")
    p = subprocess.Popen([sys.executable, "-m", "edgeshard.device.service", "--host", "127.0.0.1", "--port", "0",
                          "--token-file", str(token), "--name", "dev", "--auth-timeout", "5"],
                         stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, text=True, cwd=ROOT, env=env,
                         preexec_fn=_limit_address_space)
    sink_frames = queue.Queue()
    sink = wire.DataServer("127.0.0.1", 0, secret, lambda c, f: sink_frames.put(f), auth_timeout=5,
                           limits=wire.FrameLimits(act=64 * MIB))
    try:
        ready, _, _ = select.select([p.stdout], [], [], 120)
        line = p.stdout.readline() if ready else ""
        assert "ready" in line, f"device did not start: {line!r}; log: {(d / 'device.log').read_text()[-2000:]}"
        words = line.split()
        control = int(words[words.index("control") + 1].rsplit(":", 1)[1])
        data = int(words[words.index("data") + 1].rsplit(":", 1)[1])
        deadline = time.time() + 60
        while True:  # the ready line comes just before the control port listens
            try:
                c = DeviceClient("dev", "127.0.0.1", control, secret)
                break
            except DeviceError:
                if time.time() > deadline or p.poll() is not None:
                    raise
                time.sleep(0.1)
        with c:
            c.load_stage("tiny-llama", 1, 3)

            def configure(context_tokens=None, next_port=sink.port, epoch=5):
                cfg = {"run_id": "bounds", "epoch": epoch, "name": "dev", "stage": 1, "n_stages": 3,
                       "is_source": False, "is_last": False, "model": "tiny-llama",
                       "next": {"name": "sink", "host": "127.0.0.1", "port": next_port},
                       "source": {"name": "src", "host": "127.0.0.1", "port": next_port}, "links": {},
                       "sampling": {}, "max_new_tokens": 4}
                if context_tokens is not None:
                    cfg["context_tokens"] = context_tokens
                return c.configure(cfg)

            yield {"client": c, "configure": configure, "data_port": data, "pid": p.pid, "secret": secret,
                   "sink": sink, "sink_frames": sink_frames}
    finally:
        sink.close()
        p.terminate()
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        log.close()


def _dial(dev, timeout=10.0) -> wire.Connection:
    conn = wire.dial("127.0.0.1", dev["data_port"], dev["secret"], {"from": "tester", "role": "test"},
                     timeout=timeout, limits=wire.FrameLimits(act=64 * MIB))
    conn.sock.settimeout(30)  # a device that never answers fails the test instead of hanging it
    return conn


def test_8_gib_activation_frame_is_refused_without_allocating(device):
    limit = device["configure"](context_tokens=64)["max_act_frame_bytes"]
    assert limit == HIDDEN * 64 * 4 + stage.ACT_HEADROOM_BYTES
    for tokens in (1 << 25, 1 << 20):  # 8 GiB, and 256 MiB (which a device that allocates first could afford)
        nbytes = tokens * HIDDEN * 4
        before = _rss_bytes(device["pid"])
        conn = _dial(device)
        conn.sock.sendall(wire.pack_header(wire.ACT, 1, 0, 0, wire.FLOAT32, (1, tokens, HIDDEN), nbytes, flags=5))
        f = conn.recv()
        assert f.kind == wire.ERROR, f"device answered kind {f.kind}, not ERROR"
        assert {k: f.json()[k] for k in ("kind", "nbytes", "limit")} == {"kind": "act", "nbytes": nbytes,
                                                                          "limit": limit}
        with pytest.raises(wire.WireError):  # and dropped the connection
            conn.recv()
        conn.close()
        grown = _rss_bytes(device["pid"]) - before
        assert grown < 4 * MIB, f"device RSS grew by {grown / MIB:.1f} MiB for a refused {nbytes} byte frame"
        # the data port still answers a new handshake at once, and serves it
        conn = _dial(device, timeout=1.0)
        _ping(conn, 3)
        conn.close()


def test_activation_frames_within_the_limit_pass(device):
    limit = device["configure"](context_tokens=64)["max_act_frame_bytes"]
    conn = _dial(device)
    # a real prefill: computed by the stage and passed on to the next one
    x = bytes(16 * HIDDEN * 4)
    conn.send(wire.ACT, seq=7, position=0, aux=0, payload=x, dtype=wire.FLOAT32, shape=(1, 16, HIDDEN), flags=5)
    out = device["sink_frames"].get(timeout=60)
    assert (out.kind, out.seq, out.shape) == (wire.ACT, 7, (1, 16, HIDDEN))
    # the largest frame the limit allows (of an earlier epoch: read whole, then dropped without computing)
    tokens = limit // (HIDDEN * 4)
    assert 0 <= limit - tokens * HIDDEN * 4 < HIDDEN * 4
    conn.send(wire.ACT, seq=8, payload=bytes(tokens * HIDDEN * 4), dtype=wire.FLOAT32, shape=(1, tokens, HIDDEN),
              flags=4)
    _ping(conn, 4)  # the connection is alive and the frame was consumed
    # one token more is over the limit
    conn.sock.sendall(wire.pack_header(wire.ACT, 9, 0, 0, wire.FLOAT32, (1, tokens + 1, HIDDEN),
                                       (tokens + 1) * HIDDEN * 4, flags=4))
    f = conn.recv()
    assert f.kind == wire.ERROR and f.json()["limit"] == limit
    conn.close()


def test_limit_follows_the_configured_context(device):
    small = device["configure"](context_tokens=64)["max_act_frame_bytes"]
    tokens = small // (HIDDEN * 4) + 100  # over the small limit, within the large one
    payload = bytes(tokens * HIDDEN * 4)

    def send_stale(conn):  # epoch 4: read whole, never computed
        conn.send(wire.ACT, seq=1, payload=payload, dtype=wire.FLOAT32, shape=(1, tokens, HIDDEN), flags=4)

    conn = _dial(device)
    send_stale(conn)
    f = conn.recv()
    assert f.kind == wire.ERROR and f.json()["limit"] == small
    conn.close()

    large = device["configure"](context_tokens=8192)
    assert large["context_tokens"] == 8192
    assert large["max_act_frame_bytes"] == HIDDEN * 8192 * 4 + stage.ACT_HEADROOM_BYTES > len(payload)
    assert device["client"].stats()["frame_limits"]["act"] == large["max_act_frame_bytes"]
    conn = _dial(device)
    send_stale(conn)
    _ping(conn, 5)
    conn.close()

    # without context_tokens the model's context (tiny-llama: 2048 positions) bounds the prefill
    default = device["configure"]()
    assert default["context_tokens"] == 2048
    assert default["max_act_frame_bytes"] == HIDDEN * 2048 * 4 + stage.ACT_HEADROOM_BYTES


def test_a_refused_activation_fails_the_run_at_the_sender(device):
    """The next stage refuses what this device sends (its limit is smaller): the sender reports an error event
    (the controller stops the run with it) instead of waiting forever."""
    small_sink = wire.DataServer("127.0.0.1", 0, device["secret"], lambda c, f: None, auth_timeout=5)
    events = None
    try:
        device["configure"](context_tokens=1024, next_port=small_sink.port)
        events = wire.dial("127.0.0.1", device["data_port"], device["secret"], {"from": "controller", "role": "events"})
        events.sock.settimeout(30)
        conn = _dial(device)
        tokens = wire.ACT_UNCONFIGURED_BYTES // (HIDDEN * 4) + 10  # its output is over the sink's default limit
        conn.send(wire.ACT, seq=11, payload=bytes(tokens * HIDDEN * 4), dtype=wire.FLOAT32,
                  shape=(1, tokens, HIDDEN), flags=5)
        deadline = time.time() + 60
        found = None
        while found is None and time.time() < deadline:
            f = events.recv()
            for line in bytes(f.payload).split(b"\n"):
                ev = json.loads(line)
                if ev.get("type") == "error":
                    found = ev
        assert found is not None and found["seq"] == 11, found
        assert "refused" in found["message"] and "limit" in found["message"], found
        conn.close()
    finally:
        if events is not None:
            events.close()
        small_sink.close()
        device["configure"](context_tokens=64)
