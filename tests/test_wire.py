"""Data plane frames, shaping and the HMAC handshake, over real loopback sockets."""

import queue
import socket
import threading
import time

import pytest

from edgeshard.device import auth, wire

SECRET = b"0123456789abcdef0123456789abcdef"


@pytest.fixture
def echo_server():
    """A DataServer that echoes every frame back on the same connection."""
    got = queue.Queue()

    def handler(conn, frame):
        got.put(frame)
        conn.send(frame.kind, frame.seq, frame.position, frame.aux, frame.payload, frame.dtype, frame.shape)

    srv = wire.DataServer("127.0.0.1", 0, SECRET, handler, auth_timeout=2)
    yield srv, got
    srv.close()


def test_header_is_fixed_size():
    assert wire.HEADER_BYTES == 72
    h = wire.pack_header(wire.ACT, 7, 11, 3, wire.FLOAT32, (1, 3, 64), 768)
    assert len(h) == 72
    fields = wire.HEADER.unpack(h)
    assert fields[0] == b"ESD1" and fields[5:8] == (7, 11, 3) and fields[8:12] == (1, 3, 64, 0)


def test_frames_round_trip(echo_server):
    srv, got = echo_server
    conn = wire.dial("127.0.0.1", srv.port, SECRET, {"from": "tester", "role": "test"})
    for payload in [b"", b"x", bytes(range(256)) * 40, bytes(3 << 20)]:
        conn.send(wire.BULK, seq=5, position=9, aux=len(payload), payload=payload)
        f = conn.recv()
        assert (f.kind, f.seq, f.position, f.aux) == (wire.BULK, 5, 9, len(payload))
        assert bytes(f.payload) == payload
    first = got.get(timeout=5)
    assert first.kind == wire.BULK
    conn.close()


def test_tensors_round_trip(echo_server):
    torch = pytest.importorskip("torch")
    srv, _ = echo_server
    conn = wire.dial("127.0.0.1", srv.port, SECRET, {"from": "tester"})
    g = torch.Generator().manual_seed(0)
    for t in [torch.randn(1, 5, 64, generator=g), torch.randn(1, 1, 576, generator=g).to(torch.bfloat16),
              torch.randn(2, 3, generator=g).half(), torch.tensor([49151], dtype=torch.int64),
              torch.randn(1, 4, 8, generator=g)[:, ::2]]:  # non-contiguous
        wire.send_tensor(conn, wire.ACT, t, seq=1, position=2)
        back = wire.frame_tensor(conn.recv())
        assert back.dtype == t.dtype and back.shape == t.shape
        assert torch.equal(back, t)  # bit exact
    conn.close()


def test_wrong_token_is_refused_with_a_clear_message(echo_server):
    srv, got = echo_server
    with pytest.raises(auth.AuthError, match="refused our token"):
        wire.dial("127.0.0.1", srv.port, b"not-the-secret-at-all-000000", {"from": "intruder"})
    assert got.empty()


def test_garbage_gets_only_the_refusal(echo_server):
    srv, got = echo_server
    s = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
    s.sendall(wire.pack_header(wire.ACT, 0, 0, 0, wire.BYTES, (), 4) + b"evil")
    data = b""
    while True:
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    s.close()
    assert data == auth.REFUSAL  # nothing else: no nonce, no frames
    assert got.empty()


def test_silent_peer_is_refused_after_timeout(echo_server):
    srv, _ = echo_server
    s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
    s.sendall(auth.CLIENT_HELLO)
    data = s.recv(4096)
    assert data.startswith(auth.SERVER_HELLO)  # the challenge
    rest = b""
    while True:  # we never answer: after auth_timeout the server refuses and closes
        chunk = s.recv(4096)
        if not chunk:
            break
        rest += chunk
    s.close()
    assert rest == auth.REFUSAL


def test_client_detects_impostor_server():
    """A server with another secret cannot pass as ours (mutual authentication)."""
    other = wire.DataServer("127.0.0.1", 0, b"another-secret-another-secret!!", lambda c, f: None, auth_timeout=2)
    try:
        with pytest.raises(auth.AuthError):
            wire.dial("127.0.0.1", other.port, SECRET, {"from": "x"})
    finally:
        other.close()


def test_shaped_link_delays_and_rates(echo_server):
    srv, got = echo_server
    conn = wire.dial("127.0.0.1", srv.port, SECRET, {"from": "tester"})
    link = wire.Link(conn, bandwidth_bytes_s=10e6, latency_s=0.05)  # 80 Mbit/s, 50 ms
    t0 = time.time()
    link.send(wire.PING, seq=1)
    f = got.get(timeout=5)
    assert f.t_recv - t0 >= 0.05  # never early
    # 1 MB at 10 MB/s: at least 0.1 s of serialisation plus the delay; frames keep their order
    t0 = time.time()
    for i in range(4):
        link.send(wire.BULK, seq=i, payload=bytes(250_000))
    arrivals = [got.get(timeout=10) for _ in range(4)]
    assert [f.seq for f in arrivals] == [0, 1, 2, 3]
    assert arrivals[-1].t_recv - t0 >= 4 * 250_072 / 10e6 + 0.05 - 1e-3
    # propagation delays overlap: two small frames back to back arrive ~together, not 2 x 50 ms apart
    link.configure(None, 0.05)
    t0 = time.time()
    link.send(wire.PING, seq=10)
    link.send(wire.PING, seq=11)
    a, b = got.get(timeout=5), got.get(timeout=5)
    assert (a.seq, b.seq) == (10, 11) and a.t_recv - t0 >= 0.05 and b.t_recv - t0 >= 0.05
    link.close()
    conn.close()


def test_unshaped_link_writes_directly(echo_server):
    srv, got = echo_server
    conn = wire.dial("127.0.0.1", srv.port, SECRET, {"from": "tester"})
    link = wire.Link(conn)
    assert not link.shaped
    link.send(wire.PING, seq=3)
    assert got.get(timeout=5).seq == 3
    assert link._thread is None
    conn.close()


def test_token_file_is_private(tmp_path):
    p = auth.create_token_file(tmp_path / "tok")
    assert (p.stat().st_mode & 0o777) == 0o600
    assert len(auth.load_secret(p)) == 64
    with pytest.raises(FileExistsError):
        auth.create_token_file(p)
    (tmp_path / "short").write_text("abc")
    with pytest.raises(auth.AuthError, match="at least"):
        auth.load_secret(tmp_path / "short")
    with pytest.raises(auth.AuthError, match="cannot read"):
        auth.load_secret(tmp_path / "missing")


def test_reader_thread_reports_close(echo_server):
    srv, _ = echo_server
    conn = wire.dial("127.0.0.1", srv.port, SECRET, {"from": "tester"})
    frames, closed = queue.Queue(), threading.Event()
    conn.start_reader(lambda c, f: frames.put(f), lambda c, e: closed.set())
    conn.send(wire.PING, seq=42)
    assert frames.get(timeout=5).seq == 42
    srv.close()
    assert closed.wait(5)
