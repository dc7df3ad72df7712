"""Leave-future-out validation, E fixed or with a prior, VPNLS, stderr weights, --metric, the leaves-data
warning and the LR law (t5like/scaling/validate.py, vpnls.py, lrlaw.py). Pure numpy fits on synthetic
tables: no training.

The synthetic law has alpha != beta (0.30 and 0.45), so N_opt ∝ C^a with a = beta/(alpha+beta) = 0.6,
away from Chinchilla's symmetric 0.5 that a biased fit could drift to.
"""
import csv
import dataclasses
import json
import os

import numpy as np
import pytest

from t5like.scaling import ChinchillaLaw, from_arrays, synthetic_isoflop
from t5like.scaling.__main__ import main
from t5like.scaling.fit import Fit, hoffmann_grid, _leaves_data, _parametric_params, fit_isoflop, fit_parametric, fit_powerlaw
from t5like.scaling.validate import validate

LAW = ChinchillaLaw(E=1.8, A=300.0, B=2000.0, alpha=0.30, beta=0.45)
BUDGETS = np.logspace(17, 21, 9)
PORIAN = "/work/shared/scaling-data/porian2024/porian2024_isoflop_points.csv"


@pytest.fixture(scope="module")
def noisy():
    return synthetic_isoflop(LAW, budgets=BUDGETS, sizes_per_budget=9, span_decades=1.5, noise=0.005, seed=1)


def write_table(path, data, extra=None):
    cols = {"params": data.params, "tokens": data.tokens, "flops": data.flops, "budget": data.budget,
            "final_eval_loss": data.loss, **(extra or {})}
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(list(cols))
        w.writerows(zip(*cols.values()))
    return str(path)


def test_fits_recover_law_with_unequal_exponents_and_weight_by_stderr(noisy):
    vp = fit_parametric(noisy, method="vpnls")
    assert abs(vp.params["a"] - LAW.a) < 0.02, vp.params
    assert abs(vp.params["E"] - LAW.E) < 0.05 and abs(vp.params["alpha"] / LAW.alpha - 1) < 0.1, vp.params
    hub = fit_parametric(noisy, starts=hoffmann_grid(coarse=True))  # Huber on ln L (JAX L-BFGS)
    assert abs(hub.params["a"] - LAW.a) < 0.02, hub.params
    iso = fit_isoflop(noisy)
    assert abs(iso.params["a"] - LAW.a) < 0.02, iso.params
    # E held at the truth: the frontier exponent alpha·beta/(alpha+beta) comes back
    pl = fit_powerlaw(noisy, E_fixed=LAW.E)
    assert pl.params["E"] == LAW.E and abs(pl.params["alpha"] - LAW.frontier_alpha) < 0.01, pl.params
    # A prior with a tiny sd pins E at its mean; a loose one leaves the fit where the data put it.
    tight = fit_parametric(noisy, method="vpnls", E_prior=(1.6, 1e-4))
    assert abs(tight.params["E"] - 1.6) < 1e-3 and tight.details["E_prior"] == [1.6, 1e-4]
    loose = fit_parametric(noisy, method="vpnls", E_prior=(1.6, 10.0))
    assert abs(loose.params["E"] - vp.params["E"]) < 0.01
    # Corrupt a third of the runs by +4%: with their stderr 100× the others' the weighted fit ignores them.
    rng = np.random.default_rng(0)
    bad = rng.random(len(noisy)) < 0.33
    loss = noisy.loss * np.where(bad, 1.04, 1.0)
    se = np.where(bad, 0.5, 0.005)
    plain = fit_parametric(from_arrays(noisy.params, noisy.tokens, loss, noisy.flops, noisy.budget), method="vpnls")
    weighted = fit_parametric(from_arrays(noisy.params, noisy.tokens, loss, noisy.flops, noisy.budget, stderr=se),
                              method="vpnls")
    assert abs(weighted.params["a"] - LAW.a) < 0.02 and abs(weighted.params["E"] - LAW.E) < 0.05, weighted.params
    assert abs(weighted.params["E"] - LAW.E) < abs(plain.params["E"] - LAW.E)


def test_validate_on_an_exact_law_has_no_error_and_writes_json(tmp_path, capsys):
    exact = synthetic_isoflop(LAW, budgets=BUDGETS[:6], sizes_per_budget=9, span_decades=1.5, noise=0.0)
    r = validate(exact, variants=("parametric_vpnls", "isoflop"), bootstrap=20)
    assert r["held_out_budgets"] == [BUDGETS[5]] and len(r["fitted_budgets"]) == 5
    m = r["measured"][0]
    assert m["loss"] == pytest.approx(LAW.loss(LAW.n_opt(BUDGETS[5]), LAW.d_opt(BUDGETS[5])), rel=1e-12)
    vp = r["approaches"]["parametric_vpnls"]
    h = vp["holdout"][0]
    assert abs(h["loss_error"]) < 1e-5 and h["loss_in_interval"], h
    assert abs(h["predicted"]["N_opt"] / LAW.n_opt(BUDGETS[5]) - 1) < 1e-3
    assert abs(vp["dloss_dE"]) > 0 and len(vp["E_profile"]["rows"]) >= 2 and not vp["leaves_data"]
    assert not h["above_fitted_frontier"]
    assert abs(r["approaches"]["isoflop"]["holdout"][0]["N_opt_ratio"] - 1) < 0.05
    # Fitting only the runs within 2% of each budget's best keeps fewer runs and the same exact prediction
    near = validate(exact, variants=("parametric_vpnls",), bootstrap=0, profile=False, near=0.02)
    assert 15 <= near["n_fitted_runs"] < r["n_fitted_runs"]
    assert abs(near["approaches"]["parametric_vpnls"]["holdout"][0]["loss_error"]) < 1e-5
    # The CLI on the same table (as a file), with --metric bpb reading the bpb column and its stderr
    path = write_table(tmp_path / "r.csv", exact, {"final_eval_bpb": exact.loss / 3.0,
                                                    "final_eval_bpb_stderr": np.full(len(exact), 1e-4)})
    out = str(tmp_path / "v.json")
    assert main(["validate", path, "--metric", "bpb", "--approach", "parametric_vpnls", "--bootstrap", "10",
                 "--split", str(BUDGETS[3]), "--out", out]) == 0
    d = json.load(open(out))
    assert d["metric"] == "bpb" and d["units"] == "bits/byte" and d["stderr_column"] == "final_eval_bpb_stderr"
    assert len(d["held_out_budgets"]) == 2
    for h in d["approaches"]["parametric_vpnls"]["holdout"]:
        assert abs(h["loss_error"]) < 1e-3 and h["loss_in_interval"] and "interval_with_stderr" in h
    assert "parametric_vpnls" in capsys.readouterr().out


def test_validate_bad_input_is_named(tmp_path, capsys):
    two = synthetic_isoflop(LAW, budgets=BUDGETS[:2], sizes_per_budget=5, noise=0.0)
    path = write_table(tmp_path / "two.csv", two)
    three = write_table(tmp_path / "three.csv", synthetic_isoflop(LAW, budgets=BUDGETS[:3], sizes_per_budget=5))
    cases = [([path], "at least 2 budgets to fit on"),
             ([three, "--holdout", str(BUDGETS[0])], "below the largest fitted budget"),
             ([three, "--metric", "bpb"], "--metric bpb: missing column 'bpb'"),
             ([three, "--split", str(BUDGETS[2])], "nothing is held out"),
             ([three, "--holdout", "5e30"], "no budget within 10%"),
             ([three, "--near-optimum", "0"], "relative loss window")]
    for argv, message in cases:
        assert main(["validate", *argv, "--bootstrap", "0"]) == 2, argv
        assert message in capsys.readouterr().err, argv


def test_a_law_above_the_measured_frontier_warns():
    # Porian et al. 2024 (RefinedWeb, no decay): our Huber fit's law, E = 3.131, on a frontier reaching 3.097
    theta = np.array([np.log(2.118e4), np.log(8.603e5), np.log(3.131), 0.6298, 0.7085])
    fit = Fit("parametric", {k: float(v) for k, v in _parametric_params(theta, 6.0).items()})
    N = np.array([1e8, 3e8, 6e8])
    data = from_arrays(N, 2.56e19 / (6 * N), [3.13, 3.097, 3.11])
    warnings = _leaves_data(fit, data)
    assert warnings and "leaves its data" in warnings[0] and "E = 3.131" in warnings[0]
    assert fit.details["leaves_data"]["predicted"] > 3.097
    assert fit.predict(1e21)["loss"] > 3.097  # what `predict --flops 1e21` gave without a warning
    # A law below its data does not warn.
    ok = Fit("parametric", {k: float(v) for k, v in _parametric_params(theta - [0, 0, 0.2, 0, 0], 6.0).items()})
    assert _leaves_data(ok, data) == []


@pytest.mark.skipif(not os.path.exists(PORIAN), reason="needs ../shared/scaling-data (not part of the repo)")
def test_validate_flags_porian_no_decay():
    from t5like.scaling import load_csv
    data = load_csv(PORIAN, params_column="N", tokens_column="D", flops_column="flops", budget_column="flops",
                    where=["dataset=RefinedWeb", "experiment=Optimizer tuning (no decay)"])
    r = validate(data, split=3.2e18, variants=("parametric_vpnls",), bootstrap=0, profile=False)
    a = r["approaches"]["parametric_vpnls"]
    assert a["leaves_data"] and any("leaves its data" in w for w in a["warnings"])
    assert all(h["above_fitted_frontier"] for h in a["holdout"])


def test_lr_law_fits_and_the_design_reads_it(tmp_path, capsys):
    from experiments import scaling_tiny
    from t5like.scaling.design import plan_isoflop
    from t5like.scaling.lrlaw import load_lr_law

    coef, k = 0.5, -0.1
    rows = []
    for C in (1e11, 1e12, 1e13):
        for lr in np.geomspace(1e-4, 1e-1, 7):
            loss = 3.0 + 0.05 * (np.log(lr) - np.log(coef * C ** k)) ** 2
            rows.append([1e4, C / 6e4, C, lr, 16 if C < 1e12 else 32, "ok", loss])
    path = tmp_path / "lr.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["params", "tokens", "flops", "lr", "batch_size", "status", "final_eval_loss"])
        w.writerows(rows)
    out = str(tmp_path / "lr_law.json")
    assert main(["lr-law", str(path), "--out", out]) == 0
    law = load_lr_law(out)
    assert law.lr_exponent == pytest.approx(k, abs=1e-6) and law.lr_coef == pytest.approx(coef, rel=1e-4)
    assert law.batch_exponent > 0 and all(p["how"] == "parabola vertex" for p in law.points)
    design = dataclasses.replace(scaling_tiny.design(), lr_law=out)
    plan = plan_isoflop(scaling_tiny.config(), design)
    for t in plan.trials:
        lr = float(dict(o.split("=", 1) for o in t.overrides)["optim.learning_rate"])
        assert lr == pytest.approx(coef * t.budget ** k, rel=1e-3) and "lr law" in t.lr_rule
    assert plan.lr_rule.startswith("lr = 0.5") and json.load(open(out))["of"] == "flops"
    with pytest.raises(ValueError, match="design.lr_law"):
        plan_isoflop(scaling_tiny.config(), dataclasses.replace(design, lr_law=str(tmp_path / "missing.json")))
    assert main(["lr-law", str(path), "--lr-column", "nope"]) == 2
    assert "--lr-column 'nope'" in capsys.readouterr().err
