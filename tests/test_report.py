"""The report renders from a run folder alone, works offline, and survives missing files.

The run folders here are hand-made (testbed, plan and synthetic profile from the planner; events and summary
written by this test) because the runtime is not available to this test.
"""

import json
import re

import pytest

from edgeshard.config import testbed
from edgeshard.planning import dp as planner
from edgeshard.planning import synthetic
from edgeshard.planning.costs import CostModel, Workload
from edgeshard.run import metrics
from edgeshard.ui import report

TESTBED = """\
name = "lab"
source = "nx1"
cloud = "rtx"

[defaults]
bandwidth_mbit_s = 100
latency_ms = 1

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
"""
TEXT = "Once upon a time GENERATED-TEXT-MARKER $$x$$ <b>not bold</b>"


def make_run(d, profile=True, events=True, summary=True, env=True):
    d.mkdir(exist_ok=True)
    (d / "testbed.toml").write_text(TESTBED)
    tb = testbed.load(d / "testbed.toml")
    pr = synthetic.synthetic_profile(tb, "llama2-7b")
    if profile:
        pr.save(d / "profile.json")
    plan = planner.solve(tb, pr, "latency", Workload(16, 6))
    plan.save(d / "plan.json")
    if events:  # hand-made: each step runs every stage, sends to the next, then a token arrives
        lines, t = [], 100.0
        ring = [s.device for s in plan.stages]
        for step in range(6):
            for p, dev in enumerate(ring):
                peer = ring[(p + 1) % len(ring)]  # the last stage returns the token id to the source
                common = {"seq": 0, "step": step, "bytes": 16384}
                lines += [{"type": "compute", "device": dev, "seq": 0, "step": step, "start_s": t, "end_s": t + 0.01},
                          {"type": "send", "device": dev, "peer": peer, **common, "start_s": t + 0.01, "end_s": t + 0.011},
                          {"type": "recv", "device": peer, "peer": dev, **common, "start_s": t + 0.0115, "end_s": t + 0.012}]
                t += 0.012
            lines.append({"type": "token", "seq": 0, "step": step, "token_id": 42, "t_s": t})
        (d / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines) + '{"type": "tok')  # cut short
    if summary:  # as runtime.Run writes it: metrics.summarize of the events, plus the results
        out = metrics.summarize(lines) if events else {}
        out.update({"mode": "sequential", "stopped": False, "results": [
            {"prompt": "Tell me a story", "token_ids": [1, 2, 3, 4, 5, 6], "text": TEXT,
             "token_latency_s": [0.2, 0.036, 0.036, 0.037, 0.036, 0.036]}]})
        (d / "summary.json").write_text(json.dumps(out))
    if env:
        (d / "environment.json").write_text(json.dumps({"git_sha": "deadbeef1234", "python": "3.11.7",
                                                        "packages": {"torch": "2.13.0", "transformers": "5.24.0"}}))
        (d / "parameters.json").write_text(json.dumps({"argv": ["edgeshard", "run", "lab.toml", "plan.json"],
                                                       "seed": 1234, "mode": "sequential"}))
    return d


def offline_references(page: str) -> list[str]:
    """Tags that would load something from the network: script/link/img with an http(s) or // address."""
    return re.findall(r"<(?:script|link|img|iframe)\b[^>]*(?:src|href)\s*=\s*[\"']?(?:https?:)?//[^>]*>", page, re.I)


def test_report_is_self_contained_and_complete(tmp_path):
    run = make_run(tmp_path / "run1")
    path = report.render(run)
    assert path == run / "report.html"
    page = path.read_text()
    assert offline_references(page) == []
    assert "bokeh.min.js" in page  # BokehJS inlined
    for needle in ("GENERATED-TEXT-MARKER", "Tell me a story", "deadbeef1234", "transformers", "1234",
                   "edgeshard run lab.toml plan.json",
                   "edge-solo", "cloud-edge-opt", "OOM", "Predicted vs measured", "Token timeline", "profile.json",
                   "skipped 1 unreadable line"):
        assert needle in page, needle
    assert "<b>not bold</b>" not in page  # generated text is escaped, not rendered as HTML


def test_report_without_optional_files(tmp_path):
    run = make_run(tmp_path / "bare", profile=False, events=False, summary=False, env=False)
    page = report.render(run).read_text()
    assert offline_references(page) == []
    assert "summary.json: not in the run folder" in page and "events.jsonl: not in the run folder" in page
    assert "SYNTHETIC profile" in page  # baselines recomputed from the device kinds, and labelled so
    assert "(no results)" in page


def test_report_of_an_empty_folder_still_renders(tmp_path):
    (tmp_path / "empty").mkdir()
    page = report.render(tmp_path / "empty").read_text()
    assert "testbed.toml: not in the run folder" in page and "plan.json: not in the run folder" in page
    with pytest.raises(FileNotFoundError):
        report.render(tmp_path / "missing")


def test_report_summary_latencies_feed_the_plot_without_events(tmp_path):
    run = make_run(tmp_path / "noevents", events=False)
    page = report.render(run, tmp_path / "elsewhere.html").read_text()
    assert "Predicted vs measured" in page and "Token timeline" not in page
    assert not (run / "report.html").exists()
    table = report._predicted_vs_measured(report._Run(run))
    assert "per-token latency, median" in table and "summary.json results" in table


def test_predicted_vs_measured_numbers(tmp_path):
    run = report._Run(make_run(tmp_path / "run2"))
    html = report._predicted_vs_measured(run)
    lat_ms = run.plan.predicted["latency_s"] * 1e3
    # three stages of 12 ms (10 ms compute + 2 ms transfer) per token in the hand-made events
    assert f'per-token latency p50</td><td class="num">{lat_ms:.4g}</td><td class="num">36</td>' in html
    assert '<td class="num">10</td>' in html and '<td class="num">2</td>' in html  # per-stage medians, ms
    assert "sequential: predicted = 1 / latency" in html


def test_comparison_html_marks_oom(tmp_path):
    tb = testbed.loads(TESTBED)
    pr = synthetic.synthetic_profile(tb, "llama2-7b")
    from edgeshard.planning import baselines
    html = report.comparison_html(baselines.plan_all(tb, pr))
    row = re.search(r"<tr class=\"bad\">.*?</tr>", html).group(0)
    assert "edge-solo" in row and "OOM" in row


def test_pipeline_run_is_compared_with_the_prediction_for_its_sequences(tmp_path):
    """A pipeline run with 3 prompts: the table has 1 / bottleneck and the closed-pipeline prediction for 3
    sequences in flight, recomputed from the folder's testbed, profile and plan."""
    d = make_run(tmp_path / "pipe")
    summary = json.loads((d / "summary.json").read_text())
    (d / "summary.json").write_text(json.dumps({**summary, "mode": "pipeline"}))
    (d / "parameters.json").write_text(json.dumps({"mode": "pipeline", "prompts": ["a", "b", "c"], "seed": 1}))
    run = report._Run(d)
    expected = CostModel(run.testbed, run.profile).evaluate(run.plan.stages, Workload(16, 6, 3))
    html = report._predicted_vs_measured(run)
    assert "tokens/s (pipeline: predicted = 1 / bottleneck)" in html
    assert (f'predicted for 3 sequences in flight, costs.closed_pipeline_rate)</td><td class="num">'
            f'{expected["pipeline_tokens_per_s"]:.4g}</td>') in html
    assert expected["pipeline_tokens_per_s"] < expected["throughput_tokens_per_s"]


def pipeline_run(d, provenance=None, p50_scale=None):
    """make_run's folder as a pipeline run of 3 prompts; optionally the profile's provenance replaced and the
    summary's median per-token latency set to p50_scale x the pipeline's per-sequence prediction."""
    from edgeshard.config import profile as profm

    make_run(d)
    if provenance is not None:
        pr = profm.load(d / "profile.json")
        profm.Profile(pr.model, pr.dtype, pr.units, pr.devices, pr.links, provenance).save(d / "profile.json")
    summary = json.loads((d / "summary.json").read_text())
    summary["mode"] = "pipeline"
    (d / "parameters.json").write_text(json.dumps({"mode": "pipeline", "prompts": ["a", "b", "c"], "seed": 1}))
    run = report._Run(d)
    expected = CostModel(run.testbed, run.profile).evaluate(run.plan.stages, Workload(16, 6, 3))
    if p50_scale is not None:
        summary["token_latency_s"]["p50"] = p50_scale * 3 / expected["pipeline_tokens_per_s"]
    (d / "summary.json").write_text(json.dumps(summary))
    return report._Run(d), expected


def test_pipeline_latency_is_compared_with_the_pipelines_per_sequence_prediction(tmp_path):
    """With 3 sequences in flight each sees every third token: its reference is 3 / predicted tokens/s."""
    run, expected = pipeline_run(tmp_path / "pipe", p50_scale=1.1)
    html = report._predicted_vs_measured(run)
    per_seq = 3 / expected["pipeline_tokens_per_s"] * 1e3
    assert (f"per-token latency per sequence (pipeline: predicted = 3 sequences / predicted tokens/s) p50</td>"
            f'<td class="num">{per_seq:.4g}</td>') in html
    assert "reference: pipeline, 3 sequences in flight" in html
    assert "Why the prediction does not hold" not in html  # within 25 %, nothing known against it


def test_report_says_why_when_cores_are_shared_but_not_declared(tmp_path):
    hosts = {"testbed_mode": "local",
             "hosts": [{"hostname": "box", "devices": ["nx1", "agx", "rtx"], "cores": 2}]}
    run, _ = pipeline_run(tmp_path / "shared", provenance=hosts, p50_scale=1.0)
    if len(run.plan.stages) < 3:
        pytest.skip("the plan uses fewer than 3 devices: no 3 busy devices to share 2 cores")
    reasons = report.why_prediction_fails(run)
    assert any("declares no [[shared_cores]]" in r and "3 of them compute at once" in r for r in reasons)
    page = report.render(run.dir).read_text()
    assert "Why the prediction does not hold" in page and "declares no [[shared_cores]]" in page


def test_report_says_why_when_measured_deviates(tmp_path):
    run, _ = pipeline_run(tmp_path / "slow", p50_scale=2.0)
    (reason,) = report.why_prediction_fails(run)
    assert "per-token latency per sequence" in reason and "+100% off the prediction" in reason
    html = report._predicted_vs_measured(run)
    assert '<div class="why">' in html and "+100% off the prediction" in html
    page = report.render(run.dir).read_text()
    assert "+100% off the prediction" in page
