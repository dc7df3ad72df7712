"""experiments/scaling_tiny.py with cooldown forks: one stable run per model size, each budget a wsd cooldown
forked from it (Hägele et al. 2024), so S sizes × B budgets cost S runs plus short cooldowns.

    python -m launch.sweep experiments.scaling_tiny_forks --workdir /tmp/sweep_tiny_forks --parallel 2
    python -m t5like.scaling.design --experiment experiments.scaling_tiny_forks     # the plan: stable runs and forks

The budgets are 4× apart and the 5 sizes per budget 2× apart (span 1/4–4), so each budget's sizes are its
neighbour's shifted by one: 3 budgets make 14 forks of 6 stable runs (the smallest target at the smallest
budget maps to its neighbour's shape). A size keeps one batch and warmup at every budget, which the plain
design changes from budget to budget (docs/scaling.md#cooldown-forks).
"""
import dataclasses

from experiments.scaling_tiny import config, prepare  # noqa: F401  (the same family, tokenizer and data)
from t5like import train
from t5like.scaling.design import IsoFlopDesign, Trial, plan_isoflop
from experiments import scaling_tiny


def design() -> IsoFlopDesign:
    return dataclasses.replace(scaling_tiny.design(), budgets=(1.25e11, 5e11, 2e12), cooldown_forks=True,
                               cooldown_fraction=0.2)


def sweep() -> list[Trial]:
    return list(plan_isoflop(config(), design()).trials)


if __name__ == "__main__":
    result = train.main(config)
    print(result.closing_line())
