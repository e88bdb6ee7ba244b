"""Predicted vs measured on the embedded default testbed: three device processes on this machine
(testbed_configs/local.toml, which declares that they share its cores), SmolLM2-135M with real weights.

Each round (default 3; rounds interleave, so a slow spell of the machine hits both modes alike):
1. wait until other processes leave the cores alone (at most --wait-s), and measure what they take while the
   round profiles and runs (a profile or run they disturbed is left out of the "quiet" rows);
2. profile SmolLM2 on the devices as `edgeshard profile` does (edgeshard.run.profiler, no cache);
3. plan for latency (one sequence) and for throughput (the testbed's [constraints] sequences in flight);
4. run the latency plan sequentially (one sequence: median per-token latency) and the throughput plan in
   pipeline mode with that many sequences (steady tokens/s: bench/emulated_predictions.py's window; and each
   sequence's median per-token latency), in alternating order, after a warm-up run each; then the throughput
   plan again with --more-sequences (default 6) in flight, where the shared-cores charge binds;
5. record the background load (CPU of processes other than the devices and this one, in cores) during each run,
   and each device's compute steps against their prediction.
Then it prints, per quantity, the prediction, the median measured over the rounds and their ratio, against the
target of the issue: within 25 % in both modes. The pipeline rows also show what the cost model predicted before
it charged shared cores, and the one-sequence latency that the live plot used to draw in pipeline mode.

    .venv/bin/python bench/local_predictions.py [--rounds 3] [--json]          # ~1 min per round on 2 cores

docs/emulation.md ("Shared cores") has a run of it.
"""

from __future__ import annotations

import argparse
import dataclasses
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
sys.path.insert(0, str(ROOT / "bench"))

import emulated_predictions as ep  # noqa: E402

from edgeshard import testbeds
from edgeshard.config import testbed as tbm
from edgeshard.planning import costs  # noqa: E402
from edgeshard.planning import dp as planner
from edgeshard.run import profiler, runtime
from edgeshard.ui import plots

MODEL = ep.MODEL
TESTBED = ROOT / "testbed_configs" / "local.toml"
TARGET = 0.25  # the issue's: predicted vs measured within 25 % in both modes
TICK = os.sysconf("SC_CLK_TCK")


# ----------------------------------------------------------------------------------------------- CPU accounting

def _machine_busy() -> tuple[float, float]:
    """(busy jiffies of the whole machine, all jiffies) from /proc/stat (guest time is inside user already)."""
    v = [int(x) for x in open("/proc/stat").readline().split()[1:9]]
    return sum(v) - v[3] - v[4], sum(v)


def _process_cpu(pid: int) -> float:
    """CPU seconds of a process (all its threads)."""
    try:
        f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) / TICK
    except OSError:
        return 0.0


class Load:
    """CPU used during a span: by our processes (the devices and this controller) and by everything else, in
    cores (others = machine busy - ours, over the wall time)."""

    def __init__(self, pids: list[int]):
        self.pids = pids

    def __enter__(self):
        self.t0, self.busy0 = time.monotonic(), _machine_busy()[0]
        self.ours0 = sum(_process_cpu(p) for p in self.pids)
        return self

    def __exit__(self, *exc):
        wall = time.monotonic() - self.t0
        busy = (_machine_busy()[0] - self.busy0) / TICK
        ours = sum(_process_cpu(p) for p in self.pids) - self.ours0
        self.wall_s, self.ours_cores = wall, ours / wall if wall > 0 else 0.0
        self.others_cores = max(0.0, busy - ours) / wall if wall > 0 else 0.0
        self.ours_cpu_s = ours
        return False


def wait_quiet(pids: list[int], limit_cores: float, wait_s: float) -> float:
    """Wait (at most wait_s) for 2 s in which other processes use under limit_cores; returns the last reading."""
    deadline = time.monotonic() + wait_s
    while True:
        with Load(pids) as ld:
            time.sleep(2.0)
        if ld.others_cores < limit_cores or time.monotonic() > deadline:
            return ld.others_cores


# ----------------------------------------------------------------------------------------------- one round

def step_ratios(events: list[dict], step_s: dict[str, float]) -> dict[str, float]:
    """device -> median one-token compute step / its predicted time (contention included in pipeline mode)."""
    by: dict[str, list[float]] = {}
    for e in events:
        if e.get("type") == "compute" and e.get("tokens") == 1 and e.get("step", 0) > 0:
            by.setdefault(e["device"], []).append(e["end_s"] - e["start_s"])
    return {d: statistics.median(x) / step_s[d] for d, x in by.items() if step_s.get(d)}


def run_sequential(tb, plan, state, pids, new_tokens: int) -> dict:
    runtime.run(tb, plan, MODEL, ep.PROMPTS[:1], 4, state=state, write_run_dir=False)  # warm-up
    events: list[dict] = []
    with Load(pids) as ld:
        res = runtime.run(tb, plan, MODEL, ep.PROMPTS[:1], new_tokens, state=state, write_run_dir=False,
                          on_event=events.append)
    lat = statistics.median(g for r in res["results"] for g in r["token_latency_s"][1:])
    ntok = sum(len(r["token_ids"]) for r in res["results"])
    ref = plots.run_prediction(plan, "sequential")
    return {"measured_latency_s": lat, "others_cores": ld.others_cores, "cpu_per_token_s": ld.ours_cpu_s / ntok,
            "step_ratio": step_ratios(events, ref["step_s"])}


def run_pipeline(tb, pr, plan, state, pids, sequences: int, new_tokens: int) -> dict:
    prompts = [ep.PROMPTS[i % len(ep.PROMPTS)] for i in range(sequences)]
    runtime.run(tb, plan, MODEL, ep.PROMPTS[:1], 4, state=state, write_run_dir=False)  # warm-up
    events: list[dict] = []
    with Load(pids) as ld:
        res = runtime.run(tb, plan, MODEL, prompts, new_tokens, mode="pipeline", state=state, write_run_dir=False,
                          on_event=events.append)
    ntok = sum(len(r["token_ids"]) for r in res["results"])
    ref = plots.run_prediction(plan, "pipeline", sequences, tb, pr)
    return {"measured_tokens_per_s": ep.steady_tokens_per_s(events),
            "whole_run_tokens_per_s": res["summary"]["tokens_per_s"],
            "measured_latency_s": res["summary"]["token_latency_s"]["p50"],
            "others_cores": ld.others_cores, "cpu_per_token_s": ld.ours_cpu_s / ntok,
            "busy": {d: v["share"] for d, v in res["summary"]["devices"].items()},
            "step_ratio": step_ratios(events, ref["step_s"])}


def one_round(tb, state, pids, sequences: int, new_tokens: int, repeats: int, cache: Path, pipeline_first: bool,
              quiet_cores: float, wait_s: float, more: tuple[int, ...] = ()) -> dict:
    out = {"others_before_cores": wait_quiet(pids, quiet_cores, wait_s)}
    with Load(pids) as ld:
        pr = profiler.profile(tb, MODEL, state, context_tokens=ep.CONTEXT_TOKENS, prefill_tokens=ep.PREFILL_TOKENS,
                              repeats=repeats, cache_dir=cache, progress=False, use_cache=False)
    out["profile_s"], out["profile_others_cores"] = ld.wall_s, ld.others_cores
    lat = planner.solve(tb, pr, "latency", ep.workload(1))
    thr = planner.solve(tb, pr, "throughput", ep.workload(sequences))
    ref = plots.run_prediction(thr, "pipeline", sequences, tb, pr)
    free = costs.CostModel(tb.replace(shared_cores=()), pr).evaluate(thr.stages, ep.workload(sequences))
    out["sequential"] = {"stages": [[s.device, s.start, s.stop] for s in lat.stages],
                         "predicted_latency_s": lat.predicted["latency_s"]}
    out["pipeline"] = {"stages": [[s.device, s.start, s.stop] for s in thr.stages], "sequences": sequences,
                       "predicted_tokens_per_s": ref["tokens_per_s"], "predicted_latency_s": ref["latency_s"],
                       "uncharged_tokens_per_s": free["pipeline_tokens_per_s"],
                       "one_sequence_latency_s": thr.predicted["latency_s"],
                       "contention": thr.predicted.get("shared_cores"),
                       "stage_ms": [s["pipelined_s"] * 1e3 for s in thr.predicted["stages"]],
                       "why": ref["why"]}
    for n in more:  # the same plan with more sequences in flight: where the shared-cores charge binds
        ref_n = plots.run_prediction(thr, "pipeline", n, tb, pr)
        free_n = costs.CostModel(tb.replace(shared_cores=()), pr).evaluate(thr.stages, ep.workload(n))
        out[f"pipeline{n}"] = {"sequences": n, "predicted_tokens_per_s": ref_n["tokens_per_s"],
                               "predicted_latency_s": ref_n["latency_s"],
                               "uncharged_tokens_per_s": free_n["pipeline_tokens_per_s"]}
    order = ["pipeline", "sequential"] if pipeline_first else ["sequential", "pipeline"]
    for mode in order:
        if mode == "sequential":
            out["sequential"].update(run_sequential(tb, lat, state, pids, new_tokens))
        else:
            out["pipeline"].update(run_pipeline(tb, pr, thr, state, pids, sequences, new_tokens))
            for n in more:
                out[f"pipeline{n}"].update(run_pipeline(tb, pr, thr, state, pids, n, new_tokens))
    return out


# ----------------------------------------------------------------------------------------------- all rounds

def measure(rounds: int = 3, new_tokens: int = ep.NEW_TOKENS, repeats: int = 3, quiet_cores: float = 0.25,
            wait_s: float = 60.0, progress: bool = True, more: tuple[int, ...] = (6,)) -> dict:
    tb = tbm.load(TESTBED)
    # on loopback with free ports (as notebook 04 does), so it never collides with a testbed already up
    tb = tb.replace(devices=tuple(dataclasses.replace(d, host="127.0.0.1", port=0) for d in tb.devices), path=None)
    sequences = tb.constraints.sequences
    out: dict = {"testbed": tb.name, "cores": [g.cores for g in tb.shared_cores], "sequences": sequences,
                 "more_sequences": list(more), "new_tokens": new_tokens, "rounds": []}
    with tempfile.TemporaryDirectory(prefix="edgeshard-localpred-") as tmp:
        sd = Path(tmp) / "state"
        state = testbeds.up(tb, local=True, state_dir=sd)
        try:
            pids = [d["pid"] for d in state["devices"].values()] + [os.getpid()]
            for r in range(rounds):
                rec = one_round(tb, state, pids, sequences, new_tokens, repeats, Path(tmp) / f"profiles{r}",
                                pipeline_first=bool(r % 2), quiet_cores=quiet_cores, wait_s=wait_s, more=more)
                out["rounds"].append(rec)
                if progress:
                    s, p = rec["sequential"], rec["pipeline"]
                    print(f"round {r + 1}/{rounds}: sequential {s['predicted_latency_s'] * 1e3:.1f} predicted / "
                          f"{s['measured_latency_s'] * 1e3:.1f} ms measured; pipeline "
                          f"{p['predicted_tokens_per_s']:.1f} / {p['measured_tokens_per_s']:.1f} tokens/s, per "
                          f"sequence {p['predicted_latency_s'] * 1e3:.0f} / {p['measured_latency_s'] * 1e3:.0f} ms; "
                          f"others used {s['others_cores']:.2f} / {p['others_cores']:.2f} cores", flush=True)
        finally:
            testbeds.down(tb.name, sd)
    return out


def _med(rounds, mode, key):
    vals = [r[mode][key] for r in rounds if r[mode].get(key) is not None]
    return statistics.median(vals) if vals else float("nan")


def summarize(res: dict, quiet: float | None = None) -> list[dict]:
    """Rows: quantity, predicted, measured (medians over rounds), ratio measured / predicted (median of the
    rounds' ratios), within the target. quiet: only runs during which other processes used less than this many
    cores (the prediction assumes the devices have the machine's cores to themselves)."""
    rows = []

    def row(quantity, mode, pkey, mkey, unit, scale, note=""):
        R = [r for r in res["rounds"] if quiet is None or (r[mode]["others_cores"] < quiet
                                                           and r.get("profile_others_cores", 0.0) < quiet)]
        ratios = [r[mode][mkey] / r[mode][pkey] for r in R if r[mode].get(mkey) and r[mode].get(pkey)]
        ratio = statistics.median(ratios) if ratios else float("nan")
        rows.append({"quantity": quantity, "unit": unit, "predicted": _med(R, mode, pkey) * scale,
                     "measured": _med(R, mode, mkey) * scale, "ratio": ratio, "runs": len(ratios),
                     "within": abs(ratio - 1) <= TARGET, "others_cores": _med(R, mode, "others_cores"), "note": note})

    n = res["sequences"]
    row("sequential (latency plan, 1 sequence): per-token latency", "sequential", "predicted_latency_s",
        "measured_latency_s", "ms", 1e3)
    row(f"pipeline (throughput plan, {n} sequences): tokens/s", "pipeline", "predicted_tokens_per_s",
        "measured_tokens_per_s", "tokens/s", 1.0, "closed pipeline, shared cores charged")
    row(f"pipeline: per-token latency per sequence", "pipeline", "predicted_latency_s", "measured_latency_s", "ms",
        1e3, f"{n} / predicted tokens/s")
    for m in res.get("more_sequences", []):
        row(f"pipeline, same plan, {m} sequences: tokens/s", f"pipeline{m}", "predicted_tokens_per_s",
            "measured_tokens_per_s", "tokens/s", 1.0, "closed pipeline, shared cores charged")
    row(f"pipeline tokens/s, before shared cores were charged", "pipeline", "uncharged_tokens_per_s",
        "measured_tokens_per_s", "tokens/s", 1.0, "for comparison")
    for m in res.get("more_sequences", []):
        row(f"pipeline tokens/s with {m} sequences, before shared cores were charged", f"pipeline{m}",
            "uncharged_tokens_per_s", "measured_tokens_per_s", "tokens/s", 1.0, "for comparison")
    row(f"pipeline per-sequence latency against the one-sequence latency", "pipeline", "one_sequence_latency_s",
        "measured_latency_s", "ms", 1e3, "the old reference line")
    return rows


def _median(vals):
    return statistics.median(vals) if vals else float("nan")


def format_table(res: dict, quiet: float = 0.25) -> str:
    lines = ["| quantity | runs | predicted | measured (median) | measured / predicted | within 25 % | "
             "others' load (cores) |", "|---|---|---|---|---|---|---|"]
    k = 3 + len(res.get("more_sequences", []))
    for label, rows in (("all runs", summarize(res)[:k]),
                        (f"quiet: others under {quiet:g} cores in the run and its profile", summarize(res, quiet)[:k])):
        for r in rows:
            if not r["runs"]:
                lines.append(f"| {r['quantity']} ({label}) | 0 | | | | | |")
                continue
            lines.append(f"| {r['quantity']} ({label}) | {r['runs']} | {r['predicted']:.1f} {r['unit']} | "
                         f"{r['measured']:.1f} {r['unit']} | {r['ratio']:.2f} | {'yes' if r['within'] else 'NO'} | "
                         f"{r['others_cores']:.2f} |")
    extra = summarize(res)[k:]
    lines.append("")
    for r in extra:
        lines.append(f"- {r['quantity']}: {r['predicted']:.1f} {r['unit']} (measured / that: {r['ratio']:.2f})")
    R = res["rounds"]
    p = R[-1]["pipeline"]
    lines.append(f"- plans (last round): latency {ep._stages(R[-1]['sequential']['stages'])}; throughput "
                 f"{ep._stages(p['stages'])}, pipelined stages "
                 + ", ".join(f"{x:.1f}" for x in p["stage_ms"]) + " ms, contention "
                 + ", ".join(f"{g['factor']:g} ({g['busy']} busy on {g['cores']:g} cores)"
                             for g in p.get("contention") or []))
    for name, keep in (("all runs", lambda r, m: True),
                       ("quiet runs", lambda r, m: r[m]["others_cores"] < quiet
                        and r.get("profile_others_cores", 0.0) < quiet)):
        ratios = {m: [x for r in R if keep(r, m) for x in r[m].get("step_ratio", {}).values()]
                  for m in ("sequential", "pipeline")}
        lines.append(f"- compute steps measured / predicted, median over devices and {name}: " + ", ".join(
            f"{m} {_median(v):.2f}" for m, v in ratios.items()))
    lines.append("- CPU per token, devices + controller (median): " + ", ".join(
        f"{m} {_med(R, m, 'cpu_per_token_s') * 1e3:.1f} ms" for m in ("sequential", "pipeline"))
        + f"; profiled decode of all units {sum(R[-1]['pipeline']['stage_ms']):.1f} ms")
    lines.append(f"- rounds: {len(R)}; per round: " + "; ".join(
        f"seq {r['sequential']['measured_latency_s'] / r['sequential']['predicted_latency_s']:.2f}, "
        f"pipe {r['pipeline']['measured_tokens_per_s'] / r['pipeline']['predicted_tokens_per_s']:.2f} "
        f"(others {r.get('profile_others_cores', float('nan')):.2f} / {r['sequential']['others_cores']:.2f} / "
        f"{r['pipeline']['others_cores']:.2f} cores while profiling / sequential / pipeline)" for r in R))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (profile + both modes); medians")
    ap.add_argument("--new-tokens", type=int, default=ep.NEW_TOKENS, help="tokens generated per sequence")
    ap.add_argument("--repeats", type=int, default=3, help="profiler repeats")
    ap.add_argument("--quiet-cores", type=float, default=0.25,
                    help="before each round wait until other processes use less than this many cores")
    ap.add_argument("--wait-s", type=float, default=60.0, help="wait at most this long for that")
    ap.add_argument("--more-sequences", type=int, nargs="*", default=[6],
                    help="also run the throughput plan with these many sequences in flight")
    ap.add_argument("--json", action="store_true", help="print the raw results as JSON")
    ap.add_argument("--save", type=Path, help="also write the raw results to this JSON file")
    ap.add_argument("--table", type=Path, help="print the table of results saved earlier with --save; no runs")
    args = ap.parse_args(argv)
    if args.table:
        res = json.loads(args.table.read_text())
    else:
        res = measure(args.rounds, args.new_tokens, args.repeats, args.quiet_cores, args.wait_s,
                      progress=not args.json, more=tuple(args.more_sequences))
        res["quiet_cores"] = args.quiet_cores
    if args.save:
        args.save.write_text(json.dumps(res, indent=1, default=str))
    if args.json:
        print(json.dumps(res, indent=1, default=str))
        return 0
    print(f"\n{MODEL}, fp32, local.toml ({len(res['cores'])} group of shared cores: {res['cores']}), "
          f"{res['new_tokens']} new tokens per sequence, prompts of ~{ep.WORKLOAD_PROMPT_TOKENS} tokens; "
          f"ratio = measured / predicted, target within {TARGET:.0%}\n")
    print(format_table(res, res.get("quiet_cores", args.quiet_cores)))
    whys = {w for r in res["rounds"] for w in r["pipeline"]["why"]}
    for w in sorted(whys):
        print(f"- known against the pipeline prediction: {w}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
