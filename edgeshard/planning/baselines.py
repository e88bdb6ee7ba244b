"""Baseline strategies, each judged by the same evaluator as the exact planner (costs.CostModel).

- edge-solo: the source runs every unit (the paper's Edge-Solo).
- cloud-edge-even: the decoder layers split evenly between source and cloud; embedding on the source, head on
  the cloud (the paper's Cloud-Edge-Even).
- cloud-edge-opt: the best single cut between source and cloud for the objective (the paper's Cloud-Edge-Opt).
- even: equal unit counts over all usable devices, source first, testbed order.
- memory-proportional: unit counts proportional to device memory, source first (exo's ring memory split).
- greedy-fill: fill devices in order, source first, each up to its memory (accelerate's device_map="auto").
A baseline whose stages do not fit comes back as a Plan with status "oom" (stages that break another rule, or no
stages at all: "infeasible") and its reasons, never an exception; its note says the same in words.
"""

from __future__ import annotations

from edgeshard.config.errors import InfeasibleError
from edgeshard.config.plan import INFEASIBLE, OOM, Plan, Stage
from edgeshard.planning import dp as planner
from edgeshard.planning.costs import CostModel, Workload, objective_value

STRATEGIES = ("edgeshard", "edge-solo", "cloud-edge-even", "cloud-edge-opt", "even", "memory-proportional",
              "greedy-fill")


def _infeasible(cm: CostModel, strategy: str, objective: str, workload: Workload, why: str,
                status: str = INFEASIBLE, reason: str | None = None) -> Plan:
    """A strategy that could not form stages: no stages; `why` the note for people, status and reason (default:
    the note) the same as data."""
    return Plan(objective, strategy, (), {}, cm.profile.model, cm.testbed.name,
                {"prompt_tokens": workload.prompt_tokens, "new_tokens": workload.new_tokens}, (why,), False,
                status, (reason or why,))


def _judge(cm: CostModel, stages: list[Stage], strategy: str, objective: str, workload: Workload) -> Plan:
    status, bad = planner.judge(cm, stages)
    if bad:
        return Plan(objective, strategy, tuple(stages), {}, cm.profile.model, cm.testbed.name,
                    {"prompt_tokens": workload.prompt_tokens, "new_tokens": workload.new_tokens},
                    (("OOM: " if status == OOM else "invalid: ") + "; ".join(bad),), False, status, bad)
    return planner.make_plan(cm, stages, objective, strategy, workload)


def _split(counts: list[int], devices: list[str]) -> list[Stage]:
    stages, pos = [], 0
    for d, n in zip(devices, counts):
        if n > 0:
            stages.append(Stage(d, pos, pos + n))
            pos += n
    return stages


def _proportional(n: int, weights: list[float]) -> list[int]:
    """Integer counts summing to n, proportional to weights, by cumulative rounding (no device skipped twice)."""
    total = sum(weights)
    bounds, acc = [0], 0.0
    for w in weights:
        acc += w
        bounds.append(round(n * acc / total))
    return [b - a for a, b in zip(bounds, bounds[1:])]


def _ordered(cm: CostModel) -> list[str]:
    return [cm.source] + [d for d in cm.devices if d != cm.source]


def plan_with(strategy: str, testbed, profile, objective: str = "latency", workload: Workload = Workload()) -> Plan:
    cm = CostModel(testbed, profile)
    N = cm.n_units
    if strategy == "edgeshard":
        try:
            return planner.solve(testbed, profile, objective, workload)
        except InfeasibleError as e:
            return _infeasible(cm, strategy, objective, workload, f"infeasible: {e}", reason=str(e))
    if strategy == "edge-solo":
        return _judge(cm, [Stage(cm.source, 0, N)], strategy, objective, workload)
    if strategy in ("cloud-edge-even", "cloud-edge-opt"):
        cloud = testbed.cloud
        if cloud is None or cloud not in cm.devices or cloud == cm.source:
            return _infeasible(cm, strategy, objective, workload,
                               "no cloud device: set cloud = \"<device>\" in the testbed (not excluded, not the source)")
        if strategy == "cloud-edge-even":
            cut = 1 + (N - 2) // 2  # embedding + half the decoder layers on the source
            return _judge(cm, [Stage(cm.source, 0, cut), Stage(cloud, cut, N)], strategy, objective, workload)
        best = None
        for cut in range(1, N):
            p = _judge(cm, [Stage(cm.source, 0, cut), Stage(cloud, cut, N)], strategy, objective, workload)
            if p.feasible and (best is None or objective_value(p.predicted, objective) <
                               objective_value(best.predicted, objective)):
                best = p
        return best or _judge(cm, [Stage(cm.source, 0, 1), Stage(cloud, 1, N)], strategy, objective, workload)
    devices = _ordered(cm)
    if strategy == "even":
        return _judge(cm, _split(_proportional(N, [1.0] * len(devices)), devices), strategy, objective, workload)
    if strategy == "memory-proportional":
        weights = [cm.memory_limit[d] for d in devices]
        return _judge(cm, _split(_proportional(N, weights), devices), strategy, objective, workload)
    if strategy == "greedy-fill":
        stages, pos = [], 0
        for d in devices:
            stop = pos
            while stop < N and cm.memory(pos, stop + 1) <= cm.memory_limit[d]:
                stop += 1
            if stop > pos:
                stages.append(Stage(d, pos, stop))
                pos = stop
            if pos == N:
                break
        if pos < N:
            held = f"devices filled in order hold units [0, {pos}) of {N}"
            return _infeasible(cm, strategy, objective, workload, f"OOM: {held}", OOM, held)
        return _judge(cm, stages, strategy, objective, workload)
    raise ValueError(f"strategy {strategy!r} is not one of {', '.join(STRATEGIES)}")


def plan_all(testbed, profile, objective: str = "latency", workload: Workload = Workload()) -> dict[str, Plan]:
    return {s: plan_with(s, testbed, profile, objective, workload) for s in STRATEGIES}
