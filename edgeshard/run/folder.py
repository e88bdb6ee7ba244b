"""The run folder: everything one run used and measured, written as the run goes (ui/report.py renders it,
run/reproduce.py re-runs it).

    runs/<timestamp>-<strategy>-<objective>/
        testbed.toml       config/testbed.dumps: [[shared_cores]] cores = "auto" frozen to the number it resolved to
        profile.json       if the run was given a profile
        plan.json
        parameters.json    run/parameters.RunConfig, every field
        environment.json   environment() + each device's info and clock offset
        events.jsonl       one event per line, appended (and flushed) as each arrives
        summary.json       run/metrics.summarize of the events + results, stages, load info

    folder = RunFolder(default_run_dir(plan))
    folder.write_inputs(tb, plan, config, profile)
    folder.write_environment(env); folder.append_event(ev) ...; folder.write_summary(out); folder.close()
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import json
import platform
import shutil
import socket
import subprocess
from pathlib import Path

from edgeshard.config import paths
from edgeshard.config import plan as planm
from edgeshard.config import testbed as tbm
from edgeshard.run.parameters import RunConfig


def default_run_dir(plan: planm.Plan, base: str | Path = "runs") -> Path:
    """base/<timestamp>-<strategy>-<objective>, with -2, -3 ... when that exists."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    name = f"{stamp}-{plan.strategy}-{plan.objective}".replace("/", "_")
    p, i = Path(base) / name, 1
    while p.exists():
        i += 1
        p = Path(base) / f"{name}-{i}"
    return p


def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment() -> dict:
    """The controller's side of environment.json: versions, host, and the repository's commit."""
    root = paths.REPO
    sha = dirty = None
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=5).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                    capture_output=True, text=True, timeout=5).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return {"python": platform.python_version(), "platform": platform.platform(), "hostname": socket.gethostname(),
            "torch": _version("torch"), "transformers": _version("transformers"), "rpyc": _version("rpyc"),
            "numpy": _version("numpy"), "edgeshard": _version("edgeshard"), "git_sha": sha, "git_dirty": dirty}


def frozen_testbed(tb: tbm.Testbed) -> tbm.Testbed:
    """The testbed as the run folder keeps it: a relative token_file made absolute (the folder lives elsewhere)."""
    if tb.token_file and tb.path and not Path(tb.token_file).is_absolute():
        return dataclasses.replace(tb, token_file=str((Path(tb.path).parent / tb.token_file).resolve()))
    return tb


class RunFolder:
    """Writes one run folder. Every method writes one file; append_event keeps events.jsonl open, line-buffered,
    so a run that dies still leaves every event it received."""

    def __init__(self, path: str | Path):
        self.path = Path(path).resolve()  # printed and recorded: absolute, valid from any directory
        self._events = None

    def write_inputs(self, tb: tbm.Testbed, plan: planm.Plan, config: RunConfig, profile=None) -> None:
        """testbed.toml, profile.json (profile: a Profile or its path; None: none), plan.json, parameters.json."""
        d = self.path
        d.mkdir(parents=True, exist_ok=True)
        # dumps, never a copy of the file: "auto" cores are written as the number this run assumed
        (d / "testbed.toml").write_text(tbm.dumps(frozen_testbed(tb)))
        if profile is not None:
            if isinstance(profile, (str, Path)):
                shutil.copyfile(profile, d / "profile.json")
            else:
                (d / "profile.json").write_text(profile.dumps())
        plan.save(d / "plan.json")
        config.save(d / "parameters.json")
        self._open_events()  # there from the start, even if no event ever arrives

    def _open_events(self):
        if self._events is None:
            self._events = open(self.path / "events.jsonl", "a", buffering=1)

    def write_environment(self, env: dict) -> None:
        (self.path / "environment.json").write_text(json.dumps(env, indent=1, default=str) + "\n")

    def append_event(self, ev: dict) -> None:
        self._open_events()
        self._events.write(json.dumps(ev, separators=(",", ":")) + "\n")

    def write_summary(self, summary: dict) -> None:
        (self.path / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")

    def close(self) -> None:
        if self._events is not None:
            self._events.close()
            self._events = None
