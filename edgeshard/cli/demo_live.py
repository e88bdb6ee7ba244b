"""The live part of `make demo`: testbed up -> profile -> plan -> run SmolLM2 on 3 devices -> report -> down.

As root, where network namespaces work, the testbed is emulated in the kernel (emulate.py); otherwise the
devices are local processes with links shaped in the data plane. The last line printed is the report's path.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
from pathlib import Path

from edgeshard import testbeds
from edgeshard.config import paths
from edgeshard.config import plan as planm
from edgeshard.config import testbed as tbm
from edgeshard.planning import dp as planner
from edgeshard.planning.costs import Workload
from edgeshard.run import profiler, runtime
from edgeshard.ui import report

ROOT = paths.REPO
MODEL = "smollm2-135m"
PROMPTS = ["The capital of France is", "Edge devices can run large language models by", "Once upon a time,",
           "The history of the city of Paris begins"]
NEW_TOKENS = 24
PROMPT_TOKENS = 8  # about the prompts' length in SmolLM2 tokens


def pick_testbed() -> tuple[Path, bool]:
    """(testbed file, local?) for this machine."""
    ok, why = testbeds.mode_available()
    emu = sorted((ROOT / "testbed_configs").glob("emu-paper*.toml"))
    if ok and emu and not os.environ.get("EDGESHARD_DEMO_LOCAL"):
        return emu[0], False
    if not ok:
        print(f"(kernel emulation unavailable: {why}; using local device processes)")
    return ROOT / "testbed_configs" / "local.toml", True


def main() -> int:
    path, local = pick_testbed()
    tb = tbm.load(path)
    state_dir = Path(tempfile.mkdtemp(prefix="edgeshard-demo-"))
    print(f"\n== bringing up testbed {tb.name} ({'local processes' if local else 'kernel-emulated'}), "
          f"{len(tb.devices)} devices")
    state = testbeds.up(tb, local=local, state_dir=state_dir)
    try:
        for name, d in state["devices"].items():
            print(f"  {name:<10} {d['address']}:{d['port']}  healthy={d['healthy']}")
        print(f"\n== profiling {MODEL} on every device and link (cached per testbed and code version)")
        # decode measured at the context the run sees on average (prompt + half the new tokens)
        pr = profiler.profile(tb, MODEL, state, context_tokens=PROMPT_TOKENS + NEW_TOKENS // 2,
                              prefill_tokens=PROMPT_TOKENS, repeats=3, progress=True)
        runs = Path.cwd() / "runs"  # the repository's runs/ under `make demo`
        runs.mkdir(exist_ok=True)
        wl = Workload(prompt_tokens=PROMPT_TOKENS, new_tokens=NEW_TOKENS)
        lat = planner.solve(tb, pr, "latency", wl)
        # the pipeline run below keeps every prompt in flight: predict its rate for that many sequences
        thr = planner.solve(tb, pr, "throughput", dataclasses.replace(wl, sequences=len(PROMPTS)))
        print("\n== plans from the measured profile")
        from edgeshard.cli.main import summary
        print(summary(lat))
        print(summary(thr))
        print(planm.format_diff(lat, thr, "latency plan", "throughput plan"))
        print(f"\n== running {MODEL}: sequential with the latency plan ({len(lat.stages)} devices)")
        runtime.run(tb, lat, MODEL, PROMPTS[:1], 4, state=state, write_run_dir=False)  # warm-up: first calls are slow
        res = runtime.run(tb, lat, MODEL, PROMPTS[:1], NEW_TOKENS, mode="sequential", state=state, profile=pr,
                          runs_base=runs, command=["make", "demo"])
        _show(res, lat, tb, pr, "sequential", 1)
        print(f"\n== running {MODEL}: pipeline, {len(PROMPTS)} sequences in flight, throughput plan "
              f"({len(thr.stages)} devices)")
        runtime.run(tb, thr, MODEL, PROMPTS[:1], 4, state=state, write_run_dir=False)
        res = runtime.run(tb, thr, MODEL, PROMPTS, NEW_TOKENS, mode="pipeline", state=state, profile=pr,
                          runs_base=runs, command=["make", "demo"])
        _show(res, thr, tb, pr, "pipeline", len(PROMPTS))
        out = report.render(res["run_dir"])
    finally:
        testbeds.down(tb.name, state_dir)
        print(f"\n== testbed {tb.name} is down")
    print(f"report (open in a browser; `make lab` for the notebooks):\n{out}")
    return 0


def _show(res: dict, plan, tb, pr, mode: str, sequences: int) -> None:
    from edgeshard.ui import plots

    for r in res["results"]:
        print(f"  {r['prompt']!r} -> {r['text']!r}")
        print(f"    token ids {r['token_ids']}")
    s = res["summary"]
    tl = s.get("token_latency_s") or {}
    ref = plots.run_prediction(plan, mode, sequences, tb, pr)
    if tl.get("p50") is not None and ref is not None:
        each = " per sequence" if mode == "pipeline" else ""
        print(f"  per-token latency{each} p50 {tl['p50'] * 1000:.1f} ms (p95 {tl['p95'] * 1000:.1f} ms), predicted "
              f"{ref['latency_s'] * 1000:.1f} ms; {s['tokens_per_s']:.1f} tokens/s overall, prefill "
              f"included (predicted {ref['tokens_per_s']:.1f} tokens/s with {ref['sequences']} sequence(s) in "
              f"flight; 1 / bottleneck {plan.predicted['throughput_tokens_per_s']:.1f})")
        print(f"  reference: {ref['basis']}")
        if res.get("run_dir"):  # the report's reasons: the run folder's events say how the compute steps went
            reasons = report.why_prediction_fails(report._Run(Path(res["run_dir"])))
        else:
            reasons = list(ref["why"])
        for why in reasons:
            print(f"  why the prediction does not hold: {why}")
    print(f"  run folder: {res['run_dir']}")


if __name__ == "__main__":
    sys.exit(main())
