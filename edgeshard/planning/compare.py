"""Paper-style comparison: every strategy, per model and source-to-cloud bandwidth, latency and throughput.

The sweep changes only the source <-> cloud link (both directions), as in the paper's bandwidth experiments.
"""

from __future__ import annotations

from edgeshard.config.plan import OOM, STATUS_SHORT
from edgeshard.config.testbed import Testbed
from edgeshard.planning.baselines import STRATEGIES, plan_all
from edgeshard.planning.costs import Workload
from edgeshard.planning.synthetic import synthetic_profile

PAPER_MODELS = ("llama2-7b", "llama2-13b", "llama2-70b")
PAPER_BANDWIDTHS = (1, 10, 50, 100, 500, 1000)  # Mbit/s, source <-> cloud
PAPER_BASELINES = ("edge-solo", "cloud-edge-even", "cloud-edge-opt")
LINKS = ("source", "all")  # sweep(links=): only source <-> cloud, or every edge device <-> cloud


def sweep(testbed: Testbed, models=PAPER_MODELS, bandwidths=PAPER_BANDWIDTHS, dtype: str = "float32",
          workload: Workload = Workload(), profiles: dict | None = None, links: str = "source") -> list[dict]:
    """Rows {"model", "bandwidth_mbit_s", "objective", "strategy", "value", "feasible", "status", "stages"}.

    value: latency in seconds per token, or throughput in tokens/s. profiles: optional {model: Profile}.
    links: "source" sweeps only source <-> cloud; "all" sweeps every edge <-> cloud link (a WAN to the cloud).
    """
    if links not in LINKS:
        raise ValueError(f"links = {links!r}: use 'source' or 'all'")
    if testbed.cloud is None:
        raise ValueError(f"testbed {testbed.name!r} names no cloud device: add cloud = \"<device>\" to sweep its link")
    rows = []
    for model in models:
        profile = (profiles or {}).get(model) or synthetic_profile(testbed, model, dtype)
        for bw in bandwidths:
            tb = testbed
            for d in ([testbed.source] if links == "source" else [n for n in testbed.names if n != testbed.cloud]):
                tb = tb.with_link(d, testbed.cloud, bandwidth_mbit_s=bw)
            for objective in ("latency", "throughput"):
                for name, plan in plan_all(tb, profile, objective, workload).items():
                    if plan.feasible:
                        v = plan.predicted["latency_s"] if objective == "latency" else plan.predicted["throughput_tokens_per_s"]
                    else:
                        v = None
                    rows.append({"model": model, "bandwidth_mbit_s": bw, "objective": objective, "strategy": name,
                                 "value": v, "feasible": plan.feasible, "status": plan.status,
                                 "stages": [[s.device, s.start, s.stop] for s in plan.stages]})
    return rows


def gain(rows: list[dict], model: str, bw: float, objective: str, baselines=PAPER_BASELINES) -> float | None:
    """EdgeShard's gain over the best feasible baseline: latency reduction (fraction) or throughput ratio."""
    pick = {r["strategy"]: r["value"] for r in rows
            if r["model"] == model and r["bandwidth_mbit_s"] == bw and r["objective"] == objective}
    es = pick.get("edgeshard")
    base = [pick[b] for b in baselines if pick.get(b) is not None]
    if es is None or not base:
        return None
    if objective == "latency":
        return 1.0 - es / min(base)
    return es / max(base)


def _cell(row: dict | None, fmt) -> str:
    if row is not None and row.get("value") is not None:
        return fmt(row["value"])
    return STATUS_SHORT[(row or {}).get("status") or OOM]


def format_table(rows: list[dict], strategies=STRATEGIES) -> str:
    models = list(dict.fromkeys(r["model"] for r in rows))
    bws = list(dict.fromkeys(r["bandwidth_mbit_s"] for r in rows))
    out = []
    short = {"edgeshard": "EdgeShard", "edge-solo": "Edge-Solo", "cloud-edge-even": "CE-Even", "cloud-edge-opt": "CE-Opt",
             "even": "Even", "memory-proportional": "MemProp", "greedy-fill": "Greedy"}
    for objective, unit, fmt in (("latency", "ms/token", lambda v: f"{v * 1000:.1f}"),
                                 ("throughput", "tokens/s", lambda v: f"{v:.2f}")):
        out.append(f"\n{objective} ({unit}; OOM = does not fit; n/a = no plan; gain vs best of "
                   f"{', '.join(PAPER_BASELINES)})")
        head = f"{'model':<11} {'Mbit/s':>7} " + " ".join(f"{short.get(s, s):>9}" for s in strategies) + f" {'gain':>8}"
        out.append(head)
        out.append("-" * len(head))
        for m in models:
            for bw in bws:
                here = {r["strategy"]: r for r in rows
                        if r["model"] == m and r["bandwidth_mbit_s"] == bw and r["objective"] == objective}
                # no value: the row's status says why (rows without one, written before it existed: OOM)
                cells = " ".join(f"{_cell(here.get(s), fmt):>9}" for s in strategies)
                g = gain(rows, m, bw, objective)
                gs = "-" if g is None else (f"{g * 100:.0f}%" if objective == "latency" else f"{g:.2f}x")
                out.append(f"{m:<11} {bw:>7g} {cells} {gs:>8}")
    return "\n".join(out)
