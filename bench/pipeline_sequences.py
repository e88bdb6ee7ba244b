"""Pipeline tokens/s against the number of sequences in flight, on a kernel-emulated testbed (needs root).

One profile, one throughput plan, then pipeline runs with each N of --sequences. Per N it prints the measured
steady tokens/s (bench/emulated_predictions.py's window), the plan's closed-pipeline prediction for N
(`pipeline_tokens_per_s`), the round-trip bound N / (stages + hops + return), 1 / bottleneck, each device's busy
share and its mean decode step in the run against the profiled pipelined stage time. docs/emulation.md has a
run of it.

    sudo .venv/bin/python bench/pipeline_sequences.py [SCENARIO.toml] [--sequences 4 8 16]    # ~3 min
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import emulated_predictions as ep  # noqa: E402

from edgeshard import testbeds
from edgeshard.config import testbed as tbm
from edgeshard.planning import costs  # noqa: E402
from edgeshard.planning import dp as planner
from edgeshard.run import profiler, runtime


def step_times(events: list[dict]) -> dict[str, float]:
    """Mean duration of each device's one-token compute steps."""
    out: dict[str, list[float]] = {}
    for e in events:
        if e.get("type") == "compute" and e.get("tokens") == 1:
            out.setdefault(e["device"], []).append(e["end_s"] - e["start_s"])
    return {d: statistics.mean(x) for d, x in out.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("scenario", nargs="?", type=Path, default=ROOT / "testbed_configs" / "emu-paper-bw10.toml")
    ap.add_argument("--sequences", type=int, nargs="+", default=[4, 8, 16])
    args = ap.parse_args(argv)
    tb = tbm.load(args.scenario)
    with tempfile.TemporaryDirectory(prefix="edgeshard-seq-") as tmp:
        sd = Path(tmp) / "state"
        state = testbeds.up(tb, local=False, state_dir=sd)
        try:
            pr = profiler.profile(tb, ep.MODEL, state, context_tokens=ep.CONTEXT_TOKENS,
                                  prefill_tokens=ep.PREFILL_TOKENS, repeats=3, cache_dir=Path(tmp) / "profiles",
                                  progress=False, use_cache=False)
            plan = planner.solve(tb, pr, "throughput", ep.workload())
            cm = costs.CostModel(tb, pr)
            stages = plan.predicted["stages"]
            print(f"{tb.name}: throughput plan " + " ".join(f"{s['device']}[{s['start']},{s['stop']}) "
                                                             f"{s['pipelined_s'] * 1e3:.1f} ms" for s in stages))
            runtime.run(tb, plan, ep.MODEL, ep.PROMPTS[:1], 4, state=state, write_run_dir=False)  # warm-up
            print("| sequences | measured steady tokens/s | pipeline_tokens_per_s | round-trip bound | 1 / bottleneck "
                  "| busy | mean step run / profiled (ms) |")
            print("|---|---|---|---|---|---|---|")
            for n in args.sequences:
                prompts = [ep.PROMPTS[i % len(ep.PROMPTS)] for i in range(n)]
                events: list[dict] = []
                res = runtime.run(tb, plan, ep.MODEL, prompts, ep.NEW_TOKENS, mode="pipeline", state=state,
                                  write_run_dir=False, on_event=events.append)
                p = cm.evaluate(plan.stages, ep.workload(n))
                overhead = sum(cm.overhead[s.device] for s in plan.stages)
                bound = min(p["throughput_tokens_per_s"], n / (p["latency_s"] + overhead))
                m = ep.steady_tokens_per_s(events)
                busy = {d: v["share"] for d, v in res["summary"]["devices"].items()}
                st = step_times(events)
                print(f"| {n} | {m:.1f} | {p['pipeline_tokens_per_s']:.1f} ({ep.error(p['pipeline_tokens_per_s'], m):+.0%}) "
                      f"| {bound:.1f} | {p['throughput_tokens_per_s']:.1f} | "
                      + ", ".join(f"{d} {busy.get(d, 0):.2f}" for d in (s["device"] for s in stages)) + " | "
                      + ", ".join(f"{s['device']} {st.get(s['device'], float('nan')) * 1e3:.1f} / "
                                  f"{s['pipelined_s'] * 1e3:.1f}" for s in stages) + " |", flush=True)
        finally:
            testbeds.down(tb, sd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
