"""Planning (no torch, no I/O): the cost model, the exact DP, baselines, synthetic profiles, the paper-style comparison."""
