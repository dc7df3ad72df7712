"""Leave-future-out validation: fit on the smaller budgets, predict the held-out larger ones, report the error.

    python -m t5like.scaling validate RESULTS.csv [--split C | --holdout C ...] --out validate.json

Marin checks its scaling laws this way: a law is only as good as its prediction of a run it has not seen.
By default the largest budget is held out and every other one is fitted. For each held-out budget:

  measured   the lowest loss among its runs (and that run's N); with >= 3 sizes bracketing a minimum,
             also the vertex of the IsoFLOP parabola (a smoother N_opt).
  predicted  loss (powerlaw, isoflop's loss law, parametric) and N_opt (envelope, isoflop, parametric) at the budget's
             compute, with the bootstrap interval; a stderr column widens the interval by the measured
             loss's own standard error (in quadrature with the bootstrap's spread), and the fits weight by it.
  error      loss: predicted / measured − 1. N_opt: predicted / measured (vertex if any, else best run).

Each fit with an irreducible loss E (powerlaw, isoflop, parametric) also gets an E profile: the prediction refitted
with E held at 0.8, 0.9, 0.95, 1.05, 1.1 × its fitted value (those below every fitted loss), and dloss/dE, how much the prediction moves per
unit of E. `near` (--near-optimum FRAC) fits only the runs within FRAC of their budget's best loss. A law
whose predictions beyond its data rise above a loss already measured is flagged
(`leaves_data`) with the fit's warning: its extrapolations contradict the data.
"""
from __future__ import annotations

import math

import numpy as np
from scipy import stats

from t5like.scaling.data import METRIC_UNITS, ScalingData, compute_groups, near_optimum
from t5like.scaling.fit import ISO_OK, Fit, _isoflop_optimum, e_profile, run_fit

# What validate fits: (report name, approach, options).
VARIANTS = {"powerlaw": ("powerlaw", {}), "envelope": ("envelope", {}), "isoflop": ("isoflop", {}),
            "parametric": ("parametric", {"method": "huber"}), "parametric_vpnls": ("parametric", {"method": "vpnls"})}
E_FACTORS = (0.8, 0.9, 0.95, 1.05, 1.1)
SAME_BUDGET = 0.1  # a budget given on the command line names the table's budget within 10%


def split_budgets(data: ScalingData, split: float | None = None, holdout=None,
                  bins_per_decade: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(group id per row, fitted budgets, held-out budgets). Default: hold out the largest budget.
    `split` C: fit budgets <= C, hold out those above. `holdout`: these budgets (matched within 10%)."""
    gid, budgets = compute_groups(data, bins_per_decade)
    order = np.argsort(budgets)
    listed = ", ".join(f"{c:.3g}" for c in budgets[order])
    if split is not None and holdout:
        raise ValueError("give --split or --holdout, not both.")
    if holdout:
        held = []
        for c in holdout:
            near = np.flatnonzero(np.abs(budgets / c - 1) <= SAME_BUDGET)
            if not near.size:
                raise ValueError(f"--holdout {c:.3g}: the table has no budget within 10% of it; its budgets are {listed}.")
            held.append(int(near[0]))
        held = np.array(sorted(set(held)))
    elif split is not None:
        held = np.flatnonzero(budgets > split * (1 + 1e-9))
        if not held.size:
            raise ValueError(f"--split {split:.3g}: no budget lies above it, so nothing is held out; the table's "
                             f"budgets are {listed}. Choose a split below the largest.")
    else:
        held = order[-1:]
    fitted = np.setdiff1d(np.arange(len(budgets)), held)
    if len(fitted) < 2:
        raise ValueError(f"validate needs at least 2 budgets to fit on; holding out "
                         f"{', '.join(f'{budgets[i]:.3g}' for i in held)} leaves {len(fitted)} (the table's budgets "
                         f"are {listed}). Hold out fewer budgets, or add runs at more budgets.")
    low = [budgets[i] for i in held if budgets[i] < budgets[fitted].max()]
    if low:
        raise ValueError(f"held-out budget {low[0]:.3g} lies below the largest fitted budget "
                         f"{budgets[fitted].max():.3g}: that is interpolation, not a prediction of the future. Hold "
                         "out only budgets above every fitted one (e.g. --split C).")
    return gid, budgets[fitted], budgets[held]


def _measured(data: ScalingData, rows: np.ndarray) -> dict:
    i = rows[np.argmin(data.loss[rows])]
    out = {"loss": float(data.loss[i]), "N": float(data.params[i]), "flops": float(np.exp(np.log(data.flops[rows]).mean())),
           "n_runs": int(len(rows))}
    if data.stderr is not None:
        out["loss_stderr"] = float(data.stderr[i])
    lnN, lnD = np.log(data.params[rows]), np.log(data.tokens[rows])
    status, ln_n, _, lv, _, _ = _isoflop_optimum(lnN, lnD, data.loss[rows], np.ones((1, len(rows))))
    if status[0] == ISO_OK:
        out["N_vertex"], out["loss_vertex"] = float(math.exp(ln_n[0])), float(lv[0])
    return out


def _compare(fit: Fit, m: dict, level: float, fitted_best: float) -> dict:
    C = m["flops"]
    # (Approach 2's loss law is NaN when it had too few budgets: no loss prediction then)
    pred = {k: float(v) for k, v in fit.predict(C).items() if k in ("loss", "N_opt") and np.isfinite(v)}
    ci = {k: [float(x) for x in v] for k, v in fit.predict_interval(C).items() if k in pred and np.all(np.isfinite(v))}
    out = {"predicted": pred, "interval": ci}
    if "loss" in pred:
        out["loss_error"] = pred["loss"] / m["loss"] - 1
        # above a loss the fitted runs already reached with less compute: the law leaves its data here too
        out["above_fitted_frontier"] = bool(pred["loss"] > fitted_best)
        if "loss" in ci:
            lo, hi = ci["loss"]
            se = m.get("loss_stderr", 0.0)
            if se:  # the measurement's own noise, in quadrature with the prediction's spread
                z = stats.norm.ppf(0.5 + level / 2)
                p = pred["loss"]
                lo = p - math.hypot(p - lo, z * se)
                hi = p + math.hypot(hi - p, z * se)
                out["interval_with_stderr"] = [lo, hi]
            out["loss_in_interval"] = bool(lo <= m["loss"] <= hi)
    if "N_opt" in pred:
        ref = m.get("N_vertex", m["N"])
        out["N_opt_ratio"] = pred["N_opt"] / ref
        if "N_opt" in ci:
            out["N_opt_in_interval"] = bool(ci["N_opt"][0] <= ref <= ci["N_opt"][1])
    return out


def validate(data: ScalingData, *, split: float | None = None, holdout=None, variants=tuple(VARIANTS),
             bootstrap: int = 100, level: float = 0.95, seed: int = 0, bins_per_decade: float | None = None,
             window: int | None = None, E_fixed: float | None = None, E_prior=None, starts=None,
             profile: bool = True, near: float | None = None) -> dict:
    """Fit `variants` on the budgets below the held-out ones and compare their predictions with the held-out
    runs. Returns a JSON-able report (see the module docstring)."""
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"--approach {unknown[0]!r}: choose from {', '.join(VARIANTS)}.")
    gid, fit_b, held_b = split_budgets(data, split, holdout, bins_per_decade)
    _, budgets = compute_groups(data, bins_per_decade)
    fit_rows = np.flatnonzero(np.isin(budgets[gid], fit_b))
    train = data.subset(fit_rows)
    if near is not None:  # select the fitted runs near each budget's optimum; the held-out ones stay whole
        train = near_optimum(train, near, bins_per_decade)
    measured = [{"budget": float(c), **_measured(data, np.flatnonzero(budgets[gid] == c))} for c in held_b]
    report = {"source": data.source, "metric": data.metric, "units": METRIC_UNITS.get(data.metric, data.metric),
              "loss_column": data.loss_column, "stderr_column": data.columns.get("stderr"),
              "fitted_budgets": [float(c) for c in fit_b], "held_out_budgets": [float(c) for c in held_b],
              "n_fitted_runs": int(len(train)), "near_optimum": near, "level": level, "bootstrap": bootstrap,
              "E_fixed": E_fixed, "E_prior": None if E_prior is None else list(E_prior),
              "measured": measured, "approaches": {}}
    for name in variants:
        approach, extra = VARIANTS[name]
        opts = dict(bootstrap=bootstrap, level=level, seed=seed, bins_per_decade=bins_per_decade, window=window,
                    E_fixed=E_fixed, E_prior=E_prior, **extra)
        if approach == "parametric" and starts is not None and extra.get("method") == "huber":
            opts["starts"] = starts
        try:
            fit = run_fit(train, approach, **opts)
        except ValueError as e:
            report["approaches"][name] = {"error": str(e)}
            continue
        entry = {"params": {k: _num(v) for k, v in fit.params.items()}, "warnings": fit.details.get("warnings", []),
                 "leaves_data": "leaves_data" in fit.details,
                 "holdout": [{"budget": m["budget"], **_compare(fit, m, level, float(train.loss.min()))}
                             for m in measured]}
        above = [h["budget"] for h in entry["holdout"] if h.get("above_fitted_frontier")]
        if above:
            entry["leaves_data"] = True
            entry["warnings"] = [*entry["warnings"], f"predicts at held-out C = {above[0]:.3g} a loss above "
                                 f"{train.loss.min():.4g}, the best the fitted runs already reached with less compute."]
        if profile and "E" in fit.params and E_fixed is None and np.isfinite(fit.params["E"]) and fit.params["E"] > 0:
            E = fit.params["E"]
            prof_opts = {k: v for k, v in opts.items() if k not in ("bootstrap", "E_fixed", "E_prior")}
            rows = e_profile(train, approach, measured[-1]["flops"], [f * E for f in E_FACTORS], **prof_opts)
            entry["E_profile"] = {"flops": measured[-1]["flops"], "rows": rows}
            pts = [(r["E"], r["loss"]) for r in rows] + [(E, float(fit.predict(measured[-1]["flops"])["loss"]))]
            if len(pts) >= 2:  # least-squares slope of the prediction against the E it was refitted with
                e_, l_ = np.array(pts).T
                entry["dloss_dE"] = float(np.polyfit(e_, l_, 1)[0])
        report["approaches"][name] = entry
    return report


def _num(x):
    x = float(x)
    return x if math.isfinite(x) else None


def format_report(r: dict) -> str:
    """A plain-text table of the report: one line per approach and held-out budget."""
    units = r["units"]
    lines = [f"{r['source']}: fitted {len(r['fitted_budgets'])} budgets "
             f"({r['fitted_budgets'][0]:.3g}–{r['fitted_budgets'][-1]:.3g} FLOPs, {r['n_fitted_runs']} runs); "
             f"metric {r['metric']} [{units}]"]
    for m in r["measured"]:
        v = f", parabola vertex N {m['N_vertex']:.3g} loss {m['loss_vertex']:.4g}" if "N_vertex" in m else ""
        se = f" ± {m['loss_stderr']:.2g}" if "loss_stderr" in m else ""
        lines.append(f"held out C = {m['budget']:.3g}: best run loss {m['loss']:.4g}{se} at N {m['N']:.3g}{v}")
    lines.append(f"{'approach':<17} {'C':>9} {'pred loss':>10} {'interval':>19} {'error':>8} {'in':>3} "
                 f"{'pred N_opt':>10} {'N ratio':>8} {'dL/dE':>6}")
    for name, a in r["approaches"].items():
        if "error" in a:
            lines.append(f"{name:<17} skipped: {a['error']}")
            continue
        for h in a["holdout"]:
            p, ci = h["predicted"], h.get("interval_with_stderr", h["interval"].get("loss"))
            loss = f"{p['loss']:.4g}" if "loss" in p else "-"
            iv = f"[{ci[0]:.4g}, {ci[1]:.4g}]" if ci and "loss" in p else "-"
            err = f"{h['loss_error']:+.2%}" if "loss_error" in h else "-"
            inside = {True: "yes", False: "NO"}.get(h.get("loss_in_interval"), "-")
            n = f"{p['N_opt']:.3g}" if "N_opt" in p else "-"
            ratio = f"{h['N_opt_ratio']:.2f}×" if "N_opt_ratio" in h else "-"
            dlde = f"{a['dloss_dE']:.2f}" if "dloss_dE" in a else "-"
            lines.append(f"{name:<17} {h['budget']:>9.3g} {loss:>10} {iv:>19} {err:>8} {inside:>3} {n:>10} "
                         f"{ratio:>8} {dlde:>6}")
        for w in a["warnings"]:
            lines.append(f"  warning: {name}: {w}")
    return "\n".join(lines)
