"""How faithfully the emulated testbed enforces what it is configured with (needs root).

Brings up a throwaway 3-device testbed and prints, per ordered pair, the configured bandwidth against the TCP
goodput measured between the namespaces (median of --runs), and per device the configured CPU share against
what a fixed CPU-bound loop got (CPU time / wall time), plus the slowdown of a 45 ms compute step (the size of
a SmolLM2 token step on this CPU, docs/notes.md) after an idle gap. Goodput sits ~4.4 % under the configured rate:
htb counts whole frames, 1448 payload bytes per 1514-byte frame.

    sudo .venv/bin/python bench/emulate_accuracy.py [--runs 3] [--seconds 1.0]

Keep it short on a shared machine: the defaults take about 30 s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edgeshard.config.testbed import GIB, MBIT_S, Device, Link, Testbed  # noqa: E402
from edgeshard.testbeds import emulated as emulate  # noqa: E402

NET = ("a", "b", "c")  # unthrottled: their bandwidth is the shaper's alone, not their CPU's
SHARES = {"quarter": 0.25, "half": 0.5, "full": None}
LINKS = [("a", "b", 1), ("a", "c", 40), ("b", "a", 12), ("b", "c", 1000), ("c", "a", 200)]
DEFAULT_MBIT = 80  # c -> b
HEADER_FACTOR = 1448 / 1514  # TCP payload per Ethernet frame with timestamps: the best goodput can do

STEP = emulate.STEP_SCRIPT


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=1.0, help="bytes sent per bandwidth run, in seconds at rate")
    ap.add_argument("--steps", type=int, default=2_000_000, help="iterations of the CPU loop")
    args = ap.parse_args()
    ok, why = emulate.available()
    if not ok:
        print(f"cannot emulate here: {why}", file=sys.stderr)
        return 2
    devices = tuple(Device(n, GIB // 2, "auto", 0, None, None) for n in NET) + \
        tuple(Device(n, GIB // 2, "auto", 0, None, s) for n, s in SHARES.items())
    links = tuple(Link(s, d, m * MBIT_S, 0.001) for s, d, m in LINKS)
    tb = Testbed("bench-accuracy", "a", devices, DEFAULT_MBIT * MBIT_S, 0.0005, links)
    serve = [sys.executable, "-c", "import time; time.sleep(1e9)"]
    with tempfile.TemporaryDirectory() as tmp:
        sd = Path(tmp)
        t0 = time.monotonic()
        st = emulate.up(tb, lambda *_: serve, sd)
        print(f"up in {time.monotonic() - t0:.2f} s: prefix {st['prefix']}, subnet {st['subnet']}, "
              f"cgroups {st['cgroup_mode']}, latency by {st['links'][0]['latency_by']}, "
              f"CFS period {emulate.CFS_PERIOD_US / 1000:g} ms")
        try:
            print(f"\nbandwidth: median of {args.runs} runs, {args.seconds:g} s worth of bytes each")
            print(f"{'pair':8} {'configured':>11} {'goodput':>9} {'ratio':>7} {'vs headers':>11}  runs")
            for lk in st["links"]:
                if not (lk["src"] in NET and lk["dst"] in NET):
                    continue
                runs = [emulate.measure_goodput(tb.name, lk["src"], lk["dst"], sd, seconds=args.seconds)
                        for _ in range(args.runs)]
                med, conf = statistics.median(runs), lk["bandwidth_mbit_s"]
                print(f"{lk['src']}->{lk['dst']:5} {conf:8.1f} Mb {med:9.3f} {med / conf:7.1%} "
                      f"{med / conf / HEADER_FACTOR:11.1%}  {' '.join(f'{r:.3f}' for r in runs)}")

            print(f"\ncompute: a {args.steps}-step Python loop, median of {args.runs} runs")
            print(f"{'device':7} {'share':>6} {'wall s':>7} {'CPU/wall':>9} {'speed vs full (CPU time)':>25}")
            res = {d: [emulate.measure_compute(tb.name, d, sd, steps=args.steps) for _ in range(args.runs)]
                   for d in SHARES}
            cpu_full = statistics.median(r["cpu"] for r in res["full"])
            for d, share in SHARES.items():
                wall = statistics.median(r["wall"] for r in res[d])
                got = statistics.median(r["cpu"] / r["wall"] for r in res[d])
                print(f"{d:7} {share if share else 'none':>6} {wall:7.3f} {got:9.3f} {cpu_full / wall:25.3f}")
            w = {d: statistics.median(r["wall"] for r in res[d]) for d in SHARES}
            print(f"speed quarter/half = {w['half'] / w['quarter']:.3f} (configured 0.5)")

            print("\n45 ms compute steps after a 20 ms idle gap: slowdown (ideal 1/share)")
            for d, share in SHARES.items():
                p = emulate.run_as(tb.name, d, sd, [sys.executable, "-c", STEP, "0.045", "6", "0.02"],
                                   stdout=subprocess.PIPE, text=True)
                steps = json.loads(p.communicate(timeout=60)[0])
                print(f"{d:7} share {share if share else 'none':>5}: median {statistics.median(steps):.2f} "
                      f"(min {min(steps):.2f}, max {max(steps):.2f}; ideal {1 / (share or 1):.2f})")
        finally:
            emulate.down(tb.name, sd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
