"""Every notebook runs top to bottom headless (papermill, kernel python3) on the embedded local testbed, and the
checks of what it produced live here: the values it glued (`es.glue`, read back with edgeshard.ui.glue.read), the
files and run folders it wrote. The notebooks themselves hold no asserts or helpers (notebooks/make_notebooks.py).

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

from edgeshard.ui import glue

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
    assert not list(state.glob("*.json")), f"{name}: testbed state left in {state}"
    return nb, glue.read(nb)


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


def test_notebooks_read_as_a_workflow():
    """Short cells over the public API: no helper definitions, asserts, clicks from code or private imports."""
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        for c in nb.cells:
            if c.cell_type != "code":
                continue
            src = c.source
            params = "parameters" in c.metadata.get("tags", [])  # a list of settings, one per line
            assert params or len(src.splitlines()) <= 6, f"{path.name}: a {len(src.splitlines())}-line cell:\n{src}"
            for bad in ("def ", "assert ", ".click()", "lambda", "from edgeshard", "import edgeshard."):
                assert bad not in src, f"{path.name}: {bad!r} in a cell:\n{src}"


def widget_views(nb) -> int:
    return sum("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for c in nb.cells
               for o in c.get("outputs", []))


def test_00_paper(work):
    nb, glued = execute(work, "00_paper")
    gains = {(m, bw): (lat, thr) for m, bw, lat, thr in glued["gains"]}
    assert gains[("llama2-70b", 1)] == (None, None)  # every baseline is OOM for 70B: only EdgeShard deploys it
    lat, thr = gains[("llama2-7b", 1)]
    assert lat is not None and lat >= 0 and thr >= 1.0  # never worse than the best baseline
    assert widget_views(nb) >= 3  # the testbed and the two comparisons show themselves
    assert any("synthetic" in c.source.lower() and "docs/paper.md" in c.source for c in nb.cells
               if c.cell_type == "markdown")


def test_01_testbed(work):
    from edgeshard.config import testbed as tbm

    nb, glued = execute(work, "01_testbed", SAVE_TO=str(work / "edited.toml"))
    assert glued["health"] == {"edge-0": "healthy", "edge-1": "healthy", "edge-2": "healthy"}
    saved = Path(glued["saved"])
    toml = saved.read_text()
    assert "# The embedded default" in toml  # the comments were kept
    assert tbm.load(saved).link("edge-0", "edge-2").bandwidth_mbit_s == 100
    assert widget_views(nb) >= 2  # the testbed, the editor


def test_02_profile(work):
    from edgeshard.config import profile as profile_mod

    nb, glued = execute(work, "02_profile", PROFILE_JSON=str(work / "profile.json"))
    g = glued["profile"]
    assert g == {"model": "smollm2-135m", "units": 32, "devices": ["edge-0", "edge-1", "edge-2"], "links": 6,
                 "path": str(work / "profile.json")}
    pr = profile_mod.load(work / "profile.json")
    assert pr.provenance["method"] == "measured" and sorted(pr.devices) == g["devices"]
    assert widget_views(nb) >= 2  # the profile's chart and the lab


def test_03_plan(work):
    from edgeshard.config import plan as planm

    pj = work / "profile.json"
    nb, glued = execute(work, "03_plan", PROFILE_JSON=str(pj) if pj.exists() else "")
    plans = {k: planm.from_dict(v) for k, v in glued["plans"].items() if k != "baselines"}
    lat, thr = plans["latency"], plans["throughput"]
    assert lat.feasible and thr.feasible and lat.objective == "latency" and thr.objective == "throughput"
    assert lat.predicted["latency_s"] <= thr.predicted["latency_s"] + 1e-12  # each plan wins its own objective
    assert thr.predicted["bottleneck_s"] <= lat.predicted["bottleneck_s"] + 1e-12
    for name, raw in glued["plans"]["baselines"].items():
        b = planm.from_dict(raw)
        assert not b.feasible or b.predicted["latency_s"] >= lat.predicted["latency_s"] - 1e-12, name
    assert plans["what_if"].predicted["bottleneck_s"] >= thr.predicted["bottleneck_s"] - 1e-12
    assert widget_views(nb) >= 5  # plans, diffs and the planner view


def test_04_run(work):
    runs = work / "runs-04"
    nb, glued = execute(work, "04_run", WAIT=True, RUNS_DIR=str(runs))
    run = glued["run"]
    assert run["status"] == "done" and len(run["texts"]) == 3 and all(run["texts"])
    (run_dir,) = list(runs.iterdir())
    assert str(run_dir) == run["dir"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert not summary["stopped"]
    assert all(len(r["token_ids"]) > 0 for r in summary["results"]) and len(summary["results"]) == 3
    assert json.loads((run_dir / "parameters.json").read_text())["mode"] == "pipeline"
    assert (run_dir / "events.jsonl").stat().st_size > 0
    assert widget_views(nb) >= 2  # the plan, the live view


def test_05_report(work):
    runs = work / "runs-05"
    nb, glued = execute(work, "05_report", RUNS_DIR=str(runs))
    g = glued["report"]
    report = Path(g["report"])
    assert report.stat().st_size > 100_000 and "Bokeh" in report.read_text()[:2_000_000]
    assert (runs / (Path(g["run_dir"]).name + "-reproduced") / "summary.json").exists()
    assert g["same"] is True
