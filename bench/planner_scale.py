"""Planner speed at paper scale and beyond: Llama-2-70B (82 units) on
  (a) the 15-device paper-like testbed (3 device kinds)           target < 1 s per objective
  (b) 64 devices in 4 kinds                                        target < 5 s per objective
  (c) 12 all-different devices (every device its own class)        target < 10 s per objective
Prints the median of 3 solves per objective, the number of device classes and count-vector states, and the
ratio to the target. Exactness at these sizes rests on tests/test_planner_exact.py (DP == brute force).
Run: .venv/bin/python bench/planner_scale.py
"""

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edgeshard.config import testbed as tbm
from edgeshard.config.testbed import GIB, MBIT_S, Device, Link, Testbed  # noqa: E402
from edgeshard.planning import dp as planner  # noqa: E402
from edgeshard.planning.costs import CostModel  # noqa: E402
from edgeshard.planning.synthetic import synthetic_profile  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def testbed_64() -> Testbed:
    """1 Orin NX source + 15 Orin NX + 32 AGX Orin + 15 RTX 3090 + 1 H200 'cloud' = 64 devices, 4 kinds."""
    devs = [Device("nx-0", 14 * GIB, kind="jetson-orin-nx-16gb")]
    devs += [Device(f"nx-{i}", 14 * GIB, kind="jetson-orin-nx-16gb") for i in range(1, 16)]
    devs += [Device(f"agx-{i}", 29 * GIB, kind="jetson-agx-orin-32gb") for i in range(32)]
    devs += [Device(f"gpu-{i}", 22 * GIB, kind="rtx-3090-24gb") for i in range(15)]
    devs += [Device("cloud", 139 * GIB, kind="h200")]
    links = (Link("nx-0", "cloud", 10 * MBIT_S, 0.0021), Link("cloud", "nx-0", 10 * MBIT_S, 0.0021))
    return Testbed("scale-64", "nx-0", tuple(devs), 950 * MBIT_S, 0.0021, links, cloud="cloud")


def testbed_12_distinct() -> Testbed:
    """12 devices, each different: memory and link bandwidths vary per device, so no two are interchangeable."""
    kinds = ["jetson-orin-nx-16gb", "jetson-agx-orin-32gb", "rtx-3090-24gb"]
    devs = [Device(f"d{i}", (14 + 3 * i) * GIB, kind=kinds[i % 3]) for i in range(12)]
    links = []
    for i in range(12):
        for j in range(12):
            if i != j:
                links.append(Link(f"d{i}", f"d{j}", (100 + 37 * i + 11 * j) * MBIT_S, 0.001 + 0.0001 * (i + j)))
    return Testbed("distinct-12", "d0", tuple(devs), 950 * MBIT_S, 0.0021, tuple(links), cloud="d11")


def main() -> None:
    cases = [("paper-edge (15 devices, 3 kinds)", tbm.load(ROOT / "testbed_configs" / "paper-edge.toml"), 1.0),
             ("64 devices, 4 kinds", testbed_64(), 5.0),
             ("12 all-different devices", testbed_12_distinct(), 10.0)]
    print(f"{'testbed':<34} {'objective':<10} {'classes':>7} {'states':>8} {'median s':>9} {'target s':>8} {'ratio':>6}")
    ok = True
    for name, tb, target in cases:
        pr = synthetic_profile(tb, "llama2-70b", "float32")
        cm = CostModel(tb, pr)
        classes = planner.device_classes(cm)
        states = 1
        for g in classes[1:]:
            states *= min(len(g), pr.n_units - 1) + 1
        for objective in ("latency", "e2e", "throughput"):
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                plan = planner.solve(tb, pr, objective)
                times.append(time.perf_counter() - t0)
            med = statistics.median(times)
            ok &= med < target
            print(f"{name:<34} {objective:<10} {len(classes):>7} {states:>8} {med:>9.3f} {target:>8.1f} "
                  f"{med / target:>6.2f}   {len(plan.stages)} stages")
    print("all under target" if ok else "SOME OVER TARGET")


if __name__ == "__main__":
    main()
