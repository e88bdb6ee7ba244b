"""The emulated testbed's plan (edgeshard/testbeds/emulated.py, plan_emulation): what `up` will create, checked
without root, namespaces or cgroups. Also the separate-process modules it runs start without edgeshard."""

from __future__ import annotations

import dataclasses
import ipaddress
import subprocess
import sys
from pathlib import Path

import pytest

from edgeshard.config.testbed import GIB, MBIT_S, Device, Link, Testbed
from edgeshard.testbeds import emulated as emulate

MIB = 2**20


def make_testbed(name="plan-a", links=(("a", "b", 10),), devices=None) -> Testbed:
    devices = devices or {"a": (0.25, 0.5), "b": (0.5, 1.0), "c": (None, 2.0)}
    devs = tuple(Device(n, int(mem * GIB), "auto", 0, None, share) for n, (share, mem) in devices.items())
    lks = tuple(Link(s, d, mbit * MBIT_S, 0.002) for s, d, mbit in links)
    return Testbed(name, devs[0].name, devs, 80 * MBIT_S, 0.0005, lks)


def test_plan_is_frozen_and_pure():
    p = emulate.plan_emulation(make_testbed())
    assert p == emulate.plan_emulation(make_testbed())  # deterministic
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.prefix = "x-"  # type: ignore[misc]
    assert p.cgroup_mode == "v1" and p.netem is False


def test_unique_prefix_bridge_and_subnet_per_testbed():
    one, two = emulate.plan_emulation(make_testbed("plan-one")), emulate.plan_emulation(make_testbed("plan-two"))
    assert one.prefix == emulate.default_prefix("plan-one") != two.prefix
    assert one.bridge == one.prefix + "br" and one.bridge != two.bridge
    assert one.subnet != two.subnet
    for p in (one, two):
        names = [d.namespace for d in p.devices] + [d.veth for d in p.devices] + [p.bridge]
        assert len(set(names)) == len(names) and all(n.startswith(p.prefix) and len(n) <= 15 for n in names)
    # a subnet the root namespace already routes is skipped
    taken = ipaddress.ip_network(one.subnet)
    moved = emulate.plan_emulation(make_testbed("plan-one"), used_networks=[taken])
    assert moved.subnet != one.subnet and not ipaddress.ip_network(moved.subnet).overlaps(taken)


def test_addresses_and_routes():
    p = emulate.plan_emulation(make_testbed())
    net = ipaddress.ip_network(p.subnet)
    assert p.bridge_address == str(next(net.hosts()))
    assert [d.address for d in p.devices] == [str(net.network_address + i) for i in (2, 3, 4)]
    assert all(d.prefixlen == 24 and not d.bridge_route and d.routes == () for d in p.devices)
    assert all(d.port == emulate.DEFAULT_PORT for d in p.devices)
    # a configured address outside the /24: a host route each way
    tb = Testbed("plan-addr", "x", (Device("x", GIB, "192.168.77.10", 9000), Device("y", GIB, "auto", 0)))
    q = emulate.plan_emulation(tb, prefix="estst-")
    x, y = q.device("x"), q.device("y")
    assert (x.namespace, x.address, x.port, x.prefixlen, x.bridge_route) == ("estst-x", "192.168.77.10", 9000, 32,
                                                                             True)
    assert set(x.routes) == {q.bridge_address, y.address} and y.routes == (x.address,)


def test_one_class_per_ordered_pair_with_its_rate():
    tb = make_testbed()
    p = emulate.plan_emulation(tb, netem=True)
    pairs = {(d.name, c.dst): c for d in p.devices for c in d.classes}
    assert set(pairs) == {(a, b) for a in "abc" for b in "abc" if a != b}
    assert {(lk.src, lk.dst) for lk in p.links} == set(pairs)
    for (src, dst), c in pairs.items():
        link = tb.link(src, dst)
        assert c.rate_bytes_s == round(link.bandwidth_bytes_s)
        assert c.address == p.device(dst).address and c.u32_key == emulate._ip_key(c.address)
        assert c.delay_us == round(link.latency_s * 1e6) and c.netem_handle is not None
        assert c.tbf_handle is not None and c.leaf == c.tbf_handle | 1
    assert pairs["a", "b"].rate_bytes_s == 10 * MBIT_S and pairs["b", "a"].rate_bytes_s == 80 * MBIT_S
    # per sender, distinct class ids and handles under one htb root 1:
    for d in p.devices:
        ids = [c.classid for c in d.classes] + [c.tbf_handle for c in d.classes]
        assert len(set(ids)) == len(ids) and all(c.classid >> 16 == 1 for c in d.classes)
    assert all(lk.latency_by == "netem" for lk in p.links)
    no_netem = emulate.plan_emulation(tb)
    assert all(c.netem_handle is None for d in no_netem.devices for c in d.classes)
    assert all(lk.latency_by == "app" for lk in no_netem.links)


def test_memory_limit_is_memory_plus_allowance():
    tb = make_testbed()
    p = emulate.plan_emulation(tb)
    for d, dev in zip(p.devices, tb.devices):
        assert d.cgroup.memory_limit_bytes == dev.memory_bytes + emulate.RUNTIME_ALLOWANCE_BYTES
        assert d.memory_allowance_bytes == emulate.RUNTIME_ALLOWANCE_BYTES
    q = emulate.plan_emulation(tb, memory_allowance_bytes=64 * MIB)
    assert q.device("a").cgroup.memory_limit_bytes == GIB // 2 + 64 * MIB
    with pytest.raises(emulate.EmulationError, match="negative"):
        emulate.plan_emulation(tb, memory_allowance_bytes=-1)


def test_cpu_quota_pinning_and_ballast():
    p = emulate.plan_emulation(make_testbed(), cpus=[0, 1])
    a, b, c = p.devices
    assert (a.cgroup.quota_us, a.cgroup.period_us) == (2_500, emulate.CFS_PERIOD_US)
    assert (b.cgroup.quota_us, b.cgroup.period_us) == (5_000, emulate.CFS_PERIOD_US)
    assert a.cgroup.weight_factor == emulate.THROTTLED_WEIGHT_FACTOR
    # largest share first onto the least loaded CPU
    assert (b.cpu, a.cpu) == (0, 1) and a.ballast and b.ballast
    # a full-core device is left unthrottled, unpinned, without ballast
    assert c.cgroup.quota_us is None and c.cgroup.quota_period_us is None and c.cgroup.weight_factor == 1
    assert c.cpu is None and not c.ballast
    one = emulate.plan_emulation(make_testbed(devices={"one": (1.0, 0.5)}))
    assert one.devices[0].cgroup.quota_us is None and not one.devices[0].ballast
    # a share too small for the kernel's 1 ms minimum quota gets a longer period
    tiny = emulate.plan_emulation(make_testbed(devices={"t": (0.05, 0.5)})).devices[0].cgroup
    assert (tiny.quota_us, tiny.period_us) == (emulate.MIN_QUOTA_US, 20_000)
    off = emulate.plan_emulation(make_testbed(), idle_ballast=False)
    assert all(d.cpu is None and not d.ballast for d in off.devices)
    assert off.device("a").cgroup.quota_us == 2_500  # still throttled


def test_cgroup_dirs_per_mode():
    v1 = emulate.plan_emulation(make_testbed()).device("a").cgroup
    assert v1.dirs == (str(emulate.CGROUP_ROOT / "cpu" / v1.group), str(emulate.CGROUP_ROOT / "memory" / v1.group))
    assert v1.label == f"cpu,memory:/{v1.group}"
    v2 = emulate.plan_emulation(make_testbed(), cgroup_mode="v2").device("a").cgroup
    assert v2.dirs == (str(emulate.CGROUP_ROOT / v2.group),) and v2.label == f"/{v2.group}"


def test_state_keeps_its_keys(tmp_path):
    p = emulate.plan_emulation(make_testbed(), cpus=[0, 1])
    st = p.state(tmp_path, ["netns old"])
    assert set(st) == {"mode", "name", "prefix", "bridge", "subnet", "bridge_address", "cgroup_mode",
                       "stale_removed", "devices", "links"}
    assert st["mode"] == "emulated" and st["stale_removed"] == ["netns old"]
    dev = st["devices"]["a"]
    assert set(dev) == {"address", "port", "pid", "cpu_share", "memory_gib", "memory_limit_bytes",
                        "memory_allowance_bytes", "namespace", "cgroup", "healthy", "veth", "cgroup_dirs", "log",
                        "cfs_quota_period_us", "cpu", "ballast_pid"}
    assert dev["cfs_quota_period_us"] == [2_500, emulate.CFS_PERIOD_US] and dev["cgroup_dirs"] == []
    assert dev["log"] == str(tmp_path / "a.log") and st["devices"]["c"]["cfs_quota_period_us"] is None
    assert set(st["links"][0]) == {"src", "dst", "bandwidth_mbit_s", "latency_ms", "bandwidth_by", "latency_by"}
    assert {(lk["src"], lk["dst"]): lk["bandwidth_mbit_s"] for lk in st["links"]}["a", "b"] == pytest.approx(10)


@pytest.mark.parametrize("devices,match", [
    ({"a b": (None, 1), "a_b": (None, 1)}, "collide"),
    ({"a": (0.0, 1)}, "cpu_share"),
])
def test_refuses_what_it_cannot_build(devices, match):
    with pytest.raises(emulate.EmulationError, match=match):
        emulate.plan_emulation(make_testbed(devices=devices, links=()))


def test_refuses_bad_prefix_and_addresses():
    with pytest.raises(emulate.EmulationError, match="prefix"):
        emulate.plan_emulation(make_testbed(), prefix="Bad_prefix")
    same = Testbed("plan-dup", "x", (Device("x", GIB, "10.0.0.5"), Device("y", GIB, "10.0.0.5")))
    with pytest.raises(emulate.EmulationError, match="used twice"):
        emulate.plan_emulation(same)
    with pytest.raises(emulate.EmulationError, match="IPv4"):
        emulate.plan_emulation(Testbed("plan-name", "x", (Device("x", GIB, "edge.local"),)))


def test_process_modules_start_without_edgeshard():
    """The trampoline, ballast and measuring helpers run as `python -I -S file`: stdlib only, no edgeshard."""
    for path in (emulate.TRAMPOLINE_PY, emulate.BALLAST_PY, emulate.SINK_PY, emulate.SOURCE_PY, emulate.SPIN_PY,
                 emulate.STEPS_PY, emulate.PROBE_PY):
        assert path.is_file() and "edgeshard" not in "".join(
            line for line in path.read_text().splitlines() if line.startswith(("import", "from")))
    out = subprocess.run([sys.executable, "-I", "-S", str(emulate.SPIN_PY), "1000"], capture_output=True, text=True,
                         timeout=30, check=True).stdout
    assert '"wall"' in out
    assert emulate.STEP_SCRIPT == Path(emulate.STEPS_PY).read_text()
    argv = emulate._argv_for("ns", ["/cg/cpu"], ["true"], 1)
    assert argv[:4] == [sys.executable, "-I", "-S", str(emulate.TRAMPOLINE_PY)] and argv[-2:] == ["--", "true"]
