"""`edgeshard reproduce RUN_DIR`: re-run an experiment from its run folder alone and compare with the record.

Reads testbed.toml, plan.json and parameters.json (run/parameters.RunConfig) of the folder, brings the testbed up
locally if asked and not up, runs every recorded setting again (model, prompts, mode, max_in_flight, dtype, seed,
sampling, chat, debug_logits) into <run_dir>-reproduced, and prints measured vs recorded: token ids (must match
for greedy decoding), per-token latency p50/p95 and tokens/s.
"""

from __future__ import annotations

import json
from pathlib import Path

from edgeshard.config import plan as planm
from edgeshard.config import testbed as tbm
from edgeshard.config.errors import ConfigError
from edgeshard.run.parameters import RunConfig


def _read(run_dir: Path, name: str):
    p = run_dir / name
    if not p.exists():
        raise ConfigError(str(p), "missing from the run folder", "reproduce needs testbed.toml, plan.json, parameters.json, summary.json")
    return p


def compare_runs(recorded: dict, measured: dict) -> tuple[list[str], bool]:
    """Lines of a recorded-vs-measured table, and whether the generated token ids are identical."""
    lines = [f"{'':<28} {'recorded':>12} {'measured':>12} {'ratio':>7}"]

    def row(label, a, b, scale=1.0, unit=""):
        if a is None or b is None:
            lines.append(f"{label:<28} {'-':>12} {'-':>12}")
            return
        r = f"{b / a:.2f}" if a else "-"
        lines.append(f"{label:<28} {a * scale:>11.3f}{unit} {b * scale:>11.3f}{unit} {r:>7}")

    for key, label in (("p50", "token latency p50 (ms)"), ("p95", "token latency p95 (ms)")):
        row(label, (recorded.get("token_latency_s") or {}).get(key), (measured.get("token_latency_s") or {}).get(key), 1000)
    row("tokens/s", recorded.get("tokens_per_s"), measured.get("tokens_per_s"))
    same = True
    for i, (a, b) in enumerate(zip(recorded.get("results", []), measured.get("results", []))):
        eq = a.get("token_ids") == b.get("token_ids")
        same &= eq
        lines.append(f"sequence {i}: token ids {'identical' if eq else 'DIFFER'} ({len(b.get('token_ids', []))} tokens)")
    return lines, same


def main(run_dir, local: bool = False, state_dir=None) -> int:
    from edgeshard import testbeds
    from edgeshard.run import runtime
    run_dir = Path(run_dir)
    tb = tbm.load(_read(run_dir, "testbed.toml"))
    plan = planm.load(_read(run_dir, "plan.json"))
    config = RunConfig.load(_read(run_dir, "parameters.json")).for_reproduction()
    recorded = json.loads(_read(run_dir, "summary.json").read_text())
    state = testbeds.find_state(tb, state_dir)
    started = False
    if state is None:
        if not local:
            raise ConfigError(str(run_dir), f"testbed {tb.name!r} is not up",
                              "bring it up (`edgeshard testbed up`), or pass --local to start it for this run")
        state = testbeds.up(tb, local=True, state_dir=state_dir)
        started = True
    try:
        res = runtime.Run.from_config(tb, plan, config, state=state,
                                      run_dir=run_dir.parent / (run_dir.name + "-reproduced")).run_sync()
    finally:
        if started:
            testbeds.down(tb.name, state_dir)
    measured = dict(res["summary"])
    measured["results"] = res["results"]
    lines, same = compare_runs(recorded, measured)
    print(f"reproducing {run_dir} ({config.model}, {config.mode}, seed {config.seed})")
    print("\n".join(lines))
    print(f"new run folder: {res['run_dir']}")
    return 0 if same else 1  # greedy and seeded sampling are both deterministic
