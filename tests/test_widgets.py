"""Widget logic, headless: set values, click buttons, assert state and the TOML / plans they produce."""

import asyncio
import queue
import textwrap
import threading
import time

import pytest
from bokeh.models import ColumnDataSource

from edgeshard.config import testbed
from edgeshard.config.errors import ConfigError
from edgeshard.config.plan import diff
from edgeshard.config.profile import Profile
from edgeshard.config.testbed import MBIT_S, Link
from edgeshard.planning import baselines, synthetic
from edgeshard.planning.costs import CostModel, Workload
from edgeshard.ui.widgets import PlannerView, ProfileView, RunView, TestbedEditor, scaled_link

TESTBED = """\
# A small edge testbed (comment at the top)
name = "lab"   # the lab bench
source = "nx1"
cloud = "rtx"

[defaults]
bandwidth_mbit_s = 100  # wifi
latency_ms = 1

# per-sequence KV reservation
[constraints]
context_tokens = 512

[[device]]
name = "nx1"  # holds the prompt
memory_gib = 14
kind = "jetson-orin-nx-16gb"

[[device]]
name = "agx"
memory_gib = 29  # 32 GB board
kind = "jetson-agx-orin-32gb"

[[device]]
name = "rtx"
memory_gib = 22
kind = "rtx-3090-24gb"

[[link]]
src = "nx1"
dst = "rtx"
bandwidth_mbit_s = 10  # slow uplink
"""


@pytest.fixture
def path(tmp_path):
    p = tmp_path / "lab.toml"
    p.write_text(TESTBED)
    return p


def same(a, b):
    def norm(t):  # with_link appends links, from_dict sorts them
        return t.replace(path=None, links=tuple(sorted(t.links, key=lambda lk: (lk.src, lk.dst))))
    return norm(a) == norm(b)


# --- testbed editor -----------------------------------------------------------------------------------------
def test_untouched_editor_saves_the_file_byte_for_byte(path, tmp_path):
    ed = TestbedEditor(path)
    assert ed.errors == []
    assert same(ed.testbed, testbed.load(path))
    assert ed.save(tmp_path / "out.toml").read_text() == TESTBED


def test_edits_keep_comments_and_produce_the_edited_testbed(path):
    ed = TestbedEditor(path)
    ed.row("agx").memory.value = "30"
    ed.row("rtx").name.value = "gpu"  # rename: the cloud role and the links follow
    ed.add_device("pi", 2, kind="jetson-orin-nx-16gb")
    ed.set_link("agx", "gpu", bandwidth_mbit_s=500)
    ed.latency_cells[("nx1", "gpu")].value = "7"  # one direction of the symmetric slow link
    ed.constraint_fields["max_stages"].value = "3"
    ed.default_latency.value = "2"
    ed.exclude.value = ("pi",)
    assert ed.errors == []
    ed.save()
    text = path.read_text()
    assert ed.comments_kept
    for comment in ("# A small edge testbed", "# the lab bench", "# wifi", "# per-sequence KV reservation",
                    "# holds the prompt", "# 32 GB board", "# slow uplink"):
        assert comment in text, comment
    tb = testbed.load(path)
    assert same(tb, ed.testbed)
    assert tb.cloud == "gpu" and tb.device("agx").memory_gib == 30 and tb.device("pi").memory_gib == 2
    assert tb.link("agx", "gpu").bandwidth_mbit_s == pytest.approx(500)
    assert tb.link("gpu", "agx").bandwidth_mbit_s == pytest.approx(500)
    assert tb.link("nx1", "gpu").latency_s == pytest.approx(0.007)
    assert tb.link("gpu", "nx1").latency_s == pytest.approx(0.002)  # the new default: it was never explicit
    assert tb.link("gpu", "nx1").bandwidth_mbit_s == pytest.approx(10)
    assert tb.constraints.max_stages == 3 and tb.constraints.exclude == ("pi",)
    assert "memory_gib = 30  # 32 GB board" in text  # the value changed in place, its comment kept
    # a second save without edits changes nothing
    before = path.read_text()
    ed.save()
    assert path.read_text() == before


def test_remove_device_drops_its_links_and_constraints(path):
    ed = TestbedEditor(path)
    ed.require.value = ("rtx",)
    ed.remove_device("rtx")  # the cloud role, the require entry and the link go with the row
    assert ed.errors == [] and ed.testbed.cloud is None
    ed.row("agx").role.value = "cloud"
    assert ed.errors == []
    tb = ed.testbed
    assert tb.names == ("nx1", "agx") and tb.cloud == "agx" and tb.links == () and tb.constraints.require == ()
    text = ed.toml()
    assert "rtx" not in text and "# holds the prompt" in text


def test_validation_errors_appear_next_to_the_field(path):
    ed = TestbedEditor(path)
    ed.row("agx").port.value = "abc"
    assert len(ed.errors) == 1 and "port = 'abc' is not an integer" in ed.errors[0]
    assert "port" in ed.row("agx").error.value and ed.row("nx1").error.value == ""
    with pytest.raises(ConfigError):
        ed.testbed
    ed.row("agx").port.value = "70000"
    assert "not a TCP port" in ed.row("agx").error.value
    ed.row("agx").port.value = ""
    assert ed.errors == [] and ed.row("agx").error.value == ""

    ed.constraint_fields["sequences"].value = "-1"
    assert "sequences = -1" in ed.constraint_errors["sequences"].value
    ed.constraint_fields["sequences"].value = ""
    ed.constraint_fields["memory_headroom"].value = "1.5"
    assert "memory_headroom" in ed.constraint_errors["memory_headroom"].value
    ed.constraint_fields["memory_headroom"].value = ""

    ed.bandwidth_cells[("agx", "rtx")].value = "-5"
    assert "link agx -&gt; rtx" in ed.links_error.value and "greater than zero" in ed.links_error.value
    ed.bandwidth_cells[("agx", "rtx")].value = ""

    ed.default_bandwidth.value = "fast"
    assert "bandwidth_mbit_s" in ed.defaults_error.value
    ed.default_bandwidth.value = "100"

    agx = ed.row("agx")
    agx.name.value = "nx1"
    assert "defined twice" in agx.error.value and ed.rows[0].error.value == ""
    agx.name.value = "agx"

    ed.row("nx1").role.value = ""  # no source left
    assert "source" in ed.devices_error.value
    ed.row("nx1").role.value = "source"

    ed.exclude.value = ("nx1",)
    assert "source" in ed.constraint_errors["exclude"].value
    ed.exclude.value = ()
    assert ed.errors == []
    assert "valid" in ed.status.value


def test_roles_are_exclusive(path):
    ed = TestbedEditor(path)
    ed.row("agx").role.value = "source"
    assert ed.row("nx1").role.value == ""
    ed.row("nx1").role.value = "cloud"
    assert ed.row("rtx").role.value == ""
    tb = ed.testbed
    assert tb.source == "agx" and tb.cloud == "nx1"


def test_editor_from_a_testbed_object(tmp_path):
    tb = testbed.loads(TESTBED).with_link("agx", "rtx", bandwidth_mbit_s=42)
    ed = TestbedEditor(tb)
    assert same(ed.testbed, tb)
    with pytest.raises(ValueError, match="no path"):
        ed.save()
    out = ed.save(tmp_path / "t.toml")
    assert same(testbed.load(out), tb)


def test_buttons_call_the_given_functions(path):
    seen = []
    ed = TestbedEditor(path, on_up=lambda tb: seen.append(("up", tb.name)) or {"nx1": "up", "agx": "up"},
                       on_status=lambda tb: 1 / 0)
    assert ed.down_button.disabled and not ed.up_button.disabled
    ed.row("agx").memory.value = "31"
    ed.up_button.click()
    assert seen == [("up", "lab")] and "agx: up" in ed.output.value
    ed.health_button.click()
    assert "ZeroDivisionError" in ed.output.value
    ed.row("agx").port.value = "x"
    ed.up_button.click()  # invalid testbed: the error is shown, the function is not called
    assert seen == [("up", "lab")] and "port" in ed.output.value


def test_save_button_writes_the_path_field(path, tmp_path):
    ed = TestbedEditor(path)
    ed.row("agx").memory.value = "28"
    ed.save_path.value = str(tmp_path / "saved.toml")
    ed.save_button.click()
    assert testbed.load(tmp_path / "saved.toml").device("agx").memory_gib == 28
    ed.row("agx").memory.value = "-1"
    ed.save_button.click()
    assert "not saved" in ed.status.value


# --- planner and profile views ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lab():
    tb = testbed.loads(TESTBED)
    return tb, synthetic.synthetic_profile(tb, "llama2-7b")


def stages_of(model):
    d = model.select_one({"type": ColumnDataSource, "name": "stages"}).data
    return list(zip(d["device"], d["start"], d["stop"]))


def test_planner_view_compares_every_strategy(lab):
    tb, pr = lab
    v = PlannerView(tb, pr, workload=Workload(32, 16))
    assert set(v.plans) == set(baselines.STRATEGIES)
    assert not v.plans["edge-solo"].feasible and "OOM" in v.table.value
    best = baselines.plan_with("edgeshard", tb, pr, "latency", Workload(32, 16))
    assert v.plans["edgeshard"] == best
    assert stages_of(v.figures["plan"]) == [(s.device, s.start, s.stop) for s in best.stages]
    v.shown.value = "even"
    assert stages_of(v.figures["plan"]) == [(s.device, s.start, s.stop) for s in v.plans["even"].stages]
    v.objective.value = "throughput"
    assert all(p.objective == "throughput" for p in v.plans.values())
    v.new_tokens.value = 64
    assert v.plans["edgeshard"].workload["new_tokens"] == 64


def test_planner_view_diff_of_two_plans(lab):
    tb, pr = lab
    v = PlannerView(tb, pr)
    assert (v.diff_a.value, v.diff_b.value) == ("edgeshard / latency", "edgeshard / throughput")
    a, b = v.candidates["edgeshard / latency"], v.candidates["edgeshard / throughput"]
    moved = v.figures["diff"].select_one({"type": ColumnDataSource, "name": "moved"}).data
    assert len(moved["start"]) == len(diff(a, b)["moved"]) > 0
    assert "moved" in v.diff_text.value
    v.diff("even / latency", "greedy-fill / latency")
    moved = v.figures["diff"].select_one({"type": ColumnDataSource, "name": "moved"}).data
    assert moved["start"] == [m["start"] for m in diff(v.plans["even"], v.plans["greedy-fill"])["moved"]]
    v.diff("edge-solo / latency", "even / latency")  # edge-solo is OOM but still has its one stage
    assert v.figures["diff"] is not None


def test_planner_view_what_if(lab):
    tb, pr = lab
    v = PlannerView(tb, pr)
    v.link.value = ("nx1", "rtx")
    v.scale.value = 1.0
    assert v.whatif_plan.stages == v.plans["edgeshard"].stages
    assert "no unit changed device" in v.whatif_text.value
    v.scale.value = 100.0
    tb2, pr2 = scaled_link(tb, pr, "nx1", "rtx", 100.0)
    expected = baselines.plan_with("edgeshard", tb2, pr2, "latency", v.workload)
    assert v.whatif_plan == expected
    assert expected.stages != v.plans["edgeshard"].stages, "the scenario should make the fast link pay off"
    moved = v.figures["whatif"].select_one({"type": ColumnDataSource, "name": "moved"}).data
    assert len(moved["start"]) == len(diff(v.plans["edgeshard"], expected)["moved"])


def test_planner_view_follows_an_edited_testbed(lab, path):
    tb, pr = lab
    v = PlannerView(tb, pr)
    ed = TestbedEditor(path)
    ed.exclude.value = ("agx",)
    v.set_inputs(ed.testbed)
    assert "agx" not in {s.device for p in v.plans.values() for s in p.stages}
    assert v.whatif_plan is not None and v.link.value == ("nx1", "agx")


def test_scaled_link_scales_what_the_cost_model_uses(lab):
    tb, pr = lab
    measured = Profile(pr.model, pr.dtype, pr.units, pr.devices, (Link("nx1", "agx", 40 * MBIT_S, 0.001),))
    tb2, pr2 = scaled_link(tb, measured, "nx1", "agx", 0.5)
    cm = CostModel(tb2, pr2)
    assert cm.link("nx1", "agx")[0] == pytest.approx(20 * MBIT_S)  # the measured link, halved
    assert cm.link("agx", "nx1")[0] == pytest.approx(50 * MBIT_S)  # the testbed default, halved
    assert cm.link("agx", "rtx")[0] == pytest.approx(100 * MBIT_S)  # others untouched


def test_profile_view(lab):
    tb, pr = lab
    v = ProfileView(pr, tb)
    assert set(v.figures) == {"decode", "prefill", "bandwidth"}
    assert len(v.widget.children) == 4


# --- live run -----------------------------------------------------------------------------------------------
class FakeRun:
    """Stands in for runtime.Run (not available to this test): a worker thread puts hand-made events on a queue
    every dt seconds until stopped or n tokens, then None; `done` is a bool property, as on runtime.Run."""

    def __init__(self, n=10_000, dt=0.005, text=True, seqs=1):
        self.events, self._done, self._stop = queue.Queue(), threading.Event(), threading.Event()
        self.result, self.error, self.stopped = None, None, False
        self.thread = threading.Thread(target=self._work, args=(n, dt, text, seqs), daemon=True)
        self.thread.start()

    @property
    def done(self):
        return self._done.is_set()

    def _work(self, n, dt, text, seqs):
        t, out = 0.0, {s: "" for s in range(seqs)}
        for step in range(n):
            if self._stop.is_set():
                self.stopped = True
                break
            time.sleep(dt)
            for seq in range(seqs):
                self.events.put({"type": "compute", "device": "nx1", "seq": seq, "step": step, "start_s": t,
                                 "end_s": t + dt / 2})
                self.events.put({"type": "send", "device": "nx1", "peer": "rtx", "seq": seq, "step": step, "bytes": 64,
                                 "start_s": t + dt / 2, "end_s": t + dt})
                event = {"type": "token", "seq": seq, "step": step, "token_id": step, "t_s": t + dt}
                if text:
                    event["text"] = f" w{step}"
                out[seq] += f" w{step}"
                self.events.put(event)
            t += dt
        self.result = {"results": [{"prompt": "p", "text": out[s]} for s in range(seqs)], "stopped": self.stopped}
        self._done.set()
        self.events.put(None)

    def stop(self):
        self._stop.set()


async def wait_for(cond, timeout=10.0):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        await asyncio.sleep(0.02)


def test_run_view_start_does_not_block_and_stop_stops():
    runs, threads = [], set()

    def start():
        runs.append(FakeRun())
        return runs[-1]

    async def main():
        v = RunView(start, poll_s=0.02)
        v.text.observe(lambda _: threads.add(threading.current_thread()), names="value")
        t0 = time.monotonic()
        v.start_button.click()
        assert time.monotonic() - t0 < 1.0 and v.running  # returned at once; the run goes on
        assert v.start_button.disabled and not v.stop_button.disabled
        await wait_for(lambda: v.live.count >= 5)
        assert v.text.value.startswith(" w0 w1")
        v.start_button.click()  # ignored while running
        assert len(runs) == 1
        v.stop_button.click()
        await wait_for(lambda: not v.running)
        return v

    v = asyncio.run(main())
    assert runs[0].stopped and runs[0].done
    assert v.status.value.startswith("stopped")
    assert not v.start_button.disabled and v.stop_button.disabled
    assert v.live.count == len([e for e in v.events if e["type"] == "token"]) < 10_000
    assert threads == {threading.main_thread()}  # widgets touched only by the loop's thread
    assert len(v.live.tokens.data["n"]) == v.live.count - 1


def test_run_view_shows_the_result_when_nothing_streamed():
    async def main():
        v = RunView(lambda: FakeRun(n=5, dt=0.001, text=False), poll_s=0.01)
        v.start()
        await wait_for(lambda: not v.running)
        return v

    v = asyncio.run(main())
    assert v.text.value == " w0 w1 w2 w3 w4" and v.status.value.startswith("done: 5 tokens")


def test_run_view_report_button_renders_the_run_folder(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "testbed.toml").write_text(TESTBED)

    class WithFolder(FakeRun):
        def _work(self, *args):
            super()._work(*args)
            self.result["run_dir"] = str(run_dir)

    v = RunView(lambda: WithFolder(n=2, dt=0.001))
    assert v.report_button.disabled
    v.start()
    v.handle.thread.join(5)
    while v.pump():
        pass
    assert not v.report_button.disabled and str(run_dir) in v.status.value
    v.report_button.click()
    assert v.report_path == run_dir / "report.html" and v.report_path.exists()


def test_run_view_pump_by_hand_and_failed_start():
    v = RunView(lambda: FakeRun(n=3, dt=0.001))
    v.start()  # no running event loop here: nothing is scheduled, pump() is called by hand
    v.handle.thread.join(5)
    while v.pump():
        pass
    assert v.live.count == 3 and v.status.value.startswith("done")
    bad = RunView(lambda: 1 / 0)
    bad.start()
    assert "start failed" in bad.status.value and not bad.start_button.disabled


class EventHandle:
    """A handle whose done is a threading.Event and whose queue has no end marker."""

    def __init__(self, events):
        self.events, self.done, self.result = queue.Queue(), threading.Event(), {"results": [{"text": "final"}]}
        for e in events:
            self.events.put(e)
        self.done.set()

    def stop(self):
        pass


def test_run_view_sequences_errors_and_event_handles():
    v = RunView(lambda: EventHandle([
        {"type": "token", "seq": 0, "step": 0, "t_s": 1.0, "text": " a"},
        {"type": "token", "seq": 1, "step": 0, "t_s": 1.1, "text": " b"},
        {"type": "token", "seq": 0, "step": 1, "t_s": 1.2, "text": " c"},
        {"type": "seq_done", "seq": 1, "text": " b!", "token_ids": [1]},
        {"type": "error", "device": "agx", "message": "out of memory"},
        {"type": "token", "seq": 0, "t_s": "not a time"}]))  # malformed: reported, pumping goes on
    v.start()
    assert v.pump() is False
    assert v.text.value == "[0]  a c\n\n[1]  b!"
    assert "agx: out of memory" in v.status.value and "bad event" in v.status.value
    assert v.status.value.startswith("done: ")


NOTEBOOK_CELLS = [
    "import sys; sys.path.insert(0, {dir!r})\nfrom fakerun import FakeRun\n"
    "from edgeshard.ui.widgets import RunView, setup_notebook\nsetup_notebook()\n"
    "v = RunView(lambda: FakeRun(dt=0.01), poll_s=0.05)\nv.start_button.click()\nv",
    "import asyncio\nawait asyncio.sleep(0.8)\nassert v.running and v.live.count > 10, v.live.count",
    "v.stop_button.click()\nfor _ in range(100):\n    await asyncio.sleep(0.05)\n    if not v.running: break\n"
    "assert v.status.value.startswith('stopped'), v.status.value\nprint('OK', v.live.count)",
]


def test_run_view_in_a_real_kernel(tmp_path):
    """ipykernel 7: the pump runs on the kernel's loop between and during (awaiting) cells."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    from jupyter_client.kernelspec import KernelSpecManager
    if "python3" not in KernelSpecManager().find_kernel_specs():
        pytest.skip("no python3 kernel installed")
    src = __import__("inspect").getsource(FakeRun)
    (tmp_path / "fakerun.py").write_text("import queue, threading, time\n\n" + textwrap.dedent(src))
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c.format(dir=str(tmp_path)) if "{dir" in c else c)
                                         for c in NOTEBOOK_CELLS])
    nbclient.NotebookClient(nb, kernel_name="python3", timeout=120).execute()
    out = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
    assert "OK" in out
    assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in nb.cells[0].outputs)


def test_editor_keeps_tables_it_does_not_edit(tmp_path):
    """local.toml has [[shared_cores]]: an edit elsewhere keeps it and the comments (it was dropped, and the save
    fell back to plain TOML)."""
    from pathlib import Path

    src = Path(__file__).resolve().parent.parent / "testbed_configs" / "local.toml"
    ed = TestbedEditor(src)
    ed.constraint_fields["max_stages"].value = "2"
    saved = ed.save(tmp_path / "edited.toml")
    text = saved.read_text()
    assert ed.comments_kept and "# The embedded default" in text and "max_stages = 2" in text
    assert testbed.load(saved).shared_cores == testbed.load(src).shared_cores != ()
