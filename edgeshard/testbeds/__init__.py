"""Bring a testbed up or down, locally (testbeds/local.py) or kernel-emulated (testbeds/emulated.py), behind one interface.

Both kinds write `<state_dir>/<testbed name>.json` (the state: device addresses, ports, pids, how each link is
shaped); the runtime and the profiler read it to find the devices.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path

from edgeshard.config import testbed as tbm
from edgeshard.config.errors import EdgeshardError
from edgeshard.device import auth
from edgeshard.testbeds import local as launch


class TestbedError(EdgeshardError):
    exit_code = 2


def _load(testbed) -> tbm.Testbed:
    return tbm.as_testbed(testbed)


def mode_available() -> tuple[bool, str]:
    """(True, "") when the kernel-emulated testbed can be used here (root, netns, tc)."""
    try:
        from edgeshard.testbeds import emulated as emulate
    except ImportError as e:  # pyroute2 missing
        return False, f"the emulated testbed needs pyroute2 ({e}); install edgeshard[emulate] or use --local"
    return emulate.available()


def up(testbed, local: bool | None = None, state_dir=None, timeout: float = 180.0, tied: bool = False) -> dict:
    """Start one device server per device. local=None: emulated when available (root), else local.
    tied: local servers end when this process ends (testbeds/local.py up_local)."""
    tb = _load(testbed)
    sdir = Path(state_dir or launch.default_state_dir())
    if local is None:
        local = not mode_available()[0]
    if local:
        return launch.up_local(tb, sdir, timeout=timeout, tied=tied)
    ok, why = mode_available()
    if not ok:
        raise TestbedError(f"cannot emulate testbed {tb.name!r}: {why}")
    from edgeshard.testbeds import emulated as emulate
    sdir.mkdir(parents=True, exist_ok=True)
    token = auth.ensure_token_file(Path(tb.token_file) if tb.token_file else sdir / f"{tb.name}.token")

    def serve_argv(name: str, address: str, port: int) -> list[str]:
        return [sys.executable, "-m", "edgeshard", "serve", "--host", address, "--port", str(port),
                "--token-file", str(token), "--name", name, "--memory-gib", str(tb.device(name).memory_gib)]

    state = emulate.up(tb, serve_argv, sdir)
    state["token_file"] = str(token)
    state["testbed"] = str(tb.path) if tb.path else None
    path = sdir / f"{tb.name}.json"
    raw = json.loads(path.read_text())
    raw.update(token_file=str(token), testbed=state["testbed"])
    launch.write_state(path, raw)
    deadline = time.monotonic() + timeout
    while True:  # servers import torch before they listen: wait for an authenticated answer from each
        launch._check_health(state, timeout=5.0)
        if all(d["healthy"] for d in state["devices"].values()):
            return state
        if time.monotonic() > deadline:
            bad = [n for n, d in state["devices"].items() if not d["healthy"]]
            emulate.down(tb.name, sdir)
            raise TestbedError(f"devices {', '.join(bad)} of {tb.name!r} did not answer within {timeout:.0f} s; "
                               f"see their logs in {sdir}")
        time.sleep(0.5)


def _name(testbed_or_name) -> str:
    if isinstance(testbed_or_name, tbm.Testbed):  # up() takes one; down/status must too
        return testbed_or_name.name
    p = Path(str(testbed_or_name))
    if p.suffix == ".toml" and p.exists():
        return tbm.load(p).name
    return str(testbed_or_name)


def down(testbed_or_name, state_dir=None) -> list:
    name = _name(testbed_or_name)
    sdir = Path(state_dir or launch.default_state_dir())
    state = launch.load_state(name, sdir)
    if state and state.get("mode") == "local":
        return launch.down(name, sdir)["stopped"]
    try:
        from edgeshard.testbeds import emulated as emulate
    except ImportError:
        if state is None:
            return []
        raise
    if state is None and not emulate.available()[0]:
        return []
    return emulate.down(name, sdir)  # idempotent; also cleans leftovers by prefix


def status(testbed_or_name, state_dir=None) -> dict | None:
    name = _name(testbed_or_name)
    sdir = Path(state_dir or launch.default_state_dir())
    state = launch.load_state(name, sdir)
    if state is None:
        return None
    if state.get("mode") == "local":
        return launch.status(name, sdir)
    from edgeshard.testbeds import emulated as emulate
    st = emulate.status(name, sdir)
    if st is not None:
        st.setdefault("token_file", state.get("token_file"))
        launch._check_health(st, timeout=5.0)
    return st


def exit_status(pid: int) -> int | None:
    """The returncode of a device process this Python process started (negative: the signal that killed it);
    None when another process started it (its parent alone could know) or it is still running."""
    p = launch._children.get(pid)
    if p is not None:
        return p.poll()
    try:
        from edgeshard.testbeds import emulated as emulate
    except ImportError:
        return None
    emulate._alive(pid)  # reaps it if it exited
    return emulate.exit_codes.get(pid)


def failure(state: dict | None, device: str) -> str:
    """Why `device` of a testbed that is up stopped answering, in one line: the kernel's reason where it is known
    (OOM kills in its memory cgroup, the exit signal or code), its pid and its log file."""
    return f"device {device!r} {diagnosis(state, device)}"


def diagnosis(state: dict | None, device: str) -> str:
    """failure() without the device's name: "(pid N): reasons; its log: PATH (last line: ...)"."""
    dev = ((state or {}).get("devices") or {}).get(device) or {}
    pid = dev.get("pid")
    reasons = []
    if (state or {}).get("mode") == "emulated":
        try:
            from edgeshard.testbeds import emulated as emulate
            why = emulate.device_failure(state, device)
        except Exception:  # no pyroute2 or no cgroup files left: the other facts stand
            why = None
        if why:
            reasons.append(why)
    rc = exit_status(pid) if isinstance(pid, int) else None
    if rc is not None:
        if rc < 0:
            try:
                name = signal.Signals(-rc).name
            except ValueError:
                name = f"signal {-rc}"
            reasons.append(f"it was killed by {name}")
        else:
            reasons.append(f"it exited with code {rc}")
    elif isinstance(pid, int) and not launch.pid_alive(pid):
        reasons.append("its process is gone (exit status unknown: another process started it)")
    elif isinstance(pid, int):
        reasons.append("its process is still running but does not answer (hung, stopped or unreachable?)")
    where = f"pid {pid}" if pid else "no pid recorded"
    log = f"; its log: {dev['log']}" if dev.get("log") else ""
    last = _last_line(dev.get("log"))
    if last:
        log += f" (last line: {last})"
    return f"({where}): {'; '.join(reasons) or 'no diagnosis available'}{log}"


def _last_line(path: str | None, limit: int = 200) -> str:
    if not path:
        return ""
    try:
        lines = [ln.strip() for ln in Path(path).read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1][:limit] if lines else ""


def find_state(testbed, state_dir=None) -> dict | None:
    tb = _load(testbed)
    return launch.load_state(tb.name, Path(state_dir or launch.default_state_dir()))
