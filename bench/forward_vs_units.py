"""A stage's forward pass as the runtime calls it, against the sum of its units as the profiler measures them.

For each SmolLM2 stage given: model.unit_timings (the profiler's measurement: CPU time per unit, one device,
back to back) summed over the stage, against StageModel.forward on one-token decode steps with 4 sequences
interleaved (each with its own KV cache, 10-token prompts, 24 steps), as a pipelined device runs them. CPU
time, one torch thread, in-process: no data plane, no throttling. Prints the mean per step and the ratio.
docs/emulation.md cites a run (within ±3 %).

    .venv/bin/python bench/forward_vs_units.py [--stages 7:15 23:32 0:7]     # ~1 min
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from edgeshard.device import model as M  # noqa: E402

PROMPT_TOKENS, STEPS, SEQUENCES = 10, 24, 4
CONTEXT = PROMPT_TOKENS + STEPS // 2  # the profiler's context: the runs' average (bench/emulated_predictions.py)


def measure(start: int, stop: int, rounds: int = 3) -> tuple[float, float]:
    """(profiled units CPU s, mean forward CPU s per decode step) for stage [start, stop)."""
    st = M.StageModel("smollm2-135m", start, stop, dtype="float32", device="cpu")
    ut = M.unit_timings(st, CONTEXT, PROMPT_TOKENS, 5)
    units_cpu = sum(ut["decode_s"]) / ut["slowdown"]  # back to CPU time: the profile is CPU x slowdown
    cpus = []
    for _ in range(rounds):
        for seq in range(SEQUENCES):
            st.reset(seq)
            x = torch.randint(0, 1000, (1, PROMPT_TOKENS)) if st.is_first else torch.randn(1, PROMPT_TOKENS, st.hidden)
            st.forward(seq, x, 0)
        for step in range(STEPS):
            for seq in range(SEQUENCES):
                x = torch.randint(0, 1000, (1, 1)) if st.is_first else torch.randn(1, 1, st.hidden)
                c = time.process_time()
                out = st.forward(seq, x, PROMPT_TOKENS + step)
                if st.is_last:
                    int(out.argmax())  # greedy sampling, as the last stage does
                cpus.append(time.process_time() - c)
    return units_cpu, statistics.mean(cpus)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stages", nargs="+", default=["7:15", "23:32", "0:7"], help="unit ranges start:stop")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    for s in args.stages:
        a, b = (int(x) for x in s.split(":"))
        units, fwd = measure(a, b)
        print(f"stage [{a}, {b}): profiled units {units * 1e3:.2f} ms CPU, forward per decode step "
              f"{fwd * 1e3:.2f} ms CPU ({fwd / units:.3f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
