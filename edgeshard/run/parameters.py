"""RunConfig: what a run was asked to do, exactly the fields of a run folder's parameters.json.

    cfg = RunConfig("smollm2-135m", ["Hello"], 16, mode="pipeline", max_in_flight=2)
    cfg.save(run_dir / "parameters.json")            # run/folder.RunFolder does this for every run
    again = RunConfig.load(run_dir / "parameters.json").for_reproduction()   # run/reproduce.py

Two kinds of field. The settings (model ... debug_logits) decide what the devices compute; reproduce re-runs
them unchanged. The record (command, run_id, testbed, testbed_state) says how this one run was started and
where; run/runtime.Run fills it in, and for_reproduction() clears it so the new run records its own.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from edgeshard.config.errors import ConfigError

MODES = ("sequential", "pipeline")
RECORD_FIELDS = ("command", "run_id", "testbed", "testbed_state")


@dataclass(frozen=True)
class RunConfig:
    # --- settings: reproduce re-runs exactly these --------------------------------------------------------
    model: str  # a catalog name (config/catalog.py) or a local model folder
    prompts: tuple[str, ...]  # one sequence per prompt; a str is one prompt
    max_new_tokens: int
    mode: str = "sequential"  # one of MODES
    dtype: str = "float32"
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0
    chat: bool = False  # wrap each prompt in the model's chat template
    # sequences in flight: sequential is always 1; pipeline None means all prompts at once
    max_in_flight: int | None = None
    debug_logits: bool = False  # fetch the last stage's logits into each result (tests)
    # --- record: how this run was started (filled by runtime.Run; cleared by for_reproduction) ------------
    command: tuple[str, ...] | None = None  # argv of the process that started the run
    run_id: str | None = None  # tags every event of the run (the devices drop stale ones)
    testbed: str | None = None  # the testbed's name
    testbed_state: dict | None = None  # the state file of the testbed while it ran (testbeds/)

    def __post_init__(self):
        prompts = [self.prompts] if isinstance(self.prompts, str) else list(self.prompts or ())
        # a prompt is text, or a list of token ids (random-weight models have no tokenizer: device/client.submit)
        ok = [isinstance(p, str) or (isinstance(p, (list, tuple)) and p and
                                     all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in p))
              for p in prompts]
        if not prompts or not all(ok):
            raise ValueError(f"prompts = {self.prompts!r}: give at least one prompt (text, or a list of token ids)")
        object.__setattr__(self, "prompts", tuple(p if isinstance(p, str) else list(p) for p in prompts))
        if self.mode not in MODES:
            raise ValueError(f"mode {self.mode!r} is not one of {', '.join(MODES)}")
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens = {self.max_new_tokens!r} must be a positive integer")
        m = self.max_in_flight
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
            raise ValueError(f"max_in_flight = {m!r} must be a positive integer, or None for all prompts at once")
        if self.mode == "sequential":  # one sequence at a time whatever was asked: record what ran
            object.__setattr__(self, "max_in_flight", 1)
        if self.command is not None:
            object.__setattr__(self, "command", tuple(str(x) for x in self.command))

    @property
    def in_flight(self) -> int:
        """Sequences the controller keeps in flight at most."""
        return min(self.max_in_flight or len(self.prompts), len(self.prompts))

    def settings(self) -> dict:
        """The settings only (what decides the tokens and timings), as a dict."""
        return {k: v for k, v in self.to_dict().items() if k not in RECORD_FIELDS}

    def for_reproduction(self) -> "RunConfig":
        """The same settings with the record cleared: what reproduce runs again."""
        return dataclasses.replace(self, **{k: None for k in RECORD_FIELDS})

    # --- parameters.json ------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """parameters.json's object: every field, prompts and command as lists."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["prompts"] = list(self.prompts)
        if self.command is not None:
            d["command"] = list(self.command)
        return d

    def dumps(self) -> str:
        return json.dumps(self.to_dict(), indent=1, default=str) + "\n"

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.dumps())

    @classmethod
    def from_dict(cls, raw, where: str = "<parameters>") -> "RunConfig":
        """A RunConfig from parameters.json's object; a ConfigError names a missing, unknown or bad key."""
        if not isinstance(raw, dict):
            raise ConfigError(where, "is not a JSON object", "parameters.json is written by runtime.Run")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(raw) - set(names))
        if unknown:
            raise ConfigError(where, f"unknown key(s) {', '.join(unknown)}", f"the keys are {', '.join(names)}")
        missing = [k for k in ("model", "prompts", "max_new_tokens") if k not in raw]
        if missing:
            raise ConfigError(where, f"missing key(s) {', '.join(missing)}", "parameters.json is written by runtime.Run")
        try:
            return cls(**raw)
        except (TypeError, ValueError) as e:
            raise ConfigError(where, str(e), "fix the value or re-run to record it again") from None

    @classmethod
    def load(cls, path: str | Path) -> "RunConfig":
        p = Path(path)
        try:
            raw = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(str(p), f"is not JSON ({e})", "parameters.json is written by runtime.Run") from None
        return cls.from_dict(raw, str(p))
