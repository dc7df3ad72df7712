"""The CPU scaling-law demo's design (benchmarks/scaling_demo.py): cooldown forks over 5 budgets sqrt(2) apart.

    python -m t5like.scaling.design --experiment experiments.scaling_demo     # the plan
    python benchmarks/scaling_demo.py --workdir runs/scaling_demo             # sweep, fit, held-out run, error

Rules (issue 28's causes of the earlier +14% miss, each answered):
- 5 budgets sqrt(2) apart (5e11-2e12 FLOPs) instead of 3 spanning 10x; the held-out run is at 8e12.
- Every model has 2 layers (min_layers = max_layers = 2); only the width (d_model 16-128, head_dim 8)
  changes N. A 1-layer model is worse than a 2-layer one of the same N, and a 3-layer d_model 24 model
  was worse than the 2-layer d_model 32 one in a first sweep (below): L(N, D) cannot represent depth.
- One batch (16) for every trial and for the held-out run: max_steps is high enough that the batch rule
  never doubles it, so batch is no confound between budgets.
- Cooldown forks (Hägele et al. 2024): one constant-lr run per size, each budget a wsd cooldown (last 20%)
  forked from it, so a size that several budgets pick costs one run plus short cooldowns.
- lr = 3e-3 · (64 / d_model)^0.5 (the design's default sp rule), warmup 5% of the size's smallest budget.
- Sizes: 6 targets over 0.45-2.2x sqrt(C / (6 · 60)) per budget (sizes repeating a neighbour's shape
  are dropped), wide enough to bracket each budget's optimum; the optimum moves faster than sqrt(C) here.

A first design (4 budgets 2x apart from 2.5e11, up to 3 layers, 5 sizes over 0.5-2x sqrt(C / (6 · 40)))
could not be fitted: the optimum at 2.5e11 and 5e11 lay below the smallest size, so Approach 2 had 2
budgets of the 3 it needs. This design is the second, changed on the sweep alone (no held-out run had
been made).
The held-out run follows the same rules: `holdout_design(C, N)` is this design at one budget with one size
centred on N (a stable run plus its fork, like every size here).

The third version (this one), fixed before its sweep ran, after the second missed by about 6% (docs/scaling.md):
- The demo's answer is stated in advance: Approach 2's loss law, L_opt(C) = E + (C0/C)^alpha through the
  IsoFLOP parabolas' minima, with E pinned at 0.001 (a pure power law; PREDICTION below). The parabola
  minimum of a budget averages its 6 runs, where the frontier power law takes its single best run; a free E
  fitted the second sweep's noise as curvature. Every other approach is still printed.
- seed=1 (a fresh sweep: the pinned-E rule was chosen after seeing seed 0's held-out runs).
- eval_steps=64: 1024 eval sequences (131K tokens) instead of 256, so each run's eval loss depends less on a
  few files of the held-out split.
"""
import dataclasses

from experiments import scaling_tiny
from experiments.scaling_tiny import prepare  # noqa: F401  (the same family, tokenizer and data)
from t5like import train
from t5like.config import Config
from t5like.scaling.design import IsoFlopDesign, Trial, plan_isoflop

BUDGETS = (5e11, 7.07e11, 1e12, 1.41e12, 2e12)
HOLDOUT = 4 * BUDGETS[-1]
PREDICTION = {"approach": "isoflop", "E_fixed": 0.001}  # the demo's answer, fixed before the sweep ran


def config() -> Config:
    base = scaling_tiny.config()
    return dataclasses.replace(base, seed=1, train=dataclasses.replace(base.train, eval_steps=64),
                               workdir="runs/scaling_demo")


def design() -> IsoFlopDesign:
    return IsoFlopDesign(budgets=BUDGETS, sizes_per_budget=6, span=(0.45, 2.2), tokens_per_param=60.0,
                         head_dim=8, aspect_ratio=32.0, aspect_range=(8.0, 64.0), min_layers=2, max_layers=2,
                         min_steps=100, max_steps=100_000, batch_multiple=8, lr_exponent=0.5,
                         warmup_fraction=0.05, checkpoints_per_trial=2, cooldown_forks=True, cooldown_fraction=0.2)


def holdout_design(budget: float, n_opt: float) -> IsoFlopDesign:
    """The same rules at one budget and one size, centred on `n_opt` (the fitted optimum)."""
    return dataclasses.replace(design(), budgets=(float(budget),), sizes_per_budget=1, span=(1.0, 1.0),
                               min_sizes_per_budget=1, tokens_per_param=budget / (6.0 * n_opt ** 2))


def sweep() -> list[Trial]:
    return list(plan_isoflop(config(), design()).trials)


if __name__ == "__main__":
    result = train.main(config)
    print(result.closing_line())
