"""Errors that carry enough context for a user to fix their input.

Every message names where the problem is (file, key or value) and what to change.
"""


class EdgeshardError(Exception):
    """Base class: the CLI prints these without a traceback."""

    exit_code = 1


class ConfigError(EdgeshardError, ValueError):
    """A testbed, profile or plan file is malformed.

    `where` is "file: key" (or just a file), `problem` what is wrong, `fix` what to change.
    """

    def __init__(self, where: str, problem: str, fix: str = ""):
        self.where, self.problem, self.fix = where, problem, fix
        msg = f"{where}: {problem}"
        if fix:
            msg += f" ({fix})"
        super().__init__(msg)


class InfeasibleError(EdgeshardError):
    """No plan satisfies the constraints; the message names the shortfall. CLI exit code 2."""

    exit_code = 2


class PlanError(EdgeshardError, ValueError):
    """A plan breaks the cost model's rules (coverage, source pinning, devices, memory)."""


class PlanRefused(PlanError):
    """A given plan (`edgeshard plan ... --from PLAN.json`) breaks a rule of the cost model; the message names every
    rule it breaks. CLI exit code 2, as for an infeasible plan."""

    exit_code = 2
