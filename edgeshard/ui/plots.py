"""Bokeh figures: pure functions from edgeshard data (testbed, profile, plan, events) to bokeh models.

Every figure keeps its data in a ColumnDataSource with a `name` (e.g. "stages"), so tests, widgets and the
report can find it with `model.select_one({"type": ColumnDataSource, "name": ...})`.
Nothing here does I/O or touches widgets; widgets.py shows these models, report.py embeds them.

Event dicts (what LiveRunPlot.push and timeline_figure read; keys beyond these are ignored):
  {"type": "token", "seq", "step", "t_s"[, "latency_s", "text"]}
  {"type": "compute", "device", "start_s", "end_s"[, "seq", "step"]}
  {"type": "send", "device", "peer", "bytes", "start_s", "end_s"}
"""

from __future__ import annotations

import math
from collections import deque

from bokeh.layouts import column, row
from bokeh.models import (
    BoxAnnotation,
    ColorBar,
    ColumnDataSource,
    DataRange1d,
    DataTable,
    Div,
    FactorRange,
    HoverTool,
    LabelSet,
    NumberFormatter,
    Span,
    TableColumn,
    Title,
)
from bokeh.palettes import Category10, Category20, Viridis256
from bokeh.plotting import figure
from bokeh.transform import log_cmap

from edgeshard.config.plan import INFEASIBLE, OOM, STATUS_SHORT, Plan, diff
from edgeshard.config.testbed import GIB, MBIT_S
from edgeshard.planning.baselines import STRATEGIES as STRATEGY_ORDER  # fixed colours per strategy, in this order
from edgeshard.planning.costs import CostModel, Workload, names_in_words, unmodelled_sharing

# metric key -> (label, unit, factor from the stored SI value to the shown unit)
METRICS = {
    "latency_s": ("latency per token", "ms", 1e3),
    "e2e_s": ("end-to-end time", "s", 1.0),
    "prefill_s": ("prefill time", "s", 1.0),
    "bottleneck_s": ("bottleneck stage", "ms", 1e3),
    "throughput_tokens_per_s": ("throughput", "tokens/s", 1.0),
}
NAN = float("nan")


def html_escape(text: str) -> str:
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def palette(n: int) -> list[str]:
    if n <= 10:
        return list(Category10[10][:max(n, 1)])
    return [Category20[20][i % 20] for i in range(n)]


def device_colors(names) -> dict[str, str]:
    names = list(dict.fromkeys(names))
    return dict(zip(names, palette(len(names))))


def strategy_colors(names) -> dict[str, str]:
    order = list(STRATEGY_ORDER) + [n for n in names if n not in STRATEGY_ORDER]
    colors = palette(len(order))
    return {n: colors[order.index(n)] for n in names}


def _fmt_ms(s) -> str:
    return "-" if s is None or s != s else f"{s * 1e3:.3g} ms"


# --- plans --------------------------------------------------------------------------------------------------
def stage_rows(plan: Plan, testbed=None, profile=None) -> list[dict]:
    """One dict per stage: device, [start, stop), decode/prefill/hop seconds and memory, from the plan's
    predicted costs, or recomputed from the profile when the plan has none (an OOM baseline)."""
    per = {(s["device"], s["start"], s["stop"]): s for s in plan.predicted.get("stages", [])}
    cm = None
    if not per and profile is not None and testbed is not None and plan.stages:
        try:  # an infeasible plan carries no predicted costs: recompute its stages' costs
            cm = CostModel(testbed, profile)
        except Exception:  # a profile that does not match the testbed: show the ranges alone
            cm = None
    rows = []
    for p, s in enumerate(plan.stages):
        e = per.get((s.device, s.start, s.stop), {})
        dec, pre, mem, limit = e.get("decode_s"), e.get("prefill_s"), e.get("memory_bytes"), e.get("memory_limit_bytes")
        if cm is not None and s.device in cm.decode_prefix:
            dec = cm.decode(s.device, s.start, s.stop)
            mem, limit = cm.memory(s.start, s.stop), cm.memory_limit[s.device]
        names = profile.units if profile is not None and len(profile.units) >= s.stop else None
        rows.append({
            "index": p, "device": s.device, "start": s.start, "stop": s.stop, "units": s.stop - s.start,
            "first_unit": names[s.start].name if names else str(s.start),
            "last_unit": names[s.stop - 1].name if names else str(s.stop - 1),
            "decode_s": NAN if dec is None else dec, "prefill_s": NAN if pre is None else pre,
            "hop_s": e.get("hop_s", NAN), "memory_bytes": NAN if mem is None else mem,
            "memory_limit_bytes": NAN if limit is None else limit,
        })
    return rows


def _plan_title(plan: Plan, label: str = "") -> str:
    head = f"{label}{plan.strategy} / {plan.objective}"
    if not plan.feasible:
        why = f"{'OOM' if plan.status == OOM else 'infeasible'}: {'; '.join(plan.reasons) or 'no stages'}"
        return f"{head}: {why[:120]}"
    p = plan.predicted
    return (f"{head}: {_fmt_ms(p.get('latency_s'))}/token, "
            f"{p.get('throughput_tokens_per_s', NAN):.3g} tokens/s, {len(plan.stages)} stage(s)")


def _stage_label(r: dict) -> str:
    parts = []
    if r["decode_s"] == r["decode_s"]:
        parts.append(_fmt_ms(r["decode_s"]))
    if r["memory_bytes"] == r["memory_bytes"]:
        parts.append(f"{r['memory_bytes'] / GIB:.2f} GiB")
    return "\n".join(parts)


def plan_figure(plan: Plan, testbed, profile=None, title: str | None = None, width: int = 800):
    """Units along x, one lane per testbed device, one block per stage labelled with decode time and memory.

    Data: ColumnDataSource "stages" (one row per stage: device, start, stop, decode_ms, memory_gib, ...),
    "hops" (one row per hop between consecutive stages).
    """
    lanes = list(reversed(testbed.names))  # first device on top
    rows = stage_rows(plan, testbed, profile)
    colors = device_colors(testbed.names)
    n_units = profile.n_units if profile is not None else max([s.stop for s in plan.stages], default=1)
    data = {k: [r[k] for r in rows] for k in ("device", "start", "stop", "units", "first_unit", "last_unit")}
    data["decode_ms"] = [r["decode_s"] * 1e3 for r in rows]
    data["prefill_ms"] = [r["prefill_s"] * 1e3 for r in rows]
    data["memory_gib"] = [r["memory_bytes"] / GIB for r in rows]
    data["limit_gib"] = [r["memory_limit_bytes"] / GIB for r in rows]
    data["mid"] = [(r["start"] + r["stop"]) / 2 for r in rows]
    # narrow blocks get no label (it would spill over its neighbours); hover still shows everything
    data["label"] = [_stage_label(r) if r["units"] >= n_units / 15 else "" for r in rows]
    data["color"] = [colors.get(r["device"], "#888888") for r in rows]
    src = ColumnDataSource(data, name="stages")
    fig = figure(y_range=FactorRange(*lanes), x_range=(0, n_units), height=70 + 55 * len(lanes), width=width,
                 title=title or _plan_title(plan), x_axis_label="unit (0 = embedding, last = norm + head)",
                 toolbar_location="right", tools="pan,xwheel_zoom,reset,save")
    blocks = fig.hbar(y="device", left="start", right="stop", height=0.7, source=src, fill_color="color",
                      line_color="black", fill_alpha=0.8 if plan.feasible else 0.35,
                      hatch_pattern=None if plan.feasible else "/", hatch_color="red")
    fig.add_layout(LabelSet(x="mid", y="device", text="label", source=src, text_align="center",
                            text_baseline="middle", text_font_size="9pt"))
    hops = {"x": [], "y0": [], "y1": [], "hop_ms": [], "src": [], "dst": []}
    for r, nxt in zip(rows, rows[1:]):
        hops["x"].append(r["stop"])
        hops["y0"].append(r["device"])
        hops["y1"].append(nxt["device"])
        hops["hop_ms"].append(r["hop_s"] * 1e3)
        hops["src"].append(r["device"])
        hops["dst"].append(nxt["device"])
    hop_src = ColumnDataSource(hops, name="hops")
    hop_r = fig.segment(x0="x", y0="y0", x1="x", y1="y1", source=hop_src, line_width=2, line_dash="dashed",
                        line_color="gray")
    fig.add_tools(HoverTool(renderers=[blocks], tooltips=[
        ("device", "@device"), ("units", "[@start, @stop) @first_unit .. @last_unit"),
        ("decode", "@decode_ms{0.000} ms"), ("prefill", "@prefill_ms{0.000} ms"),
        ("memory", "@memory_gib{0.00} of @limit_gib{0.00} GiB")]))
    fig.add_tools(HoverTool(renderers=[hop_r], tooltips=[("hop", "@src -> @dst"), ("time", "@hop_ms{0.000} ms")]))
    fig.ygrid.grid_line_color = None
    return fig


def plan_diff_figure(a: Plan, b: Plan, name_a: str = "A", name_b: str = "B", testbed=None, width: int = 800):
    """Both plans as lanes (name, device), moved unit ranges hatched and shaded, and a table of cost deltas.

    Data: "stages" (both plans' stages, column "plan"), "moved" (plan.diff's moved ranges), "costs" (deltas).
    """
    d = diff(a, b)
    order = list(testbed.names) if testbed is not None else []
    for s in (*a.stages, *b.stages):
        if s.device not in order:
            order.append(s.device)
    used_a = [x for x in order if x in {s.device for s in a.stages}] or order[:1]
    used_b = [x for x in order if x in {s.device for s in b.stages}] or order[:1]
    lanes = [(name_b, x) for x in reversed(used_b)] + [(name_a, x) for x in reversed(used_a)]
    colors = device_colors(order)
    moved_units = set()
    for m in d["moved"]:
        moved_units.update(range(m["start"], m["stop"]))
    data = {"plan": [], "lane": [], "device": [], "start": [], "stop": [], "color": [], "moved": []}
    for name, plan in ((name_a, a), (name_b, b)):
        for s in plan.stages:
            data["plan"].append(name)
            data["lane"].append((name, s.device))
            data["device"].append(s.device)
            data["start"].append(s.start)
            data["stop"].append(s.stop)
            data["color"].append(colors[s.device])
            data["moved"].append(any(u in moved_units for u in range(s.start, s.stop)))
    src = ColumnDataSource(data, name="stages")
    moved = ColumnDataSource({
        "start": [m["start"] for m in d["moved"]], "stop": [m["stop"] for m in d["moved"]],
        "from": [m["from"] for m in d["moved"]], "to": [m["to"] for m in d["moved"]],
        "lane_a": [(name_a, m["from"]) for m in d["moved"]], "lane_b": [(name_b, m["to"]) for m in d["moved"]],
    }, name="moved")
    n_units = max([s.stop for s in (*a.stages, *b.stages)], default=1)
    summary = "no unit changed device" if not d["moved"] else \
        ", ".join(f"[{m['start']}, {m['stop']}) {m['from']} -> {m['to']}" for m in d["moved"])
    fig = figure(y_range=FactorRange(*lanes), x_range=(0, n_units), height=80 + 40 * len(lanes), width=width,
                 title=f"{name_a} -> {name_b}: {summary}"[:200], x_axis_label="unit",
                 tools="pan,xwheel_zoom,reset,save")
    blocks = fig.hbar(y="lane", left="start", right="stop", height=0.7, source=src, fill_color="color",
                      fill_alpha=0.7, line_color="black")
    for lane in ("lane_a", "lane_b"):  # the moved part of each block, on the lane it left and the one it joined
        fig.hbar(y=lane, left="start", right="stop", height=0.7, source=moved, fill_alpha=0.0, line_color="red",
                 line_width=3, hatch_pattern="/", hatch_color="red", hatch_alpha=0.6)
    for m in d["moved"]:
        fig.add_layout(BoxAnnotation(left=m["start"], right=m["stop"], fill_color="red", fill_alpha=0.08))
    fig.add_tools(HoverTool(renderers=[blocks], tooltips=[("plan", "@plan"), ("device", "@device"),
                                                          ("units", "[@start, @stop)"), ("moved", "@moved")]))
    fig.ygrid.grid_line_color = None
    keys = list(d["costs"])
    costs = ColumnDataSource({
        "metric": keys,
        "a": [d["costs"][k]["a"] for k in keys], "b": [d["costs"][k]["b"] for k in keys],
        "delta": [d["costs"][k]["delta"] for k in keys],
        "ratio": [NAN if d["costs"][k]["ratio"] is None else d["costs"][k]["ratio"] for k in keys],
    }, name="costs")
    fmt = NumberFormatter(format="0.000000")
    table = DataTable(source=costs, height=30 + 28 * max(len(keys), 1), width=width, index_position=None, columns=[
        TableColumn(field="metric", title="metric"), TableColumn(field="a", title=name_a, formatter=fmt),
        TableColumn(field="b", title=name_b, formatter=fmt), TableColumn(field="delta", title="delta", formatter=fmt),
        TableColumn(field="ratio", title=f"{name_b} / {name_a}", formatter=NumberFormatter(format="0.000"))])
    extra = []
    if d["devices_added"] or d["devices_removed"]:
        extra.append(Div(text=f"devices added: {', '.join(d['devices_added']) or '-'}; "
                              f"removed: {', '.join(d['devices_removed']) or '-'}", disable_math=True))
    return column(fig, *extra, table)


# --- profile and testbed ------------------------------------------------------------------------------------
def unit_cost_figure(profile, which: str = "decode_s", width: int = 800):
    """Per-unit cost per device (log y, ms). Data: one source "units:<device>" per device."""
    fig = figure(y_axis_type="log", height=350, width=width, x_axis_label="unit",
                 y_axis_label=f"{'decode' if which == 'decode_s' else 'prefill per token'} (ms)",
                 title=f"{profile.model} ({profile.dtype}): per-unit {which.replace('_', ' ')} per device",
                 tools="pan,wheel_zoom,box_zoom,reset,save")
    names = sorted(profile.devices)
    colors = device_colors(names)
    unit_names = [u.name for u in profile.units]
    for name in names:
        values = getattr(profile.devices[name], which)
        src = ColumnDataSource({"unit": list(range(len(values))), "unit_name": unit_names[:len(values)],
                                "ms": [v * 1e3 if v > 0 else NAN for v in values], "device": [name] * len(values)},
                               name=f"units:{name}")
        fig.line("unit", "ms", source=src, color=colors[name], legend_label=name, line_width=2)
        fig.scatter("unit", "ms", source=src, color=colors[name], size=5, legend_label=name)
    fig.add_tools(HoverTool(tooltips=[("device", "@device"), ("unit", "@unit @unit_name"), ("cost", "@ms{0.000} ms")]))
    fig.legend.click_policy = "hide"
    fig.add_layout(fig.legend[0], "right")  # outside: the lines span the whole plot
    return fig


def link_rows(testbed, profile=None) -> list[dict]:
    """Every ordered pair src != dst with the values the cost model uses (a profile's measured link wins)."""
    out = []
    for a in testbed.names:
        for b in testbed.names:
            if a == b:
                continue
            measured = profile.link(a, b) if profile is not None else None
            lk = measured or testbed.link(a, b)
            out.append({"src": a, "dst": b, "mbit_s": lk.bandwidth_bytes_s / MBIT_S, "latency_ms": lk.latency_s * 1e3,
                        "measured": measured is not None})
    return out


def bandwidth_heatmap(testbed, profile=None, width: int | None = None):
    """Device x device link bandwidth in Mbit/s (rows: sender, columns: receiver). Data: source "links"."""
    rows = link_rows(testbed, profile)
    names = list(testbed.names)
    data = {k: [r[k] for r in rows] for k in ("src", "dst", "mbit_s", "latency_ms", "measured")}
    data["label"] = [f"{r['mbit_s']:.4g}" for r in rows]
    values = data["mbit_s"] or [1.0]
    low, high = min(values), max(values)
    if high <= low:
        high = low * 10
    # dark text on the bright (fast) end of Viridis, white on the dark end
    data["text_color"] = [("black" if math.log(v / low) / math.log(high / low) > 0.6 else "white") for v in data["mbit_s"]]
    src = ColumnDataSource(data, name="links")
    mapper = log_cmap("mbit_s", Viridis256, low, high)
    side = 60 + 55 * len(names)
    fig = figure(x_range=FactorRange(*names), y_range=FactorRange(*reversed(names)), width=width or side + 160,
                 height=side, title="link bandwidth (Mbit/s), row sends to column", x_axis_label="receiver (dst)",
                 y_axis_label="sender (src)", tools="hover,save", toolbar_location="right",
                 tooltips=[("link", "@src -> @dst"), ("bandwidth", "@mbit_s{0.000} Mbit/s"),
                           ("latency", "@latency_ms{0.000} ms"), ("measured", "@measured")])
    fig.rect(x="dst", y="src", width=1, height=1, source=src, fill_color=mapper, line_color="white")
    fig.text(x="dst", y="src", text="label", source=src, text_align="center", text_baseline="middle",
             text_color="text_color", text_font_size="9pt")
    fig.add_layout(ColorBar(color_mapper=mapper["transform"], width=10), "right")
    fig.grid.grid_line_color = None
    fig.xaxis.major_label_orientation = 0.8
    return fig


# --- strategy comparison and sweeps -------------------------------------------------------------------------
def comparison_rows(plans: dict) -> list[dict]:
    """One row per strategy: feasible/OOM, stages, predicted metrics and ratios against edgeshard."""
    ref = plans.get("edgeshard")
    ref_p = ref.predicted if ref is not None and ref.feasible else {}
    rows = []
    for name, p in plans.items():
        pred = p.predicted if p.feasible else {}
        note = "; ".join(p.notes) if not p.feasible else ""
        r = {"strategy": name, "feasible": p.feasible, "status": p.status, "oom": p.status == OOM,
             "stages": len(p.stages), "devices": " > ".join(s.device for s in p.stages),
             "cuts": " ".join(f"[{s.start},{s.stop})" for s in p.stages), "note": note}
        for k in METRICS:
            r[k] = pred.get(k, NAN)
        lat, ref_lat = r["latency_s"], ref_p.get("latency_s")
        r["latency_vs_edgeshard"] = lat / ref_lat if ref_lat and lat == lat else NAN
        tp, ref_tp = r["throughput_tokens_per_s"], ref_p.get("throughput_tokens_per_s")
        r["throughput_vs_edgeshard"] = tp / ref_tp if ref_tp and tp == tp else NAN
        rows.append(r)
    return rows


def _status_short(row: dict) -> str:
    """"OOM" or "n/a" for an infeasible row: its status (rows from comparison_rows), else its "oom" flag."""
    status = row.get("status") or (OOM if row.get("oom") else INFEASIBLE)
    return STATUS_SHORT[status]


def comparison_figure(table, metrics=("latency_s", "throughput_tokens_per_s"), width: int = 420):
    """Horizontal bars per strategy for each metric, value written at the bar's end; an infeasible strategy
    gets no bar and a red "OOM" (or "n/a") mark.

    `table` is comparison_rows(...) or a dict strategy -> Plan. Data: source "compare:<metric>" per figure.
    """
    rows = comparison_rows(table) if isinstance(table, dict) else list(table)
    names = [r["strategy"] for r in rows]
    colors = strategy_colors(names)
    figs = []
    for metric in metrics:
        label, unit, factor = METRICS[metric]
        values = [r.get(metric, NAN) * factor if r.get("feasible", True) else NAN for r in rows]
        finite = [v for v in values if v == v and math.isfinite(v)]
        top = max(finite, default=1.0) or 1.0
        src = ColumnDataSource({
            "strategy": names, "value": [v if v == v else 0.0 for v in values],
            "shown": [f"{v:.4g}" if v == v else _status_short(r) for v, r in zip(values, rows)],
            "feasible": [bool(r.get("feasible", True)) for r in rows], "color": [colors[n] for n in names],
            "text_color": ["black" if r.get("feasible", True) else "#c00" for r in rows],
            "note": [r.get("note", "") for r in rows],
        }, name=f"compare:{metric}")
        fig = figure(y_range=FactorRange(*reversed(names)), height=60 + 28 * len(rows), width=width,
                     title=f"{label} ({unit})", x_range=(0, top * 1.3), tools="save", toolbar_location=None)
        bars = fig.hbar(y="strategy", right="value", height=0.7, source=src, fill_color="color", line_color="black")
        fig.text(x="value", y="strategy", text="shown", source=src, text_align="left", text_baseline="middle",
                 text_font_size="8pt", x_offset=3, text_color="text_color")
        fig.add_tools(HoverTool(renderers=[bars], tooltips=[("strategy", "@strategy"), (label, f"@shown {unit}"),
                                                            ("note", "@note")]))
        fig.ygrid.grid_line_color = None
        figs.append(fig)
    return row(*figs)


OBJECTIVE_METRIC = {"latency": "latency_s", "e2e": "e2e_s", "throughput": "throughput_tokens_per_s"}


def _sweep_rows(rows, model):
    """compare.sweep rows ({"objective", "value"} per row, several models) -> one model's {metric: value} rows."""
    rows = list(rows)
    models = list(dict.fromkeys(r["model"] for r in rows if "model" in r))
    if models:
        model = model or models[0]
        rows = [r for r in rows if r.get("model") == model]
    out = []
    for r in rows:
        if "objective" in r and "value" in r:
            r = dict(r)
            r[OBJECTIVE_METRIC[r["objective"]]] = NAN if r["value"] is None else r["value"]
        out.append(r)
    return out, model


def sweep_figure(rows, metrics=("latency_s", "throughput_tokens_per_s"), x: str = "bandwidth_mbit_s",
                 model: str | None = None, width: int = 450):
    """A metric against bandwidth (log x, log y), one line per strategy; infeasible points leave a gap.

    rows: [{"strategy", x, "feasible", metric...}], or compare.sweep's rows ({"model", "objective", "value"}:
    one model is drawn, `model` or the first). Data: source "sweep:<metric>:<strategy>".
    """
    rows, model = _sweep_rows(rows, model)
    names = list(dict.fromkeys(r["strategy"] for r in rows))
    colors = strategy_colors(names)
    figs = []
    for metric in metrics:
        label, unit, factor = METRICS[metric]
        have = [r for r in rows if metric in r]
        fig = figure(x_axis_type="log", y_axis_type="log", height=350, width=width,
                     title=f"{model + ': ' if model else ''}{label} vs bandwidth",
                     x_axis_label="bandwidth (Mbit/s)", y_axis_label=f"{label} ({unit})",
                     tools="pan,wheel_zoom,reset,save,hover", tooltips=[("strategy", "@strategy"),
                                                                       ("bandwidth", f"@x Mbit/s"),
                                                                       (label, f"@y {unit}")])
        for name in names:
            pts = sorted((r for r in have if r["strategy"] == name), key=lambda r: r[x])
            ys = [r.get(metric, NAN) * factor if r.get("feasible", True) else NAN for r in pts]
            src = ColumnDataSource({"x": [r[x] for r in pts], "y": ys, "strategy": [name] * len(pts)},
                                   name=f"sweep:{metric}:{name}")
            fig.line("x", "y", source=src, color=colors[name], legend_label=name, line_width=2)
            fig.scatter("x", "y", source=src, color=colors[name], legend_label=name, size=6)
        fig.legend.click_policy = "hide"
        fig.legend.label_text_font_size = "8pt"
        fig.add_layout(fig.legend[0], "right")
        figs.append(fig)
    return row(*figs)


# --- runs ---------------------------------------------------------------------------------------------------
def event_type(e: dict) -> str | None:
    return e.get("type") or e.get("kind") or e.get("event")


def timeline_figure(events, width: int = 900):
    """Device lanes over time: compute blocks, sends (on the sender's lane) and token arrivals.

    Data: sources "compute", "send", "tokens"; times relative to the first event (seconds).
    """
    events = [e for e in events if event_type(e) in ("compute", "send", "token")]
    times = [e[k] for e in events for k in ("start_s", "t_s") if isinstance(e.get(k), (int, float))]
    t0 = min(times, default=0.0)
    devices = list(dict.fromkeys(e["device"] for e in events if event_type(e) in ("compute", "send") and "device" in e))
    comp = {"device": [], "left": [], "right": [], "ms": [], "seq": [], "step": []}
    send = {"device": [], "peer": [], "left": [], "right": [], "ms": [], "bytes": []}
    tok = {"t": [], "lane": [], "seq": [], "step": []}
    for e in events:
        kind = event_type(e)
        if kind == "compute" and "device" in e:
            comp["device"].append(e["device"])
            comp["left"].append(e["start_s"] - t0)
            comp["right"].append(e["end_s"] - t0)
            comp["ms"].append((e["end_s"] - e["start_s"]) * 1e3)
            comp["seq"].append(e.get("seq", -1))
            comp["step"].append(e.get("step", -1))
        elif kind == "send" and "device" in e:
            send["device"].append(e["device"])
            send["peer"].append(str(e.get("peer", "")))
            send["left"].append(e["start_s"] - t0)
            send["right"].append(e["end_s"] - t0)
            send["ms"].append((e["end_s"] - e["start_s"]) * 1e3)
            send["bytes"].append(e.get("bytes", 0))
        elif kind == "token" and "t_s" in e:
            tok["t"].append(e["t_s"] - t0)
            tok["lane"].append("tokens")
            tok["seq"].append(e.get("seq", 0))
            tok["step"].append(e.get("step", -1))
    lanes = ["tokens"] + list(reversed(devices))
    fig = figure(y_range=FactorRange(*lanes), height=90 + 45 * len(lanes), width=width, x_axis_label="time (s)",
                 title="token timeline: compute (solid) and sends (hatched) per device",
                 tools="xpan,xwheel_zoom,box_zoom,reset,save")
    colors = device_colors(devices)
    csrc = ColumnDataSource(dict(comp, color=[colors[d] for d in comp["device"]]), name="compute")
    ssrc = ColumnDataSource(dict(send, color=[colors[d] for d in send["device"]]), name="send")
    tsrc = ColumnDataSource(tok, name="tokens")
    rc = fig.hbar(y="device", left="left", right="right", height=0.6, source=csrc, fill_color="color", line_color=None)
    rs = fig.hbar(y="device", left="left", right="right", height=0.3, source=ssrc, fill_color="white",
                  line_color="color", hatch_pattern="/", hatch_color="color")
    rt = fig.scatter(x="t", y="lane", source=tsrc, marker="dash", size=14, angle=math.pi / 2, color="black")
    fig.add_tools(HoverTool(renderers=[rc], tooltips=[("compute", "@device"), ("seq/step", "@seq/@step"),
                                                      ("time", "@ms{0.000} ms")]))
    fig.add_tools(HoverTool(renderers=[rs], tooltips=[("send", "@device -> @peer"), ("bytes", "@bytes"),
                                                      ("time", "@ms{0.000} ms")]))
    fig.add_tools(HoverTool(renderers=[rt], tooltips=[("token", "seq @seq step @step"), ("t", "@t{0.000} s")]))
    fig.ygrid.grid_line_color = None
    return fig


# --- what a run is compared with ----------------------------------------------------------------------------
DEVIATION = 0.25  # measured this far off the prediction (either way): the plot and the report say why


def run_prediction(plan: Plan | None, mode: str | None = None, sequences: int | None = None, testbed=None,
                   profile=None) -> dict | None:
    """The reference lines of a run and what is known against them. None without a feasible plan.

    mode: "sequential" or "pipeline"; None: pipeline when the plan was made for more than one sequence in
    flight. sequences: how many the run keeps in flight (pipeline; default the plan's). Sequential: one
    sequence, per-token latency = the plan's latency_s. Pipeline: the closed-pipeline tokens/s for N sequences
    (costs.CostModel.evaluate's pipeline_tokens_per_s, shared cores charged), and the per-token latency each
    sequence sees, N / that rate: with N in flight a sequence gets every N-th token of the pipeline, so the
    one-sequence latency is not its reference. With testbed and profile the prediction is recomputed for the run's
    N (and checked for cores shared but not declared); without them the plan's own is used, and a differing N
    is said in words.

    Returns {"mode", "sequences", "latency_s" (per token of one sequence), "tokens_per_s", "step_s" (device ->
    predicted compute per decode step, contention included), "basis" (how the reference was made, in words),
    "why" (reasons the prediction cannot hold, in words)}.
    """
    if plan is None or not plan.feasible or plan.predicted.get("latency_s") is None:
        return None
    pred = plan.predicted
    planned_n = int(pred.get("sequences") or (plan.workload or {}).get("sequences", 1) or 1)
    if mode is None:
        mode = "pipeline" if planned_n > 1 else "sequential"
    n = 1 if mode == "sequential" else int(sequences or planned_n)
    why: list[str] = []
    cm = None
    if testbed is not None and profile is not None:
        try:
            cm = CostModel(testbed, profile)
        except Exception:  # a profile that does not fit the testbed: fall back to the plan's own numbers
            cm = None
    if cm is not None and n != planned_n:
        w = plan.workload or {}
        pred = cm.evaluate(plan.stages, Workload(int(w.get("prompt_tokens", 128)), int(w.get("new_tokens", 128)), n),
                           check=False)
    elif n != planned_n and mode == "pipeline":
        why.append(f"the plan's prediction is for {planned_n} sequence{'s' if planned_n != 1 else ''} in flight, "
                   f"this run keeps {n}; the reference lines are the plan's")
    if mode == "pipeline":
        rate = pred.get("pipeline_tokens_per_s")
        latency = (n / rate) if rate else None
        shared = {d: g["factor"] for g in pred.get("shared_cores", []) for d in g["devices"]}
        contended = [g for g in pred.get("shared_cores", []) if g["factor"] > 1]
        basis = (f"pipeline, {n} sequence{'s' if n != 1 else ''} in flight: {rate:.3g} tokens/s predicted "
                 f"(closed pipeline{', shared cores charged' if contended else ''}); per sequence every "
                 f"{latency * 1e3:.3g} ms = {n} / {rate:.3g} tokens/s") if rate else "pipeline"
        if cm is not None:
            why += unmodelled_sharing(cm, plan.stages, n)
    else:
        latency = pred["latency_s"]
        rate = pred.get("pipeline_tokens_per_s") if planned_n == 1 else None
        rate = rate or (1.0 / latency if latency else None)
        shared = {}
        basis = f"sequential, one sequence: {latency * 1e3:.3g} ms per token predicted (the plan's latency)"
    step = {s["device"]: s["decode_s"] * shared.get(s["device"], 1.0) for s in pred.get("stages", [])}
    return {"mode": mode, "sequences": n, "latency_s": latency, "tokens_per_s": rate, "step_s": step,
            "charged": any(f > 1 for f in shared.values()), "basis": basis, "why": why}


def deviation_why(what: str, predicted: float, measured: float, step_ratio: dict[str, float] | None = None,
                  charged: bool = False) -> str | None:
    """In words, when measured is more than DEVIATION off predicted: by how much, and what the devices' compute
    steps say about it (step_ratio: device -> measured / predicted compute per decode step; charged: the
    predicted steps include a shared-cores charge). None otherwise."""
    if not predicted or measured is None or not math.isfinite(measured) or measured <= 0:
        return None
    ratio = measured / predicted
    if abs(ratio - 1) <= DEVIATION:
        return None
    text = f"measured {what} is {ratio - 1:+.0%} off the prediction"
    steps = [r for r in (step_ratio or {}).values() if r == r and r > 0]
    slow = [d for d, r in (step_ratio or {}).items() if r > 1 + DEVIATION]
    if steps:
        lo, hi = min(steps), max(steps)
        span = f"{lo:.2g}x" if hi - lo < 0.05 else f"{lo:.2g}-{hi:.2g}x"
        if slow:
            worst = max(step_ratio[d] for d in slow)
            text += (f": the compute steps of {names_in_words(slow)} took up to {worst:.2g}x their predicted time"
                     f"{' (shared cores already charged)' if charged else ''}, so they got less CPU than when "
                     "profiled: other processes on the same cores (a notebook's kernel and browser, other jobs), or a "
                     "machine slower now than then")
        elif ratio > 1:
            text += (f": the compute steps kept to their prediction ({span}), so the time went between them: "
                     "transfers, a stage waiting for its input, or the controller")
        else:
            text += f": the compute steps took {span} their predicted time, faster than profiled"
    return text


class LiveRunPlot:
    """Live figures of one run, fed by push(events): per-token latency with the prediction as a reference line,
    per-stage compute vs transfer (mean ms per step, stacked), and tokens/s with its prediction as a reference.

    The references come from run_prediction(plan, mode, sequences, testbed, profile): sequential, the plan's
    per-token latency; pipeline, the closed-pipeline tokens/s for the sequences in flight and, per sequence,
    sequences / that rate. Where the prediction cannot hold (cores shared but not declared, or the measured
    latency more than DEVIATION off it, checked on every push), a red second title line on both figures says so
    and .why (a Div under the figures, name "prediction_why") says why in words.

    Sources: .tokens ("tokens": n, seq, step, t_s, latency_ms), .stages ("stages": device, compute_ms,
    transfer_ms, compute_s, transfer_s), .rate ("rate": t_s, tokens_per_s). .layout is the bokeh layout to show.
    Call push() from one place only (the notebook's event loop), never from a worker thread (docs/notes.md: ipykernel 7).
    """

    def __init__(self, plan: Plan | None = None, rate_window: int = 8, rollover: int | None = 20000,
                 width: int = 450, mode: str | None = None, sequences: int | None = None, testbed=None,
                 profile=None):
        self.rollover = rollover
        self.count = 0  # tokens seen
        self.bad_events = 0  # malformed events skipped
        self._last_t: dict = {}  # seq -> time of its previous token
        self._recent = deque(maxlen=max(2, rate_window))  # times of the last tokens, for tokens/s
        self._t0: float | None = None
        self._compute: dict[str, list] = {}  # device -> [total seconds, steps]
        self._transfer: dict[str, list] = {}  # sender -> [total seconds, messages]
        self._sends: dict = {}  # (src, dst, seq, step) -> send event, waiting for its recv
        self._recvs: dict = {}  # (src, dst, seq, step) -> recv event that came before its send
        devices = [s.device for s in plan.stages] if plan is not None else []
        self.prediction = run_prediction(plan, mode, sequences, testbed, profile)
        pr = self.prediction or {}
        self.mode = pr.get("mode", mode or "sequential")
        self.predicted_latency_ms = pr["latency_s"] * 1e3 if pr.get("latency_s") else None
        self.static_why: list[str] = list(pr.get("why", []))
        self.deviation: str | None = None
        self.tokens = ColumnDataSource({"n": [], "seq": [], "step": [], "t_s": [], "latency_ms": []}, name="tokens")
        self.stages = ColumnDataSource({"device": devices, "compute_ms": [0.0] * len(devices),
                                        "transfer_ms": [0.0] * len(devices), "compute_s": [0.0] * len(devices),
                                        "transfer_s": [0.0] * len(devices)}, name="stages")
        per = plan.predicted.get("stages", []) if plan is not None and plan.feasible else []
        self.predicted_stages = ColumnDataSource({
            "device": [s["device"] for s in per], "decode_ms": [s["decode_s"] * 1e3 for s in per],
            "total_ms": [(s["decode_s"] + s.get("hop_s", 0.0)) * 1e3 for s in per]}, name="predicted_stages")
        self.rate = ColumnDataSource({"t_s": [], "tokens_per_s": []}, name="rate")

        per_seq = self.mode == "pipeline"
        self.latency_figure = figure(height=300, width=width,
                                     title="per-token latency" + (" per sequence" if per_seq else ""),
                                     x_axis_label="token",
                                     y_range=DataRange1d(start=0),
                                     y_axis_label="ms", tools="pan,wheel_zoom,reset,save,hover",
                                     tooltips=[("token", "@n (seq @seq step @step)"), ("latency", "@latency_ms{0.00} ms")])
        self.latency_figure.scatter("n", "latency_ms", source=self.tokens, size=5)
        self.latency_figure.line("n", "latency_ms", source=self.tokens, alpha=0.4)
        self.reference = Span(location=self.predicted_latency_ms if self.predicted_latency_ms is not None else 0.0,
                              dimension="width", line_color="red", line_dash="dashed", line_width=2,
                              visible=self.predicted_latency_ms is not None)
        self.latency_figure.add_layout(self.reference)
        if self.predicted_latency_ms is not None:  # an invisible point keeps the reference line inside the y range
            self.latency_figure.scatter([1], [self.predicted_latency_ms], alpha=0)
        if self.predicted_latency_ms is not None:
            if per_seq:
                self.latency_figure.title.text += (f" (dashed: predicted {self.predicted_latency_ms:.3g} ms = "
                                                   f"{pr['sequences']} sequences / {pr['tokens_per_s']:.3g} tokens/s)")
            else:
                self.latency_figure.title.text += f" (dashed: predicted {self.predicted_latency_ms:.3g} ms)"

        self.stage_figure = figure(x_range=FactorRange(*devices), height=300, width=width,
                                   title="per stage: compute vs transfer (mean ms per decode step)", y_axis_label="ms",
                                   tools="save,hover", tooltips=[("device", "@device"), ("compute", "@compute_ms{0.000} ms"),
                                                                 ("transfer", "@transfer_ms{0.000} ms")])
        self.stage_figure.vbar_stack(["compute_ms", "transfer_ms"], x="device", width=0.7, source=self.stages,
                                     color=["#1f77b4", "#ff7f0e"], legend_label=["compute", "transfer"])
        if per:  # the plan's prediction per stage: compute (dash) and compute + hop (circle)
            self.stage_figure.scatter("device", "decode_ms", source=self.predicted_stages, marker="dash", size=30,
                                      line_width=3, color="black", legend_label="predicted compute")
            self.stage_figure.scatter("device", "total_ms", source=self.predicted_stages, marker="circle", size=8,
                                      color="black", legend_label="predicted + hop")
        self.stage_figure.legend.label_text_font_size = "8pt"
        self.stage_figure.add_layout(self.stage_figure.legend[0], "below")  # bars and markers stay visible

        self.rate_figure = figure(height=300, width=width, title="tokens/s", x_axis_label="time (s)",
                                  y_range=DataRange1d(start=0),
                                  y_axis_label="tokens/s", tools="pan,wheel_zoom,reset,save")
        self.rate_figure.line("t_s", "tokens_per_s", source=self.rate, line_width=2)
        self.predicted_rate = pr.get("tokens_per_s")
        if self.predicted_rate is not None:
            self.rate_reference = Span(location=self.predicted_rate, dimension="width", line_color="red",
                                       line_dash="dashed", line_width=2)
            self.rate_figure.add_layout(self.rate_reference)
            self.rate_figure.scatter([0], [self.predicted_rate], alpha=0)  # keeps the line inside the y range
            n = pr["sequences"]
            self.rate_figure.title.text += (f" (dashed: predicted {self.predicted_rate:.3g} with {n} "
                                            f"sequence{'s' if n != 1 else ''} in flight)")
        # where the prediction cannot hold: a red second title line on both figures, the reasons below them
        self.why_titles = [Title(text="", text_color="#b00", text_font_size="9pt", visible=False, name="why")
                           for _ in range(2)]
        self.latency_figure.add_layout(self.why_titles[0], "above")
        self.rate_figure.add_layout(self.why_titles[1], "above")
        self.why = Div(text="", width=2 * width, visible=False, name="prediction_why", disable_math=True)
        self._show_why()
        self.layout = column(self.latency_figure, row(self.stage_figure, self.rate_figure), self.why)

    def reasons(self) -> list[str]:
        """Why the prediction cannot hold, in words: what is known before the run, then what the run shows."""
        return self.static_why + ([self.deviation] if self.deviation else [])

    def _show_why(self) -> None:
        reasons = self.reasons()
        short = ""
        if self.deviation:
            short = "prediction does not hold: " + self.deviation.split(":")[0].replace("measured ", "")
        elif self.static_why:
            short = "prediction cannot hold: cores shared but not charged (see below)" \
                if any("shared" in r for r in self.static_why) else "prediction cannot hold (see below)"
        for t in self.why_titles:
            if t.text != short:
                t.text, t.visible = short, bool(short)
        text = "" if not reasons else ("<b>Why the prediction does not hold</b><ul>"
                                       + "".join(f"<li>{html_escape(r)}</li>" for r in reasons) + "</ul>")
        if self.why.text != text:
            self.why.text, self.why.visible = text, bool(text)

    def step_ratios(self) -> dict[str, float]:
        """device -> mean measured compute per decode step / its predicted time (contention included)."""
        pred = (self.prediction or {}).get("step_s", {})
        return {d: (tot / n) / pred[d] for d, (tot, n) in self._compute.items() if n and pred.get(d)}

    def _check_deviation(self) -> None:
        """Median per-token latency of the latest tokens (at least 8, and two per sequence in flight) against the
        reference: more than DEVIATION off, and .deviation says so and what the compute steps show."""
        lat = self.tokens.data["latency_ms"]
        need = max(8, 2 * ((self.prediction or {}).get("sequences") or 1))
        if self.predicted_latency_ms is None or len(lat) < need:
            return
        recent = sorted(lat[-200:])
        med = recent[len(recent) // 2] if len(recent) % 2 else (recent[len(recent) // 2 - 1] + recent[len(recent) // 2]) / 2
        what = ("per-token latency per sequence" if self.mode == "pipeline" else "per-token latency") + \
            f" (median {med:.3g} ms against {self.predicted_latency_ms:.3g} ms)"
        dev = deviation_why(what, self.predicted_latency_ms, med, self.step_ratios(),
                            (self.prediction or {}).get("charged", False))
        if dev != self.deviation:
            self.deviation = dev
            self._show_why()

    def push(self, events) -> int:
        """Add events (dicts, any order within the batch is kept); returns the number of tokens added."""
        tok = {"n": [], "seq": [], "step": [], "t_s": [], "latency_ms": []}
        rate = {"t_s": [], "tokens_per_s": []}
        stages_changed = False
        for e in events:
            try:
                stages_changed |= self._take(e, tok, rate)
            except (TypeError, KeyError, ValueError, AttributeError):
                self.bad_events += 1  # one malformed event must not lose the rest of the batch
        if tok["n"]:
            self.tokens.stream(tok, self.rollover)
        if rate["t_s"]:
            self.rate.stream(rate, self.rollover)
        if stages_changed:
            self._update_stages()
        if tok["n"]:
            self._check_deviation()
        return len(tok["n"])

    def _take(self, e: dict, tok: dict, rate: dict) -> bool:
        """Add one event to the pending stream batches; True when the per-stage totals changed."""
        kind = event_type(e)
        if kind == "token":
            t = e.get("t_s")
            if t is None:
                return False
            t = float(t)
            if self._t0 is None:
                self._t0 = t
            seq = e.get("seq", 0)
            if e.get("latency_s") is not None:
                lat = e["latency_s"]
            elif seq in self._last_t:
                lat = t - self._last_t[seq]
            else:
                lat = None  # the first token of a sequence includes prefill: not a decode latency
            self._last_t[seq] = t
            self._recent.append(t)
            self.count += 1
            if lat is not None:
                tok["n"].append(self.count)
                tok["seq"].append(seq)
                tok["step"].append(e.get("step", -1))
                tok["t_s"].append(t - self._t0)
                tok["latency_ms"].append(lat * 1e3)
            if len(self._recent) >= 2 and self._recent[-1] > self._recent[0]:
                rate["t_s"].append(t - self._t0)
                rate["tokens_per_s"].append((len(self._recent) - 1) / (self._recent[-1] - self._recent[0]))
        elif kind in ("compute", "send", "recv") and "device" in e and "start_s" in e and "end_s" in e:
            if e.get("step", 1) == 0:
                return False  # the prompt (prefill) step: not comparable with per-token decode costs
            if kind == "compute":
                acc = self._compute.setdefault(e["device"], [0.0, 0])
                acc[0] += e["end_s"] - e["start_s"]
                acc[1] += 1
            else:
                self._transfer_event(kind, e)
            return True
        return False

    def _transfer_event(self, kind: str, e: dict) -> None:
        """A message counts from the send's start to the recv's end (as metrics.summarize and the cost model's
        hop do); a send counts its own interval at once and grows when its recv arrives."""
        if kind == "send":
            key = (e["device"], e.get("peer"), e.get("seq"), e.get("step"))
            acc = self._transfer.setdefault(e["device"], [0.0, 0])
            acc[1] += 1
            recv = self._recvs.pop(key, None)
            acc[0] += (max(recv["end_s"], e["end_s"]) if recv else e["end_s"]) - e["start_s"]
            if recv is None:
                self._sends[key] = e
        else:
            key = (e.get("peer"), e["device"], e.get("seq"), e.get("step"))
            send = self._sends.pop(key, None)
            if send is None:
                self._recvs[key] = e
            elif e["end_s"] > send["end_s"]:
                self._transfer.setdefault(send["device"], [0.0, 0])[0] += e["end_s"] - send["end_s"]

    def _update_stages(self) -> None:
        devices = list(self.stages.data["device"])
        for d in list(self._compute) + list(self._transfer):
            if d not in devices:
                devices.append(d)
        if list(self.stage_figure.x_range.factors) != devices:
            self.stage_figure.x_range.factors = devices

        def mean(acc, d):
            total, n = acc.get(d, (0.0, 0))
            return total / n if n else 0.0

        self.stages.data = {
            "device": devices,
            "compute_ms": [mean(self._compute, d) * 1e3 for d in devices],
            "transfer_ms": [mean(self._transfer, d) * 1e3 for d in devices],
            "compute_s": [self._compute.get(d, (0.0, 0))[0] for d in devices],
            "transfer_s": [self._transfer.get(d, (0.0, 0))[0] for d in devices],
        }
