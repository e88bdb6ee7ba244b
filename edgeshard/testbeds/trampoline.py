"""Enter an emulated device, then become the command: the first thing every process of a device runs.

Why a separate file: edgeshard/testbeds/emulated.py starts each device server (and `edgeshard testbed exec`,
`run_as`) as ``python -I -S trampoline.py <netns path> <cpus> <cgroup dir>... -- argv...``. It joins the cgroups,
pins itself to <cpus> ("0,1"; "-" leaves the affinity alone), enters the network namespace and execs argv in
place: same pid, so Popen.returncode is argv's own (-9 for an OOM kill) and `down` can prove the pid is ours by
its namespace. Threads and children inherit the affinity.

Python rather than `ip netns exec`/nsenter: no dependency on util-linux, and no remount of /sys (which `ip netns
exec` needs and some containers refuse). Stdlib only and run with -I -S (no site, no edgeshard import): every
process a device starts pays this start-up, at the device's cpu_share.
"""

import ctypes
import os
import sys

CLONE_NEWNET = 0x40000000  # setns flag (linux/sched.h)


def main(args: list[str]) -> None:
    sep = args.index("--")
    ns, cpus, cgroups, argv = args[0], args[1], args[2:sep], args[sep + 1:]
    try:
        for d in cgroups:
            with open(os.path.join(d, "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))
        if cpus != "-":
            os.sched_setaffinity(0, [int(c) for c in cpus.split(",")])
        fd = os.open(ns, os.O_RDONLY)
    except OSError as e:
        sys.exit(f"edgeshard: cannot join the device (is the testbed up?): {e}")
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        sys.exit(f"edgeshard: cannot enter network namespace {ns}: {os.strerror(ctypes.get_errno())}")
    os.close(fd)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        os.execvp(argv[0], argv)
    except OSError as e:
        sys.exit(f"edgeshard: cannot run {argv[0]!r}: {e.strerror}")


if __name__ == "__main__":
    main(sys.argv[1:])
