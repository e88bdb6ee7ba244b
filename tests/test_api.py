"""The public API (`import edgeshard as es`, docs/api.md) on real local device servers: a Lab's life cycle, profile,
plan, run, diff and reproduce; shipped testbeds by name; a kernel that dies takes its device servers with it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

import edgeshard as es

pytestmark = pytest.mark.slow


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_import_loads_no_heavy_dependency():
    code = "import sys, edgeshard as es; es.load_testbed('local'); print([m for m in ('torch', 'bokeh', 'rpyc') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_shipped_testbeds_by_name_and_a_clear_error():
    assert es.load_testbed("local").name == "local"
    assert len(es.load_testbed("paper-edge").devices) == 15
    with pytest.raises(es.ConfigError, match="no such testbed.*local"):
        es.load_testbed("no-such-testbed")


def test_lab_profile_plan_run_reproduce(tmp_path):
    runs = tmp_path / "runs"
    with es.Lab("local", state_dir=tmp_path / "state") as lab:
        assert lab.is_up and set(lab.status().values()) == {"healthy"}
        prof = lab.profile("tiny-llama", progress=False, repeats=1)
        assert prof.model == "tiny-llama" and sorted(prof.devices) == ["edge-0", "edge-1", "edge-2"]
        lat, thr = lab.plan("latency"), lab.plan("throughput")
        assert lat.predicted["latency_s"] <= thr.predicted["latency_s"] + 1e-12
        assert "A: edgeshard/latency  ->  B: edgeshard/throughput" in str(es.diff(lat, thr))
        solo = lab.plan("latency", strategy="edge-solo")
        assert [s.device for s in solo.stages] == ["edge-0"]
        run = lab.run(["Hello there"], plan=lat, max_new_tokens=6, runs_dir=runs)
        result = run.wait(timeout=300)
        assert run.status == "done" and len(result["results"][0]["token_ids"]) == 6
        assert (run.run_dir / "summary.json").is_file() and run.report().path.is_file()
        again = lab.reproduce(run.run_dir)
        assert again.same, str(again)
    assert not lab.is_up


def test_run_down_after_brings_the_testbed_down(tmp_path):
    lab = es.Lab("local", state_dir=tmp_path / "state")
    lab.profile("tiny-llama", progress=False, repeats=1)
    run = lab.run(["Hi"], plan=lab.plan("latency"), max_new_tokens=4, runs_dir=tmp_path / "runs", down_after=True)
    run.wait(timeout=300)
    assert not lab.is_up and "testbed: <span class=\"es-testbed\">down" in run.line.value


def test_a_killed_kernel_takes_its_device_servers_with_it(tmp_path):
    """No atexit runs when a kernel is SIGKILLed: the servers a Lab started get SIGTERM from the kernel itself."""
    code = ("import json, os, sys, edgeshard as es\n"
            f"lab = es.Lab('local', state_dir={str(tmp_path / 'state')!r}).up()\n"
            "print(json.dumps([d['pid'] for d in lab.state['devices'].values()]), flush=True)\n"
            "sys.stdin.read()\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    pids = json.loads(p.stdout.readline())
    assert len(pids) == 3 and all(_alive(x) for x in pids)
    os.kill(p.pid, signal.SIGKILL)
    p.wait(30)
    deadline = time.monotonic() + 30
    while any(_alive(x) for x in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(x) for x in pids), "device servers outlived their kernel"


def test_token_id_prompts_run(tmp_path):
    """Random-weight models have no tokenizer: a prompt may be a list of token ids (and is recorded as one)."""
    with es.Lab("local", state_dir=tmp_path / "state") as lab:
        lab.profile("tiny-llama", progress=False, repeats=1)
        run = lab.run([[1, 2, 3]], plan=lab.plan("latency"), max_new_tokens=3, runs_dir=tmp_path / "runs")
        result = run.wait(timeout=300)
    assert len(result["results"][0]["token_ids"]) == 3
    assert json.loads((run.run_dir / "parameters.json").read_text())["prompts"] == [[1, 2, 3]]
