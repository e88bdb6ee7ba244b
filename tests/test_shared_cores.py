"""Devices that share a machine's cores: the testbed's [[shared_cores]], the contention the cost model charges
pipelined stages for, and the words that say when a prediction ignores cores shared but not declared.
(The planner's exactness with shared cores: tests/test_planner_exact.py.)"""

import math
from pathlib import Path

import pytest

from edgeshard.config import testbed as tbm
from edgeshard.config.errors import ConfigError
from edgeshard.config.plan import Stage
from edgeshard.config.profile import DeviceCosts, Profile, Unit
from edgeshard.planning import dp as planner
from edgeshard.planning.costs import CostModel, Workload, closed_pipeline_rate, unmodelled_sharing

ROOT = Path(__file__).resolve().parent.parent
TB = """
name = "box"
source = "s"
[defaults]
bandwidth_mbit_s = 800
latency_ms = 0.5
[[device]]
name = "s"
memory_gib = 1
[[device]]
name = "a"
memory_gib = 1
[[device]]
name = "b"
memory_gib = 1
"""
SHARED = TB + """
[[shared_cores]]
devices = ["s", "a", "b"]
cores = 2
"""


def profile(provenance=None):
    units = tuple(Unit(f"u{i}", 2**26, 1000, 0) for i in range(3))
    costs = {n: DeviceCosts((0.010, 0.020, 0.030), (0.001, 0.002, 0.003), step_overhead_s=0.001)
             for n in ("s", "a", "b")}
    return Profile("m", "float32", units, costs, provenance=provenance or {})


STAGES = [Stage("s", 0, 1), Stage("a", 1, 2), Stage("b", 2, 3)]


def test_testbed_declares_shared_cores_and_writes_auto_as_a_number():
    tb = tbm.loads(SHARED)
    assert tb.shared_cores == (tbm.SharedCores(("s", "a", "b"), 2),)
    assert tb.sharing("a").cores == 2 and tbm.loads(TB).sharing("a") is None
    auto = tbm.loads(SHARED.replace("cores = 2", 'cores = "auto"'))
    assert auto.shared_cores[0].cores == tbm.machine_cores() and auto.shared_cores[0].auto
    assert f"cores = {tbm.machine_cores()}" in tbm.dumps(auto)  # a run folder keeps the number it assumed
    assert tbm.loads(tbm.dumps(auto)).replace(path=None) == auto.replace(path=None)
    assert tbm.loads(SHARED.replace("cores = 2\n", "")).shared_cores[0].cores == tbm.machine_cores()  # default


@pytest.mark.parametrize("table, words", [
    ('devices = ["s", "x"]\ncores = 2', "is not a device of this testbed"),
    ('devices = []\ncores = 2', "is not a non-empty list"),
    ('devices = "s"\ncores = 2', "is not a non-empty list"),
    ('devices = ["s"]\ncores = 0', "must be greater than zero"),
    ('devices = ["s"]\ncores = "many"', "is not a number"),
    ('devices = ["s"]\ncores = 2\nhosts = 1', "unknown key 'hosts'"),
])
def test_shared_cores_errors_name_the_table(table, words):
    with pytest.raises(ConfigError) as e:
        tbm.loads(TB + "\n[[shared_cores]]\n" + table, "x.toml")
    assert "x.toml: shared_cores[0]" in str(e.value) and words in str(e.value)


def test_a_device_shares_one_machine_only():
    text = TB + '\n[[shared_cores]]\ndevices = ["s", "a"]\ncores = 1\n[[shared_cores]]\ndevices = ["a"]\ncores = 1\n'
    with pytest.raises(ConfigError, match="device 'a' is also in shared_cores\\[0\\]"):
        tbm.loads(text)


def test_local_toml_declares_this_machines_cores():
    tb = tbm.load(ROOT / "testbed_configs" / "local.toml")
    assert tb.shared_cores[0].devices == tb.names and tb.shared_cores[0].cores == tbm.machine_cores()


def test_contention_cost_by_hand():
    """Three stages of 11, 21 and 31 ms pipelined (decode + 1 ms step overhead) on 2 shared cores: each busy stage
    gets 2/3 of a core, so each costs 3/2 of its time in the pipeline; one sequence is never charged."""
    free, shared = CostModel(tbm.loads(TB), profile()), CostModel(tbm.loads(SHARED), profile())
    assert shared.contention(["s", "a", "b"]) == {"s": 1.5, "a": 1.5, "b": 1.5}
    assert shared.contention(["s", "a", "b"], 2) == {"s": 1.0, "a": 1.0, "b": 1.0}  # two busy fit two cores
    assert shared.contention(["s", "a"]) == {"s": 1.0, "a": 1.0}
    wl = Workload(8, 4, 3)
    p, q = shared.evaluate(STAGES, wl), free.evaluate(STAGES, wl)
    for key in ("latency_s", "e2e_s", "prefill_s"):  # one sequence keeps one device busy at a time
        assert p[key] == q[key]
    assert [s["contention"] for s in p["stages"]] == [1.5, 1.5, 1.5]
    assert [s["contended_s"] for s in p["stages"]] == pytest.approx([0.0165, 0.0315, 0.0465])
    assert p["bottleneck_s"] == pytest.approx(0.031 * 1.5) and q["bottleneck_s"] == pytest.approx(0.031)
    assert p["throughput_tokens_per_s"] == pytest.approx(1 / (0.031 * 1.5))
    assert p["shared_cores"] == [{"devices": ["s", "a", "b"], "cores": 2, "busy": 3, "factor": 1.5,
                                  "factor_all_busy": 1.5}]
    assert "shared_cores" not in q
    # the closed pipeline: capped at the slowest contended stage (here below the uncharged rate)
    assert q["pipeline_tokens_per_s"] > 1 / (0.031 * 1.5)
    assert p["pipeline_tokens_per_s"] == pytest.approx(1 / (0.031 * 1.5))


def test_contention_depends_on_the_sequences_in_flight():
    free, shared = CostModel(tbm.loads(TB), profile()), CostModel(tbm.loads(SHARED), profile())
    for n in (1, 2):  # at most two busy: they fit the two cores, the prediction is the uncharged one
        assert shared.evaluate(STAGES, Workload(8, 4, n))["pipeline_tokens_per_s"] == \
            free.evaluate(STAGES, Workload(8, 4, n))["pipeline_tokens_per_s"]
    one = shared.evaluate(STAGES, Workload(8, 4, 1))
    assert one["shared_cores"][0]["busy"] == 1 and one["shared_cores"][0]["factor"] == 1.0
    many = shared.evaluate(STAGES, Workload(8, 4, 64))
    assert many["pipeline_tokens_per_s"] == pytest.approx(many["throughput_tokens_per_s"])  # 1 / bottleneck


def test_two_of_three_shared_devices_fit_two_cores():
    shared = CostModel(tbm.loads(SHARED), profile())
    p = shared.evaluate([Stage("s", 0, 2), Stage("a", 2, 3)], Workload(8, 4, 3))
    assert [s["contention"] for s in p["stages"]] == [1.0, 1.0]
    assert p["bottleneck_s"] == pytest.approx(0.031)


def test_the_throughput_plan_avoids_contention_when_that_is_cheaper():
    """Three units of 20 ms (+1 ms step overhead per stage). Free, three stages give 21 ms. On one shared core,
    three busy stages cost 3 x 21 = 63 ms and two 2 x 41 = 82 ms: the whole model on the source, 61 ms, wins."""
    pr = profile()
    pr = Profile(pr.model, pr.dtype, pr.units, {n: DeviceCosts((0.02,) * 3, (0.002,) * 3, step_overhead_s=0.001)
                                                for n in ("s", "a", "b")})
    free = planner.solve(tbm.loads(TB), pr, "throughput", Workload(8, 4, 3))
    one_core = planner.solve(tbm.loads(SHARED.replace("cores = 2", "cores = 1")), pr, "throughput", Workload(8, 4, 3))
    assert len(free.stages) == 3 and free.predicted["bottleneck_s"] == pytest.approx(0.021)
    assert one_core.stages == (Stage("s", 0, 3),) and one_core.predicted["bottleneck_s"] == pytest.approx(0.061)
    two_cores = planner.solve(tbm.loads(SHARED), pr, "throughput", Workload(8, 4, 3))
    assert len(two_cores.stages) == 3 and two_cores.predicted["bottleneck_s"] == pytest.approx(0.0315)


def test_closed_pipeline_rate_is_unchanged_without_shared_cores():
    p = CostModel(tbm.loads(TB), profile()).evaluate(STAGES, Workload(8, 4, 3))
    assert "contention" not in p["stages"][0]
    hop = 1000 / (800e6 / 8)
    servers = [0.011, hop, 0.021, hop, 0.031, 8 / (800e6 / 8)]
    assert math.isclose(p["pipeline_tokens_per_s"], closed_pipeline_rate(servers, 0.0015, 3))


def hosts(cores=2, devices=("s", "a", "b"), mode="local"):
    return {"testbed_mode": mode, "hosts": [{"hostname": "box", "devices": list(devices), "cores": cores}]}


def test_unmodelled_sharing_says_why_in_words():
    cm = CostModel(tbm.loads(TB), profile(hosts()))
    (why,) = unmodelled_sharing(cm, STAGES, 3)
    assert "s, a and b run on one machine (box, 2 cores)" in why
    assert "declares no [[shared_cores]]" in why and "3 of them compute at once" in why
    assert unmodelled_sharing(cm, STAGES, 2) == []  # two busy on two cores: nothing to charge
    assert unmodelled_sharing(cm, STAGES[:2], 3) == []
    assert unmodelled_sharing(CostModel(tbm.loads(SHARED), profile(hosts())), STAGES, 3) == []  # declared
    too_many = CostModel(tbm.loads(SHARED.replace("cores = 2", "cores = 4")), profile(hosts()))
    (why,) = unmodelled_sharing(too_many, STAGES, 3)
    assert "declares 4 shared cores" in why and "has 2" in why
    unknown = unmodelled_sharing(CostModel(tbm.loads(TB), profile(hosts(cores=None))), STAGES, 3)
    assert "cores unknown" in unknown[0]
    assert unmodelled_sharing(CostModel(tbm.loads(TB), profile()), STAGES, 3) == []  # no host information


def test_throttled_emulated_devices_do_not_want_whole_cores():
    throttled = TB.replace('name = "a"\n', 'name = "a"\ncpu_share = 0.3\n').replace(
        'name = "b"\n', 'name = "b"\ncpu_share = 0.3\n').replace('name = "s"\n', 'name = "s"\ncpu_share = 0.3\n')
    cm = CostModel(tbm.loads(throttled), profile(hosts(mode="emulated")))
    assert unmodelled_sharing(cm, STAGES, 3) == []  # 0.9 of a core wanted, 2 there
    local = CostModel(tbm.loads(throttled), profile(hosts(mode="local")))  # not enforced locally: whole cores
    assert len(unmodelled_sharing(local, STAGES, 3)) == 1
