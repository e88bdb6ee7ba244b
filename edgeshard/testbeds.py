"""Bring a testbed up or down, locally (launch.py) or kernel-emulated (emulate.py), behind one interface.

Both kinds write `<state_dir>/<testbed name>.json` (the state: device addresses, ports, pids, how each link is
shaped); the runtime and the profiler read it to find the devices.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from . import launch, testbed as tbm
from .device import auth
from .errors import EdgeshardError


class TestbedError(EdgeshardError):
    exit_code = 2


def _load(testbed) -> tbm.Testbed:
    return testbed if isinstance(testbed, tbm.Testbed) else tbm.load(testbed)


def mode_available() -> tuple[bool, str]:
    """(True, "") when the kernel-emulated testbed can be used here (root, netns, tc)."""
    try:
        from . import emulate
    except ImportError as e:  # pyroute2 missing
        return False, f"the emulated testbed needs pyroute2 ({e}); install edgeshard[emulate] or use --local"
    return emulate.available()


def up(testbed, local: bool | None = None, state_dir=None, timeout: float = 180.0) -> dict:
    """Start one device server per device. local=None: emulated when available (root), else local."""
    tb = _load(testbed)
    sdir = Path(state_dir or launch.default_state_dir())
    if local is None:
        local = not mode_available()[0]
    if local:
        return launch.up_local(tb, sdir, timeout=timeout)
    ok, why = mode_available()
    if not ok:
        raise TestbedError(f"cannot emulate testbed {tb.name!r}: {why}")
    from . import emulate
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
    path.write_text(json.dumps(raw, indent=1))
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
        from . import emulate
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
    from . import emulate
    st = emulate.status(name, sdir)
    if st is not None:
        st.setdefault("token_file", state.get("token_file"))
        launch._check_health(st, timeout=5.0)
    return st


def find_state(testbed, state_dir=None) -> dict | None:
    tb = _load(testbed)
    return launch.load_state(tb.name, Path(state_dir or launch.default_state_dir()))
