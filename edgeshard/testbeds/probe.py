"""Can this kernel emulate a testbed's network? emulated.available() (edgeshard/testbeds/emulated.py) runs this
as ``python -I probe.py [netem]`` and reads the verdict from its exit: 0 = works, else the last line of stderr is
the step that failed and why ("htb: ...", "netem: Specified qdisc kind is unknown").

A separate process because it first unshares its own network namespace: an anonymous one that vanishes with the
process, so the probe leaves nothing behind and never touches the caller's namespace. It builds in miniature what
emulated.up builds per device: a veth on a bridge, an htb root with one class, a tbf leaf, a u32 filter on a
destination address (and a netem leaf when asked). -I without -S: it needs pyroute2 from site-packages, not the
edgeshard package.
"""

import ctypes
import os
import sys

CLONE_NEWNET = 0x40000000  # unshare flag (linux/sched.h)


def main(what: list[str]) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) != 0:
        sys.exit("cannot create a network namespace: " + os.strerror(ctypes.get_errno()))
    from pyroute2 import IPRoute
    ipr = IPRoute()
    step = "veth"
    try:
        ipr.link("add", ifname="esp0", kind="veth", peer="esp1")
        step = "bridge"
        ipr.link("add", ifname="espbr", kind="bridge")
        br = ipr.link_lookup(ifname="espbr")[0]
        v0 = ipr.link_lookup(ifname="esp0")[0]
        ipr.link("set", index=v0, master=br, state="up")
        step = "htb"
        ipr.tc("add", "htb", index=v0, handle=0x10000, default=0)
        ipr.tc("add-class", "htb", index=v0, handle=0x10010, parent=0x10000, rate=125000, ceil=125000)
        step = "tbf"
        ipr.tc("add", "tbf", index=v0, handle=0x1000000, parent=0x10010, rate=125000, burst=1725, limit=262144)
        step = "u32"
        ipr.tc("add-filter", "u32", index=v0, parent=0x10000, prio=1, protocol=0x0800, target=0x10010,
               keys=["0x0a000001/0xffffffff+16"])
        if what == ["netem"]:
            step = "netem"
            ipr.tc("add", "netem", index=v0, handle=0x200000, parent=0x1000001, delay=1000)
    except Exception as e:  # noqa: BLE001 - any failure is the verdict
        sys.exit(step + ": " + str(e))


if __name__ == "__main__":
    main(sys.argv[1:])
