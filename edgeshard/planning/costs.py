"""The cost model: one evaluator judges every plan (the DP's and every baseline's). Stdlib only.

Units 0..N-1. A plan is stages (device d_p, [a_p, b_p)), contiguous, covering [0, N), the first on the source,
each device at most once, excluded devices unused, required devices used, at most max_stages.
- memory of a stage: sum of weight_bytes + kv_bytes_per_token * context_tokens * sequences over its units,
  at most memory_bytes * (1 - memory_headroom).
- hop after stage p carrying T tokens: T * activation_bytes_per_token[b_p - 1] / bandwidth_bytes_s + latency_s
  on the link d_p -> d_{p+1} (a profile's measured link overrides the testbed's).
- return: if the last device is not the source, the 8-byte token id goes back: 8 / bandwidth + latency.
- latency (per generated token): sum of stage decode times + hops (T=1) + return.
- e2e (P prompt tokens, G new tokens): sum of stage prefill_s_per_token * P + hops (T=P) + return
  + (G - 1) * latency.
- throughput: bottleneck = max(pipelined stage times, hop times at T=1, return); throughput = 1 / bottleneck,
  where a stage's pipelined time is its decode time + the device's step_overhead_s (the runtime's own cost per
  stage step: frame in, events, frame out; 0 unless profiled). A pipelined stage pays it every step, so it
  bounds the rate. Latency and e2e do not add it: in a one-sequence run that cost sits between two stages, inside
  the measured one-way link latency (the profiler times frames through the same receive and send paths), and
  counting it there too would count it twice (docs/emulation.md has the measurements behind both).
- shared cores (the testbed's [[shared_cores]]: devices that run on one machine with `cores` cores): in a
  pipeline, stages compute at the same time. When a plan puts k > cores of its stages on one such group, at most
  `cores` of them compute at once, so a busy stage gets cores / k of a core: every pipelined stage on the group
  is charged the contention factor k / cores (costs.CostModel.contention). The bottleneck uses the factor for
  k stages busy (the rate as the sequences in flight grow); the closed-pipeline rate for N sequences caps its
  rate at 1 / max(pipelined x factor) with at most min(N, k) of them busy. One sequence keeps one device busy at
  a time, so latency and e2e (one sequence) are never charged. docs/emulation.md ("Shared cores") has the
  measurements and why this charge and not another.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from itertools import accumulate

from edgeshard.config.errors import PlanError
from edgeshard.config.plan import Stage
from edgeshard.config.profile import Profile, check_against
from edgeshard.config.testbed import Testbed
from edgeshard.config.units import size_text

OBJECTIVES = ("latency", "e2e", "throughput")
TOKEN_ID_BYTES = 8  # the sampled token id returned to the source (int64)


@dataclass(frozen=True)
class Workload:
    prompt_tokens: int = 128
    new_tokens: int = 128
    sequences: int = 1  # sequences in flight (pipeline mode): what pipeline_tokens_per_s is predicted for

    def __post_init__(self):
        for key in ("prompt_tokens", "new_tokens", "sequences"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"workload {key} = {v!r} must be a positive integer (use --{key.replace('_', '-')} N)")


def closed_pipeline_rate(service_s: list[float], delay_s: float, sequences: int) -> float:
    """Steps per second of `sequences` sequences cycling through a pipeline (tokens/s: a cycle is a token).

    The pipeline as a closed queueing network: each stage and each link's transmission is one server that takes
    the given time per step (service_s), link latencies are pure delays (delay_s in all); each sequence has one
    step in the ring at a time (its next step starts when its token is back). Exact mean value analysis for
    exponential service times (Reiser & Lavenberg 1980): with n sequences, a step waits behind the queue it finds
    there with n - 1, R_k(n) = S_k (1 + Q_k(n-1)); X(n) = n / (sum_k R_k(n) + delay); Q_k(n) = X(n) R_k(n).

    X(n) is 1/(sum S + delay) at n = 1 (one sequence: its round trip) and tends to 1/max(S) as n grows. In
    between it is the product-form answer, which charges queueing as if step times were exponential. Measured on
    the emulated testbed (docs/emulation.md), real step times vary far less (squared coefficient of variation
    0.01-0.04), but with every device busy the steps ran 4-15 % slower than profiled one device at a time and the
    slowest stages idled 12-18 %. So at 3-4 sequences per stage the measured rate sat 12-27 % under 1/bottleneck
    and within -1 to +14 % of X(n); with one sequence per stage X(n) is pessimistic (21.2 tokens/s against 26.8
    measured with 4 sequences on 4 stages; bench/pipeline_sequences.py).
    """
    queue = [0.0] * len(service_s)
    rate = 0.0
    for n in range(1, sequences + 1):
        resid = [s * (1.0 + q) for s, q in zip(service_s, queue)]
        total = sum(resid) + delay_s
        rate = n / total if total > 0 else float("inf")
        queue = [rate * r for r in resid]
    return rate


def _prefix(values) -> tuple[float, ...]:
    return (0.0, *accumulate(values))


class CostModel:
    """Per-device prefix sums and the link matrix of one (testbed, profile) pair.

    The planner reads the same prefix sums, so a stage costs exactly the same float in the DP and here.
    """

    def __init__(self, testbed: Testbed, profile: Profile):
        check_against(profile, testbed, f"profile for model {profile.model!r}")
        self.testbed, self.profile = testbed, profile
        self.n_units = profile.n_units
        c = testbed.constraints
        self.source = testbed.source
        self.devices = tuple(d for d in testbed.names if d not in c.exclude)  # usable, testbed order
        units = profile.units
        reserve = c.context_tokens * c.sequences
        self.unit_memory = tuple(u.weight_bytes + u.kv_bytes_per_token * reserve for u in units)
        self.memory_prefix = _prefix(self.unit_memory)
        self.activation = tuple(u.activation_bytes_per_token for u in units)
        self.decode_prefix = {d: _prefix(profile.devices[d].decode_s) for d in self.devices}
        self.prefill_prefix = {d: _prefix(profile.devices[d].prefill_s_per_token) for d in self.devices}
        self.overhead = {d: profile.devices[d].step_overhead_s for d in self.devices}
        self.memory_limit = {d: testbed.usable_memory_bytes(d) for d in testbed.names}
        # shared cores: group index per usable device, and (usable devices, cores) per group
        self.group_of: dict[str, int] = {}
        self.groups: list[tuple[tuple[str, ...], float]] = []
        for g in testbed.shared_cores:
            usable = tuple(d for d in g.devices if d in self.devices)
            for d in usable:
                self.group_of[d] = len(self.groups)
            self.groups.append((usable, g.cores))
        self._links = {}
        for a in testbed.names:
            for b in testbed.names:
                if a != b:
                    lk = profile.link(a, b) or testbed.link(a, b)
                    self._links[(a, b)] = (lk.bandwidth_bytes_s, lk.latency_s)

    # --- elementary costs -------------------------------------------------------------------------
    def decode(self, device: str, start: int, stop: int) -> float:
        p = self.decode_prefix[device]
        return p[stop] - p[start]

    def pipelined(self, device: str, start: int, stop: int) -> float:
        """A pipelined stage's time per step: decode + the device's step_overhead_s (the planner adds them in this
        order, so both get the same float)."""
        return self.decode(device, start, stop) + self.overhead[device]

    def contention(self, devices, sequences: int | None = None) -> dict[str, float]:
        """Contention factor of each device of a plan (the devices of its stages) in a pipeline: for a device in a
        [[shared_cores]] group with `cores` cores that holds k of the plan's stages, max(1, k / cores); 1 for
        other devices. With `sequences` N in flight at most min(N, k) of them are busy at once; None: as many as
        the plan puts there (the bottleneck's case). The planner computes the same expression for its classes."""
        devices = list(devices)
        used = Counter(self.group_of[d] for d in devices if d in self.group_of)
        out = {}
        for d in devices:
            g = self.group_of.get(d)
            if g is None:
                out[d] = 1.0
                continue
            k = used[g] if sequences is None else min(used[g], sequences)
            out[d] = max(1.0, k / self.groups[g][1])
        return out

    def prefill(self, device: str, start: int, stop: int) -> float:
        p = self.prefill_prefix[device]
        return p[stop] - p[start]

    def memory(self, start: int, stop: int) -> int:
        return self.memory_prefix[stop] - self.memory_prefix[start]

    def link(self, src: str, dst: str) -> tuple[float, float]:
        """(bandwidth_bytes_s, latency_s) of src -> dst."""
        return self._links[(src, dst)]

    def hop(self, src: str, dst: str, last_unit: int, tokens: int = 1) -> float:
        bw, lat = self._links[(src, dst)]
        return tokens * self.activation[last_unit] / bw + lat

    def ret(self, last: str) -> float:
        if last == self.source:
            return 0.0
        bw, lat = self._links[(last, self.source)]
        return TOKEN_ID_BYTES / bw + lat

    # --- plans --------------------------------------------------------------------------------------
    def violations(self, stages: list[Stage] | tuple[Stage, ...], check_memory: bool = True) -> list[str]:
        """Every rule the plan breaks, in words; empty when valid: structure_violations (what any device run
        needs), constraint_violations (the testbed's [constraints]), then, when both pass, memory per stage."""
        if not stages:
            return ["the plan has no stages"]
        out = structure_violations(self.testbed, stages, self.n_units)
        out += constraint_violations(self.testbed, stages)
        if check_memory and not out:
            for s in stages:
                need, have = self.memory(s.start, s.stop), self.memory_limit[s.device]
                if need > have:
                    out.append(f"stage {s.device}[{s.start}, {s.stop}) needs {size_text(need)}, "
                               f"{s.device} holds {size_text(have)}")
        return out

    def evaluate(self, stages, workload: Workload = Workload(), check: bool = True) -> dict:
        """Predicted costs of a plan. With check=True an invalid plan raises PlanError naming every rule it breaks."""
        stages = tuple(stages)
        if check:
            bad = self.violations(stages)
            if bad:
                raise PlanError("invalid plan: " + "; ".join(bad))
        P, G, N = workload.prompt_tokens, workload.new_tokens, workload.sequences
        per_stage = []
        latency = prefill_total = 0.0
        bottleneck = 0.0
        servers, delay = [], 0.0  # the closed pipeline: stages and link transmissions; latencies
        devices = [s.device for s in stages]
        factor, factor_n = self.contention(devices), self.contention(devices, N)
        cap = 0.0  # the slowest pipelined stage with N sequences in flight, contention included
        for p, s in enumerate(stages):
            dec = self.decode(s.device, s.start, s.stop)
            pre = self.prefill(s.device, s.start, s.stop) * P
            piped = self.pipelined(s.device, s.start, s.stop)
            contended = piped * factor[s.device]
            entry = {"device": s.device, "start": s.start, "stop": s.stop, "decode_s": dec, "pipelined_s": piped,
                     "prefill_s": pre, "memory_bytes": self.memory(s.start, s.stop),
                     "memory_limit_bytes": self.memory_limit[s.device]}
            if s.device in self.group_of:
                entry["contention"], entry["contended_s"] = factor[s.device], contended
            latency += dec
            prefill_total += pre
            bottleneck = max(bottleneck, contended)
            cap = max(cap, piped * factor_n[s.device])
            servers.append(piped)
            if p + 1 < len(stages):
                nxt = stages[p + 1].device
                h1 = self.hop(s.device, nxt, s.stop - 1, 1)
                lat = self.link(s.device, nxt)[1]
                servers.append(h1 - lat)
                delay += lat
                hp = self.hop(s.device, nxt, s.stop - 1, P)
                entry["hop_s"], entry["hop_prefill_s"] = h1, hp
                latency += h1
                prefill_total += hp
                bottleneck = max(bottleneck, h1)
            per_stage.append(entry)
        r = self.ret(stages[-1].device)
        if r:
            lat = self.link(stages[-1].device, self.source)[1]
            servers.append(r - lat)
            delay += lat
        latency += r
        prefill_total += r
        bottleneck = max(bottleneck, r)
        rate = closed_pipeline_rate(servers, delay, N)
        shared = []
        for g, (members, cores) in enumerate(self.groups):
            on = [d for d in devices if self.group_of.get(d) == g]
            if on:
                shared.append({"devices": on, "cores": cores, "busy": min(len(on), N),
                               "factor": factor_n[on[0]], "factor_all_busy": factor[on[0]]})
        if any(f > 1.0 for f in factor_n.values()) and cap > 0:
            rate = min(rate, 1.0 / cap)  # at most `cores` of a group's busy stages compute at once
        out = {
            "latency_s": latency,
            "e2e_s": prefill_total + (G - 1) * latency,
            "prefill_s": prefill_total,
            "bottleneck_s": bottleneck,
            "throughput_tokens_per_s": (1.0 / bottleneck) if bottleneck > 0 else float("inf"),
            "sequences": workload.sequences,
            "pipeline_tokens_per_s": rate,
            "return_s": r,
            "stages": per_stage,
        }
        if shared:
            out["shared_cores"] = shared
        return out


# --- plan rules: the one rule set (CostModel.violations, the planner, the baselines and run/runtime.check_plan) ---
def structure_violations(testbed: Testbed, stages, n_units: int) -> list[str]:
    """The rules every executable plan obeys, in words (empty when it does): stages that are contiguous and cover
    units [0, n_units), the first on the source, each device in the testbed and holding one stage at most.
    Needs no profile: the runtime checks them with n_units of the model it runs (run/runtime.check_plan)."""
    if not stages:
        return ["the plan has no stages"]
    out = []
    if stages[0].device != testbed.source:
        out.append(f"the first stage runs on {stages[0].device!r}, not on the source {testbed.source!r} "
                   f"(the source holds the prompt and the embedding: start the plan there)")
    pos = 0
    for s in stages:
        if s.start != pos or s.stop <= s.start:
            out.append(f"stage {s.device}[{s.start}, {s.stop}) does not continue at unit {pos} "
                       f"(each stage starts where the previous one stopped and holds at least one unit)")
        pos = s.stop
    if pos != n_units:
        out.append(f"the stages end at unit {pos}, the model has {n_units} units (the last stage stops at {n_units})")
    names = [s.device for s in stages]
    for d in sorted({n for n in names if names.count(n) > 1}):
        out.append(f"device {d!r} holds more than one stage (one shard per device: merge them)")
    for d in dict.fromkeys(names):
        if d not in testbed.names:
            out.append(f"device {d!r} is not in testbed {testbed.name!r} (devices: {', '.join(testbed.names)})")
    return out


def constraint_violations(testbed: Testbed, stages) -> list[str]:
    """The testbed's [constraints] (exclude, require, max_stages) a plan breaks, in words. The planner searches
    under them; the runtime does not enforce them (a hand-made plan may use any device that is up)."""
    c = testbed.constraints
    names = [s.device for s in stages]
    out = [f"device {d!r} is excluded by the constraints (drop it from the plan or from [constraints] exclude)"
           for d in dict.fromkeys(names) if d in testbed.names and d in c.exclude]
    out += [f"required device {d!r} is not used (give it a stage or drop it from [constraints] require)"
            for d in c.require if d not in names]
    if c.max_stages is not None and len(stages) > c.max_stages:
        out.append(f"{len(stages)} stages exceed max_stages = {c.max_stages}")
    return out


def names_in_words(names) -> str:
    """'a', 'a and b', 'a, b and c'."""
    names = list(names)
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def unmodelled_sharing(cm: CostModel, stages, sequences: int) -> list[str]:
    """Why a pipeline prediction cannot hold, in words (empty when nothing is known against it): devices of the
    plan that the profile found on one machine (provenance "hosts", written by the profiler) where more of them
    compute at once than the machine has cores, while the testbed declares no [[shared_cores]] group holding
    them all, so the cost model charges nothing for it; or a group declared with more cores than that machine
    has. On an emulated testbed a throttled device needs only its cpu_share of a core; on a local one every
    device process wants a whole core (cpu_share is not enforced there)."""
    prov = cm.profile.provenance if isinstance(cm.profile.provenance, dict) else {}
    hosts = prov.get("hosts")
    if not isinstance(hosts, list):
        return []
    emulated = prov.get("testbed_mode") == "emulated"
    used = [s.device for s in stages]
    out = []
    for h in hosts:
        if not isinstance(h, dict) or not isinstance(h.get("devices"), list):
            continue
        on = [d for d in used if d in h["devices"]]
        busy = min(len(on), sequences)
        if busy < 2:
            continue
        cores = h.get("cores") if isinstance(h.get("cores"), (int, float)) else None
        where = f"{h.get('hostname') or 'one machine'}, {f'{cores:g} cores' if cores else 'cores unknown'}"
        groups = {cm.group_of.get(d) for d in on}
        if len(groups) == 1 and None not in groups:  # declared: the cost model charges it
            declared = cm.groups[groups.pop()][1]
            if cores is not None and declared > cores:
                out.append(f"the testbed declares {declared:g} shared cores for {names_in_words(on)}, but the "
                           f"machine they were profiled on ({where}) has {cores:g}: contention is charged too "
                           f"little (set cores = {cores:g} in its [[shared_cores]])")
            continue

        def need(d):
            share = cm.testbed.device(d).cpu_share if d in cm.testbed.names else None
            return share if emulated and share is not None and share < 1 else 1.0

        demand = sum(sorted((need(d) for d in on), reverse=True)[:busy])
        if cores is not None and demand <= cores + 1e-9:
            continue
        out.append(f"{names_in_words(on)} run on one machine ({where}) and the testbed declares no [[shared_cores]] "
                   f"for them: with {sequences} sequences in flight {busy} of them compute at once, "
                   f"{f'wanting {demand:g} of its {cores:g} cores' if cores else 'on cores they share'}, which this "
                   f"prediction does not charge (declare them: [[shared_cores]] devices = [...], cores = "
                   f"{f'{cores:g}' if cores else 'N'}; docs/formats.md)")
    return out


def objective_value(predicted: dict, objective: str) -> float:
    """The number an objective minimises."""
    return {"latency": predicted["latency_s"], "e2e": predicted["e2e_s"],
            "throughput": predicted["bottleneck_s"]}[objective]
