"""Screenshots of the notebooks as a reader sees them: execute 00-05 headless (papermill), open each executed copy
in JupyterLab in headless Chromium (Python playwright, Debian's /usr/bin/chromium) and save a full-page PNG.

    .venv/bin/python notebooks/screenshots.py [OUT_DIR] [NOTEBOOK ...]   # default artifacts/notebooks, all

Beside make_notebooks.py: the notebooks as a person sees them, for review and for the issue notes. Needs chromium.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def main(argv: list[str]) -> int:
    import papermill
    from playwright.sync_api import sync_playwright

    out = Path(argv[0]) if argv else ROOT / "artifacts" / "notebooks"
    names = argv[1:] or sorted(p.stem for p in (ROOT / "notebooks").glob("*.ipynb"))
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="edgeshard-shots-"))
    env_params = {"04_run": {"WAIT": True}}
    for name in names:
        t0 = time.monotonic()
        papermill.execute_notebook(str(ROOT / "notebooks" / f"{name}.ipynb"), str(work / f"{name}.ipynb"),
                                   parameters=env_params.get(name, {}), kernel_name="python3", cwd=str(work),
                                   progress_bar=False)
        print(f"executed {name} in {time.monotonic() - t0:.0f} s", flush=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    token = secrets.token_hex(8)
    lab = subprocess.Popen([str(Path(sys.executable).parent / "jupyter"), "lab", "--ip", "127.0.0.1", "--port", str(port),
                            "--no-browser", "--allow-root", f"--ServerApp.token={token}",
                            f"--ServerApp.root_dir={work}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           env=dict(os.environ), start_new_session=True)
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status?token={token}", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS)
            page = browser.new_page(viewport={"width": 1300, "height": 1000})
            for name in names:
                page.goto(f"http://127.0.0.1:{port}/lab/tree/{name}.ipynb?reset&token={token}", timeout=120000)
                page.wait_for_selector(".jp-NotebookPanel .jp-Cell", timeout=120000)
                page.wait_for_timeout(4000)  # widgets and bokeh render
                # the notebook scrolls inside its panel: grow the panel to the notebook's height, then shoot
                height = page.evaluate("() => document.querySelector('.jp-NotebookPanel .jp-WindowedPanel-inner, "
                                       ".jp-NotebookPanel .jp-Notebook').scrollHeight")
                page.set_viewport_size({"width": 1300, "height": min(int(height) + 200, 12000)})
                page.wait_for_timeout(3000)
                path = out / f"{name}.png"
                page.screenshot(path=str(path), full_page=True)
                page.set_viewport_size({"width": 1300, "height": 1000})
                print(f"wrote {path}", flush=True)
            browser.close()
    finally:
        lab.terminate()
        lab.wait(20)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
