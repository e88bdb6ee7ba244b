"""Where edgeshard keeps things on disk: one home for every default directory, and atomic writes.

Two roots, both defaulting to ~/.cache/edgeshard:
  home()       $EDGESHARD_HOME       state that belongs to this user: the shared device token, testbed state
                                     files (testbeds/), cached profiles (profiles/)
  cache_dir()  $EDGESHARD_CACHE_DIR  derived, rebuildable data: converted model weights and tokenizers
Tests point both at fresh temporary folders (tests/conftest.py), so nothing reads or writes the user's home.
Stdlib only.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

_DEFAULT = "~/.cache/edgeshard"
PACKAGE = Path(__file__).resolve().parents[1]  # edgeshard/
REPO = PACKAGE.parent  # the checkout: testbed_configs/ and notebooks/ live here (an editable install)
CONFIGS = REPO / "testbed_configs"


def home() -> Path:
    return Path(os.environ.get("EDGESHARD_HOME") or _DEFAULT).expanduser()


def cache_dir() -> Path:
    return Path(os.environ.get("EDGESHARD_CACHE_DIR") or _DEFAULT).expanduser()


def read_json(path: str | Path, what: str, fix_syntax: str):
    """The JSON in a file the user gave, or a ConfigError naming the file and what to do (unreadable, not text,
    bad syntax: fix_syntax says how to get a good one)."""
    import json

    from edgeshard.config.errors import ConfigError
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except OSError as e:
        raise ConfigError(str(path), f"cannot read {what}: {e.strerror}", "check the path") from None
    except UnicodeDecodeError:
        raise ConfigError(str(path), "is not a text file", f"give a {what} JSON file") from None
    except json.JSONDecodeError as e:
        raise ConfigError(str(path), f"not valid JSON: {e}", fix_syntax) from None


def atomic_write_text(path: str | Path, text: str, mode: int = 0o644) -> Path:
    """Write text to path so that readers see the old file or the whole new one, never a part (a crash mid-write
    leaves the old file). The temporary file sits beside path (same filesystem, so the rename is atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, mode)  # mkstemp makes 0600 files
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path
