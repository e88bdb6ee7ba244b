"""The `edgeshard` command. Each subcommand imports what it needs, so `edgeshard plan` never loads torch or rpyc.

Errors: every failure the user can fix (a missing or malformed file, an unknown key or value, a testbed that is
not up or already up, a port in use, a device that died) ends the command with exit status 1 or 2 and one line
on stderr, `edgeshard: error: WHAT (WHAT TO DO)`, naming the file, key, value or device. Anything else is a bug:
it is reported on one line as an internal error. EDGESHARD_DEBUG=1 re-raises every error with its traceback.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import subprocess
import sys
from pathlib import Path

from edgeshard.config import paths
from edgeshard.config.errors import ConfigError, EdgeshardError
from edgeshard.config.units import size_text

DEBUG_ENV = "EDGESHARD_DEBUG"  # set to 1: errors keep their traceback (for bug reports)


def one_line(text) -> str:
    """A message on one line: its non-empty lines joined by " | " (a device log's tail stays readable)."""
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    return " | ".join(lines) or "(no message)"


def print_error(message, prog: str = "edgeshard") -> None:
    print(f"{prog}: error: {one_line(message)}", file=sys.stderr, flush=True)


def describe(e: BaseException) -> tuple[str, int]:
    """(one-line message, exit status) of an error that ended a command."""
    if isinstance(e, EdgeshardError):
        return str(e), e.exit_code
    if isinstance(e, OSError) and not isinstance(e, (ConnectionError, TimeoutError)) and e.strerror:
        what = e.filename if e.filename is not None else "system call"
        fix = {errno.ENOENT: "check the path", errno.EACCES: "check its permissions",
               errno.EADDRINUSE: "stop the process using it or choose another port",
               errno.ENOSPC: "free some disk space"}.get(e.errno, "")
        return f"{what}: {e.strerror}" + (f" ({fix})" if fix else ""), 1
    if isinstance(e, (OSError, RuntimeError, ValueError, subprocess.SubprocessError)):
        return str(e) or type(e).__name__, 1  # the modules below raise these with messages meant for the user
    return (f"internal error: {type(e).__name__}: {e} (a bug in edgeshard: rerun with {DEBUG_ENV}=1 for the "
            f"traceback and report it)", 1)


class OneLineParser(argparse.ArgumentParser):
    """Usage errors on one line, like every other error: `edgeshard plan: error: ... (see --help)`."""

    def error(self, message):
        print(f"{self.prog}: error: {one_line(message)} (see `{self.prog} --help`)", file=sys.stderr)
        raise SystemExit(2)


def _workload(args, testbed=None, plan=None):
    """The workload from the command line; --from: the plan file's workload where a flag is not given."""
    from edgeshard.planning.costs import Workload
    given = (plan.workload if plan is not None else None) or {}
    pick = lambda key, default: getattr(args, key) if getattr(args, key) is not None else given.get(key, default)
    try:  # sequences in flight: as many as the testbed reserves KV cache for, unless given
        n = pick("sequences", testbed.constraints.sequences if testbed else 1)
        return Workload(pick("prompt_tokens", 128), pick("new_tokens", 128), n)
    except ValueError as e:
        where = "command line" if not given else f"{getattr(args, 'from_plan', 'plan')}: workload (or the command line)"
        raise ConfigError(where, str(e)) from None


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
        mem = f"{size_text(s['memory_bytes'])}/{size_text(s['memory_limit_bytes'])}"
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
    from edgeshard.config import profile as prof
    from edgeshard.config import testbed as tbm
    from edgeshard.planning import baselines
    tb = tbm.load(args.testbed)
    pr = prof.load(args.profile)
    if args.from_plan:
        plan = _check_given_plan(args, tb, pr)
    else:
        strategy, objective = args.strategy or "edgeshard", args.objective or "latency"
        if strategy not in baselines.STRATEGIES:
            raise ConfigError("command line: --strategy", f"{strategy!r} is not a strategy",
                              f"use one of {', '.join(baselines.STRATEGIES)}; for your own stages write a plan file "
                              f"and give it with --from PLAN.json")
        if strategy == "edgeshard":
            from edgeshard.config.errors import InfeasibleError
            from edgeshard.planning import dp as planner
            try:
                plan = planner.solve(tb, pr, objective, _workload(args, tb), explain=True)
            except InfeasibleError as e:
                raise InfeasibleError(f"infeasible: {e}") from None
            if not plan.feasible:
                raise InfeasibleError(plan.notes[0])
        else:
            plan = baselines.plan_with(strategy, tb, pr, objective, _workload(args, tb))
    if args.output:
        plan.save(args.output)
    print(plan.dumps() if args.json else summary(plan, tb), end="\n" if not args.json else "")
    return 0 if plan.feasible else 3


def _check_given_plan(args, tb, pr):
    """`plan --from PLAN.json`: judge a given (hand-written) plan's stages with the one cost evaluator
    (costs.CostModel, as every strategy is judged) and fill in its predictions; refuse it, naming every rule it
    breaks (memory, source first, coverage, devices, constraints)."""
    from edgeshard.config import plan as planm
    from edgeshard.config.errors import PlanRefused
    from edgeshard.planning import dp as planner
    from edgeshard.planning.costs import CostModel
    where = args.from_plan
    given = planm.load(where)
    if args.strategy is not None:
        raise ConfigError("command line: --strategy", "does not apply with --from (the stages come from the file)",
                          "drop --strategy, or drop --from to plan with a strategy")
    if given.model and given.model != pr.model:
        raise PlanRefused(f"{where}: refused: the plan is for model {given.model!r}, profile {args.profile} for "
                          f"{pr.model!r} (give a profile of {given.model!r}, or remove \"model\" from the plan)")
    cm = CostModel(tb, pr)
    bad = cm.violations(given.stages)
    if bad:
        raise PlanRefused(f"{where}: refused on testbed {tb.name!r} with model {pr.model!r}: " + "; ".join(bad)
                          + " (change the stages; `edgeshard plan TESTBED PROFILE` gives a plan that fits)")
    notes = ()
    if given.testbed and given.testbed != tb.name:
        notes = (f"checked on testbed {tb.name!r}; the file named testbed {given.testbed!r}",)
    return planner.make_plan(cm, given.stages, args.objective or given.objective, given.strategy,
                             _workload(args, tb, given), notes)


def cmd_plan_diff(args) -> int:
    from edgeshard.config import plan as planm
    from edgeshard.config.errors import PlanError
    a, b = planm.load(args.a), planm.load(args.b)
    try:
        planm.diff(a, b)
    except PlanError as e:
        raise PlanError(f"{args.a}, {args.b}: {e}") from None
    if args.json:
        print(json.dumps(planm.diff(a, b), indent=1, sort_keys=True))
    else:
        print(planm.format_diff(a, b, args.a, args.b))
    return 0


def cmd_compare(args) -> int:
    from edgeshard.config import testbed as tbm
    from edgeshard.planning import compare
    tb = tbm.load(args.testbed)
    if tb.cloud is None:
        raise ConfigError(args.testbed, f"testbed {tb.name!r} names no cloud device, and compare sweeps the "
                          "bandwidth to the cloud", 'add cloud = "<device>" to the testbed, or give one that has it')
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
    from edgeshard.config import testbed as tbm
    tb = tbm.load(args.testbed)
    if args.synthetic:
        from edgeshard.planning.synthetic import synthetic_profile
        pr = synthetic_profile(tb, args.model, args.dtype)
    else:
        from edgeshard import testbeds
        from edgeshard.run import profiler
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


def _port_free(host: str, port: int, flag: str) -> None:
    """Refuse a port another process listens on before the device server starts (one line, naming it)."""
    import socket
    try:
        family, _, _, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise ConfigError(f"--host {host}", f"cannot resolve: {e.strerror}", "give an address of this machine") from None
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does: TIME_WAIT is no conflict
        try:
            s.bind(addr)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise ConfigError(f"{flag} {port}", f"{host}:{port} is already in use by another process",
                                  f"stop that process or choose another port; {flag} 0 picks a free one") from None
            raise ConfigError(f"{flag} {port}", f"cannot listen on {host}:{port}: {e.strerror}",
                              "choose another --host or port") from None


def cmd_serve(argv: list[str]) -> int:
    from edgeshard.device import service
    ap = service.build_parser()
    ap.error = OneLineParser.error.__get__(ap)  # its usage errors on one line too
    args = ap.parse_args(argv)
    for flag, port in (("--port", args.port), ("--data-port", args.data_port)):
        if port:
            _port_free(args.host, port, flag)
    return service.main(argv) or 0


def main(argv: list[str] | None = None) -> int:
    """Run one command; an error ends it with one line on stderr (module docstring), unless EDGESHARD_DEBUG=1."""
    try:
        return _main(argv)
    except KeyboardInterrupt:
        print("edgeshard: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `edgeshard ... | head`: the reader left; nothing to report
        try:  # and Python's flush of stdout at exit must not complain either
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 1
    except Exception as e:
        if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        message, code = describe(e)
        print_error(message)
        return code


def _main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:  # the device server has its own parser (edgeshard.device.service)
        return cmd_serve(argv[1:])
    if argv[:1] == ["prepare"]:  # convert real weights once, outside any device (edgeshard.device.weights)
        from edgeshard.device import weights
        return weights.main(argv[1:])
    tail: list[str] = []
    if "--" in argv:  # `testbed exec TESTBED DEVICE -- CMD ...`: everything after -- is the command
        i = argv.index("--")
        argv, tail = argv[:i], argv[i + 1:]
    # choices come from the constants the code checks against, so --help and the checks never disagree
    from edgeshard.config.catalog import DTYPE_ALIASES, DTYPE_BYTES, MODELS
    from edgeshard.planning.baselines import STRATEGIES
    from edgeshard.planning.compare import LINKS, PAPER_MODELS
    from edgeshard.planning.costs import OBJECTIVES
    dtypes = [*DTYPE_BYTES, *DTYPE_ALIASES]
    ap = OneLineParser(prog="edgeshard", description="Plan and run LLM shards across edge devices (EdgeShard).",
                       epilog=f"Errors are one line on stderr; {DEBUG_ENV}=1 shows their traceback.")
    sub = ap.add_subparsers(dest="command", required=True)

    def workload_flags(p):
        p.add_argument("--prompt-tokens", type=int, default=None,
                       help="prompt length P for the e2e cost (default 128; --from: the plan's workload)")
        p.add_argument("--new-tokens", type=int, default=None,
                       help="generated tokens G for the e2e cost (default 128; --from: the plan's workload)")
        p.add_argument("--sequences", type=int, default=None,
                       help="sequences in flight for the pipeline prediction (default: the testbed's "
                            "[constraints] sequences)")

    p = sub.add_parser("plan", help="the optimal plan (or a baseline's) for a testbed and profile; --from checks "
                                    "a hand-written plan and fills in its predictions")
    p.add_argument("testbed")
    p.add_argument("profile")
    p.add_argument("--objective", choices=OBJECTIVES, default=None,
                   help="default latency (--from: the plan's objective)")
    p.add_argument("--strategy", choices=STRATEGIES, default=None,
                   help="edgeshard (exact DP, the default) or a baseline; for your own stages write a plan file and "
                        "give it with --from")
    p.add_argument("--from", dest="from_plan", metavar="PLAN.json",
                   help="check this plan (e.g. hand-written: only \"stages\") against the testbed and profile and "
                        "fill in its predictions; a plan that breaks a rule is refused with the reason (exit 2)")
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
    p.add_argument("testbed", nargs="?", default=str(paths.CONFIGS / "paper-edge.toml"))
    p.add_argument("--models", nargs="+", choices=tuple(MODELS), default=list(PAPER_MODELS))
    p.add_argument("--bandwidths", nargs="+", type=float, default=[1, 10, 50, 100, 500, 1000])
    p.add_argument("--dtype", choices=dtypes, default="float32")
    p.add_argument("--links", choices=LINKS, default="source",
                   help="sweep only the source<->cloud link (default) or every edge<->cloud link")
    workload_flags(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("profile", help="measure per-unit and per-link costs (or --synthetic from device kinds)")
    p.add_argument("testbed")
    p.add_argument("--model", required=True)
    p.add_argument("--dtype", choices=dtypes, default="float32")
    p.add_argument("--synthetic", action="store_true", help="from the devices' kinds, without hardware")
    p.add_argument("--context-tokens", type=int, default=128)
    p.add_argument("--prefill-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("-o", "--output")
    p.set_defaults(func=cmd_profile)

    try:
        from edgeshard.cli import devices
        devices.register(sub)
    except ImportError as e:  # the runtime commands need torch/rpyc; planning works without them
        if "edgeshard.cli.devices" not in str(e):
            print(f"edgeshard: runtime commands unavailable ({e})", file=sys.stderr)

    args = ap.parse_args(argv)
    args.cmd = tail
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
