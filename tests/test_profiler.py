"""The profiler against real local device servers: format, link probes through the shaping, cache, resume."""

import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("torch")

from edgeshard.config import catalog  # noqa: E402
from edgeshard.config import profile as profm
from edgeshard.config import testbed as tbm
from edgeshard.device.client import DeviceClient  # noqa: E402
from edgeshard.planning import dp as planner
from edgeshard.run import profiler
from edgeshard.testbeds import local as launch

TB = """
name = "prof-test"
source = "a"
[defaults]
bandwidth_mbit_s = 1000
latency_ms = 0.5
[[device]]
name = "a"
memory_gib = 2
[[device]]
name = "b"
memory_gib = 2
[[link]]
src = "a"
dst = "b"
bandwidth_mbit_s = 40
latency_ms = 4
directed = true
"""


@pytest.fixture(scope="module")
def up(tmp_path_factory):
    d = tmp_path_factory.mktemp("prof")
    (d / "p.toml").write_text(TB)
    tb = tbm.load(d / "p.toml")
    with launch.local_testbed(tb, state_dir=d / "state") as state:
        yield tb, state, d


def test_profile_measures_units_and_links(up, monkeypatch):
    tb, state, d = up
    cache = d / "cache"
    pr = profiler.profile(tb, "tiny-llama", state, context_tokens=16, prefill_tokens=4, repeats=2,
                          cache_dir=cache, progress=False, link_target_s=0.15, pings=5)
    # the profile format of the foundation issue, round-tripped through JSON
    again = profm.from_dict(json.loads(pr.dumps()))
    assert again.to_dict() == pr.to_dict()
    assert pr.units == catalog.get("tiny-llama").units("float32")
    for name in ("a", "b"):
        c = pr.devices[name]
        assert len(c.decode_s) == pr.n_units and all(x > 0 for x in c.decode_s)
        assert all(x > 0 for x in c.prefill_s_per_token)
        assert c.context_tokens == 16 and c.memory_bytes == 2 * 2**30
    # both device processes run on this machine: the profile says so, with its cores (costs.unmodelled_sharing)
    import socket
    assert pr.provenance["hosts"] == [{"hostname": socket.gethostname(), "devices": ["a", "b"],
                                       "cores": tbm.machine_cores()}]
    ab, ba = pr.link("a", "b"), pr.link("b", "a")
    # a -> b is shaped to 40 Mbit/s + 4 ms by the sender: the devices see it
    assert ab.latency_s >= 0.004 and ab.bandwidth_bytes_s <= 40e6 / 8 * 1.02
    assert ab.bandwidth_bytes_s >= 40e6 / 8 * 0.5
    assert 0.0005 <= ba.latency_s < 0.004  # the default link: 0.5 ms
    prov = pr.provenance
    assert prov["method"] == "measured" and not prov["cache"]["hit"]
    for name, c in pr.devices.items():  # the step probe ran its steps on each device; a step costs something
        m = prov["step_measurements"][name]
        assert m["steps"] == profiler.STEP_PROBE_STEPS and m["cpu_per_step_s"] > 0, m
        assert 0 < c.step_overhead_s < 0.05, (name, c.step_overhead_s)
    assert prov["link_measurements"]["a->b"]["latency_from"] == "one_way"
    assert prov["parameters"]["repeats"] == 2
    # the planner accepts it
    plan = planner.solve(tb, pr, "latency")
    assert plan.stages[0].device == "a" and plan.predicted["latency_s"] > 0
    # cached: a second call measures nothing
    calls = []
    monkeypatch.setattr(DeviceClient, "profile_units", lambda *a, **k: calls.append(1))
    hit = profiler.profile(tb, "tiny-llama", state, context_tokens=16, prefill_tokens=4, repeats=2,
                           cache_dir=cache, progress=False, link_target_s=0.15, pings=5)
    assert hit.provenance["cache"]["hit"] and not calls
    assert hit.devices == pr.devices


def test_profile_resumes_after_a_crash(up, monkeypatch):
    tb, state, d = up
    cache = d / "cache2"
    real = DeviceClient.measure_link
    n = {"links": 0, "units": 0}

    def flaky(self, *a, **k):
        n["links"] += 1
        if n["links"] == 2:
            raise RuntimeError("simulated crash")
        return real(self, *a, **k)

    real_units = DeviceClient.profile_units

    def counted(self, *a, **k):
        n["units"] += 1
        return real_units(self, *a, **k)

    monkeypatch.setattr(DeviceClient, "measure_link", flaky)
    monkeypatch.setattr(DeviceClient, "profile_units", counted)
    kw = dict(context_tokens=8, prefill_tokens=2, repeats=1, cache_dir=cache, progress=False, link_target_s=0.1,
              pings=3)
    with pytest.raises(RuntimeError, match="simulated"):
        profiler.profile(tb, "tiny-llama", state, **kw)
    partial = list(cache.glob("*.partial.jsonl"))
    assert len(partial) == 1
    recs = [json.loads(x) for x in partial[0].read_text().splitlines()]
    # per device one chunk of units and the step probe, then the first link before the crash
    assert sorted(r["id"].split(":")[0] for r in recs) == ["link", "step", "step", "units", "units"]
    units_before = n["units"]
    monkeypatch.setattr(DeviceClient, "measure_step", lambda *a, **k: pytest.fail("step measured twice"))
    pr = profiler.profile(tb, "tiny-llama", state, **kw)
    assert n["units"] == units_before  # nothing measured twice
    assert pr.provenance["cache"]["resumed_measurements"] == 5
    assert not list(cache.glob("*.partial.jsonl"))


def test_chunks_fit_memory():
    units = catalog.get("llama2-7b").units("float32")
    chunks = profiler._chunks(units, 8 * 2**30)
    assert chunks[0][0] == 0 and chunks[-1][1] == len(units)
    for (a, b), (c, _) in zip(chunks, chunks[1:]):
        assert b == c
    for a, b in chunks:
        assert b - a == 1 or sum(u.weight_bytes for u in units[a:b]) <= 4 * 2**30


def test_machines_groups_devices_by_kernel():
    here = profiler._boot_id()
    infos = {"a": {"boot_id": here, "hostname": "me"}, "b": {"boot_id": "other", "hostname": "jetson", "cpu_count": 6},
             "c": {"boot_id": here, "hostname": "me"}, "d": {"hostname": "old"}}
    assert profiler.machines(infos) == [
        {"hostname": "me", "devices": ["a", "c"], "cores": tbm.machine_cores()},
        {"hostname": "jetson", "devices": ["b"], "cores": 6},
        {"hostname": "old", "devices": ["d"], "cores": None}]
