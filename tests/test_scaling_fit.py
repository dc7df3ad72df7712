"""Tests for t5like.scaling: parameter recovery on synthetic sweeps, bootstrap coverage, bad input, CLI.

Synthetic sweeps come from Hoffmann et al.'s law L = 1.69 + 406.4/N^0.34 + 410.7/D^0.28 on IsoFLOP grids
(D = C/(6N)) with 1% multiplicative noise. For that law N_opt ∝ C^a with a = beta/(alpha+beta) = 0.4516,
D_opt ∝ C^b with b = 0.5484, and the compute frontier is L*(C) = E + K·C^-(alpha·beta/(alpha+beta)).
"""
import contextlib
import csv
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats

from t5like.scaling import (ChinchillaLaw, Fit, compute_groups, fit_envelope, fit_isoflop, fit_parametric, fit_powerlaw,
                            from_arrays, frontier, load_csv, load_fits, run_fit, synthetic_isoflop)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAW = ChinchillaLaw()
# A dense sweep (13 budgets over 6 decades × 15 sizes over 1.5 decades) for the approaches that use
# only part of the data (frontier, envelope, per-budget minima).
DENSE = dict(budgets=np.logspace(17, 23, 13), sizes_per_budget=15)
# The fits' time is their L-BFGS iterations, not compiling them (tests/xla.py).
XLA_DEFAULT_OPTIMIZATION = True

# Starts for the coverage test: the point is the bootstrap's calibration, not the global search (the
# full Hoffmann grid is tested in test_parametric_recovers_law).
FEW_STARTS = np.array([[6.0, 6.0, 0.5, 0.35, 0.3], [5.0, 5.0, 0.0, 0.5, 0.5], [10.0, 10.0, 0.5, 0.5, 0.5],
                       [15.0, 15.0, 0.0, 1.0, 1.0]])


@pytest.fixture(scope="module")
def sweep():
    """9 budgets (1e18..1e22) × 9 sizes, centred on the true optimum: the classic IsoFLOP design."""
    return synthetic_isoflop(LAW, seed=0)


@pytest.fixture(scope="module")
def dense():
    return synthetic_isoflop(LAW, seed=0, **DENSE)


def write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return str(path)


# ------------------------------------------------------------------------------------------------
# Recovery


def test_parametric_recovers_law(dense):
    # On this design the estimates' relative sd over 20 seeds was 1.3% (alpha), 1.4% (beta), 0.5% (E),
    # so 5% is a > 3 sd tolerance.
    fit = fit_parametric(dense)  # the full 4500-start Hoffmann grid
    p = fit.params
    assert fit.details["n_starts"] == 4500
    assert abs(p["alpha"] / LAW.alpha - 1) < 0.05, p
    assert abs(p["beta"] / LAW.beta - 1) < 0.05, p
    assert abs(p["E"] / LAW.E - 1) < 0.05, p
    assert abs(p["a"] - LAW.a) < 0.02 and abs(p["b"] - LAW.b) < 0.02, p
    # the derived allocation agrees with the law's own compute-optimal N at 1e21 FLOPs within 25%
    pred = fit.predict(1e21)
    assert abs(np.log(pred["N_opt"] / LAW.n_opt(1e21))) < np.log(1.25)
    assert np.isclose(pred["N_opt"] * pred["D_opt"] * 6, 1e21, rtol=1e-9)
    # many starts reach the best objective: it is not a lucky single start
    assert fit.details["n_starts_at_best"] > 100


def test_powerlaw_recovers_frontier_exponent(dense):
    fit = fit_powerlaw(dense)
    assert abs(fit.params["alpha"] / LAW.frontier_alpha - 1) < 0.05, fit.params
    # the fit passes through the frontier: residuals at the 1% noise level
    fr = frontier(dense.flops, dense.loss)
    resid = np.log(fit.predict(dense.flops[fr])["loss"] / dense.loss[fr])
    assert np.sqrt(np.mean(resid ** 2)) < 0.01


def test_envelope_recovers_allocation_exponents(dense):
    # The lowest-loss run per budget is a noisy pick from a discrete grid (1% noise vs a flat minimum):
    # over 20 seeds the estimate of a had sd 0.03, so the tolerance is 0.08.
    fit = fit_envelope(dense)
    assert abs(fit.params["a"] - LAW.a) < 0.08, fit.params
    assert abs(fit.params["b"] - LAW.b) < 0.08, fit.params
    assert abs(fit.params["a"] + fit.params["b"] - 1) < 1e-9  # N·D = C/6 exactly on this grid
    assert len(fit.details["points"]) == 13


def test_isoflop_recovers_allocation_exponents(dense):
    # Over 20 seeds: mean a = 0.4534 (truth 0.4516), sd 0.007. Tolerance 0.025.
    fit = fit_isoflop(dense)
    assert abs(fit.params["a"] - LAW.a) < 0.025, fit.params
    assert abs(fit.params["b"] - LAW.b) < 0.025, fit.params
    assert len(fit.details["optima"]) == 13 and not fit.details["skipped_budgets"]
    for o in fit.details["optima"]:  # each vertex within 40% of the true N_opt (1% noise, 15 sizes)
        assert abs(np.log(o["N_opt"] / LAW.n_opt(o["budget"]))) < np.log(1.4), o
        assert np.isclose(o["N_opt"] * o["D_opt"] * 6, o["budget"], rtol=1e-9)


def test_isoflop_skips_budgets_without_a_bracketed_minimum():
    # Sizes all far below the optimum: loss only falls with N, so the minimum is not bracketed.
    law = LAW
    C = np.repeat([1e19, 1e20, 1e21, 1e22], 5)
    N = np.concatenate([law.n_opt(c) * np.logspace(-0.5, 0.5, 5) for c in (1e19, 1e20, 1e21)]
                       + [law.n_opt(1e22) * np.logspace(-3, -2, 5)])
    data = from_arrays(N, C / (6 * N), law.loss(N, C / (6 * N)), flops=C, budget=C)
    fit = fit_isoflop(data)
    assert [s["budget"] for s in fit.details["skipped_budgets"]] == [1e22]
    assert "outside the sampled model sizes" in fit.details["skipped_budgets"][0]["reason"]
    assert np.isclose(fit.params["a"], law.a, atol=0.02)  # noise-free: parabola bias only


def test_isoflop_window_fits_sizes_around_the_minimum(sweep):
    fit = fit_isoflop(sweep, window=1, bootstrap=20)
    sizes = np.unique(sweep.params[sweep.budget == sweep.budget[0]])
    first = fit.details["optima"][0]
    # the sweep is centred on the optimum: the lowest-loss size is near the middle, and window=1 keeps 3
    lo, hi = first["N_range"]
    assert np.sum((sizes >= lo * (1 - 1e-12)) & (sizes <= hi * (1 + 1e-12))) == 3
    assert lo <= first["N_opt"] <= hi
    assert abs(fit.params["a"] - LAW.a) < 0.06 and len(fit.samples["a"]) > 0
    full = fit_isoflop(sweep).details["optima"][0]["N_range"]
    assert np.allclose(full, [sizes.min(), sizes.max()])
    with pytest.raises(ValueError, match="window = 0"):
        fit_isoflop(sweep, window=0)


def test_isoflop_loss_law_through_the_parabola_minima(sweep):
    # The Chinchilla law's compute-optimal loss is exactly E + K·C^-(alpha·beta/(alpha+beta)); the loss law
    # through the 9 vertices (1% noise) recovers it, and with E held at the truth, the exponent.
    def truth(C):
        return LAW.loss(LAW.n_opt(C), LAW.d_opt(C))

    free = fit_isoflop(sweep, bootstrap=40)
    held = fit_isoflop(sweep, E_fixed=LAW.E, bootstrap=40)
    assert abs(held.params["alpha"] / LAW.frontier_alpha - 1) < 0.1, held.params
    assert held.params["E"] == pytest.approx(LAW.E) and held.details["loss_law"]["E_fixed"] == LAW.E
    for fit in (free, held):
        pred = fit.predict(1e23)["loss"]  # 10x past the largest budget (1e22)
        assert abs(pred / truth(1e23) - 1) < 0.02, (fit.params, pred, truth(1e23))
        lo, hi = fit.predict_interval(1e23)["loss"]
        assert lo < pred < hi and hi - lo > 0
    vertices = np.array([o["loss_opt"] for o in held.details["optima"]])
    fitted = held.predict(np.array([o["flops"] for o in held.details["optima"]]))["loss"]
    assert np.max(np.abs(fitted / vertices - 1)) < 0.02
    # 3 budgets: enough for N_opt, too few for a free E; the reason is stated and N_opt still fits
    three = sweep.subset(np.flatnonzero(sweep.budget <= np.unique(sweep.budget)[2]))
    few = fit_isoflop(three)
    assert np.isnan(few.params["alpha"]) and "needs 4 budgets' optima" in few.details["loss_law"]
    assert np.isfinite(few.params["a"]) and "loss" in few.predict(1e21) and np.isnan(few.predict(1e21)["loss"])
    assert np.isfinite(fit_isoflop(three, E_fixed=1.0).params["alpha"])
    with pytest.raises(ValueError, match="fixed E = 9.0 is not below the lowest parabola minimum"):
        fit_isoflop(sweep, E_fixed=9.0)


def test_frontier_is_pareto_set():
    flops = np.array([1, 2, 2, 3, 4, 5, 6.0])
    loss = np.array([5, 4, 3.5, 3.6, 3.0, 3.0, 2.0])
    assert frontier(flops, loss).tolist() == [0, 2, 4, 6]


def test_frontier_one_point_per_isoflop_budget():
    # The scaling_tiny shape: 3 budgets x 5 sizes, each run's FLOPs within 1% of its budget (whole steps).
    # Give worse runs slightly less compute, as happens: a plain Pareto set over flops then keeps several
    # runs of one budget. With budgets the frontier is each budget's lowest-loss run, and 3 points are
    # too few for the 3-parameter power law.
    data = synthetic_isoflop(LAW, budgets=[1e18, 1e19, 1e20], sizes_per_budget=5, noise=0.0)
    flops = data.flops.copy()
    for C in np.unique(data.budget):
        rows = np.flatnonzero(data.budget == C)
        rank = np.argsort(np.argsort(-data.loss[rows]))  # 0 = worst run of the budget
        flops[rows] = C * (0.99 + 0.01 * rank / (len(rows) - 1))
    data = from_arrays(data.params, data.tokens, data.loss, flops=flops, budget=data.budget)
    fr = frontier(data.flops, data.loss, data.budget)
    best = [np.flatnonzero(data.budget == C)[np.argmin(data.loss[data.budget == C])] for C in (1e18, 1e19, 1e20)]
    assert fr.tolist() == best
    assert len(frontier(data.flops, data.loss)) > 3  # the plain Pareto set: what the fit used to take
    with pytest.raises(ValueError, match=r"powerlaw fit needs at least 4 runs on the compute frontier.*got 3"):
        fit_powerlaw(data)


def test_groups_merge_nearby_flops_without_budget_column():
    flops = np.array([0.98e18, 1.02e18, 1.01e18, 3.1e18, 2.96e18, 1e19])
    data = from_arrays(np.ones(6), np.ones(6), np.ones(6) * 3, flops=flops)
    gid, budgets = compute_groups(data)
    assert gid.tolist() == [0, 0, 0, 1, 1, 2]
    assert np.allclose(budgets, [np.exp(np.log(flops[:3]).mean()), np.exp(np.log(flops[3:5]).mean()), 1e19])
    gid, _ = compute_groups(data, bins_per_decade=1)  # 1 bin per decade: 1e18 and 3e18 share a bin
    assert gid.tolist() == [0, 0, 0, 0, 0, 1]


# ------------------------------------------------------------------------------------------------
# Bootstrap


def _acceptance(n: int, p: float, tail: float = 0.005) -> tuple[int, int]:
    """Central region of Binomial(n, p) with at most `tail` probability outside on each side."""
    ks = np.arange(n + 1)
    lo = ks[stats.binom.cdf(ks, n, p) > tail][0]
    hi = ks[stats.binom.sf(ks - 1, n, p) > tail][-1]
    return int(lo), int(hi)


def test_bootstrap_coverage_parametric():
    # 40 independent sweeps; 80% intervals from 100 resamples each. If the intervals are calibrated the
    # number covering the truth is Binomial(40, 0.8): we accept its central 99% ([25, 38]). Intervals that
    # are too narrow (e.g. resamples stuck at the full-data optimum) or too wide both fail.
    lo, hi = _acceptance(40, 0.8)
    covered = {"alpha": 0, "beta": 0}
    for draw in range(40):
        data = synthetic_isoflop(LAW, budgets=np.logspace(18, 21, 9), sizes_per_budget=9, seed=1000 + draw)
        fit = fit_parametric(data, starts=FEW_STARTS, bootstrap=100, bootstrap_starts=np.empty((0, 5)),
                             level=0.8, seed=draw)
        for k in covered:
            ci_lo, ci_hi = fit.ci(k)
            covered[k] += ci_lo <= getattr(LAW, k) <= ci_hi
    assert all(lo <= c <= hi for c in covered.values()), (covered, (lo, hi))


def test_bootstrap_coverage_isoflop():
    lo, hi = _acceptance(40, 0.8)
    covered = 0
    for draw in range(40):
        data = synthetic_isoflop(LAW, seed=2000 + draw, **DENSE)
        ci_lo, ci_hi = fit_isoflop(data, bootstrap=200, level=0.8, seed=draw).ci("a")
        covered += ci_lo <= LAW.a <= ci_hi
    assert lo <= covered <= hi, (covered, (lo, hi))


def test_bootstrap_intervals_and_json_roundtrip(sweep, tmp_path):
    fit = fit_powerlaw(sweep, bootstrap=50, seed=3, level=0.9)
    for k in ("E", "C0", "alpha"):
        ci_lo, ci_hi = fit.ci(k)
        assert ci_lo < ci_hi and len(fit.samples[k]) == 50
    d = fit.to_dict()
    assert d["alpha_ci"] == [pytest.approx(v) for v in fit.ci("alpha")] and d["bootstrap"]["level"] == 0.9
    back = Fit.from_dict(json.loads(json.dumps(d)))
    C = np.array([1e20, 1e23])
    assert np.allclose(back.predict(C)["loss"], fit.predict(C)["loss"])
    band = back.predict_interval(C)["loss"]
    assert band.shape == (2, 2) and np.all(band[:, 0] < fit.predict(C)["loss"]) and np.all(fit.predict(C)["loss"] < band[:, 1])
    assert band[1, 1] - band[1, 0] > band[0, 1] - band[0, 0]  # wider when extrapolating further
    # the same seed gives the same intervals
    assert fit_powerlaw(sweep, bootstrap=50, seed=3, level=0.9).ci("alpha") == fit.ci("alpha")


# ------------------------------------------------------------------------------------------------
# Bad input: clear ValueErrors before any fitting


def test_missing_column(tmp_path):
    path = write_csv(tmp_path / "r.csv", ["params", "loss"], [[1e8, 3.0]])
    with pytest.raises(ValueError, match=r"missing column 'tokens'.*--tokens-column"):
        load_csv(path)
    path = write_csv(tmp_path / "r2.csv", ["params", "tokens", "xent"], [[1e8, 1e9, 3.0]])
    with pytest.raises(ValueError, match=r"missing column 'loss'.*--loss-column"):
        load_csv(path)
    assert load_csv(path, loss_column="xent").loss_column == "xent"


def test_non_positive_and_nan_rows_are_named(tmp_path):
    rows = [[1e8, 1e9, 3.0], [2e8, 0, 2.9], [3e8, 1e9, 2.8]]
    with pytest.raises(ValueError, match=r"line 3: column 'tokens' = 0 is not positive"):
        load_csv(write_csv(tmp_path / "a.csv", ["params", "tokens", "loss"], rows))
    rows = [[1e8, 1e9, 3.0], [2e8, 1e9, "nan"]]
    with pytest.raises(ValueError, match=r"line 3: column 'loss' is nan"):
        load_csv(write_csv(tmp_path / "b.csv", ["params", "tokens", "loss"], rows))
    rows = [[1e8, 1e9, ""]]
    with pytest.raises(ValueError, match=r"line 2: column 'loss' is nan"):
        load_csv(write_csv(tmp_path / "c.csv", ["params", "tokens", "loss"], rows))
    with pytest.raises(ValueError, match=r"line 2: column 'params' = 'big' is not a number"):
        load_csv(write_csv(tmp_path / "d.csv", ["params", "tokens", "loss"], [["big", 1e9, 3.0]]))
    with pytest.raises(ValueError, match=r"row 2: column 'params' = -5 is not positive"):
        from_arrays([1.0, -5.0], [1.0, 1.0], [3.0, 3.0])


def test_sweep_table_status_and_loss_fallback(tmp_path):
    header = ["name", "params", "tokens", "flops", "final_eval_loss", "status"]
    rows = [["a", 1e8, 1e9, 7e17, 3.1, "ok"], ["b", 2e8, 1e9, 1.3e18, 3.0, "finished"],
            ["c", 3e8, 1e9, 1.9e18, "nan", "failed"], ["d", 4e8, 1e9, 2.5e18, "", "running"]]
    data = load_csv(write_csv(tmp_path / "s.csv", header, rows))
    assert data.loss_column == "final_eval_loss" and len(data) == 2 and data.n_skipped_status == 2
    assert np.allclose(data.flops, [7e17, 1.3e18]) and not data.flops_from_6nd
    plain = load_csv(write_csv(tmp_path / "p.csv", ["params", "tokens", "loss"], [[1e8, 1e9, 3.0]]))
    assert plain.flops_from_6nd and plain.flops[0] == 6e17
    rows = [["a", 1e8, 1e9, 7e17, 3.1, "failed"]]
    with pytest.raises(ValueError, match=r"no rows with status ok/finished"):
        load_csv(write_csv(tmp_path / "f.csv", header, rows))


def test_too_few_points_say_how_many(sweep):
    small = sweep.subset(np.arange(5))  # 5 runs, all at one budget
    with pytest.raises(ValueError, match=r"parametric fit needs at least 6 runs .*got 5"):
        fit_parametric(small)
    with pytest.raises(ValueError, match=r"envelope fit needs at least 3 compute budgets.*got 1"):
        fit_envelope(small)
    with pytest.raises(ValueError, match=r"isoflop fit needs at least 3 budgets.*got 1"):
        fit_isoflop(small)
    with pytest.raises(ValueError, match=r"powerlaw fit needs at least 4 runs on the compute frontier.*got 1"):
        fit_powerlaw(small)
    with pytest.raises(ValueError, match=r"distinct values of 'params'"):
        fit_parametric(from_arrays(np.full(8, 1e8), np.logspace(9, 10, 8), np.linspace(3, 2.5, 8)))
    with pytest.raises(ValueError, match=r"unknown approach 'chinchilla'"):
        run_fit(sweep, "chinchilla")
    with pytest.raises(ValueError, match=r"bootstrap = -1"):
        fit_isoflop(sweep, bootstrap=-1)


# ------------------------------------------------------------------------------------------------
# CLI end to end


def run_cli(*args, check=True, in_process=True):
    """`python -m t5like.scaling ARGS` -> its exit code, stdout and stderr. In this process unless asked (no
    interpreter start-up per call); test_cli_fit_predict_plot's first call is a real `python -m`."""
    if in_process:
        from t5like.scaling.__main__ import main
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main([str(a) for a in args])
        proc = subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())
    else:
        proc = subprocess.run([sys.executable, "-m", "t5like.scaling", *map(str, args)], cwd=REPO,
                              capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_cli_fit_predict_plot(tmp_path):
    data = synthetic_isoflop(LAW, budgets=np.logspace(18, 21, 7), sizes_per_budget=7, seed=5)
    rows = [[int(n), int(d), c, l, "ok"] for n, d, c, l in zip(data.params, data.tokens, data.flops, data.loss)]
    rows.append([1e8, 1e9, 6e17, "nan", "failed"])
    csv_path = write_csv(tmp_path / "results.csv", ["params", "tokens", "flops", "final_eval_loss", "status"], rows)
    fit_path = tmp_path / "fit.json"

    run_cli("fit", csv_path, "--approach", "all", "--bootstrap", 20, "--grid", "coarse", "--out", fit_path,
            in_process=False)
    d = json.loads(fit_path.read_text())
    assert d["approach"] == "all" and d["meta"]["n_points"] == 49 and d["meta"]["loss_column"] == "final_eval_loss"
    assert d["meta"]["n_skipped_status"] == 1
    for name, keys in (("powerlaw", ("E", "C0", "alpha")), ("envelope", ("a", "b", "N_coef", "D_coef")),
                       ("isoflop", ("a", "b", "N_coef", "D_coef", "E", "C0", "alpha")),
                       ("parametric", ("E", "A", "B", "alpha", "beta", "a", "b", "G", "N_coef", "D_coef"))):
        for k in keys:
            assert isinstance(d[name][k], float) and len(d[name][f"{k}_ci"]) == 2, (name, k)
    assert len(d["isoflop"]["optima"]) == 7 and {"budget", "N_opt", "D_opt", "loss_opt"} <= set(d["isoflop"]["optima"][0])
    assert abs(d["isoflop"]["a"] - LAW.a) < 0.1 and abs(d["parametric"]["alpha"] / LAW.alpha - 1) < 0.25

    out = json.loads(run_cli("predict", fit_path, "--flops", "1e21", "--json").stdout)
    by = {r["approach"]: r for r in out}
    assert set(by) == {"powerlaw", "envelope", "isoflop", "parametric"}
    par = by["parametric"]
    assert par["loss_ci"][0] < par["loss"] < par["loss_ci"][1]
    assert np.isclose(par["tokens_per_param"], par["D_opt"] / par["N_opt"])
    assert abs(np.log(par["N_opt"] / LAW.n_opt(1e21))) < np.log(2)
    table = run_cli("predict", fit_path, "--flops", "1e21").stdout
    assert "95% bootstrap intervals" in table and "parametric" in table and "tokens/param" in table

    plots = tmp_path / "plots"
    printed = run_cli("plot", csv_path, "--fit", fit_path, "--out", plots).stdout.split()
    names = {f"{n}.{e}" for n in ("loss_vs_compute", "isoflop", "optimal_allocation") for e in ("png", "pdf")}
    assert set(os.listdir(plots)) == names and len(printed) == 6
    for n in names:
        assert (plots / n).stat().st_size > 5000, n
        assert (plots / n).read_bytes()[:4] in (b"\x89PNG", b"%PDF")


def test_cli_single_approach_and_errors(tmp_path):
    csv_path = write_csv(tmp_path / "r.csv", ["params", "tokens", "loss"],
                         [[n, 1e10 / n * 100, 3.0 - 0.01 * i] for i, n in enumerate(np.logspace(7, 9, 6))])
    proc = run_cli("fit", csv_path, "--approach", "isoflop", "--out", tmp_path / "f.json", check=False)
    assert proc.returncode == 2 and "isoflop fit needs at least 3 budgets" in proc.stderr
    bad = write_csv(tmp_path / "bad.csv", ["params", "loss"], [[1e8, 3.0]])
    proc = run_cli("fit", bad, "--out", tmp_path / "g.json", check=False)
    assert proc.returncode == 2 and "missing column 'tokens'" in proc.stderr and "Traceback" not in proc.stderr

    data = synthetic_isoflop(LAW, budgets=np.logspace(18, 20, 5), sizes_per_budget=5, seed=1)
    ok = write_csv(tmp_path / "ok.csv", ["params", "tokens", "loss", "budget"],
                   zip(data.params, data.tokens, data.loss, data.budget))
    run_cli("fit", ok, "--approach", "isoflop", "--out", tmp_path / "iso.json")
    d = json.loads((tmp_path / "iso.json").read_text())
    assert d["approach"] == "isoflop" and "a" in d and "a_ci" not in d and d["meta"]["flops_from_6nd"]
    fits, _ = load_fits(tmp_path / "iso.json")
    assert set(fits) == {"isoflop"}
    out = json.loads(run_cli("predict", tmp_path / "iso.json", "--flops", "1e21", "--json").stdout)
    assert out[0]["approach"] == "isoflop" and "N_opt_ci" not in out[0]
    truth = LAW.loss(LAW.n_opt(1e21), LAW.d_opt(1e21))  # the loss law through 5 minima, 10x past them
    assert abs(out[0]["loss"] / truth - 1) < 0.03, (out[0], truth)
    three = write_csv(tmp_path / "three.csv", ["params", "tokens", "loss", "budget"],
                      [r for r in zip(data.params, data.tokens, data.loss, data.budget) if r[3] <= 1e19 * 1.01])
    run_cli("fit", three, "--approach", "isoflop", "--out", tmp_path / "iso3.json")
    out = json.loads(run_cli("predict", tmp_path / "iso3.json", "--flops", "1e21", "--json").stdout)
    assert "loss" not in out[0] and out[0]["N_opt"] > 0  # 3 minima: N_opt, but no free-E loss law


# ------------------------------------------------------------------------------------------------
# One compute convention per table; degenerate tables


def test_predict_at_a_table_budget_returns_its_optimum(tmp_path):
    # A table whose flops column counts 12·N·D (a model's own formula, not 6·N·D), drawn noise-free from
    # the law, centred on the law's optimum under that convention. Every approach must read C the same
    # way: predict at one of the table's budgets gives the table's optimum, and N_opt·D_opt·12 = C.
    from t5like.scaling.fit import fit_all, hoffmann_grid, save_fits
    k, budgets = 12.0, np.logspace(18, 21, 7)
    n_star = lambda C: LAW.G * (C / k) ** LAW.a
    N = np.concatenate([n_star(C) * np.logspace(-0.75, 0.75, 9) for C in budgets])
    C = np.repeat(budgets, 9)
    D = C / (k * N)
    data = from_arrays(N, D, LAW.loss(N, D), flops=k * N * D, budget=C)
    fits = fit_all(data, parametric_starts=hoffmann_grid(coarse=True))
    assert all(isinstance(f, Fit) for f in fits.values()), fits
    save_fits(tmp_path / "fit.json", fits, data.meta())
    d = json.loads((tmp_path / "fit.json").read_text())

    C0 = budgets[3]
    iso_opt = next(o for o in d["isoflop"]["optima"] if o["budget"] == C0)
    rows = json.loads(run_cli("predict", tmp_path / "fit.json", "--flops", C0, "--json").stdout)
    by = {r["approach"]: r for r in rows}
    for name in ("envelope", "isoflop", "parametric"):
        r = by[name]
        assert abs(np.log(r["N_opt"] / n_star(C0))) < np.log(1.05), (name, r["N_opt"], n_star(C0))
        assert abs(np.log(r["N_opt"] / iso_opt["N_opt"])) < np.log(1.05), (name, r["N_opt"], iso_opt)
        assert r["N_opt"] * r["D_opt"] * k == pytest.approx(C0, rel=0.02), name
    assert by["parametric"]["loss"] == pytest.approx(LAW.loss(n_star(C0), C0 / (k * n_star(C0))), rel=1e-3)
    table = run_cli("predict", tmp_path / "fit.json", "--flops", C0).stdout
    assert "compute: C = the table's 'flops' column (about 12·N·D" in table
    assert d["meta"]["flops_convention"]["flops_per_param_token"] == pytest.approx(k)
    for name in ("powerlaw", "envelope", "isoflop", "parametric"):
        assert "12·N·D" in d[name]["flops_convention"], d[name]["flops_convention"]


def test_degenerate_tables_are_refused_or_warned():
    # one budget, nine sizes: ln N + ln D is fixed, so the parametric law is not identified
    N = LAW.n_opt(1e20) * np.logspace(-1, 1, 9)
    one_budget = from_arrays(N, 1e20 / (6 * N), LAW.loss(N, 1e20 / (6 * N)))
    with pytest.raises(ValueError, match=r"parametric fit needs at least 2 compute budgets.*got 1"):
        fit_parametric(one_budget, starts=FEW_STARTS)
    # one size at five budgets: the envelope's N_opt ∝ C^0 would be an artefact
    D = np.logspace(9, 11, 5)
    one_size = from_arrays(np.full(5, 1e8), D, LAW.loss(1e8, D))
    with pytest.raises(ValueError, match=r"envelope fit needs at least 2 distinct model sizes.*got 1"):
        fit_envelope(one_size)
    from t5like.scaling.data import table_warnings
    assert any("one compute budget" in w for w in table_warnings(one_budget))
    assert any("one model size" in w for w in table_warnings(one_size))
    assert "learning curve" in fit_powerlaw(one_size).details["warnings"][0]
    # a healthy table has no warnings
    assert table_warnings(synthetic_isoflop(LAW, seed=0)) == []


def test_cli_warns_on_bad_flops_and_duplicates_and_plots_without_powerlaw(tmp_path):
    # 3 budgets × 5 sizes: 3 frontier points, too few for the power law, so `plot` must draw without
    # it. The flops column is in PFLOP/s-days-like units (1e-15 of FLOPs) and one run is pasted twice.
    data = synthetic_isoflop(LAW, budgets=[1e18, 1e19, 1e20], sizes_per_budget=5, seed=2)
    rows = [[n, d, c * 1e-15, l] for n, d, c, l in zip(data.params, data.tokens, data.flops, data.loss)]
    rows.append(rows[6])
    csv_path = write_csv(tmp_path / "r.csv", ["params", "tokens", "flops", "loss"], rows)
    fit_path = tmp_path / "fit.json"
    proc = run_cli("fit", csv_path, "--grid", "coarse", "--out", fit_path)
    plot = run_cli("plot", csv_path, "--fit", fit_path, "--out", tmp_path / "plots", check=False)
    assert plot.returncode == 0 and "Traceback" not in plot.stderr, plot.stderr
    assert len(os.listdir(tmp_path / "plots")) == 6
    assert "warning: column 'flops' is on average 1e-15× 6·N·D" in proc.stderr, proc.stderr
    assert "warning: 1 exactly duplicated row(s) (lines 8, 17)" in proc.stderr, proc.stderr
    d = json.loads(fit_path.read_text())
    assert any("orders of magnitude" in w for w in d["meta"]["warnings"])
    assert any("duplicated" in w for w in d["meta"]["warnings"])
    assert "powerlaw fit needs at least 4 runs on the compute frontier" in d["powerlaw"]["error"]


# ------------------------------------------------------------------------------------------------
# Tables as our own runner writes them; row filters; plot reading fit.json; a rising loss


def cli(*args):
    """(exit code, stderr) of `python -m t5like.scaling ARGS`, run in this process."""
    proc = run_cli(*args, check=False)
    return proc.returncode, proc.stderr


def test_fit_reads_a_grid_sweeps_own_table(tmp_path):
    """launch.sweep writes an empty budget for grid (and random-search) trials; `fit --approach all` on that
    table runs the approaches the runs allow and refuses the others with the reason, as without the column.
    A grid over model size at fixed steps: the envelope runs, the others say what they lack."""
    import experiments.scaling_tiny as tiny
    from launch.table import OK, ResultsTable
    from launch.trial import row
    from t5like.scaling.design import grid
    trials = grid({"model.d_model": [64, 128, 256]}, config=tiny.config())
    table = ResultsTable(tmp_path / "results.csv")
    for t, n in zip(trials, [1e7, 3e7, 1e8]):
        loss = float(LAW.loss(n, 1e9))
        table.append(row(t, OK, summary={"params": n, "tokens": 1e9, "flops": 6e9 * n, "step": 100,
                                         "final_eval_loss": loss, "final_loss": loss}))
    table.append(row(trials[0], "failed", error="exit 1"))
    lines = (tmp_path / "results.csv").read_text().splitlines()
    assert [line.split(",")[1] for line in lines[1:]] == [""] * 4  # the runner's own grid rows: no budget

    code, err = cli("fit", tmp_path / "results.csv", "--approach", "all", "--out", tmp_path / "fit.json")
    assert code == 0, err
    d = json.loads((tmp_path / "fit.json").read_text())
    assert d["meta"]["n_points"] == 3 and not d["meta"]["has_budget"]
    assert any("column 'budget' is empty in every row" in w for w in d["meta"]["warnings"])
    assert "error" not in d["envelope"] and d["envelope"]["n_groups"] == 3, d["envelope"]
    assert "parametric fit needs at least 6 runs" in d["parametric"]["error"]
    assert "powerlaw fit needs at least 4 runs on the compute frontier" in d["powerlaw"]["error"]
    assert "isoflop fit needs at least 3 budgets" in d["isoflop"]["error"]
    assert "isoflop: skipped: isoflop fit needs" in err


def test_fit_where_filters_rows_and_records_them(tmp_path):
    data = synthetic_isoflop(LAW, budgets=[1e18, 1e19, 1e20], sizes_per_budget=5, seed=3)
    rows = [[n, d, c, repr(float(c)), l * f, s, "ok"] for s, f in (("a", 1.0), ("b", 1.1))
            for n, d, c, l in zip(data.params, data.tokens, data.flops, data.loss)]
    path = write_csv(tmp_path / "r.csv", ["params", "tokens", "flops", "budget", "loss", "setting", "status"], rows)
    code, err = cli("fit", path, "--approach", "isoflop", "--where", "setting=b", "--out", tmp_path / "b.json")
    assert code == 0, err
    d = json.loads((tmp_path / "b.json").read_text())
    assert d["meta"]["where"] == ["setting=b"] and d["meta"]["n_points"] == 15 and d["meta"]["n_skipped_where"] == 15
    assert [o["loss_opt"] for o in d["optima"]] == pytest.approx([1.1 * o["loss_opt"] for o in
                                                                 fit_isoflop(data).details["optima"]])
    # several filters all hold; a number matches as a number (the runner writes budgets as 1e+18)
    assert len(load_csv(path, where=["setting=a", "budget=1e18"])) == 5
    with pytest.raises(ValueError, match=r"--where lr=1: .* has no column 'lr' \(columns are: params, .*setting"):
        load_csv(path, where=["lr=1"])
    with pytest.raises(ValueError, match=r"--where setting=c: no row .* its values there are: 'a', 'b'"):
        load_csv(path, where=["setting=c"])
    # A table holding an IsoFLOP sweep's rows and a grid's (empty budget): fit one part, as the error says.
    rows += [[1e8, 1e9, 6e17, "", 3.0, "grid", "ok"]]
    mixed = write_csv(tmp_path / "m.csv", ["params", "tokens", "flops", "budget", "loss", "setting", "status"], rows)
    with pytest.raises(ValueError, match=r"'budget' is empty in 1 row\(s\) \(lines 32: .* --where budget= "):
        load_csv(mixed)
    assert len(load_csv(mixed, where=["budget="])) == 1 and len(load_csv(mixed, where=["setting=b"])) == 15
    code, err = cli("fit", path, "--where", "setting", "--out", tmp_path / "x.json")
    assert code == 2 and "--where 'setting': give COLUMN=VALUE" in err and not (tmp_path / "x.json").exists()


def test_plot_reads_columns_and_filters_from_fit_json(tmp_path):
    """`plot --fit fit.json` reads the table as the fit did (columns, --where, grouping) without the flags
    again; a flag given to plot still wins. (Sizes at one token count: only the envelope fits, no L-BFGS.)"""
    rows = [[n, 1e9, float(LAW.loss(n, 1e9)) * f, s] for s, f in (("a", 1.0), ("b", 1.2)) for n in (1e7, 3e7, 1e8)]
    path = write_csv(tmp_path / "r.csv", ["n", "d", "xent", "setting"], rows)
    fit_path = tmp_path / "fit.json"
    code, err = cli("fit", path, "--params-column", "n", "--tokens-column", "d", "--loss-column", "xent",
                    "--where", "setting=a", "--approach", "envelope", "--out", fit_path)
    assert code == 0, err
    meta = json.loads(fit_path.read_text())["meta"]
    assert (meta["params_column"], meta["tokens_column"], meta["loss_column"], meta["where"]) == \
        ("n", "d", "xent", ["setting=a"])
    code, err = cli("plot", path, "--fit", fit_path, "--out", tmp_path / "plots")
    assert code == 0, err
    assert "params_column=n" in err and "where=['setting=a']" in err and len(os.listdir(tmp_path / "plots")) == 6
    code, err = cli("plot", path, "--fit", fit_path, "--loss-column", "nll", "--out", tmp_path / "p2")
    assert code == 2 and "missing column 'nll'" in err


def test_rising_loss_warns_that_the_law_is_not_decreasing(tmp_path):
    """Loss that rises with N and D: the parametric fit takes a negative exponent; say so, naming it, in
    the output and in fit.json, instead of reporting it as a scaling law."""
    N, D = (a.ravel() for a in np.meshgrid(np.logspace(7, 9, 4), np.logspace(9, 11, 4)))
    path = write_csv(tmp_path / "r.csv", ["params", "tokens", "loss"],
                     zip(N, D, 2.0 + 0.05 * np.log(N) + 0.05 * np.log(D)))
    code, err = cli("fit", path, "--approach", "parametric", "--grid", "coarse", "--out", tmp_path / "f.json")
    assert code == 0, err
    d = json.loads((tmp_path / "f.json").read_text())
    bad = [k for k in ("alpha", "beta") if d[k] <= 0]
    assert bad and d["a"] is None, d
    assert any(w.startswith(f"{bad[0]} = ") and "not a decreasing one" in w for w in d["warnings"]), d["warnings"]
    assert f"warning: parametric: {bad[0]} = " in err and "not a decreasing one" in err
    healthy = fit_parametric(synthetic_isoflop(LAW, budgets=[1e18, 1e19, 1e20], sizes_per_budget=5, seed=0),
                             starts=FEW_STARTS)
    assert not any("decreasing" in w for w in healthy.details.get("warnings", []))
