"""The parts of a run without device servers: RunConfig (= parameters.json), the run-folder writer, the plan rules
the runtime shares with the cost model, and reproduce re-running every recorded setting (max_in_flight too).
The same parts over real devices: tests/test_runtime.py."""

import json
from pathlib import Path

import pytest

from edgeshard.config import testbed as tbm
from edgeshard.config.errors import ConfigError, PlanError
from edgeshard.config.plan import Plan, Stage
from edgeshard.config.profile import DeviceCosts, Profile, Unit
from edgeshard.planning.costs import CostModel, structure_violations
from edgeshard.run import reproduce, runtime
from edgeshard.run.folder import RunFolder
from edgeshard.run.parameters import RECORD_FIELDS, RunConfig

TB = """
name = "parts"
source = "d0"
[constraints]
exclude = ["d2"]
[[device]]
name = "d0"
memory_gib = 1
[[device]]
name = "d1"
memory_gib = 1
[[device]]
name = "d2"
memory_gib = 1
[[shared_cores]]
devices = ["d0", "d1"]
cores = "auto"
"""
# every setting away from its default, so a dropped one shows
RECORDED = RunConfig("tiny-llama", ["a", "b", "c"], 5, mode="pipeline", dtype="float16", temperature=0.7, top_p=0.9,
                     seed=11, chat=True, max_in_flight=2, debug_logits=True, command=["edgeshard", "run", "x"],
                     run_id="abc-123456", testbed="parts", testbed_state={"devices": {}})


def plan(*cuts, model="tiny-llama"):  # tiny-llama: 6 units
    return Plan("latency", "manual", tuple(Stage(f"d{i}", cuts[i], cuts[i + 1]) for i in range(len(cuts) - 1)), {},
                model=model)


def test_run_config_is_parameters_json_both_ways(tmp_path):
    RECORDED.save(tmp_path / "parameters.json")
    raw = json.loads((tmp_path / "parameters.json").read_text())
    assert set(raw) == {"model", "prompts", "max_new_tokens", "mode", "dtype", "temperature", "top_p", "seed", "chat",
                        "max_in_flight", "debug_logits", *RECORD_FIELDS}
    assert raw["prompts"] == ["a", "b", "c"] and raw["max_in_flight"] == 2
    assert RunConfig.load(tmp_path / "parameters.json") == RECORDED
    again = RECORDED.for_reproduction()
    assert again.settings() == RECORDED.settings() and all(getattr(again, k) is None for k in RECORD_FIELDS)


def test_run_config_refuses_what_it_cannot_run(tmp_path):
    assert RunConfig("m", "one prompt", 3).prompts == ("one prompt",)
    assert RunConfig("m", ["a", "b"], 3, max_in_flight=5).max_in_flight == 1  # sequential: one at a time
    assert RunConfig("m", ["a", "b", "c"], 3, mode="pipeline").in_flight == 3
    for kw, words in (({"mode": "batch"}, "mode 'batch'"), ({"max_new_tokens": 0}, "max_new_tokens"),
                      ({"prompts": []}, "at least one prompt"), ({"max_in_flight": 0}, "max_in_flight")):
        with pytest.raises(ValueError, match=words):
            RunConfig(**{"model": "m", "prompts": ["a"], "max_new_tokens": 3, **kw})
    (tmp_path / "p.json").write_text(json.dumps({**RECORDED.to_dict(), "max_inflight": 3}))
    with pytest.raises(ConfigError, match="p.json: unknown key.*max_inflight"):
        RunConfig.load(tmp_path / "p.json")
    (tmp_path / "p.json").write_text(json.dumps({"model": "m", "prompts": ["a"]}))
    with pytest.raises(ConfigError, match="missing key.*max_new_tokens"):
        RunConfig.load(tmp_path / "p.json")


def test_run_folder_freezes_auto_cores_and_writes_the_config(tmp_path):
    (tmp_path / "tb.toml").write_text(TB)
    tb = tbm.load(tmp_path / "tb.toml")
    folder = RunFolder(tmp_path / "run")
    folder.write_inputs(tb, plan(0, 3, 6), RECORDED)
    folder.append_event({"type": "token", "seq": 0})
    folder.close()
    text = (tmp_path / "run" / "testbed.toml").read_text()
    assert f"cores = {tbm.machine_cores()}" in text and "auto" not in text
    assert tbm.load(tmp_path / "run" / "testbed.toml").shared_cores == tb.shared_cores
    assert RunConfig.load(tmp_path / "run" / "parameters.json") == RECORDED
    assert (tmp_path / "run" / "events.jsonl").read_text() == '{"type":"token","seq":0}\n'
    assert not (tmp_path / "run" / "profile.json").exists()


def test_runtime_and_cost_model_share_the_plan_rules():
    tb = tbm.loads(TB)
    bad = Plan("latency", "manual", (Stage("d0", 0, 3), Stage("nope", 3, 6)), {}, model="tiny-llama")
    with pytest.raises(PlanError) as e:
        runtime.check_plan(tb, bad, "tiny-llama")
    assert structure_violations(tb, bad.stages, 6)[0] in str(e.value)
    assert "'nope' is not in testbed 'parts' (devices: d0, d1, d2)" in str(e.value)
    units = tuple(Unit(f"u{i}", 1000, 10, 100) for i in range(6))
    cm = CostModel(tb, Profile("tiny-llama", "float32", units, {d: DeviceCosts((0.001,) * 6, (0.001,) * 6)
                                                                   for d in ("d0", "d1")}))
    assert cm.violations(bad.stages)[0] == structure_violations(tb, bad.stages, 6)[0]  # the same words
    with pytest.raises(PlanError, match="model 'tiny-llama' has|the model has 6 units .the last stage stops at 6"):
        runtime.check_plan(tb, plan(0, 3, 5), "tiny-llama")
    with pytest.raises(PlanError, match="made for model 'smollm2-135m', not 'tiny-llama' .run 'smollm2-135m'"):
        runtime.check_plan(tb, plan(0, 3, 6, model="smollm2-135m"), "tiny-llama")
    # the planner's [constraints] are not the runtime's: a hand-made plan may use an excluded device
    on_excluded = Plan("latency", "manual", (Stage("d0", 0, 3), Stage("d2", 3, 6)), {})
    runtime.check_plan(tb, on_excluded, "tiny-llama")
    assert any("excluded by the constraints" in b for b in cm.violations(on_excluded.stages, check_memory=False))


def test_reproduce_runs_every_recorded_setting(tmp_path, monkeypatch, capsys):
    """reproduce reads parameters.json back as a RunConfig: max_in_flight and every other setting reach the new
    Run unchanged; only the record (run_id, command, testbed_state) is the new run's."""
    from edgeshard import testbeds

    (tmp_path / "tb.toml").write_text(TB)
    rd = tmp_path / "run"
    folder = RunFolder(rd)
    folder.write_inputs(tbm.load(tmp_path / "tb.toml"), plan(0, 3, 6), RECORDED)
    folder.close()
    results = [{"prompt": p, "token_ids": [1, 2]} for p in RECORDED.prompts]
    (rd / "summary.json").write_text(json.dumps({"tokens_per_s": 10.0, "results": results}))
    state = {"devices": {"d0": {}, "d1": {}}, "token_file": "t"}
    monkeypatch.setattr(testbeds, "find_state", lambda tb, state_dir=None: state)
    ran = []

    def run_sync(self):
        ran.append(self)
        self.folder.write_inputs(self.tb, self.plan, self.config)
        return {"results": results, "summary": {"tokens_per_s": 9.0}, "run_dir": str(self.run_dir)}

    monkeypatch.setattr(runtime.Run, "run_sync", run_sync)
    assert reproduce.main(rd) == 0
    (r,) = ran
    assert r.config.settings() == RECORDED.settings()
    assert r.config.max_in_flight == 2 and r.max_in_flight == 2 and r.mode == "pipeline"
    assert r.config.run_id != RECORDED.run_id and r.config.testbed_state == state
    assert r.config.command != RECORDED.command and r.config.testbed == "parts"
    again = RunConfig.load(Path(str(rd) + "-reproduced") / "parameters.json")
    assert again.settings() == RECORDED.settings() and again.run_id == r.config.run_id
    assert "token ids identical" in capsys.readouterr().out


def test_run_takes_a_config_and_fills_in_its_record(tmp_path):
    tb = tbm.loads(TB)
    r = runtime.Run.from_config(tb, plan(0, 3, 6), RECORDED.for_reproduction(), state={"devices": {}},
                                run_dir=tmp_path / "r")
    assert r.config.settings() == RECORDED.settings() and r.run_dir == (tmp_path / "r").resolve()
    assert r.config.testbed == "parts" and r.config.run_id and r.config.command
    r2 = runtime.Run(tb, plan(0, 3, 6), "tiny-llama", ["x", "y"], 4, mode="pipeline", max_in_flight=1,
                     write_run_dir=False)
    assert (r2.mode, r2.prompts, r2.max_in_flight, r2.run_dir) == ("pipeline", ["x", "y"], 1, None)
    assert r2.config.run_id != r.config.run_id
    with pytest.raises(ValueError, match="mode 'batch'"):
        runtime.Run(tb, plan(0, 3, 6), "tiny-llama", ["x"], 4, mode="batch")
