"""Plan -> trials: import an experiment module, call its sweep() and check every trial before anything runs.

The experiment declares `sweep() -> list[Trial]` (an IsoFLOP plan, `grid(..., config=config())` or
`random_search(..., config=config())` from t5like.scaling.design) and, optionally, `prepare(workdir) ->
list[str]` (run once by the driver before any trial, e.g. to train a shared tokenizer; returns overrides
for every trial). An IsoFLOP experiment (config() and design(), sweep() their plan) can be re-planned
with other budgets or sizes per budget (launch.sweep --budgets, --sizes).
"""
from __future__ import annotations

import dataclasses
import importlib
import os
import re
from typing import Callable, Optional

from t5like.config import apply_overrides
from t5like.scaling.design import Trial, plan_isoflop, resize, trial_id

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


def _replan(module, module_name: str, trials: tuple, budgets, sizes) -> tuple:
    """The experiment's IsoFLOP plan with other budgets and/or sizes per budget (launch.sweep --budgets,
    --sizes; the same rule as `python -m t5like.scaling.design --budgets --sizes`)."""
    flags = " ".join(f for f, v in (("--budgets", budgets), ("--sizes", sizes)) if v is not None)
    if not all(callable(getattr(module, f, None)) for f in ("config", "design")):
        raise ValueError(f"{flags}: these re-plan an IsoFLOP design, and {module_name} has no config() and design() "
                         "(its sweep() is a grid, a random search or hand-made trials); to run fewer trials, give "
                         "its sweep() a smaller space, e.g. fewer values per grid key.")
    base, design = module.config(), module.design()
    if {t.id for t in plan_isoflop(base, design).trials} != {t.id for t in trials}:
        raise ValueError(f"{flags}: {module_name}.sweep() is not plan_isoflop(config(), design()), so the runner "
                         "cannot re-plan it with other budgets or sizes; change design() (or sweep()) instead.")
    return tuple(plan_isoflop(base, resize(design, budgets, sizes)).trials)


def load_sweep(module_name: str, extra: tuple[str, ...] = (), budgets: Optional[list[float]] = None,
               sizes: Optional[int] = None) -> Sweep:
    """Import the experiment, call its sweep() and check the trials. Extra overrides are added to every
    trial and change its id (it is a different run). `budgets`/`sizes` re-plan an IsoFLOP experiment
    (config() and design()) with other budgets or sizes per budget, as the design CLI's flags do."""
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise ValueError(f"experiment {module_name!r} cannot be imported ({e}); give a module path such as "
                         "experiments.scaling_tiny, run from the repository root.") from None
    if not callable(getattr(module, "sweep", None)):
        raise ValueError(f"experiment {module_name} has no sweep() function; define sweep() -> list[Trial] "
                         "(an IsoFLOP plan's trials, or grid(..., config=config()) / random_search(..., config=config()) "
                         "from t5like.scaling.design).")
    trials = module.sweep()
    trials = tuple(getattr(trials, "trials", trials))  # a Plan is fine too
    if not trials:
        raise ValueError(f"{module_name}.sweep() returned no trials; nothing to run.")
    if budgets is not None or sizes is not None:
        trials = _replan(module, module_name, trials, budgets, sizes)
    for item in extra:
        if "=" not in item or item.startswith("workdir="):
            raise ValueError(f"--set {item!r}: give key=value config overrides (the runner sets workdir itself).")
    if extra and callable(getattr(module, "config", None)):  # a typo would fail every trial, one by one
        try:
            apply_overrides(module.config(), list(extra))
        except ValueError as e:
            raise ValueError(f"--set {' '.join(extra)}: {e}") from None
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
        if t.parent is not None and (t.parent not in {u.id for u in trials} or not isinstance(t.fork_step, int)
                                     or t.fork_step <= 0):
            raise ValueError(f"trial {t.id} is a fork of {t.parent!r} at step {t.fork_step!r}, but its parent is not a "
                             f"trial of {module_name}.sweep() or the step is not a positive integer; return the "
                             "stable run with its forks (plan_isoflop with design.cooldown_forks=True does).")
        if extra:
            t = dataclasses.replace(t, id=trial_id(t.id, extra), overrides=(*t.overrides, *extra),
                                    parent=trial_id(t.parent, extra) if t.parent else None)
        checked.append(t)
    prepare = getattr(module, "prepare", None)
    return Sweep(module_name, tuple(checked), prepare if callable(prepare) else None)
