"""The sending end of emulated.measure_goodput (edgeshard/testbeds/emulated.py), run inside the source device's
namespace as ``python -I -S source.py <address> <port> <bytes> <timeout s>``: sends that many bytes to the sink
(edgeshard/testbeds/sink.py), half-closes and waits for the sink to close. A separate process for the same reason
as the sink: it must run as the device.
"""

import socket
import sys


def main(address: str, port: int, total: int, timeout_s: float) -> None:
    s = socket.create_connection((address, port), timeout=timeout_s)
    chunk = b"x" * (1 << 16)
    sent = 0
    while sent < total:
        sent += s.send(chunk[: min(len(chunk), total - sent)])
    s.shutdown(socket.SHUT_WR)
    s.recv(1)
    s.close()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]))
