"""File formats: strict parsing with errors that name the file, the key and what to change; round trips."""

import json

import pytest

from edgeshard.config import plan as planm
from edgeshard.config import profile as prof
from edgeshard.config import testbed as tbm
from edgeshard.config.errors import ConfigError
from edgeshard.planning.synthetic import synthetic_profile

GOOD = """
name = "t"
source = "a"
cloud = "c"
[defaults]
bandwidth_mbit_s = 100
latency_ms = 1
[constraints]
context_tokens = 64
exclude = ["b"]
max_stages = 3
[[device]]
name = "a"
memory_gib = 2
kind = "jetson-orin-nx-16gb"
[[device]]
name = "b"
memory_gib = 1.5
kind = "jetson-agx-orin-32gb"
[[device]]
name = "c"
host = "10.0.0.3"
port = 18870
memory_gib = 4
kind = "rtx-3090-24gb"
[[link]]
src = "a"
dst = "c"
bandwidth_mbit_s = 10
latency_ms = 20
[[link]]
src = "b"
dst = "c"
bandwidth_mbit_s = 5
directed = true
"""


def test_good_testbed_units_converted_once():
    tb = tbm.loads(GOOD, "t.toml")
    assert tb.device("b").memory_bytes == int(1.5 * 2**30)
    assert tb.link("a", "c").bandwidth_bytes_s == 10e6 / 8 and tb.link("c", "a").latency_s == 0.02
    assert tb.link("b", "c").bandwidth_bytes_s == 5e6 / 8
    assert tb.link("c", "b").bandwidth_bytes_s == 100e6 / 8  # directed: the reverse uses the defaults
    assert tb.link("c", "b").latency_s == 0.001
    assert tb.constraints.exclude == ("b",) and tb.constraints.max_stages == 3 and tb.cloud == "c"


def test_dumps_round_trips():
    tb = tbm.loads(GOOD, "t.toml")
    again = tbm.loads(tbm.dumps(tb), "t.toml")
    assert again == tb


@pytest.mark.parametrize("edit, words", [
    (lambda s: s.replace('name = "t"', 'name = "t"\ncolour = "red"'), ["t.toml", "unknown key 'colour'"]),
    (lambda s: s.replace('source = "a"', 'source = "z"'), ["t.toml", "source = 'z'", "use one of"]),
    (lambda s: s.replace('memory_gib = 1.5', 'memory_gib = 0'), ["device 'b'", "memory_gib = 0", "greater than zero"]),
    (lambda s: s.replace('memory_gib = 1.5', 'memory_gib = -3'), ["device 'b'", "memory_gib = -3"]),
    (lambda s: s.replace('memory_gib = 1.5\n', ''), ["device 'b'", "missing required key 'memory_gib'"]),
    (lambda s: s.replace('dst = "c"\nbandwidth_mbit_s = 10', 'dst = "q"\nbandwidth_mbit_s = 10'), ["link[0]", "dst = 'q'"]),
    (lambda s: s.replace('bandwidth_mbit_s = 5', 'bandwidth_mbit_s = 0'), ["link[1]", "bandwidth_mbit_s = 0"]),
    (lambda s: s.replace('exclude = ["b"]', 'exclude = ["a"]'), ["exclude names the source"]),
    (lambda s: s.replace('max_stages = 3', 'max_stages = 0'), ["max_stages = 0"]),
    (lambda s: s.replace('context_tokens = 64', 'context_tokens = 6.5'), ["context_tokens = 6.5", "integer"]),
    (lambda s: s.replace('[[device]]\nname = "b"', '[[device]]\nname = "a"'), ["defined twice"]),
    (lambda s: s.replace('port = 18870', 'port = 70000'), ["port = 70000"]),
    (lambda s: s + "\n[[device]]\nname = ", ["not valid TOML"]),
    (lambda s: s.replace("[constraints]", "[constraints]\nmemory_headroom = 1.0"), ["memory_headroom = 1.0", "below 1"]),
])
def test_bad_testbed_names_file_key_and_fix(edit, words):
    with pytest.raises(ConfigError) as e:
        tbm.loads(edit(GOOD), "t.toml")
    for w in words:
        assert w in str(e.value)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read testbed file"):
        tbm.load(tmp_path / "nope.toml")


def test_profile_round_trip_and_strictness(tmp_path):
    tb = tbm.loads(GOOD, "t.toml")
    pr = synthetic_profile(tb, "tiny-llama")
    path = tmp_path / "p.json"
    pr.save(path)
    assert prof.load(path) == pr
    raw = json.loads(path.read_text())
    raw["devices"]["a"]["decode_s"] = raw["devices"]["a"]["decode_s"][:-1]
    with pytest.raises(ConfigError, match=r"devices\.a: decode_s has 5 entries, the profile has 6 units"):
        prof.from_dict(raw, "p.json")
    raw = json.loads(path.read_text())
    raw["units"][2]["weight_bytes"] = -1
    with pytest.raises(ConfigError, match=r"units\[2\]: weight_bytes = -1"):
        prof.from_dict(raw, "p.json")
    raw = json.loads(path.read_text())
    raw["units"][0]["flops"] = 3
    with pytest.raises(ConfigError, match="unknown key 'flops'"):
        prof.from_dict(raw, "p.json")
    raw = json.loads(path.read_text())
    raw["devices"]["a"]["step_overhead_s"] = -0.001
    with pytest.raises(ConfigError, match=r"devices\.a: step_overhead_s = -0.001 is not a non-negative number"):
        prof.from_dict(raw, "p.json")
    raw["devices"]["a"]["step_overhead_s"] = 0.002  # optional, default 0; kept on a round trip
    with_step = prof.from_dict(raw, "p.json")
    assert with_step.devices["a"].step_overhead_s == 0.002 and with_step.devices["b"].step_overhead_s == 0.0
    assert prof.from_dict(json.loads(with_step.dumps()), "again.json") == with_step
    raw = json.loads(path.read_text())
    raw["schema"] = 7
    with pytest.raises(ConfigError, match="schema = 7"):
        prof.from_dict(raw, "p.json")


def test_synthetic_profile_needs_kinds():
    tb = tbm.loads(GOOD.replace('kind = "jetson-agx-orin-32gb"\n', ''), "t.toml")
    with pytest.raises(ConfigError, match="device 'b'.*has no kind"):
        synthetic_profile(tb, "llama2-7b")
    tb = tbm.loads(GOOD.replace('kind = "jetson-agx-orin-32gb"', 'kind = "pi-zero"'), "t.toml")
    with pytest.raises(ConfigError, match="kind = 'pi-zero' is not known"):
        synthetic_profile(tb, "llama2-7b")


def test_catalog_unit_sizes_match_measured_reference():
    """Weight bytes agree with the H200 measurement file's layer_weight_bytes (an independent count)."""
    from pathlib import Path

    from edgeshard.config import catalog
    data = json.loads((Path(__file__).resolve().parents[1] / "docs" / "data" / "h200_llama2_layer_costs.json").read_text())
    for r in data["results"]:
        units = catalog.get(r["model"]).units(r["dtype"])
        norm = catalog.get(r["model"]).hidden * catalog.dtype_bytes(r["dtype"])
        assert units[1].weight_bytes == r["layer_weight_bytes"]
        assert units[-1].weight_bytes - norm == r["head_weight_bytes"]
    s = catalog.get("llama2-70b")
    assert s.units("float16")[1].kv_bytes_per_token == 2 * 8 * 128 * 2  # GQA: 8 KV heads of 128


def test_plan_json_is_byte_identical_and_round_trips(tmp_path):
    from edgeshard.planning import dp as planner
    tb = tbm.loads(GOOD, "t.toml")
    pr = synthetic_profile(tb, "tiny-llama")
    a = planner.solve(tb, pr, "latency").dumps()
    b = planner.solve(tbm.loads(GOOD, "t.toml"), synthetic_profile(tb, "tiny-llama"), "latency").dumps()
    assert a == b
    p = tmp_path / "plan.json"
    p.write_text(a)
    assert planm.load(p).dumps() == a
    with pytest.raises(ConfigError, match="missing required key 'stages'"):
        planm.from_dict({"objective": "latency", "strategy": "x"}, "plan.json")


def test_plan_status_is_data_and_old_files_load():
    from edgeshard.config import plan as planm
    p = planm.Plan("latency", "even", (planm.Stage("a", 0, 2),), {}, notes=("OOM: ...",), status="oom",
                   reasons=("stage a[0, 2) needs 2.00 GiB, a holds 1.00 GiB",))
    back = planm.from_dict(json.loads(p.dumps()))
    assert back == p and back.status == "oom" and not back.feasible and back.reasons == p.reasons
    old = {k: v for k, v in p.to_dict().items() if k not in ("status", "reasons")}  # written before the fields
    assert planm.from_dict(old).status == "infeasible" and planm.from_dict({"stages": []}).status == "feasible"
    with pytest.raises(ConfigError, match="status") as e:
        planm.from_dict({**p.to_dict(), "status": "feasible"})  # contradicts feasible = false
    assert (e.value.key, e.value.file) == ("status", "<plan>")


def test_config_error_fields_name_the_place():
    text = 'name = "t"\nsource = "a"\n[[device]]\nname = "a"\nmemory_gib = 1\n[[device]]\nname = "b"\nport = "x"\n'
    with pytest.raises(ConfigError) as e:
        tbm.loads(text, "t.toml")
    assert str(e.value) == "t.toml: device 'b': port = 'x' is not an integer (set port to an integer)"
    assert (e.value.file, e.value.section, e.value.index, e.value.key) == ("t.toml", "device", 1, "port")
