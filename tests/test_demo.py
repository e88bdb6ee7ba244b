"""`make demo` end to end from cold caches, as a newcomer runs it: `python -m edgeshard.cli.demo` in a subprocess with
empty EDGESHARD_HOME and EDGESHARD_CACHE_DIR of its own (so the SmolLM2 conversion happens in this run).

- as root, the kernel-emulated testbed (the case that was OOM-killed on every fresh machine: a device converting
  the weights inside its memory cgroup);
- as a plain user (nobody, when the suite runs as root) or, without root, as this user: local device processes
  (EDGESHARD_DEMO_LOCAL=1).
Each asserts: exit 0, no traceback, a report written, the converted weights in the cold cache with no temporary
folder left, and both runs recorded.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from edgeshard import testbeds

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 900


def _cold_env(base: Path, **extra) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1",
               EDGESHARD_HOME=str(base / "home"), EDGESHARD_CACHE_DIR=str(base / "cache"), HOME=str(base / "user"))
    env.pop("EDGESHARD_DEMO_LOCAL", None)
    env.update(extra)
    return env


def _run_demo(base: Path, env: dict, user: int | None = None) -> str:
    argv = [sys.executable, "-m", "edgeshard.cli.demo"]
    if user:
        argv = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", "--", *argv]
    p = subprocess.run(argv, cwd=base / "work", env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    out = p.stdout + p.stderr
    (base / "demo.log").write_text(out)
    assert p.returncode == 0, f"make demo failed (exit {p.returncode}); its output ends:\n{out[-4000:]}"
    assert "Traceback" not in out, out[-4000:]
    return p.stdout


def _check(base: Path, stdout: str) -> None:
    report = Path(stdout.strip().splitlines()[-1])
    assert report.is_file() and report.suffix == ".html", f"last line is not a report: {report}"
    cache = base / "cache"
    done = sorted(p.name for p in cache.glob("smollm2-135m-weights-*") if (p / "DONE").is_file())
    assert len(done) == 1, f"converted weights in the cold cache: {sorted(p.name for p in cache.iterdir())}"
    assert not list(cache.glob("*.tmp*")), f"temporary folders left: {list(cache.glob('*.tmp*'))}"
    summaries = sorted((base / "work" / "runs").glob("*/summary.json"))
    assert len(summaries) == 2, summaries  # sequential, then pipeline
    modes = sorted(json.loads((s.parent / "parameters.json").read_text())["mode"] for s in summaries)
    assert modes == ["pipeline", "sequential"]
    for s in summaries:
        rec = json.loads(s.read_text())
        assert all(len(r["token_ids"]) > 0 for r in rec["results"])


def _prepare(tmp_path: Path, owner: int | None = None) -> Path:
    """Empty home, cache, HOME and working dir. For another user, a base under /tmp that it can traverse (pytest's
    own tmp_path sits below a 0700 folder), removed by the test."""
    base = Path(tempfile.mkdtemp(prefix="edgeshard-demo-test-")) if owner is not None else tmp_path
    os.chmod(base, 0o755)
    for sub in ("home", "cache", "user", "work"):
        (base / sub).mkdir()
        if owner is not None:
            os.chown(base / sub, owner, owner)
    return base


@pytest.mark.root
@pytest.mark.timeout(TIMEOUT_S + 60)
def test_demo_cold_as_root_emulated(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("the emulated demo needs root (network namespaces, tc, cgroups)")
    ok, why = testbeds.mode_available()
    if not ok:
        pytest.skip(f"kernel emulation unavailable here: {why}")
    base = _prepare(tmp_path)
    out = _run_demo(base, _cold_env(base))
    assert "kernel-emulated" in out
    _check(base, out)


@pytest.mark.timeout(TIMEOUT_S + 60)
def test_demo_cold_local_as_plain_user(tmp_path, plain_user):
    """As nobody when the suite runs as root and the venv is reachable by others; otherwise as this user, with
    EDGESHARD_DEMO_LOCAL=1 forcing local device processes (the reason is printed)."""
    user, why = plain_user
    if user is None:
        print(f"running the local demo as uid {os.geteuid()}: {why}")
    base = _prepare(tmp_path, owner=user)
    try:
        out = _run_demo(base, _cold_env(base, EDGESHARD_DEMO_LOCAL="1"), user=user)
        assert "local processes" in out
        _check(base, out)
    finally:
        if base != tmp_path:
            shutil.rmtree(base, ignore_errors=True)
