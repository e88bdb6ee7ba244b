"""Screenshots of the notebooks as a reader sees them: each notebook is opened in JupyterLab in headless Chromium
(Python playwright, Debian's /usr/bin/chromium), run with Run All in the live kernel (so widgets and bokeh figures
render, which a saved notebook cannot show without its widget state), and saved as one tall PNG.

    .venv/bin/python notebooks/screenshots.py [OUT_DIR] [NOTEBOOK ...]   # default docs/screenshots, all

Beside make_notebooks.py: the notebooks as a person sees them, for review and for docs. Needs chromium.
"""

from __future__ import annotations

import os
import secrets
import shutil
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
# Every code cell has an execution count and none is running ([*]): Run All has finished.
ALL_DONE = """() => {
  const p = [...document.querySelectorAll('.jp-Notebook .jp-CodeCell .jp-InputPrompt')].map(e => e.textContent);
  return p.length > 0 && p.every(t => /\\[\\d+\\]/.test(t));
}"""
SETTINGS = {  # no news toast over the pictures; every cell in the DOM (no windowing), so one tall shot has them all
    "apputils-extension/notification.jupyterlab-settings": '{"fetchNews": "false"}',
    "notebook-extension/tracker.jupyterlab-settings": '{"windowingMode": "none"}',
}


def main(argv: list[str]) -> int:
    from playwright.sync_api import sync_playwright

    out = Path(argv[0]) if argv else ROOT / "docs" / "screenshots"
    names = argv[1:] or sorted(p.stem for p in (ROOT / "notebooks").glob("*.ipynb"))
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="edgeshard-shots-"))
    for name in names:
        shutil.copy(ROOT / "notebooks" / f"{name}.ipynb", work)
    settings = work / ".settings"
    for rel, text in SETTINGS.items():
        f = settings / "@jupyterlab" / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    token = secrets.token_hex(8)
    lab = subprocess.Popen([str(Path(sys.executable).parent / "jupyter"), "lab", "--ip", "127.0.0.1", "--port", str(port),
                            "--no-browser", "--allow-root", f"--ServerApp.token={token}", f"--ServerApp.root_dir={work}",
                            "--LabApp.expose_app_in_browser=True"], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, env=dict(os.environ, JUPYTERLAB_SETTINGS_DIR=str(settings)),
                           start_new_session=True, cwd=work)
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status?token={token}", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS)
            for name in names:
                page = browser.new_page(viewport={"width": 1300, "height": 1000})
                page.goto(f"http://127.0.0.1:{port}/lab/tree/{name}.ipynb?reset&token={token}", timeout=120000)
                page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=120000)
                page.locator(".jp-NotebookPanel .jp-CodeCell .jp-InputArea-editor").first.click(timeout=30000)
                page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
                t0 = time.monotonic()
                try:
                    page.wait_for_function(ALL_DONE, timeout=300000)
                except Exception as e:  # a cell failed or hangs: the picture shows where
                    print(f"{name}: not finished after 300 s ({type(e).__name__}); shooting as it is", flush=True)
                page.wait_for_timeout(5000)  # the last figures render
                height = page.evaluate("() => Math.max(...[...document.querySelectorAll('.jp-NotebookPanel .jp-WindowedPanel-outer, .jp-NotebookPanel .jp-Notebook')].map(e => e.scrollHeight))")
                page.set_viewport_size({"width": 1300, "height": min(int(height) + 150, 16000)})
                page.wait_for_timeout(3000)
                path = out / f"{name}.png"
                page.screenshot(path=str(path))
                print(f"{name}: ran in {time.monotonic() - t0:.0f} s, wrote {path}", flush=True)
                page.evaluate("() => window.jupyterapp.commands.execute('kernelmenu:shutdown')")
                page.wait_for_timeout(2000)
                page.close()
            browser.close()
    finally:
        lab.terminate()
        lab.wait(20)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
