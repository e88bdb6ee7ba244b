"""The `edgeshard` command. Each subcommand imports what it needs, so `edgeshard plan` never loads torch or rpyc."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import ConfigError, EdgeshardError


def _workload(args, testbed=None):
    from .costs import Workload
    try:  # sequences in flight: as many as the testbed reserves KV cache for, unless given
        n = args.sequences if args.sequences is not None else (testbed.constraints.sequences if testbed else 1)
        return Workload(args.prompt_tokens, args.new_tokens, n)
    except ValueError as e:
        raise ConfigError("command line", str(e)) from None


def _fmt_gib(b: float) -> str:
    return f"{b / 2**30:.2f} GiB"


def summary(plan, testbed=None) -> str:
    """Human summary of a plan: stages with time and memory, totals, and why devices were left out."""
    p = plan.predicted
    lines = [f"plan: {plan.strategy} / objective {plan.objective}  (model {plan.model}, testbed {plan.testbed}, "
             f"workload {plan.workload.get('prompt_tokens')} prompt + {plan.workload.get('new_tokens')} new tokens)"]
    if not plan.feasible:
        lines.append("  NOT FEASIBLE: " + "; ".join(plan.notes))
        return "\n".join(lines)
    lines.append(f"  {'#':>2} {'device':<14} {'units':>10} {'decode ms':>10} {'prefill ms':>11} {'memory':>20} {'hop ms':>8}")
    for i, s in enumerate(p["stages"]):
        mem = f"{_fmt_gib(s['memory_bytes'])}/{_fmt_gib(s['memory_limit_bytes'])}"
        hop = f"{s['hop_s'] * 1000:.3f}" if "hop_s" in s else "-"
        units = f"[{s['start']}, {s['stop']})"
        lines.append(f"  {i:>2} {s['device']:<14} {units:>10} {s['decode_s'] * 1000:>10.3f} "
                     f"{s['prefill_s'] * 1000:>11.3f} {mem:>20} {hop:>8}")
    lines.append(f"  return of the token id: {p['return_s'] * 1000:.3f} ms")
    lines.append(f"  latency {p['latency_s'] * 1000:.3f} ms/token | e2e {p['e2e_s']:.3f} s | bottleneck "
                 f"{p['bottleneck_s'] * 1000:.3f} ms -> {p['throughput_tokens_per_s']:.2f} tokens/s")
    if "pipeline_tokens_per_s" in p:
        lines.append(f"  pipeline with {p['sequences']} sequence(s) in flight: {p['pipeline_tokens_per_s']:.2f} tokens/s "
                     "(closed-pipeline model, costs.closed_pipeline_rate)")
    for n in plan.notes:
        lines.append(f"  note: {n}")
    return "\n".join(lines)


def cmd_plan(args) -> int:
    from . import baselines, profile as prof, testbed as tbm
    tb = tbm.load(args.testbed)
    pr = prof.load(args.profile)
    if args.strategy == "edgeshard":
        from . import planner
        from .errors import InfeasibleError
        try:
            plan = planner.solve(tb, pr, args.objective, _workload(args, tb), explain=True)
        except InfeasibleError as e:
            print(f"edgeshard: infeasible: {e}", file=sys.stderr)
            return 2
    else:
        plan = baselines.plan_with(args.strategy, tb, pr, args.objective, _workload(args, tb))
    if args.strategy == "edgeshard" and not plan.feasible:
        print(f"edgeshard: {plan.notes[0]}", file=sys.stderr)
        return 2
    if args.output:
        plan.save(args.output)
    print(plan.dumps() if args.json else summary(plan, tb), end="\n" if not args.json else "")
    return 0 if plan.feasible else 3


def cmd_plan_diff(args) -> int:
    from . import plan as planm
    a, b = planm.load(args.a), planm.load(args.b)
    if args.json:
        print(json.dumps(planm.diff(a, b), indent=1, sort_keys=True))
    else:
        print(planm.format_diff(a, b, args.a, args.b))
    return 0


def cmd_compare(args) -> int:
    from . import compare, testbed as tbm
    tb = tbm.load(args.testbed)
    rows = compare.sweep(tb, args.models, args.bandwidths, args.dtype, _workload(args, tb), links=args.links)
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(f"testbed {tb.name} ({len(tb.devices)} devices), {args.dtype}, synthetic profiles "
              f"(see docs/paper.md for provenance); sweeping "
              f"{tb.source + ' <-> ' + str(tb.cloud) if args.links == 'source' else 'every edge <-> ' + str(tb.cloud)} bandwidth")
        print(compare.format_table(rows))
    return 0


def cmd_profile(args) -> int:
    from . import testbed as tbm
    tb = tbm.load(args.testbed)
    if args.synthetic:
        from .synthetic import synthetic_profile
        pr = synthetic_profile(tb, args.model, args.dtype)
    else:
        from . import profiler, testbeds
        state = testbeds.find_state(tb)
        if state is None:
            raise ConfigError(args.testbed, f"testbed {tb.name!r} is not up",
                              f"run `edgeshard testbed up {args.testbed} --local` first, or use --synthetic")
        pr = profiler.profile(tb, args.model, state, dtype=args.dtype, context_tokens=args.context_tokens,
                              prefill_tokens=args.prefill_tokens, repeats=args.repeats)
    text = pr.dumps()
    if args.output:
        Path(args.output).write_text(text)
        print(f"wrote {args.output}")
    else:
        print(text, end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:  # the device server has its own parser (edgeshard.device.service)
        from .device import service
        return service.main(argv[1:]) or 0
    if argv[:1] == ["prepare"]:  # convert real weights once, outside any device (edgeshard.weights)
        from . import weights
        return weights.main(argv[1:])
    tail: list[str] = []
    if "--" in argv:  # `testbed exec TESTBED DEVICE -- CMD ...`: everything after -- is the command
        i = argv.index("--")
        argv, tail = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(prog="edgeshard", description="Plan and run LLM shards across edge devices (EdgeShard).")
    sub = ap.add_subparsers(dest="command", required=True)

    def workload_flags(p):
        p.add_argument("--prompt-tokens", type=int, default=128, help="prompt length P for the e2e cost (default 128)")
        p.add_argument("--new-tokens", type=int, default=128, help="generated tokens G for the e2e cost (default 128)")
        p.add_argument("--sequences", type=int, default=None,
                       help="sequences in flight for the pipeline prediction (default: the testbed's "
                            "[constraints] sequences)")

    p = sub.add_parser("plan", help="the optimal plan (or a baseline's) for a testbed and profile")
    p.add_argument("testbed")
    p.add_argument("profile")
    p.add_argument("--objective", choices=["latency", "e2e", "throughput"], default="latency")
    p.add_argument("--strategy", default="edgeshard",
                   help="edgeshard (exact DP) or a baseline: edge-solo, cloud-edge-even, cloud-edge-opt, even, "
                        "memory-proportional, greedy-fill")
    workload_flags(p)
    p.add_argument("--json", action="store_true", help="print plan.json instead of the summary")
    p.add_argument("-o", "--output", help="write plan.json here")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("plan-diff", help="what changed between two plan.json files")
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plan_diff)

    p = sub.add_parser("compare", help="paper-style table: every strategy per model and cloud bandwidth")
    p.add_argument("testbed", nargs="?", default=str(Path(__file__).resolve().parent.parent / "testbed_configs" / "paper-edge.toml"))
    p.add_argument("--models", nargs="+", default=["llama2-7b", "llama2-13b", "llama2-70b"])
    p.add_argument("--bandwidths", nargs="+", type=float, default=[1, 10, 50, 100, 500, 1000])
    p.add_argument("--dtype", default="float32")
    p.add_argument("--links", choices=["source", "all"], default="source",
                   help="sweep only the source<->cloud link (default) or every edge<->cloud link")
    workload_flags(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("profile", help="measure per-unit and per-link costs (or --synthetic from device kinds)")
    p.add_argument("testbed")
    p.add_argument("--model", required=True)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--synthetic", action="store_true", help="from the devices' kinds, without hardware")
    p.add_argument("--context-tokens", type=int, default=128)
    p.add_argument("--prefill-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("-o", "--output")
    p.set_defaults(func=cmd_profile)

    try:
        from . import cli_runtime
        cli_runtime.register(sub)
    except ImportError as e:  # the runtime commands need torch/rpyc; planning works without them
        if "cli_runtime" not in str(e):
            print(f"edgeshard: runtime commands unavailable ({e})", file=sys.stderr)

    args = ap.parse_args(argv)
    args.cmd = tail
    try:
        return args.func(args) or 0
    except EdgeshardError as e:
        print(f"edgeshard: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
