"""Units: the constants every module converts with, and the one way sizes are written for people. Stdlib only.

Mbit = 1e6 bit and GiB = 2**30 bytes (never mix mega and mebi). Code keeps seconds, bytes and bytes/s; human units
(memory_gib, bandwidth_mbit_s, latency_ms) appear only at the file boundary, converted once.
"""

from __future__ import annotations

GIB = 2**30
MIB = 2**20
MBIT_S = 1e6 / 8  # bytes per second in one Mbit/s


def size_text(b: float) -> str:
    """Bytes for people: "X.XX GiB" from 1 GiB up, else "X.X MiB" (so a small model never reads "0.00 GiB")."""
    return f"{b / GIB:.2f} GiB" if b >= GIB else f"{b / MIB:.1f} MiB"
