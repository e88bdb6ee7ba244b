"""The DP against brute force: every valid plan enumerated and judged by the same evaluator."""

import itertools
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeshard.config.errors import InfeasibleError
from edgeshard.config.plan import Stage
from edgeshard.config.profile import DeviceCosts, Profile, Unit
from edgeshard.config.testbed import GIB, MBIT_S, Constraints, Device, Link, SharedCores, Testbed
from edgeshard.planning import dp as planner
from edgeshard.planning.costs import CostModel, Workload, objective_value


def brute_force(tb, pr, objective, workload):
    """(best objective value, best latency among those) over every valid plan, or None."""
    cm = CostModel(tb, pr)
    N = pr.n_units
    devs = cm.devices
    best = None
    for cuts_n in range(0, min(N - 1, len(devs) - 1) + 1):
        for cuts in itertools.combinations(range(1, N), cuts_n):
            bounds = (0, *cuts, N)
            others = [d for d in devs if d != tb.source]
            for rest in itertools.permutations(others, cuts_n):
                seq = (tb.source, *rest)
                stages = [Stage(d, a, b) for d, a, b in zip(seq, bounds, bounds[1:])]
                if cm.violations(stages):
                    continue
                p = cm.evaluate(stages, workload)
                key = (objective_value(p, objective), p["latency_s"])
                if best is None or key < best:
                    best = key
    return best


@st.composite
def instances(draw):
    n_dev = draw(st.integers(1, 5))
    n_units = draw(st.integers(1, 7))
    units = tuple(Unit(f"u{i}", draw(st.integers(1, 8)) * 2**27, draw(st.integers(1, 4)) * 1000,
                       draw(st.integers(0, 2)) * 1024) for i in range(n_units))
    names = [f"d{i}" for i in range(n_dev)]
    costs, devices = {}, []
    twin = draw(st.booleans())  # make devices 1.. identical sometimes, to exercise the classes
    base_t = [draw(st.integers(1, 20)) / 1000 for _ in range(n_units)]
    base_mem = draw(st.integers(1, 8)) / 4
    overheads = st.sampled_from([0.0, 0.0, 0.003, 0.011])  # step_overhead_s: often none, else small or large
    base_ov = draw(overheads)
    for i, n in enumerate(names):
        if twin and i >= 1:
            t, mem, ov = base_t, base_mem, base_ov
        else:
            t = [draw(st.integers(1, 20)) / 1000 for _ in range(n_units)]
            mem = draw(st.integers(1, 8)) / 4
            ov = draw(overheads)
        pre = [x / draw(st.sampled_from([4, 16])) for x in t]
        costs[n] = DeviceCosts(tuple(t), tuple(pre), step_overhead_s=ov)
        devices.append(Device(n, int(mem * GIB)))
    links = []
    uniform = draw(st.booleans())
    for a in names:
        for b in names:
            if a != b and (not uniform or draw(st.integers(0, 5)) == 0):
                links.append(Link(a, b, draw(st.sampled_from([1, 10, 100, 1000])) * MBIT_S,
                                  draw(st.integers(0, 5)) / 1000))
    others = names[1:]
    exclude = tuple(x for x in others if draw(st.integers(0, 4)) == 0)
    require = tuple(x for x in others if x not in exclude and draw(st.integers(0, 4)) == 0)
    max_stages = draw(st.one_of(st.none(), st.integers(1, 5)))
    cons = Constraints(context_tokens=draw(st.sampled_from([16, 1024])), sequences=draw(st.integers(1, 2)),
                       memory_headroom=draw(st.sampled_from([0.0, 0.1])), exclude=exclude, require=require,
                       max_stages=max_stages)
    # devices sharing one machine's cores (the source and twins included sometimes): 0-2 disjoint groups
    shared, free = [], list(names)
    for _ in range(draw(st.integers(0, 2))):
        members = [x for x in free if draw(st.booleans())]
        if members:
            free = [x for x in free if x not in members]
            shared.append(SharedCores(tuple(members), draw(st.sampled_from([1, 1.5, 2]))))
    tb = Testbed("rand", "d0", tuple(devices), 100 * MBIT_S, 0.001, tuple(links), cons, shared_cores=tuple(shared))
    pr = Profile("rand", "float32", units, costs)
    wl = Workload(draw(st.integers(1, 64)), draw(st.integers(1, 16)), draw(st.integers(1, 4)))
    return tb, pr, wl


@pytest.mark.parametrize("objective", ["latency", "e2e", "throughput"])
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(inst=instances())
def test_dp_matches_brute_force(objective, inst):
    assert_matches_brute_force(*inst[:2], objective, inst[2])


def assert_matches_brute_force(tb, pr, objective, wl):
    """The DP's plan has brute force's optimum (and, for throughput, its least latency among optima)."""
    truth = brute_force(tb, pr, objective, wl)
    if truth is None:
        with pytest.raises(InfeasibleError):
            planner.solve(tb, pr, objective, wl)
        return
    plan = planner.solve(tb, pr, objective, wl)
    assert plan.feasible, plan.notes
    got = objective_value(plan.predicted, objective)
    assert math.isclose(got, truth[0], rel_tol=1e-9, abs_tol=1e-12), (objective, plan.stages, truth)
    if objective == "throughput":  # ties broken by least latency, exactly
        assert math.isclose(plan.predicted["latency_s"], truth[1], rel_tol=1e-9, abs_tol=1e-12)


def test_identical_devices_form_one_class_and_different_links_split_it():
    units = tuple(Unit(f"u{i}", 2**27, 1000, 0) for i in range(4))
    costs = {n: DeviceCosts((0.01,) * 4, (0.001,) * 4) for n in ["s", "a", "b", "c"]}
    devs = tuple(Device(n, GIB) for n in ["s", "a", "b", "c"])
    tb = Testbed("t", "s", devs)
    pr = Profile("m", "float32", units, costs)
    assert planner.device_classes(CostModel(tb, pr)) == [("s",), ("a", "b", "c")]
    tb2 = tb.with_link("s", "b", bandwidth_mbit_s=5)
    assert planner.device_classes(CostModel(tb2, pr)) == [("s",), ("a", "c"), ("b",)]
    tb3 = tb.with_link("a", "b", bandwidth_mbit_s=5)  # a and b share a slow link: a pair class, c alone
    assert planner.device_classes(CostModel(tb3, pr)) == [("s",), ("a", "b"), ("c",)]
    slow_step = Profile("m", "float32", units, {**costs, "c": DeviceCosts((0.01,) * 4, (0.001,) * 4,
                                                                      step_overhead_s=0.002)})
    assert planner.device_classes(CostModel(tb, slow_step)) == [("s",), ("a", "b"), ("c",)]


@pytest.mark.parametrize("seed", range(12))
def test_dp_matches_brute_force_on_larger_instances(seed):
    """5 devices (two of them twins), 8 units, random links and memory, sometimes cores shared by the twins and
    others: every objective, exactly."""
    import random
    rng = random.Random(seed)
    n_units = 8
    units = tuple(Unit(f"u{i}", rng.randint(1, 6) * 2**27, rng.randint(1, 4) * 4000, rng.randint(0, 2) * 1024)
                  for i in range(n_units))
    names = [f"d{i}" for i in range(5)]
    twin_t = [rng.randint(1, 20) / 1000 for _ in range(n_units)]
    costs, devices = {}, []
    for i, n in enumerate(names):
        t = twin_t if i in (3, 4) else [rng.randint(1, 20) / 1000 for _ in range(n_units)]
        ov = 0.004 if i in (3, 4) else rng.choice([0.0, 0.002, 0.009])
        costs[n] = DeviceCosts(tuple(t), tuple(x / 8 for x in t), step_overhead_s=ov)
        devices.append(Device(n, int((1.5 if i in (3, 4) else rng.randint(2, 8) / 4) * GIB)))
    links = [Link(a, b, rng.choice([1, 10, 100]) * MBIT_S, rng.randint(0, 3) / 1000)
             for a in names for b in names if a != b and {a, b} != {"d3", "d4"} and not {a, b} & {"d3", "d4"}]
    for other in names[:3]:  # twins: identical links to everyone else
        bw, lat = rng.choice([1, 10, 100]) * MBIT_S, rng.randint(0, 3) / 1000
        for tw in ("d3", "d4"):
            links += [Link(other, tw, bw, lat), Link(tw, other, bw, lat)]
    shared = rng.choice([(), (SharedCores(("d0", "d3", "d4"), 2),), (SharedCores(("d1", "d3", "d4"), 1),
                                                                         SharedCores(("d0", "d2"), 1))])
    tb = Testbed("big", "d0", tuple(devices), 100 * MBIT_S, 0.001, tuple(links),
                 Constraints(context_tokens=256, max_stages=rng.choice([None, 3, 4])), shared_cores=shared)
    pr = Profile("big", "float32", units, costs)
    assert [len(c) for c in planner.device_classes(CostModel(tb, pr))].count(2) == 1  # the twins form a class
    wl = Workload(16, 8)
    for objective in ("latency", "e2e", "throughput"):
        assert_matches_brute_force(tb, pr, objective, wl)


def test_shared_cores_split_classes_and_charge_the_dp():
    """Source and twins on one machine of 2 cores, c alone: 8 units of 10 ms. Free, four stages of 2 units give
    20 ms. Shared, a fourth stage puts 3 busy stages on 2 cores (factor 3 / 2): the best is 30 ms either way, and
    the least-latency plan among those uses three devices, as brute force finds."""
    n_units = 8
    units = tuple(Unit(f"u{i}", 2**27, 1000, 0) for i in range(n_units))
    costs = {n: DeviceCosts((0.01,) * n_units, (0.001,) * n_units) for n in ("s", "a", "b", "c")}
    devs = tuple(Device(n, GIB) for n in ("s", "a", "b", "c"))
    plain = Testbed("t", "s", devs)
    shared = plain.replace(shared_cores=(SharedCores(("s", "a", "b"), 2),))
    pr = Profile("m", "float32", units, costs)
    assert planner.device_classes(CostModel(plain, pr)) == [("s",), ("a", "b", "c")]
    assert planner.device_classes(CostModel(shared, pr)) == [("s",), ("a", "b"), ("c",)]
    for objective in ("latency", "throughput"):
        assert_matches_brute_force(shared, pr, objective, Workload(8, 4, 3))
    free = planner.solve(plain, pr, "throughput")
    charged = planner.solve(shared, pr, "throughput")
    assert len(free.stages) == 4 and free.predicted["bottleneck_s"] == pytest.approx(0.020)
    assert len(charged.stages) == 3 and charged.predicted["bottleneck_s"] == pytest.approx(0.030)
    assert "c" in [x.device for x in charged.stages]  # two of the machine's devices and c: no contention
    four = [Stage("s", 0, 2), Stage("a", 2, 4), Stage("b", 4, 6), Stage("c", 6, 8)]
    p = CostModel(shared, pr).evaluate(four, Workload(8, 4, 3))
    assert [x.get("contention", 1.0) for x in p["stages"]] == [1.5, 1.5, 1.5, 1.0]
    assert p["bottleneck_s"] == pytest.approx(0.030)
