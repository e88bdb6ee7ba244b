"""No tracebacks: every `edgeshard` subcommand, given bad input, exits non-zero with one line on stderr that names
the file, key, value or device (and what to do). Each case runs the real command in a subprocess.

The cases that start device servers (testbed already up, a device killed mid-run) are marked slow.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

TB = """
name = "err"
source = "s"
cloud = "c"
[[device]]
name = "s"
memory_gib = 8
kind = "jetson-orin-nx-16gb"
[[device]]
name = "c"
memory_gib = 22
kind = "rtx-3090-24gb"
"""
NO_CLOUD = TB.replace('cloud = "c"\n', "")


def es(*args, cwd, env=None, timeout=300):
    """Run `python -m edgeshard ARGS` (EDGESHARD_DEBUG unset: what a user sees)."""
    e = {k: v for k, v in os.environ.items() if k != "EDGESHARD_DEBUG"}
    e.update(HF_HUB_OFFLINE="1", **(env or {}))
    return subprocess.run([sys.executable, "-m", "edgeshard", *map(str, args)], cwd=cwd, env=e, capture_output=True,
                          text=True, timeout=timeout)


def one_line_error(r, *names) -> str:
    """Non-zero exit, no traceback, stderr exactly one line naming each of names; returns the line."""
    assert r.returncode != 0, f"exit 0\n{r.stdout}\n{r.stderr}"
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, f"stderr is not one line:\n{r.stderr}"
    for n in names:
        assert str(n) in lines[0], f"{n!r} not named in: {lines[0]}"
    return lines[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A testbed (with and without a cloud), a synthetic llama2-7b profile, and broken files of each kind."""
    from edgeshard.config import testbed as tbm
    from edgeshard.planning.synthetic import synthetic_profile

    d = tmp_path_factory.mktemp("bad-input")
    (d / "tb.toml").write_text(TB)
    (d / "nocloud.toml").write_text(NO_CLOUD)
    (d / "garbled.toml").write_text('name = "x"\nsource = \n')
    (d / "unknown-key.toml").write_text(TB + "\nbandwith_mbit_s = 10\n")
    synthetic_profile(tbm.loads(TB, "tb.toml"), "llama2-7b").save(d / "p.json")
    (d / "garbled.json").write_text('{"stages": [')
    (d / "plan.json").write_text(json.dumps({"stages": [{"device": "s", "start": 0, "stop": 8},
                                                        {"device": "c", "start": 8, "stop": 34}]}))
    (d / "plan-unknown-key.json").write_text(json.dumps({"stages": [{"device": "s", "start": 0, "stop": 34}],
                                                         "stratgy": "manual"}))
    (d / "plan-bad-stage.json").write_text(json.dumps({"stages": [{"device": "s", "start": 0, "stop": "all"}]}))
    (d / "plan-bad-objective.json").write_text(json.dumps({"stages": [{"device": "s", "start": 0, "stop": 34}],
                                                           "objective": "speed"}))
    (d / "plan-small.json").write_text(json.dumps({"stages": [{"device": "s", "start": 0, "stop": 6}]}))
    (d / "rundir").mkdir()
    (d / "rundir" / "plan.json").write_text("{")
    return d


# (id, argv, what stderr must name); paths are relative to the files fixture's folder
CASES = [
    ("plan-unknown-strategy", ["plan", "tb.toml", "p.json", "--strategy", "fastest"], ["--strategy", "'fastest'"]),
    ("plan-unknown-objective", ["plan", "tb.toml", "p.json", "--objective", "speed"], ["--objective", "'speed'"]),
    ("plan-missing-testbed", ["plan", "missing.toml", "p.json"], ["missing.toml"]),
    ("plan-garbled-testbed", ["plan", "garbled.toml", "p.json"], ["garbled.toml", "TOML"]),
    ("plan-unknown-testbed-key", ["plan", "unknown-key.toml", "p.json"], ["unknown-key.toml", "bandwith_mbit_s"]),
    ("plan-garbled-profile", ["plan", "tb.toml", "garbled.json"], ["garbled.json", "JSON"]),
    ("plan-from-garbled", ["plan", "tb.toml", "p.json", "--from", "garbled.json"], ["garbled.json", "JSON"]),
    ("plan-from-unknown-key", ["plan", "tb.toml", "p.json", "--from", "plan-unknown-key.json"],
     ["plan-unknown-key.json", "'stratgy'"]),
    ("plan-from-bad-stage", ["plan", "tb.toml", "p.json", "--from", "plan-bad-stage.json"],
     ["plan-bad-stage.json", "stages[0].stop", "'all'"]),
    ("plan-from-bad-objective", ["plan", "tb.toml", "p.json", "--from", "plan-bad-objective.json"],
     ["plan-bad-objective.json", "objective", "'speed'"]),
    ("plan-from-with-strategy", ["plan", "tb.toml", "p.json", "--from", "plan.json", "--strategy", "even"],
     ["--strategy", "--from"]),
    ("plan-bad-workload", ["plan", "tb.toml", "p.json", "--prompt-tokens", "0"], ["prompt_tokens", "0"]),
    ("plan-diff-missing", ["plan-diff", "plan.json", "missing.json"], ["missing.json"]),
    ("plan-diff-garbled", ["plan-diff", "garbled.json", "plan.json"], ["garbled.json", "JSON"]),
    ("plan-diff-unknown-key", ["plan-diff", "plan.json", "plan-unknown-key.json"], ["plan-unknown-key.json", "'stratgy'"]),
    ("plan-diff-other-model", ["plan-diff", "plan.json", "plan-small.json"], ["plan.json", "plan-small.json", "34", "6", "different models"]),
    ("compare-no-cloud", ["compare", "nocloud.toml", "--models", "llama2-7b"], ["nocloud.toml", "cloud"]),
    ("compare-unknown-model", ["compare", "tb.toml", "--models", "gpt-5"], ["'gpt-5'"]),
    ("compare-missing-testbed", ["compare", "missing.toml"], ["missing.toml"]),
    ("profile-unknown-model", ["profile", "tb.toml", "--model", "gpt-5", "--synthetic"], ["'gpt-5'"]),
    ("profile-garbled-testbed", ["profile", "garbled.toml", "--model", "llama2-7b", "--synthetic"], ["garbled.toml"]),
    ("profile-testbed-not-up", ["profile", "tb.toml", "--model", "tiny-llama"], ["tb.toml", "not up", "testbed up"]),
    ("serve-unknown-flag", ["serve", "--prot", "1"], ["--prot"]),
    ("serve-missing-token-file", ["serve", "--port", "0", "--token-file", "missing.token"], ["missing.token"]),
    ("testbed-unknown-action", ["testbed", "start", "tb.toml"], ["'start'"]),
    ("testbed-up-missing", ["testbed", "up", "missing.toml", "--local"], ["missing.toml"]),
    ("testbed-up-garbled", ["testbed", "up", "garbled.toml", "--local"], ["garbled.toml", "TOML"]),
    ("testbed-status-not-up", ["testbed", "status", "err"], ["err", "not up"]),
    ("testbed-exec-not-up", ["testbed", "exec", "err", "s", "--", "true"], ["err", "not up"]),
    ("run-missing-plan", ["run", "tb.toml", "missing.json", "--model", "tiny-llama", "--prompt", "x"], ["missing.json"]),
    ("run-garbled-plan", ["run", "tb.toml", "garbled.json", "--model", "tiny-llama", "--prompt", "x"],
     ["garbled.json", "JSON"]),
    ("run-unknown-mode", ["run", "tb.toml", "plan.json", "--model", "tiny-llama", "--prompt", "x", "--mode", "fast"],
     ["--mode", "'fast'"]),
    ("run-testbed-not-up", ["run", "tb.toml", "plan.json", "--model", "tiny-llama", "--prompt", "x"],
     ["tb.toml", "not up", "testbed up"]),
    ("report-missing", ["report", "no-such-run"], ["no-such-run"]),
    ("report-not-a-folder", ["report", "garbled.json"], ["garbled.json", "not a run folder"]),
    ("report-unwritable-output", ["report", "rundir", "-o", "no-such-dir/r.html"], ["no-such-dir/r.html"]),
    ("reproduce-missing", ["reproduce", "no-such-run"], ["no-such-run"]),
    ("reproduce-garbled", ["reproduce", "garbled.json"], ["garbled.json"]),
    ("prepare-unknown-model", ["prepare", "gpt-5"], ["'gpt-5'"]),
]


def test_every_subcommand_is_covered():
    """Each subcommand `edgeshard --help` lists (and `prepare`, dispatched before the parser) has at least one
    bad-input case here."""
    r = subprocess.run([sys.executable, "-m", "edgeshard", "--help"], capture_output=True, text=True, cwd=ROOT)
    listed = set(re.search(r"\{([a-z,-]+)\}", r.stdout).group(1).split(","))
    covered = {argv[0] for _, argv, _ in CASES}
    assert {"plan", "plan-diff", "compare", "profile", "serve", "testbed", "run", "report", "reproduce"} <= listed
    assert listed | {"prepare"} <= covered, (listed | {"prepare"}) - covered
    assert {argv[1] for _, argv, _ in CASES if argv[0] == "testbed"} >= {"up", "status", "exec"}


@pytest.mark.parametrize("argv,names", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_without_traceback(files, argv, names, tmp_path):
    r = es(*argv, cwd=files, env={"EDGESHARD_HOME": str(tmp_path / "home")}, timeout=120)
    one_line_error(r, *names)
    assert r.returncode in (1, 2), r.returncode


def test_debug_env_shows_the_traceback(files):
    r = es("plan-diff", "garbled.json", "plan.json", cwd=files, env={"EDGESHARD_DEBUG": "1"})
    assert r.returncode != 0 and "Traceback" in r.stderr and "garbled.json" in r.stderr


def test_serve_on_a_port_in_use(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = es("serve", "--port", port, cwd=tmp_path, env={"EDGESHARD_HOME": str(tmp_path / "home")}, timeout=120)
    line = one_line_error(r, f"--port {port}", f"127.0.0.1:{port}", "in use")
    assert r.returncode == 1, line


# --- with device servers --------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def local_testbed(tmp_path_factory):
    """testbed_configs/local.toml with free ports, under a temporary EDGESHARD_HOME, brought up --local; and
    slow links (5 ms) so that a long run takes seconds. Yields (folder, env, status dict)."""
    d = tmp_path_factory.mktemp("local-testbed")
    text = (ROOT / "testbed_configs" / "local.toml").read_text()
    text = text.replace('name = "local"', 'name = "errs-local"').replace("latency_ms = 0.2", "latency_ms = 5")
    for old in re.findall(r"port = \d+", text):
        text = text.replace(old, f"port = {_free_port()}", 1)
    (d / "tb.toml").write_text(text)
    env = {"EDGESHARD_HOME": str(d / "home")}
    r = es("testbed", "up", "tb.toml", "--local", cwd=d, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    try:
        st = json.loads(es("testbed", "status", "errs-local", "--json", cwd=d, env=env).stdout)
        yield d, env, st
    finally:
        es("testbed", "down", "errs-local", cwd=d, env=env)


@pytest.mark.slow
def test_testbed_already_up(local_testbed):
    d, env, st = local_testbed
    r = es("testbed", "up", "tb.toml", "--local", cwd=d, env=env)
    one_line_error(r, "errs-local", "already up", "testbed down")
    again = json.loads(es("testbed", "status", "errs-local", "--json", cwd=d, env=env).stdout)
    assert {n: v["pid"] for n, v in again["devices"].items()} == {n: v["pid"] for n, v in st["devices"].items()}
    assert all(v["healthy"] for v in again["devices"].values())  # the second `up` left the running one alone


@pytest.mark.slow
def test_device_killed_mid_run(local_testbed):
    """SIGKILL the middle device while `edgeshard run` generates: the run ends non-zero within a bound, with one
    error line naming the device and no traceback. The plan is hand-written (only stages)."""
    d, env, st = local_testbed
    (d / "hand.json").write_text(json.dumps({"stages": [{"device": "edge-0", "start": 0, "stop": 1},
                                                        {"device": "edge-1", "start": 1, "stop": 5},
                                                        {"device": "edge-2", "start": 5, "stop": 6}]}))
    run_dir = d / "run"
    e = {k: v for k, v in os.environ.items() if k != "EDGESHARD_DEBUG"}
    e.update(HF_HUB_OFFLINE="1", **env)
    p = subprocess.Popen([sys.executable, "-m", "edgeshard", "run", "tb.toml", "hand.json", "--model", "tiny-llama",
                          "--prompt", "Hello there", "--max-new-tokens", "1500", "--run-dir", str(run_dir)],
                         cwd=d, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        events = run_dir / "events.jsonl"
        while True:  # generating: tokens are coming back
            assert p.poll() is None, f"the run ended before the kill: {p.returncode}\n{p.communicate()}"
            if events.exists() and events.read_text().count('"token"') >= 20:
                break
            assert time.monotonic() < deadline, "no tokens within 240 s"
            time.sleep(0.1)
        os.kill(st["devices"]["edge-1"]["pid"], signal.SIGKILL)
        t0 = time.monotonic()
        out, err = p.communicate(timeout=120)
        took = time.monotonic() - t0
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert p.returncode != 0, out
    assert "Traceback" not in err, err
    errors = [ln for ln in err.splitlines() if ln.startswith("edgeshard: error:")]
    assert len(errors) == 1, err
    assert "edge-1" in errors[0], errors[0]
    assert took < 120
