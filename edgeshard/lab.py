"""The public API a notebook types (`import edgeshard as es`): a Lab is one testbed you bring up, profile, plan on
and run on; every object it returns shows itself in Jupyter.

    tb = es.load_testbed("local")                  # a shipped testbed by name, or a TOML path
    with es.Lab(tb) as lab:                        # up on enter, down on exit (and when the kernel stops)
        prof = lab.profile("smollm2-135m")         # per-unit costs on every device, links between them
        plan = lab.plan("throughput")              # the exact DP's plan
        run = lab.run(["Once upon a time"])        # generation in the background: a live view with Stop
        run.wait()
        run.report()                               # the self-contained HTML report of its run folder
    es.diff(plan_a, plan_b)                        # moved unit ranges and cost deltas, as a figure

The Lab wraps the modules below it (testbeds, profiler, planner, baselines, runtime, report); nothing here holds
logic of its own beyond choosing defaults and keeping the objects of one session together.
"""

from __future__ import annotations

import atexit
import dataclasses
import tempfile
import weakref
from pathlib import Path

from edgeshard.config import paths
from edgeshard.config import plan as planm
from edgeshard.config import testbed as tbm
from edgeshard.config.errors import ConfigError
from edgeshard.planning.costs import Workload

CONFIGS = paths.CONFIGS

# Profiling defaults for a notebook session: medians of 3 timings per unit, decode measured at a 64-token KV
# cache, prefill of 16 tokens, 0.1 s link probes with 10 pings (a few seconds per device on the local testbed).
PROFILE_DEFAULTS = {"repeats": 3, "context_tokens": 64, "prefill_tokens": 16, "link_target_s": 0.1, "pings": 10}


def load_testbed(name_or_path) -> tbm.Testbed:
    """A testbed from a TOML file, or a shipped one by name ("local", "paper-edge", "emu-paper-bw10", ...)."""
    if isinstance(name_or_path, tbm.Testbed):
        return name_or_path
    p = Path(name_or_path)
    if not p.suffix and not p.exists():
        shipped = CONFIGS / f"{name_or_path}.toml"
        if not shipped.is_file():
            names = ", ".join(sorted(f.stem for f in CONFIGS.glob("*.toml")))
            raise ConfigError(str(name_or_path), "no such testbed file or shipped testbed", f"one of {names}, "
                              "or a path to a TOML file")
        p = shipped
    return tbm.load(p)


def load_profile(path):
    from edgeshard.config import profile
    return profile.load(path)


def load_plan(path) -> planm.Plan:
    return planm.load(path)


def plan(testbed, profile, objective: str = "latency", strategy: str = "edgeshard", prompt_tokens: int = 16,
         new_tokens: int = 64, sequences: int | None = None) -> planm.Plan:
    """The plan of `strategy` (default: the exact DP) for `objective`, without devices: a what-if on any testbed
    (e.g. `tb.with_link("edge-0", "edge-1", bandwidth_mbit_s=1)`) against a measured or synthetic profile."""
    from edgeshard.planning import baselines
    from edgeshard.planning import dp as planner
    tb = load_testbed(testbed)
    wl = Workload(prompt_tokens, new_tokens, sequences or tb.constraints.sequences or 1)
    if strategy == "edgeshard":
        return planner.solve(tb, profile, objective, wl, explain=True)
    return baselines.plan_with(strategy, tb, profile, objective, wl)


def planner(testbed, profile, objective: str = "throughput", prompt_tokens: int = 16, new_tokens: int = 64):
    """A widget: every strategy side by side, plan figures, a diff of any two, a what-if slider per link."""
    from edgeshard.ui import widgets
    return widgets.PlannerView(load_testbed(testbed), profile, objective=objective,
                               workload=Workload(prompt_tokens, new_tokens))


def diff(a: planm.Plan, b: planm.Plan, name_a: str = "A", name_b: str = "B") -> "PlanDiff":
    """What moved between two plans (unit ranges, devices, predicted costs); shows as the diff figure."""
    return PlanDiff(a, b, name_a, name_b)


def compare(testbed="paper-edge", models=None, bandwidths=None, links: str = "source") -> "Comparison":
    """EdgeShard against every baseline per model and source<->cloud bandwidth (synthetic profiles, no devices)."""
    from edgeshard.planning import compare as cmp
    tb = load_testbed(testbed)
    kw = {k: v for k, v in (("models", models), ("bandwidths", bandwidths)) if v is not None}
    return Comparison(tb, cmp.sweep(tb, links=links, **kw))


def editor(testbed="local"):
    """A widget editing a testbed TOML (devices, links, defaults, constraints), saving with comments kept."""
    from edgeshard.ui import widgets
    tb = load_testbed(testbed)
    return widgets.TestbedEditor(tb.path or tb)


def setup_notebook() -> None:
    """BokehJS inline (no CDN): call once before the first figure. Lab and the display methods call it."""
    from edgeshard.ui import widgets
    widgets.setup_notebook()


@dataclasses.dataclass
class PlanDiff:
    a: planm.Plan
    b: planm.Plan
    name_a: str = "A"
    name_b: str = "B"

    @property
    def moves(self) -> dict:
        return planm.diff(self.a, self.b)

    def __str__(self) -> str:
        return planm.format_diff(self.a, self.b, self.name_a, self.name_b)

    def _ipython_display_(self) -> None:
        import ipywidgets
        from IPython.display import display

        from edgeshard.ui import plots, widgets
        setup_notebook()
        fig = plots.plan_diff_figure(self.a, self.b, self.name_a, self.name_b)
        display(ipywidgets.VBox([widgets.bokeh_widget(fig), ipywidgets.HTML(f"<pre>{plots.html_escape(str(self))}</pre>")]))


@dataclasses.dataclass
class Comparison:
    testbed: tbm.Testbed
    rows: list

    def gain(self, model: str, bandwidth: float, objective: str):
        from edgeshard.planning import compare as cmp
        return cmp.gain(self.rows, model, bandwidth, objective)

    def __str__(self) -> str:
        from edgeshard.planning import compare as cmp
        return cmp.format_table(self.rows)

    def _ipython_display_(self) -> None:
        import ipywidgets
        from IPython.display import display

        from edgeshard.ui import plots, widgets
        setup_notebook()
        models = sorted({r["model"] for r in self.rows})
        parts = [ipywidgets.HTML(f"<pre>{plots.html_escape(str(self))}</pre>")]
        for m in models:
            parts += [ipywidgets.HTML(f"<b>{m}</b>"), widgets.bokeh_widget(plots.sweep_figure(self.rows, model=m))]
        display(ipywidgets.VBox(parts))


_LABS: "weakref.WeakSet[Lab]" = weakref.WeakSet()


@atexit.register
def _down_all() -> None:  # a kernel that stops (restart, shutdown) takes its testbeds down with it
    for lab in list(_LABS):
        lab.down()


class Lab:
    """One testbed in one session: up/down, profile, plan, run. A context manager; brought down at exit too.

    local=True (the default) runs each device as a process on this machine, every device on 127.0.0.1 with a free
    port, so a Lab never collides with another testbed; local=False emulates the testbed in the kernel (root).
    """

    def __init__(self, testbed="local", local: bool = True, state_dir=None):
        tb = load_testbed(testbed)
        if local:  # free ports on loopback, as launch.local_testbed does
            tb = tb.replace(devices=tuple(dataclasses.replace(d, host="127.0.0.1", port=0) for d in tb.devices),
                            path=None)
        self.testbed, self.local = tb, local
        self.state_dir = Path(state_dir) if state_dir else Path(tempfile.mkdtemp(prefix="edgeshard-lab-"))
        self.state: dict | None = None
        self.profiles: dict = {}  # model -> Profile measured in this session
        self.plans: list = []
        _LABS.add(self)

    # --- life cycle -----------------------------------------------------------------------------------------
    def up(self) -> "Lab":
        from edgeshard import testbeds
        if not self.is_up:
            # tied: if the kernel is killed (no atexit), its device servers end with it
            self.state = testbeds.up(self.testbed, local=self.local, state_dir=self.state_dir, tied=True)
        return self

    def down(self) -> list:
        from edgeshard import testbeds
        if testbeds.find_state(self.testbed, self.state_dir) is None:
            self.state = None
            return []
        stopped = testbeds.down(self.testbed.name, self.state_dir)
        self.state = None
        return stopped

    @property
    def is_up(self) -> bool:
        from edgeshard import testbeds
        return testbeds.find_state(self.testbed, self.state_dir) is not None

    def status(self) -> dict:
        """{device: "healthy" or the error}; empty when the testbed is down."""
        from edgeshard import testbeds
        st = testbeds.status(self.testbed, self.state_dir) if self.is_up else None
        return {n: ("healthy" if d["healthy"] else d.get("error", "not healthy")) for n, d in (st or {}).get("devices", {}).items()}

    def __enter__(self) -> "Lab":
        return self.up()

    def __exit__(self, *exc) -> None:
        self.down()

    # --- profile, plan, run ---------------------------------------------------------------------------------
    def profile(self, model: str = "smollm2-135m", use_cache: bool = True, progress: bool = True, **kw):
        """Measure `model` on every device and link of the testbed (brought up if it is not); cached on disk by
        everything that changes a measurement. Keywords: repeats, context_tokens, prefill_tokens, ..."""
        from edgeshard.run import profiler
        self.up()
        params = {**PROFILE_DEFAULTS, **kw}
        pr = profiler.profile(self.testbed, model, self.state, use_cache=use_cache, progress=progress, **params)
        self.profiles[model] = pr
        return pr

    def _profile_for(self, model: str | None):
        if model is None:
            if not self.profiles:
                raise ConfigError("Lab.plan", "no profile yet", "call lab.profile(model) first")
            return list(self.profiles.values())[-1]
        return self.profiles.get(model) or self.profile(model)

    def plan(self, objective: str = "latency", model: str | None = None, strategy: str = "edgeshard",
             prompt_tokens: int = 16, new_tokens: int = 64, sequences: int | None = None) -> planm.Plan:
        """The plan of `strategy` (default the exact DP) for `objective` on the last profiled model."""
        p = plan(self.testbed, self._profile_for(model), objective, strategy, prompt_tokens, new_tokens, sequences)
        self.plans.append(p)
        return p

    def planner(self, objective: str = "throughput", model: str | None = None, prompt_tokens: int = 16,
                new_tokens: int = 64):
        """Every strategy side by side, plan figures, diffs and a what-if link slider (a widget)."""
        return planner(self.testbed, self._profile_for(model), objective, prompt_tokens, new_tokens)

    def run(self, prompts, plan: planm.Plan | None = None, max_new_tokens: int = 64, mode: str | None = None,
            runs_dir="runs", start: bool = True, down_after: bool = False, **kw) -> "LiveRun":
        """Generate in the background over the plan's devices; returns a LiveRun (live view with Stop).
        mode: "pipeline" (all prompts in flight) for a throughput plan, else "sequential". down_after: bring the
        testbed down as soon as the run ends (stopped or done), e.g. in a notebook whose cell returns at once."""
        from edgeshard.run import runtime
        plan = plan or (self.plans[-1] if self.plans else self.plan())
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        mode = mode or ("pipeline" if plan.objective == "throughput" and len(prompts) > 1 else "sequential")
        self.up()
        profile = self.profiles.get(plan.model)

        def start_run():
            return runtime.Run(self.testbed, plan, plan.model, prompts, max_new_tokens, mode=mode, state=self.state,
                               profile=profile, runs_base=runs_dir, **kw).start()

        return LiveRun(start_run, plan, start=start, lab=self, down_after=down_after)

    def reproduce(self, run_dir) -> "Reproduction":
        """Re-run a run folder on this testbed (its testbed.toml, plan.json and parameters.json) and compare the
        new run with the recorded one: greedy decoding must give identical token ids."""
        import json
        from edgeshard.run import reproduce
        run_dir = Path(run_dir)
        self.up()
        rc = reproduce.main(run_dir, state_dir=self.state_dir)
        second = run_dir.parent / (run_dir.name + "-reproduced")
        lines, same = reproduce.compare_runs(json.loads((run_dir / "summary.json").read_text()),
                                             json.loads((second / "summary.json").read_text()))
        return Reproduction(run_dir, second, same and rc == 0, "\n".join(lines))

    def _ipython_display_(self) -> None:
        from IPython.display import display
        display(self.testbed)
        import ipywidgets
        st = self.status()
        rows = "".join(f"<tr><td>{n}</td><td>{s}</td></tr>" for n, s in st.items())
        display(ipywidgets.HTML(f"<b>{self.testbed.name}</b>: {'up' if st else 'down'}"
                                + (f"<table>{rows}</table>" if rows else "")))


class LiveRun:
    """A run going on in the background. Shows itself as its live view (plots, streamed text, Stop) and a status
    line (points drawn, tokens, run state, testbed up/down); wait() blocks until it ends and returns the result;
    report() renders its run folder."""

    def __init__(self, start_fn, plan, start: bool = True, lab: "Lab | None" = None, down_after: bool = False):
        import ipywidgets

        from edgeshard.ui import widgets
        setup_notebook()
        self.lab, self.down_after = lab, down_after
        self.view = widgets.RunView(start_fn, plan)
        self.line = ipywidgets.HTML()  # classes es-points/es-tokens/es-status/es-testbed: what tests/test_browser.py reads
        self.line.add_class("es-run-probe")
        self._watch = None
        if start:
            self.view.start()
        self._update()
        try:
            import asyncio
            self._watch = asyncio.get_running_loop().create_task(self._follow())
        except RuntimeError:  # no event loop (a script): wait() pumps and updates
            pass

    @property
    def status(self) -> str:
        """idle, starting, running, stopping, stopped, done or start failed (the first words of the view's status)."""
        import re
        m = re.match(r"[a-z ]*[a-z]", re.sub(r"<[^>]+>", "", self.view.status.value))
        return m.group(0) if m else "?"

    def _update(self) -> bool:
        up = self.lab.is_up if self.lab is not None else False
        if self.down_after and up and self.view.handle is not None and not self.view.running:
            self.lab.down()
            up = False
        self.line.value = (f'live plot points: <span class="es-points">{len(self.view.live.tokens.data["n"])}</span>'
                           f' · tokens: <span class="es-tokens">{self.view.live.count}</span>'
                           f' · run: <span class="es-status">{self.status}</span>'
                           f' · testbed: <span class="es-testbed">{"up" if up else "down"}</span>')
        return up

    async def _follow(self) -> None:
        import asyncio
        while True:  # on the kernel's event loop, like the view's own pump (never a worker thread)
            up = self._update()
            if not self.view.running and not (self.down_after and up):
                return
            await asyncio.sleep(0.25)

    @property
    def running(self) -> bool:
        return self.view.running

    def stop(self) -> None:
        self.view.stop()

    def wait(self, timeout: float | None = 600.0) -> dict:
        """Block until the run ends (pumping the view); the runtime's result dict."""
        import time
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.view.pump():
            if deadline is not None and time.monotonic() > deadline:
                self.view.stop()
                raise TimeoutError(f"the run did not end within {timeout} s (stopped)")
            time.sleep(0.05)
        self._update()
        return self.result

    @property
    def result(self) -> dict | None:
        h = self.view.handle
        if h is None or not h.done:
            return None
        if getattr(h, "error", None) is not None:
            raise h.error
        return h.result

    @property
    def run_dir(self) -> Path | None:
        r = self.result
        return Path(r["run_dir"]) if r and r.get("run_dir") else None

    @property
    def texts(self) -> list[str]:
        return [r["text"] for r in (self.result or {}).get("results", [])]

    def report(self) -> "Report":
        from edgeshard.ui import report
        if self.run_dir is None:
            raise ConfigError("LiveRun.report", "the run has not ended or wrote no run folder", "wait() first")
        return Report(report.render(self.run_dir))

    def _ipython_display_(self) -> None:
        import ipywidgets
        from IPython.display import display
        display(ipywidgets.VBox([self.view.widget, self.line]))


@dataclasses.dataclass
class Report:
    path: Path

    def _repr_html_(self) -> str:
        import html
        import os
        rel = os.path.relpath(self.path.resolve(), Path.cwd())
        if rel.startswith(".."):
            return f"<p>report: <code>{html.escape(str(self.path.resolve()))}</code> (open it in a browser)</p>"
        return (f'<p>report: <code>{html.escape(rel)}</code></p>'
                f'<iframe src="{html.escape(rel)}" width="100%" height="650"></iframe>')


@dataclasses.dataclass
class Reproduction:
    """A run folder re-run: `same` is True when the token ids are identical (and the re-run succeeded)."""
    run_dir: Path
    reproduced_dir: Path
    same: bool
    table: str

    def __str__(self) -> str:
        return f"{self.table}\ntoken ids identical: {self.same}"

    def _repr_html_(self) -> str:
        import html
        return f"<pre>{html.escape(str(self))}</pre>"
