"""Notebook widgets (ipywidgets 8 + jupyter_bokeh). Wiring only: testbed/planner/baselines/plots do the work.

Each view has `.widget` (the ipywidgets box) and displays itself in a notebook. Call setup_notebook() once
first: bokeh figures render offline only with INLINE resources (docs/notes.md).
Thread rule (ipykernel 7): no widget is touched from a worker thread. RunView's worker only fills a queue;
a callback on the kernel's event loop drains it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import html
import os
import queue
from pathlib import Path

import ipywidgets as w
from jupyter_bokeh import BokehModel

from edgeshard.config import testbed as testbed_mod
from edgeshard.config.errors import ConfigError
from edgeshard.config.plan import format_diff
from edgeshard.config.testbed import Testbed
from edgeshard.planning import baselines
from edgeshard.planning.costs import OBJECTIVES, Workload
from edgeshard.planning.synthetic import KINDS
from edgeshard.ui import plots, tomledit
from edgeshard.ui.report import TABLE_STYLE, comparison_html


def setup_notebook() -> None:
    """Load BokehJS inline (no CDN) so jupyter_bokeh can render figures offline."""
    from bokeh.io import output_notebook
    from bokeh.resources import INLINE
    output_notebook(resources=INLINE, hide_banner=True)


class _KernelStreamedModel(BokehModel):
    """A BokehModel whose data sources only the kernel streams to. jupyter_bokeh 4.1's frontend sends every
    patch it applied back to the kernel as a "jsevent"; re-applying an echoed ColumnsStreamed would append the
    same rows again on the Python side (a live plot's source held twice the points the browser drew)."""

    def _sync_model(self, model, content, buffers):
        if content.get("event") == "jsevent" and content.get("kind") in ("ColumnsStreamed", "ColumnsPatched"):
            return
        super()._sync_model(model, content, buffers)


def bokeh_widget(model) -> BokehModel:
    return _KernelStreamedModel(model)


class _View:
    widget: w.Widget

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)


def _error_label() -> w.HTML:
    return w.HTML("", layout=w.Layout(min_width="0"))


def _show_error(label: w.HTML, msg: str) -> None:
    label.value = f'<span style="color:#b00">{html.escape(msg)}</span>' if msg else ""


def _num(text: str):
    """Text field -> int, float, None (empty) or the text itself, which testbed.from_dict then rejects
    with its own message (so the editor shows the same errors as loading a file would)."""
    s = str(text).strip()
    if not s:
        return None
    for conv in (int, float):
        try:
            return conv(s)
        except ValueError:
            pass
    return s


def _text(v) -> str:
    return "" if v is None else str(v)


# --- testbed editor -----------------------------------------------------------------------------------------
class _DeviceRow:
    """One device: its widgets, and which [[device]] table of the original file it came from (for save)."""

    def __init__(self, raw: dict, role: str, orig_index: int | None, on_change, on_remove):
        self.orig_index = orig_index
        kind = raw.get("kind") or ""
        self.name = w.Text(_text(raw.get("name")), layout=w.Layout(width="120px"))
        self.host = w.Text(_text(raw.get("host")), placeholder="127.0.0.1 / auto", layout=w.Layout(width="130px"))
        self.port = w.Text(_text(raw.get("port")), placeholder="0 = free", layout=w.Layout(width="70px"))
        self.memory = w.Text(_text(raw.get("memory_gib")), placeholder="GiB", layout=w.Layout(width="80px"))
        self.cpu_share = w.Text(_text(raw.get("cpu_share")), placeholder="full", layout=w.Layout(width="70px"))
        kinds = [""] + list(KINDS) + ([kind] if kind and kind not in KINDS else [])
        self.kind = w.Dropdown(options=kinds, value=kind, layout=w.Layout(width="170px"))
        self.role = w.Dropdown(options=["", "source", "cloud"], value=role, layout=w.Layout(width="80px"))
        self.remove = w.Button(description="remove", layout=w.Layout(width="70px"))
        self.error = _error_label()
        for x in self.fields():
            x.observe(lambda ch: on_change(self, ch), names="value")
        self.remove.on_click(lambda _: on_remove(self))
        self.box = w.HBox([*self.fields(), self.remove, self.error])

    def fields(self):
        return [self.name, self.host, self.port, self.memory, self.cpu_share, self.kind, self.role]

    def to_raw(self) -> dict:
        raw = {"name": self.name.value.strip()}
        for key, x in (("host", self.host), ("port", self.port), ("memory_gib", self.memory),
                       ("cpu_share", self.cpu_share)):
            v = x.value.strip() if key == "host" else _num(x.value)
            if v not in (None, ""):
                raw[key] = v
        if self.kind.value:
            raw["kind"] = self.kind.value
        return raw


DEVICE_HEADER = [("name", 120), ("host", 130), ("port", 70), ("memory GiB", 80), ("cpu share", 70), ("kind", 170),
                 ("role", 80)]
CONSTRAINT_FIELDS = (("context_tokens", "1024"), ("sequences", "1"), ("memory_headroom", "0.0"), ("max_stages", "none"))


class TestbedEditor(_View):
    """Edit a testbed: devices, the link matrix, defaults and constraints; validate as you type; save TOML
    keeping the comments of the original file (only changed values are rewritten).

    `.testbed` is the edited Testbed (raises ConfigError while invalid); `.errors` the current messages.
    on_up / on_down / on_status are called with the Testbed by the buttons; what they return is shown.
    """

    __test__ = False  # not a pytest class, despite the name

    def __init__(self, testbed_or_path, on_up=None, on_down=None, on_status=None):
        if isinstance(testbed_or_path, Testbed):
            tb = testbed_or_path
            self.path = Path(tb.path) if tb.path and Path(tb.path).is_file() else None
            text = self.path.read_text() if self.path is not None else ""
            if self.path is None or not tomledit.same(testbed_mod.loads(text, str(self.path)), tb):
                text = testbed_mod.dumps(tb)  # changed since loaded: start from its plain TOML
        else:
            self.path = Path(testbed_or_path)
            text = self.path.read_text()
        self.original = testbed_mod.loads(text, str(self.path or "<editor>"))  # raises on a broken file, by design
        self._doc = tomledit.parse(text)  # saves rewrite only changed values in it (ui/tomledit.py)
        self._testbed: Testbed | None = self.original
        self._errors: list[str] = []
        self._quiet = False  # set while the editor itself changes widgets
        self.comments_kept = True  # False after a save that had to fall back to plain TOML
        raw = tomledit.plain(self._doc)
        self._extra_top = {k: raw[k] for k in ("token_file", "description", "shared_cores") if k in raw}

        self.name = w.Text(raw.get("name", ""), description="testbed", layout=w.Layout(width="320px"))
        self.name_error = _error_label()
        self.rows: list[_DeviceRow] = []
        for i, d in enumerate(raw.get("device", [])):
            role = "source" if d.get("name") == raw.get("source") else ("cloud" if d.get("name") == raw.get("cloud") else "")
            self.rows.append(self._make_row(d, role, i))
        self.devices_box = w.VBox()
        self.devices_error = _error_label()
        self.add_button = w.Button(description="add device", icon="plus")
        self.add_button.on_click(lambda _: self.add_device())

        defaults = raw.get("defaults", {})
        self.default_bandwidth = w.Text(_text(defaults.get("bandwidth_mbit_s")), placeholder="1000",
                                        description="bandwidth Mbit/s", style={"description_width": "initial"})
        self.default_latency = w.Text(_text(defaults.get("latency_ms")), placeholder="0.5",
                                      description="latency ms", style={"description_width": "initial"})
        self.defaults_error = _error_label()
        # explicit link values per ordered pair of rows; "" = the default. Keyed by row so renames keep them.
        self._links: dict[tuple[_DeviceRow, _DeviceRow], list[str]] = {}
        by_name = {r.name.value: r for r in self.rows}
        for lk in raw.get("link", []):
            a, b = by_name.get(lk.get("src")), by_name.get(lk.get("dst"))
            if a is None or b is None:
                continue
            pairs = [(a, b)] if lk.get("directed", False) else [(a, b), (b, a)]
            for p in pairs:
                self._links[p] = [_text(lk.get("bandwidth_mbit_s")), _text(lk.get("latency_ms"))]
        self.links_box = w.VBox()
        self.links_error = _error_label()

        cons = raw.get("constraints", {})
        self.constraint_fields = {k: w.Text(_text(cons.get(k)), placeholder=ph, description=k,
                                            style={"description_width": "initial"}, layout=w.Layout(width="260px"))
                                  for k, ph in CONSTRAINT_FIELDS}
        self.exclude = w.SelectMultiple(description="exclude", rows=4)
        self.require = w.SelectMultiple(description="require", rows=4)
        self.constraint_errors = {k: _error_label() for k in (*self.constraint_fields, "exclude", "require")}
        self.constraints_error = _error_label()
        self._set_options(cons.get("exclude", []), cons.get("require", []))

        self.general_error = _error_label()
        self.status = w.HTML("")
        self.save_path = w.Text(str(self.path or ""), placeholder="testbed.toml", description="save to")
        self.save_button = w.Button(description="save", icon="save")
        self.save_button.on_click(lambda _: self._save_clicked())
        self.up_button = w.Button(description="up", icon="play", disabled=on_up is None)
        self.down_button = w.Button(description="down", icon="stop", disabled=on_down is None)
        self.health_button = w.Button(description="health", icon="heartbeat", disabled=on_status is None)
        self.output = w.HTML("")
        for button, fn in ((self.up_button, on_up), (self.down_button, on_down), (self.health_button, on_status)):
            button.on_click(lambda _, fn=fn: self._call(fn))

        for x in (self.name, self.default_bandwidth, self.default_latency, self.exclude, self.require,
                  *self.constraint_fields.values()):
            x.observe(lambda _: self.validate(), names="value")
        self._rebuild()
        self.widget = w.VBox([
            w.HBox([self.name, self.name_error]),
            w.HTML("<b>devices</b>"), self.devices_box, w.HBox([self.add_button, self.devices_error]),
            w.HTML("<b>links</b> (row sends to column; empty = default)"),
            w.HBox([self.default_bandwidth, self.default_latency, self.defaults_error]),
            self.links_box, self.links_error,
            w.HTML("<b>constraints</b>"),
            *[w.HBox([x, self.constraint_errors[k]]) for k, x in self.constraint_fields.items()],
            w.HBox([self.exclude, self.constraint_errors["exclude"], self.require, self.constraint_errors["require"]]),
            self.constraints_error, self.general_error,
            w.HBox([self.save_path, self.save_button, self.up_button, self.down_button, self.health_button]),
            self.status, self.output])
        self.validate()

    # --- rows and matrix ----------------------------------------------------------------------------------
    def _make_row(self, raw: dict, role: str, orig_index: int | None) -> _DeviceRow:
        return _DeviceRow(raw, role, orig_index, self._row_changed, self.remove_device)

    def add_device(self, name: str | None = None, memory_gib: float = 4.0, **fields) -> _DeviceRow:
        taken = {r.name.value for r in self.rows}
        i = len(self.rows) + 1
        while name is None or name in taken:
            name, i = f"device{i}", i + 1
        raw = {"name": name, "memory_gib": memory_gib, **fields}
        row = self._make_row(raw, "", None)
        self.rows.append(row)
        self._rebuild()
        self.validate()
        return row

    def remove_device(self, row: _DeviceRow | str) -> None:
        row = self.row(row) if isinstance(row, str) else row
        self.rows.remove(row)
        self._links = {p: v for p, v in self._links.items() if row not in p}
        self._rebuild()
        self.validate()

    def row(self, name: str) -> _DeviceRow:
        for r in self.rows:
            if r.name.value == name:
                return r
        raise KeyError(f"no device row named {name!r}")

    def _row_changed(self, row: _DeviceRow, change) -> None:
        if self._quiet:
            return
        if change["owner"] is row.role and change["new"]:
            self._quiet = True  # one source and one cloud: taking a role clears it elsewhere
            for r in self.rows:
                if r is not row and r.role.value == change["new"]:
                    r.role.value = ""
            self._quiet = False
        if change["owner"] is row.name:
            self._rebuild()
        self.validate()

    def _set_options(self, exclude, require) -> None:
        names = tuple(r.name.value for r in self.rows)
        self._quiet = True
        for x, value in ((self.exclude, exclude), (self.require, require)):
            x.options = names
            x.value = tuple(v for v in value if v in names)
        self._quiet = False

    def _rebuild(self) -> None:
        """Redraw the device table, the link matrix and the constraint choices after rows changed."""
        # same widths and margins as the row's fields, so the titles sit over their columns
        header = w.HBox([w.HTML(f'<b style="white-space:nowrap">{t}</b>', layout=w.Layout(width=f"{px}px", margin="2px")) for t, px in DEVICE_HEADER])
        self.devices_box.children = [header] + [r.box for r in self.rows]
        # selections are by name: a renamed device drops out of exclude/require
        self._set_options(self.exclude.value, self.require.value)
        self.bandwidth_cells, self.latency_cells = {}, {}
        grids = []
        for title, cells, idx in (("bandwidth Mbit/s", self.bandwidth_cells, 0), ("latency ms", self.latency_cells, 1)):
            n = len(self.rows)
            items = [w.HTML(f"<i>{title}</i>")] + [w.HTML(f"<b>{html.escape(r.name.value)}</b>") for r in self.rows]
            for a in self.rows:
                items.append(w.HTML(f"<b>{html.escape(a.name.value)}</b>"))
                for b in self.rows:
                    if a is b:
                        items.append(w.HTML("-"))
                        continue
                    cell = w.Text(self._links.get((a, b), ["", ""])[idx], layout=w.Layout(width="80px"))
                    cell.observe(lambda ch, a=a, b=b, idx=idx: self._cell_changed(a, b, idx, ch["new"]), names="value")
                    cells[(a.name.value, b.name.value)] = cell
                    items.append(cell)
            grids.append(w.GridBox(items, layout=w.Layout(grid_template_columns=f"repeat({n + 1}, max-content)",
                                                          grid_gap="2px 6px")))
        self.links_box.children = grids

    def _cell_changed(self, a, b, idx, value) -> None:
        v = self._links.setdefault((a, b), ["", ""])
        v[idx] = value.strip()
        if v == ["", ""]:
            del self._links[(a, b)]
        self.validate()

    def set_link(self, src: str, dst: str, bandwidth_mbit_s=None, latency_ms=None, directed: bool = False) -> None:
        """Fill matrix cells as a user would (both directions unless directed)."""
        pairs = [(src, dst)] if directed else [(src, dst), (dst, src)]
        for p in pairs:
            if bandwidth_mbit_s is not None:
                self.bandwidth_cells[p].value = str(bandwidth_mbit_s)
            if latency_ms is not None:
                self.latency_cells[p].value = str(latency_ms)

    # --- the testbed --------------------------------------------------------------------------------------
    def to_raw(self) -> dict:
        """The TOML structure the widgets describe (what testbed.from_dict validates)."""
        raw: dict = {"name": self.name.value.strip()}
        for role in ("source", "cloud"):
            named = [r.name.value.strip() for r in self.rows if r.role.value == role]
            if named:
                raw[role] = named[0]
        raw.update(self._extra_top)
        defaults = {k: _num(x.value) for k, x in (("bandwidth_mbit_s", self.default_bandwidth),
                                                  ("latency_ms", self.default_latency)) if _num(x.value) is not None}
        if defaults:
            raw["defaults"] = defaults
        cons = {k: _num(x.value) for k, x in self.constraint_fields.items() if _num(x.value) is not None}
        if self.exclude.value:
            cons["exclude"] = list(self.exclude.value)
        if self.require.value:
            cons["require"] = list(self.require.value)
        if cons:
            raw["constraints"] = cons
        raw["device"] = [r.to_raw() for r in self.rows]
        links = []
        for a in self.rows:  # rows order, so link[i] in an error message maps back to a cell
            for b in self.rows:
                v = self._links.get((a, b))
                if a is b or v is None:
                    continue
                lk = {"src": a.name.value.strip(), "dst": b.name.value.strip(), "directed": True}
                for key, text in zip(("bandwidth_mbit_s", "latency_ms"), v):
                    if _num(text) is not None:
                        lk[key] = _num(text)
                links.append(lk)
        if links:
            raw["link"] = links
        return raw

    def validate(self) -> list[str]:
        """Check the edited values with testbed.from_dict; show the first error next to its field."""
        if self._quiet:
            return self._errors
        labels = [self.name_error, self.devices_error, self.defaults_error, self.links_error, self.constraints_error,
                  self.general_error, *self.constraint_errors.values(), *(r.error for r in self.rows)]
        for label in labels:
            _show_error(label, "")
        raw = self.to_raw()
        try:
            self._testbed = testbed_mod.from_dict(raw, str(self.path or "<editor>"))
            self._errors = []
            self.status.value = f'<span style="color:green">valid: {len(self.rows)} device(s)</span>'
        except ConfigError as e:
            self._testbed = None
            label, context = self._label_for(e, raw)
            self._errors = [str(e)]
            _show_error(label, context + e.problem + (f" ({e.fix})" if e.fix else ""))
            self.status.value = f'<span style="color:#b00">invalid: {html.escape(str(e))}</span>'
        return self._errors

    def _label_for(self, e: ConfigError, raw: dict) -> tuple[w.HTML, str]:
        """Which error label sits next to the field the ConfigError is about, and words that locate it there,
        from the error's section/index/key (config/errors.py). raw is what was validated: its device and link
        lists are in the order of self.rows and of the link entries to_raw wrote, so an index finds its row."""
        if e.section == "device":
            ok = e.index is not None and 0 <= e.index < len(self.rows)
            return (self.rows[e.index].error if ok else self.devices_error), ""
        if e.section == "link":
            links = raw.get("link", [])
            if e.index is not None and 0 <= e.index < len(links):
                lk = links[e.index]
                return self.links_error, f"link {lk['src']} -> {lk['dst']}: "
            return self.links_error, ""
        if e.section == "defaults":
            return self.defaults_error, ""
        if e.section == "constraints":
            return self.constraint_errors.get(e.key, self.constraints_error), ""
        if e.section is None and e.key == "name":
            return self.name_error, ""
        if e.section is None and e.key in ("source", "cloud"):
            return self.devices_error, ""  # the role dropdowns sit in the device rows
        return self.general_error, ""

    @property
    def errors(self) -> list[str]:
        return list(self._errors)

    @property
    def testbed(self) -> Testbed:
        self.validate()
        if self._testbed is None:
            return testbed_mod.from_dict(self.to_raw(), str(self.path or "<editor>"))  # raises the ConfigError
        return self._testbed

    # --- saving -------------------------------------------------------------------------------------------
    def toml(self) -> str:
        """The edited testbed as TOML: the original document with only the changed values rewritten, so the
        user's comments survive; plain testbed.dumps when that round trip would not reproduce the testbed."""
        tb = self.testbed
        text, self.comments_kept = tomledit.edited_toml(self._doc, self.to_raw(), [r.orig_index for r in self.rows],
                                                        tb)
        return text

    def save(self, path: str | Path | None = None) -> Path:
        path = Path(path) if path is not None else self.path
        if path is None:
            raise ValueError("no path: pass save(path) (the testbed was not loaded from a file)")
        text = self.toml()
        path.write_text(text)
        # the saved file is the new original: later saves diff against it
        self._doc = tomledit.parse(text)
        self.path = path
        self.original = testbed_mod.loads(text, str(path))
        for i, r in enumerate(self.rows):
            r.orig_index = i
        self.status.value = f"saved {html.escape(str(path))}" + ("" if self.comments_kept else
                                                                  " (rewritten as plain TOML: comments could not be kept)")
        return path

    def _save_clicked(self) -> None:
        try:
            self.save(self.save_path.value.strip() or None)
        except (ConfigError, ValueError, OSError) as e:
            self.status.value = f'<span style="color:#b00">not saved: {html.escape(str(e))}</span>'

    def _call(self, fn) -> None:
        try:
            result = fn(self.testbed)
            self.output.value = f"<pre>{html.escape(_describe(result))}</pre>"
        except Exception as e:  # shown, not raised: a button handler's exception would vanish in the kernel log
            self.output.value = f'<pre style="color:#b00">{html.escape(type(e).__name__ + ": " + str(e))}</pre>'


def _describe(result) -> str:
    if result is None:
        return "done"
    if isinstance(result, dict):
        return "\n".join(f"{k}: {v}" for k, v in result.items())
    return str(result)


# --- planner view -------------------------------------------------------------------------------------------
def scaled_link(testbed: Testbed, profile, src: str, dst: str, factor: float):
    """(testbed, profile) with the link src <-> dst (both directions) at `factor` times the bandwidth the cost
    model uses now. A profile's measured link overrides the testbed, so it is scaled there too."""
    from edgeshard.planning.costs import CostModel
    cm = CostModel(testbed, profile)
    tb, links = testbed, list(profile.links)
    for a, b in ((src, dst), (dst, src)):
        bw, _ = cm.link(a, b)
        tb = tb.with_link(a, b, bandwidth_mbit_s=bw * factor / testbed_mod.MBIT_S, directed=True)
        links = [dataclasses.replace(lk, bandwidth_bytes_s=lk.bandwidth_bytes_s * factor)
                 if (lk.src, lk.dst) == (a, b) else lk for lk in links]
    return tb, dataclasses.replace(profile, links=tuple(links))


class PlannerView(_View):
    """Objective and workload in, strategy comparison, the plan, a diff of any two plans, and a what-if
    slider scaling one link's bandwidth (re-plans and diffs against the unscaled plan)."""

    def __init__(self, testbed: Testbed, profile, objective: str = "latency", workload: Workload = Workload()):
        self.testbed, self.profile = testbed, profile
        self.objective = w.Dropdown(options=list(OBJECTIVES), value=objective, description="objective")
        self.prompt_tokens = w.BoundedIntText(workload.prompt_tokens, min=1, max=10**7, description="prompt tokens",
                                              style={"description_width": "initial"})
        self.new_tokens = w.BoundedIntText(workload.new_tokens, min=1, max=10**7, description="new tokens",
                                           style={"description_width": "initial"})
        self.table = w.HTML()
        self.shown = w.Dropdown(options=list(baselines.STRATEGIES), value="edgeshard", description="show plan")
        self.plan_box = w.VBox()
        self.diff_a = w.Dropdown(description="diff A")
        self.diff_b = w.Dropdown(description="B")
        self.diff_text = w.HTML()
        self.diff_box = w.VBox()
        self.link = w.Dropdown(options=self._link_options(), description="link")
        self.scale = w.FloatLogSlider(value=1.0, base=10, min=-2, max=2, step=0.05, description="bandwidth x",
                                      continuous_update=False, readout_format=".3g")
        self.whatif_text = w.HTML()
        self.whatif_box = w.VBox()
        self.figures: dict = {}  # name -> the bokeh model shown, for tests and export
        self.plans: dict = {}
        self.candidates: dict = {}
        self.whatif_plan = None
        self.error = w.HTML()
        for x in (self.objective, self.prompt_tokens, self.new_tokens):
            x.observe(lambda _: self.refresh(), names="value")
        self.shown.observe(lambda _: self._show_plan(), names="value")
        self._quiet = False
        for x in (self.diff_a, self.diff_b):
            x.observe(lambda _: None if self._quiet else self._show_diff(), names="value")
        for x in (self.link, self.scale):
            x.observe(lambda _: None if self._quiet else self._show_whatif(), names="value")
        self.widget = w.VBox([w.HBox([self.objective, self.prompt_tokens, self.new_tokens]), self.error,
                              w.HTML("<b>strategies</b>"), self.table, self.shown, self.plan_box,
                              w.HTML("<b>diff</b>"), w.HBox([self.diff_a, self.diff_b]), self.diff_text, self.diff_box,
                              w.HTML("<b>what if</b>"), w.HBox([self.link, self.scale]), self.whatif_text,
                              self.whatif_box])
        self.refresh()

    def _link_options(self):
        names = self.testbed.names
        return [(f"{a} <-> {b}", (a, b)) for i, a in enumerate(names) for b in names[i + 1:]]

    def set_inputs(self, testbed: Testbed | None = None, profile=None) -> None:
        """Plan again for a new testbed (e.g. TestbedEditor(...).testbed) and/or profile."""
        self.testbed = testbed or self.testbed
        self.profile = profile or self.profile
        old = self.link.value
        self._quiet = True
        self.link.options = self._link_options()
        if old in [v for _, v in self.link.options]:
            self.link.value = old
        self._quiet = False
        self.refresh()

    @property
    def workload(self) -> Workload:
        return Workload(int(self.prompt_tokens.value), int(self.new_tokens.value))

    def refresh(self) -> None:
        """Re-plan every strategy for the current objective and workload, and every view after it."""
        obj, wl = self.objective.value, self.workload
        self.plans = baselines.plan_all(self.testbed, self.profile, obj, wl)
        cands = {f"{s} / {obj}": p for s, p in self.plans.items()}
        for o in OBJECTIVES:  # the exact plan for the other objectives, e.g. latency vs throughput
            if o != obj:
                cands[f"edgeshard / {o}"] = baselines.plan_with("edgeshard", self.testbed, self.profile, o, wl)
        self.candidates = cands
        self.table.value = TABLE_STYLE + comparison_html(self.plans)
        labels = list(cands)
        old_a, old_b = self.diff_a.value, self.diff_b.value
        default_b = "edgeshard / " + ("throughput" if obj != "throughput" else "latency")  # the classic contrast
        self._quiet = True  # the option swap below fires observers with half-updated choices
        self.diff_a.options, self.diff_b.options = labels, labels
        self.diff_a.value = old_a if old_a in labels else f"edgeshard / {obj}"
        self.diff_b.value = old_b if old_b in labels else default_b
        self._quiet = False
        self._show_plan()
        self._show_diff()
        self._show_whatif()

    def _put(self, box: w.Box, name: str, model) -> None:
        self.figures[name] = model
        box.children = [bokeh_widget(model)] if model is not None else []

    def _show_plan(self) -> None:
        plan = self.plans.get(self.shown.value)
        if plan is not None:
            self._put(self.plan_box, "plan", plots.plan_figure(plan, self.testbed, self.profile))

    def diff(self, a: str, b: str) -> None:
        """Show the diff of two candidate plans (labels of .candidates), as the dropdowns would."""
        self.diff_a.value, self.diff_b.value = a, b

    def _show_diff(self) -> None:
        a, b = self.candidates.get(self.diff_a.value), self.candidates.get(self.diff_b.value)
        if a is None or b is None:
            return
        if not a.stages or not b.stages:
            self.diff_text.value = "<i>one of the plans has no stages (infeasible)</i>"
            self._put(self.diff_box, "diff", None)
            return
        self.diff_text.value = f"<pre>{html.escape(format_diff(a, b, self.diff_a.value, self.diff_b.value))}</pre>"
        self._put(self.diff_box, "diff", plots.plan_diff_figure(a, b, "A", "B", self.testbed))

    def _show_whatif(self) -> None:
        base = self.plans.get("edgeshard")
        if base is None or self.link.value is None:
            return
        src, dst = self.link.value
        tb, pr = scaled_link(self.testbed, self.profile, src, dst, self.scale.value)
        plan = baselines.plan_with("edgeshard", tb, pr, self.objective.value, self.workload)
        self.whatif_plan = plan
        if not plan.feasible or not base.feasible:
            self.whatif_text.value = f"<i>infeasible: {html.escape('; '.join(plan.notes or base.notes))}</i>"
            self._put(self.whatif_box, "whatif", None)
            return
        name = f"{src}<->{dst} x{self.scale.value:.3g}"
        self.whatif_text.value = f"<pre>{html.escape(format_diff(base, plan, 'as is', name))}</pre>"
        self._put(self.whatif_box, "whatif", plots.plan_diff_figure(base, plan, "as is", name, tb))


# --- profile view -------------------------------------------------------------------------------------------
class ProfileView(_View):
    """Per-unit costs per device (decode and prefill, log scale) and the link bandwidth heatmap."""

    def __init__(self, profile, testbed: Testbed):
        self.profile, self.testbed = profile, testbed
        self.figures = {"decode": plots.unit_cost_figure(profile),
                        "prefill": plots.unit_cost_figure(profile, "prefill_s_per_token"),
                        "bandwidth": plots.bandwidth_heatmap(testbed, profile)}
        method = profile.provenance.get("method", "?") if isinstance(profile.provenance, dict) else "?"
        head = w.HTML(f"<b>{html.escape(profile.model)}</b> ({html.escape(profile.dtype)}), {profile.n_units} units, "
                      f"{len(profile.devices)} device(s), provenance: {html.escape(str(method))}")
        self.widget = w.VBox([head] + [bokeh_widget(m) for m in self.figures.values()])


# --- live run -----------------------------------------------------------------------------------------------
def result_text(result) -> str:
    """The generated text of a run result ({"results": [{"text"}]}, a list of those, or a string)."""
    if result is None:
        return ""
    if isinstance(result, str):
        return result
    if isinstance(result, dict):
        if "results" in result:
            return result_text(result["results"])
        return str(result.get("text", ""))
    if isinstance(result, (list, tuple)):
        return "\n\n".join(result_text(r) for r in result)
    return str(getattr(result, "text", result))


def _is_done(handle) -> bool:
    """runtime.Run has a bool property `done`; other handles may give a threading.Event or a method."""
    d = handle.done
    if hasattr(d, "is_set"):
        return d.is_set()
    return bool(d() if callable(d) else d)


def run_reference(handle) -> dict:
    """LiveRunPlot keywords for what a run handle (runtime.Run) does: its mode, sequences in flight (pipeline: its
    prompts, at most max_in_flight), testbed and profile (to recompute the prediction for those sequences and
    check the devices' shared cores). {} when the handle does not say its mode."""
    mode = getattr(handle, "mode", None)
    if mode not in ("sequential", "pipeline"):
        return {}
    prompts = getattr(handle, "prompts", None)
    n = len(prompts) if isinstance(prompts, (list, tuple)) and prompts else None
    limit = getattr(handle, "max_in_flight", None)
    if mode == "pipeline" and n and isinstance(limit, int) and limit > 0:
        n = min(n, limit)
    profile = getattr(handle, "profile", None)
    if isinstance(profile, (str, os.PathLike)):
        try:
            from edgeshard.config.profile import load
            profile = load(profile)
        except Exception:
            profile = None
    return {"mode": mode, "sequences": n, "testbed": getattr(handle, "tb", None), "profile": profile}


class RunView(_View):
    """Start a run without blocking the kernel, watch it live, stop it.

    start() must return a handle with .events (queue.Queue of event dicts; a None marks the end, as
    runtime.Run does), .stop(), .done (bool property, method or threading.Event), .result and optionally
    .error, e.g. `RunView(lambda: runtime.Run(tb, plan, model, prompts, 32, state=state).start(), plan)`.
    The Start button calls start() and schedules pump() on the kernel's asyncio loop every poll_s seconds;
    pump() drains the queue into the LiveRunPlot and the text box, on that loop only (never from the run's
    thread). Without a running loop (a plain script), call pump() yourself until it returns False.
    """

    def __init__(self, start, plan=None, poll_s: float = 0.2, max_events_per_pump: int = 5000):
        self.start_fn, self.plan, self.poll_s = start, plan, poll_s
        self.max_events = max_events_per_pump
        self.handle = None
        self.events: list[dict] = []  # everything received, for a final report
        self.pumps = 0
        self.live = plots.LiveRunPlot(plan)
        self.start_button = w.Button(description="start", icon="play", button_style="success")
        self.stop_button = w.Button(description="stop", icon="stop", button_style="danger", disabled=True)
        self.status = w.HTML("idle")
        self.text = w.Textarea("", placeholder="generated text", layout=w.Layout(width="100%", height="120px"))
        self.plot_box = w.VBox([bokeh_widget(self.live.layout)])
        self.report_button = w.Button(description="report", icon="file", disabled=True,
                                      tooltip="write report.html into the run folder")
        self.start_button.on_click(lambda _: self.start())
        self.stop_button.on_click(lambda _: self.stop())
        self.report_button.on_click(lambda _: self.write_report())
        self.report_path = None
        self.widget = w.VBox([w.HBox([self.start_button, self.stop_button, self.report_button, self.status]),
                              self.plot_box, self.text])
        self._texts: dict = {}  # seq -> text so far (pipeline mode interleaves sequences)
        self.run_dir = None
        self._ended = self._stop_requested = False
        self._errors: list[str] = []

    @property
    def running(self) -> bool:
        return self.handle is not None and not self._ended

    def start(self) -> None:
        if self.running:
            return
        self.live = plots.LiveRunPlot(self.plan)  # a fresh plot per run
        self.plot_box.children = [bokeh_widget(self.live.layout)]
        self.events, self._texts, self._errors, self.run_dir = [], {}, [], None
        self.report_button.disabled = True
        self.text.value, self._ended, self._stop_requested = "", False, False
        self.status.value = "starting"
        try:
            self.handle = self.start_fn()
        except Exception as e:
            self.handle = None
            self.status.value = f'<span style="color:#b00">start failed: {html.escape(type(e).__name__ + ": " + str(e))}</span>'
            return
        reference = run_reference(self.handle)
        if reference:  # the run says its mode and sequences: reference lines for what it really does
            self.live = plots.LiveRunPlot(self.plan if self.plan is not None else getattr(self.handle, "plan", None),
                                          **reference)
            self.plot_box.children = [bokeh_widget(self.live.layout)]
        self.start_button.disabled, self.stop_button.disabled = True, False
        self.status.value = "running"
        self._schedule()

    def stop(self) -> None:
        if self.running:
            self._stop_requested = True
            self.handle.stop()
            self.status.value = "stopping"
        self.stop_button.disabled = True

    def _schedule(self) -> None:
        try:
            loop = asyncio.get_running_loop()  # the kernel's loop, when called from a cell or a click handler
        except RuntimeError:
            return
        loop.call_later(self.poll_s, self._tick)

    def _tick(self) -> None:
        if self.pump():
            self._schedule()

    def pump(self) -> bool:
        """Drain queued events into the plot and text; returns True while the run goes on."""
        if self.handle is None or self._ended:
            return False
        self.pumps += 1
        batch, end_marker = [], False
        try:
            while len(batch) < self.max_events:
                e = self.handle.events.get_nowait()
                if e is None:
                    end_marker = True
                    break
                batch.append(e)
        except queue.Empty:
            pass
        if batch:
            bad = self.live.bad_events
            try:
                self._take(batch)
            except Exception as e:  # a malformed event must not stop the pump: the Stop button has to keep working
                self._errors.append(f"bad event: {e!r}")
            if self.live.bad_events > bad:
                self._errors.append(f"bad event(s) skipped: {self.live.bad_events}")
        if end_marker or (_is_done(self.handle) and self.handle.events.empty()):
            self._finish()
            return False
        rate = self.live.rate.data["tokens_per_s"]
        self.status.value = f"running: {self.live.count} tokens" + (f", {rate[-1]:.3g} tokens/s" if rate else "") + \
            self._error_html()
        return True

    def _take(self, batch: list[dict]) -> None:
        self.events += batch
        self.live.push(batch)
        changed = False
        for e in batch:
            if not isinstance(e, dict):
                continue
            kind = plots.event_type(e)
            if kind == "token" and isinstance(e.get("text"), str):
                self._texts[e.get("seq", 0)] = self._texts.get(e.get("seq", 0), "") + e["text"]
                changed = True
            elif kind == "seq_done" and isinstance(e.get("text"), str):
                self._texts[e.get("seq", 0)] = e["text"]  # the detokenised whole beats the sum of pieces
                changed = True
            elif kind == "error":
                self._errors.append(f"{e.get('device', '?')}: {e.get('message', e)}")
        if changed:
            self.text.value = self._joined(self._texts)

    @staticmethod
    def _joined(texts: dict) -> str:
        if len(texts) == 1:
            return next(iter(texts.values()))
        return "\n\n".join(f"[{seq}] {t}" for seq, t in sorted(texts.items(), key=lambda kv: str(kv[0])))

    def _error_html(self) -> str:
        return "".join(f' <span style="color:#b00">{html.escape(m)}</span>' for m in self._errors[-3:])

    def _finish(self) -> None:
        self._ended = True
        result = getattr(self.handle, "result", None)
        if not self._texts:
            self.text.value = result_text(result)
        err = getattr(self.handle, "error", None)
        if err is not None:
            self._errors.append(f"{type(err).__name__}: {err}")
        stopped = self._stop_requested or (isinstance(result, dict) and result.get("stopped"))
        self.run_dir = result.get("run_dir") if isinstance(result, dict) else None
        where = f", run folder {html.escape(str(self.run_dir))}" if self.run_dir else ""
        self.status.value = f"{'stopped' if stopped else 'done'}: {self.live.count} tokens{where}" + self._error_html()
        self.start_button.disabled, self.stop_button.disabled = False, True
        self.report_button.disabled = not self.run_dir

    def write_report(self):
        """Render the finished run's folder to report.html (report.render) and show where it went."""
        from edgeshard.ui.report import render
        try:
            self.report_path = render(self.run_dir)
            self.status.value += f"<br>report: {html.escape(str(self.report_path))}"
        except Exception as e:  # shown: an exception in a click handler only reaches the kernel log
            self.status.value += f'<br><span style="color:#b00">report failed: {html.escape(repr(e))}</span>'
        return self.report_path
