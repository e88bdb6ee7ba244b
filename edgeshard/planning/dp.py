"""The exact EdgeShard planner: which devices take part and where the cuts go. Pure: no I/O, clocks or logging.

Exactness
---------
A plan is a path source -> d_2 -> ... -> d_P over distinct devices, each taking a contiguous unit range.
"Each device at most once" makes the problem a resource-constrained path problem; the paper's latency DP
(O(N M^2)) drops that constraint and handles memory only along its best path, so it is not exact. We keep
the set of used devices in the state, as the paper's throughput DP does (O(N^2 2^M M^2)), but count devices
per *class* instead of per device: devices that are interchangeable (same per-unit costs, same memory, and
links that depend only on the classes at both ends) are counted, so 13 identical Jetsons cost 14 states
instead of 2^13. Classes are found by partition refinement over the link matrix, so grouping never merges
devices that differ in anything the cost model reads (exactness is kept, not traded).

Tables (K classes, class 0 = the source alone; S = prod over classes 1..K-1 of (cap_k + 1) count vectors)
  V[j, m, s]  least cost of covering units [0, j) with the last stage on a device of class m, having used
              c(s)_k devices of each non-source class k (s is the mixed-radix index of the count vector).
  Recurrence (pull), for j > 0, m >= 1, t a count vector with c(t)_m >= 1, s = t - e_m:
      V[j, m, t] = min over i in [lo_m(j), j) of  combine(in_m[i, s], stage_m(i, j))
      in_m[i, s] = min over k of combine(V[i, k, s], hop(k -> m after unit i-1))
  Initial: V[j, 0, 0] = stage_0(0, j)  (the source takes unit 0: the embedding, so raw tokens stay there).
  combine is + for the additive objectives (latency, e2e) and max for the bottleneck objective (throughput).
  lo_m(j) is the first i for which units [i, j) fit the memory of a class-m device (prefix sums: monotone in j).
  Answer: min over (m, s) meeting the require/max_stages constraints of combine(V[N, m, s], return(m)).

For throughput, among all plans with the optimal bottleneck we return the one of least latency: a second,
additive pass restricted to stages, hops and return no slower than the optimal bottleneck b* (any plan in that
restricted space has bottleneck exactly b*), which is an exact lexicographic optimum.

Shared cores (throughput only; costs.CostModel.contention): a pipelined stage on a [[shared_cores]] group with
c cores costs (decode + overhead) * max(1, k / c), where k is how many of the plan's stages the group holds, a
number only the finished plan knows. Classes never straddle a group (group membership is part of a class's
signature), so k is a sum of entries of the count vector. The DP guesses k: for every combination over the
groups of "k <= c" (factor 1) or one k in (c, size of the group], it runs both passes with that factor on the
group's classes and keeps only final states whose count vector has exactly that k (or k <= c). Every plan is
then judged with its own factor, as the evaluator judges it, and the best over the guesses is the optimum:
b* = min over guesses of the guess's bottleneck; the least-latency pass runs under each guess with bound b*.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass

import numpy as np

from edgeshard.config.errors import InfeasibleError
from edgeshard.config.plan import FEASIBLE, INFEASIBLE, OOM, Plan, Stage
from edgeshard.config.profile import Profile
from edgeshard.config.testbed import Testbed
from edgeshard.config.units import size_text
from edgeshard.planning.costs import OBJECTIVES, CostModel, Workload, objective_value

INF = float("inf")


def device_classes(cm: CostModel) -> list[tuple[str, ...]]:
    """Partition the usable devices into interchangeable classes; class 0 is the source alone.

    Refinement until, for every pair of classes (A, B), the link x -> y is the same for all x in A, y in B, x != y.
    """
    devs = list(cm.devices)

    def base(d):
        if d == cm.source:
            return (0,)
        return (1, cm.decode_prefix[d], cm.prefill_prefix[d], cm.overhead[d], cm.memory_limit[d],
                cm.group_of.get(d, -1))

    groups: dict = {}
    for d in devs:
        groups.setdefault(base(d), []).append(d)
    part = [tuple(g) for g in groups.values()]
    changed = True
    while changed:
        changed = False
        new: list[tuple[str, ...]] = []
        for grp in part:
            if len(grp) == 1:
                new.append(grp)
                continue
            sigs: dict = {}
            for x in grp:
                sig = []
                for other in part:
                    out = tuple(sorted({cm.link(x, y) for y in other if y != x}))
                    inn = tuple(sorted({cm.link(y, x) for y in other if y != x}))
                    sig.append((out, inn))
                sigs.setdefault(tuple(sig), []).append(x)
            new.extend(tuple(g) for g in sigs.values())
        if len(new) != len(part):
            part, changed = new, True
            continue
        # Signatures agree within each class; a class B that some x sees through several link values is split.
        for x in devs:
            for idx, other in enumerate(part):
                vals = {(cm.link(x, y), cm.link(y, x)) for y in other if y != x}
                if len(vals) > 1:
                    by: dict = {}
                    for y in other:
                        by.setdefault(None if y == x else (cm.link(x, y), cm.link(y, x)), []).append(y)
                    part = part[:idx] + [tuple(g) for g in by.values()] + part[idx + 1:]
                    changed = True
                    break
            if changed:
                break
    src = [g for g in part if cm.source in g]
    rest = sorted((g for g in part if cm.source not in g), key=lambda g: devs.index(g[0]))
    return src + rest


@dataclass
class _Tables:
    """Everything the DP reads, as arrays over classes (K), units (N) and boundaries (N + 1)."""

    classes: list[tuple[str, ...]]
    caps: np.ndarray  # (K,) how many devices of class k may be used (class 0: 1)
    req: np.ndarray  # (K,) how many must be used (required devices per class)
    strides: np.ndarray  # (K,) mixed-radix strides of the count vector (class 0: 0, never counted)
    S: int
    most: int  # at most this many non-source stages (max_stages - 1, or N - 1)
    stage_pre: np.ndarray  # (K, N+1) prefix sums of the per-unit stage cost
    decode_pre: np.ndarray  # (K, N+1) prefix sums of decode time (for the throughput mask)
    overhead: np.ndarray  # (K,) step_overhead_s: a pipelined stage costs decode + overhead (costs.pipelined)
    lo: np.ndarray  # (K, N+1) first start i whose stage [i, j) fits memory
    hop: np.ndarray  # (K, K, N) cost k -> m after unit u (inf where no such pair exists)
    hop1: np.ndarray  # (K, K, N) decode hop (T = 1)
    ret: np.ndarray  # (K,)
    ret1: np.ndarray  # (K,)
    group: np.ndarray  # (K,) the [[shared_cores]] group of class k (costs.CostModel.groups), -1 for none


def _tables(cm: CostModel, objective: str, workload: Workload) -> _Tables:
    classes = device_classes(cm)
    K, N = len(classes), cm.n_units
    c = cm.testbed.constraints
    most = N - 1 if c.max_stages is None else min(N - 1, c.max_stages - 1)  # non-source stages
    caps = np.array([1] + [min(len(g), most) for g in classes[1:]], dtype=np.int64)
    req = np.array([sum(d in c.require for d in g) for g in classes], dtype=np.int64)
    strides = np.zeros(K, dtype=np.int64)
    S = 1
    for k in range(1, K):
        strides[k] = S
        S *= int(caps[k]) + 1
    P, G = workload.prompt_tokens, workload.new_tokens
    rep = [g[0] for g in classes]
    decode_pre = np.array([cm.decode_prefix[d] for d in rep])
    if objective == "e2e":
        unit = [[P * a + (G - 1) * b for a, b in zip(cm.profile.devices[d].prefill_s_per_token,
                                                       cm.profile.devices[d].decode_s)] for d in rep]
        stage_pre = np.concatenate([np.zeros((K, 1)), np.cumsum(np.array(unit), axis=1)], axis=1)
    else:
        stage_pre = decode_pre
    mem = np.array(cm.memory_prefix, dtype=np.float64)
    lo = np.zeros((K, N + 1), dtype=np.int64)
    for k, d in enumerate(rep):
        # smallest i with mem[j] - mem[i] <= limit  <=>  mem[i] >= mem[j] - limit
        lo[k] = np.searchsorted(mem, mem - cm.memory_limit[d], side="left")
    act = np.array(cm.activation, dtype=np.float64)
    hop = np.full((K, K, N), INF)
    hop1 = np.full((K, K, N), INF)
    for k, a in enumerate(rep):
        for m, b in enumerate(rep):
            if m == 0:
                continue  # nothing enters the source class after unit 0
            if k == m:
                if len(classes[k]) < 2:
                    continue
                b = classes[k][1]  # a second member of the same class
            bw, lat = cm.link(a, b)
            hop1[k, m] = act / bw + lat
            hop[k, m] = (P * act / bw + lat) + (G - 1) * hop1[k, m] if objective == "e2e" else hop1[k, m]
    ret1 = np.array([cm.ret(d) for d in rep])
    ret = G * ret1 if objective == "e2e" else ret1
    overhead = np.array([cm.overhead[d] for d in rep], dtype=np.float64)
    group = np.array([cm.group_of.get(d, -1) for d in rep], dtype=np.int64)
    return _Tables(classes, caps, req, strides, S, most, stage_pre, decode_pre, overhead, lo, hop, hop1, ret, ret1,
                   group)


def _counts(t: _Tables) -> np.ndarray:
    """(K, S) count of class k in count vector s (row 0 is the source, always 1)."""
    s = np.arange(t.S)
    rows = [np.ones(t.S, dtype=np.int64)]
    for k in range(1, len(t.classes)):
        rows.append((s // t.strides[k]) % (t.caps[k] + 1))
    return np.array(rows)


def _contention_guesses(cm: CostModel, t: _Tables):
    """[(factor per class (K,), allowed final count vectors (S,) bool)]: one per combination of a guessed k per
    [[shared_cores]] group ("k <= cores", factor 1, or one k above it, factor k / cores), in a fixed order."""
    K = len(t.classes)
    counts = _counts(t)
    options = []  # per group that can be over-committed: [(k or None, mask over S)]
    for g, (members, cores) in enumerate(cm.groups):
        in_g = counts[t.group == g].sum(axis=0)  # (S,) devices of group g a count vector uses (source included)
        ks = [k for k in range(1, len(members) + 1) if k > cores]
        if not ks:
            continue
        options.append([(g, None, in_g <= cores)] + [(g, k, in_g == k) for k in ks])
    out = []
    for combo in itertools.product(*options):
        factor = np.ones(K)
        ok = np.ones(t.S, dtype=bool)
        for g, k, mask in combo:
            if k is not None:
                factor[t.group == g] = max(1.0, k / cm.groups[g][1])  # the evaluator's expression (costs.py)
            ok &= mask
        out.append((factor, ok))
    return out


def _dp(t: _Tables, mode: str, bound: float | None = None, factor: np.ndarray | None = None,
        allowed: np.ndarray | None = None):
    """Run the table DP. mode "sum" or "max". "max" is the bottleneck: a stage there costs its pipelined time,
    decode + the device's step overhead, times its class's contention factor (default 1). bound: drop stages
    (by pipelined time x factor), hops (T=1) and returns slower than it (the throughput tie-break pass).
    allowed: (S,) only these final count vectors (a contention guess). Returns (value, last class, count index,
    parents)."""
    K, N1 = len(t.classes), t.stage_pre.shape[1]
    N, S = N1 - 1, t.S
    if factor is None:
        factor = np.ones(K)
    comb = np.add if mode == "sum" else np.maximum
    hop = t.hop if bound is None else np.where(t.hop1 <= bound, t.hop, INF)
    ret = t.ret if bound is None else np.where(t.ret1 <= bound, t.ret, INF)
    counts = _counts(t)
    V = np.full((N1, K, S), INF)
    par_i = np.zeros((N1, K, S), dtype=np.int16)
    arg_k = np.zeros((K, N1, S), dtype=np.int8)  # best predecessor class of in_m[i, s]
    IN = np.full((K, N1, S), INF)  # in_m[i, t]: already shifted to the target count vector t = s + e_m

    # the source's stage [0, j)
    for j in range(1, N1):
        if t.lo[0, j] > 0:
            continue
        cost = t.stage_pre[0, j] - t.stage_pre[0, 0]
        if mode == "max":
            cost = (cost + t.overhead[0]) * factor[0]
        if bound is not None and ((t.decode_pre[0, j] - t.decode_pre[0, 0]) + t.overhead[0]) * factor[0] > bound:
            continue
        V[j, 0, 0] = cost
    for j in range(1, N1):
        # in_m[i = j - 1 ... ] needs V[i] final: V[i] for i < j is final once we reach j (pull order)
        i = j - 1
        if i >= 1 and np.isfinite(V[i]).any():
            for m in range(1, K):
                via = comb(V[i], hop[:, m, i - 1][:, None])  # (K, S)
                best = via.min(axis=0)
                arg = via.argmin(axis=0).astype(np.int8)
                ok = counts[m] < t.caps[m]  # room for one more device of class m
                best = np.where(ok, best, INF)
                st = int(t.strides[m])
                IN[m, i, st:] = best[:-st] if st else best
                arg_k[m, i, st:] = arg[:-st] if st else arg
        for m in range(1, K):
            lo = max(1, int(t.lo[m, j]))
            if lo >= j:
                continue
            block = IN[m, lo:j]  # (j - lo, S)
            stage = t.stage_pre[m, j] - t.stage_pre[m, lo:j]  # (j - lo,)
            if mode == "max":
                stage = (stage + t.overhead[m]) * factor[m]
            if bound is not None:
                stage = np.where(((t.decode_pre[m, j] - t.decode_pre[m, lo:j]) + t.overhead[m]) * factor[m] <= bound,
                                 stage, INF)
            cand = comb(block, stage[:, None])
            V[j, m] = cand.min(axis=0)
            par_i[j, m] = cand.argmin(axis=0) + lo
    final = comb(V[N], ret[:, None])  # (K, S)
    ok = np.all(counts >= t.req[:, None], axis=0) & (counts[1:].sum(axis=0) <= t.most)
    if allowed is not None:
        ok &= allowed
    final = np.where(ok[None, :], final, INF)
    flat = int(np.argmin(final))  # first minimum in (class, count) order: deterministic
    m, s = divmod(flat, S)
    return float(final[m, s]), m, s, (V, par_i, arg_k)


def _reconstruct(t: _Tables, m: int, s: int, parents, cm: CostModel) -> list[Stage]:
    V, par_i, arg_k = parents
    N = V.shape[0] - 1
    c = cm.testbed.constraints
    pieces = []  # (class, start, stop), last first
    j = N
    while True:
        if m == 0:
            pieces.append((0, 0, j))
            break
        i = int(par_i[j, m, s])
        pieces.append((m, i, j))
        k = int(arg_k[m, i, s])  # stored at the target count vector s
        j, m, s = i, k, s - int(t.strides[m])
    pieces.reverse()
    # members: required ones first, then testbed order
    pools = [sorted(g, key=lambda d: (d not in c.require, cm.devices.index(d))) for g in t.classes]
    used = [0] * len(pools)
    stages = []
    for k, a, b in pieces:
        stages.append(Stage(pools[k][used[k]], a, b))
        used[k] += 1
    return stages


def _shortfall(cm: CostModel) -> str:
    N = cm.n_units
    need = cm.memory(0, N)
    limits = {d: cm.memory_limit[d] for d in cm.devices}
    have = sum(limits.values())
    n = len(limits)
    if need > have:
        return (f"the model needs {size_text(need)} (weights + KV cache for "
                f"{cm.testbed.constraints.context_tokens} tokens x {cm.testbed.constraints.sequences} sequences), "
                f"the {n} usable device{'s' if n != 1 else ''} hold {size_text(have)}: add devices, lower "
                f"context_tokens/sequences/memory_headroom, or use a smaller dtype")
    biggest = max(limits.values())
    for u in range(N):
        if cm.unit_memory[u] > biggest:
            return (f"unit {u} ({cm.profile.units[u].name}) needs {size_text(cm.unit_memory[u])}, the largest "
                    f"usable device holds {size_text(biggest)}")
    if cm.unit_memory[0] > cm.memory_limit[cm.source]:
        return (f"unit 0 must run on the source {cm.source!r}, which holds {size_text(cm.memory_limit[cm.source])}; "
                f"it needs {size_text(cm.unit_memory[0])}")
    ms = cm.testbed.constraints.max_stages
    if ms is not None:
        top = sorted(limits.values(), reverse=True)[:ms]
        if need > sum(top):
            return (f"with max_stages = {ms} the {ms} largest devices hold {size_text(sum(top))}, the model needs "
                    f"{size_text(need)}: raise max_stages")
    return (f"no split of the {N} units into contiguous stages fits the devices' memory under the constraints "
            f"(require={list(cm.testbed.constraints.require)}, max_stages={ms}); relax them or add memory")


def solve(testbed: Testbed, profile: Profile, objective: str = "latency",
          workload: Workload = Workload(), explain: bool = False) -> Plan:
    """The optimal plan for an objective under all constraints; InfeasibleError if none exists.

    explain: say for every class of unused devices what the best plan forced to use one of them costs more
    (one more exact solve per class).
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective {objective!r} is not one of {', '.join(OBJECTIVES)}")
    cm = CostModel(testbed, profile)
    c = testbed.constraints
    if c.max_stages is not None and len(c.require) + (testbed.source not in c.require) > c.max_stages:
        raise InfeasibleError(f"{len(set(c.require) | {testbed.source})} devices must be used (source + require) "
                              f"but max_stages = {c.max_stages}: raise max_stages or shorten require")
    t = _tables(cm, "latency" if objective == "throughput" else objective, workload)
    if objective == "throughput":
        guesses = _contention_guesses(cm, t)  # one (factor 1, every count allowed) without shared cores
        best = min(_dp(t, "max", factor=f, allowed=a)[0] for f, a in guesses)
        if np.isfinite(best):
            # least latency among bottleneck-optimal plans, over every guess (first minimum in guess order)
            best2, m, s, parents = min((_dp(t, "sum", bound=best, factor=f, allowed=a) for f, a in guesses),
                                       key=lambda r: r[0])
            assert np.isfinite(best2), "the bottleneck-optimal plan must survive its own bound"
    else:
        best, m, s, parents = _dp(t, "sum")
    if not np.isfinite(best):
        raise InfeasibleError(f"testbed {testbed.name!r}, model {profile.model}: {_shortfall(cm)}")
    stages = _reconstruct(t, m, s, parents, cm)
    plan = make_plan(cm, stages, objective, "edgeshard", workload)
    if explain:
        plan = dataclasses.replace(plan, notes=tuple(n for n in plan.notes if ": unused" not in n)
                                   + tuple(_why_unused(testbed, profile, objective, workload, t, plan)))
    return plan


def _why_unused(testbed, profile, objective, workload, t: _Tables, plan: Plan) -> list[str]:
    used = {s.device for s in plan.stages}
    base = cost(plan)
    unit = "ms/token" if objective == "latency" else ("s" if objective == "e2e" else "ms of bottleneck")
    scale = 1.0 if objective == "e2e" else 1000.0
    notes = []
    for cls in t.classes[1:]:
        free = [d for d in cls if d not in used]
        if not free:
            continue
        who = free[0] if len(free) == 1 else f"{', '.join(free)} (interchangeable)"
        # one MORE device of this class than the plan uses (requiring only free[0] would just swap it in)
        more = tuple(d for d in cls if d in used) + (free[0],)
        forced = testbed.with_constraints(require=tuple(dict.fromkeys(testbed.constraints.require + more)))
        try:
            alt = solve(forced, profile, objective, workload)
            extra = ""
            if objective == "throughput":  # ties are broken by latency: say what that costs too
                extra = f" ({(alt.predicted['latency_s'] - plan.predicted['latency_s']) * 1000:+.3f} ms/token latency)"
            notes.append(f"{who}: unused; the best plan using {'it' if len(free) == 1 else 'one more'} costs "
                         f"{(cost(alt) - base) * scale:+.3f} {unit}{extra}")
        except InfeasibleError:
            notes.append(f"{who}: unused; no plan that uses {'it' if len(free) == 1 else 'one more'} fits the constraints")
    return notes


def judge(cm: CostModel, stages) -> tuple[str, tuple[str, ...]]:
    """(status, reasons) of stages under the one evaluator: ("feasible", ()); ("oom", memory shortfalls) when
    memory is the only rule broken; ("infeasible", every rule broken) otherwise. Plan.status / Plan.reasons
    (config/plan.py) carry the result, so nothing downstream reads the words of the reasons."""
    bad = tuple(cm.violations(stages))
    if not bad:
        return FEASIBLE, ()
    return (INFEASIBLE if cm.violations(stages, check_memory=False) else OOM), bad


def make_plan(cm: CostModel, stages, objective: str, strategy: str, workload: Workload,
              notes: tuple[str, ...] = ()) -> Plan:
    """Judge stages with the one evaluator and wrap them as a Plan (status and reasons from judge())."""
    stages = tuple(stages)
    status, bad = judge(cm, stages)
    predicted = {} if bad else cm.evaluate(stages, workload)
    used = {s.device for s in stages}
    notes = tuple(notes) + tuple(bad)
    if not bad:
        notes += tuple(f"{d}: excluded by [constraints]" for d in cm.testbed.names if d in cm.testbed.constraints.exclude)
        notes += tuple(f"{d}: unused, no plan using it has a lower {objective} cost"
                       for d in cm.devices if d not in used and strategy == "edgeshard")
    return Plan(objective, strategy, stages, predicted, cm.profile.model, cm.testbed.name,
                {"prompt_tokens": workload.prompt_tokens, "new_tokens": workload.new_tokens,
                 "sequences": workload.sequences}, notes, not bad, status, bad)


def cost(plan: Plan) -> float:
    return objective_value(plan.predicted, plan.objective) if plan.feasible else INF
