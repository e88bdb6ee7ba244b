"""Runtime: deploy a plan's shards on device servers and generate, in sequential or pipeline mode.

    result = run(testbed, plan, "smollm2-135m", ["Hello"], max_new_tokens=16, state=launch_state)
    r = Run(testbed, plan, model, prompts, 16, mode="pipeline", state=state).start()   # notebook: returns at once
    r = Run.from_config(testbed, plan, RunConfig(model, prompts, 16), state=state)     # the same, from a config
    for ev in r: ...            # events as they arrive (or r.events, a queue.Queue); r.stop() stops the run
    r.wait()                    # the result dict

What goes where (docs/architecture.md, the runtime): the controller (this package) talks rpyc to each device
for control only. It sends the raw prompt text to the source device, which tokenises it (prompt token ids never
leave the source) and detokenises the generated ids (the text comes back in the source's events). Activations
go stage to stage over the data plane; the last stage samples and returns the 8-byte token id to the source (a
ring). The controller never carries activations; it receives the devices' events, appends each one to
run_dir/events.jsonl as it arrives, and passes it to on_event and the events queue.

Run is the thread and the handle; the parts are separate modules:
    run/parameters.py  RunConfig: the run's settings and record, exactly parameters.json
    run/folder.py      RunFolder: the run folder's files (default runs/<timestamp>-<strategy>-<objective>/)
    run/deploy.py      Deployment: connect, load stages in parallel, configure the ring, subscribe to events
    run/generate.py    generate(): submit prompts, collect tokens until every sequence is done or stopped
Plan rules: planning/costs.structure_violations (the one rule set) + runtime_violations (this module).
"""

from __future__ import annotations

import dataclasses
import queue
import sys
import threading
from pathlib import Path
from typing import Callable

from edgeshard.config import plan as planm
from edgeshard.config import testbed as tbm
from edgeshard.config.errors import PlanError
from edgeshard.planning.costs import structure_violations
from edgeshard.run import metrics
from edgeshard.run.deploy import Deployment, new_run_id, shaping_for  # noqa: F401  (shaping_for: tests)
from edgeshard.run.deploy import address as _address  # noqa: F401  (older name)
from edgeshard.run.deploy import boot_id as _boot_id  # noqa: F401
from edgeshard.run.deploy import token_file as _token_file  # noqa: F401
from edgeshard.run.folder import RunFolder, default_run_dir, environment  # noqa: F401
from edgeshard.run.generate import DRAIN_TIMEOUT_S, WATCHDOG_S, generate  # noqa: F401
from edgeshard.run.parameters import MODES, RunConfig  # noqa: F401


class RunStopped(Exception):
    pass


def _n_units(model: str) -> int:
    from edgeshard.config import catalog

    if model in catalog.MODELS:
        return catalog.get(model).n_units
    from edgeshard.device.model import spec_for  # a local folder: needs its config.json

    return spec_for(model).n_units


def runtime_violations(plan: planm.Plan, model: str) -> list[str]:
    """The rules only a run adds to the plan rules (planning/costs.structure_violations): the plan was made for
    the model being run."""
    if plan.model and plan.model != model:
        return [f"the plan was made for model {plan.model!r}, not {model!r} (run {plan.model!r}, or plan again "
                f"for {model!r})"]
    return []


def check_plan(tb: tbm.Testbed, plan: planm.Plan, model: str) -> None:
    """A plan the runtime can execute on this testbed and model, or a PlanError naming every rule it breaks.
    The rules are the cost model's (planning/costs.structure_violations, with the unit count of `model`) plus
    runtime_violations; the planner's [constraints] (exclude, require, max_stages) are not enforced here."""
    if not plan.stages:
        raise PlanError("cannot run this plan: the plan has no stages")
    bad = structure_violations(tb, plan.stages, _n_units(model)) + runtime_violations(plan, model)
    if bad:
        raise PlanError("cannot run this plan: " + "; ".join(bad))


def _load_inputs(testbed, plan) -> tuple[tbm.Testbed, planm.Plan]:
    tb = tbm.as_testbed(testbed)
    pl = plan if isinstance(plan, planm.Plan) else planm.load(plan)
    return tb, pl


class Run:
    """One execution of a plan. start() runs it in a background thread; run_sync() in the caller's thread.

    events: queue.Queue of event dicts (run/metrics.py schema, plus "request"/"seq_done"/"error" extras; a token
    event carries its detokenised "text" piece), then None when the run ends; filled for runs started with
    start() (use on_event with run_sync()). Iterating a started Run yields the events. stop() stops generation
    on every device; wait() then returns the partial result (result["stopped"] is True).

    config: the RunConfig (its record filled in: run_id, testbed, testbed_state, command); model, prompts, mode,
    max_in_flight ... read through to it. run_dir: the run folder (absolute), or None with write_run_dir=False.
    """

    def __init__(self, testbed, plan, model: str, prompts: list, max_new_tokens: int, mode: str = "sequential",
                 state: dict | None = None, dtype: str = "float32", temperature: float = 0.0, top_p: float = 1.0,
                 seed: int = 0, chat: bool = False, run_dir: str | Path | None = None,
                 on_event: Callable[[dict], None] | None = None, stop_event: threading.Event | None = None,
                 debug_logits: bool = False, max_in_flight: int | None = None, profile=None,
                 command: list[str] | None = None, runs_base: str | Path = "runs", write_run_dir: bool = True):
        config = RunConfig(model, prompts, max_new_tokens, mode, dtype, temperature, top_p, seed, chat,
                           max_in_flight, debug_logits, command=command)
        self._setup(testbed, plan, config, state, run_dir, on_event, stop_event, profile, runs_base, write_run_dir)

    @classmethod
    def from_config(cls, testbed, plan, config: RunConfig, state: dict | None = None,
                    run_dir: str | Path | None = None, on_event: Callable[[dict], None] | None = None,
                    stop_event: threading.Event | None = None, profile=None, runs_base: str | Path = "runs",
                    write_run_dir: bool = True) -> "Run":
        """A Run of these settings (e.g. RunConfig.load(parameters.json).for_reproduction()). The record fields
        are this run's: config.command is kept when given, the others are always filled in anew."""
        self = cls.__new__(cls)
        self._setup(testbed, plan, config, state, run_dir, on_event, stop_event, profile, runs_base, write_run_dir)
        return self

    def _setup(self, testbed, plan, config, state, run_dir, on_event, stop_event, profile, runs_base,
               write_run_dir) -> None:
        self.tb, self.plan = _load_inputs(testbed, plan)
        check_plan(self.tb, self.plan, config.model)
        self.config = dataclasses.replace(config, run_id=new_run_id(), testbed=self.tb.name, testbed_state=state,
                                          command=config.command or tuple(sys.argv))
        self.state, self.profile = state, profile
        self.on_event = on_event
        self.stop_event = stop_event or threading.Event()
        self.write_run_dir = write_run_dir
        folder = Path(run_dir) if run_dir else (default_run_dir(self.plan, runs_base) if write_run_dir else None)
        self.folder = RunFolder(folder) if folder is not None else None
        self.run_dir = self.folder.path if self.folder else None
        self.events: queue.Queue = queue.Queue()
        self.result: dict | None = None
        self.error: BaseException | None = None
        self.deployment: Deployment | None = None  # while running: the devices' clients, infos, loads
        self._thread: threading.Thread | None = None
        self._done = threading.Event()
        self._feed_queue = False  # the events queue is filled for started (background) runs

    # --- the settings, as attributes (callers and ui/widgets.run_reference read them) --------------------
    model = property(lambda self: self.config.model)
    prompts = property(lambda self: list(self.config.prompts))
    max_new_tokens = property(lambda self: self.config.max_new_tokens)
    mode = property(lambda self: self.config.mode)
    max_in_flight = property(lambda self: self.config.max_in_flight)
    dtype = property(lambda self: self.config.dtype)
    seed = property(lambda self: self.config.seed)
    run_id = property(lambda self: self.config.run_id)

    # --- notebook API ------------------------------------------------------------------------------------
    def start(self) -> "Run":
        if self._thread is not None:
            raise RuntimeError("this run was already started")

        def target():
            try:
                self.run_sync()
            except BaseException as e:  # kept for wait()
                self.error = e

        self._feed_queue = True
        self._thread = threading.Thread(target=target, name="edgeshard-run", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop generating (every device drops its work); wait() then returns the partial result."""
        self.stop_event.set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> dict:
        if self._thread is None:
            raise RuntimeError("start() the run first")
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"the run is still going after {timeout} s")
        if self.error is not None:
            raise self.error
        return self.result

    def __iter__(self):
        while True:
            ev = self.events.get()
            if ev is None:
                return
            yield ev

    # --- the run -------------------------------------------------------------------------------------------
    def run_sync(self) -> dict:
        try:
            return self._execute()
        finally:
            self._done.set()
            self.events.put(None)

    def _record(self, ev: dict) -> None:
        """One event of this run, as it arrives: events.jsonl, the events queue, on_event."""
        if self.folder:
            self.folder.append_event(ev)
        if self._feed_queue:
            self.events.put(ev)
        if self.on_event:
            self.on_event(ev)

    def _execute(self) -> dict:
        cfg = self.config
        dep = self.deployment = Deployment.connect(self.tb, self.plan, self.state, cfg.run_id)
        try:
            if self.folder:
                self.folder.write_inputs(self.tb, self.plan, cfg, self.profile)
            env = environment()
            env.update(dep.probe())
            if self.folder:
                self.folder.write_environment(env)
            dep.load(cfg.model, cfg.dtype, cfg.seed)
            dep.configure_ring(cfg)
            dep.subscribe()
            try:
                gen = generate(dep, cfg, self._record, self.stop_event)
            except BaseException:  # an error, a dead device, Ctrl-C: the others must not keep generating
                dep.cancel_all()
                raise
        finally:
            dep.close()
            if self.folder:
                self.folder.close()
        summary = metrics.summarize(gen.events)
        self.result = {"results": gen.results, "run_dir": str(self.run_dir) if self.run_dir else None,
                       "summary": summary, "stopped": gen.stopped, "run_id": cfg.run_id, "mode": cfg.mode}
        if self.folder:
            out = dict(summary)
            out["results"] = [{k: v for k, v in r.items() if k != "logits"} for r in gen.results]
            out.update({"mode": cfg.mode, "stopped": gen.stopped, "model": cfg.model,
                        "plan_predicted": self.plan.predicted,
                        "stages": [{"device": s.device, "start": s.start, "stop": s.stop} for s in self.plan.stages],
                        "load": dep.loads})
            self.folder.write_summary(out)
        return self.result


def run(testbed, plan, model: str, prompts: list, max_new_tokens: int, mode: str = "sequential",
        state: dict | None = None, dtype: str = "float32", temperature: float = 0.0, top_p: float = 1.0,
        seed: int = 0, chat: bool = False, run_dir: str | Path | None = None,
        on_event: Callable[[dict], None] | None = None, stop_event: threading.Event | None = None,
        **kw) -> dict:
    """Deploy and generate (blocking). Returns {"results": [{"prompt", "token_ids", "text", "token_latency_s",
    ...}], "run_dir", "summary", "stopped", "run_id", "mode"}. Extra keywords: debug_logits, max_in_flight,
    profile, command, runs_base, write_run_dir (see Run)."""
    return Run(testbed, plan, model, prompts, max_new_tokens, mode, state, dtype, temperature, top_p, seed, chat,
               run_dir, on_event, stop_event, **kw).run_sync()
