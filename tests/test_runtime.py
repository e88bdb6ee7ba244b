"""Lossless sharded generation over REAL local device servers (loopback, port 0), both modes.

Greedy token ids must equal single-process transformers generate exactly (EOS included, as generate stops),
and the last stage's logits must match the reference's within 1e-4, for 1 to 4 stages at arbitrary cuts.
"""

import json
import os
import threading
import time

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from edgeshard.config import catalog  # noqa: E402
from edgeshard.config import testbed as tbm
from edgeshard.config.errors import PlanError  # noqa: E402
from edgeshard.config.plan import Plan, Stage  # noqa: E402
from edgeshard.run import runtime
from edgeshard.testbeds import local as launch

M = pytest.importorskip("edgeshard.device.model")

TB = """
name = "rt-test"
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
[[device]]
name = "d3"
memory_gib = 4
[[link]]
src = "d0"
dst = "d1"
bandwidth_mbit_s = 200
latency_ms = 1
"""
PROMPTS = ["Hello, my name is", "The capital of France is", "1, 2, 3,"]


@pytest.fixture(scope="module")
def testbed(tmp_path_factory):
    d = tmp_path_factory.mktemp("rt")
    (d / "rt.toml").write_text(TB)
    tb = tbm.load(d / "rt.toml")
    with launch.local_testbed(tb, state_dir=d / "state") as state:
        yield tb, state, d


def make_plan(cuts, model):
    stages = tuple(Stage(f"d{i}", cuts[i], cuts[i + 1]) for i in range(len(cuts) - 1))
    return Plan("latency", "manual", stages, {}, model=model)


_refs = {}


def reference(model, prompt, n, chat=False):
    key = (model, prompt, n, chat)
    if key not in _refs:
        tok = M.load_tokenizer(model)
        if chat:
            ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                          tokenize=True)
            ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        else:
            ids = tok(prompt)["input_ids"]
        new, logits = M.reference_generate(model, ids, n)
        _refs[key] = (new, np.concatenate([lg.numpy() for lg in logits]))
    return _refs[key]


def check_lossless(result, model, prompts, n, chat=False):
    for r, p in zip(result["results"], prompts):
        ids, logits = reference(model, p, n, chat)
        assert r["token_ids"] == ids, f"prompt {p!r}"
        assert r["logits"].shape == logits.shape
        assert np.abs(r["logits"] - logits).max() < 1e-4
        assert r["text"] == M.load_tokenizer(model).decode(ids, skip_special_tokens=True)
        assert len(r["token_latency_s"]) == len(ids)


# tiny-llama has 4 layers: units 0..5
TINY_CUTS = [[0, 6], [0, 3, 6], [0, 1, 5, 6], [0, 2, 3, 4, 6], [0, 1, 2, 3, 6]]


@pytest.mark.parametrize("cuts", TINY_CUTS, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("mode", ["sequential", "pipeline"])
def test_tiny_llama_lossless(testbed, cuts, mode, tmp_path):
    tb, state, _ = testbed
    prompts = PROMPTS if mode == "pipeline" else PROMPTS[:2]
    n = 8
    res = runtime.run(tb, make_plan(cuts, "tiny-llama"), "tiny-llama", prompts, n, mode=mode, state=state,
                      run_dir=tmp_path / "run", debug_logits=True)
    check_lossless(res, "tiny-llama", prompts, n)
    s = res["summary"]
    assert s["n_tokens"] == n * len(prompts) and s["n_seqs"] == len(prompts)
    assert set(s["devices"]) == {f"d{i}" for i in range(len(cuts) - 1)}
    if len(cuts) > 2:  # activations went device to device, never via the controller
        assert set(s["links"]) >= {f"d{i}->d{i + 1}" for i in range(len(cuts) - 2)}
        assert f"d{len(cuts) - 2}->d0" in s["links"]  # the token id back to the source
        assert s["links"][f"d{len(cuts) - 2}->d0"]["bytes"] == n * len(prompts) * (72 + 8)


def test_pipeline_overlaps_sequences(testbed, tmp_path):
    """In pipeline mode a device works on one sequence while another is elsewhere in the ring."""
    tb, state, _ = testbed
    res = runtime.run(tb, make_plan([0, 2, 4, 6], "tiny-llama"), "tiny-llama", PROMPTS, 6, mode="pipeline",
                      state=state, run_dir=tmp_path / "run")
    events = [json.loads(x) for x in (tmp_path / "run" / "events.jsonl").read_text().splitlines()]
    comp = sorted((e["start_s"], e["end_s"], e["seq"]) for e in events if e["type"] == "compute")
    # some sequence starts a step before another sequence's step that began earlier has finished its round
    tokens = sorted((e["t_s"], e["seq"]) for e in events if e["type"] == "token")
    first_done = min(t for t, s in tokens if s == 0)
    assert any(s != 0 and st < first_done for st, _, s in comp)  # no sequence waits for seq 0 to finish


def test_step_probe_runs_its_steps_stops_and_leaves_the_device_usable(testbed):
    """measure_step (the profiler's step_overhead_s) is a ring through the device's own data path: it runs
    exactly warmup + steps computes, nothing keeps circulating after it returns, and a run afterwards is lossless."""
    from edgeshard.device import auth
    from edgeshard.device.client import DeviceClient, DeviceError

    tb, state, _ = testbed
    dev = state["devices"]["d1"]
    with DeviceClient("d1", dev["address"], dev["port"], auth.load_secret(state["token_file"])) as c:
        before = c.stats()["counters"]
        m = c.measure_step(576 * 4, latency_s=0.0005, steps=50, warmup=10, in_flight=4)
        after = c.stats()["counters"]
        time.sleep(0.3)
        later = c.stats()["counters"]
        with pytest.raises(DeviceError, match=r"steps, warmup and in_flight >= 1; got 5, 0, 2"):
            c.measure_step(576 * 4, steps=5, warmup=0, in_flight=2)
    assert m["steps"] == 50 and 0 < m["cpu_per_step_s"] and 0 < m["step_s"] < 0.05, m
    assert after["computes"] - before["computes"] == 60
    assert later == after, "frames still circulate after the probe"
    res = runtime.run(tb, make_plan([0, 2, 4, 6], "tiny-llama"), "tiny-llama", PROMPTS, 4, mode="pipeline",
                      state=state, write_run_dir=False, debug_logits=True)
    check_lossless(res, "tiny-llama", PROMPTS, 4)


def test_run_folder(testbed, tmp_path):
    tb, state, d = testbed
    seen = []
    res = runtime.run(tb, make_plan([0, 3, 6], "tiny-llama"), "tiny-llama", PROMPTS[:1], 4, state=state,
                      run_dir=tmp_path / "run", on_event=seen.append, seed=3)
    rd = tmp_path / "run"
    assert res["run_dir"] == str(rd)
    for f in ["testbed.toml", "plan.json", "parameters.json", "environment.json", "events.jsonl", "summary.json"]:
        assert (rd / f).is_file(), f
    lines = (rd / "events.jsonl").read_text().splitlines()
    assert len(lines) == len(seen) and json.loads(lines[0]) == seen[0]
    types = {e["type"] for e in seen}
    assert {"request", "compute", "send", "recv", "token", "seq_done"} <= types
    params = json.loads((rd / "parameters.json").read_text())
    assert params["model"] == "tiny-llama" and params["seed"] == 3 and params["max_new_tokens"] == 4
    env = json.loads((rd / "environment.json").read_text())
    assert {"python", "torch", "transformers", "rpyc", "git_sha", "hostname"} <= set(env)
    summary = json.loads((rd / "summary.json").read_text())
    assert summary["n_tokens"] == 4 and summary["results"][0]["token_ids"] == res["results"][0]["token_ids"]
    assert tbm.load(rd / "testbed.toml").name == tb.name
    # the d0 -> d1 link is shaped by the data plane to 200 Mbit/s + 1 ms: every hop takes at least that
    hop = summary["links"]["d0->d1"]
    assert hop["n"] == 4 and hop["transfer_s"] >= 4 * 0.001
    sends = [e for e in seen if e["type"] == "send" and e["peer"] == "d1"]
    recvs = {(e["seq"], e["step"]): e for e in seen if e["type"] == "recv" and e["peer"] == "d0"}
    for e in sends:
        assert recvs[(e["seq"], e["step"])]["end_s"] - e["start_s"] >= 0.001 + e["bytes"] / 25e6


def test_sampling_is_seeded(testbed):
    tb, state, _ = testbed
    plan = make_plan([0, 3, 6], "tiny-llama")
    kw = dict(state=state, write_run_dir=False, temperature=1.0, top_p=0.9)
    a = runtime.run(tb, plan, "tiny-llama", PROMPTS[:1], 6, seed=1, **kw)["results"][0]["token_ids"]
    b = runtime.run(tb, plan, "tiny-llama", PROMPTS[:1], 6, seed=1, **kw)["results"][0]["token_ids"]
    c = runtime.run(tb, plan, "tiny-llama", PROMPTS[:1], 6, seed=2, **kw)["results"][0]["token_ids"]
    assert a == b and a != c


def test_bad_plan_is_a_clear_error(testbed):
    tb, state, _ = testbed
    bad = Plan("latency", "manual", (Stage("d0", 0, 3), Stage("nope", 3, 6)), {})
    with pytest.raises(PlanError, match="'nope' is not in testbed 'rt-test'"):
        runtime.run(tb, bad, "tiny-llama", ["x"], 2, state=state, write_run_dir=False)
    with pytest.raises(PlanError, match="units"):
        runtime.run(tb, make_plan([0, 3, 5], "tiny-llama"), "tiny-llama", ["x"], 2, state=state,
                    write_run_dir=False)
    with pytest.raises(PlanError, match="source"):
        runtime.run(tb, Plan("latency", "m", (Stage("d1", 0, 6),), {}), "tiny-llama", ["x"], 2, state=state,
                    write_run_dir=False)


def test_notebook_run_streams_and_stops(testbed):
    tb, state, _ = testbed
    r = runtime.Run(tb, make_plan([0, 2, 6], "tiny-llama"), "tiny-llama", PROMPTS[:1], 1000, state=state,
                    write_run_dir=False).start()  # returns at once
    tokens = 0
    for ev in r:
        if ev["type"] == "token":
            tokens += 1
            if tokens == 5:
                r.stop()
    res = r.wait(60)
    assert res["stopped"] and 5 <= len(res["results"][0]["token_ids"]) < 1000
    # the devices really stopped: nothing queued, nothing running
    from edgeshard.device import auth
    from edgeshard.device.client import DeviceClient
    time.sleep(0.3)
    for name in ("d0", "d1"):
        d = state["devices"][name]
        with DeviceClient(name, d["address"], d["port"], auth.load_secret(state["token_file"])) as c:
            st = c.stats()
            assert st["queue"] == 0 and st["seqs"] == []
    # and the testbed still works afterwards
    res = runtime.run(tb, make_plan([0, 2, 6], "tiny-llama"), "tiny-llama", PROMPTS[:1], 3, state=state,
                      write_run_dir=False)
    assert res["results"][0]["token_ids"] == reference("tiny-llama", PROMPTS[0], 3)[0]


# --- real weights ------------------------------------------------------------------------------------------
SMOL_N = catalog.get("smollm2-135m").n_units  # 32


@pytest.mark.parametrize("cuts,mode", [([0, 32], "sequential"), ([0, 11, 25, 32], "sequential"),
                                       ([0, 1, 16, 31, 32], "pipeline")], ids=["1stage", "3stages", "4stages-pipe"])
def test_smollm2_lossless(testbed, cuts, mode):
    tb, state, _ = testbed
    prompts = PROMPTS[:2] if mode == "pipeline" else PROMPTS[:1]
    n = 6
    res = runtime.run(tb, make_plan(cuts, "smollm2-135m"), "smollm2-135m", prompts, n, mode=mode, state=state,
                      write_run_dir=False, debug_logits=True)
    check_lossless(res, "smollm2-135m", prompts, n)


def test_smollm2_stops_at_eos_like_generate(testbed):
    tb, state, _ = testbed
    prompt = "Reply with just the word yes."
    res = runtime.run(tb, make_plan([0, 16, 32], "smollm2-135m"), "smollm2-135m", [prompt], 24, state=state,
                      write_run_dir=False, debug_logits=True, chat=True)
    ids, _ = reference("smollm2-135m", prompt, 24, chat=True)
    r = res["results"][0]
    assert ids[-1] == 2 and len(ids) < 24  # the reference stopped at EOS (<|im_end|>)
    assert r["token_ids"] == ids and r["stop_reason"] == "eos"
    check_lossless(res, "smollm2-135m", [prompt], 24, chat=True)


def test_device_death_is_a_clear_error(tmp_path):
    tb = tbm.loads(TB.replace("rt-test", "rt-death"))
    with launch.local_testbed(tb, state_dir=tmp_path) as state:
        victim = state["devices"]["d1"]["pid"]
        r = runtime.Run(tb, make_plan([0, 3, 6], "tiny-llama"), "tiny-llama", ["Hello"], 100000, state=state,
                        write_run_dir=False)
        killer = threading.Thread(target=lambda: (r._done.wait(0) or _kill_after_tokens(r, victim)), daemon=True)
        r.start()
        killer.start()
        with pytest.raises(RuntimeError, match="device 'd1'"):
            r.wait(120)


def _kill_after_tokens(r, pid):
    n = 0
    for ev in r:
        if ev.get("type") == "token":
            n += 1
            if n == 3:
                os.kill(pid, 9)
                return


def test_reproduce_reruns_the_recorded_run(testbed, tmp_path, capsys):
    """A pipeline run with max_in_flight = 2, reproduced from its folder alone: the same settings (max_in_flight
    included) in the new folder's parameters.json, and the same token ids."""
    from edgeshard.run import reproduce
    from edgeshard.run.parameters import RunConfig

    tb, state, d = testbed
    rd = tmp_path / "run"
    runtime.run(tb, make_plan([0, 2, 6], "tiny-llama"), "tiny-llama", PROMPTS, 4, mode="pipeline", state=state,
                run_dir=rd, max_in_flight=2, seed=5)
    assert reproduce.main(rd, state_dir=d / "state") == 0
    assert "token ids identical" in capsys.readouterr().out
    first, second = (RunConfig.load(p / "parameters.json") for p in (rd, tmp_path / "run-reproduced"))
    assert second.max_in_flight == 2 and second.settings() == first.settings() and second.run_id != first.run_id
