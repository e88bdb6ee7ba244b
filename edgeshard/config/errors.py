"""Errors that carry enough context for a user to fix their input.

Every message names where the problem is (file, key or value) and what to change.
"""


class EdgeshardError(Exception):
    """Base class: the CLI prints these without a traceback."""

    exit_code = 1


class ConfigError(EdgeshardError, ValueError):
    """A testbed, profile or plan file is malformed.

    The message is "WHERE: PROBLEM (FIX)": `where` is "file: key" (or just a file), `problem` what is wrong,
    `fix` what to change. The same place as data, for code that points at the field (ui/widgets.py
    TestbedEditor puts the error next to its widget from these, never from the text):
      file     the file (or "<editor>", "command line") the value came from
      section  the table or array of tables: "device", "link", "shared_cores", "defaults", "constraints",
               "stages"; None for the top level
      index    position in that array of tables (device[2] -> 2), None for a plain table
      key      the key the problem is about ("memory_gib", "source", the unknown key), None when it is the
               whole table
    """

    def __init__(self, where: str, problem: str, fix: str = "", *, file: str | None = None,
                 section: str | None = None, index: int | None = None, key: str | None = None):
        self.where, self.problem, self.fix = where, problem, fix
        self.file, self.section, self.index, self.key = file, section, index, key
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
