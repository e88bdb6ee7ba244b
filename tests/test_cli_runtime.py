"""The device-facing CLI end to end over real local device servers: testbed up, profile, plan, run --json,
report, reproduce, testbed status/exec/down. tiny-llama keeps it quick; tokens are checked against
single-process transformers generate."""

import json
import os
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
TB = """
name = "cli-test"
source = "a"
[defaults]
bandwidth_mbit_s = 500
latency_ms = 0.1
[constraints]
context_tokens = 64
[[device]]
name = "a"
memory_gib = 0.012
[[device]]
name = "b"
memory_gib = 0.012
[[device]]
name = "c"
memory_gib = 0.012
"""


def es(*args, cwd, check=True):
    env = dict(os.environ, HF_HUB_OFFLINE="1", EDGESHARD_HOME=str(cwd / "home"))
    r = subprocess.run([sys.executable, "-m", "edgeshard", *args], cwd=cwd, env=env, capture_output=True,
                       text=True, timeout=600)
    if check and r.returncode != 0:
        raise AssertionError(f"edgeshard {' '.join(args)} -> {r.returncode}\n{r.stdout}\n{r.stderr}")
    return r


def test_cli_round_trip(tmp_path):
    from edgeshard.device import model
    (tmp_path / "tb.toml").write_text(TB)
    sd = ["--state-dir", str(tmp_path / "state")]
    r = es("testbed", "up", "tb.toml", "--local", *sd, cwd=tmp_path)
    try:
        assert r.stdout.count("healthy") == 3, r.stdout
        st = json.loads(es("testbed", "status", "cli-test", "--json", *sd, cwd=tmp_path).stdout)
        assert set(st["devices"]) == {"a", "b", "c"} and all(d["healthy"] for d in st["devices"].values())
        assert es("testbed", "exec", "cli-test", "b", *sd, "--", sys.executable, "-c", "print('as-b')",
                  cwd=tmp_path).stdout.strip() == "as-b"
        # profile needs the state: point EDGESHARD_HOME's testbeds dir at it through --state-dir-less lookup
        env_state = tmp_path / "home" / "testbeds"
        env_state.parent.mkdir(exist_ok=True)
        env_state.symlink_to(tmp_path / "state")
        es("profile", "tb.toml", "--model", "tiny-llama", "--repeats", "2", "-o", "p.json", cwd=tmp_path)
        es("plan", "tb.toml", "p.json", "--objective", "throughput", "-o", "plan.json", cwd=tmp_path)
        plan = json.loads((tmp_path / "plan.json").read_text())
        assert len(plan["stages"]) >= 2  # 12.3 MiB each: tiny-llama's embedding and head are 12 MiB each in fp32
        out = json.loads(es("run", "tb.toml", "plan.json", "--model", "tiny-llama", "--prompt", "Hello there",
                            "--max-new-tokens", "6", "--json", *sd, cwd=tmp_path).stdout)
        tok = model.load_tokenizer("tiny-llama")
        ref, _ = model.reference_generate("tiny-llama", tok("Hello there")["input_ids"], 6)
        assert out["results"][0]["token_ids"] == ref
        run_dir = Path(out["run_dir"])
        for f in ("testbed.toml", "plan.json", "parameters.json", "environment.json", "events.jsonl", "summary.json"):
            assert (run_dir / f).exists(), f
        html = Path(es("report", str(run_dir), cwd=tmp_path).stdout.strip().splitlines()[-1])
        assert html.exists() and "Hello there" in html.read_text()
        rep = es("reproduce", str(run_dir), *sd, cwd=tmp_path)
        assert "token ids identical" in rep.stdout, rep.stdout
    finally:
        es("testbed", "down", "cli-test", *sd, cwd=tmp_path, check=False)
    r = es("testbed", "status", "cli-test", *sd, cwd=tmp_path, check=False)
    assert r.returncode == 1 and "not up" in r.stderr


def test_cli_errors_are_clear(tmp_path):
    (tmp_path / "tb.toml").write_text(TB)
    r = es("run", "tb.toml", "nope.json", "--model", "tiny-llama", "--prompt", "x", cwd=tmp_path, check=False)
    assert r.returncode != 0 and "nope.json" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "plan.json").write_text(json.dumps({"objective": "latency", "strategy": "x", "stages": []}))
    r = es("run", "tb.toml", "plan.json", "--model", "tiny-llama", "--prompt", "x", cwd=tmp_path, check=False)
    assert r.returncode != 0 and "not up" in r.stderr
    r = es("testbed", "exec", "cli-test", "a", cwd=tmp_path, check=False)
    assert r.returncode != 0 and "CMD" in r.stderr
