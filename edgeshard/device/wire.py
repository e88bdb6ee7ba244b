"""The data plane: binary frames over authenticated TCP (TCP_NODELAY), plus per-link shaping in the application.

Activations, token ids, link probes and device events travel here, never through rpyc and never pickled.

Frame = a fixed 72-byte little-endian header, then `nbytes` raw payload bytes:

    offset  field     type     meaning
    0       magic     4s       b"ESD1"
    4       kind      u8       ACT, TOKEN, END, PING, ... (below)
    5       dtype     u8       payload element type (DTYPES codes; BYTES for opaque/JSON payloads)
    6       ndim      u8       number of dimensions used in shape (0..4)
    7       flags     u8       run epoch: frames of an older run (other epoch) are dropped by receivers
    8       seq       i64      sequence id (which prompt)
    16      position  i64      position of the first token of this frame in its sequence
    24      aux       i64      kind-specific (ACT, TOKEN: the step, 0 = prefill; PING, BULK: probe id; ...)
    32      shape     4 x i64  tensor shape (unused entries 0)
    64      nbytes    u64      payload length

Receivers trust no header field: before allocating a payload they check the magic, kind, dtype, ndim <= 4,
that unused shape entries are 0 and none is negative, that a tensor's shape times its item size is nbytes
(every dtype but BYTES; BYTES with ndim 0 is an opaque/JSON payload), and that nbytes is within the
receiver's `FrameLimits` for that kind (small fixed caps for control kinds; for ACT what the configured
stage can send). A frame that fails is answered with one ERROR frame, JSON {"message", "kind", "nbytes",
"limit"}, and the connection is closed without reading or allocating its payload.

A tensor's bytes are its contiguous memory (little-endian, the dtype's native layout), so the receiver
rebuilds it with torch.frombuffer without a copy. This module does not import torch at module level:
tensor helpers import it lazily.

Shaping: a `Link` wraps an outgoing connection with a token bucket (rate = bandwidth, depth = burst bytes,
default 0: a pure-rate link) and a one-way delay. A frame of n bytes (header included) enqueued at t leaves
the bucket at max(t, previous departure) + n / bandwidth and is written to the socket `latency` later, so
back-to-back frames serialise on bandwidth but their propagation delays overlap (as on a real link). Frames
keep FIFO order. Unshaped links write directly from the caller's thread (no queue, no extra thread).
"""

from __future__ import annotations

import collections
import json
import socket
import struct
import threading
import time
from dataclasses import dataclass
from typing import Callable

from edgeshard.device import auth

MAGIC = b"ESD1"
HEADER = struct.Struct("<4sBBBBqqq4qQ")
HEADER_BYTES = HEADER.size  # 72
MAX_NDIM = 4
MAX_PAYLOAD = 1 << 34  # 16 GiB: no FrameLimits entry may exceed it

# frame kinds
HELLO = 1  # first frame on every data connection: JSON {"from": device name or "controller", "role": ...}
ACT = 2  # activations between stages (tensor (1, T, hidden)); aux = the step
TOKEN = 3  # sampled token id, last stage -> source (int64, 8 bytes)
END = 4  # a sequence finished: free its KV cache (travels down the stages)
PING = 5  # probe: latency (echoed as PONG)
PONG = 6
BULK = 7  # probe: bandwidth payload
BULK_ACK = 8  # probe: receiver's timing of a bulk burst (JSON)
EVENTS = 9  # device -> controller: JSON lines of events
ERROR = 10  # JSON {"message": ...}
KIND_NAMES = {HELLO: "hello", ACT: "act", TOKEN: "token", END: "end", PING: "ping", PONG: "pong", BULK: "bulk",
              BULK_ACK: "bulk_ack", EVENTS: "events", ERROR: "error"}

# dtype codes
BYTES, FLOAT32, FLOAT16, BFLOAT16, INT64, INT32, UINT8 = 0, 1, 2, 3, 4, 5, 6
DTYPE_NAMES = {BYTES: "bytes", FLOAT32: "float32", FLOAT16: "float16", BFLOAT16: "bfloat16", INT64: "int64",
               INT32: "int32", UINT8: "uint8"}
DTYPE_CODES = {v: k for k, v in DTYPE_NAMES.items()}
ITEM_BYTES = {BYTES: 1, FLOAT32: 4, FLOAT16: 2, BFLOAT16: 2, INT64: 8, INT32: 4, UINT8: 1}

# Frame size limits (payload bytes, header not counted). See FrameLimits.
CONTROL_MAX_BYTES = 1 << 16  # HELLO, TOKEN, END, PING, PONG, BULK_ACK, ERROR: small JSON or an 8-byte token id
ACT_UNCONFIGURED_BYTES = 1 << 16  # ACT before a stage is configured: a few decode steps, never a prefill
BULK_MAX_BYTES = 64 << 20  # BULK on a plain connection (bench/dataplane.py sends 16 MiB); devices narrow it
EVENTS_MAX_BYTES = 16 << 20  # one EVENTS frame; the device splits event batches to stay under it
REFUSE_LINGER_S = 1.0  # at most this long spent discarding a refused frame's payload (Connection._linger)
REFUSE_SEND_WAIT_S = 1.0  # how long a refusal waits for a send in progress before closing without an ERROR


class WireError(ConnectionError):
    """A malformed frame or a closed connection."""


class FrameRefused(WireError):
    """A peer announced a frame this receiver does not take (too large, unknown kind, inconsistent header).
    The receiver answered with an ERROR frame (when it could) and closed the connection."""

    def __init__(self, message: str, kind: int | None = None, nbytes: int | None = None, limit: int | None = None):
        super().__init__(message)
        self.kind, self.nbytes, self.limit = kind, nbytes, limit


class FrameLimits:
    """The largest payload, in bytes, a receiver accepts per frame kind; kinds not listed are refused.

    One object may be shared by many connections (a device's data server and the links it dials): set()
    takes effect for the next frame header each of them reads. Defaults: CONTROL_MAX_BYTES for control
    kinds, ACT_UNCONFIGURED_BYTES for ACT (a device raises it when a stage is configured), BULK_MAX_BYTES,
    EVENTS_MAX_BYTES.
    """

    def __init__(self, act: int = ACT_UNCONFIGURED_BYTES, bulk: int = BULK_MAX_BYTES, events: int = EVENTS_MAX_BYTES,
                 control: int = CONTROL_MAX_BYTES):
        self._max: dict[int, int] = {}
        for kind in KIND_NAMES:
            self.set(kind, control)
        self.set(ACT, act)
        self.set(BULK, bulk)
        self.set(EVENTS, events)

    def set(self, kind: int, nbytes: int) -> None:
        if kind not in KIND_NAMES:
            raise ValueError(f"unknown frame kind {kind}")
        nbytes = int(nbytes)
        if not 0 <= nbytes <= MAX_PAYLOAD:
            raise ValueError(f"a {KIND_NAMES[kind]} frame limit must be within 0..{MAX_PAYLOAD} bytes, got {nbytes}")
        self._max[kind] = nbytes

    def max_bytes(self, kind: int) -> int | None:
        """The limit for `kind`, None for a kind this receiver does not know."""
        return self._max.get(kind)

    def as_dict(self) -> dict[str, int]:
        return {KIND_NAMES[k]: v for k, v in sorted(self._max.items())}


@dataclass(slots=True)
class Frame:
    kind: int
    seq: int = 0
    position: int = 0
    aux: int = 0
    dtype: int = BYTES
    shape: tuple = ()
    payload: bytes | bytearray | memoryview = b""
    t_recv: float = 0.0  # time.time() when the last payload byte arrived
    t_first: float = 0.0  # time.time() when the header had arrived (first bytes available)
    flags: int = 0

    @property
    def nbytes(self) -> int:
        return HEADER_BYTES + len(self.payload)

    def json(self):
        return json.loads(bytes(self.payload).decode())


def pack_header(kind: int, seq: int, position: int, aux: int, dtype: int, shape: tuple, nbytes: int,
                flags: int = 0) -> bytes:
    if len(shape) > MAX_NDIM:
        raise ValueError(f"a frame carries at most {MAX_NDIM} dimensions, got shape {shape}")
    dims = tuple(shape) + (0,) * (MAX_NDIM - len(shape))
    return HEADER.pack(MAGIC, kind, dtype, len(shape), flags, seq, position, aux, *dims, nbytes)


def _nodelay(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass


class Connection:
    """One authenticated, framed TCP connection. send() is thread-safe; recv() must have a single reader."""

    def __init__(self, sock: socket.socket, peer: str = "?", limits: FrameLimits | None = None):
        _nodelay(sock)
        self.sock = sock
        self.peer = peer  # name of the other end, for messages
        self.limits = limits if limits is not None else FrameLimits()  # what recv() accepts (may be shared)
        self.hello: dict = {}
        self._send_lock = threading.Lock()
        self._rfile = sock.makefile("rb", buffering=1 << 16)
        self._hdr = bytearray(HEADER_BYTES)
        self.closed = False
        self.bytes_sent = 0
        self.bytes_received = 0

    # --- sending -----------------------------------------------------------------------------------
    def send(self, kind: int, seq: int = 0, position: int = 0, aux: int = 0, payload=b"", dtype: int = BYTES,
             shape: tuple = (), flags: int = 0) -> float:
        """Write one frame; returns time.time() when it was handed to the kernel."""
        mv = memoryview(payload).cast("B") if not isinstance(payload, bytes) else payload
        n = len(mv)
        header = pack_header(kind, seq, position, aux, dtype, shape, n, flags)
        with self._send_lock:
            if self.closed:
                raise WireError(f"connection to {self.peer} is closed")
            try:
                if n <= 4096:
                    self.sock.sendall(header + bytes(mv))
                else:
                    sent = self.sock.sendmsg([header, mv])
                    total = HEADER_BYTES + n
                    if sent < total:  # partial send (signals, huge buffers): finish the rest
                        if sent < HEADER_BYTES:
                            self.sock.sendall(header[sent:])
                            sent = HEADER_BYTES
                        self.sock.sendall(mv[sent - HEADER_BYTES:])
            except OSError as e:
                self.closed = True
                raise WireError(f"send to {self.peer} failed: {e}") from None
            self.bytes_sent += HEADER_BYTES + n
        return time.time()

    def send_json(self, kind: int, obj, seq: int = 0, position: int = 0, aux: int = 0) -> float:
        return self.send(kind, seq, position, aux, json.dumps(obj, separators=(",", ":")).encode())

    # --- receiving ---------------------------------------------------------------------------------
    def _read_into(self, view: memoryview) -> None:
        got, n = 0, len(view)
        while got < n:
            try:
                k = self._rfile.readinto(view[got:])
            except (OSError, ValueError) as e:  # ValueError: the file was closed under us
                raise WireError(f"connection to {self.peer} broke: {e}") from None
            if not k:
                raise WireError(f"connection to {self.peer} closed" + (f" ({got} of {n} bytes of a frame)" if got else ""))
            got += k

    def recv(self) -> Frame:
        """The next frame (blocking). WireError when the peer closed or sent garbage; FrameRefused (after an
        ERROR frame to the peer and closing) when the header fails the checks in the module docstring."""
        self._read_into(memoryview(self._hdr))
        t_first = time.time()
        magic, kind, dtype, ndim, flags, seq, position, aux, d0, d1, d2, d3, nbytes = HEADER.unpack(self._hdr)
        self._check_header(magic, kind, dtype, ndim, (d0, d1, d2, d3), nbytes, seq)  # before any allocation
        payload = bytearray(nbytes)  # zero-fills (touches every page): only ever for a checked nbytes
        if nbytes:
            self._read_into(memoryview(payload))
        self.bytes_received += HEADER_BYTES + nbytes
        return Frame(kind, seq, position, aux, dtype, (d0, d1, d2, d3)[:ndim], payload, time.time(), t_first, flags)

    def _check_header(self, magic: bytes, kind: int, dtype: int, ndim: int, dims: tuple, nbytes: int,
                      seq: int) -> None:
        name = KIND_NAMES.get(kind, f"kind {kind}")
        limit = self.limits.max_bytes(kind)
        if magic != MAGIC:
            self._refuse(f"malformed frame (magic {magic!r})", kind, nbytes, limit, seq)
        if limit is None:
            self._refuse(f"unknown frame kind {kind} ({nbytes} bytes)", kind, nbytes, limit, seq)
        if nbytes > limit:
            self._refuse(f"{name} frame of {nbytes} bytes refused: the limit for {name} frames here is {limit} bytes",
                         kind, nbytes, limit, seq)
        if dtype not in DTYPE_NAMES:
            self._refuse(f"{name} frame with unknown dtype code {dtype}", kind, nbytes, limit, seq)
        if ndim > MAX_NDIM:
            self._refuse(f"{name} frame with ndim {ndim} (at most {MAX_NDIM})", kind, nbytes, limit, seq)
        shape = dims[:ndim]
        if any(d < 0 for d in shape) or any(dims[ndim:]):
            self._refuse(f"{name} frame with shape entries {dims} for ndim {ndim}", kind, nbytes, limit, seq)
        if dtype != BYTES or ndim:
            count = 1
            for d in shape:
                count *= d
            if count * ITEM_BYTES[dtype] != nbytes:
                self._refuse(f"{name} frame of shape {shape} {DTYPE_NAMES[dtype]} announces {nbytes} bytes, "
                             f"not {count * ITEM_BYTES[dtype]}", kind, nbytes, limit, seq)

    def _refuse(self, message: str, kind: int, nbytes: int, limit: int | None, seq: int = 0):
        """Tell the peer why (one ERROR frame, if it can go out without waiting), close, raise FrameRefused.
        The announced payload is never read: closing with it unread resets the connection."""
        body = json.dumps({"message": message, "kind": KIND_NAMES.get(kind, kind), "nbytes": nbytes, "limit": limit},
                          separators=(",", ":")).encode()
        frame = pack_header(ERROR, seq, 0, 0, BYTES, (), len(body)) + body
        sent = False
        if self._send_lock.acquire(timeout=REFUSE_SEND_WAIT_S):  # another thread may be mid-frame
            try:
                if not self.closed:
                    self.sock.send(frame, getattr(socket, "MSG_DONTWAIT", 0))  # never block on a peer not reading
                    sent = True
            except OSError:
                pass
            finally:
                self._send_lock.release()
        if sent:
            self._linger(nbytes)
        self.close()
        raise FrameRefused(f"{self.peer}: {message}", kind, nbytes, limit)

    def _linger(self, nbytes: int) -> None:
        """A lingering close, as HTTP servers do: closing with the peer's payload unread makes the kernel reset the
        connection, and a reset can discard the ERROR frame before the peer reads it. So stop sending, then read and
        discard into one fixed buffer (nothing allocated per byte) until the peer stops, the announced payload is
        consumed, or REFUSE_LINGER_S passes."""
        try:
            self.sock.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + REFUSE_LINGER_S
            sink, left = bytearray(1 << 16), nbytes
            while left > 0 and (wait := deadline - time.monotonic()) > 0:
                self.sock.settimeout(wait)
                n = self.sock.recv_into(sink)
                if n == 0:
                    break
                left -= n
        except OSError:
            pass

    def start_reader(self, handler: Callable[["Connection", Frame], None],
                     on_close: Callable[["Connection", BaseException | None], None] | None = None,
                     name: str = "reader") -> threading.Thread:
        """A daemon thread that calls handler(conn, frame) for every frame, then on_close(conn, error)."""

        def loop():
            err = None
            try:
                while True:
                    handler(self, self.recv())
            except FrameRefused as e:  # we closed the connection, but say why
                err = e
            except WireError as e:
                err = None if self.closed else e
            except BaseException as e:  # a handler bug: report, close
                err = e
            finally:
                self.close()
                if on_close:
                    on_close(self, err)

        t = threading.Thread(target=loop, name=f"{name}:{self.peer}", daemon=True)
        t.start()
        return t

    def close(self) -> None:
        if self.closed and self.sock.fileno() < 0:
            return
        self.closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            self._rfile.close()
        except OSError:
            pass
        self.sock.close()


def dial(host: str, port: int, secret: bytes, hello: dict, timeout: float = auth.DEFAULT_TIMEOUT_S,
         peer: str | None = None, limits: FrameLimits | None = None) -> Connection:
    """Connect to a device's data port, authenticate, and introduce ourselves with a HELLO frame.
    limits: what this end accepts from the peer (default FrameLimits())."""
    peer = peer or f"{host}:{port}"
    sock = auth.connect(host, port, secret, b"data", timeout, where=f"data plane of {peer}")
    conn = Connection(sock, peer, limits)
    conn.send_json(HELLO, hello)
    return conn


class DataServer:
    """Listens on a data port; authenticates each connection, reads its HELLO, then serves it in a thread.

    handler(conn, frame) runs in the connection's reader thread; conn.hello holds the peer's HELLO.
    limits: what every connection accepts (one shared FrameLimits; default FrameLimits()). A connection that
    sends a frame outside them is answered with ERROR and closed; the others and new handshakes go on.
    """

    def __init__(self, host: str, port: int, secret: bytes, handler: Callable[[Connection, Frame], None],
                 on_close: Callable[[Connection, BaseException | None], None] | None = None,
                 auth_timeout: float = auth.DEFAULT_TIMEOUT_S, log: Callable[[str], None] | None = None,
                 on_open: Callable[[Connection], None] | None = None, limits: FrameLimits | None = None):
        self.secret, self.handler, self.on_close, self.on_open = secret, handler, on_close, on_open
        self.limits = limits if limits is not None else FrameLimits()
        self.auth_timeout = auth_timeout
        self.log = log or (lambda msg: None)
        self.listener = socket.create_server((host, port), reuse_port=False)
        self.host, self.port = self.listener.getsockname()[:2]
        self.connections: set[Connection] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._accept_loop, name=f"data-accept:{self.port}", daemon=True)
        self._thread.start()

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                sock, addr = self.listener.accept()
            except OSError:
                if self._closed:
                    return
                time.sleep(0.01)
                continue
            threading.Thread(target=self._serve, args=(sock, addr), name=f"data-auth:{addr}", daemon=True).start()

    def _serve(self, sock: socket.socket, addr) -> None:
        _nodelay(sock)
        try:
            auth.server_handshake(sock, self.secret, b"data", self.auth_timeout)
        except (auth.AuthError, OSError) as e:
            self.log(f"data plane: refused {addr[0]}:{addr[1]}: {e}")
            sock.close()
            return
        conn = Connection(sock, f"{addr[0]}:{addr[1]}", self.limits)
        try:
            sock.settimeout(self.auth_timeout)
            first = conn.recv()
            sock.settimeout(None)
            if first.kind != HELLO:
                raise WireError(f"first frame is {KIND_NAMES.get(first.kind, first.kind)}, not hello")
            conn.hello = first.json()
            conn.peer = str(conn.hello.get("from", conn.peer))
        except (WireError, OSError, ValueError) as e:
            self.log(f"data plane: dropped {addr[0]}:{addr[1]}: {e}")
            conn.close()
            return
        with self._lock:
            if self._closed:
                conn.close()
                return
            self.connections.add(conn)
        if self.on_open:
            self.on_open(conn)

        def closed(c, err):
            with self._lock:
                self.connections.discard(c)
            if isinstance(err, FrameRefused):
                self.log(f"data plane: dropped {c.peer}: {err}")
            if self.on_close:
                self.on_close(c, err)

        conn.start_reader(self.handler, closed, name="data")

    def close(self) -> None:
        self._closed = True
        try:
            self.listener.close()
        except OSError:
            pass
        with self._lock:
            conns = list(self.connections)
        for c in conns:
            c.close()


@dataclass
class _Pending:
    deliver_at: float
    args: tuple
    done: Callable[[float], None] | None = None


class Link:
    """An outgoing link to one destination, shaped in the application (see the module docstring).

    bandwidth_bytes_s None (or <= 0) and latency_s 0 = unshaped. Thread-safe. send() never blocks on shaping:
    shaped frames wait in a queue served by one thread per link.
    """

    def __init__(self, conn: Connection, bandwidth_bytes_s: float | None = None, latency_s: float = 0.0,
                 burst_bytes: int = 0):
        self.conn = conn
        self._cond = threading.Condition()
        self._queue: collections.deque[_Pending] = collections.deque()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._vt = 0.0  # virtual finish time of the last frame through the bucket
        self.configure(bandwidth_bytes_s, latency_s, burst_bytes)

    def configure(self, bandwidth_bytes_s: float | None = None, latency_s: float = 0.0, burst_bytes: int = 0) -> None:
        with self._cond:
            self.bandwidth_bytes_s = bandwidth_bytes_s if bandwidth_bytes_s and bandwidth_bytes_s > 0 else None
            self.latency_s = max(0.0, float(latency_s or 0.0))
            self.burst_bytes = max(0, int(burst_bytes or 0))
            self.shaped = self.bandwidth_bytes_s is not None or self.latency_s > 0
            if self.shaped and self._thread is None:
                self._thread = threading.Thread(target=self._run, name=f"link:{self.conn.peer}", daemon=True)
                self._thread.start()

    def send(self, kind: int, seq: int = 0, position: int = 0, aux: int = 0, payload=b"", dtype: int = BYTES,
             shape: tuple = (), flags: int = 0, done: Callable[[float], None] | None = None) -> float:
        """Queue (shaped) or write (unshaped) a frame; returns the enqueue time. done(t_wire) after the write."""
        now = time.time()
        if self._error is not None:
            raise WireError(f"link to {self.conn.peer} failed: {self._error}")
        if not self.shaped:
            t = self.conn.send(kind, seq, position, aux, payload, dtype, shape, flags)
            if done:
                done(t)
            return now
        n = HEADER_BYTES + memoryview(payload).nbytes
        with self._cond:
            if self.bandwidth_bytes_s:
                depth = self.burst_bytes / self.bandwidth_bytes_s
                vt = max(self._vt, now - depth) + n / self.bandwidth_bytes_s
                self._vt = vt
                depart = max(now, vt - depth)
            else:
                depart = now
            self._queue.append(_Pending(depart + self.latency_s, (kind, seq, position, aux, payload, dtype, shape, flags), done))
            self._cond.notify()
        return now

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue:
                    self._cond.wait()
                item = self._queue[0]
            delay = item.deliver_at - time.time()
            if delay > 0:
                time.sleep(delay)
            with self._cond:
                self._queue.popleft()
            if item.args is None:
                return
            try:
                t = self.conn.send(*item.args)
            except WireError as e:
                self._error = e
                continue
            if item.done:
                try:
                    item.done(t)
                except Exception:
                    pass

    def pending(self) -> int:
        with self._cond:
            return len(self._queue)

    def close(self) -> None:
        with self._cond:
            if self._thread is not None:
                self._queue.append(_Pending(0.0, None))
                self._cond.notify()


# --- tensors (torch imported lazily) -------------------------------------------------------------------
def tensor_payload(t) -> tuple[memoryview, int, tuple]:
    """(bytes view, dtype code, shape) of a tensor, without copying when it is contiguous on the CPU."""
    import torch

    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    name = str(t.dtype).removeprefix("torch.")
    if name not in DTYPE_CODES:
        raise TypeError(f"tensor dtype {t.dtype} cannot travel on the data plane")
    raw = t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
    return memoryview(raw.numpy()), DTYPE_CODES[name], tuple(t.shape)


def frame_tensor(frame: Frame):
    """The tensor a frame carries (shares the frame's payload buffer)."""
    import torch

    dt = getattr(torch, DTYPE_NAMES[frame.dtype]) if frame.dtype != BYTES else torch.uint8
    if not frame.payload:
        return torch.empty(frame.shape, dtype=dt)
    return torch.frombuffer(frame.payload, dtype=dt).reshape(frame.shape)


def send_tensor(out, kind: int, t, seq: int = 0, position: int = 0, aux: int = 0, **kw) -> float:
    """Send a tensor through a Connection or a Link."""
    payload, code, shape = tensor_payload(t)
    return out.send(kind, seq, position, aux, payload, code, shape, **kw)
