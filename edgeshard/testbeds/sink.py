"""The receiving end of emulated.measure_goodput (edgeshard/testbeds/emulated.py), run inside the destination
device's namespace as ``python -I -S sink.py <address> <timeout s>``.

A separate process because it must run as the device (its namespace, cgroups and CPU), which only a fresh process
started through edgeshard/testbeds/trampoline.py can. Prints its port, accepts one connection, then one JSON
line: {"bytes": payload after the first read, "seconds": first to last byte, "first": bytes of the first read}.
The first read is excluded from the rate: it started before the clock.
"""

import json
import socket
import sys
import time


def main(address: str, timeout_s: float) -> None:
    s = socket.socket()
    s.bind((address, 0))
    s.listen(1)
    print(s.getsockname()[1], flush=True)
    s.settimeout(timeout_s)
    c, _ = s.accept()
    c.settimeout(timeout_s)
    first = c.recv(1 << 16)
    t0 = time.perf_counter()
    t1, n = t0, 0
    while True:
        b = c.recv(1 << 16)
        if not b:
            break
        n += len(b)
        t1 = time.perf_counter()
    print(json.dumps({"bytes": n, "seconds": t1 - t0, "first": len(first)}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]))
