"""Predicted vs measured on kernel-emulated testbeds (needs root): does a plan made from a measured profile
predict what SmolLM2 really does on the emulated devices?

For each scenario (default: every testbed_configs/emu-*.toml):
1. bring the testbed up emulated (namespaces, htb+tbf per pair, cgroup CPU quota + memory limit, idle ballast);
2. profile SmolLM2 on it (edgeshard.run.profiler, no cache) and compare the profile with the configuration: every
   pair's bandwidth (goodput sits ~4 % under the configured rate: headers count) and the compute ratios
   (decode time of the 30 layers times cpu_share is the same on every device when the shares are recovered);
3. plan for latency and for throughput (planner.solve, workload: WORKLOAD_PROMPT_TOKENS prompt tokens,
   NEW_TOKENS new tokens);
4. run the latency plan in sequential mode (one sequence, medians of per-token decode latency over --runs runs)
   and the throughput plan in pipeline mode (3 sequences per stage in flight, steady-state tokens/s: tokens
   between the moment every sequence has its first token and the moment the first one finishes, over that
   window; the whole-run tokens/s, which includes prefill and ramp-up/down, is reported too);
5. print predicted vs measured with the error, and take the testbed down (also on Ctrl-C or an error).

    sudo .venv/bin/python bench/emulated_predictions.py [SCENARIO.toml ...] [--runs 3] [--json]

About 3-4 minutes per scenario on a 2-core machine (most of it profiling devices at a fraction of a core).
tests/test_emulated_accuracy.py imports the helpers below.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edgeshard import testbeds
from edgeshard.config import catalog  # noqa: E402
from edgeshard.config import testbed as tbm
from edgeshard.planning import costs
from edgeshard.planning import dp as planner
from edgeshard.run import profiler, runtime

MODEL = "smollm2-135m"
NEW_TOKENS = 24
# ~10-token prompts (SmolLM2 tokenizer); the pipeline cycles through them
PROMPTS = ["Once upon a time, in a small village,", "The history of the city of Paris begins",
           "The three laws of thermodynamics are", "A recipe for a simple tomato soup:",
           "The most important thing about learning is", "In the middle of the ocean there was"]
WORKLOAD_PROMPT_TOKENS = 10
# profile parameters: decode measured at the context the runs see on average (prompt + half the new tokens)
CONTEXT_TOKENS = WORKLOAD_PROMPT_TOKENS + NEW_TOKENS // 2
PREFILL_TOKENS = WORKLOAD_PROMPT_TOKENS
SEQS_PER_STAGE = 4  # pipeline: sequences in flight per stage (enough to keep the bottleneck busy)


def scenarios() -> list[Path]:
    return sorted((ROOT / "testbed_configs").glob("emu-*.toml"))


def workload(sequences: int = 1) -> costs.Workload:
    return costs.Workload(prompt_tokens=WORKLOAD_PROMPT_TOKENS, new_tokens=NEW_TOKENS, sequences=sequences)


# ----------------------------------------------------------------------------------------------- profile checks

def link_accuracy(tb: tbm.Testbed, pr) -> list[dict]:
    """Per ordered pair: configured vs profiled bandwidth (Mbit/s) and latency (ms)."""
    out = []
    for lk in pr.links:
        conf = tb.link(lk.src, lk.dst)
        out.append({"src": lk.src, "dst": lk.dst, "configured_mbit_s": conf.bandwidth_mbit_s,
                    "measured_mbit_s": lk.bandwidth_mbit_s,
                    "bandwidth_error": lk.bandwidth_mbit_s / conf.bandwidth_mbit_s - 1,
                    "configured_latency_ms": conf.latency_s * 1e3, "measured_latency_ms": lk.latency_s * 1e3})
    return out


def layer_decode_s(pr, device: str) -> float:
    """Profiled decode time of the decoder layers (units 1..L) on a device: the bulk of the compute, the same
    work on every device (the embedding is a table lookup of ~0.05 ms that no share can slow measurably)."""
    d = pr.devices[device].decode_s
    return sum(d[1:-1])


def compute_accuracy(tb: tbm.Testbed, pr) -> dict:
    """Speed ratios between devices from the profile vs the inverse cpu_share ratio, for every pair; per unit too
    (the median over layers of the per-layer ratio)."""
    names = [n for n in pr.devices if tb.device(n).cpu_share]
    pairs = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            sa, sb = tb.device(a).cpu_share, tb.device(b).cpu_share
            expected = sb / sa  # time_a / time_b
            measured = layer_decode_s(pr, a) / layer_decode_s(pr, b)
            per_unit = statistics.median(x / y for x, y in zip(pr.devices[a].decode_s[1:-1],
                                                                  pr.devices[b].decode_s[1:-1]))
            pairs.append({"a": a, "b": b, "expected": expected, "measured": measured,
                          "error": measured / expected - 1, "per_unit_median": per_unit,
                          "per_unit_error": per_unit / expected - 1})
    return {"devices": {n: {"cpu_share": tb.device(n).cpu_share, "layers_decode_ms": layer_decode_s(pr, n) * 1e3,
                            "x_share_ms": layer_decode_s(pr, n) * tb.device(n).cpu_share * 1e3}
                        for n in names},
            "pairs": pairs}


# ----------------------------------------------------------------------------------------------- runs

def steady_tokens_per_s(events: list[dict]) -> float | None:
    """Tokens/s while every sequence is decoding: from the latest first token to the earliest last token."""
    by: dict = {}
    for e in events:
        if e.get("type") == "token":
            by.setdefault(e["seq"], []).append(e["t_s"])
    if len(by) < 2:
        return None
    t0 = max(min(v) for v in by.values())
    t1 = min(max(v) for v in by.values())
    if t1 <= t0:
        return None
    n = sum(1 for v in by.values() for t in v if t0 < t <= t1)
    return n / (t1 - t0)


def measure_sequential(tb, plan, state, runs: int = 3, new_tokens: int = NEW_TOKENS) -> list[float]:
    """Median per-token decode latency (s) of each of `runs` runs, one sequence each (after a warm-up run that
    loads the stages)."""
    runtime.run(tb, plan, MODEL, PROMPTS[:1], 4, state=state, write_run_dir=False)
    out = []
    for _ in range(runs):
        res = runtime.run(tb, plan, MODEL, PROMPTS[:1], new_tokens, state=state, write_run_dir=False)
        out.append(statistics.median(g for r in res["results"] for g in r["token_latency_s"][1:]))
    return out


def measure_pipeline(tb, plan, state, runs: int = 2, new_tokens: int = NEW_TOKENS) -> list[dict]:
    """Pipeline runs with SEQS_PER_STAGE sequences per stage in flight: steady-state and whole-run tokens/s."""
    n = SEQS_PER_STAGE * len(plan.stages)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
    runtime.run(tb, plan, MODEL, PROMPTS[:1], 4, state=state, write_run_dir=False)
    out = []
    for _ in range(runs):
        events: list[dict] = []
        res = runtime.run(tb, plan, MODEL, prompts, new_tokens, mode="pipeline", state=state,
                          write_run_dir=False, on_event=events.append)
        s = res["summary"]
        out.append({"steady_tokens_per_s": steady_tokens_per_s(events), "tokens_per_s": s["tokens_per_s"],
                    "busy": {d: v["share"] for d, v in s["devices"].items()}})
    return out


def memory_peaks(tb: tbm.Testbed, state: dict, plans) -> dict:
    """Per device used by the plans: the cgroup's peak usage since reset_memory_peaks, and how far it went beyond
    the largest stage's weights the device held (the runtime's own memory: what RUNTIME_ALLOWANCE_BYTES covers)."""
    units = catalog.get(MODEL).units("float32")
    weights: dict[str, int] = {}
    for plan in plans:
        for s in plan.stages:
            w = sum(u.weight_bytes for u in units[s.start:s.stop])
            if s.start == 0 and s.stop == len(units) and catalog.get(MODEL).tied_embeddings:
                w -= units[-1].weight_bytes
            weights[s.device] = max(weights.get(s.device, 0), w)
    out = {}
    for name, w in weights.items():
        dev = state["devices"][name]
        peak = None
        for d in dev.get("cgroup_dirs", []):
            for f in ("memory.max_usage_in_bytes", "memory.peak"):
                p = Path(d) / f
                if p.exists():
                    peak = int(p.read_text())
        if peak is not None:
            out[name] = {"peak_bytes": peak, "stage_weight_bytes": w, "beyond_weights_bytes": peak - w,
                         "limit_bytes": dev.get("memory_limit_bytes")}
    return out


def reset_memory_peaks(state: dict) -> None:
    for dev in state["devices"].values():
        for d in dev.get("cgroup_dirs", []):
            p = Path(d) / "memory.max_usage_in_bytes"
            if p.exists():
                try:
                    p.write_text("0")
                except OSError:
                    pass


def predicted_pipeline(tb, pr, plan, sequences: int) -> float:
    """The plan's closed-pipeline tokens/s (costs.closed_pipeline_rate) with `sequences` in flight."""
    return costs.CostModel(tb, pr).evaluate(plan.stages, workload(sequences))["pipeline_tokens_per_s"]


def error(predicted: float, measured: float) -> float:
    """(predicted - measured) / measured."""
    return (predicted - measured) / measured


# ----------------------------------------------------------------------------------------------- one scenario

def measure_scenario(path: Path, runs: int = 3, pipe_runs: int = 2, repeats: int = 3, progress: bool = True,
                     state_dir: Path | None = None) -> dict:
    tb = tbm.load(path)
    out: dict = {"scenario": tb.name, "file": str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)}
    with tempfile.TemporaryDirectory(prefix="edgeshard-emu-") as tmp:
        sd = Path(state_dir or Path(tmp) / "state")
        t0 = time.monotonic()
        state = testbeds.up(tb, local=False, state_dir=sd)
        try:
            out["up_s"] = time.monotonic() - t0
            t0 = time.monotonic()
            pr = profiler.profile(tb, MODEL, state, context_tokens=CONTEXT_TOKENS, prefill_tokens=PREFILL_TOKENS,
                                  repeats=repeats, cache_dir=Path(tmp) / "profiles", progress=progress,
                                  use_cache=False)
            out["profile_s"] = time.monotonic() - t0
            out["links"] = link_accuracy(tb, pr)
            out["compute"] = compute_accuracy(tb, pr)
            lat = planner.solve(tb, pr, "latency", workload())
            thr = planner.solve(tb, pr, "throughput", workload())
            reset_memory_peaks(state)
            t0 = time.monotonic()
            seq = measure_sequential(tb, lat, state, runs)
            m = statistics.median(seq)
            p = lat.predicted["latency_s"]
            out["sequential"] = {"stages": [[s.device, s.start, s.stop] for s in lat.stages],
                                 "predicted_ms": p * 1e3, "measured_ms": m * 1e3, "error": error(p, m),
                                 "runs_ms": [x * 1e3 for x in seq]}
            pipe = measure_pipeline(tb, thr, state, pipe_runs)
            steady = statistics.median(r["steady_tokens_per_s"] for r in pipe)
            whole = statistics.median(r["tokens_per_s"] for r in pipe)
            n_seq = SEQS_PER_STAGE * len(thr.stages)
            pt = predicted_pipeline(tb, pr, thr, n_seq)
            bn = thr.predicted["throughput_tokens_per_s"]
            out["pipeline"] = {"stages": [[s.device, s.start, s.stop] for s in thr.stages], "sequences": n_seq,
                               "predicted_tokens_per_s": pt, "measured_tokens_per_s": steady,
                               "error": error(pt, steady), "whole_run_tokens_per_s": whole,
                               "bottleneck_tokens_per_s": bn, "bottleneck_error": error(bn, steady),
                               "step_overhead_ms": {n: c.step_overhead_s * 1e3 for n, c in pr.devices.items()},
                               "runs": pipe}
            out["runs_s"] = time.monotonic() - t0
            out["memory"] = memory_peaks(tb, state, [lat, thr])
        finally:
            out["down"] = testbeds.down(tb, sd)
    return out


def _stages(stages) -> str:
    return " ".join(f"{d}[{a},{b})" for d, a, b in stages)


def format_table(rows: list[dict]) -> str:
    lines = ["| scenario | plan (objective) | predicted | measured (median) | error | 1/bottleneck (error) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        s, p = r["sequential"], r["pipeline"]
        lines.append(f"| {r['scenario']} | {_stages(s['stages'])} (latency; sequential, 1 sequence) | "
                     f"{s['predicted_ms']:.1f} ms/token | {s['measured_ms']:.1f} ms/token | {s['error'] * 100:+.1f}% | |")
        lines.append(f"| {r['scenario']} | {_stages(p['stages'])} (throughput; pipeline, {p['sequences']} sequences) | "
                     f"{p['predicted_tokens_per_s']:.1f} tokens/s | {p['measured_tokens_per_s']:.1f} tokens/s "
                     f"(whole run {p['whole_run_tokens_per_s']:.1f}) | {p['error'] * 100:+.1f}% | "
                     f"{p['bottleneck_tokens_per_s']:.1f} ({p['bottleneck_error'] * 100:+.1f}%) |")
    return "\n".join(lines)


def format_profile(r: dict) -> str:
    bw = [abs(x["bandwidth_error"]) for x in r["links"]]
    worst = max(r["links"], key=lambda x: abs(x["bandwidth_error"]))
    lines = [f"{r['scenario']}: up {r['up_s']:.1f} s, profile {r['profile_s']:.0f} s, runs {r['runs_s']:.0f} s",
             f"  bandwidth: {len(bw)} pairs, profiled within {max(bw) * 100:.1f}% of the configured rate (worst "
             f"{worst['src']}->{worst['dst']}: {worst['measured_mbit_s']:.2f} of {worst['configured_mbit_s']:g} "
             f"Mbit/s)"]
    lat = ", ".join(f"{x['src']}->{x['dst']} {x['measured_latency_ms']:.1f}/{x['configured_latency_ms']:g}"
                    for x in r["links"])
    lines.append(f"  latency ms (profiled/configured): {lat}")
    c = r["compute"]
    lines.append("  compute: " + ", ".join(f"{n} share {v['cpu_share']:g}: layers {v['layers_decode_ms']:.1f} ms "
                                           f"(x share {v['x_share_ms']:.1f})" for n, v in c["devices"].items()))
    worst = max(c["pairs"], key=lambda x: abs(x["error"]))
    lines.append(f"  compute ratios: {len(c['pairs'])} pairs within {abs(worst['error']) * 100:.1f}% of the "
                 f"inverse share ratio (worst {worst['a']}/{worst['b']}: {worst['measured']:.3f} vs "
                 f"{worst['expected']:.3f}); per-unit medians within "
                 f"{max(abs(x['per_unit_error']) for x in c['pairs']) * 100:.1f}%")
    mem = ", ".join(f"{n} {v['beyond_weights_bytes'] / 2**20:.0f} MiB" for n, v in r.get("memory", {}).items())
    lines.append(f"  memory beyond the stage's weights at peak (cgroup): {mem}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("scenarios", nargs="*", type=Path, help="testbed TOMLs (default: testbed_configs/emu-*.toml)")
    ap.add_argument("--runs", type=int, default=3, help="sequential runs per scenario (median)")
    ap.add_argument("--pipe-runs", type=int, default=2, help="pipeline runs per scenario (median)")
    ap.add_argument("--repeats", type=int, default=3, help="profiler repeats")
    ap.add_argument("--json", action="store_true", help="print the raw results as JSON")
    args = ap.parse_args()
    ok, why = testbeds.mode_available()
    if not ok:
        print(f"cannot emulate here: {why}", file=sys.stderr)
        return 2
    rows = []
    for path in args.scenarios or scenarios():
        r = measure_scenario(path.resolve(), args.runs, args.pipe_runs, args.repeats, progress=not args.json)
        rows.append(r)
        if not args.json:
            print(format_profile(r), flush=True)
    if args.json:
        print(json.dumps(rows, indent=1, default=str))
        return 0
    print(f"\n{MODEL}, fp32, {NEW_TOKENS} new tokens per sequence, prompts of ~{WORKLOAD_PROMPT_TOKENS} tokens; "
          f"error = (predicted - measured) / measured\n")
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
