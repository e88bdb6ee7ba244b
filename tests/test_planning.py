"""Cost model by hand, baselines, infeasibility messages, the planning CLI, compare, and import layering."""

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from edgeshard.cli.main import main
from edgeshard.config import testbed as tbm
from edgeshard.config.errors import InfeasibleError, PlanError
from edgeshard.config.plan import Stage
from edgeshard.config.profile import DeviceCosts, Profile, Unit
from edgeshard.planning import baselines, compare
from edgeshard.planning import dp as planner
from edgeshard.planning.costs import CostModel, Workload
from edgeshard.planning.synthetic import synthetic_profile

ROOT = Path(__file__).resolve().parent.parent
TB = """
name = "hand"
source = "s"
cloud = "c"
[defaults]
bandwidth_mbit_s = 8
latency_ms = 1
[[device]]
name = "s"
memory_gib = 1
[[device]]
name = "c"
memory_gib = 1
"""


def hand_case():
    tb = tbm.loads(TB, "hand.toml")
    units = (Unit("embedding", 2**28, 1000, 0), Unit("layer0", 2**28, 1000, 2**10), Unit("head", 2**28, 4000, 0))
    pr = Profile("hand", "float32", units, {"s": DeviceCosts((0.001, 0.010, 0.020), (0.0001, 0.001, 0.002)),
                                             "c": DeviceCosts((0.001, 0.002, 0.003), (0.0001, 0.0002, 0.0003))})
    return tb, pr


def test_cost_model_by_hand():
    tb, pr = hand_case()
    cm = CostModel(tb, pr)
    p = cm.evaluate([Stage("s", 0, 1), Stage("c", 1, 3)], Workload(prompt_tokens=10, new_tokens=5))
    bw = 8e6 / 8  # bytes/s
    hop1 = 1000 / bw + 0.001
    ret = 8 / bw + 0.001
    lat = 0.001 + hop1 + (0.002 + 0.003) + ret
    assert math.isclose(p["latency_s"], lat)
    pre = 10 * 0.0001 + (10 * 1000 / bw + 0.001) + 10 * (0.0002 + 0.0003) + ret
    assert math.isclose(p["e2e_s"], pre + 4 * lat)
    assert math.isclose(p["bottleneck_s"], max(0.001, hop1, 0.005, ret))
    assert math.isclose(p["throughput_tokens_per_s"], 1 / p["bottleneck_s"])
    # KV reserve counts: 1024 tokens x 1 sequence x 1 KiB on the layer
    assert p["stages"][1]["memory_bytes"] == 2 * 2**28 + 1024 * 2**10


def test_step_overhead_counts_in_the_bottleneck_only():
    """A device's step_overhead_s is paid by its pipelined stage every step: it raises the bottleneck (and can move
    the throughput plan) but not latency or e2e (there it is inside the measured link latency; costs.py)."""
    tb, pr = hand_case()
    slow = dataclasses.replace(pr, devices={**pr.devices, "c": dataclasses.replace(pr.devices["c"],
                                                                                   step_overhead_s=0.008)})
    stages = [Stage("s", 0, 1), Stage("c", 1, 3)]
    wl = Workload(prompt_tokens=10, new_tokens=5)
    a, b = CostModel(tb, pr).evaluate(stages, wl), CostModel(tb, slow).evaluate(stages, wl)
    assert (b["latency_s"], b["e2e_s"]) == (a["latency_s"], a["e2e_s"])
    assert b["stages"][1]["pipelined_s"] == 0.005 + 0.008 and math.isclose(b["bottleneck_s"], 0.013)
    # the throughput plan moves: with it c[1, 3) takes 13 ms a step, s[0, 2) + c[2, 3) only max(11, 11) ms
    assert [(x.device, x.start, x.stop) for x in planner.solve(tb, pr, "throughput", wl).stages] == \
        [("s", 0, 1), ("c", 1, 3)]
    assert [(x.device, x.start, x.stop) for x in planner.solve(tb, slow, "throughput", wl).stages] == \
        [("s", 0, 2), ("c", 2, 3)]
    assert planner.solve(tb, slow, "latency", wl).stages == planner.solve(tb, pr, "latency", wl).stages


def test_evaluator_names_every_broken_rule():
    tb, pr = hand_case()
    cm = CostModel(tb, pr)
    with pytest.raises(PlanError) as e:
        cm.evaluate([Stage("c", 0, 2), Stage("c", 2, 3)])
    msg = str(e.value)
    assert "not on the source 's'" in msg and "'c' holds more than one stage" in msg
    assert "the stages end at unit 2" in cm.violations([Stage("s", 0, 2)])[0]


def test_infeasible_names_shortfall_and_cli_exits_2(tmp_path):
    tb, pr = hand_case()
    big = Profile("hand", "float32", tuple(Unit(u.name, 2**30, 1, 0) for u in pr.units), pr.devices)
    with pytest.raises(InfeasibleError, match=r"needs 3\.00 GiB .* the 2 usable devices hold 2\.00 GiB"):
        planner.solve(tb, big)
    (tmp_path / "tb.toml").write_text(TB)
    big.save(tmp_path / "p.json")
    r = subprocess.run([sys.executable, "-m", "edgeshard", "plan", str(tmp_path / "tb.toml"), str(tmp_path / "p.json")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "needs 3.00 GiB" in r.stderr, r.stderr
    one = Profile("hand", "float32", (Unit("embedding", 2 * 2**30, 1, 0),), {"s": DeviceCosts((0.1,), (0.1,)),
                                                                          "c": DeviceCosts((0.1,), (0.1,))})
    with pytest.raises(InfeasibleError, match="unit 0 .* needs 2.00 GiB"):
        planner.solve(tb, one)
    with pytest.raises(InfeasibleError, match="max_stages = 1"):
        planner.solve(tb.with_constraints(require=("c",), max_stages=1), pr)


def test_baselines_judged_by_the_evaluator_and_never_beat_edgeshard():
    tb = tbm.load(ROOT / "testbed_configs" / "paper-latency.toml")
    pr = synthetic_profile(tb, "llama2-7b")
    for objective in ("latency", "e2e", "throughput"):
        plans = baselines.plan_all(tb, pr, objective)
        es = planner.cost(plans["edgeshard"])
        for name, p in plans.items():
            if p.feasible:
                assert planner.cost(p) >= es - 1e-12, name
                assert p.predicted == CostModel(tb, pr).evaluate(p.stages)  # the same evaluator
    p = plans["edge-solo"]
    assert not p.feasible and p.notes[0].startswith("OOM") and "nx-0" in p.notes[0]
    # cloud-edge-opt is the best single cut: check against every cut
    cm = CostModel(tb, pr)
    best = min(cm.evaluate([Stage("nx-0", 0, c), Stage("cloud", c, pr.n_units)])["latency_s"]
               for c in range(1, pr.n_units) if not cm.violations([Stage("nx-0", 0, c), Stage("cloud", c, pr.n_units)]))
    assert math.isclose(baselines.plan_with("cloud-edge-opt", tb, pr).predicted["latency_s"], best)
    g = baselines.plan_with("greedy-fill", tb, pr)
    assert [s.device for s in g.stages] == ["nx-0", "nx-1"]  # in testbed order, each filled up (26.1 GiB in 2 x 14)


def test_plan_cli_json_and_diff(tmp_path, capsys):
    tbp = str(ROOT / "testbed_configs" / "paper-latency.toml")
    assert main(["profile", tbp, "--synthetic", "--model", "llama2-7b", "-o", str(tmp_path / "p.json")]) == 0
    assert main(["plan", tbp, str(tmp_path / "p.json"), "-o", str(tmp_path / "a.json")]) == 0
    out = capsys.readouterr().out
    assert "latency" in out and "nx-1: unused; the best plan using it costs +" in out
    assert main(["plan", tbp, str(tmp_path / "p.json"), "--objective", "throughput", "--json",
                 "-o", str(tmp_path / "b.json")]) == 0
    plan_b = json.loads(capsys.readouterr().out)
    assert plan_b["objective"] == "throughput" and plan_b["stages"][0]["device"] == "nx-0"
    assert main(["plan-diff", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["moved"] and d["costs"]["throughput_tokens_per_s"]["b"] > d["costs"]["throughput_tokens_per_s"]["a"]
    assert main(["plan", tbp, str(tmp_path / "p.json"), "--strategy", "edge-solo"]) == 3
    assert "NOT FEASIBLE: OOM" in capsys.readouterr().out


def test_compare_reproduces_the_papers_qualitative_results():
    tb = tbm.load(ROOT / "testbed_configs" / "paper-edge.toml")
    rows = compare.sweep(tb, bandwidths=(1, 1000))
    pick = lambda m, bw, o, s: next(r for r in rows if (r["model"], r["bandwidth_mbit_s"], r["objective"], r["strategy"]) == (m, bw, o, s))
    # only EdgeShard (and the memory-aware heuristics we add) deploy 70B; the paper's baselines cannot
    for s in compare.PAPER_BASELINES:
        assert not pick("llama2-70b", 1, "latency", s)["feasible"]
    assert pick("llama2-70b", 1, "latency", "edgeshard")["feasible"]
    # never worse than Cloud-Edge-Opt
    for m in ("llama2-7b",):
        for bw in (1, 1000):
            assert pick(m, bw, "latency", "edgeshard")["value"] <= pick(m, bw, "latency", "cloud-edge-opt")["value"]
            assert pick(m, bw, "throughput", "edgeshard")["value"] >= pick(m, bw, "throughput", "cloud-edge-opt")["value"]
    # at 1 Mbit/s to the cloud the latency plan routes around the thin link through edge devices
    low = pick("llama2-7b", 1, "latency", "edgeshard")["stages"]
    assert len(low) >= 3 and low[1][0] != "cloud"
    assert "EdgeShard" in compare.format_table(rows)


def test_planner_imports_neither_torch_nor_rpyc():
    code = ("import sys, edgeshard.planning.dp, edgeshard.planning.baselines, edgeshard.planning.compare, edgeshard.cli.main; "
            "bad = [m for m in ('torch', 'rpyc', 'transformers', 'bokeh') if m in sys.modules]; print(bad)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.stdout.strip() == "[]", r.stdout + r.stderr


def test_thin_wan_to_the_cloud_moves_work_to_the_edge():
    """The paper: at low bandwidth to the cloud EdgeShard uses more edge devices, at high bandwidth more cloud."""
    tb = tbm.load(ROOT / "testbed_configs" / "paper-edge.toml")
    rows = compare.sweep(tb, models=("llama2-7b",), bandwidths=(1, 1000), links="all")
    stages = {r["bandwidth_mbit_s"]: r["stages"] for r in rows if r["strategy"] == "edgeshard" and r["objective"] == "latency"}
    on_cloud = {bw: sum(b - a for d, a, b in st if d == "cloud") for bw, st in stages.items()}
    assert on_cloud[1] == 0 and on_cloud[1000] > 20, stages


def test_explain_unused_devices_with_the_exact_cost_of_one_more():
    tb = tbm.load(ROOT / "testbed_configs" / "paper-latency.toml")
    pr = synthetic_profile(tb, "llama2-7b")
    plan = planner.solve(tb, pr, "latency", explain=True)
    used = {s.device for s in plan.stages}
    assert "nx-1" not in used
    note = next(n for n in plan.notes if n.startswith("nx-1: unused"))
    forced = planner.solve(tb.with_constraints(require=("nx-1",)), pr, "latency")
    assert f"{(forced.predicted['latency_s'] - plan.predicted['latency_s']) * 1000:+.3f} ms/token" in note
    assert "nx-1" in {s.device for s in forced.stages}


def test_closed_pipeline_rate_against_closed_forms():
    """Mean value analysis checked where the answer is known: one sequence is one round trip; K balanced
    exponential stations with N sequences give N / (N + K - 1) of their rate (product form); many sequences
    approach 1 / bottleneck from below; more sequences never lower the rate."""
    from edgeshard.planning.costs import closed_pipeline_rate as rate

    assert math.isclose(rate([0.01, 0.02, 0.005], 0.03, 1), 1 / (0.01 + 0.02 + 0.005 + 0.03))
    for k, n in [(2, 1), (3, 5), (4, 16)]:
        assert math.isclose(rate([0.027] * k, 0.0, n), n / (n + k - 1) / 0.027)
    seq = [rate([0.01, 0.025, 0.02], 0.05, n) for n in range(1, 400)]
    assert all(b >= a * (1 - 1e-12) for a, b in zip(seq, seq[1:]))  # up to rounding once saturated
    assert seq[9] < seq[29] < 1 / 0.025 and math.isclose(seq[-1], 1 / 0.025, rel_tol=1e-9)


def test_plan_predicts_the_pipeline_for_its_sequences_in_flight():
    tb, pr = hand_case()
    cm = CostModel(tb, pr)
    stages = [Stage("s", 0, 1), Stage("c", 1, 3)]
    one = cm.evaluate(stages, Workload(10, 5, sequences=1))
    assert one["sequences"] == 1 and math.isclose(one["pipeline_tokens_per_s"], 1 / one["latency_s"])
    many = cm.evaluate(stages, Workload(10, 5, sequences=64))["pipeline_tokens_per_s"]
    assert one["pipeline_tokens_per_s"] < many <= one["throughput_tokens_per_s"]
    with pytest.raises(ValueError, match="sequences = 0"):
        Workload(10, 5, sequences=0)


def test_hand_written_plan_gets_the_evaluators_predictions(tmp_path, capsys):
    """A plan file with only "stages" (optionally "objective") is read everywhere with strategy "manual";
    `plan --from` fills in its predictions with the one evaluator (costs.CostModel), as for every strategy."""
    from edgeshard.config import plan as planm

    tbp = str(ROOT / "testbed_configs" / "paper-latency.toml")
    tb = tbm.load(tbp)
    pr = synthetic_profile(tb, "llama2-7b")
    pr.save(tmp_path / "p.json")
    stages = [{"device": "nx-0", "start": 0, "stop": 10}, {"device": "cloud", "start": 10, "stop": 34}]
    (tmp_path / "hand.json").write_text(json.dumps({"stages": stages}))
    hand = planm.load(tmp_path / "hand.json")
    assert (hand.strategy, hand.objective, hand.predicted, hand.feasible) == ("manual", "latency", {}, True)
    assert main(["plan", tbp, str(tmp_path / "p.json"), "--from", str(tmp_path / "hand.json"), "--json",
                 "--sequences", "2", "-o", str(tmp_path / "filled.json")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out == json.loads((tmp_path / "filled.json").read_text())
    assert out["strategy"] == "manual" and out["feasible"] and out["stages"] == stages and out["model"] == "llama2-7b"
    want = CostModel(tb, pr).evaluate([Stage(**s) for s in stages], Workload(128, 128, 2))
    assert out["predicted"] == json.loads(json.dumps(want))
    # the objective comes from the file unless given; the workload from the file unless given
    (tmp_path / "thr.json").write_text(json.dumps({"stages": stages, "objective": "throughput"}))
    assert main(["plan", tbp, str(tmp_path / "p.json"), "--from", str(tmp_path / "thr.json")]) == 0
    assert "plan: manual / objective throughput" in capsys.readouterr().out
    assert main(["plan", tbp, str(tmp_path / "p.json"), "--from", str(tmp_path / "filled.json"), "--json",
                 "--objective", "e2e"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["objective"] == "e2e" and again["workload"]["sequences"] == 2
    assert again["predicted"] == out["predicted"]
    # a hand-written plan (no predictions) diffs against a planned one
    assert main(["plan", tbp, str(tmp_path / "p.json"), "-o", str(tmp_path / "es.json")]) == 0
    capsys.readouterr()
    assert main(["plan-diff", str(tmp_path / "hand.json"), str(tmp_path / "es.json")]) == 0
    assert "manual/latency" in capsys.readouterr().out


@pytest.mark.parametrize("stages,reason", [
    ([("nx-0", 0, 34)], "stage nx-0[0, 34) needs 26.10 GiB, nx-0 holds 14.00 GiB"),
    ([("cloud", 0, 34)], "the first stage runs on 'cloud', not on the source 'nx-0'"),
    ([("nx-0", 0, 10), ("cloud", 12, 34)], "stage cloud[12, 34) does not continue at unit 10"),
    ([("nx-0", 0, 10), ("cloud", 10, 30)], "the stages end at unit 30, the model has 34"),
    ([("nx-0", 0, 10), ("tx2", 10, 34)], "device 'tx2' is not in testbed 'paper-latency'"),
    ([("nx-0", 0, 5), ("cloud", 5, 20), ("nx-0", 20, 34)], "device 'nx-0' holds more than one stage"),
], ids=["memory", "source", "gap", "short", "unknown-device", "twice"])
def test_hand_written_plan_breaking_a_rule_is_refused(tmp_path, stages, reason):
    tbp = ROOT / "testbed_configs" / "paper-latency.toml"
    synthetic_profile(tbm.load(tbp), "llama2-7b").save(tmp_path / "p.json")
    (tmp_path / "bad.json").write_text(json.dumps({"stages": [{"device": d, "start": a, "stop": b}
                                                              for d, a, b in stages]}))
    r = subprocess.run([sys.executable, "-m", "edgeshard", "plan", str(tbp), "p.json", "--from", "bad.json"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and r.stdout == "" and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1 and "bad.json: refused" in r.stderr and reason in r.stderr, r.stderr


def test_hand_written_plan_for_another_model_is_refused(tmp_path, capsys):
    tbp = str(ROOT / "testbed_configs" / "paper-latency.toml")
    synthetic_profile(tbm.load(tbp), "llama2-7b").save(tmp_path / "p.json")
    (tmp_path / "x.json").write_text(json.dumps({"model": "llama2-13b", "stages": [
        {"device": "nx-0", "start": 0, "stop": 10}, {"device": "cloud", "start": 10, "stop": 34}]}))
    assert main(["plan", tbp, str(tmp_path / "p.json"), "--from", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err
    assert "x.json: refused: the plan is for model 'llama2-13b'" in err and "'llama2-7b'" in err


def test_baseline_status_is_data():
    """OOM and infeasible are Plan.status values set by the planner and baselines, with the rules as reasons."""
    from edgeshard.config import testbed as tbm_
    from edgeshard.planning import baselines as bl
    from edgeshard.planning.synthetic import synthetic_profile as sp
    tb = tbm_.load(Path(__file__).resolve().parent.parent / "testbed_configs" / "paper-edge.toml")
    pr = sp(tb, "llama2-70b")
    solo = bl.plan_with("edge-solo", tb, pr)
    assert solo.status == "oom" and not solo.feasible and solo.reasons and solo.stages
    best = bl.plan_with("edgeshard", tb, pr)
    assert best.status == "feasible" and best.reasons == ()
    none = bl.plan_with("cloud-edge-even", tb.replace(cloud=None), pr)
    assert none.status == "infeasible" and none.stages == () and "cloud" in none.reasons[0]
