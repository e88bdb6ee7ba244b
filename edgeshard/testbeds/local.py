"""The local testbed: one device server process per testbed device on loopback (`edgeshard testbed up --local`).

State file STATE_DIR/<testbed name>.json, written as processes start (so `down` finds them even after a crash):
  {"mode": "local", "testbed": path of the testbed TOML, "token_file": path, "state_dir": ..., "started_s": ...,
   "devices": {name: {"address", "port", "data_port", "pid", "cpu_share", "memory_gib", "healthy", "log"}},
   "links": [{"src", "dst", "bandwidth_mbit_s", "latency_ms", "bandwidth_by": "app", "latency_by": "app"}]}
"bandwidth_by"/"latency_by" say who enforces a link property: "app" = the device's data plane shaping
(wire.Link), "tc" = the kernel (emulate.py). Local processes share the machine's cores: cpu_share is recorded,
not enforced (use the emulated testbed for compute shares). STATE_DIR defaults to $EDGESHARD_HOME/testbeds or
~/.cache/edgeshard/testbeds.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from edgeshard.config import paths
from edgeshard.config import testbed as tbm
from edgeshard.device import auth

READY = re.compile(r"edgeshard serve: device (\S+) control ([\d.]+):(\d+) data ([\d.]+):(\d+) pid (\d+) ready")
LOCAL_HOST = "127.0.0.1"
_children: dict[int, subprocess.Popen] = {}  # processes this Python process started (to reap them)


def default_state_dir() -> Path:
    return paths.home() / "testbeds"


def state_path(name: str, state_dir: str | Path | None = None) -> Path:
    return Path(state_dir or default_state_dir()) / f"{name}.json"


def write_state(path: Path, state: dict) -> None:
    """The testbed state file, written atomically (a crash leaves the old one): both kinds of testbed use this."""
    paths.atomic_write_text(path, json.dumps(state, indent=1, sort_keys=True) + "\n")


def load_state(name: str, state_dir: str | Path | None = None) -> dict | None:
    p = state_path(name, state_dir)
    if not p.exists():
        return None
    return json.loads(p.read_text())


def find_state(testbed, state_dir: str | Path | None = None) -> dict | None:
    """The state of a testbed that is up (local or emulated), or None."""
    name = testbed if isinstance(testbed, str) else testbed.name
    return load_state(name, state_dir)


def _as_testbed(testbed) -> tbm.Testbed:
    return tbm.as_testbed(testbed)


def pid_alive(pid: int, token_file: str | None = None) -> bool:
    """Is pid a running edgeshard device server (of this testbed, when token_file is given)?"""
    if pid in _children and _children[pid].poll() is not None:
        return False
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    if stat.rsplit(")", 1)[-1].split()[0] == "Z":  # zombie
        return False
    text = [c.decode(errors="replace") for c in cmd]
    if not any("edgeshard" in c for c in text):
        return False
    return token_file is None or token_file in text


def links_of(tb: tbm.Testbed, by: str = "app") -> list[dict]:
    out = []
    for a in tb.names:
        for b in tb.names:
            if a != b:
                lk = tb.link(a, b)
                out.append({"src": a, "dst": b, "bandwidth_mbit_s": lk.bandwidth_mbit_s,
                            "latency_ms": lk.latency_s * 1000, "bandwidth_by": by, "latency_by": by})
    return out


def _die_with_parent() -> None:
    """preexec_fn: the kernel sends SIGTERM to this child when the thread that started it exits (prctl
    PR_SET_PDEATHSIG), so a notebook kernel that is killed takes its device servers with it."""
    import ctypes
    PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def up_local(testbed, state_dir: str | Path | None = None, timeout: float = 120.0,
             python: str = sys.executable, tied: bool = False) -> dict:
    """Start one device server per device on 127.0.0.1, wait until each answers an authenticated ping.
    tied: the servers end when this process ends (for a notebook's Lab; `testbed up` leaves them running)."""
    tb = _as_testbed(testbed)
    sdir = Path(state_dir or default_state_dir())
    sdir.mkdir(parents=True, exist_ok=True)
    path = state_path(tb.name, sdir)
    old = load_state(tb.name, sdir)
    if old:
        alive = [n for n, d in old.get("devices", {}).items() if d.get("pid") and pid_alive(d["pid"], old.get("token_file"))]
        if alive:
            raise RuntimeError(f"testbed {tb.name!r} is already up ({', '.join(alive)} running; state {path}): "
                               f"run `edgeshard testbed down {tb.name}` first")
    if tb.token_file:
        base = Path(tb.path).parent if tb.path else Path.cwd()
        token_file = Path(tb.token_file) if Path(tb.token_file).is_absolute() else base / tb.token_file
        token_file = auth.ensure_token_file(token_file)
    else:
        token_file = sdir / f"{tb.name}.token"
        if token_file.exists():
            token_file.unlink()
        auth.create_token_file(token_file)
    token_file = str(token_file.resolve())
    if tb.path:
        tb_path = str(Path(tb.path).resolve())
    else:
        tb_path = str(sdir / f"{tb.name}.toml")
        Path(tb_path).write_text(tbm.dumps(tb))
    state = {"mode": "local", "testbed": tb_path, "token_file": token_file, "state_dir": str(sdir),
             "started_s": time.time(), "devices": {}, "links": links_of(tb, "app")}
    write_state(path, state)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    root = str(paths.REPO)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    procs = {}
    try:
        for d in tb.devices:
            logf = sdir / f"{tb.name}.{d.name}.log"
            cmd = [python, "-m", "edgeshard", "serve", "--host", LOCAL_HOST, "--port", str(d.port),
                   "--token-file", token_file, "--name", d.name, "--memory-gib", repr(d.memory_gib)]
            with open(logf, "w") as lf:
                p = subprocess.Popen(cmd, stdout=lf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                     start_new_session=True, cwd=root,
                                     preexec_fn=_die_with_parent if tied else None)
            _children[p.pid] = p
            procs[d.name] = p
            state["devices"][d.name] = {"address": LOCAL_HOST, "port": d.port, "data_port": None, "pid": p.pid,
                                        "cpu_share": d.cpu_share, "memory_gib": d.memory_gib, "healthy": False,
                                        "log": str(logf)}
            write_state(path, state)
        deadline = time.time() + timeout
        pending = set(procs)
        while pending:
            for name in sorted(pending):
                p, dev = procs[name], state["devices"][name]
                m = READY.search(Path(dev["log"]).read_text(errors="replace"))
                if m:
                    dev["port"], dev["data_port"] = int(m.group(3)), int(m.group(5))
                    pending.discard(name)
                    write_state(path, state)
                elif p.poll() is not None:
                    raise RuntimeError(f"device {name!r} exited with code {p.returncode} while starting; "
                                       f"its log {dev['log']}:\n{_tail(dev['log'])}")
            if pending and time.time() > deadline:
                raise RuntimeError(f"devices {sorted(pending)} did not start within {timeout:.0f} s "
                                   f"(logs in {sdir})")
            if pending:
                time.sleep(0.05)
        _check_health(state, timeout=max(5.0, deadline - time.time()))
        bad = [n for n, d in state["devices"].items() if not d["healthy"]]
        if bad:
            raise RuntimeError(f"devices {bad} started but do not answer an authenticated ping "
                               f"(logs in {sdir})")
        write_state(path, state)
        return state
    except BaseException:
        _stop(state)
        write_state(path, state)
        raise


def _tail(path: str, n: int = 20) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def _check_health(state: dict, timeout: float = 5.0) -> dict:
    from edgeshard.device.client import DeviceClient, DeviceError

    try:
        secret = auth.load_secret(state["token_file"])
    except auth.AuthError:
        secret = None
    for name, d in state["devices"].items():
        ok = False
        if secret is not None and d.get("port"):
            try:
                with DeviceClient(name, d["address"], d["port"], secret, timeout=timeout,
                                  connect_timeout=timeout) as c:
                    info = c.info()
                    d["data_port"] = info["data_port"]
                    ok = True
            except DeviceError as e:
                d["error"] = str(e)
        if state.get("mode") == "local" and d.get("pid") and not pid_alive(d["pid"], state.get("token_file")):
            ok = False
            d["error"] = "process is not running"
        d["healthy"] = ok
        if ok:
            d.pop("error", None)
    return state


def status(name: str, state_dir: str | Path | None = None) -> dict:
    """Health-check every device of a testbed that is up (authenticated ping); updates the state file."""
    state = load_state(name, state_dir)
    if state is None:
        raise RuntimeError(f"testbed {name!r} is not up (no {state_path(name, state_dir)}): "
                           f"`edgeshard testbed up TESTBED --local` starts it")
    _check_health(state)
    write_state(state_path(name, state_dir), state)
    return state


def _stop(state: dict, grace_s: float = 5.0) -> list[int]:
    """SIGTERM exactly the recorded pids (when they are our device servers), then SIGKILL stragglers."""
    stopped = []
    tf = state.get("token_file")
    for d in state.get("devices", {}).values():
        pid = d.get("pid")
        if pid and pid_alive(pid, tf):
            try:
                os.kill(pid, signal.SIGTERM)
                stopped.append(pid)
            except ProcessLookupError:
                pass
    deadline = time.time() + grace_s
    for pid in stopped:
        while pid_alive(pid, tf) and time.time() < deadline:
            if pid in _children:
                try:
                    _children[pid].wait(timeout=0.05)
                except subprocess.TimeoutExpired:
                    pass
            else:
                time.sleep(0.05)
        if pid_alive(pid, tf):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if pid in _children:
            try:
                _children.pop(pid).wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
    for d in state.get("devices", {}).values():
        d["healthy"] = False
    return stopped


def down(name: str, state_dir: str | Path | None = None) -> dict:
    """Stop the processes of a local testbed and remove its state file. Returns {"stopped": [pids]}."""
    path = state_path(name, state_dir)
    state = load_state(name, state_dir)
    if state is None:
        raise RuntimeError(f"testbed {name!r} is not up (no {path})")
    if state.get("mode") != "local":
        raise RuntimeError(f"testbed {name!r} is {state.get('mode')!r}, not local: use its own `down` (emulate)")
    stopped = _stop(state)
    path.unlink(missing_ok=True)
    tf = state.get("token_file")
    if tf and Path(tf).parent == path.parent and Path(tf).name == f"{name}.token":
        Path(tf).unlink(missing_ok=True)
    return {"stopped": stopped, "testbed": name}


@contextlib.contextmanager
def local_testbed(testbed, state_dir: str | Path | None = None, timeout: float = 120.0):
    """Bring a local testbed up for the duration of a with block (every port 0, a temporary state dir).

        with local_testbed("testbed_configs/local.toml") as state:
            runtime.run(tb, plan, "tiny-llama", ["Hello"], 8, state=state)
    """
    tb = _as_testbed(testbed)
    tb = tb.replace(devices=tuple(d.__class__(d.name, d.memory_bytes, LOCAL_HOST, 0, d.kind, d.cpu_share)
                                  for d in tb.devices), token_file=None)
    with contextlib.ExitStack() as stack:
        sdir = state_dir or stack.enter_context(tempfile.TemporaryDirectory(prefix="edgeshard-tb-"))
        state = up_local(tb, sdir, timeout=timeout)
        try:
            yield state
        finally:
            down(tb.name, sdir)
