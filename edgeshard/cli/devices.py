"""The `edgeshard` subcommands that touch devices: serve, testbed, run, report, reproduce.

Kept apart from cli.py so that planning commands never import torch or rpyc.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from edgeshard.cli.main import one_line, print_error
from edgeshard.config.catalog import DTYPE_ALIASES, DTYPE_BYTES
from edgeshard.config.errors import ConfigError


def _print_state(state: dict) -> None:
    print(f"testbed {state.get('name') or Path(str(state.get('testbed') or '')).stem} ({state.get('mode')}):")
    for name, d in state["devices"].items():
        health = {True: "healthy", False: "DOWN", None: "?"}[d.get("healthy")]
        extra = f" cpu_share={d['cpu_share']}" if d.get("cpu_share") else ""
        print(f"  {name:<14} {d['address']}:{d['port']:<6} pid {d.get('pid')!s:<8} {health}{extra}"
              + (f"  ({d['error']})" if d.get("error") else ""))
    by = {}
    for lk in state.get("links", []):
        by.setdefault((lk.get("bandwidth_by"), lk.get("latency_by")), 0)
        by[(lk.get("bandwidth_by"), lk.get("latency_by"))] += 1
    for (bw, lat), n in sorted(by.items(), key=str):
        print(f"  {n} links: bandwidth shaped by {bw}, latency by {lat}")


def cmd_testbed(args) -> int:
    from edgeshard import testbeds
    if args.action == "up":
        if not args.local:
            ok, why = testbeds.mode_available()
            if not ok:
                print_error(f"cannot emulate this testbed in the kernel: {one_line(why)} (use `edgeshard testbed up "
                            f"{args.testbed} --local`: devices as local processes; the data plane applies each "
                            f"link's bandwidth and latency in the application)")
                return 2
        state = testbeds.up(args.testbed, local=args.local, state_dir=args.state_dir)
        _print_state(state)
        return 0
    if args.action == "down":
        removed = testbeds.down(args.testbed, args.state_dir)
        print(f"down: removed {len(removed)} item(s)" + (f": {', '.join(map(str, removed))}" if removed else ""))
        return 0
    if args.action == "status":
        state = testbeds.status(args.testbed, args.state_dir)
        if state is None:
            print_error(f"testbed {args.testbed} is not up (start it with `edgeshard testbed up TESTBED.toml "
                        f"--local`)")
            return 1
        if args.json:
            print(json.dumps(state, indent=1, sort_keys=True))
        else:
            _print_state(state)
        return 0 if all(d.get("healthy") for d in state["devices"].values()) else 1
    if args.action == "exec":
        cmd = list(args.cmd)
        if not cmd:
            raise ConfigError("command line", "no command to run", "write `testbed exec TESTBED DEVICE -- CMD ...`")
        from edgeshard import testbeds as tbs
        from edgeshard.testbeds import local as launch
        name = tbs._name(args.testbed)
        sdir = Path(args.state_dir or launch.default_state_dir())
        state = launch.load_state(name, sdir)
        if state is None:
            raise ConfigError(name, "testbed is not up", "run `edgeshard testbed up` first")
        if args.device not in state["devices"]:
            raise ConfigError(name, f"no device {args.device!r}", f"devices: {', '.join(state['devices'])}")
        if state.get("mode") == "local":
            print(f"(local testbed: {args.device} shares this machine's network and cgroups)", file=sys.stderr)
            return subprocess.call(cmd)
        from edgeshard.testbeds import emulated as emulate
        return subprocess.call(emulate.exec_argv(name, args.device, sdir, cmd))
    return 2


def cmd_run(args) -> int:
    from edgeshard import testbeds
    from edgeshard.config import plan as planm
    from edgeshard.config import testbed as tbm
    from edgeshard.run import runtime
    tb = tbm.load(args.testbed)
    plan = planm.load(args.plan)
    state = testbeds.find_state(tb, args.state_dir)
    if state is None:
        raise ConfigError(args.testbed, f"testbed {tb.name!r} is not up", f"run `edgeshard testbed up {args.testbed} --local`")
    res = runtime.run(tb, plan, args.model, args.prompt, args.max_new_tokens, mode=args.mode, state=state,
                      dtype=args.dtype, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                      chat=args.chat, run_dir=args.run_dir, command=["edgeshard"] + sys.argv[1:])
    if args.json:
        print(json.dumps({"results": [{k: r[k] for k in ("prompt", "token_ids", "text", "token_latency_s")}
                                      for r in res["results"]], "run_dir": str(res["run_dir"])}, indent=1))
        return 0
    for r in res["results"]:
        lat = r["token_latency_s"]
        print(f"prompt: {r['prompt']!r}\n  -> {r['text']!r}\n  {len(r['token_ids'])} tokens"
              + (f", {sum(lat) / len(lat) * 1000:.1f} ms/token mean" if lat else ""))
    s = res.get("summary") or {}
    tl = s.get("token_latency_s") or {}
    if tl.get("p50") is not None:
        print(f"per-token latency p50 {tl['p50'] * 1000:.2f} ms, p95 {tl['p95'] * 1000:.2f} ms; "
              f"{s.get('tokens_per_s', 0):.2f} tokens/s")
    print(f"run folder: {res['run_dir']}")
    return 0


def cmd_report(args) -> int:
    from edgeshard.ui import report
    out = report.render(args.run_dir, args.output)
    print(out)
    return 0


def cmd_reproduce(args) -> int:
    from edgeshard.run import reproduce
    return reproduce.main(args.run_dir, local=args.local, state_dir=args.state_dir)


def register(sub) -> None:
    sub.add_parser("serve", help="serve this device's shard (rpyc control + binary data plane); "
                                 "`edgeshard serve --help` lists its options")

    p = sub.add_parser("testbed", help="bring a testbed up (emulated as root, or --local), down, status, exec")
    p.add_argument("action", choices=["up", "down", "status", "exec"])
    p.add_argument("testbed", help="testbed TOML (or, for down/status/exec, its name)")
    p.add_argument("device", nargs="?", help="exec: the device to run as")
    p.add_argument("--local", action="store_true", help="devices as local processes on loopback (no root needed)")
    p.add_argument("--state-dir", help="where testbed state lives (default $EDGESHARD_HOME/testbeds)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_testbed)

    p = sub.add_parser("run", help="generate with a plan on a testbed that is up")
    p.add_argument("testbed")
    p.add_argument("plan")
    p.add_argument("--model", required=True)
    p.add_argument("--prompt", action="append", required=True, help="repeat for several sequences")
    p.add_argument("--max-new-tokens", type=int, default=32)
    from edgeshard.run.parameters import MODES
    p.add_argument("--mode", choices=MODES, default="sequential")
    p.add_argument("--dtype", choices=[*DTYPE_BYTES, *DTYPE_ALIASES], default="float32")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chat", action="store_true", help="apply the model's chat template")
    p.add_argument("--run-dir")
    p.add_argument("--state-dir")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("report", help="render a self-contained HTML report from a run folder")
    p.add_argument("run_dir")
    p.add_argument("-o", "--output")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("reproduce", help="re-run the experiment of a run folder and compare with the record")
    p.add_argument("run_dir")
    p.add_argument("--local", action="store_true", help="bring its testbed up locally if it is not up")
    p.add_argument("--state-dir")
    p.set_defaults(func=cmd_reproduce)
