"""Runtime overhead on loopback, measured in one run (medians):

1. 1 stage: edgeshard decode tokens/s (one local device server, one torch thread) vs in-process transformers
   greedy `generate` (same weights, one torch thread, this process). Target >= 0.9x.
2. 3 stages: per-token latency minus the sum of the three stages' compute for that token (the runtime's own
   cost: framing, sockets, thread hand-offs, events). Links unshaped. Target <= 1.5 ms.

    .venv/bin/python bench/runtime_overhead.py [--model smollm2-135m] [--tokens 48] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edgeshard.config import catalog  # noqa: E402
from edgeshard.config import testbed as tbm
from edgeshard.config.plan import Plan, Stage  # noqa: E402
from edgeshard.run import runtime
from edgeshard.testbeds import local as launch

TB = """
name = "bench-overhead"
source = "d0"
[defaults]
bandwidth_mbit_s = 1000
latency_ms = 0
[[device]]
name = "d0"
memory_gib = 4
[[device]]
name = "d1"
memory_gib = 4
[[device]]
name = "d2"
memory_gib = 4
"""
PROMPT = "The history of the city of Paris begins"


def hf_decode_rate(model: str, n: int) -> tuple[float, list[int]]:
    """Decode tokens/s of transformers generate in this process: (n - 1) / (t(n tokens) - t(1 token))."""
    import torch

    from edgeshard.device import model as M

    torch.set_num_threads(1)
    full = M._reference_model(model, "float32", 0)
    ids = torch.tensor([M.load_tokenizer(model)(PROMPT)["input_ids"]])
    kw = dict(do_sample=False, pad_token_id=full.config.eos_token_id, eos_token_id=None)

    def gen(k):
        t = time.perf_counter()
        out = full.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=k,
                            min_new_tokens=k, **kw)
        return time.perf_counter() - t, out[0, ids.shape[1]:].tolist()

    gen(4)  # warm-up
    t1 = statistics.median(gen(1)[0] for _ in range(3))
    tn, toks = gen(n)
    return (n - 1) / (tn - t1), toks


def edgeshard_run(tb, state, cuts, model, n):
    stages = tuple(Stage(f"d{i}", cuts[i], cuts[i + 1]) for i in range(len(cuts) - 1))
    res = runtime.run(tb, Plan("latency", "manual", stages, {}), model, [PROMPT], n, state=state,
                      write_run_dir=False, runs_base="/tmp")
    return res


def decode_rate(res) -> float:
    lat = res["results"][0]["token_latency_s"][1:]  # skip the first token (prefill)
    return len(lat) / sum(lat)


def overhead_per_token(events_list) -> list[float]:
    """Per decode step k >= 1: t_token(k) - t_token(k-1) - sum of compute durations of step k."""
    tok = {e["step"]: e["t_s"] for e in events_list if e["type"] == "token"}
    comp = {}
    for e in events_list:
        if e["type"] == "compute":
            comp[e["step"]] = comp.get(e["step"], 0.0) + e["end_s"] - e["start_s"]
    return [tok[k] - tok[k - 1] - comp[k] for k in sorted(tok) if k >= 1 and k - 1 in tok and k in comp]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    N = catalog.get(args.model).n_units
    tb = tbm.loads(TB)
    out = {"model": args.model, "tokens": args.tokens}
    three_cuts = [0, N // 3, 2 * N // 3, N]
    with launch.local_testbed(tb) as state:
        state = dict(state, links=[])  # unshaped: measure the runtime, not an emulated network
        one, three, ovh, hf = [], [], [], []
        # phase 1: one stage, interleaved with the in-process reference (so background load hits both);
        # the shard stays loaded across repeats (a fresh load makes the first tokens slow: page faults)
        edgeshard_run(tb, state, [0, N], args.model, 8)
        for _ in range(args.repeats):
            rate, ref_toks = hf_decode_rate(args.model, args.tokens)
            hf.append(rate)
            r1 = edgeshard_run(tb, state, [0, N], args.model, args.tokens)
            assert r1["results"][0]["token_ids"] == ref_toks, "1-stage tokens differ from generate"
            one.append(decode_rate(r1))
        # phase 2: three stages
        edgeshard_run(tb, state, three_cuts, args.model, 8)
        for _ in range(args.repeats):
            evs = []
            stages = tuple(Stage(f"d{i}", a, b) for i, (a, b) in enumerate(zip(three_cuts, three_cuts[1:])))
            r3 = runtime.run(tb, Plan("latency", "manual", stages, {}), args.model, [PROMPT], args.tokens,
                             state=state, write_run_dir=False, on_event=evs.append)
            three.append(decode_rate(r3))
            ovh.extend(overhead_per_token(evs))
    out.update({
        "hf_generate_tokens_per_s": statistics.median(hf),
        "edgeshard_1stage_tokens_per_s": statistics.median(one),
        "ratio_1stage_over_hf": statistics.median(one) / statistics.median(hf),
        "edgeshard_3stage_tokens_per_s": statistics.median(three),
        "overhead_3stage_ms_p50": statistics.median(ovh) * 1e3,
        "overhead_3stage_ms_p95": sorted(ovh)[int(0.95 * (len(ovh) - 1))] * 1e3,
        "overhead_samples": len(ovh),
    })
    if args.json:
        print(json.dumps(out, indent=1))
        return
    print(f"{args.model}, {args.tokens} new tokens, {args.repeats} interleaved repeats, one torch thread everywhere")
    print(f"transformers generate (in process): {out['hf_generate_tokens_per_s']:.1f} tokens/s")
    print(f"edgeshard 1 stage (device server):  {out['edgeshard_1stage_tokens_per_s']:.1f} tokens/s  "
          f"-> {out['ratio_1stage_over_hf']:.3f}x (target >= 0.9)")
    print(f"edgeshard 3 stages:                 {out['edgeshard_3stage_tokens_per_s']:.1f} tokens/s; per-token latency "
          f"minus stage compute: p50 {out['overhead_3stage_ms_p50']:.3f} ms, p95 {out['overhead_3stage_ms_p95']:.3f} ms "
          f"(target <= 1.5 ms; {out['overhead_samples']} tokens)")


if __name__ == "__main__":
    main()
