"""Plan -> trials: import an experiment module, call its sweep() and check every trial before anything runs.

The experiment declares `sweep() -> list[Trial]` (an IsoFLOP plan, `grid(...)` or `random_search(...)` from
t5like.scaling.design) and, optionally, `prepare(workdir) -> list[str]` (run once by the driver before any
trial, e.g. to train a shared tokenizer; returns overrides for every trial).
"""
from __future__ import annotations

import dataclasses
import importlib
import os
import re
from typing import Callable, Optional

from t5like.scaling.design import Trial, trial_id

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclasses.dataclass(frozen=True)
class Sweep:
    module: str                         # run as `python -m module`
    trials: tuple[Trial, ...]
    prepare: Optional[Callable[[str], list[str]]] = None

    @property
    def isoflop(self) -> bool:
        return any(t.budget is not None for t in self.trials)


def trial_dir(workdir: str, trial: Trial) -> str:
    """DIR/trials/ID (DIR may be gs://...; plain string joins keep the scheme)."""
    return os.path.join(str(workdir), "trials", trial.id)


def load_sweep(module_name: str, extra: tuple[str, ...] = ()) -> Sweep:
    """Import the experiment, call its sweep() and check the trials. Extra overrides are added to every
    trial and change its id (it is a different run)."""
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise ValueError(f"experiment {module_name!r} cannot be imported ({e}); give a module path such as "
                         "experiments.scaling_tiny, run from the repository root.") from None
    if not callable(getattr(module, "sweep", None)):
        raise ValueError(f"experiment {module_name} has no sweep() function; define sweep() -> list[Trial] "
                         "(an IsoFLOP plan's trials, or grid(...) / random_search(...) from t5like.scaling.design).")
    trials = module.sweep()
    trials = tuple(getattr(trials, "trials", trials))  # a Plan is fine too
    if not trials:
        raise ValueError(f"{module_name}.sweep() returned no trials; nothing to run.")
    for item in extra:
        if "=" not in item or item.startswith("workdir="):
            raise ValueError(f"--set {item!r}: give key=value config overrides (the runner sets workdir itself).")
    seen = set()
    checked = []
    for t in trials:
        if not isinstance(t, Trial):
            raise ValueError(f"{module_name}.sweep() returned {t!r}; it must return Trial objects.")
        if not _ID.match(t.id):
            raise ValueError(f"trial id {t.id!r} is not a safe directory name; use letters, digits, '.', '_', '-'.")
        if t.id in seen:
            raise ValueError(f"trial id {t.id!r} appears twice in {module_name}.sweep(); ids must be unique.")
        seen.add(t.id)
        for item in t.overrides:
            if "=" not in item or item.split("=", 1)[0] == "workdir":
                raise ValueError(f"trial {t.id}: override {item!r} must be key=value and not workdir "
                                 "(the runner gives each trial DIR/trials/ID).")
        if extra:
            t = dataclasses.replace(t, id=trial_id(t.id, extra), overrides=(*t.overrides, *extra))
        checked.append(t)
    prepare = getattr(module, "prepare", None)
    return Sweep(module_name, tuple(checked), prepare if callable(prepare) else None)
