"""`make demo`: the main job on the embedded default.

1. Plan the shipped paper-like scenarios (synthetic Jetson/RTX 3090 profiles) and print the comparison table.
2. If the runtime is installed: bring up the local testbed (three device servers on loopback), profile SmolLM2
   on it, plan, run SmolLM2 across 3 devices, print the tokens and per-token latency, write a report, tear down.
"""

from __future__ import annotations

import sys

from edgeshard.config import paths

ROOT = paths.REPO
CONFIGS = ROOT / "testbed_configs"


def plan_scenarios() -> None:
    from edgeshard.config import testbed as tbm
    from edgeshard.planning import compare
    tb = tbm.load(CONFIGS / "paper-edge.toml")
    print(f"== EdgeShard vs baselines on {tb.name}: {len(tb.devices)} devices, fp32, synthetic profiles "
          f"(Jetson/RTX 3090 figures of EdgeShard-remastered, see docs/paper.md)")
    rows = compare.sweep(tb, bandwidths=(1, 10, 100, 1000))
    print(compare.format_table(rows))


def main() -> int:
    plan_scenarios()
    try:
        from edgeshard.cli import demo_live
    except ImportError as e:
        print(f"\n(runtime not available: {e}; planning only)")
        return 0
    return demo_live.main()


if __name__ == "__main__":
    sys.exit(main())
