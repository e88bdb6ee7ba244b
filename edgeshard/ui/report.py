"""A run folder -> one self-contained HTML report (bokeh INLINE resources: no network when opened).

Reads only the folder: testbed.toml, plan.json, and where present profile.json, parameters.json,
environment.json, events.jsonl, summary.json. A missing or unreadable file becomes a note in the report,
never an exception, so a crashed run still gets a report of what it left behind.
Baselines are recomputed from the saved testbed + profile with the same evaluator as the plan.
"""

from __future__ import annotations

import html
import json
import shlex
import statistics
from pathlib import Path

from bokeh.embed import file_html
from bokeh.layouts import column
from bokeh.models import Div, InlineStyleSheet, TabPanel, Tabs
from bokeh.resources import INLINE

from edgeshard.planning.costs import CostModel, Workload
from edgeshard.ui import plots

WIDTH = 1000
CSS = """
:host { font-family: sans-serif; font-size: 13px; }
table { border-collapse: collapse; margin: 4px 0 10px 0; }
th, td { border: 1px solid #ccc; padding: 2px 8px; text-align: left; vertical-align: top; }
th { background: #f0f0f0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.bad td { color: #a00; }
pre { white-space: pre-wrap; background: #f7f7f7; padding: 6px; margin: 4px 0; }
h1 { font-size: 22px; margin: 8px 0; } h2 { font-size: 17px; margin: 18px 0 4px 0; border-bottom: 1px solid #ccc; }
.note { color: #666; }
.why { color: #a00; border-left: 3px solid #a00; padding-left: 8px; }
"""


# --- small HTML helpers (shared with widgets.py) -------------------------------------------------------------
def _cell(v, fmt: str | None = None) -> str:
    if isinstance(v, float):
        if v != v:
            return '<td class="num">-</td>'
        return f'<td class="num">{format(v, fmt or ".4g")}</td>'
    if isinstance(v, bool) or v is None:
        return f"<td>{html.escape(str(v))}</td>"
    if isinstance(v, int):
        return f'<td class="num">{v}</td>'
    if isinstance(v, (dict, list)):
        return f"<td><code>{html.escape(json.dumps(v, sort_keys=True))}</code></td>"
    return f"<td>{html.escape(str(v))}</td>"


def html_table(rows: list[dict], columns: list[tuple] | None = None, bad=None) -> str:
    """rows of dicts -> <table>; columns: [(key, title[, format spec])]; bad(row) -> True marks a row red."""
    if not rows:
        return '<p class="note">(none)</p>'
    if columns is None:
        columns = [(k, k) for k in rows[0]]
    head = "".join(f"<th>{html.escape(c[1])}</th>" for c in columns)
    body = []
    for r in rows:
        cls = ' class="bad"' if bad is not None and bad(r) else ""
        body.append(f"<tr{cls}>" + "".join(_cell(r.get(c[0]), c[2] if len(c) > 2 else None) for c in columns) + "</tr>")
    return f'<table class="es-table"><tr>{head}</tr>{"".join(body)}</table>'


# for tables shown outside the report (notebook HTML widgets), where CSS above does not reach
TABLE_STYLE = ("<style>.es-table{border-collapse:collapse}.es-table th,.es-table td{border:1px solid #ccc;"
               "padding:2px 8px;text-align:left}.es-table th{background:#f0f0f0}.es-table td.num{text-align:right}"
               ".es-table tr.bad td{color:#a00}</style>")


def kv_table(d: dict, prefix: str = "") -> str:
    """A flat key/value table of a (nested) dict."""
    rows = [{"key": k, "value": v} for k, v in _flatten(d, prefix)]
    return html_table(rows, [("key", "key"), ("value", "value")])


def _flatten(d, prefix=""):
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            yield from _flatten(v, key + ".")
        else:
            yield key, v


COMPARISON_COLUMNS = [("strategy", "strategy"), ("status", "status"), ("devices", "stages (devices)"),
                      ("cuts", "unit ranges"), ("latency_ms", "latency ms/token", ".4g"),
                      ("throughput_tokens_per_s", "tokens/s", ".4g"), ("e2e_s", "end-to-end s", ".4g"),
                      ("latency_vs_edgeshard", "latency / edgeshard", ".3f"),
                      ("throughput_vs_edgeshard", "tokens/s / edgeshard", ".3f")]


def comparison_html(plans_or_rows) -> str:
    """The strategy comparison table; infeasible strategies marked OOM (or n/a) in red with their note."""
    rows = plots.comparison_rows(plans_or_rows) if isinstance(plans_or_rows, dict) else list(plans_or_rows)
    shown = []
    for r in rows:
        r = dict(r)
        r["status"] = "ok" if r["feasible"] else plots._status_short(r)
        if not r["feasible"]:
            r["devices"], r["cuts"] = r.get("note", ""), ""
        r["latency_ms"] = r["latency_s"] * 1e3
        shown.append(r)
    return html_table(shown, COMPARISON_COLUMNS, bad=lambda r: not r["feasible"])


def result_text_html(results: list[dict]) -> str:
    parts = []
    for i, r in enumerate(results):
        n = len(r.get("token_ids", []) or [])
        parts.append(f"<p><b>prompt {i}</b>: <code>{html.escape(str(r.get('prompt', '')))}</code> "
                     f"({n} tokens generated)</p><pre>{html.escape(str(r.get('text', '')))}</pre>")
    return "".join(parts) or '<p class="note">(no results)</p>'


# --- reading the run folder ---------------------------------------------------------------------------------
class _Run:
    """The files of one run folder, each None when missing or unreadable (with a note saying why)."""

    def __init__(self, run_dir: Path):
        from edgeshard.config import plan as plan_mod
        from edgeshard.config import profile as profile_mod
        from edgeshard.config import testbed as testbed_mod
        from edgeshard.config.errors import EdgeshardError
        self.dir = run_dir
        self.notes: list[str] = []

        def load(name, loader):
            path = run_dir / name
            if not path.exists():
                self.notes.append(f"{name}: not in the run folder")
                return None
            try:
                return loader(path)
            except (EdgeshardError, OSError, ValueError) as e:
                self.notes.append(f"{name}: could not be read: {e}")
                return None

        self.testbed = load("testbed.toml", testbed_mod.load)
        self.profile = load("profile.json", profile_mod.load)
        self.plan = load("plan.json", plan_mod.load)
        self.parameters = load("parameters.json", _json)
        self.environment = load("environment.json", _json)
        self.summary = load("summary.json", _json)
        self.events = load("events.jsonl", self._events) or []

    def _events(self, path: Path) -> list[dict]:
        out, bad = [], 0
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            try:
                e = json.loads(line)
            except json.JSONDecodeError:
                bad += 1  # a run killed mid-write leaves a partial last line
                continue
            if isinstance(e, dict):
                out.append(e)
        if bad:
            self.notes.append(f"events.jsonl: skipped {bad} unreadable line(s)")
        return out


def _json(path: Path):
    return json.loads(path.read_text())


def _div(text: str) -> Div:
    # a stylesheet per Div: a bokeh model belongs to one document, and each render makes a new one
    return Div(text=text, width=WIDTH, stylesheets=[InlineStyleSheet(css=CSS)], disable_math=True)  # "$" in generated text must not fetch MathJax


def _h2(title: str, body: str = "") -> Div:
    return _div(f"<h2>{html.escape(title)}</h2>{body}")


def _results(run: _Run) -> list[dict]:
    s = run.summary if isinstance(run.summary, dict) else {}
    res = s.get("results", [])
    return [r for r in res if isinstance(r, dict)] if isinstance(res, list) else []


def _token_events(run: _Run) -> list[dict]:
    """Token events from events.jsonl, or rebuilt from summary.json's per-token latencies when absent."""
    if any(plots.event_type(e) == "token" for e in run.events):
        return run.events
    out = []
    for i, r in enumerate(_results(run)):
        t = 0.0
        for j, lat in enumerate(r.get("token_latency_s") or []):
            t += lat
            out.append({"type": "token", "seq": i, "step": j, "t_s": t, "latency_s": lat})
    return out + run.events


def _stat(summary: dict, key: str, field: str):
    v = summary.get(key)
    v = v.get(field) if isinstance(v, dict) else None
    return v if isinstance(v, (int, float)) else None


def _per_stage_measured(events: list[dict]) -> dict:
    """device -> lists of decode-step compute times and of message times (send start to recv end), from events."""
    out: dict = {}
    sends = {}
    for e in events:
        kind = plots.event_type(e)
        try:
            if e.get("step", 1) == 0:
                continue  # the prompt step: compare decode steps with the plan's per-token decode
            if kind == "compute":
                out.setdefault(e["device"], {"compute": [], "transfer": []})["compute"].append(e["end_s"] - e["start_s"])
            elif kind == "send":
                sends[(e["device"], e.get("peer"), e.get("seq"), e.get("step"))] = e
        except (KeyError, TypeError, AttributeError):
            continue
    recvs = {(e.get("peer"), e.get("device"), e.get("seq"), e.get("step")): e for e in events
             if isinstance(e, dict) and plots.event_type(e) == "recv"}
    for key, snd in sends.items():
        end = recvs[key]["end_s"] if key in recvs else snd["end_s"]
        out.setdefault(snd["device"], {"compute": [], "transfer": []})["transfer"].append(end - snd["start_s"])
    return out


def _plan_workload(plan, sequences: int | None = None) -> Workload:
    """The workload a plan was made for (plan.json "workload"; costs.Workload's defaults where a key is missing),
    with `sequences` in flight instead of the plan's when given."""
    w = plan.workload or {}
    return Workload(int(w.get("prompt_tokens", 128)), int(w.get("new_tokens", 128)),
                    int(sequences if sequences is not None else w.get("sequences", 1)))


def _mode_and_sequences(run: _Run) -> tuple[str | None, int | None]:
    """The run's mode and sequences in flight (pipeline: its prompts, at most max_in_flight; sequential: 1)."""
    summary = run.summary if isinstance(run.summary, dict) else {}
    params = run.parameters if isinstance(run.parameters, dict) else {}
    mode = summary.get("mode") or params.get("mode")
    n = len(params.get("prompts") or []) or None
    limit = params.get("max_in_flight")
    if mode == "pipeline" and n and isinstance(limit, int) and limit > 0:
        n = min(n, limit)
    return mode, (1 if mode == "sequential" else n)


def _reference(run: _Run) -> dict | None:
    """plots.run_prediction for this run: its mode and sequences, recomputed from the folder's testbed and profile."""
    mode, n = _mode_and_sequences(run)
    return plots.run_prediction(run.plan, mode if mode in ("sequential", "pipeline") else None, n, run.testbed,
                                run.profile)


def why_prediction_fails(run: _Run, ref: dict | None = None) -> list[str]:
    """Why the run's prediction cannot hold or did not, in words: what is known against it beforehand
    (plots.run_prediction's "why": cores shared but not declared, other sequences than predicted for), and a
    measured median per-token latency more than plots.DEVIATION off it, with what the compute steps say."""
    ref = ref if ref is not None else _reference(run)
    if ref is None:
        return []
    out = list(ref["why"])
    summary = run.summary if isinstance(run.summary, dict) else {}
    p50 = _stat(summary, "token_latency_s", "p50")
    if p50 is None:
        lats = [x for r in _results(run) for x in (r.get("token_latency_s") or [])[1:] if isinstance(x, (int, float))]
        p50 = statistics.median(lats) if lats else None
    meas = _per_stage_measured(run.events)
    ratios = {d: statistics.median(m["compute"]) / ref["step_s"][d] for d, m in meas.items()
              if m["compute"] and ref["step_s"].get(d)}
    what = ("per-token latency per sequence" if ref["mode"] == "pipeline" else "per-token latency")
    if p50 is not None and ref.get("latency_s"):
        what += f" (p50 {p50 * 1e3:.3g} ms against {ref['latency_s'] * 1e3:.3g} ms)"
        dev = plots.deviation_why(what, ref["latency_s"], p50, ratios, ref["charged"])
        if dev:
            out.append(dev)
    return out


def _why_html(reasons: list[str]) -> str:
    if not reasons:
        return ""
    return ('<div class="why"><p><b>Why the prediction does not hold</b></p><ul>'
            + "".join(f"<li>{html.escape(r)}</li>" for r in reasons) + "</ul></div>")


def _predicted_vs_measured(run: _Run) -> str:
    """Plan prediction against summary.json (metrics.summarize) and events.jsonl, each row saying its source."""
    pred = run.plan.predicted if run.plan is not None and run.plan.feasible else {}
    summary = run.summary if isinstance(run.summary, dict) else {}
    nan = float("nan")
    params = run.parameters if isinstance(run.parameters, dict) else {}
    mode = summary.get("mode") or params.get("mode")
    lat = pred.get("latency_s")
    ref = _reference(run) if pred else None
    if ref is not None and ref["mode"] == "pipeline" and ref.get("latency_s"):
        lat = ref["latency_s"]  # what one sequence sees with the others in flight: N / predicted tokens/s
    rows = []

    def add(what, p, m, unit="ms", scale=1e3, source="summary.json"):
        if m is None:
            return
        rows.append({"quantity": what, "predicted": p * scale if p else nan, "measured": m * scale, "unit": unit,
                     "ratio": m / p if p else nan, "measured from": source})

    per_seq = ref is not None and ref["mode"] == "pipeline"
    label = (f"per-token latency per sequence (pipeline: predicted = {ref['sequences']} sequences / predicted "
             "tokens/s)") if per_seq else "per-token latency"
    p50 = _stat(summary, "token_latency_s", "p50")
    if p50 is None:  # an older summary: per-token latencies of the results, first token (prefill) left out
        lats = [x for r in _results(run) for x in (r.get("token_latency_s") or [])[1:] if isinstance(x, (int, float))]
        add(f"{label}, median", lat, statistics.median(lats) if lats else None, source="summary.json results")
    else:
        add(f"{label} p50", lat, p50)
        add(f"{label} p95", lat, _stat(summary, "token_latency_s", "p95"))
    pipelined = mode == "pipeline"
    measured_tps = summary.get("tokens_per_s") if isinstance(summary.get("tokens_per_s"), (int, float)) else None
    add("tokens/s" + (" (pipeline: predicted = 1 / bottleneck)" if pipelined else " (sequential: predicted = 1 / latency)"),
        pred.get("throughput_tokens_per_s") if pipelined else (1 / lat if lat else None), measured_tps,
        unit="tokens/s", scale=1.0)
    n_seq = _mode_and_sequences(run)[1] or 0
    if pipelined and n_seq and pred and run.testbed is not None and run.profile is not None:
        # the plan's closed-pipeline prediction for as many sequences in flight as this run had
        piped = CostModel(run.testbed, run.profile).evaluate(run.plan.stages, _plan_workload(run.plan, n_seq),
                                                             check=False)
        add(f"tokens/s (pipeline: predicted for {n_seq} sequences in flight, costs.closed_pipeline_rate)",
            piped["pipeline_tokens_per_s"], measured_tps, unit="tokens/s", scale=1.0)
    add(f"first token (predicted: prefill of the plan's {run.plan.workload.get('prompt_tokens', '?') if run.plan else '?'}"
        "-token workload)", pred.get("prefill_s"), _stat(summary, "first_token_latency_s", "p50"))
    cols = [("quantity", "quantity"), ("predicted", "predicted", ".4g"), ("measured", "measured", ".4g"), ("unit", "unit"),
            ("ratio", "measured / predicted", ".3f"), ("measured from", "measured from")]
    body = (f"<p>reference: {html.escape(ref['basis'])}</p>" if ref else "") + html_table(rows, cols)
    body += _why_html(why_prediction_fails(run, ref)) if ref else ""
    per = {s["device"]: s for s in pred.get("stages", [])}
    meas = _per_stage_measured(run.events)
    if per and meas:
        stage_rows = []
        step_s = ref["step_s"] if ref else {}
        for d, s in per.items():
            m = meas.get(d, {"compute": [], "transfer": []})
            stage_rows.append({
                "device": d, "units": f"[{s['start']}, {s['stop']})",
                "pred_compute": step_s.get(d, s["decode_s"]) * 1e3,
                "compute": statistics.median(m["compute"]) * 1e3 if m["compute"] else nan,
                # the last stage's "hop" is the token id's return to the source
                "pred_hop": s.get("hop_s", pred.get("return_s", nan) if d == list(per)[-1] else nan) * 1e3,
                "transfer": statistics.median(m["transfer"]) * 1e3 if m["transfer"] else nan})
        body += ("<p>per stage, decode steps (events.jsonl medians; transfer = send start to recv end"
                 + ("; predicted compute includes the shared-cores charge" if any(
                     s.get("contention", 1.0) > 1 for s in per.values()) and per_seq else "")
                 + ")</p>") + html_table(
            stage_rows, [("device", "device"), ("units", "units"), ("pred_compute", "predicted compute ms", ".4g"),
                         ("compute", "measured compute ms", ".4g"), ("pred_hop", "predicted hop (or return) ms", ".4g"),
                         ("transfer", "measured transfer ms", ".4g")])
    metrics = {k: v for k, v in summary.items() if k not in ("results", "plan_predicted", "stages")}
    if metrics:
        body += "<details><summary>all of summary.json</summary>" + kv_table(metrics) + "</details>"
    return body


def _testbed_html(tb) -> str:
    devs = [{"name": d.name, "role": "source" if d.name == tb.source else ("cloud" if d.name == tb.cloud else ""),
             "host": d.host, "port": d.port, "memory_gib": d.memory_gib, "kind": d.kind or "",
             "cpu_share": d.cpu_share if d.cpu_share is not None else "",
             "excluded": d.name in tb.constraints.exclude, "required": d.name in tb.constraints.require} for d in tb.devices]
    c = tb.constraints
    cons = {"context_tokens": c.context_tokens, "sequences": c.sequences, "memory_headroom": c.memory_headroom,
            "max_stages": c.max_stages, "default bandwidth Mbit/s": tb.default_bandwidth_bytes_s / plots.MBIT_S,
            "default latency ms": tb.default_latency_s * 1e3}
    links = [{"src": lk.src, "dst": lk.dst, "bandwidth_mbit_s": lk.bandwidth_mbit_s, "latency_ms": lk.latency_s * 1e3}
             for lk in tb.links]
    return (f"<p>testbed <b>{html.escape(tb.name)}</b></p>" + html_table(devs) + "<p>constraints and defaults</p>"
            + kv_table(cons) + "<p>explicit links (other pairs use the defaults)</p>" + html_table(links))


def _baselines(run: _Run, profile, label: str):
    """Comparison table, bars and one diff per baseline against the run's plan."""
    from edgeshard.planning import baselines

    workload = _plan_workload(run.plan)
    plans = baselines.plan_all(run.testbed, profile, run.plan.objective, workload)
    items = [_h2(f"Plan against baselines ({run.plan.objective}, {label})",
                 comparison_html(plans) + '<p class="note">run = the plan this run executed; the table recomputes '
                 'every strategy from the saved testbed and profile with the same cost model.</p>'),
             plots.comparison_figure(plans, ("latency_s", "throughput_tokens_per_s", "e2e_s"), width=330)]
    tabs = []
    for name, p in plans.items():
        if p.stages and sum(s.stop - s.start for s in p.stages) == sum(s.stop - s.start for s in run.plan.stages):
            tabs.append(TabPanel(child=plots.plan_diff_figure(p, run.plan, name, "run", run.testbed, width=WIDTH - 40),
                                 title=f"{name} -> run"))
    if tabs:
        items += [_div("<p>What the run's plan moved relative to each baseline (hatched: moved units):</p>"),
                  Tabs(tabs=tabs, width=WIDTH)]
    return items


# what a reader needs to reproduce the run, shown first; the whole files follow, folded
PARAMETER_KEYS = ("command", "argv", "model", "mode", "seed", "seeds", "prompts", "max_new_tokens", "dtype", "temperature",
                  "top_p", "chat")
ENVIRONMENT_KEYS = ("git_sha", "git_dirty", "edgeshard", "python", "torch", "transformers", "numpy", "rpyc", "platform",
                    "hostname")


def _environment_html(run: _Run) -> str:
    key_rows = []
    for name, data, keys in (("parameters.json", run.parameters, PARAMETER_KEYS),
                             ("environment.json", run.environment, ENVIRONMENT_KEYS)):
        if isinstance(data, dict):
            for k in keys:
                if k in data:
                    v = data[k]
                    if k in ("command", "argv") and isinstance(v, list):
                        v = shlex.join(str(x) for x in v)
                    key_rows.append({"key": k, "value": v, "from": name})
    out = html_table(key_rows, [("key", "key"), ("value", "value"), ("from", "file")]) if key_rows else ""
    for name, data in (("parameters.json", run.parameters), ("environment.json", run.environment)):
        if data is not None:
            body = kv_table(data) if isinstance(data, dict) else f"<pre>{html.escape(json.dumps(data))}</pre>"
            out += f"<details><summary>all of {name}</summary>{body}</details>"
    return out or '<p class="note">(no parameters.json or environment.json)</p>'


def render(run_dir, out: str | Path | None = None) -> Path:
    """Write run_dir/report.html (or `out`) and return its path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: not a run folder (expected a directory with plan.json, events.jsonl, ...)")
    run = _Run(run_dir)
    plan, tb = run.plan, run.testbed
    title = f"edgeshard run {run_dir.name}"
    head = f"<h1>{html.escape(title)}</h1><p>"
    if plan is not None:
        head += (f"model <b>{html.escape(plan.model)}</b>, strategy <b>{html.escape(plan.strategy)}</b>, objective "
                 f"<b>{html.escape(plan.objective)}</b>, workload {html.escape(json.dumps(plan.workload))}")
    head += "</p>"
    items = [_div(head), _h2("Generated text", result_text_html(_results(run)))]

    items.append(_h2("Predicted vs measured", _predicted_vs_measured(run)))
    token_events = _token_events(run)
    if token_events:
        mode, n = _mode_and_sequences(run)
        live = plots.LiveRunPlot(plan, width=WIDTH // 2 - 10, mode=mode if mode in ("sequential", "pipeline") else None,
                                 sequences=n, testbed=tb, profile=run.profile)
        live.push(token_events)
        items.append(live.layout)
    if run.events:
        items += [_h2("Token timeline"), plots.timeline_figure(run.events, width=WIDTH)]

    profile, label = run.profile, "measured profile (profile.json)"
    if profile is None and tb is not None and plan is not None and plan.model:
        try:  # a plan made without a measured profile: recompute from the kinds, and say so
            from edgeshard.planning.synthetic import synthetic_profile
            profile = synthetic_profile(tb, plan.model)
            label = "SYNTHETIC profile from the device kinds (no profile.json in the run)"
        except Exception as e:
            run.notes.append(f"baselines not recomputed: no profile.json and no synthetic profile ({e})")
    if plan is not None and tb is not None:
        items += [_h2("Plan", html_table(plots.stage_rows(plan, tb, profile),
                                          [("device", "device"), ("start", "start"), ("stop", "stop"),
                                           ("first_unit", "first unit"), ("last_unit", "last unit"),
                                           ("decode_s", "decode s", ".4g"), ("prefill_s", "prefill s", ".4g"),
                                           ("hop_s", "hop after s", ".4g"), ("memory_bytes", "memory bytes", ".4g")])
                          + ("<p>notes: " + html.escape("; ".join(plan.notes)) + "</p>" if plan.notes else "")),
                  plots.plan_figure(plan, tb, profile, width=WIDTH)]
        if profile is not None:
            try:
                items += _baselines(run, profile, label)
            except Exception as e:  # a profile that does not match the testbed must not lose the whole report
                run.notes.append(f"baselines not recomputed: {type(e).__name__}: {e}")
    if tb is not None:
        items += [_h2("Testbed", _testbed_html(tb)), plots.bandwidth_heatmap(tb, run.profile)]
    if run.profile is not None:
        p = run.profile
        items += [_h2("Profile", f"<p>model {html.escape(p.model)}, dtype {html.escape(p.dtype)}</p>"
                      + kv_table(p.provenance, "provenance.")),
                  plots.unit_cost_figure(p, width=WIDTH), plots.unit_cost_figure(p, "prefill_s_per_token", width=WIDTH)]
    items.append(_h2("Environment", _environment_html(run)))
    files = sorted(p.name for p in run_dir.iterdir() if p.is_file() and p.name != "report.html")
    items.append(_h2("Run folder", "<p>files: " + html.escape(", ".join(files)) + "</p>"
                     + "".join(f'<p class="note">{html.escape(n)}</p>' for n in run.notes)))
    page = file_html(column(*items), INLINE, title)
    path = Path(out) if out is not None else run_dir / "report.html"
    path.write_text(page)
    return path
