"""edgeshard: exact planning and collaborative execution of LLM layer shards across edge devices (EdgeShard,
Zhang et al., IEEE IoT Journal 2025). The public API, for notebooks and scripts (docs/api.md):

    import edgeshard as es
    tb = es.load_testbed("local")
    with es.Lab(tb) as lab:
        prof = lab.profile("smollm2-135m")
        plan = lab.plan("throughput")
        run = lab.run(["Once upon a time", "The capital of France is"])

Names are imported on first use, so `import edgeshard` loads neither torch nor bokeh.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_API = {
    "Lab": "lab", "LiveRun": "lab", "PlanDiff": "lab", "Comparison": "lab", "Report": "lab",
    "load_testbed": "lab", "load_profile": "lab", "load_plan": "lab", "plan": "lab", "planner": "lab", "diff": "lab", "Reproduction": "lab", "compare": "lab",
    "editor": "lab", "setup_notebook": "lab", "glue": "ui.glue",
    "Testbed": "config.testbed", "Profile": "config.profile", "Plan": "config.plan", "Workload": "planning.costs",
    "ConfigError": "config.errors", "InfeasibleError": "config.errors", "PlanError": "config.errors",
    "EdgeshardError": "config.errors",
}
__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(f"{__name__}.{_API[name]}"), name)
    raise AttributeError(f"module 'edgeshard' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_API))
