"""Hermetic test sessions: every session gets fresh, empty EDGESHARD_HOME, EDGESHARD_CACHE_DIR, HOME, XDG, Jupyter
and IPython dirs, so nothing reads or writes the user's home, and a test that passes only because an earlier run
left a cache behind (converted weights, a profile, a token) fails here as it would on a newcomer's machine.

Markers (registered in pyproject.toml), set per module below so each file's cost is stated in one place:
  root     needs root (network namespaces, tc, cgroups); skipped with the reason otherwise
  browser  drives JupyterLab in Chromium
  slow     takes more than a few seconds (device servers, notebooks, model loads)
  weights  loads the real SmolLM2 weights (converts them into the session's empty cache first)
`make test-fast` runs `-m "not slow and not browser and not root and not weights"`; `make test` runs everything.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

# The session's private root; removed at exit unless EDGESHARD_KEEP_TEST_HOME is set (to inspect logs).
_ROOT = Path(tempfile.mkdtemp(prefix="edgeshard-test-"))
os.chmod(_ROOT, 0o755)  # device servers started as another user (the as-user tests) read the token dir
_DIRS = {
    "HOME": "home",
    "EDGESHARD_HOME": "edgeshard-home",
    "EDGESHARD_CACHE_DIR": "edgeshard-cache",
    "XDG_CACHE_HOME": "xdg-cache",
    "XDG_CONFIG_HOME": "xdg-config",
    "XDG_DATA_HOME": "xdg-data",
    "JUPYTER_CONFIG_DIR": "jupyter-config",
    "JUPYTER_DATA_DIR": "jupyter-data",
    "JUPYTER_RUNTIME_DIR": "jupyter-runtime",
    "IPYTHONDIR": "ipython",
    "MPLCONFIGDIR": "matplotlib",
    "HF_HOME": "hf-home",
}
REAL_HOME = os.environ.get("HOME", "")
for var, sub in _DIRS.items():
    d = _ROOT / sub
    d.mkdir(parents=True, exist_ok=True)
    os.environ[var] = str(d)
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
# The venv's kernelspec (make install: --sys-prefix) stays visible: JUPYTER_PATH is searched after the data dir.

_MODULE_MARKS = {
    "test_browser": ("browser", "slow", "weights"),
    "test_emulate": ("root", "slow"),
    "test_emulated_accuracy": ("root", "slow", "weights"),
    "test_demo": ("slow", "weights"),
    "test_notebooks": ("slow", "weights"),
    "test_cli_runtime": ("slow",),
    "test_runtime": ("slow", "weights"),
    "test_profiler": ("slow",),
    "test_report": ("slow",),
    "test_model": ("weights",),
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        for mark in _MODULE_MARKS.get(item.module.__name__.rsplit(".", 1)[-1], ()):
            item.add_marker(getattr(pytest.mark, mark))


@atexit.register  # registered before anything (IPython's history, say) registers its own: so it runs last
def _remove_root() -> None:
    if not os.environ.get("EDGESHARD_KEEP_TEST_HOME"):
        shutil.rmtree(_ROOT, ignore_errors=True)


@pytest.fixture(scope="session")
def test_root() -> Path:
    """The session's private root (its subfolders are the dirs set above)."""
    return _ROOT


PLAIN_UID = 65534  # nobody


def _reachable_by_others(path: Path) -> bool:
    """Can a user with no group in common execute/read `path` (every parent traversable by others)?"""
    path = path.resolve()
    if not path.stat().st_mode & 0o005:
        return False
    return all(p.stat().st_mode & 0o001 for p in path.parents)


@pytest.fixture
def plain_user() -> tuple[int | None, str]:
    """(uid to drop to, "") when the suite runs as root and a plain user can run this venv; (None, why) otherwise
    (not root: the suite already runs as a plain user; or the interpreter lives where others cannot reach it, as
    on machines whose Python is under /root)."""
    import sys

    if os.geteuid() != 0:
        return None, "the suite already runs as a plain user"
    for p in (Path(sys.executable), Path(__file__).resolve().parent.parent / "edgeshard" / "__init__.py"):
        if not _reachable_by_others(p):
            return None, f"{p.resolve()} is not reachable by other users (a parent folder is private)"
    return PLAIN_UID, ""
