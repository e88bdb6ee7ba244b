"""Write the notebooks of notebooks/ from the cells below (outputs stripped, one `parameters` cell each).

    python notebooks/make_notebooks.py           # (re)write every notebook
    python notebooks/make_notebooks.py --check   # exit 1 if a notebook differs from what this script writes

Edit the cells here, not in the .ipynb files. Each notebook reads as a researcher's workflow over the public API
(`import edgeshard as es`, docs/api.md): one idea per cell, objects that show themselves, no helpers, asserts or
clicks from code. What a notebook produced is checked by tests/test_notebooks.py, which executes it with
papermill and reads the values it glued (`es.glue`) and the run folders it wrote.
Cells are stored with fixed ids, so regenerating an unchanged notebook leaves it byte for byte the same.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import nbformat

HERE = Path(__file__).resolve().parent

KERNELSPEC = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}


def md(text: str) -> dict:
    return nbformat.v4.new_markdown_cell(textwrap.dedent(text).strip("\n"))


def code(text: str, tags: tuple[str, ...] = ()) -> dict:
    cell = nbformat.v4.new_code_cell(textwrap.dedent(text).strip("\n"))
    if tags:
        cell.metadata["tags"] = list(tags)
    return cell


def params(text: str) -> dict:
    return code(text, ("parameters",))


IMPORT = code("""
import edgeshard as es

es.setup_notebook()  # BokehJS inline: the figures work offline
""")

# --- 00 -----------------------------------------------------------------------------------------------------
NB00 = [
    md("""
    # edgeshard notebooks

    Run a large language model across the edge devices you have. EdgeShard (Zhang et al., IEEE IoT Journal 2025)
    cuts a Llama-style model into contiguous layer shards, places them on edge devices and a cloud server with a
    dynamic program over profiled costs, and runs them collaboratively with no accuracy loss.

    | notebook | what it does |
    |---|---|
    | **00_paper** (this one) | the paper's comparison: EdgeShard against Edge-Solo, Cloud-Edge-Even and Cloud-Edge-Opt on paper-scale scenarios (synthetic profiles, no devices) |
    | **01_testbed** | a testbed: its devices and links, the editor, bringing it up |
    | **02_profile** | measuring the model on every device and link |
    | **03_plan** | the exact plan, the baselines, plan diffs and what-if links |
    | **04_run** | a live run across the devices, with Stop |
    | **05_report** | a run's report, and reproducing it from its folder |

    Everything here uses the public API, `import edgeshard as es` (docs/api.md).
    """),
    md("""
    ## 00 · The paper's comparison, on paper-scale synthetic scenarios

    EdgeShard against Edge-Solo, Cloud-Edge-Even and Cloud-Edge-Opt (plus our heuristics) for Llama-2
    7B/13B/70B on the 15-device scenario of `testbed_configs/paper-edge.toml`, across source-to-cloud bandwidths.

    **The figures are synthetic**: device costs are scaled from published per-unit timings of Llama-2-7B on
    Jetson Orin NX / AGX Orin / RTX 3090 (`edgeshard/planning/synthetic.py`); they are predictions of the cost
    model, not runs. `docs/paper.md` says which of the paper's results this reproduces and which it does not.
    """),
    params("""
    TESTBED = "paper-edge"  # a shipped testbed by name, or a path to a TOML file
    MODELS = ["llama2-7b", "llama2-13b", "llama2-70b"]
    BANDWIDTHS = [1, 10, 50, 100, 500, 1000]  # Mbit/s of the swept link(s)
    """),
    IMPORT,
    code("""
    paper = es.load_testbed(TESTBED)
    paper
    """),
    md("""
    ## Only the source-to-cloud link swept
    Latency in ms/token and throughput in tokens/s per strategy; `OOM` = the strategy cannot fit the model.
    In the figures a gap is an infeasible point; click a legend entry to hide a strategy.
    """),
    code("""
    source_link = es.compare(paper, MODELS, BANDWIDTHS, links="source")
    source_link
    """),
    md("## Every edge-to-cloud link swept (a WAN between the edge and the cloud)"),
    code("""
    wan = es.compare(paper, MODELS, BANDWIDTHS, links="all")
    wan
    """),
    md("""
    ## The headline
    EdgeShard's latency and throughput against the best of the paper's three baselines, at the thinnest and the
    fattest link (`None`: every baseline is out of memory).
    """),
    code("""
    gains = {(m, bw): (wan.gain(m, bw, "latency"), wan.gain(m, bw, "throughput"))
             for m in MODELS for bw in (BANDWIDTHS[0], BANDWIDTHS[-1])}
    gains
    """),
    code("""
    es.glue("gains", [[m, bw, lat, thr] for (m, bw), (lat, thr) in gains.items()])
    """),
]

# --- 01 -----------------------------------------------------------------------------------------------------
NB01 = [
    md("""
    # 01 · The testbed

    A testbed is a TOML file: devices (memory, address, optional kind and CPU share), links (bandwidth and latency
    per ordered pair, defaults for the rest) and constraints. The embedded default, `local`, runs three device
    servers on this machine.
    """),
    params("""
    TESTBED = "local"
    STATE_DIR = ""  # empty: a fresh private folder for the device servers' state, token and logs
    SAVE_TO = "local-edited.toml"  # where the edited copy goes
    """),
    IMPORT,
    code("""
    tb = es.load_testbed(TESTBED)
    tb
    """),
    md("""
    ## Edit
    The editor validates each field as you type and saves a copy keeping the comments you did not touch. Below, a
    slower link from edge-0 to edge-2 is set through its API (the same as typing it into the matrix).
    """),
    code("""
    editor = es.editor(TESTBED)
    editor
    """),
    code("""
    editor.set_link("edge-0", "edge-2", bandwidth_mbit_s=100, latency_ms=5)
    editor.save(SAVE_TO)
    es.load_testbed(SAVE_TO)
    """),
    md("""
    ## Up
    A `Lab` brings the testbed up (one device server per device, free ports on 127.0.0.1) and shows each device's
    health; it comes down at the end of the `with` block, or when the kernel stops.
    """),
    code("""
    with es.Lab(tb, state_dir=STATE_DIR or None) as lab:
        health = lab.status()
    health
    """),
    code("""
    es.glue("health", health)
    es.glue("saved", SAVE_TO)
    """),
]

# --- 02 -----------------------------------------------------------------------------------------------------
NB02 = [
    md("""
    # 02 · Profile the model on the testbed

    Measure per-unit decode and prefill times on every device and the links between them. Profiles are cached
    on disk by everything that changes a measurement, so a second run (or notebooks 03-05) reuses this one.
    """),
    params("""
    TESTBED = "local"
    STATE_DIR = ""  # empty: a fresh private folder
    MODEL = "smollm2-135m"  # real SmolLM2-135M weights (offline); or tiny-llama, a tiny random Llama
    PROFILE_JSON = "profile.json"  # where the profile is saved
    """),
    IMPORT,
    code("""
    lab = es.Lab(TESTBED, state_dir=STATE_DIR or None).up()
    lab
    """),
    code("""
    profile = lab.profile(MODEL)
    profile
    """),
    code("""
    profile.save(PROFILE_JSON)
    lab.down()
    """),
    code("""
    es.glue("profile", {"model": profile.model, "units": profile.n_units, "devices": sorted(profile.devices),
                        "links": len(profile.links), "path": PROFILE_JSON})
    """),
]

# --- 03 -----------------------------------------------------------------------------------------------------
NB03 = [
    md("""
    # 03 · Plan: the exact plan, the baselines, diffs, what-if

    The planner is an exact dynamic program over the profile (docs/formats.md, "Cost model"). Every strategy is
    judged by the same cost model. Planning needs no devices: only the testbed file and a profile.
    """),
    params("""
    TESTBED = "local"
    PROFILE_JSON = "profile.json"  # written by 02; empty: profile here
    MODEL = "smollm2-135m"
    STATE_DIR = ""  # used only when profiling here
    """),
    IMPORT,
    code("""
    tb = es.load_testbed(TESTBED)
    if PROFILE_JSON:
        profile = es.load_profile(PROFILE_JSON)
    else:
        with es.Lab(tb, state_dir=STATE_DIR or None) as lab:
            profile = lab.profile(MODEL)
    """),
    md("## The plan for latency (one sequence) and for throughput (a pipeline of sequences)"),
    code("""
    latency = es.plan(tb, profile, "latency")
    latency
    """),
    code("""
    throughput = es.plan(tb, profile, "throughput")
    throughput
    """),
    code("""
    es.diff(latency, throughput, "latency", "throughput")
    """),
    md("## Against the paper's baselines"),
    code("""
    baselines = {s: es.plan(tb, profile, "latency", strategy=s) for s in ("edge-solo", "cloud-edge-even", "cloud-edge-opt")}
    {s: p.predicted.get("latency_s") or f"{p.status}: {'; '.join(p.reasons)}" for s, p in baselines.items()}
    """),
    md("""
    ## What if a link were slower?
    The same planning on a copy of the testbed with the first hop of the throughput plan at 1% of its bandwidth.
    The interactive version (every strategy, a slider for any link) is `lab.planner()` or the view below.
    """),
    code("""
    a, b = throughput.stages[0].device, throughput.stages[1].device
    slow = tb.with_link(a, b, bandwidth_mbit_s=tb.link(a, b).bandwidth_mbit_s * 0.01)
    what_if = es.plan(slow, profile, "throughput")
    es.diff(throughput, what_if, "as it is", f"{a}->{b} at 1%")
    """),
    code("""
    es.planner(tb, profile, "throughput")
    """),
    code("""
    es.glue("plans", {"latency": latency.to_dict(), "throughput": throughput.to_dict(), "what_if": what_if.to_dict(),
                      "baselines": {s: p.to_dict() for s, p in baselines.items()}})
    """),
]

# --- 04 -----------------------------------------------------------------------------------------------------
NB04 = [
    md("""
    # 04 · Run live, and stop it

    The model runs split over the devices **in the background**: the cell returns at once, the plots (per-token
    latency against the plan's prediction, tokens/s, compute vs transfer per stage) fill as tokens arrive, the
    text streams in, and **stop** ends the run. The testbed comes down when the run ends.
    """),
    params("""
    TESTBED = "local"
    STATE_DIR = ""  # empty: a fresh private folder
    MODEL = "smollm2-135m"
    PROMPTS = ["Once upon a time", "The capital of France is", "Edge devices can"]
    MAX_NEW_TOKENS = 64  # long enough to press stop
    RUNS_DIR = "runs"  # run folders go here
    WAIT = False  # True (headless runs): the last cell waits for the end
    """),
    IMPORT,
    code("""
    lab = es.Lab(TESTBED, state_dir=STATE_DIR or None).up()
    profile = lab.profile(MODEL)
    """),
    md("The throughput plan, for as many sequences in flight as there are prompts:"),
    code("""
    plan = lab.plan("throughput", sequences=len(PROMPTS), new_tokens=MAX_NEW_TOKENS)
    plan
    """),
    code("""
    run = lab.run(PROMPTS, plan=plan, max_new_tokens=MAX_NEW_TOKENS, runs_dir=RUNS_DIR, down_after=True)
    run
    """),
    md("With `WAIT = True` (papermill, scripts) this waits for the end; in JupyterLab it returns at once."),
    code("""
    if WAIT:
        run.wait()
        es.glue("run", {"dir": str(run.run_dir), "texts": run.texts, "status": run.status})
    """),
]

# --- 05 -----------------------------------------------------------------------------------------------------
NB05 = [
    md("""
    # 05 · Report and reproduce

    A short run, its self-contained HTML report (inline bokeh, works offline), and the same experiment re-run from
    its run folder alone: greedy decoding must give identical token ids.
    """),
    params("""
    TESTBED = "local"
    STATE_DIR = ""  # empty: a fresh private folder
    MODEL = "smollm2-135m"
    PROMPTS = ["The capital of France is", "Edge devices can"]
    MAX_NEW_TOKENS = 16
    RUNS_DIR = "runs"
    """),
    IMPORT,
    code("""
    lab = es.Lab(TESTBED, state_dir=STATE_DIR or None).up()
    lab.profile(MODEL)
    plan = lab.plan("throughput")
    """),
    code("""
    run = lab.run(PROMPTS, plan=plan, max_new_tokens=MAX_NEW_TOKENS, mode="sequential", runs_dir=RUNS_DIR)
    run.wait()
    run.texts
    """),
    md("## The report"),
    code("""
    report = run.report()
    report
    """),
    md("## Reproduce it from its folder"),
    code("""
    again = lab.reproduce(run.run_dir)
    again
    """),
    code("""
    lab.down()
    es.glue("report", {"run_dir": str(run.run_dir), "report": str(report.path), "same": again.same})
    """),
]

NOTEBOOKS = {"00_paper": NB00, "01_testbed": NB01, "02_profile": NB02, "03_plan": NB03, "04_run": NB04,
             "05_report": NB05}


def build(stem: str, cells: list) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = dict(KERNELSPEC)
    nb.metadata["language_info"] = {"name": "python"}
    nb.cells = [nbformat.from_dict(dict(c)) for c in cells]
    for i, c in enumerate(nb.cells):
        c["id"] = f"{stem.replace('_', '-')}-{i:02d}"  # fixed ids: regenerating gives the same file
    nbformat.validate(nb)
    return nb


def text_of(nb) -> str:
    return nbformat.writes(nb) + "\n"


def main(argv: list[str]) -> int:
    check = "--check" in argv
    bad = []
    for stem, cells in NOTEBOOKS.items():
        path = HERE / f"{stem}.ipynb"
        text = text_of(build(stem, cells))
        if check:
            if not path.exists() or path.read_text() != text:
                bad.append(path.name)
        else:
            path.write_text(text)
            print(f"wrote {path}")
    if bad:
        print(f"out of date (run python notebooks/make_notebooks.py): {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
