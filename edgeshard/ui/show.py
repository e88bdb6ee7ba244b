"""How the data objects show themselves in Jupyter (their `_ipython_display_` calls show()).

A testbed shows its device table and link matrix, a profile its per-unit cost chart, a plan its figure (units
along x, one lane per device). The data modules stay stdlib-only: they import this lazily, and this imports
bokeh and ipywidgets.
"""

from __future__ import annotations

import html

MAX_ROWS = 40  # a fleet's table is cut here (the heatmap too: it would be unreadable)


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows[:MAX_ROWS])
    more = f"<p>... and {len(rows) - MAX_ROWS} more</p>" if len(rows) > MAX_ROWS else ""
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{more}"


def testbed_html(tb) -> str:
    rows = []
    for d in tb.devices:
        role = ", ".join(r for r, n in (("source", tb.source), ("cloud", tb.cloud)) if n == d.name)
        rows.append([d.name, role, d.kind or "", f"{d.memory_gib:g}", f"{d.cpu_share:g}" if d.cpu_share else "",
                     f"{d.host}:{d.port}" if d.host else ""])
    c = tb.constraints
    cons = f"context {c.context_tokens} tokens, {c.sequences} sequence(s)"
    return (f"<b>testbed {html.escape(tb.name)}</b>: {len(tb.devices)} devices, source {html.escape(tb.source)}"
            f"{', cloud ' + html.escape(tb.cloud) if tb.cloud else ''}; {cons}"
            + _table(["device", "role", "kind", "memory GiB", "cpu share", "address"], rows))


def _display(parts) -> None:
    import ipywidgets
    from IPython.display import display

    from edgeshard.ui import widgets
    widgets.setup_notebook()
    display(ipywidgets.VBox([ipywidgets.HTML(p) if isinstance(p, str) else widgets.bokeh_widget(p) for p in parts]))


def show(obj) -> None:
    from edgeshard.config.plan import Plan
    from edgeshard.config.profile import Profile
    from edgeshard.config.testbed import Testbed
    from edgeshard.ui import plots

    if isinstance(obj, Testbed):
        parts = [testbed_html(obj)]
        if len(obj.devices) <= MAX_ROWS:
            parts.append(plots.bandwidth_heatmap(obj))
    elif isinstance(obj, Profile):
        parts = [f"<b>profile of {html.escape(obj.model)}</b> ({obj.dtype}): {obj.n_units} units on "
                 f"{len(obj.devices)} devices, {len(obj.links)} links measured",
                 plots.unit_cost_figure(obj)]
    elif isinstance(obj, Plan):
        lanes = _Lanes(obj)
        parts = [plots.plan_figure(obj, lanes)]
        if obj.notes:
            parts.append("<br>".join(html.escape(n) for n in obj.notes))
    else:
        raise TypeError(f"edgeshard.ui.show: nothing to show for {type(obj).__name__}")
    _display(parts)


class _Lanes:
    """The least a plan figure needs of a testbed (its device names), for a plan shown on its own."""

    def __init__(self, plan):
        self.names = tuple(dict.fromkeys(s.device for s in plan.stages))
