"""The CPU scaling demo's design (experiments/scaling_demo.py): the rules its docstring states hold for every
sweep trial, and the held-out run (holdout_design) follows the same rules at its budget, sized on the N asked."""
import math

from experiments import scaling_demo
from t5like.config import apply_overrides
from t5like.scaling.design import plan_isoflop


def _configs(plan):
    base = scaling_demo.config()
    return [(t, apply_overrides(base, list(t.overrides)).validate()) for t in plan.trials]


def test_sweep_and_holdout_share_the_rules():
    sweep = _configs(plan_isoflop(scaling_demo.config(), scaling_demo.design()))
    budgets = sorted({t.budget for t, _ in sweep if t.budget is not None})
    assert budgets == sorted(scaling_demo.BUDGETS) and all(math.isclose(b / a, 2 ** 0.5, rel_tol=0.01)
                                                           for a, b in zip(budgets, budgets[1:]))
    n_target = 2.3e5
    held = _configs(plan_isoflop(scaling_demo.config(), scaling_demo.holdout_design(scaling_demo.HOLDOUT, n_target)))
    assert [t.budget for t, _ in held] == [None, scaling_demo.HOLDOUT]  # a stable run and its fork
    stable, fork = held
    assert fork[0].parent == stable[0].id and abs(fork[0].flops / scaling_demo.HOLDOUT - 1) < 0.01
    assert abs(math.log(fork[0].params / n_target)) < math.log(1.5)
    base_lr, base_d = scaling_demo.config().optim.learning_rate, scaling_demo.config().model.d_model
    for t, cfg in sweep + held:
        assert cfg.train.batch_size == 16, t.id  # one batch everywhere: no batch confound between budgets
        assert cfg.model.num_layers >= 2, t.id   # no 1-layer models
        assert math.isclose(cfg.optim.learning_rate, base_lr * (base_d / cfg.model.d_model) ** 0.5, rel_tol=1e-3)
        assert cfg.optim.schedule == ("constant" if t.budget is None else "wsd"), t.id
        assert cfg.seed == 1 and cfg.train.eval_steps == 64, t.id  # the third design's fresh seed and eval set


def test_the_stated_prediction_fits_on_a_sweep_shaped_table():
    """PREDICTION (fixed before the sweep) names an approach and E that the fit accepts, and it predicts a loss
    at the held-out budget: a typo there would otherwise surface only after the 20-minute sweep."""
    import numpy as np
    from t5like.scaling import ChinchillaLaw, run_fit, synthetic_isoflop
    rule = scaling_demo.PREDICTION
    law = ChinchillaLaw(E=0.5)  # E below the losses, as on the demo's table
    data = synthetic_isoflop(law, budgets=np.array(scaling_demo.BUDGETS), sizes_per_budget=6, seed=0)
    fit = run_fit(data, rule["approach"], E_fixed=rule["E_fixed"], bootstrap=20)
    pred = float(fit.predict(scaling_demo.HOLDOUT)["loss"])
    assert abs(fit.params["E"] - rule["E_fixed"]) < 1e-12 and 0 < pred < data.loss.min()
    assert fit.predict_interval(scaling_demo.HOLDOUT)["loss"].shape == (2,)
