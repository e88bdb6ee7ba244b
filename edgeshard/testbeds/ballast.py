"""The idle ballast of a throttled emulated device (IDLE_BALLAST in edgeshard/testbeds/emulated.py).

Why it exists: a CFS quota is not a slower CPU. A device that was idle would run the first few ms of its next
step at full speed (a full quota, per-CPU slack, a tick of overrun); this spinner uses the quota up while the
device server idles, so every step starts in the steady state a profile measures (docs/emulation.md, "Why the
idle ballast").

Run as ``python -I -S ballast.py <cpu> <cpu cgroup dir>``. It joins the device's CPU cgroup only (v1: its few MB
are not charged to the device's memory; v2 has one group), pins itself to the device's CPU, drops to SCHED_IDLE
and spins. SCHED_IDLE: on that CPU any thread of the device server preempts it at once (a waking normal task
always preempts an idle-policy one) and takes what is left of the quota. Stdlib only, -I -S: it starts with
every testbed and must not import edgeshard or site-packages.
"""

import os
import sys
import time

SLICE_S = 0.0002


def main(cpu: str, cgroup_dir: str) -> None:
    try:
        with open(os.path.join(cgroup_dir, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
        os.sched_setaffinity(0, [int(cpu)])
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except OSError as e:
        sys.exit(f"edgeshard: idle ballast: {e}")
    # Spin in 0.2 ms slices with a sched_yield between them: every yield runs the scheduler's accounting, so the
    # group is throttled within 0.2 ms of its quota running out instead of at the next tick (4 ms at HZ=250),
    # and leaves no debt that would stretch its next off-time.
    t = time.perf_counter
    while True:
        end = t() + SLICE_S
        while t() < end:
            pass
        os.sched_yield()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
