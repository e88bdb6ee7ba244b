"""Profile -> plan -> run on the local testbed, in one go; prints predicted vs measured figures.

1. Profile SmolLM2 on the local testbed (testbed_configs/local.toml, every port 0; cached by the profiler).
2. Latency: the planner's latency-optimal plan, and the best plan that uses all three devices, each run in
   sequential mode: predicted per-token latency (planner.solve(...).predicted["latency_s"]) vs the measured
   median per-token decode latency. Target: within 15%.
3. Pipeline: 3 sequences over the 3-stage plan in pipeline mode vs the same 3 sequences in sequential mode
   (tokens/s over the whole run), and vs the plan's predicted bottleneck throughput (1 / slowest stage or hop).

    .venv/bin/python bench/pipeline.py [--tokens 32] [--repeats 5]

Note: the local testbed runs every device on this machine's cores (2 here, shared with whatever else runs), so
pipeline speedup is capped by the core count, not by the plan.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edgeshard.config import testbed as tbm
from edgeshard.planning import costs  # noqa: E402
from edgeshard.planning import dp as planner
from edgeshard.run import profiler, runtime
from edgeshard.testbeds import local as launch

PROMPTS = ["The history of the city of Paris begins", "Once upon a time, in a small village,",
           "The three laws of thermodynamics are"]


def decode_latency(res) -> float:
    gaps = [g for r in res["results"] for g in r["token_latency_s"][1:]]
    return statistics.median(gaps)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--testbed", default=str(ROOT / "testbed_configs" / "local.toml"))
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5, help="profiler repeats")
    ap.add_argument("--runs", type=int, default=2, help="runs per measurement (medians)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    tb = tbm.load(args.testbed)
    out = {"testbed": tb.name, "model": args.model, "tokens": args.tokens}
    with launch.local_testbed(tb) as state:
        pr = profiler.profile(tb, args.model, state, repeats=args.repeats, progress=not args.json)
        out["profile_cache_hit"] = pr.provenance["cache"]["hit"]
        wl = costs.Workload(prompt_tokens=10, new_tokens=args.tokens)
        lat_plan = planner.solve(tb, pr, "latency", wl)
        all3 = tb.with_constraints(require=tuple(d for d in tb.names if d != tb.source))
        three = planner.solve(all3, pr, "latency", wl)
        thr = planner.solve(all3, pr, "throughput", wl)
        rows = []
        for label, plan in (("latency-optimal", lat_plan), ("3 devices", three)):
            measured = []
            runtime.run(tb, plan, args.model, PROMPTS[:1], 4, state=state, write_run_dir=False)  # load, warm up
            for _ in range(args.runs):
                res = runtime.run(tb, plan, args.model, PROMPTS[:1], args.tokens, state=state, write_run_dir=False)
                measured.append(decode_latency(res))
            m, p = statistics.median(measured), plan.predicted["latency_s"]
            rows.append({"plan": label, "stages": [[s.device, s.start, s.stop] for s in plan.stages],
                         "predicted_latency_s": p, "measured_latency_s": m, "error": (p - m) / m})
        out["latency"] = rows
        # pipeline vs sequential on the 3-stage throughput plan
        runtime.run(tb, thr, args.model, PROMPTS[:1], 4, state=state, write_run_dir=False)
        seq_tps, pipe_tps = [], []
        for _ in range(args.runs):
            s = runtime.run(tb, thr, args.model, PROMPTS, args.tokens, mode="sequential", state=state,
                            write_run_dir=False)["summary"]
            p = runtime.run(tb, thr, args.model, PROMPTS, args.tokens, mode="pipeline", state=state,
                            write_run_dir=False)["summary"]
            seq_tps.append(s["tokens_per_s"])
            pipe_tps.append(p["tokens_per_s"])
        out["pipeline"] = {"stages": [[s.device, s.start, s.stop] for s in thr.stages],
                           "sequential_tokens_per_s": statistics.median(seq_tps),
                           "pipeline_tokens_per_s": statistics.median(pipe_tps),
                           "predicted_throughput_tokens_per_s": thr.predicted["throughput_tokens_per_s"],
                           "predicted_latency_s": thr.predicted["latency_s"]}
        pl = out["pipeline"]
        pl["pipeline_over_sequential"] = pl["pipeline_tokens_per_s"] / pl["sequential_tokens_per_s"]
        pl["pipeline_over_predicted"] = pl["pipeline_tokens_per_s"] / pl["predicted_throughput_tokens_per_s"]
        out["cpu_count"] = os.cpu_count()
    if args.json:
        print(json.dumps(out, indent=1))
        return
    print(f"\n{args.model} on {tb.name} (local processes, {os.cpu_count()} cores), {args.tokens} new tokens, "
          f"medians of {args.runs} runs; profile {'from cache' if out['profile_cache_hit'] else 'measured now'}")
    for r in rows:
        print(f"  {r['plan']:<16} {' '.join(f'{d}[{a},{b})' for d, a, b in r['stages'])}: predicted "
              f"{r['predicted_latency_s'] * 1e3:.2f} ms/token, measured {r['measured_latency_s'] * 1e3:.2f} ms/token "
              f"-> error {r['error'] * 100:+.1f}% (target within 15%)")
    print(f"  pipeline, 3 sequences over {' '.join(f'{d}[{a},{b})' for d, a, b in pl['stages'])}: "
          f"{pl['pipeline_tokens_per_s']:.1f} tokens/s vs sequential {pl['sequential_tokens_per_s']:.1f} "
          f"({pl['pipeline_over_sequential']:.2f}x); predicted bottleneck throughput "
          f"{pl['predicted_throughput_tokens_per_s']:.1f} tokens/s ({pl['pipeline_over_predicted']:.2f}x of it)")


if __name__ == "__main__":
    main()
