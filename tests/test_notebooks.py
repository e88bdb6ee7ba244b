"""Every notebook runs top to bottom headless (papermill, kernel python3) on the embedded local testbed.

Each notebook gets its own state dir (device servers, token) and every test checks that none of its device
servers is left running. One EDGESHARD_HOME for the module: 02 measures the profile, 03-05 find it in the
profiler's cache (the same parameters), which keeps the whole module around two minutes.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
CELL_TIMEOUT_S = 300

nbformat = pytest.importorskip("nbformat")
papermill = pytest.importorskip("papermill")


def ensure_kernel() -> None:
    """The `python3` kernel must run this venv's Python (what `make install` sets up with
    `python -m ipykernel install --sys-prefix --name python3`); install it the same way when it is missing."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    def spec():
        try:
            return KernelSpecManager().get_kernel_spec("python3")
        except NoSuchKernel:
            return None

    if spec() is None:
        subprocess.run([sys.executable, "-m", "ipykernel", "install", "--sys-prefix", "--name", "python3"],
                       check=True, capture_output=True, timeout=120)
    ks = spec()
    if ks is None:
        pytest.fail("no `python3` Jupyter kernel, and `python -m ipykernel install --sys-prefix --name python3` "
                    "did not create one: run `make install`")
    exe = ks.argv[0]
    if exe in ("python", "python3", f"python{sys.version_info[0]}.{sys.version_info[1]}"):
        exe = sys.executable  # jupyter_client runs its own interpreter for these
    probe = subprocess.run([exe, "-c", "import edgeshard, ipykernel"], capture_output=True, text=True, timeout=120)
    if probe.returncode != 0:
        pytest.fail(f"the `python3` kernel ({ks.resource_dir}) runs {exe}, which cannot import edgeshard "
                    f"({probe.stderr.strip().splitlines()[-1:]}); run "
                    f"`{sys.executable} -m ipykernel install --sys-prefix --name python3` (make install does)")


def device_processes(state_dir: Path) -> list[int]:
    """Pids of processes whose command line names state_dir (the device servers of that testbed)."""
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit() and int(p.name) != os.getpid():
            try:
                cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if str(state_dir) in cmd and "edgeshard" in cmd:
                out.append(int(p.name))
    return out


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    ensure_kernel()
    d = tmp_path_factory.mktemp("notebooks")
    with pytest.MonkeyPatch.context() as mp:  # the kernels inherit this environment
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TOKENIZERS_PARALLELISM", "false")
        mp.setenv("EDGESHARD_HOME", str(d / "home"))  # a fresh profile cache, shared by the notebooks below
        yield d


def execute(work: Path, name: str, **parameters):
    """Run notebooks/<name>.ipynb with papermill into work/; returns (executed notebook, all text output)."""
    state = work / f"state-{name}"
    parameters.setdefault("STATE_DIR", str(state))
    out = work / f"{name}.ipynb"
    try:
        papermill.execute_notebook(str(NOTEBOOKS / f"{name}.ipynb"), str(out), parameters=parameters,
                                   kernel_name="python3", cwd=str(work), progress_bar=False, log_output=False,
                                   execution_timeout=CELL_TIMEOUT_S)
    finally:
        left = device_processes(state)
        assert not left, f"{name}: device servers still running after the notebook: {left}"
    nb = nbformat.read(out, as_version=4)
    text = "\n".join(o.get("text", "") if o.get("output_type") == "stream" else str(o.get("data", {}).get("text/plain", ""))
                     for c in nb.cells for o in c.get("outputs", []))
    assert not list(state.glob("*.json")), f"{name}: testbed state left in {state}"
    return nb, text


def widget_views(nb) -> int:
    return sum("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for c in nb.cells
               for o in c.get("outputs", []))


def test_notebooks_are_generated_and_stripped():
    sys.path.insert(0, str(NOTEBOOKS))
    try:
        import make_notebooks
    finally:
        sys.path.remove(str(NOTEBOOKS))
    assert make_notebooks.main(["--check"]) == 0, "run python notebooks/make_notebooks.py"
    names = sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb"))
    assert names == ["00_paper", "01_testbed", "02_profile", "03_plan", "04_run", "05_report"]
    for name in names:
        nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
        nbformat.validate(nb)
        tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(tagged) == 1, name
        assert nb.metadata.kernelspec.name == "python3"
        for c in nb.cells:
            if c.cell_type == "code":
                assert c.outputs == [] and c.execution_count is None, f"{name}: outputs not stripped"


def test_00_paper(work):
    nb, text = execute(work, "00_paper")
    assert "latency (ms/token" in text and "throughput (tokens/s" in text
    assert "llama2-70b" in text and "OOM" in text
    assert "links = 'all'" in text and "links = 'source'" in text
    assert widget_views(nb) >= 1  # the bokeh figures (inside one VBox)
    assert any("synthetic" in c.source.lower() and "docs/paper.md" in c.source for c in nb.cells
               if c.cell_type == "markdown")


def test_01_testbed(work):
    saved = work / "edited.toml"
    nb, text = execute(work, "01_testbed", SAVE_TO=str(saved))
    assert text.count(": healthy (pid") >= 6  # three devices, after up and after health
    assert "NOT healthy" not in text
    toml = saved.read_text()
    assert "max_stages = 2" in toml and "# The embedded default" in toml  # edited, comments kept
    assert "stopped pids" in text
    assert widget_views(nb) >= 1


def test_02_profile(work):
    from edgeshard.config import profile as profile_mod

    nb, text = execute(work, "02_profile", OUT_DIR=str(work / "profile"))
    pr = profile_mod.load(work / "profile" / "profile.json")
    assert pr.model == "smollm2-135m" and pr.provenance["method"] == "measured"
    assert sorted(pr.devices) == ["edge-0", "edge-1", "edge-2"] and len(pr.links) == 6
    assert "32 units on 3 devices" in text
    assert widget_views(nb) >= 2  # the tqdm progress bar and the ProfileView


def test_03_plan(work):
    pj = work / "profile" / "profile.json"
    nb, text = execute(work, "03_plan", PROFILE_JSON=str(pj) if pj.exists() else "")
    assert "edgeshard / latency" in text and "edgeshard / throughput" in text  # the latency vs throughput diff
    assert "throughput_tokens_per_s" in text
    assert "x0.01" in text and "what-if plan:" in text
    assert widget_views(nb) >= 1


def test_04_run(work):
    runs = work / "runs-04"
    nb, text = execute(work, "04_run", AUTO_START=True, WAIT=True, RUNS_DIR=str(runs))
    assert "done - " in text
    (run_dir,) = list(runs.iterdir())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert not summary["stopped"]
    assert all(len(r["token_ids"]) > 0 for r in summary["results"]) and len(summary["results"]) == 3
    assert (run_dir / "events.jsonl").stat().st_size > 0
    assert widget_views(nb) >= 1


def test_05_report(work):
    runs = work / "runs-05"
    nb, text = execute(work, "05_report", RUNS_DIR=str(runs))
    first = [d for d in runs.iterdir() if not d.name.endswith("-reproduced")]
    assert len(first) == 1
    report = first[0] / "report.html"
    assert report.stat().st_size > 100_000 and "Bokeh" in report.read_text()[:2_000_000]
    assert (runs / (first[0].name + "-reproduced") / "summary.json").exists()
    assert "token ids identical: True" in text
