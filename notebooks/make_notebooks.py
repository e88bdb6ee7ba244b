"""Write the notebooks of notebooks/ from the cells below (outputs stripped, one `parameters` cell each).

    python notebooks/make_notebooks.py           # (re)write every notebook
    python notebooks/make_notebooks.py --check   # exit 1 if a notebook differs from what this script writes

Edit the cells here, not in the .ipynb files: every notebook shares the same setup cell (private state dir,
free ports, atexit guard) and the same profiling parameters, so a profile measured by 02 is a cache hit in
03-05 (profiler.profile caches by everything that changes a measurement).
Cells are stored with fixed ids, so regenerating an unchanged notebook leaves it byte for byte the same.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import nbformat

HERE = Path(__file__).resolve().parent

KERNELSPEC = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}

# The same profiling parameters everywhere: small (a few seconds per device), and identical, so 03-05 hit the
# profile 02 measured (same cache key) instead of measuring again.
PROFILE_PARAMS = """\
REPEATS = 3  # profiling: medians of this many timings per unit (small: it is a demo testbed)
CONTEXT_TOKENS = 64  # profiling: KV cache length of the decode timings
PREFILL_TOKENS = 16  # profiling: prompt length of the prefill timings"""

PROFILE_CALL = ("profiler.profile(tb, MODEL, state, repeats=REPEATS, context_tokens=CONTEXT_TOKENS,\n"
                "{indent}prefill_tokens=PREFILL_TOKENS, link_target_s=0.1, pings=10{extra})")

SETUP = '''\
import atexit
import dataclasses
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # offline: SmolLM2 comes from a local package, never the hub
import edgeshard
from edgeshard.config import testbed as tbm
from edgeshard import testbeds
from edgeshard.ui import widgets

widgets.setup_notebook()  # BokehJS inline (no CDN), before any figure
ROOT = Path(edgeshard.__file__).resolve().parent.parent  # the repository: testbed_configs/ lives there
STATE_DIR = STATE_DIR or tempfile.mkdtemp(prefix="edgeshard-nb-")  # private: its own device servers, token, logs


def on_loopback(t):
    """The testbed with every device on 127.0.0.1 and port 0 (free ports, as launch.local_testbed does), so this
    notebook never collides with another testbed already using the ports written in the TOML."""
    return t.replace(devices=tuple(dataclasses.replace(d, host="127.0.0.1", port=0) for d in t.devices), path=None)


tb = on_loopback(tbm.load(ROOT / TESTBED))


def down_testbed():
    """Stop this notebook's device servers (no-op when they are not up)."""
    if testbeds.find_state(tb, STATE_DIR) is None:
        return []
    return testbeds.down(tb.name, STATE_DIR)


atexit.register(down_testbed)  # the last cell downs the testbed; this catches a kernel that stops early
print(f"testbed {tb.name!r}: {', '.join(tb.names)} (source {tb.source}); state dir {STATE_DIR}")'''

DOWN = '''\
stopped = down_testbed()
print(f"testbed {tb.name!r} down: stopped pids {stopped}; still up: {testbeds.find_state(tb, STATE_DIR) is not None}")'''


def md(text: str) -> dict:
    return nbformat.v4.new_markdown_cell(textwrap.dedent(text).strip("\n"))


def code(text: str, tags: tuple[str, ...] = ()) -> dict:
    cell = nbformat.v4.new_code_cell(textwrap.dedent(text).strip("\n"))
    if tags:
        cell.metadata["tags"] = list(tags)
    return cell


def params(text: str) -> dict:
    return code(text, ("parameters",))


# --- 00 -----------------------------------------------------------------------------------------------------
NB00 = [
    md("""
    # 00 · The paper's comparison, on paper-scale synthetic scenarios

    EdgeShard vs Edge-Solo, Cloud-Edge-Even and Cloud-Edge-Opt (plus our heuristics) for Llama-2 7B/13B/70B on the
    15-device scenario of `testbed_configs/paper-edge.toml`, across source-to-cloud bandwidths, for the latency and
    the throughput objective.

    **The figures are synthetic**: the device costs are scaled from published per-unit timings of Llama-2-7B on
    Jetson Orin NX / AGX Orin / RTX 3090 (`edgeshard/synthetic.py`); these are predictions of the cost model, not
    runs. `docs/paper.md` says which of the paper's results this reproduces and which it does not.
    Planning only: no device servers are started.
    """),
    params("""
    TESTBED = "testbed_configs/paper-edge.toml"  # relative to the repository, or an absolute path
    MODELS = ["llama2-7b", "llama2-13b", "llama2-70b"]
    BANDWIDTHS = [1, 10, 50, 100, 500, 1000]  # Mbit/s of the swept link(s)
    LINKS = ["source", "all"]  # "source": only source<->cloud; "all": every edge<->cloud link (a WAN)
    DTYPE = "float32"
    """),
    code("""
    from pathlib import Path

    import edgeshard
    from edgeshard.planning import compare
    from edgeshard.ui import plots, widgets
    from edgeshard.config import testbed as tbm

    widgets.setup_notebook()  # BokehJS inline (no CDN)
    ROOT = Path(edgeshard.__file__).resolve().parent.parent
    paper = tbm.load(ROOT / TESTBED)
    print(f"{paper.name}: {len(paper.devices)} devices, source {paper.source}, cloud {paper.cloud}")
    sweeps = {links: compare.sweep(paper, MODELS, BANDWIDTHS, DTYPE, links=links) for links in LINKS}
    print({links: len(rows) for links, rows in sweeps.items()}, "plans")
    """),
    md("""
    ## Tables
    Latency in ms/token and throughput in tokens/s per strategy; `OOM` = the strategy cannot fit the model;
    *gain* = EdgeShard against the best of Edge-Solo, Cloud-Edge-Even and Cloud-Edge-Opt.
    """),
    code("""
    for links, rows in sweeps.items():
        what = "only source<->cloud swept" if links == "source" else "every edge<->cloud link swept"
        print(f"===== links = {links!r}: {what} =====")
        print(compare.format_table(rows))
        print()
    """),
    md("""
    ## Latency and throughput across bandwidths
    One row per model and sweep: latency (left, lower is better) and throughput (right, higher is better) per
    strategy; a gap is an infeasible (OOM) point. Click a legend entry to hide a strategy.
    """),
    code("""
    import ipywidgets

    figures = {}
    rows_out = []
    for links, rows in sweeps.items():
        for model in MODELS:
            fig = plots.sweep_figure(rows, model=model)
            figures[(links, model)] = fig
            rows_out.append(ipywidgets.HTML(f"<b>{model}</b>, links = {links!r} (synthetic profile)"))
            rows_out.append(widgets.bokeh_widget(fig))
    ipywidgets.VBox(rows_out)
    """),
    code("""
    # the headline numbers: EdgeShard's gain over the best baseline at the thinnest and the fattest link
    for links, rows in sweeps.items():
        for model in MODELS:
            parts = []
            for bw in (BANDWIDTHS[0], BANDWIDTHS[-1]):
                lat, thr = compare.gain(rows, model, bw, "latency"), compare.gain(rows, model, bw, "throughput")
                parts.append(f"{bw:g} Mbit/s: " + ("every baseline OOM" if lat is None and thr is None else
                                                   f"latency {lat or 0:.0%} lower, throughput {thr or 0:.2f}x"))
            print(f"{links:>6} {model:<11} " + "; ".join(parts))
    """),
]

# --- 01 -----------------------------------------------------------------------------------------------------
NB01 = [
    md("""
    # 01 · The testbed: edit, bring up, health

    `TestbedEditor` edits the devices, the link matrix, the defaults and the constraints of a testbed TOML, with
    validation next to each field, and saves it keeping the comments you did not touch. Its **up / down / health**
    buttons are wired to `edgeshard.testbeds` on the embedded local testbed (one device server per device on
    127.0.0.1, free ports, a private state dir). The cells below click them programmatically; click them yourself
    too.
    """),
    params("""
    TESTBED = "testbed_configs/local.toml"  # relative to the repository, or an absolute path
    STATE_DIR = ""  # empty: a fresh private temporary directory
    SAVE_TO = ""  # where the edited copy goes; empty: a temporary file
    """),
    code(SETUP),
    code("""
    import html
    import re
    import tempfile


    def health(t):
        st = testbeds.status(t.name, STATE_DIR)
        if st is None:
            return f"testbed {t.name!r} is not up"
        return {n: ("healthy" if d["healthy"] else f"NOT healthy: {d.get('error')}") +
                f" (pid {d.get('pid')}, control port {d.get('port')}, data port {d.get('data_port')})"
                for n, d in st["devices"].items()}


    def up(t):
        testbeds.up(on_loopback(t), local=True, state_dir=STATE_DIR)
        return health(t)


    def down(t):
        return {"stopped pids": testbeds.down(t.name, STATE_DIR)}


    def shown(html_value):
        return html.unescape(re.sub(r"<[^>]+>", "", html_value))


    editor = widgets.TestbedEditor(ROOT / TESTBED, on_up=up, on_down=down, on_status=health)
    editor
    """),
    md("## Up and health (the buttons, clicked from code)"),
    code("""
    editor.up_button.click()
    print("up:", shown(editor.output.value), sep="\\n")
    editor.health_button.click()
    print("health:", shown(editor.output.value), sep="\\n")
    assert "NOT healthy" not in editor.output.value and "healthy" in editor.output.value, editor.output.value
    """),
    md("""
    ## Edit
    A slower link edge-0 <-> edge-2, at most two stages, and one mistake: the error shows next to the field until
    it is fixed.
    """),
    code("""
    editor.set_link("edge-0", "edge-2", bandwidth_mbit_s=100, latency_ms=5)
    editor.constraint_fields["max_stages"].value = "2"
    memory = editor.row("edge-1").memory.value
    editor.row("edge-1").memory.value = "-1"  # invalid
    print("errors:", editor.errors)
    print("next to the field:", shown(editor.row("edge-1").error.value))
    editor.row("edge-1").memory.value = memory  # fixed
    print("errors after the fix:", editor.errors)
    edited = editor.testbed
    print(f"edge-0 -> edge-2: {edited.link('edge-0', 'edge-2').bandwidth_mbit_s:g} Mbit/s, "
          f"max_stages = {edited.constraints.max_stages}")
    """),
    md("## Save an edited copy (comments kept) and show the TOML"),
    code("""
    path = Path(SAVE_TO) if SAVE_TO else Path(tempfile.mkdtemp(prefix="edgeshard-nb-")) / "local-edited.toml"
    saved = editor.save(path)
    print(f"saved {saved} (comments kept: {editor.comments_kept})")
    print("-" * 60)
    print(saved.read_text())
    assert tbm.load(saved).constraints.max_stages == 2
    """),
    md("## Down"),
    code("""
    editor.down_button.click()
    print(shown(editor.output.value))
    """),
    code(DOWN),
]

# --- 02 -----------------------------------------------------------------------------------------------------
NB02 = [
    md("""
    # 02 · Profile the model on the testbed

    Bring the local testbed up, measure per-unit decode and prefill times on every device and the links between
    them (`edgeshard.run.profiler`, with a progress bar), show them, and save `profile.json`. Profiles are cached by
    everything that changes a measurement, so a second run (or notebooks 03-05) reuses it.
    """),
    params(f"""
    TESTBED = "testbed_configs/local.toml"
    STATE_DIR = ""  # empty: a fresh private temporary directory
    MODEL = "smollm2-135m"  # real SmolLM2-135M weights (offline); or tiny-llama, a tiny random Llama
    {textwrap.indent(PROFILE_PARAMS, "    ").strip()}
    USE_CACHE = True  # False: measure again even when a cached profile exists
    OUT_DIR = ""  # where profile.json goes; empty: a temporary directory
    """),
    code(SETUP),
    code("""
    import tempfile
    import time

    from edgeshard.run import profiler

    t0 = time.monotonic()
    state = testbeds.up(tb, local=True, state_dir=STATE_DIR)
    print(f"up in {time.monotonic() - t0:.1f} s:",
          {n: f"port {d['port']}, pid {d['pid']}, healthy {d['healthy']}" for n, d in state["devices"].items()})
    """),
    code(f"""
    t0 = time.monotonic()
    profile = {PROFILE_CALL.format(indent=" " * 31, extra=", use_cache=USE_CACHE")}
    cache = profile.provenance.get("cache", {{}})
    print(f"{{profile.model}}: {{profile.n_units}} units on {{len(profile.devices)}} devices in "
          f"{{time.monotonic() - t0:.1f}} s (cache hit: {{cache.get('hit')}})")
    """),
    code("""
    widgets.ProfileView(profile, tb)
    """),
    code("""
    for name, c in profile.devices.items():
        print(f"{name}: decode {sum(c.decode_s) * 1e3:.2f} ms/token for the whole model, "
              f"prefill {sum(c.prefill_s_per_token) * 1e3:.3f} ms per prompt token")
    for lk in profile.links:
        print(f"{lk.src} -> {lk.dst}: {lk.bandwidth_bytes_s * 8 / 1e6:.0f} Mbit/s, {lk.latency_s * 1e3:.3f} ms")
    out_dir = Path(OUT_DIR) if OUT_DIR else Path(tempfile.mkdtemp(prefix="edgeshard-nb-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    profile.save(out_dir / "profile.json")
    print(f"saved {out_dir / 'profile.json'}")
    """),
    code(DOWN),
]

# --- 03 -----------------------------------------------------------------------------------------------------
NB03 = [
    md("""
    # 03 · Plan: strategies, the plan, diffs, what-if

    `PlannerView` plans every strategy (EdgeShard's exact DP and the baselines) for an objective and a workload,
    draws a plan (units along x, devices as lanes), diffs any two plans and re-plans when a link's bandwidth is
    scaled. It needs a measured profile: `PROFILE_JSON` from notebook 02, or (the default) a profile measured here
    (a cache hit when 02 already measured it).
    """),
    params(f"""
    TESTBED = "testbed_configs/local.toml"
    STATE_DIR = ""  # empty: a fresh private temporary directory
    MODEL = "smollm2-135m"
    PROFILE_JSON = ""  # a profile.json written by 02; empty: profile the testbed here
    {textwrap.indent(PROFILE_PARAMS, "    ").strip()}
    OBJECTIVE = "throughput"  # latency | e2e | throughput
    PROMPT_TOKENS = 32
    NEW_TOKENS = 64
    WHATIF_LINK = []  # two device names; empty: the first hop of the EdgeShard plan
    WHATIF_SCALE = 0.01  # the what-if bandwidth, as a fraction of the link's
    """),
    code(SETUP),
    code(f"""
    from edgeshard.config import profile as profile_mod
    from edgeshard.run import profiler
    from edgeshard.planning.costs import Workload

    if PROFILE_JSON:
        profile = profile_mod.load(PROFILE_JSON)
        print(f"profile from {{PROFILE_JSON}} ({{profile.provenance.get('method')}})")
    else:
        state = testbeds.up(tb, local=True, state_dir=STATE_DIR)
        profile = {PROFILE_CALL.format(indent=" " * 35, extra="")}
        print(f"profiled {{MODEL}} on {{tb.name}} (cache hit: {{profile.provenance.get('cache', {{}}).get('hit')}})")
        down_testbed()  # planning needs no devices
    assert profile.model == MODEL, (profile.model, MODEL)
    """),
    code("""
    view = widgets.PlannerView(tb, profile, objective=OBJECTIVE, workload=Workload(PROMPT_TOKENS, NEW_TOKENS))
    view
    """),
    md("## Strategies (what the table above shows)"),
    code("""
    for name, plan in view.plans.items():
        stages = " ".join(f"{s.device}[{s.start},{s.stop})" for s in plan.stages)
        if plan.feasible:
            p = plan.predicted
            print(f"{name:<20} {p['latency_s'] * 1e3:8.2f} ms/token {p['throughput_tokens_per_s']:8.1f} tokens/s  {stages}")
        else:
            print(f"{name:<20} infeasible: {'; '.join(plan.notes)}")
    """),
    md("## Latency plan vs throughput plan"),
    code("""
    import html
    import re

    from edgeshard.config.plan import format_diff


    def shown(html_value):
        return html.unescape(re.sub(r"<[^>]+>", "", html_value))


    view.diff("edgeshard / latency", "edgeshard / throughput")  # as choosing them in the two dropdowns does
    print(shown(view.diff_text.value))
    """),
    md("""
    ## What if a link were slower?
    The slider scales one link's bandwidth (both directions) and re-plans at once; the diff is against the plan
    for the link as it is. Here: set from code, as dragging the slider would.
    """),
    code("""
    stages = view.plans["edgeshard"].stages
    link = tuple(WHATIF_LINK) or ((stages[0].device, stages[1].device) if len(stages) > 1 else (tb.source, tb.cloud))
    view.link.value = link if link in [v for _, v in view.link.options] else link[::-1]  # each pair is listed once
    view.scale.value = WHATIF_SCALE
    print(shown(view.whatif_text.value))
    whatif = view.whatif_plan
    print("what-if plan:", " ".join(f"{s.device}[{s.start},{s.stop})" for s in whatif.stages),
          f"predicted {whatif.predicted.get('latency_s', float('nan')) * 1e3:.2f} ms/token" if whatif.feasible else "")
    """),
    code(DOWN),
]

# --- 04 -----------------------------------------------------------------------------------------------------
NB04 = [
    md("""
    # 04 · Run live, and stop it

    Bring the testbed up, plan, and run the model split over the devices **in the background**: the cell returns at
    once, the plots (per-token latency against the plan's prediction, per-stage compute vs transfer, tokens/s)
    fill as tokens arrive, the generated text streams in, and **stop** ends the run.

    `WAIT = False` (the default, for JupyterLab): cells return at once and the run goes on in the background, so
    the Stop button acts (a cell that is still running holds back widget clicks); the last cell brings the
    testbed down as soon as the run ends. `WAIT = True` (headless, papermill) makes a later cell wait for the end.
    """),
    params(f"""
    TESTBED = "testbed_configs/local.toml"
    STATE_DIR = ""  # empty: a fresh private temporary directory
    MODEL = "smollm2-135m"  # real weights; with tiny-llama use 200 or more new tokens to have time to stop
    MODE = "pipeline"  # pipeline (all prompts in flight) | sequential (one prompt at a time)
    PROMPTS = ["Once upon a time", "The capital of France is", "Edge devices can"]
    MAX_NEW_TOKENS = 64  # long enough to press stop
    OBJECTIVE = "throughput"  # with pipeline mode: the plan that keeps every device busy
    {textwrap.indent(PROFILE_PARAMS, "    ").strip()}
    RUNS_DIR = "runs"  # run folders go here (relative to the notebook's directory)
    AUTO_START = True  # start the run from the cell below (else press start)
    WAIT = False  # False: return at once (JupyterLab, Stop works); True: a later cell waits for the end (headless)
    WAIT_TIMEOUT_S = 600
    """),
    code(SETUP),
    code(f"""
    import time

    from edgeshard.planning import dp as planner
    from edgeshard.run import profiler, runtime
    from edgeshard.planning.costs import Workload

    t0 = time.monotonic()
    state = testbeds.up(tb, local=True, state_dir=STATE_DIR)
    profile = {PROFILE_CALL.format(indent=" " * 31, extra="")}
    # sequences in flight: all prompts in pipeline mode, one at a time in sequential mode (the tokens/s prediction)
    plan = planner.solve(tb, profile, OBJECTIVE, Workload(16, MAX_NEW_TOKENS, len(PROMPTS) if MODE == "pipeline" else 1))
    print(f"up and profiled in {{time.monotonic() - t0:.1f}} s (profile cache hit: "
          f"{{profile.provenance.get('cache', {{}}).get('hit')}})")
    print("plan:", " ".join(f"{{s.device}}[{{s.start}},{{s.stop}})" for s in plan.stages),
          f"predicted {{plan.predicted['latency_s'] * 1e3:.1f}} ms/token")
    """),
    md("""
    ## The run
    `start` launches `runtime.Run(...).start()` (a background thread); the view drains its events on the kernel's
    event loop. The line under the plots counts the points the live plot received, and says whether the run is
    running, stopped or done, and whether the testbed is up.
    """),
    code("""
    import asyncio
    import html
    import re

    import ipywidgets


    def start_run():
        return runtime.Run(tb, plan, MODEL, PROMPTS, MAX_NEW_TOKENS, mode=MODE, state=state, profile=profile,
                           runs_base=RUNS_DIR).start()


    view = widgets.RunView(start_run, plan)
    probe = ipywidgets.HTML()
    probe.add_class("es-run-probe")


    def run_status():
        \"\"\"The first word of the view's status: idle, starting, running, stopping, stopped, done or start failed.\"\"\"
        m = re.match(r"[a-z ]*[a-z]", html.unescape(re.sub(r"<[^>]+>", "", view.status.value)))
        return m.group(0) if m else "?"


    def update_probe():
        up = testbeds.find_state(tb, STATE_DIR) is not None
        probe.value = (f'live plot points: <span class="es-points">{len(view.live.tokens.data["n"])}</span>'
                       f' · tokens: <span class="es-tokens">{view.live.count}</span>'
                       f' · run: <span class="es-status">{run_status()}</span>'
                       f' · testbed: <span class="es-testbed">{"up" if up else "down"}</span>')
        return up


    async def watch_probe():
        while True:  # on the kernel's event loop, like the view's own pump (never a worker thread)
            up = update_probe()
            if not up and not view.running:
                return
            await asyncio.sleep(0.25)


    if "probe_task" in globals():
        probe_task.cancel()  # this cell ran before: its watcher would follow the new view too
    probe_task = asyncio.ensure_future(watch_probe())
    if AUTO_START:
        view.start()
    ipywidgets.VBox([view.widget, probe])
    """),
    code("""
    if AUTO_START and WAIT:
        deadline = time.monotonic() + WAIT_TIMEOUT_S
        while view.running and time.monotonic() < deadline:
            await asyncio.sleep(0.2)  # the kernel's loop runs the view's pump meanwhile
        if view.running:
            view.stop()
            raise TimeoutError(f"the run did not end within {WAIT_TIMEOUT_S} s")
        update_probe()
        if view.handle.error is not None:
            raise view.handle.error
        result = view.handle.result
        print(run_status(), "-", view.live.count, "tokens;", len(view.live.tokens.data["n"]), "live plot points")
        print("run folder:", result["run_dir"])
        s = result["summary"]
        print("measured: ", {k: s.get(k) for k in ("tokens_per_s",)}, "token latency s:", s.get("token_latency_s"))
        print("predicted:", f"{plan.predicted['latency_s'] * 1e3:.1f} ms/token")
        for r in result["results"]:
            print(f"--- {r['prompt']!r} -> {len(r['token_ids'])} tokens\\n{r['text']}")
        assert view.live.count > 0 and sum(len(r["token_ids"]) for r in result["results"]) > 0
    else:
        print("the run goes on in the background: watch the plots, press stop")
    """),
    md("""
    ## Down
    With `WAIT = False` and a run going on, this schedules the testbed's shutdown for when the run ends (stop or
    done); otherwise it stops the device servers now.
    """),
    code("""
    if view.handle is not None and view.running:
        async def down_when_the_run_ends():
            while view.running:
                await asyncio.sleep(0.25)
            stopped = down_testbed()
            update_probe()
            print(f"run {run_status()}; testbed {tb.name!r} down (stopped pids {stopped})")

        down_task = asyncio.ensure_future(down_when_the_run_ends())
        print("the testbed goes down when the run ends")
    else:
        stopped = down_testbed()
        update_probe()
        print(f"testbed {tb.name!r} down: stopped pids {stopped}")
    """),
]

# --- 05 -----------------------------------------------------------------------------------------------------
NB05 = [
    md("""
    # 05 · Report and reproduce

    Run a short generation, render its run folder to a self-contained HTML report (inline bokeh, works offline),
    then reproduce the run from its folder alone (`edgeshard reproduce RUN_DIR`) and compare measured with
    recorded: greedy decoding must give identical token ids.
    """),
    params(f"""
    TESTBED = "testbed_configs/local.toml"
    STATE_DIR = ""  # empty: a fresh private temporary directory
    MODEL = "smollm2-135m"
    MODE = "sequential"
    PROMPTS = ["The capital of France is", "Edge devices can"]
    MAX_NEW_TOKENS = 16
    OBJECTIVE = "throughput"  # a plan over several devices
    {textwrap.indent(PROFILE_PARAMS, "    ").strip()}
    RUNS_DIR = "runs"  # run folders go here (relative to the notebook's directory)
    """),
    code(SETUP),
    code(f"""
    from edgeshard.planning import dp as planner
    from edgeshard.run import profiler, reproduce, runtime
    from edgeshard.ui import report
    from edgeshard.planning.costs import Workload

    state = testbeds.up(tb, local=True, state_dir=STATE_DIR)
    profile = {PROFILE_CALL.format(indent=" " * 31, extra="")}
    plan = planner.solve(tb, profile, OBJECTIVE, Workload(16, MAX_NEW_TOKENS))
    result = runtime.run(tb, plan, MODEL, PROMPTS, MAX_NEW_TOKENS, mode=MODE, state=state, profile=profile,
                         runs_base=RUNS_DIR)
    run_dir = Path(result["run_dir"])
    for r in result["results"]:
        print(f"{{r['prompt']!r}} -> {{r['text']!r}}")
    print("run folder:", run_dir, sorted(p.name for p in run_dir.iterdir()))
    """),
    md("## The report"),
    code("""
    import os

    from IPython.display import HTML, IFrame, display

    report_path = report.render(run_dir)
    print(f"report: {report_path.resolve()} ({report_path.stat().st_size / 1e6:.1f} MB, self-contained)")
    rel = os.path.relpath(report_path.resolve(), Path.cwd())
    if not rel.startswith(".."):  # under the notebook's directory: JupyterLab can serve it
        display(IFrame(rel, width="100%", height=650))
    else:
        display(HTML(f"<p>open <code>{report_path.resolve()}</code> in a browser "
                     "(outside the notebook's directory, so it is not shown inline)</p>"))
    """),
    md("""
    ## Reproduce
    `reproduce.main` re-runs the experiment from the folder (testbed.toml, plan.json, parameters.json) on the
    testbed that is up and prints measured vs recorded (`reproduce.compare_runs`).
    """),
    code("""
    import json

    rc = reproduce.main(run_dir, state_dir=STATE_DIR)
    second = run_dir.parent / (run_dir.name + "-reproduced")
    lines, same = reproduce.compare_runs(json.loads((run_dir / "summary.json").read_text()),
                                         json.loads((second / "summary.json").read_text()))
    print(f"token ids identical: {same} (exit code {rc})")
    assert same and rc == 0
    """),
    code(DOWN),
]

NOTEBOOKS = {"00_paper": NB00, "01_testbed": NB01, "02_profile": NB02, "03_plan": NB03, "04_run": NB04,
             "05_report": NB05}


def build(stem: str, cells: list) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = dict(KERNELSPEC)
    nb.metadata["language_info"] = {"name": "python"}
    nb.cells = [nbformat.from_dict(dict(c)) for c in cells]
    for i, c in enumerate(nb.cells):
        c["id"] = f"{stem.replace('_', '-')}-{i:02d}"  # fixed ids: regenerating gives the same file
    nbformat.validate(nb)
    return nb


def text_of(nb) -> str:
    return nbformat.writes(nb) + "\n"


def main(argv: list[str]) -> int:
    check = "--check" in argv
    bad = []
    for stem, cells in NOTEBOOKS.items():
        path = HERE / f"{stem}.ipynb"
        text = text_of(build(stem, cells))
        if check:
            if not path.exists() or path.read_text() != text:
                bad.append(path.name)
        else:
            path.write_text(text)
            print(f"wrote {path}")
    if bad:
        print(f"out of date (run python notebooks/make_notebooks.py): {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
