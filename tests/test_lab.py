"""`make lab` starts JupyterLab on the notebooks, opening 00_paper.ipynb, as root (containers, Jetson images: it
needs --allow-root there) and as a plain user. Real `make`, real JupyterLab; the test asks its REST API."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _lab(user: int | None) -> None:
    base = Path(tempfile.mkdtemp(prefix="edgeshard-lab-test-"))
    os.chmod(base, 0o755)
    if user:
        os.chown(base, user, user)
    port, token = _free_port(), secrets.token_hex(8)
    env = dict(os.environ, HOME=str(base), JUPYTER_RUNTIME_DIR=str(base / "rt"), JUPYTER_CONFIG_DIR=str(base / "cfg"),
               JUPYTER_DATA_DIR=str(base / "data"), IPYTHONDIR=str(base / "ipy"))
    # -o: the venv is installed already (by whoever runs the suite); do not let make rebuild it
    argv = ["make", "-s", "-o", ".venv/.installed", "lab", f"LAB_ARGS=--port {port} --ServerApp.token={token}"]
    if user:
        argv = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", "--", *argv]
    log = base / "lab.log"
    with open(log, "w") as f:
        p = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            if p.poll() is not None:
                pytest.fail(f"make lab exited with {p.returncode}:\n{log.read_text()[-3000:]}")
            try:
                req = urllib.request.Request(f"http://127.0.0.1:{port}/api/contents/00_paper.ipynb?content=0",
                                             headers={"Authorization": f"token {token}"})
                with urllib.request.urlopen(req, timeout=3) as r:
                    assert json.loads(r.read())["name"] == "00_paper.ipynb"  # root_dir is notebooks/
                break
            except (urllib.error.URLError, OSError):
                if time.monotonic() > deadline:
                    pytest.fail(f"make lab did not answer within 120 s:\n{log.read_text()[-3000:]}")
                time.sleep(0.5)
        req = urllib.request.Request(f"http://127.0.0.1:{port}/?token={token}")
        with urllib.request.urlopen(req, timeout=10) as r:  # the landing page redirects to the default URL
            assert r.url.split("?")[0].endswith("/lab/tree/00_paper.ipynb"), r.url
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(10)
        shutil.rmtree(base, ignore_errors=True)


def test_make_lab_as_this_user():
    _lab(None)


def test_make_lab_as_a_plain_user(plain_user):
    uid, why = plain_user
    if uid is None:
        pytest.skip(f"cannot run as a plain user here: {why}")
    _lab(uid)
