"""Device servers as real processes on loopback: launch, authenticated control and data planes, refusals."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest
import rpyc

from edgeshard.config import testbed as tbm
from edgeshard.device import auth, wire
from edgeshard.device.client import DeviceClient, DeviceError
from edgeshard.testbeds import local as launch

TB = """
name = "svc-test"
source = "a"
[defaults]
bandwidth_mbit_s = 100
latency_ms = 2
[[device]]
name = "a"
memory_gib = 1
[[device]]
name = "b"
memory_gib = 1
cpu_share = 0.5
[[link]]
src = "a"
dst = "b"
bandwidth_mbit_s = 40
latency_ms = 5
"""


@pytest.fixture(scope="module")
def up(tmp_path_factory):
    d = tmp_path_factory.mktemp("tb")
    (d / "svc.toml").write_text(TB)
    tb = tbm.load(d / "svc.toml")
    with launch.local_testbed(tb, state_dir=d / "state") as state:
        yield tb, state


def client(state, name, secret=None):
    dev = state["devices"][name]
    return DeviceClient(name, dev["address"], dev["port"], secret or auth.load_secret(state["token_file"]))


def test_state_file_records_everything(up):
    tb, state = up
    saved = json.loads(launch.state_path(tb.name, state["state_dir"]).read_text())
    assert saved["mode"] == "local" and saved["token_file"] == state["token_file"]
    assert (os.stat(state["token_file"]).st_mode & 0o777) == 0o600
    assert set(saved["devices"]) == {"a", "b"}
    for name, d in saved["devices"].items():
        assert d["address"] == "127.0.0.1" and d["port"] > 0 and d["data_port"] > 0 and d["healthy"]
        assert launch.pid_alive(d["pid"])
    assert saved["devices"]["b"]["cpu_share"] == 0.5 and saved["devices"]["a"]["memory_gib"] == 1
    ab = [lk for lk in saved["links"] if (lk["src"], lk["dst"]) == ("a", "b")][0]
    assert ab == {"src": "a", "dst": "b", "bandwidth_mbit_s": 40, "latency_ms": 5, "bandwidth_by": "app",
                  "latency_by": "app"}
    assert len(saved["links"]) == 2
    st = launch.status(tb.name, state["state_dir"])
    assert all(d["healthy"] for d in st["devices"].values())


def test_authenticated_control_calls(up):
    _, state = up
    with client(state, "a") as c:
        assert c.ping()["name"] == "a"
        info = c.info()
        assert info["pid"] == state["devices"]["a"]["pid"]
        assert info["data_port"] == state["devices"]["a"]["data_port"]
        assert info["omp_num_threads"] == "1"
        assert info["memory_bytes"] == 2**30
        assert c.stats()["queue"] == 0


def test_wrong_token_is_refused(up):
    _, state = up
    with pytest.raises(DeviceError, match="refused"):
        client(state, "a", secret=b"wrong-wrong-wrong-wrong-wrong")


def test_plain_rpyc_gets_nothing_but_a_refusal(up):
    _, state = up
    port = state["devices"]["a"]["port"]
    with pytest.raises(Exception):
        conn = rpyc.connect("127.0.0.1", port, config={"sync_request_timeout": 10})
        conn.root.ping()
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(b"GET / HTTP/1.0\r\n\r\n")
    data = b""
    while chunk := s.recv(4096):
        data += chunk
    s.close()
    assert data == auth.REFUSAL


def test_data_plane_refuses_without_token(up):
    _, state = up
    port = state["devices"]["b"]["data_port"]
    with pytest.raises(auth.AuthError, match="refused"):
        wire.dial("127.0.0.1", port, b"wrong-wrong-wrong-wrong-wrong", {"from": "x"})
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(wire.pack_header(wire.ACT, 0, 0, 0, wire.FLOAT32, (1, 1, 4), 16) + bytes(16))
    data = b""
    while chunk := s.recv(4096):
        data += chunk
    s.close()
    assert data == auth.REFUSAL


def test_link_probe_sees_the_shaping(up):
    """Device a measures its link to b over the data plane, through the shaping the runtime configures."""
    _, state = up
    from edgeshard.run.runtime import shaping_for

    with client(state, "a") as a:
        a.set_links(shaping_for(state, "a"))
        b = state["devices"]["b"]
        m = a.measure_link("b", b["address"], b["data_port"], pings=5, target_s=0.3)
    assert m["one_way_s"] >= 0.005  # never faster than the configured 5 ms
    assert m["rtt_s"] >= 0.005  # b has no shaping configured: only a -> b is delayed
    assert m["bandwidth_bytes_s"] <= 40e6 / 8 * 1.02


def test_serve_cli_help():
    out = subprocess.run([sys.executable, "-m", "edgeshard.device.service", "--help"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and "--token-file" in out.stdout and "--host" in out.stdout


def test_down_stops_exactly_its_processes(tmp_path):
    tb = tbm.loads(TB.replace("svc-test", "svc-down"))
    tb = tb.replace(devices=tuple(d.__class__(d.name, d.memory_bytes, "127.0.0.1", 0) for d in tb.devices))
    state = launch.up_local(tb, tmp_path)
    pids = [d["pid"] for d in state["devices"].values()]
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with pytest.raises(RuntimeError, match="already up"):
            launch.up_local(tb, tmp_path)
        # a dead device is reported by status and surfaces as a clear error to a client
        os.kill(pids[1], 9)
        time.sleep(0.5)
        st = launch.status(tb.name, tmp_path)
        assert st["devices"]["a"]["healthy"] and not st["devices"]["b"]["healthy"]
        with pytest.raises(DeviceError, match="'b'"):
            client(state, "b")
        res = launch.down(tb.name, tmp_path)
        assert set(res["stopped"]) <= set(pids)
        assert not any(launch.pid_alive(p) for p in pids)
        assert bystander.poll() is None  # untouched
        assert launch.find_state(tb, tmp_path) is None
    finally:
        bystander.kill()
        bystander.wait()
