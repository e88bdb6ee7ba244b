"""Data plane vs raw TCP vs rpyc on loopback, measured in one run (medians; the server runs in another process).

    .venv/bin/python bench/dataplane.py [--small-n 2000] [--repeats 5]

Small: round trip of a 2 KiB message (an activation of a ~512-wide fp32 hidden state is 2 KiB), echoed back.
Large: one-way throughput of 1 MiB and 16 MiB messages, each acknowledged by a tiny reply.
  raw TCP   length-prefixed frames, TCP_NODELAY, sendall / recv_into (the floor any framing can reach)
  data      edgeshard.device.wire: authenticated connection, 72-byte header, the reader the runtime uses
  rpyc      a bytes argument to an exposed method (what the data plane replaces)
Targets (issue 3): data plane throughput >= 0.8x raw TCP for large payloads; small round trip <= raw + 0.1 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edgeshard.device import wire  # noqa: E402

SECRET = b"bench-secret-bench-secret-bench-secret"
RAW = struct.Struct("<QB")  # length, kind (0 echo, 1 ack)


# ---------------------------------------------------------------- servers (run in a child process)
def _recv_exact(sock, view):
    got = 0
    while got < len(view):
        k = sock.recv_into(view[got:])
        if not k:
            raise EOFError
        got += k


def serve_raw(ready):
    ls = socket.create_server(("127.0.0.1", 0))
    ready(ls.getsockname()[1])
    while True:
        s, _ = ls.accept()
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=_raw_conn, args=(s,), daemon=True).start()


def _raw_conn(s):
    hdr = bytearray(RAW.size)
    try:
        while True:
            _recv_exact(s, memoryview(hdr))
            n, kind = RAW.unpack(hdr)
            buf = bytearray(n)
            _recv_exact(s, memoryview(buf))
            if kind == 0:
                s.sendall(RAW.pack(n, 0) + buf if n <= 4096 else RAW.pack(n, 0))
                if n > 4096:
                    s.sendall(buf)
            else:
                s.sendall(RAW.pack(0, 1))
    except (EOFError, OSError):
        s.close()


def serve_data(ready):
    def handler(conn, f):
        if f.kind == wire.PING:
            conn.send(wire.PONG, f.seq, payload=f.payload)
        else:
            conn.send(wire.BULK_ACK, f.seq)

    srv = wire.DataServer("127.0.0.1", 0, SECRET, handler)
    ready(srv.port)
    threading.Event().wait()


def serve_rpyc(ready):
    import rpyc
    from rpyc.utils.server import ThreadedServer

    class Echo(rpyc.Service):
        def exposed_echo(self, b):
            return b

        def exposed_sink(self, b):
            return len(b)

    srv = ThreadedServer(Echo(), hostname="127.0.0.1", port=0,
                         protocol_config={"allow_pickle": False, "allow_public_attrs": False})
    ready(srv.port)
    srv.start()


# ---------------------------------------------------------------- clients
def med_rtt(fn, n):
    for _ in range(min(200, n)):
        fn()
    xs = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        xs.append(time.perf_counter() - t)
    return statistics.median(xs)


def throughput(fn, size, total):
    count = max(2, total // size)
    fn()
    t = time.perf_counter()
    for _ in range(count):
        fn()
    return count * size / (time.perf_counter() - t)


def raw_client(port):
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    hdr = bytearray(RAW.size)
    bufs = {}

    def rt(payload):
        def f():
            s.sendall(RAW.pack(len(payload), 0) + payload)
            _recv_exact(s, memoryview(hdr))
            n, _ = RAW.unpack(hdr)
            b = bufs.setdefault(n, bytearray(n))
            _recv_exact(s, memoryview(b))
        return f

    def bulk(payload):
        mv = memoryview(payload)

        def f():
            s.sendall(RAW.pack(len(payload), 1))
            s.sendall(mv)
            _recv_exact(s, memoryview(hdr))
        return f
    return rt, bulk


def data_client(port):
    conn = wire.dial("127.0.0.1", port, SECRET, {"from": "bench"})

    def rt(payload):
        def f():
            conn.send(wire.PING, 0, payload=payload)
            conn.recv()
        return f

    def bulk(payload):
        mv = memoryview(payload)

        def f():
            conn.send(wire.BULK, 0, payload=mv)
            conn.recv()
        return f
    return rt, bulk


def rpyc_client(port):
    import rpyc

    c = rpyc.connect("127.0.0.1", port, config={"allow_pickle": False, "sync_request_timeout": 120})
    echo, sink = c.root.echo, c.root.sink

    def rt(payload):
        return lambda: echo(payload)

    def bulk(payload):
        return lambda: sink(payload)
    return rt, bulk


def start(kind):
    p = subprocess.Popen([sys.executable, __file__, "--serve", kind], stdout=subprocess.PIPE, text=True)
    port = int(p.stdout.readline())
    return p, port


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--serve")
    ap.add_argument("--small-n", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.serve:
        fn = {"raw": serve_raw, "data": serve_data, "rpyc": serve_rpyc}[args.serve]
        fn(lambda port: print(port, flush=True))
        return
    small = os.urandom(2048)
    sizes = {"1MiB": 1 << 20, "16MiB": 16 << 20}
    payloads = {k: os.urandom(v) for k, v in sizes.items()}
    servers = {k: start(k) for k in ("raw", "data", "rpyc")}
    clients = {"raw": raw_client(servers["raw"][1]), "data": data_client(servers["data"][1]),
               "rpyc": rpyc_client(servers["rpyc"][1])}
    res = {k: {"rtt_s": [], **{f"{s}_bytes_s": [] for s in sizes}} for k in clients}
    try:
        for _ in range(args.repeats):  # interleaved, so background load hits all transports alike
            for k, (rt, bulk) in clients.items():
                res[k]["rtt_s"].append(med_rtt(rt(small), args.small_n if k != "rpyc" else args.small_n // 4))
                for s, size in sizes.items():
                    total = 64 << 20 if k != "rpyc" else 16 << 20
                    res[k][f"{s}_bytes_s"].append(throughput(bulk(payloads[s]), size, total))
    finally:
        for p, _ in servers.values():
            p.kill()
    out = {k: {m: statistics.median(v) for m, v in d.items()} for k, d in res.items()}
    raw, data, rp = out["raw"], out["data"], out["rpyc"]
    ratios = {
        "small_rtt_data_minus_raw_ms": (data["rtt_s"] - raw["rtt_s"]) * 1e3,
        "small_rtt_rpyc_over_data": rp["rtt_s"] / data["rtt_s"],
        **{f"{s}_data_over_raw": data[f"{s}_bytes_s"] / raw[f"{s}_bytes_s"] for s in sizes},
        **{f"{s}_data_over_rpyc": data[f"{s}_bytes_s"] / rp[f"{s}_bytes_s"] for s in sizes},
    }
    if args.json:
        print(json.dumps({"medians": out, "ratios": ratios}, indent=1))
        return
    print(f"loopback, {args.repeats} interleaved repeats, medians (server in another process)")
    print(f"{'transport':<10}{'2KiB round trip':>18}{'1MiB':>14}{'16MiB':>14}")
    for k in ("raw", "data", "rpyc"):
        o = out[k]
        print(f"{k:<10}{o['rtt_s'] * 1e3:>15.3f} ms{o['1MiB_bytes_s'] / 1e9:>9.2f} GB/s{o['16MiB_bytes_s'] / 1e9:>9.2f} GB/s")
    print(f"data plane vs raw TCP: small round trip +{ratios['small_rtt_data_minus_raw_ms']:.3f} ms (target <= 0.1), "
          f"1 MiB {ratios['1MiB_data_over_raw']:.2f}x, 16 MiB {ratios['16MiB_data_over_raw']:.2f}x (target >= 0.8)")
    print(f"data plane vs rpyc: round trip {ratios['small_rtt_rpyc_over_data']:.1f}x faster, "
          f"1 MiB {ratios['1MiB_data_over_rpyc']:.1f}x, 16 MiB {ratios['16MiB_data_over_rpyc']:.1f}x the throughput")


if __name__ == "__main__":
    main()
