"""Emulate an edge testbed on one Linux machine, with the kernel enforcing the heterogeneity (needs root).

Every device of a Testbed becomes

* a network namespace ``<prefix><device>`` whose ``eth0`` is one end of a veth pair; the other end sits on a
  per-testbed bridge ``<prefix>br`` in the root namespace. The bridge carries the first address of a private
  /24 chosen per testbed, so the controller (root namespace) reaches every device directly;
* in the SENDER's namespace, an htb root qdisc with one class per destination device (rate = ceil = the
  configured bandwidth of that ordered pair) and a u32 filter on the destination address: a full matrix,
  A->B and A->C may differ, and under each class a tbf at the same rate that splits GSO super-packets (see
  _shape);
* latency: netem under each class where the kernel has it, else recorded as "app" (the data plane delays in
  the application; docs/emulation.md: this machine's kernel has no netem);
* a cgroup per device (v1 ``cpu`` + ``memory`` hierarchies, or v2 ``cpu.max``/``memory.max``): a CFS quota of
  ``cpu_share`` of one core and a hard memory limit of ``memory_bytes + RUNTIME_ALLOWANCE_BYTES`` (see there:
  memory_gib is what a plan may use for weights + KV cache, the allowance is the device server's own memory;
  an allocation beyond the limit is OOM-killed inside the group, not elsewhere on the machine);
* a throttled device (cpu_share < 1) pinned to one CPU together with an idle-policy spinner in its CPU cgroup
  (IDLE_BALLAST, edgeshard/testbeds/ballast.py): a CFS quota alone lets an idle device run its next few ms at
  full speed, the ballast keeps it in the steady state a profile measures (at the cost of keeping
  sum(cpu_share) of the machine busy while up);
* the device server ``serve_argv(device, address, port)`` started inside both through
  edgeshard/testbeds/trampoline.py, ``OMP_NUM_THREADS=1``.

All of that is decided first, without I/O or root, by ``plan_emulation(testbed, ...)``: an EmulationPlan (frozen
dataclasses: names, addresses, routes, htb classes, cgroups, CPUs) that tests/test_emulated_plan.py checks
directly. ``up`` then applies it one phase at a time (_up_network, _up_shaping, _up_cgroups, _up_ballast,
_up_servers, _up_wait).

When a device dies, ``device_failure(state, device)`` says why if the kernel knows (its cgroup's OOM kills).

State lives in ``state_dir/<testbed name>.json``, written as resources are created, so a controller that
crashes half way leaves enough for ``down`` to clean up. ``down`` also finds leftovers by prefix (namespaces,
root-namespace links, cgroups, processes inside those namespaces or cgroups) when the state file is gone.

Code that runs as a separate process lives in its own file next to this one, each saying why: probe.py (can this
kernel do it), trampoline.py (enter a device, exec), ballast.py, and the measuring helpers sink.py, source.py,
spin.py, steps.py.

Traffic only ever flows on the per-testbed bridge between addresses inside namespaces created here.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import ipaddress
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from edgeshard.config.errors import EdgeshardError
from edgeshard.config.testbed import MBIT_S, Testbed
from edgeshard.testbeds import local

NETNS_DIR = Path("/run/netns")  # where `ip netns` and pyroute2 bind-mount named namespaces
CGROUP_ROOT = Path("/sys/fs/cgroup")

# The separate processes, run as `python -I [-S] <file> args` (-I: neither the script's directory nor the user's
# site on sys.path; -S where site-packages are not needed, for a cheap start-up).
_HERE = Path(__file__).resolve().parent
PROBE_PY = _HERE / "probe.py"
TRAMPOLINE_PY = _HERE / "trampoline.py"
BALLAST_PY = _HERE / "ballast.py"
SINK_PY = _HERE / "sink.py"
SOURCE_PY = _HERE / "source.py"
SPIN_PY = _HERE / "spin.py"
STEPS_PY = _HERE / "steps.py"
# CFS bandwidth period. The period is the granularity of throttling: a device at share s runs s*P at full speed,
# then sleeps (1-s)*P. Measured at P = 100 ms, the quota gave (25 % -> 4.2x, 50 % -> 2.16x the time of a long
# loop), fine for long loops but not for the ~45 ms token steps of a small model (SmolLM2 on this CPU).
# Measured here (bench/emulate_accuracy.py's method; slowdown = wall / CPU time; ideal 4.00 and 2.00):
#   P = 100 ms: long run 4.18 / 1.89; one 45 ms step after a 20 ms idle gap 3.89 / 1.67, min 2.22 / 1.00
#               (a step that fits into the quota left runs at full speed)
#   P =  20 ms: long run 4.02 / 1.97; 45 ms step 3.55 / 1.78
#   P =  10 ms: long run 4.00 / 2.02; 45 ms step 3.81 / 1.80 (min-max spread 0.2 / 0.13)
#   P =   5 ms: long run 4.01 / 2.02; 45 ms step 3.89 / 1.89
# 10 ms: accurate long runs, steps within ~10 %, and shares down to 0.1 keep the kernel's 1 ms minimum quota;
# smaller shares get a longer period (quota = 1 ms), see _cfs(). Shorter periods do not help on this kernel: it
# runs at HZ = 250, so a CPU-bound thread's quota is checked every 4 ms tick (periods under ~5 ms overran and
# then paid back in long throttled stretches; a 0.65 device at a 1.5 ms period got 0.52 of a core in SmolLM2
# runs). What remains of the step effects above is removed by the idle ballast (IDLE_BALLAST).
CFS_PERIOD_US = 10_000
MIN_QUOTA_US = 1_000  # the kernel's lower bound for cpu.cfs_quota_us / cpu.max
MAX_PERIOD_US = 1_000_000  # and its upper bound for the period
# A quota is a ceiling, not a guarantee: on a busy machine a quarter-core device competes with every other
# runnable task at equal weight and can get less than its quarter. Throttled devices get 4x the default weight
# (cpu.shares 4096 / cpu.weight 400) so they reach their quota first; the quota itself bounds what they take.
THROTTLED_WEIGHT_FACTOR = 4

# Memory. A testbed's memory_gib is the memory a PLAN may use (weights + KV cache, what the planner checks: the
# paper's "usable memory"). The device server itself (Python, torch, transformers, rpyc, the tokenizer on the
# source, the transient copy of one tensor while a stage loads) needs memory of its own, so the cgroup's hard
# limit is memory_bytes + RUNTIME_ALLOWANCE_BYTES: a correct plan runs, a plan that ignores memory is OOM-killed.
# Measured (cgroup v1 memory.usage_in_bytes / max_usage_in_bytes of emulated SmolLM2 device servers, fp32; the
# cgroup charges anonymous memory and the page cache it faults in, not shared-library pages already cached):
#   server after importing torch + transformers, one 14 MB layer loaded: 284 MB (~270 MB before any weights);
#   31 units (538 MB of weights) loaded: 812 MB, 274 MB beyond the weights;
#   peaks beyond the largest stage's weights over profile + sequential + pipeline runs (bench/
#   emulated_predictions.py, 4 scenarios x 3-4 devices): 264-330 MiB for middle stages, up to 389 MiB for the
#   source (tokenizer, and the transient second copy of the 113 MB embedding while it loads; the last stage pays
#   the same for the head).
# Process RSS is higher (+93 MB of file-backed torch/python pages, shared and charged elsewhere): 377 MB with one
# layer here; another session measured ~450 MB RSS before weights and 515-700 MB with a third of SmolLM2.
# 512 MiB covers the 389 MiB peak with ~120 MiB to spare and still kills plans that ignore memory: SmolLM2's
# layers and head (~540 MB) on a device with memory_gib 0.1 are OOM-killed while loading
# (tests/test_emulated_accuracy.py).
RUNTIME_ALLOWANCE_BYTES = 512 << 20

# Idle ballast (compute fidelity). A CFS quota is not a slower CPU: a group that was idle starts its next step
# with a full quota plus the up-to-1 ms of runtime each CPU keeps locally, and with HZ = 250 (this kernel) a tick
# passes before an exhausted quota is noticed. So after an idle gap a throttled device runs a few ms of CPU at full
# speed: measured on SmolLM2 stages (emu-paper testbeds, sequential mode, period 5 ms), a 4 ms-CPU stage at
# cpu_share 0.2 took 12.6 ms instead of 21, a 10 ms one at 0.35 22 ms instead of 29-40, while a profile (back-to-back
# passes) sees 1/share. Per-token latency then came out 10-35 % under the prediction, depending on the stages.
# The fix: every throttled device (cpu_share < 1) and an idle-policy spinner ("ballast") in its CPU cgroup are
# pinned to one CPU. While the server is idle the ballast uses up the quota, so a step always starts in the steady
# state a profile measures; when any server thread wakes it preempts the ballast (SCHED_IDLE) and gets the quota
# that is left. Cost: an emulated testbed keeps sum(cpu_share) of the machine busy while it is up (the devices'
# quotas), so keep that sum below the core count with room for the controller. Devices are packed onto the
# CPUs the controller may use (largest share first, onto the least loaded CPU).
IDLE_BALLAST = True

DEFAULT_PORT = 7700  # a device's port when the testbed says 0: every namespace has its own port space
AUTO_HOSTS = {"auto", "", "localhost", "0.0.0.0"}  # plus loopback addresses: a namespace's lo is its own
SUBNET_POOL = ipaddress.ip_network("10.128.0.0/9")  # /24s are drawn from here, skipping any the host routes
MAX_DEVICES = 250  # .1 is the bridge, devices from .2

STOP_GRACE_S = 3.0  # SIGTERM -> SIGKILL
POLL_S = 0.02


class EmulationError(EdgeshardError):
    """The emulated testbed cannot be created or used; the message says why and what to do."""


# --------------------------------------------------------------------------------------------- availability

def _is_root() -> bool:
    return os.geteuid() == 0


def _probe(what: str = "") -> str:
    """Run edgeshard/testbeds/probe.py (in a throwaway, anonymous network namespace: nothing to clean up).
    '' = works, else why not."""
    try:
        r = subprocess.run([sys.executable, "-I", str(PROBE_PY), *([what] if what else [])], capture_output=True,
                           text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"probe failed: {e}"
    if r.returncode == 0:
        return ""
    lines = (r.stderr or r.stdout).strip().splitlines()
    return lines[-1] if lines else f"probe exited with {r.returncode}"
_probe_cache: dict[str, str] = {}


def _probe_cached(what: str = "") -> str:
    if what not in _probe_cache:
        _probe_cache[what] = _probe(what)
    return _probe_cache[what]


def _cgroup_mode() -> str | None:
    """'v1' (separate cpu and memory hierarchies, as here), 'v2' (unified), or None."""
    if (CGROUP_ROOT / "cpu" / "cpu.cfs_quota_us").exists() and \
            (CGROUP_ROOT / "memory" / "memory.limit_in_bytes").exists():
        return "v1"
    controllers = CGROUP_ROOT / "cgroup.controllers"
    if controllers.exists() and {"cpu", "memory"} <= set(controllers.read_text().split()):
        return "v2"
    return None


def available() -> tuple[bool, str]:
    """(True, "") when this machine can emulate a testbed, else (False, a reason to show the user)."""
    local = "; use --local to run the devices as plain local processes (no emulated network or limits)"
    if sys.platform != "linux":
        return False, f"an emulated testbed needs Linux (network namespaces, tc, cgroups){local}"
    if not _is_root():
        return False, ("an emulated testbed needs root (it creates network namespaces, tc qdiscs and cgroups): "
                       f"run as root{local}")
    try:
        import pyroute2  # noqa: F401
    except ImportError:
        return False, f"pyroute2 is not installed: pip install 'edgeshard[emulate]'{local}"
    if _cgroup_mode() is None:
        return False, ("no cgroup cpu and memory controllers (neither v1 /sys/fs/cgroup/{cpu,memory} nor v2 "
                       f"/sys/fs/cgroup/cgroup.controllers with cpu and memory){local}")
    err = _probe_cached()
    if err:
        return False, f"this kernel cannot emulate the network (netns/veth/bridge/htb/tbf/u32): {err}{local}"
    return True, ""


def netem_available() -> bool:
    """Whether the kernel has the netem qdisc (probed in a throwaway namespace; absent on this machine)."""
    return _is_root() and _probe_cached("netem") == ""




# --------------------------------------------------------------------------------------------- names, state

def default_prefix(name: str) -> str:
    """'es' + 4 hex digits of the testbed name + '-': short, since interface names stop at 15 characters."""
    return "es" + hashlib.sha1(name.encode()).hexdigest()[:4] + "-"


_PREFIX_RE = re.compile(r"^[a-z][a-z0-9]{0,7}-$")


def _check_prefix(prefix: str) -> None:
    if not _PREFIX_RE.match(prefix):
        raise EmulationError(f"prefix {prefix!r} must be 1-8 lower-case letters/digits (first a letter) and a "
                             "'-', e.g. 'es1a2b-': it starts interface names, limited to 15 characters")


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def _listdir(path: Path) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def _state_path(name: str, state_dir: Path) -> Path:
    return Path(state_dir) / f"{name}.json"


def _write_state(path: Path, state: dict) -> None:
    local.write_state(path, state)


def _read_state(name: str, state_dir: Path) -> dict | None:
    try:
        state = json.loads(_state_path(name, state_dir).read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) and state.get("mode") == "emulated" else None


# --------------------------------------------------------------------------------------------- processes

_children: dict[int, subprocess.Popen] = {}  # servers this process started, reaped in down/status
exit_codes: dict[int, int] = {}  # returncode of each reaped child (negative: killed by that signal)


def _alive(pid: int) -> bool:
    """Running (a zombie counts as dead)."""
    for p in list(_children):
        if _children[p].poll() is not None:
            exit_codes[p] = _children.pop(p).returncode
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _inode(path: str | Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _pids_in_netns(ns_paths: list[Path]) -> set[int]:
    """Processes whose network namespace is one of these (what `ip netns pids` does)."""
    wanted = {i for i in (_inode(p) for p in ns_paths) if i}
    if not wanted:
        return set()
    out = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit() and _inode(f"/proc/{entry}/ns/net") in wanted:
            out.add(int(entry))
    return out


def _pids_in_cgroups(dirs: list[Path]) -> set[int]:
    out = set()
    for d in dirs:
        with contextlib.suppress(OSError):
            out |= {int(x) for x in (d / "cgroup.procs").read_text().split()}
    return out


def _kill(pids: set[int], grace_s: float = STOP_GRACE_S) -> list[int]:
    """SIGTERM, wait (bounded), SIGKILL the rest; returns the pids that were alive."""
    pids = {p for p in pids if p != os.getpid() and p > 1 and _alive(p)}
    for p in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(POLL_S)
    for p in pids:
        if _alive(p):
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(POLL_S)
    return sorted(pids)


# --------------------------------------------------------------------------------------------- cgroups

def _cgroup_dirs(mode: str, group: str) -> list[Path]:
    if mode == "v1":
        return [CGROUP_ROOT / "cpu" / group, CGROUP_ROOT / "memory" / group]
    return [CGROUP_ROOT / group]


def _cgroup_label(mode: str, group: str) -> str:
    return f"cpu,memory:/{group}" if mode == "v1" else f"/{group}"


def _cfs(cpu_share: float | None) -> tuple[int, int] | None:
    """(quota, period) in microseconds, or None for unthrottled: None or >= 1 core. A quota equal to its
    period still slowed a loop ~10% through throttling (measured), so full-core devices get no quota at all."""
    if cpu_share is None or cpu_share >= 1:
        return None
    if cpu_share <= 0:
        raise EmulationError(f"cpu_share = {cpu_share} must be greater than zero")
    period = CFS_PERIOD_US
    if cpu_share * period < MIN_QUOTA_US:
        period = min(MAX_PERIOD_US, math.ceil(MIN_QUOTA_US / cpu_share))
    return max(MIN_QUOTA_US, round(cpu_share * period)), period


def memory_limit_bytes(memory_bytes: int, allowance_bytes: int = RUNTIME_ALLOWANCE_BYTES) -> int:
    """The cgroup's hard limit for a device whose plan may use memory_bytes (see RUNTIME_ALLOWANCE_BYTES)."""
    return int(memory_bytes) + int(allowance_bytes)


def assign_cpus(shares: dict[str, float | None], cpus: list[int] | None = None) -> dict[str, int | None]:
    """One CPU per throttled device (0 < share < 1): largest share first, onto the CPU with the least share
    assigned so far (ties: the lower CPU). Unthrottled devices get None (they may run anywhere)."""
    cpus = sorted(cpus if cpus is not None else os.sched_getaffinity(0))
    load = {c: 0.0 for c in cpus}
    out: dict[str, int | None] = {n: None for n in shares}
    for n in sorted((n for n, v in shares.items() if _cfs(v) is not None), key=lambda n: (-shares[n], n)):
        c = min(cpus, key=lambda c: (load[c], c))
        out[n] = c
        load[c] += shares[n]
    return out


def _make_cgroup(mode: str, cg: CgroupPlan) -> None:
    """Create the cgroup's dirs and write its CPU quota/period, weight and hard memory limit."""
    dirs = [Path(d) for d in cg.dirs]
    quota, period, memory_bytes = cg.quota_us, cg.period_us, cg.memory_limit_bytes
    if mode == "v1":
        cpu, mem = dirs
        cpu.mkdir()
        (cpu / "cpu.cfs_period_us").write_text(str(period))
        (cpu / "cpu.cfs_quota_us").write_text(str(quota if quota is not None else -1))
        if quota is not None:
            (cpu / "cpu.shares").write_text(str(1024 * cg.weight_factor))
        mem.mkdir()
        (mem / "memory.limit_in_bytes").write_text(str(memory_bytes))
        # With swap accounting, memory+swap gets the same bound, so swap cannot stretch the limit.
        if (mem / "memory.memsw.limit_in_bytes").exists():
            (mem / "memory.memsw.limit_in_bytes").write_text(str(memory_bytes))
    else:
        ctl = CGROUP_ROOT / "cgroup.subtree_control"
        enabled = set(ctl.read_text().split())
        missing = [c for c in ("cpu", "memory") if c not in enabled]
        if missing:  # the children of the root only get these files once the root delegates the controllers
            ctl.write_text(" ".join("+" + c for c in missing))
        (d,) = dirs
        d.mkdir()
        (d / "cpu.max").write_text(f"{quota if quota is not None else 'max'} {period}")
        if quota is not None:
            (d / "cpu.weight").write_text(str(100 * cg.weight_factor))
        (d / "memory.max").write_text(str(memory_bytes))
        if (d / "memory.swap.max").exists():
            (d / "memory.swap.max").write_text("0")


def _prefix_cgroups(prefix: str) -> list[Path]:
    roots = [CGROUP_ROOT / "cpu", CGROUP_ROOT / "memory", CGROUP_ROOT]
    out = []
    for r in roots:
        with contextlib.suppress(OSError):
            out += [r / n for n in os.listdir(r) if n.startswith(prefix) and (r / n).is_dir()]
    return out


def _rmdir_cgroup(d: Path) -> bool:
    for _ in range(100):  # a just-killed task leaves its group a moment later: bounded retry (~2 s)
        try:
            d.rmdir()
            return True
        except FileNotFoundError:
            return False
        except OSError as e:
            if e.errno != errno.EBUSY:
                raise
            time.sleep(POLL_S)
    raise EmulationError(f"cannot remove cgroup {d}: still busy (processes: {_pids_in_cgroups([d])})")


# --------------------------------------------------------------------------------------------- network

def _iproute(netns: str | None = None):
    from pyroute2 import IPRoute
    if netns is None:
        return IPRoute()
    # flags=0: never create the namespace as a side effect (pyroute2's default is O_CREAT)
    return IPRoute(netns=netns, flags=0)


def _is_auto(host: str) -> bool:
    if host.lower() in AUTO_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _addresses(testbed: Testbed, subnet: ipaddress.IPv4Network) -> dict[str, str]:
    hosts = list(subnet.hosts())  # .1 .. .254
    out, taken = {}, {str(hosts[0])}
    for i, d in enumerate(testbed.devices):
        if _is_auto(d.host):
            addr = str(hosts[i + 1])
        else:
            try:
                ip = ipaddress.ip_address(d.host)
            except ValueError:
                raise EmulationError(f"device {d.name!r}: host {d.host!r} is not an IPv4 address; an emulated "
                                     "testbed needs addresses (or host = \"auto\")") from None
            if ip.version != 4:
                raise EmulationError(f"device {d.name!r}: host {d.host!r}: the emulator supports IPv4 only")
            addr = str(ip)
        if addr in taken:
            raise EmulationError(f"device {d.name!r}: address {addr} is used twice; give every device its own "
                                 "host or use host = \"auto\"")
        taken.add(addr)
        out[d.name] = addr
    return out


def _ip_key(addr: str) -> str:
    """u32 key matching an IPv4 destination address exactly (offset 16 of the IP header)."""
    return f"0x{int(ipaddress.ip_address(addr)):08x}/0xffffffff+16"


TBF_LIMIT_S = 0.1  # queue a leaf tbf holds (seconds at its rate, at least 256 KiB); local TCP keeps it short (TSQ)
MTU_BYTES = 1600  # htb's own default for its burst formula (rate/HZ + mtu); a full 1514-byte frame fits


def _burst_bytes(rate: float) -> int:
    """1 ms of the rate plus one frame: the formula htb uses by default (HZ = 1000)."""
    return int(rate / 1000 + MTU_BYTES)


def _shape(ns: str, classes: Sequence[ShapedClass]) -> None:
    """htb on the namespace's eth0: one class per destination with rate = ceil and a u32 filter on the
    destination address (plan_emulation computes the numbers). Unclassified traffic (ARP, the controller at the
    bridge address) goes through htb's direct queue unshaped (default class 0).

    Each class gets a tbf leaf at the same rate, for one thing htb lacks: tbf splits a GSO super-packet longer
    than its burst into frames, htb does not. Without it TCP hands htb 64 KB skbs; htb lets one through
    whenever its tokens are positive and pays the debt afterwards, so at 1 Mbit/s the receiver saw 52 KB arrive
    at once and then nothing for 0.4 s (measured; bursts of seconds at lower rates). Turning GSO off on the veth
    instead (gso_max_segs 1) made the traffic smooth but cost the CPU: 1000 Mbit/s pairs reached only 370-435
    Mbit/s on this 2-core machine, against 940 with GSO. With the tbf leaf, bursts stay under ~1 ms of the rate
    and GSO survives where the rate is high (burst >= 64 KB from ~500 Mbit/s)."""
    with _iproute(ns) as ipr:
        idx = ipr.link_lookup(ifname="eth0")[0]
        ipr.tc("add", "htb", index=idx, handle=HTB_ROOT, default=0)
        for c in classes:
            ipr.tc("add-class", "htb", index=idx, handle=c.classid, parent=HTB_ROOT, rate=c.rate_bytes_s,
                   ceil=c.rate_bytes_s, quantum=c.quantum, burst=c.burst_bytes, cburst=c.burst_bytes)
            if c.tbf_handle is not None:
                ipr.tc("add", "tbf", index=idx, handle=c.tbf_handle, parent=c.classid, rate=c.rate_bytes_s,
                       burst=c.burst_bytes, limit=c.tbf_limit_bytes)
            if c.netem_handle is not None:
                ipr.tc("add", "netem", index=idx, handle=c.netem_handle, parent=c.leaf, delay=c.delay_us)
            ipr.tc("add-filter", "u32", index=idx, parent=HTB_ROOT, prio=1, protocol=0x0800, target=c.classid,
                   keys=[c.u32_key])


# --------------------------------------------------------------------------------------------- the plan
#
# plan_emulation(testbed, ...) -> EmulationPlan: everything `up` will create, decided without I/O or root. What
# depends on the machine (cgroup mode, netem, the CPUs this process may use, the networks the root namespace
# already routes) comes in as arguments; up() reads those, then applies the plan phase by phase.

HTB_ROOT = 0x10000  # htb root qdisc 1:


@dataclass(frozen=True)
class ShapedClass:
    """One destination on the sender's eth0: htb class 1:<0x10 + j> (rate = ceil), under it a tbf leaf
    (<0x100 + j>:, same rate) unless the rate needs 64 bits, under that netem (<0x1000 + j>:) when the kernel has it
    and the link has latency; a u32 filter on the destination address sends the traffic there."""

    dst: str
    address: str  # the destination's IPv4 address, what the filter matches
    classid: int  # 0x10010 = 1:10 for the first destination
    rate_bytes_s: int  # rate = ceil; at least 1
    burst_bytes: int  # htb burst/cburst and the tbf burst: 1 ms of the rate plus one frame
    quantum: int  # htb quantum (irrelevant: classes never borrow; set so the kernel does not warn)
    tbf_handle: int | None  # None above 2**32 - 1 bytes/s (pyroute2 has no TCA_TBF_RATE64)
    tbf_limit_bytes: int  # the tbf queue: TBF_LIMIT_S of the rate, at least 256 KiB
    netem_handle: int | None  # None without netem or without latency ("app" latency: the data plane delays)
    delay_us: int  # the link's latency
    u32_key: str  # "0x0a800a03/0xffffffff+16": the destination address at offset 16 of the IP header

    @property
    def leaf(self) -> int:
        """Where netem hangs: the tbf's class (<tbf>:1), else the htb class."""
        return self.tbf_handle | 1 if self.tbf_handle is not None else self.classid


@dataclass(frozen=True)
class CgroupPlan:
    """A device's cgroup: v1 two dirs (cpu, memory), v2 one; quota None = unthrottled (period unused then)."""

    group: str  # the directory name, = the namespace name
    label: str  # "cpu,memory:/<group>" (v1) or "/<group>" (v2), as /proc/<pid>/cgroup spells it
    dirs: tuple[str, ...]  # the CPU controller's dir first (the ballast joins only that one)
    quota_us: int | None
    period_us: int
    weight_factor: int  # THROTTLED_WEIGHT_FACTOR for a throttled group, else 1 (the default weight is kept)
    memory_limit_bytes: int  # memory_bytes + allowance: the hard limit, swap included

    @property
    def quota_period_us(self) -> tuple[int, int] | None:
        return None if self.quota_us is None else (self.quota_us, self.period_us)


@dataclass(frozen=True)
class DevicePlan:
    name: str
    namespace: str  # <prefix><safe device name>; also the cgroup's name
    veth: str  # <prefix>v<i> in the root namespace, on the bridge; its peer is eth0 in the namespace
    address: str
    prefixlen: int  # 24 inside the bridge's /24, 32 for a configured address outside it
    bridge_route: bool  # address outside the /24: the root namespace gets a host route to it via the bridge
    routes: tuple[str, ...]  # on-link /32 routes on eth0: the bridge and peers outside this device's /24
    port: int
    cpu_share: float | None
    memory_gib: float
    memory_allowance_bytes: int
    cgroup: CgroupPlan
    cpu: int | None  # the one CPU a throttled device (and its ballast) is pinned to; None: anywhere
    classes: tuple[ShapedClass, ...]  # one per other device, in testbed order

    @property
    def ballast(self) -> bool:
        return self.cpu is not None


@dataclass(frozen=True)
class LinkPlan:
    """One ordered pair, as the state file records it."""

    src: str
    dst: str
    bandwidth_mbit_s: float
    latency_ms: float
    latency_by: str  # "netem" or "app"


@dataclass(frozen=True)
class EmulationPlan:
    name: str
    prefix: str
    bridge: str
    subnet: str  # "10.168.206.0/24"
    bridge_address: str  # the subnet's first address, the controller's side
    cgroup_mode: str  # "v1" or "v2"
    netem: bool
    devices: tuple[DevicePlan, ...]
    links: tuple[LinkPlan, ...]  # every ordered pair, src-major in testbed order

    def device(self, name: str) -> DevicePlan:
        for d in self.devices:
            if d.name == name:
                return d
        raise KeyError(name)

    def state(self, state_dir: Path, stale_removed: Sequence[str] = ()) -> dict:
        """The state file's dict before anything exists: pids, cgroup_dirs and ballast_pid are filled in by the
        phases that create them (edgeshard/testbeds/__init__.py, the profiler and the runtime read these keys)."""
        return {
            "mode": "emulated", "name": self.name, "prefix": self.prefix, "bridge": self.bridge,
            "subnet": self.subnet, "bridge_address": self.bridge_address, "cgroup_mode": self.cgroup_mode,
            "stale_removed": list(stale_removed),
            "devices": {d.name: {
                "address": d.address, "port": d.port, "pid": None, "cpu_share": d.cpu_share,
                "memory_gib": d.memory_gib, "memory_limit_bytes": d.cgroup.memory_limit_bytes,
                "memory_allowance_bytes": d.memory_allowance_bytes, "namespace": d.namespace,
                "cgroup": d.cgroup.label, "healthy": None, "veth": d.veth, "cgroup_dirs": [],
                "log": str(Path(state_dir) / f"{d.name}.log"),
                "cfs_quota_period_us": list(d.cgroup.quota_period_us) if d.cgroup.quota_period_us else None,
                "cpu": d.cpu, "ballast_pid": None,
            } for d in self.devices},
            "links": [{"src": lk.src, "dst": lk.dst, "bandwidth_mbit_s": lk.bandwidth_mbit_s,
                       "latency_ms": lk.latency_ms, "bandwidth_by": "htb", "latency_by": lk.latency_by}
                      for lk in self.links],
        }


def pick_subnet(prefix: str, used: Iterable[ipaddress.IPv4Network] = ()) -> ipaddress.IPv4Network:
    """A /24 inside SUBNET_POOL that overlaps none of `used` (the root namespace's routes and addresses, see
    _used_networks); start from a hash of the prefix so the same testbed usually gets the same addresses."""
    used = list(used)
    subnets = 1 << (24 - SUBNET_POOL.prefixlen)
    start = int(hashlib.sha1(prefix.encode()).hexdigest(), 16) % subnets
    for k in range(subnets):
        base = int(SUBNET_POOL.network_address) + ((start + k) % subnets) * 256
        net = ipaddress.ip_network(f"{ipaddress.ip_address(base)}/24")
        if not any(net.overlaps(u) for u in used):
            return net
    raise EmulationError(f"no free /24 left in {SUBNET_POOL} for the testbed bridge")


def _shaped_class(j: int, dst: str, address: str, rate_bytes_s: float, latency_s: float,
                  netem: bool) -> ShapedClass:
    rate = max(1, int(round(rate_bytes_s)))
    burst = _burst_bytes(rate)
    return ShapedClass(
        dst=dst, address=address, classid=HTB_ROOT | (0x10 + j), rate_bytes_s=rate, burst_bytes=burst,
        quantum=int(min(200_000, max(1_600, rate // 10))),
        tbf_handle=(0x100 + j) << 16 if rate < 1 << 32 else None,
        tbf_limit_bytes=max(256 * 1024, int(rate * TBF_LIMIT_S)),
        netem_handle=(0x1000 + j) << 16 if netem and latency_s > 0 else None,
        delay_us=int(round(latency_s * 1e6)), u32_key=_ip_key(address))


def _cgroup_plan(mode: str, group: str, cpu_share: float | None, memory_limit: int) -> CgroupPlan:
    cfs = _cfs(cpu_share)
    quota, period = cfs if cfs else (None, CFS_PERIOD_US)
    return CgroupPlan(group=group, label=_cgroup_label(mode, group),
                      dirs=tuple(str(p) for p in _cgroup_dirs(mode, group)), quota_us=quota, period_us=period,
                      weight_factor=THROTTLED_WEIGHT_FACTOR if quota is not None else 1,
                      memory_limit_bytes=memory_limit)


def plan_emulation(testbed: Testbed, *, prefix: str | None = None, cgroup_mode: str = "v1", netem: bool = False,
                   cpus: Sequence[int] = (0,), used_networks: Iterable[ipaddress.IPv4Network] = (),
                   memory_allowance_bytes: int = RUNTIME_ALLOWANCE_BYTES,
                   idle_ballast: bool = IDLE_BALLAST) -> EmulationPlan:
    """What `up` creates for this testbed (pure: no I/O, no root). Raises EmulationError for a testbed the
    emulator cannot build (too many devices, a bad prefix, colliding names or addresses, cpu_share <= 0).

    cgroup_mode: "v1" or "v2" (_cgroup_mode()); netem: whether the kernel has it (netem_available());
    cpus: the CPUs throttled devices may be pinned to (up passes this process's affinity); used_networks: what
    the root namespace already routes (the bridge's /24 avoids them); memory_allowance_bytes, idle_ballast: see
    up()."""
    if memory_allowance_bytes < 0:
        raise EmulationError(f"memory_allowance_bytes = {memory_allowance_bytes} must not be negative")
    if len(testbed.devices) > MAX_DEVICES:
        raise EmulationError(f"{len(testbed.devices)} devices: the emulator supports at most {MAX_DEVICES}")
    if cgroup_mode not in ("v1", "v2"):
        raise EmulationError(f"cgroup mode {cgroup_mode!r}: expected 'v1' or 'v2'")
    prefix = prefix or default_prefix(testbed.name)
    _check_prefix(prefix)
    names = {d.name: _safe(d.name) for d in testbed.devices}
    if len(set(names.values())) != len(names):
        raise EmulationError("device names collide once made safe for namespace names: "
                             f"{sorted(names)}; rename them")
    subnet = pick_subnet(prefix, used_networks)
    bridge_addr = str(next(subnet.hosts()))
    addrs = _addresses(testbed, subnet)
    shares = {d.name: d.cpu_share for d in testbed.devices}
    for n, share in shares.items():
        if share is not None and share <= 0:
            raise EmulationError(f"device {n!r}: cpu_share = {share} must be greater than zero")
    pinned = assign_cpus(shares, list(cpus)) if idle_ballast else {n: None for n in shares}

    def inside(a: str) -> bool:
        return ipaddress.ip_address(a) in subnet

    devices = []
    for i, d in enumerate(testbed.devices):
        own = addrs[d.name]
        # peers (and the bridge address) outside this device's connected /24: on-link host routes; all
        # namespaces share one L2 segment, so ARP resolves them
        routes = tuple(p for p in [bridge_addr] + [addrs[o.name] for o in testbed.devices]
                       if p != own and not (inside(own) and inside(p)))
        classes = tuple(_shaped_class(j, o.name, addrs[o.name], testbed.link(d.name, o.name).bandwidth_bytes_s,
                                      testbed.link(d.name, o.name).latency_s, netem)
                        for j, o in enumerate(x for x in testbed.devices if x.name != d.name))
        group = prefix + names[d.name]
        devices.append(DevicePlan(
            name=d.name, namespace=group, veth=f"{prefix}v{i}", address=own, prefixlen=24 if inside(own) else 32,
            bridge_route=not inside(own), routes=routes, port=d.port or DEFAULT_PORT, cpu_share=d.cpu_share,
            memory_gib=d.memory_gib, memory_allowance_bytes=int(memory_allowance_bytes),
            cgroup=_cgroup_plan(cgroup_mode, group, d.cpu_share,
                                memory_limit_bytes(d.memory_bytes, memory_allowance_bytes)),
            cpu=pinned[d.name], classes=classes))
    links = tuple(LinkPlan(a.name, b.name, testbed.link(a.name, b.name).bandwidth_bytes_s / MBIT_S,
                           testbed.link(a.name, b.name).latency_s * 1000, "netem" if netem else "app")
                  for a in testbed.devices for b in testbed.devices if a.name != b.name)
    return EmulationPlan(name=testbed.name, prefix=prefix, bridge=prefix + "br", subnet=str(subnet),
                         bridge_address=bridge_addr, cgroup_mode=cgroup_mode, netem=netem,
                         devices=tuple(devices), links=links)


# --------------------------------------------------------------------------------------------- exec

def _cpus_arg(cpu) -> str:
    return "-" if cpu is None else str(int(cpu))


def _argv_for(namespace: str, cgroup_dirs: list[str], argv: list[str], cpu: int | None = None) -> list[str]:
    """Through edgeshard/testbeds/trampoline.py: join the cgroups, pin to cpu, enter the namespace, exec argv."""
    if not argv:
        raise EmulationError("nothing to run: give a command")
    return [sys.executable, "-I", "-S", str(TRAMPOLINE_PY), str(NETNS_DIR / namespace), _cpus_arg(cpu),
            *map(str, cgroup_dirs), "--", *map(str, argv)]


def _device_state(name: str, device: str, state_dir: Path) -> dict:
    state = _read_state(name, state_dir)
    if state is None:
        raise EmulationError(f"testbed {name!r} is not up (no state in {_state_path(name, state_dir)}): "
                             f"run `edgeshard testbed up` first")
    dev = state["devices"].get(device)
    if dev is None:
        raise EmulationError(f"testbed {name!r} has no device {device!r} (devices: "
                             f"{', '.join(state['devices'])})")
    return dev


def exec_argv(name: str, device: str, state_dir: Path, argv: list[str]) -> list[str]:
    """An argv that runs `argv` as `device` of the testbed: in its network namespace and cgroups."""
    dev = _device_state(name, device, state_dir)
    return _argv_for(dev["namespace"], dev.get("cgroup_dirs", []), argv, dev.get("cpu"))


def run_as(name: str, device: str, state_dir: Path, argv: list[str], **popen_kw) -> subprocess.Popen:
    """subprocess.Popen of `argv` as `device` (OMP_NUM_THREADS=1 unless the environment given sets it)."""
    env = dict(popen_kw.pop("env", None) or os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.Popen(exec_argv(name, device, state_dir, argv), env=env, **popen_kw)


# --------------------------------------------------------------------------------------------- up / down

def _public(state: dict) -> dict:
    """The status dict (internal bookkeeping keys kept: they are what `down` needs)."""
    return json.loads(json.dumps(state))


def _used_networks() -> list[ipaddress.IPv4Network]:
    """Every IPv4 network the root namespace routes (all tables) or has an address in."""
    used = []
    with _iproute() as ipr:
        for r in ipr.route("dump", family=socket.AF_INET):  # every table (get_routes(table=0) matches none)
            dst, plen = r.get_attr("RTA_DST"), r["dst_len"]
            if dst and plen:
                used.append(ipaddress.ip_network(f"{dst}/{plen}", strict=False))
        for a in ipr.get_addr(family=socket.AF_INET):
            used.append(ipaddress.ip_network(f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}", strict=False))
    return used


def _machine_plan(testbed: Testbed, prefix: str | None, memory_allowance_bytes: int, idle_ballast: bool,
                  used_networks: Iterable[ipaddress.IPv4Network] = ()) -> EmulationPlan:
    """plan_emulation with what this machine says (cgroup mode, netem, this process's CPUs)."""
    return plan_emulation(testbed, prefix=prefix, cgroup_mode=_cgroup_mode() or "v1", netem=netem_available(),
                          cpus=sorted(os.sched_getaffinity(0)), used_networks=used_networks,
                          memory_allowance_bytes=memory_allowance_bytes, idle_ballast=idle_ballast)


class _Record:
    """The state dict being built and its file: a phase records what it created and saves at once, so a
    controller killed at any point leaves enough for `down`."""

    def __init__(self, path: Path, state: dict):
        self.path, self.state = path, state

    def dev(self, name: str) -> dict:
        return self.state["devices"][name]

    def save(self) -> None:
        _write_state(self.path, self.state)


def up(testbed: Testbed, serve_argv: Callable[[str, str, int], list[str]], state_dir: Path,
       prefix: str | None = None, memory_allowance_bytes: int = RUNTIME_ALLOWANCE_BYTES,
       idle_ballast: bool = IDLE_BALLAST) -> dict:
    """Create the emulated testbed and start one server per device; returns the status dict.

    memory_allowance_bytes: added to every device's memory_bytes for its cgroup limit (RUNTIME_ALLOWANCE_BYTES;
    0 for processes that are not device servers). Each device's state records "memory_limit_bytes".
    idle_ballast: pin each throttled device to a CPU with an idle spinner that keeps its quota in the steady
    state (IDLE_BALLAST); the state records "cpu" and "ballast_pid" per device.

    The plan (plan_emulation) is made first, so a testbed the emulator cannot build fails before anything is
    touched; then the phases apply it in order: network, shaping, cgroups, ballast, servers, wait."""
    ok, reason = available()
    if not ok:
        raise EmulationError(reason)
    state_dir = Path(state_dir)
    _machine_plan(testbed, prefix, memory_allowance_bytes, idle_ballast)  # validates; addresses come later
    prefix = prefix or default_prefix(testbed.name)
    for other in sorted(state_dir.glob("*.json")):
        o = _read_state(other.stem, state_dir)
        if o and o.get("prefix") == prefix and o.get("name", other.stem) != testbed.name:
            raise EmulationError(f"prefix {prefix!r} is in use by testbed {other.stem!r} in {state_dir}: pass "
                                 "another prefix")
    # Stale state of this testbed (a crashed controller) and anything else carrying the prefix goes first, so
    # its bridge's /24 counts as free again.
    stale = down(testbed.name, state_dir)
    stale += _cleanup(prefix, None)
    plan = _machine_plan(testbed, prefix, memory_allowance_bytes, idle_ballast, _used_networks())
    rec = _Record(_state_path(testbed.name, state_dir), plan.state(state_dir, stale))
    rec.save()  # from here on, `down` can undo whatever exists
    try:
        _up_network(plan, rec)
        _up_shaping(plan)
        _up_cgroups(plan, rec)
        state_dir.mkdir(parents=True, exist_ok=True)
        _up_ballast(plan, rec)
        _up_servers(plan, rec, serve_argv)
        _up_wait(plan, rec)
    except Exception as e:
        # Undo what exists (the state file says what that is); a controller killed here leaves the same state
        # file for `edgeshard testbed down`.
        with contextlib.suppress(Exception):
            down(testbed.name, state_dir)
        if isinstance(e, EmulationError):
            raise
        raise EmulationError(f"testbed {testbed.name!r}: setting up the emulation failed ({type(e).__name__}: "
                             f"{e}); what had been created was removed") from e
    return _public(rec.state)


def _up_network(plan: EmulationPlan, rec: _Record) -> None:
    """The bridge (with the controller's address), then per device: namespace, veth pair (the peer created
    directly inside the namespace, so it can be called eth0 there), its address and routes."""
    from pyroute2 import netns as pnetns
    with _iproute() as ipr:
        ipr.link("add", ifname=plan.bridge, kind="bridge")
        br = ipr.link_lookup(ifname=plan.bridge)[0]
        ipr.addr("add", index=br, address=plan.bridge_address, prefixlen=24)
        ipr.link("set", index=br, state="up")
        for d in plan.devices:
            pnetns.create(d.namespace)
            ipr.link("add", ifname=d.veth, kind="veth", peer={"ifname": "eth0", "net_ns_fd": d.namespace})
            v = ipr.link_lookup(ifname=d.veth)[0]
            ipr.link("set", index=v, master=br, state="up")
            rec.save()
            if d.bridge_route:  # a configured address outside the bridge's /24: reach it by a host route
                ipr.route("add", dst=d.address, dst_len=32, oif=br, scope=253)
    for d in plan.devices:
        with _iproute(d.namespace) as ipr:
            lo = ipr.link_lookup(ifname="lo")[0]
            ipr.link("set", index=lo, state="up")
            eth = ipr.link_lookup(ifname="eth0")[0]
            ipr.addr("add", index=eth, address=d.address, prefixlen=d.prefixlen)
            ipr.link("set", index=eth, state="up")
            for peer in d.routes:
                ipr.route("add", dst=peer, dst_len=32, oif=eth, scope=253)


def _up_shaping(plan: EmulationPlan) -> None:
    """Per sender, its htb classes (nothing to record: the qdiscs go with the veth)."""
    for d in plan.devices:
        _shape(d.namespace, d.classes)


def _up_cgroups(plan: EmulationPlan, rec: _Record) -> None:
    """Per device its cgroup dirs, recorded before they are made."""
    for d in plan.devices:
        rec.dev(d.name)["cgroup_dirs"] = list(d.cgroup.dirs)
        rec.save()
        _make_cgroup(plan.cgroup_mode, d.cgroup)


def _up_ballast(plan: EmulationPlan, rec: _Record) -> None:
    """An edgeshard/testbeds/ballast.py per pinned device, in its CPU cgroup on its CPU."""
    for d in plan.devices:
        if not d.ballast:
            continue
        b = subprocess.Popen([sys.executable, "-I", "-S", str(BALLAST_PY), str(d.cpu), d.cgroup.dirs[0]],
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
        _children[b.pid] = b
        rec.dev(d.name)["ballast_pid"] = b.pid
        rec.save()


def _up_servers(plan: EmulationPlan, rec: _Record, serve_argv: Callable[[str, str, int], list[str]]) -> None:
    """serve_argv(device, address, port) per device, through the trampoline, logging to the state's "log"."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for d in plan.devices:
        dev = rec.dev(d.name)
        argv = _argv_for(d.namespace, list(d.cgroup.dirs), serve_argv(d.name, d.address, d.port), d.cpu)
        with open(dev["log"], "ab") as log:
            # own session: Ctrl-C on the controller does not reach the servers; `down` stops them
            p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                                 start_new_session=True)
        _children[p.pid] = p
        dev["pid"] = p.pid
        rec.save()


def _up_wait(plan: EmulationPlan, rec: _Record) -> None:
    """Until every server is inside its namespace and every ballast is idle-policy in its cgroup."""
    for d in plan.devices:
        _wait_joined(rec.dev(d.name), d.name)
        _wait_ballast(rec.dev(d.name), d.name)


JOIN_TIMEOUT_S = 20.0  # the trampoline is a Python start-up: ~50 ms idle, longer at a small cpu_share


def _wait_joined(dev: dict, device: str) -> None:
    """Wait (bounded) until the started process is inside its namespace, so that the pid in the state file can
    be proven ours by `down` (a process still in the trampoline is in neither namespace nor cgroup)."""
    pid, ns = dev["pid"], _inode(NETNS_DIR / dev["namespace"])
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    while _inode(f"/proc/{pid}/ns/net") != ns:
        if not _alive(pid) or time.monotonic() > deadline:
            tail = ""
            with contextlib.suppress(OSError):
                tail = Path(dev["log"]).read_text(errors="replace")[-1500:]
            what = "exited" if not _alive(pid) else f"did not enter its namespace within {JOIN_TIMEOUT_S:.0f} s"
            raise EmulationError(f"device {device!r}: its server {what}; end of {dev['log']}:\n{tail}")
        time.sleep(POLL_S)


def _wait_ballast(dev: dict, device: str) -> None:
    """Wait (bounded) until the ballast is set up: inside the device's CPU cgroup (then `down` finds it there),
    pinned and SCHED_IDLE (it does these in that order, so joining alone is not enough: `up` returning before the
    policy change would let the ballast compete with the server as a normal task for a moment)."""
    pid = dev.get("ballast_pid")
    if not pid:
        return
    deadline = time.monotonic() + JOIN_TIMEOUT_S

    def ready() -> bool:
        if pid not in _pids_in_cgroups([Path(dev["cgroup_dirs"][0])]):
            return False
        try:
            return os.sched_getscheduler(pid) == os.SCHED_IDLE
        except OSError:
            return False

    while not ready():
        if not _alive(pid) or time.monotonic() > deadline:
            raise EmulationError(f"device {device!r}: its idle ballast (pid {pid}) did not join "
                                 f"{dev['cgroup_dirs'][0]} as an idle-policy task")
        time.sleep(POLL_S)


def _cleanup(prefix: str, state: dict | None) -> list[str]:
    """Remove everything carrying the prefix (and whatever the state names). Order: processes (so nothing
    holds the namespaces), root-side veths (deleting one end deletes the namespace end with its qdiscs,
    synchronously, unlike namespace teardown), bridge, namespaces, cgroups."""
    from pyroute2 import netns as pnetns
    removed: list[str] = []
    ns_names = {n for n in pnetns.listnetns() if n.startswith(prefix)}
    cgroups = set(_prefix_cgroups(prefix))
    if state:
        for dev in state.get("devices", {}).values():
            if (NETNS_DIR / dev.get("namespace", "")).exists() and dev.get("namespace", "").startswith(prefix):
                ns_names.add(dev["namespace"])
            cgroups |= {Path(p) for p in dev.get("cgroup_dirs", []) if Path(p).exists()}
    # Only pids proven to be ours (inside one of these namespaces or cgroups, or still our trampoline for one):
    # a pid in a stale state file may have been reused by an unrelated process.
    pids = _pids_in_netns([NETNS_DIR / n for n in ns_names]) | _pids_in_cgroups(sorted(cgroups))
    for dev in (state or {}).get("devices", {}).values():
        pid = dev.get("pid")
        if isinstance(pid, int) and _alive(pid):
            with contextlib.suppress(OSError):
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                if str(TRAMPOLINE_PY).encode() in argv and str(NETNS_DIR / dev.get("namespace", "?")).encode() in argv:
                    pids.add(pid)
        bpid = dev.get("ballast_pid")
        if isinstance(bpid, int) and _alive(bpid) and dev.get("cgroup_dirs"):
            with contextlib.suppress(OSError):  # a ballast that had not joined its cgroup yet
                argv = Path(f"/proc/{bpid}/cmdline").read_bytes().split(b"\0")
                if str(BALLAST_PY).encode() in argv and str(dev["cgroup_dirs"][0]).encode() in argv:
                    pids.add(bpid)
    for p in _kill(pids):
        removed.append(f"process {p}")
    with _iproute() as ipr:
        ours = []
        for link in ipr.get_links():
            n, info = link.get_attr("IFLA_IFNAME"), link.get_attr("IFLA_LINKINFO")
            if n and n.startswith(prefix):
                ours.append((info.get_attr("IFLA_INFO_KIND") if info else None, n, link["index"]))
        for kind, n, i in sorted(ours, key=lambda x: x[0] == "bridge"):  # veths first, then the bridge
            with contextlib.suppress(Exception):  # NetlinkError ENODEV: gone with its peer meanwhile
                ipr.link("del", index=i)
                removed.append(f"link {n} ({'bridge' if kind == 'bridge' else kind or 'link'})")
    for n in sorted(ns_names):
        with contextlib.suppress(FileNotFoundError):
            pnetns.remove(n)
            removed.append(f"netns {n}")
    errors = []
    for d in sorted(cgroups):
        try:
            if _rmdir_cgroup(d):
                removed.append(f"cgroup {d}")
        except (EmulationError, OSError) as e:
            errors.append(str(e))
    if errors:
        raise EmulationError("; ".join(errors) + f" (removed: {', '.join(removed) or 'nothing'}); run down again")
    return removed


def down(name: str, state_dir: Path) -> list[str]:
    """Tear the testbed down (idempotent); returns what was removed ([] when nothing was there)."""
    state = _read_state(name, state_dir)
    prefix = (state or {}).get("prefix") or default_prefix(name)
    if not _is_root():
        if state is None and not any(n.startswith(prefix) for n in _listdir(NETNS_DIR)):
            return []
        raise EmulationError(f"testbed {name!r}: taking an emulated testbed down needs root")
    removed = _cleanup(prefix, state)
    path = _state_path(name, state_dir)
    if path.exists():
        path.unlink()
        removed.append(f"state {path}")
    return removed


# --------------------------------------------------------------------------------------------- status

def _accepting(address: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((address, port), timeout=timeout):
            return True
    except OSError:
        return False


def status(name: str, state_dir: Path) -> dict | None:
    """The state dict with "healthy" per device: the process is alive, still inside the device's namespace,
    and its TCP port accepts a connection from the controller (via the bridge). None if the testbed is not up."""
    state = _read_state(name, state_dir)
    if state is None:
        return None
    for dev in state["devices"].values():
        pid = dev.get("pid")
        ns = NETNS_DIR / dev["namespace"]
        mine = bool(pid) and _alive(pid) and _inode(ns) is not None and _inode(f"/proc/{pid}/ns/net") == _inode(ns)
        dev["healthy"] = bool(mine and _accepting(dev["address"], dev["port"]))
    return _public(state)


# --------------------------------------------------------------------------------------------- diagnosis

def oom_kills(dev: dict) -> int | None:
    """How many processes the kernel OOM-killed in this device's memory cgroup (None: unknown / gone)."""
    for d in dev.get("cgroup_dirs", []):
        for fname in ("memory.oom_control", "memory.events"):  # v1, v2
            try:
                text = (Path(d) / fname).read_text()
            except OSError:
                continue
            for line in text.splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill" and value.strip().isdigit():
                    return int(value)
    return None


def device_failure(state: dict | None, device: str) -> str | None:
    """Why an emulated device's server died, in words, when the kernel says so (an OOM kill in its memory cgroup);
    None when the state is not an emulated testbed's or nothing is known."""
    if not state or state.get("mode") != "emulated":
        return None
    dev = state.get("devices", {}).get(device)
    if not dev:
        return None
    n = oom_kills(dev)
    if not n:
        return None
    gib = 2 ** 30
    limit = dev.get("memory_limit_bytes")
    allowance = dev.get("memory_allowance_bytes")
    what = ""
    if limit is not None:
        what = f" of {limit / gib:.2f} GiB"
        if allowance is not None and dev.get("memory_gib") is not None:
            what += (f" (memory_gib {dev['memory_gib']:g} for the plan's weights + KV cache, plus "
                     f"{allowance / 2 ** 20:.0f} MiB runtime allowance)")
    return (f"the kernel OOM-killed it ({n} OOM kill{'s' if n != 1 else ''} in its memory cgroup): the device "
            f"ran out of its hard memory limit{what}; the plan puts more on {device!r} than it holds")


# --------------------------------------------------------------------------------------------- measuring

# --------------------------------------------------------------------------------------------- measuring

def measure_goodput(name: str, src: str, dst: str, state_dir: Path, seconds: float = 1.0,
                    rate_mbit_s: float | None = None, timeout_s: float = 30.0) -> float:
    """TCP goodput src -> dst in Mbit/s (payload bytes, edgeshard/testbeds/source.py in src's namespace,
    edgeshard/testbeds/sink.py in dst's): about `seconds` worth of bytes at the configured rate, timed at the
    receiver from the first to the last byte (the first read excluded, it started before the clock)."""
    state = _read_state(name, state_dir)
    if state is None:
        raise EmulationError(f"testbed {name!r} is not up")
    if rate_mbit_s is None:
        rate_mbit_s = next(lk["bandwidth_mbit_s"] for lk in state["links"] if (lk["src"], lk["dst"]) == (src, dst))
    total = int(rate_mbit_s * MBIT_S * seconds)
    addr = state["devices"][dst]["address"]
    sink = run_as(name, dst, state_dir, [sys.executable, "-I", "-S", str(SINK_PY), addr, str(timeout_s)],
                  stdout=subprocess.PIPE, text=True)
    procs = [sink]
    try:
        port = sink.stdout.readline().strip()
        if not port:
            raise EmulationError(f"the receiver in {dst} did not start (exit {sink.wait(timeout_s)})")
        source = run_as(name, src, state_dir, [sys.executable, "-I", "-S", str(SOURCE_PY), addr, port, str(total),
                                               str(timeout_s)])
        procs.append(source)
        source.wait(timeout_s)
        out, _ = sink.communicate(timeout=timeout_s)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    r = json.loads(out.strip().splitlines()[-1])
    return r["bytes"] * 8 / r["seconds"] / 1e6


# CPU-bound steps after idle gaps, for `python -c` (tests/test_emulate.py, bench/emulate_accuracy.py): the text of
# edgeshard/testbeds/steps.py (argv: step CPU seconds, steps, gap seconds; prints each step's wall / CPU time).
STEP_SCRIPT = STEPS_PY.read_text()


def measure_compute(name: str, device: str, state_dir: Path, steps: int = 3_000_000,
                    timeout_s: float = 60.0) -> dict:
    """Run a fixed CPU-bound Python loop (edgeshard/testbeds/spin.py) as `device`: {"wall": s, "cpu": s} of the
    loop alone."""
    p = run_as(name, device, state_dir, [sys.executable, "-I", "-S", str(SPIN_PY), str(steps)],
               stdout=subprocess.PIPE, text=True)
    out, _ = p.communicate(timeout=timeout_s)
    return json.loads(out.strip().splitlines()[-1])
