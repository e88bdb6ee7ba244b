"""Figures carry the right data: each test reads the ColumnDataSources a figure draws from."""

import math

import pytest
from bokeh.models import ColumnDataSource, LogScale, Span

from edgeshard.config import testbed
from edgeshard.config.plan import diff
from edgeshard.config.profile import Profile
from edgeshard.config.testbed import MBIT_S, Link
from edgeshard.planning import baselines, synthetic
from edgeshard.planning.costs import Workload
from edgeshard.ui import plots

TESTBED = """
name = "lab"
source = "nx1"
cloud = "rtx"

[defaults]
bandwidth_mbit_s = 100
latency_ms = 1

[constraints]
context_tokens = 512

[[device]]
name = "nx1"
memory_gib = 14
kind = "jetson-orin-nx-16gb"

[[device]]
name = "agx"
memory_gib = 29
kind = "jetson-agx-orin-32gb"

[[device]]
name = "rtx"
memory_gib = 22
kind = "rtx-3090-24gb"

[[link]]
src = "nx1"
dst = "rtx"
bandwidth_mbit_s = 10
"""


@pytest.fixture(scope="module")
def setup():
    tb = testbed.loads(TESTBED)
    pr = synthetic.synthetic_profile(tb, "llama2-7b")  # 7B fp32 does not fit the source alone: edge-solo is OOM
    plans = baselines.plan_all(tb, pr, "latency", Workload(32, 16))
    return tb, pr, plans


def source(model, name) -> ColumnDataSource:
    src = model.select_one({"type": ColumnDataSource, "name": name})
    assert src is not None, f"no source named {name!r}"
    return src


def test_plan_figure_one_row_per_stage(setup):
    tb, pr, plans = setup
    plan = plans["edgeshard"]
    fig = plots.plan_figure(plan, tb, pr)
    data = source(fig, "stages").data
    assert [(d, a, b) for d, a, b in zip(data["device"], data["start"], data["stop"])] == \
        [(s.device, s.start, s.stop) for s in plan.stages]
    per = plan.predicted["stages"]
    assert data["decode_ms"] == pytest.approx([s["decode_s"] * 1e3 for s in per])
    assert data["memory_gib"] == pytest.approx([s["memory_bytes"] / 2**30 for s in per])
    wide = [lab for lab, n in zip(data["label"], data["units"]) if n >= pr.n_units / 15]
    assert wide and all("ms" in lab and "GiB" in lab for lab in wide)  # narrow blocks: hover only
    assert list(fig.y_range.factors) == list(reversed(tb.names))  # every device has a lane, first on top
    assert len(source(fig, "hops").data["x"]) == len(plan.stages) - 1
    assert fig.x_range.end == pr.n_units


def test_plan_figure_of_an_oom_baseline_recomputes_costs(setup):
    tb, pr, plans = setup
    solo = plans["edge-solo"]
    assert not solo.feasible and "OOM" in solo.notes[0]
    data = source(plots.plan_figure(solo, tb, pr), "stages").data
    assert data["start"] == [0] and data["stop"] == [pr.n_units]
    assert data["memory_gib"][0] > data["limit_gib"][0]  # the overflow the note talks about
    assert "OOM" in plots.plan_figure(solo, tb, pr).title.text


def test_plan_diff_figure_highlights_moved_ranges(setup):
    tb, pr, plans = setup
    a = plans["edgeshard"]
    b = baselines.plan_with("edgeshard", tb, pr, "throughput", Workload(32, 16))
    layout = plots.plan_diff_figure(a, b, "lat", "thr", tb)
    d = diff(a, b)
    assert d["moved"], "the scenario must move units between the two plans"
    moved = source(layout, "moved").data
    assert list(zip(moved["start"], moved["stop"], moved["from"], moved["to"])) == \
        [(m["start"], m["stop"], m["from"], m["to"]) for m in d["moved"]]
    assert moved["lane_a"][0] == ("lat", d["moved"][0]["from"])
    stages = source(layout, "stages").data
    assert len(stages["start"]) == len(a.stages) + len(b.stages)
    costs = source(layout, "costs").data
    i = costs["metric"].index("latency_s")
    assert costs["delta"][i] == pytest.approx(b.predicted["latency_s"] - a.predicted["latency_s"])


def test_plan_diff_of_identical_plans_moves_nothing(setup):
    tb, pr, plans = setup
    layout = plots.plan_diff_figure(plans["edgeshard"], plans["edgeshard"], testbed=tb)
    assert source(layout, "moved").data["start"] == []


def test_unit_cost_figure_log_scale_per_device(setup):
    tb, pr, _ = setup
    fig = plots.unit_cost_figure(pr)
    assert isinstance(fig.y_scale, LogScale)
    for name in tb.names:
        data = source(fig, f"units:{name}").data
        assert data["ms"] == pytest.approx([x * 1e3 for x in pr.devices[name].decode_s])
        assert data["unit_name"][0] == "embedding"


def test_bandwidth_heatmap_uses_profile_links_first(setup):
    tb, pr, _ = setup
    data = source(plots.bandwidth_heatmap(tb), "links").data
    n = len(tb.names)
    assert len(data["src"]) == n * (n - 1)
    cell = {(s, d): v for s, d, v in zip(data["src"], data["dst"], data["mbit_s"])}
    assert cell[("nx1", "rtx")] == pytest.approx(10) and cell[("rtx", "nx1")] == pytest.approx(10)
    assert cell[("agx", "rtx")] == pytest.approx(100)
    measured = Profile(pr.model, pr.dtype, pr.units, pr.devices, (Link("agx", "rtx", 55 * MBIT_S, 0.002),))
    data = source(plots.bandwidth_heatmap(tb, measured), "links").data
    cell = {(s, d): (v, m) for s, d, v, m in zip(data["src"], data["dst"], data["mbit_s"], data["measured"])}
    assert cell[("agx", "rtx")] == (pytest.approx(55), True)
    assert cell[("rtx", "agx")] == (pytest.approx(100), False)


def test_comparison_figure_marks_oom(setup):
    _, _, plans = setup
    layout = plots.comparison_figure(plans)
    data = source(layout, "compare:latency_s").data
    i = data["strategy"].index("edge-solo")
    assert data["shown"][i] == "OOM" and data["value"][i] == 0.0 and data["feasible"][i] is False
    j = data["strategy"].index("edgeshard")
    assert data["value"][j] == pytest.approx(plans["edgeshard"].predicted["latency_s"] * 1e3)
    rows = plots.comparison_rows(plans)
    assert rows[j]["latency_vs_edgeshard"] == pytest.approx(1.0)
    # the exact plan is never slower than a feasible baseline on its own objective
    assert all(r["latency_vs_edgeshard"] >= 1 - 1e-12 for r in rows if r["feasible"])


def test_sweep_figure_reads_compare_sweep_rows():
    rows = [{"model": m, "bandwidth_mbit_s": bw, "objective": o, "strategy": s, "feasible": v is not None, "value": v,
             "stages": []}
            for m in ("llama2-7b", "llama2-13b") for bw in (1, 10) for o in ("latency", "throughput")
            for s, v in (("edgeshard", 0.05 / bw), ("edge-solo", None))]
    layout = plots.sweep_figure(rows, model="llama2-13b")
    lat = source(layout, "sweep:latency_s:edgeshard").data
    assert lat["x"] == [1, 10] and lat["y"] == pytest.approx([50.0, 5.0])
    thr = source(layout, "sweep:throughput_tokens_per_s:edge-solo").data
    assert all(math.isnan(y) for y in thr["y"])
    assert "llama2-13b" in layout.children[0].title.text


def test_sweep_figure_gaps_for_infeasible_points():
    rows = [{"strategy": s, "bandwidth_mbit_s": bw, "feasible": not (s == "edge-solo" and bw == 10),
             "latency_s": 0.01 * k + 1 / bw, "throughput_tokens_per_s": bw / 10}
            for k, s in enumerate(("edgeshard", "edge-solo")) for bw in (100, 10, 1000)]
    layout = plots.sweep_figure(rows)
    data = source(layout, "sweep:latency_s:edge-solo").data
    assert data["x"] == [10, 100, 1000]  # sorted by bandwidth
    assert math.isnan(data["y"][0]) and data["y"][1] == pytest.approx((0.01 + 0.01) * 1e3)
    assert isinstance(layout.children[0].x_scale, LogScale)


def _events():
    """Hand-made events of a two-stage run (no runtime in this test), metrics.py schema: 4 tokens 20 ms apart;
    step 0 (the prompt) computes longer and is left out of the per-step stage means."""
    ev = []
    for step in range(4):
        t = 1000.0 + 0.02 * step
        pre = 0.05 if step == 0 else 0.0
        ev += [{"type": "compute", "device": "nx1", "seq": 0, "step": step, "start_s": t - pre, "end_s": t + 0.004},
               {"type": "send", "device": "nx1", "peer": "agx", "seq": 0, "step": step, "bytes": 16384,
                "start_s": t + 0.004, "end_s": t + 0.005},
               {"type": "recv", "device": "agx", "peer": "nx1", "seq": 0, "step": step, "bytes": 16384,
                "start_s": t + 0.0055, "end_s": t + 0.006},
               {"type": "compute", "device": "agx", "seq": 0, "step": step, "start_s": t + 0.006, "end_s": t + 0.016},
               {"type": "token", "seq": 0, "step": step, "token_id": 7, "t_s": t + 0.02}]
    return ev


def test_live_run_plot_push(setup):
    tb, pr, plans = setup
    plan = plans["edgeshard"]
    live = plots.LiveRunPlot(plan)
    span = live.latency_figure.select_one({"type": Span})
    assert span.location == pytest.approx(plan.predicted["latency_s"] * 1e3)
    assert live.predicted_stages.data["decode_ms"] == pytest.approx([s["decode_s"] * 1e3 for s in plan.predicted["stages"]])
    rate_span = live.rate_figure.select_one({"type": Span})  # the closed-pipeline prediction for its sequences
    assert rate_span.location == pytest.approx(plan.predicted["pipeline_tokens_per_s"])
    assert f"with {plan.predicted['sequences']} sequence" in live.rate_figure.title.text
    ev = _events()
    ev[7], ev[8] = ev[8], ev[7]  # a recv may arrive before its send: events of two devices interleave
    assert live.push(ev[:10]) == 1  # two tokens: the first has no previous token to measure from
    assert live.push(ev[10:]) == 2
    assert live.count == 4
    assert live.tokens.data["latency_ms"] == pytest.approx([20.0, 20.0, 20.0])
    assert live.rate.data["tokens_per_s"][-1] == pytest.approx(50.0)
    st = live.stages.data
    i, j = st["device"].index("nx1"), st["device"].index("agx")
    assert st["compute_ms"][i] == pytest.approx(4.0)  # step 0's 54 ms prefill left out
    assert st["transfer_ms"][i] == pytest.approx(2.0)  # send start to recv end
    assert st["compute_ms"][j] == pytest.approx(10.0) and st["transfer_ms"][j] == 0.0
    live.push([{"type": "compute", "device": "new", "start_s": 0.0, "end_s": 0.001}])
    assert "new" in live.stage_figure.x_range.factors


def test_live_run_plot_skips_malformed_events():
    live = plots.LiveRunPlot()
    assert live.push([{"type": "token", "seq": 0, "t_s": 1.0}, {"type": "token", "seq": 0, "t_s": "soon"},
                      {"type": "compute", "device": "a", "start_s": None, "end_s": 1.0}, "junk",
                      {"type": "token", "seq": 0, "t_s": 1.5}]) == 1
    assert live.bad_events == 3 and live.tokens.data["latency_ms"] == [pytest.approx(500.0)]


def test_live_run_plot_prefers_reported_latency():
    live = plots.LiveRunPlot()
    live.push([{"type": "token", "seq": 1, "step": 0, "t_s": 5.0, "latency_s": 0.3}])
    assert live.tokens.data["latency_ms"] == [pytest.approx(300.0)]
    assert live.reference.visible is False  # no plan, no reference line


def test_timeline_figure():
    fig = plots.timeline_figure(_events())
    comp, send, tok = (source(fig, n).data for n in ("compute", "send", "tokens"))
    assert len(comp["left"]) == 8 and len(send["left"]) == 4 and len(tok["t"]) == 4
    assert comp["left"][0] == 0.0 and tok["t"][-1] == pytest.approx(0.13)  # from the prefill's start
    assert list(fig.y_range.factors) == ["tokens", "agx", "nx1"]


# --- reference lines in pipeline mode, and the words when a prediction cannot hold ---------------------------
SHARED = TESTBED + '\n[[shared_cores]]\ndevices = ["nx1", "agx", "rtx"]\ncores = 2\n'


def pipeline_case(text=SHARED, provenance=None):
    """A plan for 3 sequences in flight over all three devices, judged by the cost model (on 2 shared cores the
    optimal throughput plan would leave one out: tests/test_shared_cores.py)."""
    from edgeshard.config.plan import Stage
    from edgeshard.planning import dp as planner
    from edgeshard.planning.costs import CostModel

    tb = testbed.loads(text)
    pr = synthetic.synthetic_profile(tb, "llama2-7b")
    if provenance is not None:
        pr = Profile(pr.model, pr.dtype, pr.units, pr.devices, pr.links, provenance)
    stages = [Stage("nx1", 0, 6), Stage("agx", 6, 20), Stage("rtx", 20, 34)]
    plan = planner.make_plan(CostModel(tb, pr), stages, "throughput", "manual", Workload(32, 16, 3))
    assert plan.feasible, plan.notes
    return tb, pr, plan


def test_live_run_plot_pipeline_reference_is_the_pipelines_own():
    """Pipeline mode: tokens/s against the closed-pipeline prediction (shared cores charged), and each sequence's
    per-token latency against sequences / that rate, not the one-sequence latency."""
    from edgeshard.planning.costs import CostModel

    tb, pr, plan = pipeline_case()
    expected = CostModel(tb, pr).evaluate(plan.stages, Workload(32, 16, 3))
    assert expected["shared_cores"][0]["factor"] == 1.5  # 3 busy devices on 2 cores
    for live in (plots.LiveRunPlot(plan, mode="pipeline", sequences=3, testbed=tb, profile=pr),
                 plots.LiveRunPlot(plan)):  # the plan was made for 3 sequences: pipeline by default
        assert live.mode == "pipeline"
        span = live.latency_figure.select_one({"type": Span})
        assert span.location == pytest.approx(3 / expected["pipeline_tokens_per_s"] * 1e3)
        assert span.location != pytest.approx(plan.predicted["latency_s"] * 1e3)
        assert live.rate_reference.location == pytest.approx(expected["pipeline_tokens_per_s"])
        assert "per-token latency per sequence" in live.latency_figure.title.text
        assert "= 3 sequences /" in live.latency_figure.title.text
        assert "with 3 sequences in flight" in live.rate_figure.title.text
        assert not live.why.visible  # declared sharing is charged: nothing known against the prediction
    six = plots.LiveRunPlot(plan, mode="pipeline", sequences=6, testbed=tb, profile=pr)
    rate6 = CostModel(tb, pr).evaluate(plan.stages, Workload(32, 16, 6))["pipeline_tokens_per_s"]
    assert six.rate_reference.location == pytest.approx(rate6)
    assert six.reference.location == pytest.approx(6 / rate6 * 1e3)
    seq = plots.LiveRunPlot(plan, mode="sequential")
    assert seq.reference.location == pytest.approx(plan.predicted["latency_s"] * 1e3)


def test_live_run_plot_says_why_when_cores_are_shared_but_not_declared():
    hosts = {"testbed_mode": "local", "hosts": [{"hostname": "box", "devices": ["nx1", "agx", "rtx"], "cores": 2}]}
    tb, pr, plan = pipeline_case(TESTBED, hosts)
    live = plots.LiveRunPlot(plan, mode="pipeline", sequences=3, testbed=tb, profile=pr)
    assert live.why.visible and "declares no [[shared_cores]]" in live.why.text
    assert "3 of them compute at once" in live.why.text
    assert all(t.visible and "cannot hold" in t.text for t in live.why_titles)
    assert live.why in live.layout.children
    calm = plots.LiveRunPlot(plan, mode="sequential", testbed=tb, profile=pr)  # one sequence: one busy device
    assert not calm.why.visible and not calm.why_titles[0].visible


def test_live_run_plot_says_why_when_measured_deviates():
    tb, pr, plan = pipeline_case()
    ref = plots.run_prediction(plan, "sequential")
    lat = ref["latency_s"]

    def events(scale):
        out = []
        for step in range(1, 12):
            t = 100.0 + step * lat * scale
            for d, s in ref["step_s"].items():
                out.append({"type": "compute", "device": d, "seq": 0, "step": step, "start_s": t, "end_s": t + s * scale})
            out.append({"type": "token", "seq": 0, "step": step, "t_s": t, "latency_s": lat * scale})
        return out

    ok = plots.LiveRunPlot(plan, mode="sequential")
    ok.push(events(1.1))
    assert ok.deviation is None and not ok.why.visible
    slow = plots.LiveRunPlot(plan, mode="sequential")
    slow.push(events(3.0)[:10])  # too few tokens yet to judge
    assert slow.deviation is None
    slow.push(events(3.0)[10:])
    assert slow.why.visible and "+200% off the prediction" in slow.why.text
    assert "took up to 3x their predicted time" in slow.why.text and "less CPU" in slow.why.text
    assert "does not hold" in slow.why_titles[0].text and slow.why_titles[1].visible


def test_deviation_why_words():
    assert plots.deviation_why("latency", 1.0, 1.2) is None
    assert "-50% off" in plots.deviation_why("latency", 1.0, 0.5)
    between = plots.deviation_why("latency", 1.0, 2.0, {"a": 1.05, "b": 0.98})
    assert "kept to their prediction" in between and "between them" in between
