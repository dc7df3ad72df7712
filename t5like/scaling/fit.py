"""Scaling-law fits: compute frontier power law, and Chinchilla Approaches 1, 2 and 3.

  powerlaw    L(C) = E + (C0/C)^alpha on the compute frontier (Pareto-optimal runs).
  envelope    Approach 1: the lowest-loss run per compute budget gives (C, N_opt, D_opt);
              N_opt = N_coef·C^a and D_opt = D_coef·C^b by log-log least squares.
  isoflop     Approach 2: per budget, a parabola of loss in ln N; its vertex is (N_opt, L_opt). Power laws
              through the optima give a, b; L_opt(C) = E + (C0/C)^alpha through their losses (the loss
              law: each vertex averages its budget's runs, where the frontier power law takes one run).
  parametric  Approach 3: L(N, D) = E + A/N^alpha + B/D^beta, Huber loss on ln L (Hoffmann et al. 2022,
              as corrected by Besiroglu et al. 2024: the objective is summed, not averaged).

Every fit returns a `Fit`; `bootstrap=n` resamples runs with replacement n times and refits, giving
percentile intervals and the parameter samples (which `Fit.predict` propagates to predictions).
Nonlinear fits use the batched L-BFGS of lbfgs.py (JAX, float64), vectorised over starts and bootstrap
resamples, so the 4500-start Hoffmann grid takes seconds.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import jax.numpy as jnp
import numpy as np

from t5like import storage
from t5like.scaling.data import ScalingData, compute_groups, read_input
from t5like.scaling.lbfgs import minimize_batch

APPROACHES = ("powerlaw", "envelope", "isoflop", "parametric")
# Fitted parameters per approach, in the order fit.json lists them.
PARAM_NAMES = {
    "powerlaw": ("E", "C0", "alpha"),
    "envelope": ("a", "b", "N_coef", "D_coef"),
    "isoflop": ("a", "b", "N_coef", "D_coef", "E", "C0", "alpha"),
    "parametric": ("E", "A", "B", "alpha", "beta", "a", "b", "G", "N_coef", "D_coef"),
}
HUBER_DELTA = 1e-3


# ================================================================================================
# Objectives (minimised by the batched L-BFGS in lbfgs.py)


def _huber(r, delta):
    ar = jnp.abs(r)
    return jnp.where(ar <= delta, 0.5 * r * r, delta * (ar - 0.5 * delta))


def _parametric_objective(theta, w, X, y, delta):
    """Huber(pred − ln L) summed over runs, with ln L̂ = LSE(a − alpha ln N, b − beta ln D, e); plus a
    Gaussian prior on e = ln E: delta = (huber scale, prior mean of e, prior precision; 0 for none)."""
    a, b, e, alpha, beta = theta[0], theta[1], theta[2], theta[3], theta[4]
    t1, t2 = a - alpha * X[:, 0], b - beta * X[:, 1]
    m = jnp.maximum(jnp.maximum(t1, t2), e)  # stable log-sum-exp of three terms
    pred = m + jnp.log(jnp.exp(t1 - m) + jnp.exp(t2 - m) + jnp.exp(e - m))
    return jnp.sum(w * _huber(pred - y, delta[0])) + 0.5 * delta[2] * (e - delta[1]) ** 2


def _parametric_objective_fixed_e(theta, w, X, y, delta):
    """As above with e = delta[1] held fixed; theta = (a, b, alpha, beta)."""
    full = jnp.concatenate([theta[:2], delta[1:2], theta[2:]])
    return _parametric_objective(full, w, X, y, delta.at[2].set(0.0))


def _powerlaw_objective(theta, w, X, y, delta):
    """Least squares on ln L with ln L̂ = LSE(e, k − alpha·x), x = ln C − x_ref (centred for conditioning);
    plus a Gaussian prior on e = ln E: delta = (prior mean of e, prior precision; 0 for none)."""
    e, k, alpha = theta[0], theta[1], theta[2]
    pred = jnp.logaddexp(e, k - alpha * X[:, 0])
    return 0.5 * jnp.sum(w * (pred - y) ** 2) + 0.5 * delta[1] * (e - delta[0]) ** 2


def _powerlaw_objective_fixed_e(theta, w, X, y, delta):
    """As above with e = delta[0] held fixed; theta = (k, alpha)."""
    return _powerlaw_objective(jnp.concatenate([delta[:1], theta]), w, X, y, delta.at[1].set(0.0))


def _packed(objective):
    """`objective` with per-start targets: w = (weights, targets) packed (2n,), X doubled (2n, k). So that
    one minimize_batch refits many bootstrap resamples whose targets differ (Approach 2's vertex losses)."""
    def packed(theta, w, X, y, delta):
        n = w.shape[0] // 2
        return objective(theta, w[:n], X[:n], w[n:], delta)
    packed.__name__ = f"packed_{objective.__name__}"
    return packed


_PACKED = {f: _packed(f) for f in (_powerlaw_objective, _powerlaw_objective_fixed_e)}  # one jit cache each


# ================================================================================================
# The result type


@dataclass
class Fit:
    """A fitted scaling law. `params` are the point estimates; `samples` the bootstrap refits (one value
    per successful resample and parameter); `details` holds JSON-able extras (frontier points, optima,
    diagnostics)."""

    approach: str
    params: dict[str, float]
    details: dict = field(default_factory=dict)
    samples: dict[str, np.ndarray] | None = None
    level: float = 0.95
    n_bootstrap: int = 0
    seed: int | None = None

    def ci(self, name: str) -> tuple[float, float] | None:
        if not self.samples or name not in self.samples:
            return None
        return _percentile_interval(self.samples[name], self.level)

    def predict(self, flops) -> dict[str, np.ndarray]:
        """Point predictions at compute `flops`: loss and/or N_opt, D_opt, tokens_per_param."""
        return _predict(self.approach, self.params, np.asarray(flops, np.float64))

    def predict_interval(self, flops) -> dict[str, np.ndarray]:
        """Percentile intervals of each prediction over the bootstrap samples: {name: [..., 2]}."""
        if not self.samples:
            return {}
        flops = np.asarray(flops, np.float64)
        p = {k: np.asarray(v)[:, None] for k, v in self.samples.items()}
        pred = _predict(self.approach, p, flops.reshape(1, -1))
        return {k: np.stack(_percentile_interval(v, self.level, axis=0), -1).reshape(flops.shape + (2,))
                for k, v in pred.items()}

    def to_dict(self) -> dict:
        out = {"approach": self.approach, **{k: _num(v) for k, v in self.params.items()}}
        if self.samples:
            for k in self.params:
                ci = self.ci(k)
                out[f"{k}_ci"] = None if ci is None else [_num(ci[0]), _num(ci[1])]
        out.update(_jsonable(self.details))
        if self.n_bootstrap:
            out["bootstrap"] = {"n": self.n_bootstrap, "n_ok": len(next(iter(self.samples.values()), [])),
                                "level": self.level, "seed": self.seed,
                                "samples": {k: [_num(x) for x in v] for k, v in self.samples.items()}}
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "Fit":
        approach = d["approach"]
        names = PARAM_NAMES[approach]
        params = {k: np.nan if d.get(k) is None else float(d[k]) for k in names}
        skip = set(names) | {f"{k}_ci" for k in names} | {"approach", "bootstrap", "meta"}
        details = {k: v for k, v in d.items() if k not in skip}
        boot = d.get("bootstrap") or {}
        samples = {k: np.array([np.nan if x is None else x for x in v], np.float64)
                   for k, v in boot.get("samples", {}).items()} or None
        return cls(approach, params, details, samples, boot.get("level", 0.95), boot.get("n", 0), boot.get("seed"))

    def summary(self) -> str:
        parts = []
        for k, v in self.params.items():
            ci = self.ci(k)
            parts.append(f"{k}={v:.4g}" + (f" [{ci[0]:.4g}, {ci[1]:.4g}]" if ci else ""))
        return f"{self.approach}: " + ", ".join(parts)


def _num(x):
    x = float(x)
    return x if math.isfinite(x) else None  # JSON has no NaN


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, (float, np.floating)):
        return _num(x)
    if isinstance(x, np.integer):
        return int(x)
    return x


def _percentile_interval(samples, level: float, axis=None):
    q = 100 * (1 - level) / 2
    lo, hi = np.nanpercentile(np.asarray(samples, np.float64), [q, 100 - q], axis=axis)
    return lo, hi


def _predict(approach: str, p: dict, C) -> dict:
    """Predictions from parameters `p` (floats, or arrays of bootstrap samples broadcast against C)."""
    with np.errstate(all="ignore"):
        if approach == "powerlaw":
            return {"loss": p["E"] + (p["C0"] / C) ** p["alpha"]}
        if approach in ("envelope", "isoflop"):
            N, D = p["N_coef"] * C ** p["a"], p["D_coef"] * C ** p["b"]
            out = {"N_opt": N, "D_opt": D, "tokens_per_param": D / N}
            if "C0" in p:  # Approach 2's loss law
                out["loss"] = p["E"] + (p["C0"] / C) ** p["alpha"]
            return out
        if approach == "parametric":  # compute-optimal allocation under the table's C = k·N·D
            N, D = p["N_coef"] * C ** p["a"], p["D_coef"] * C ** p["b"]
            loss = p["E"] + p["A"] / N ** p["alpha"] + p["B"] / D ** p["beta"]
            return {"loss": loss, "N_opt": N, "D_opt": D, "tokens_per_param": D / N}
    raise ValueError(f"unknown approach {approach!r}; expected one of {APPROACHES}")


def _loglog(x, y, w=None) -> tuple[float, float]:
    """Least squares ln y = ln coef + slope·ln x; returns (slope, coef)."""
    lx, ly = np.log(x), np.log(y)
    w = np.ones_like(lx) if w is None else w
    mx, my = np.average(lx, weights=w), np.average(ly, weights=w)
    slope = np.sum(w * (lx - mx) * (ly - my)) / np.sum(w * (lx - mx) ** 2)
    return float(slope), float(np.exp(my - slope * mx))


def _convention(data: ScalingData) -> dict:
    """What C means in this fit: the table's own flops column if it has one, else 6·N·D."""
    return {"flops_convention": data.convention()["text"]}


def _rising(params: dict, exponents: tuple[str, ...], of: dict[str, str]) -> list[str]:
    """A warning per exponent <= 0: such a law's loss does not fall (it rises, or stays) with what that
    exponent scales, so it is no scaling law and its extrapolations and allocations mean nothing."""
    out = []
    for name in exponents:
        if not params[name] > 0:
            out.append(f"{name} = {params[name]:.3g} <= 0: the fitted law is not a decreasing one (loss does not "
                       f"fall with {of[name]}), so it is no scaling law and its predictions mean nothing. Does the "
                       "table's loss rise with compute (diverged runs, a wrong loss column, mixed settings: see "
                       "--where)?")
    return out


def _need(approach: str, what: str, needed: int, got: int, hint: str = "") -> None:
    if got < needed:
        raise ValueError(f"{approach} fit needs at least {needed} {what}; got {got}." + (f" {hint}" if hint else ""))


def _check_bootstrap(n_bootstrap: int, level: float) -> None:
    if n_bootstrap < 0:
        raise ValueError(f"bootstrap = {n_bootstrap}: the number of resamples must be >= 0.")
    if not 0 < level < 1:
        raise ValueError(f"level = {level}: the interval level must be in (0, 1), e.g. 0.95.")


def _check_e(E_fixed, E_prior) -> None:
    """E fixed or given a prior (never both), each a positive loss; the prior's sd positive."""
    if E_fixed is not None and E_prior is not None:
        raise ValueError(f"E fixed at {E_fixed} and given a prior {tuple(E_prior)}: choose one (--fix-E or --E-prior).")
    if E_fixed is not None and not (math.isfinite(E_fixed) and E_fixed > 0):
        raise ValueError(f"fixed E = {E_fixed}: the irreducible loss must be a positive number below the measured "
                         "losses, e.g. --fix-E 1.7.")
    if E_prior is not None:
        if len(E_prior) != 2 or not all(math.isfinite(v) and v > 0 for v in E_prior):
            raise ValueError(f"E prior = {tuple(E_prior)}: give MEAN,SD (both positive, in the loss's units), "
                             "e.g. --E-prior 1.7,0.1.")


def _e_note(E_fixed, E_prior) -> dict:
    if E_fixed is not None:
        return {"E_fixed": float(E_fixed)}
    if E_prior is not None:
        return {"E_prior": [float(E_prior[0]), float(E_prior[1])]}
    return {}


def _log_weights(data: ScalingData) -> np.ndarray:
    """Per-row weights for fits on ln L: 1/var(ln L) from the stderr column, scaled to median 1 (so a Huber
    scale keeps its meaning); ones without a stderr column."""
    if data.stderr is None:
        return np.ones(len(data))
    v = (data.stderr / data.loss) ** 2
    return np.median(v) / v


def _prior_precision(E_prior, scale: float) -> float:
    """A Gaussian prior on E (mean, sd), as a precision on ln E, weighed against a data term whose
    per-point curvature is 1/`scale` (the residual variance of the unpenalised fit: empirical Bayes)."""
    mu, sd = E_prior
    return float(scale / (sd / mu) ** 2)


def _leaves_data(fit: "Fit", data: ScalingData) -> list[str]:
    """A law must not predict, beyond the largest compute measured, a loss above one already measured with
    less compute: such a prediction contradicts the data (its asymptote E sits at or above the frontier).
    Checked from 2× to 1000× the largest run's compute."""
    i = int(np.argmin(data.loss))
    best, c_best, c_max = float(data.loss[i]), float(data.flops[i]), float(data.flops.max())
    C = c_max * np.array([2.0, 4.0, 10.0, 30.0, 100.0, 1000.0])
    pred = np.asarray(fit.predict(C).get("loss"), np.float64)
    above = np.flatnonzero(pred > best)
    if not above.size:
        return []
    j = above[0]
    E = fit.params.get("E", np.nan)
    fit.details["leaves_data"] = {"flops": float(C[j]), "predicted": float(pred[j]), "measured_best": best,
                                  "measured_flops": c_best, "E": E}
    return [f"predicts loss {pred[j]:.4g} at C = {C[j]:.3g} ({C[j] / c_max:.0f}× the largest run's compute), above "
            f"the loss {best:.4g} already measured at C = {c_best:.3g}: the law leaves its data"
            + (f" (its asymptote E = {E:.4g} is at or above the measured frontier)" if E >= best else "")
            + ". Do not extrapolate it; fix E (--fix-E) or give it a prior (--E-prior), or add larger budgets."]


# ================================================================================================
# powerlaw: L(C) = E + (C0/C)^alpha on the compute frontier


def frontier(flops: np.ndarray, loss: np.ndarray, budget: np.ndarray | None = None) -> np.ndarray:
    """Indices of Pareto-optimal runs, by increasing compute: each has lower loss than every run with
    less (or equal) compute. For sorted C this is where the running minimum of loss drops.

    With `budget` (a table's IsoFLOP budgets) a budget is one point: its lowest-loss run. The runs of one
    budget differ in FLOPs by up to ~1% (whole steps), so without this every same-budget run with slightly
    less compute than a better one would count as a frontier point, and the power law would be fitted
    through runs that are not compute-optimal. The budgets' minima then form the Pareto set by budget."""
    if budget is None:
        order = np.lexsort((loss, flops))
    else:
        order = np.lexsort((loss, budget))
        first = np.r_[True, budget[order][1:] != budget[order][:-1]]
        order = order[first]  # one run per budget: its lowest loss, by increasing budget
    best = np.minimum.accumulate(loss[order])
    on = np.r_[True, loss[order][1:] < best[:-1]]
    return order[on]


def _powerlaw_starts(lnL: np.ndarray) -> np.ndarray:
    L = np.exp(lnL)
    starts = []
    for frac in (0.05, 0.3, 0.6, 0.8, 0.9, 0.97):
        E = frac * L.min()
        k = np.log(max(L.mean() - E, 1e-3 * L.mean()))
        for alpha in (0.02, 0.05, 0.1, 0.2, 0.5, 1.0):
            starts.append((np.log(E), k, alpha))
    return np.array(starts)


def _powerlaw_params(theta: np.ndarray, x_ref: float) -> dict[str, np.ndarray]:
    e, k, alpha = np.moveaxis(np.asarray(theta), -1, 0)
    with np.errstate(all="ignore"):
        return {"E": np.exp(e), "C0": np.exp(x_ref + k / alpha), "alpha": alpha}


class _LossLaw:
    """Least squares of ln L = ln(E + (C0/C)^alpha) on centred ln C, from the 36 starts of _powerlaw_starts:
    the frontier power law's fit and Approach 2's loss law. `E_fixed` holds E; `E_prior` = (mean, sd) adds
    a Gaussian prior on it, weighed against the residual variance of the unpenalised fit."""

    def __init__(self, lnL: np.ndarray, E_fixed: float | None, E_prior):
        self.E_fixed, self.E_prior, self.n_points = E_fixed, E_prior, len(lnL)
        self.starts, self.objective, self.delta = _powerlaw_starts(lnL), _powerlaw_objective, np.zeros(2)
        if E_fixed is not None:
            self.objective, self.delta = _powerlaw_objective_fixed_e, np.array([math.log(E_fixed), 0.0])
            self.starts = self.starts[:, 1:]

    def fit(self, X, y, w) -> tuple[np.ndarray, float]:
        """The best (free) parameters and the objective there."""
        theta, f = minimize_batch(self.objective, self.starts, X, y, w, delta=self.delta)
        if self.E_prior is not None:
            scale = 2 * float(f.min()) / max(self.n_points - 3, 1)
            self.delta = np.array([math.log(self.E_prior[0]), _prior_precision(self.E_prior, scale)])
            theta, f = minimize_batch(self.objective, np.concatenate([theta[np.argmin(f)][None], self.starts]),
                                      X, y, w, delta=self.delta)
        return theta[np.argmin(f)], float(f.min())

    def refit(self, best, X, y, W, Y=None) -> np.ndarray:
        """One refit per row of weights W (R, n), a bootstrap resample each, from `best` plus 9 of the starts.
        With Y (R, n) each row also has its own targets (Approach 2's resampled vertex losses) instead of y."""
        st = np.concatenate([best[None], self.starts[::4]])
        objective, w = self.objective, np.repeat(W, len(st), axis=0)
        if Y is not None:
            objective, X, y = _PACKED[self.objective], np.concatenate([X, X]), np.zeros(2 * len(X))
            w = np.repeat(np.concatenate([W, Y], 1), len(st), axis=0)
        thetas, fs = minimize_batch(objective, np.tile(st, (len(W), 1)), X, y, w, delta=self.delta)
        return thetas.reshape(len(W), len(st), -1)[np.arange(len(W)), fs.reshape(len(W), -1).argmin(1)]

    def full(self, theta) -> np.ndarray:
        """(ln E, k, alpha) from the free parameters."""
        if self.E_fixed is None:
            return theta
        return np.concatenate([np.full(np.shape(theta)[:-1] + (1,), math.log(self.E_fixed)), theta], -1)


def fit_powerlaw(data: ScalingData, *, bootstrap: int = 0, level: float = 0.95, seed: int = 0,
                 E_fixed: float | None = None, E_prior: tuple[float, float] | None = None) -> Fit:
    """L(C) = E + (C0/C)^alpha, least squares on ln L over the frontier runs, from 36 starts. `E_fixed`
    holds the asymptote at a value; `E_prior` = (mean, sd) adds a Gaussian prior on it. A stderr column
    weights each frontier run by 1/var(ln L)."""
    _check_bootstrap(bootstrap, level)
    _check_e(E_fixed, E_prior)
    idx = frontier(data.flops, data.loss, data.budget)
    n_par = 2 if E_fixed is not None else 3
    _need("powerlaw", f"runs on the compute frontier ({n_par} parameters plus one to spare)", n_par + 1, len(idx),
          "Add runs at more compute budgets.")
    _, budgets = compute_groups(data)
    _need("powerlaw", "compute budgets (groups of runs at similar FLOPs)", 2, len(budgets),
          "Runs within 10% of one another's FLOPs say nothing about how loss falls with compute.")
    if E_fixed is not None and not E_fixed < data.loss[idx].min():
        raise ValueError(f"fixed E = {E_fixed} is not below the best measured loss {data.loss[idx].min():.4g}; "
                         "the irreducible loss must lie below every loss on the frontier.")
    lnC, lnL = np.log(data.flops), np.log(data.loss)
    x_ref = float(lnC[idx].mean())
    X = (lnC - x_ref)[:, None]
    w = np.zeros(len(data))
    w[idx] = _log_weights(data)[idx]
    law = _LossLaw(lnL[idx], E_fixed, E_prior)
    best, fmin = law.fit(X, lnL, w)
    params = {k: float(v) for k, v in _powerlaw_params(law.full(best), x_ref).items()}
    details = {"frontier": [{"flops": data.flops[i], "loss": data.loss[i], "params": data.params[i],
                             "tokens": data.tokens[i]} for i in idx],
               "n_frontier": len(idx), "objective": fmin, **_e_note(E_fixed, E_prior),
               **_convention(data)}
    warnings = _rising(params, ("alpha",), {"alpha": "compute C"})
    if len(np.unique(data.params)) < 2:
        warnings.append("every run has one model size, so this frontier is that model's learning curve "
                        "(it flattens at the model's capacity), not the compute-optimal frontier.")
    fit = Fit("powerlaw", params, details)
    warnings += _leaves_data(fit, data)
    if warnings:
        details["warnings"] = warnings
    if bootstrap:
        rng = np.random.default_rng(seed)
        W = np.zeros((bootstrap, len(data)))
        ok = np.zeros(bootstrap, bool)
        lw = _log_weights(data)
        for r in range(bootstrap):
            counts = np.bincount(rng.integers(0, len(data), len(data)), minlength=len(data))
            sub = np.flatnonzero(counts)
            budget = None if data.budget is None else data.budget[sub]
            fr = sub[frontier(data.flops[sub], data.loss[sub], budget)]
            W[r, fr], ok[r] = counts[fr] * lw[fr], len(fr) >= n_par + 1
        W = W[ok]
        cols = np.flatnonzero(W.any(0))  # only runs that are on some resample's frontier
        pick = law.refit(best, X[cols], lnL[cols], W[:, cols])
        fit.samples = _powerlaw_params(law.full(pick), x_ref)
        fit.level, fit.n_bootstrap, fit.seed = level, bootstrap, seed
    return fit


# ================================================================================================
# envelope (Approach 1): the minimum-loss run per compute budget


def _envelope_points(data: ScalingData, gid: np.ndarray, sub: np.ndarray) -> np.ndarray:
    """Row index of the lowest-loss run in each group that has runs among rows `sub`."""
    order = sub[np.lexsort((data.loss[sub], gid[sub]))]
    first = np.r_[True, gid[order][1:] != gid[order][:-1]]
    return order[first]


def _envelope_line(data: ScalingData, pts: np.ndarray) -> dict[str, float]:
    # Each point uses its own run's flops: it is that run's true compute.
    a, N_coef = _loglog(data.flops[pts], data.params[pts])
    b, D_coef = _loglog(data.flops[pts], data.tokens[pts])
    return {"a": a, "b": b, "N_coef": N_coef, "D_coef": D_coef}


def fit_envelope(data: ScalingData, *, bootstrap: int = 0, level: float = 0.95, seed: int = 0,
                 bins_per_decade: float | None = None) -> Fit:
    """Chinchilla Approach 1: per compute group the lowest-loss run; log-log lines of N and D against C."""
    _check_bootstrap(bootstrap, level)
    gid, budgets = compute_groups(data, bins_per_decade)
    _need("envelope", "compute budgets (groups of runs at similar FLOPs)", 3, len(budgets),
          "Add runs at more budgets, or pass a budget column / --bins-per-decade.")
    _need("envelope", "distinct model sizes", 2, len(np.unique(data.params)),
          "With one size the lowest-loss run of every budget is that size: N_opt ∝ C^0 says nothing.")
    pts = _envelope_points(data, gid, np.arange(len(data)))
    if len(np.unique(data.flops[pts])) < 2:
        raise ValueError("envelope fit: all minimum-loss runs have the same flops; need at least 2 distinct.")
    params = _envelope_line(data, pts)
    details = {"points": [{"budget": budgets[gid[i]], "flops": data.flops[i], "params": data.params[i],
                           "tokens": data.tokens[i], "loss": data.loss[i]} for i in pts],
               "n_groups": len(budgets), "bins_per_decade": bins_per_decade, **_convention(data)}
    if len(np.unique(data.params[pts])) < 2:
        details["warnings"] = [f"the lowest-loss run of every budget has one size (N = {data.params[pts[0]]:.4g}), so "
                               "a = 0 only says the sizes are too coarse to see N_opt move. Add sizes around it."]
    fit = Fit("envelope", params, details)
    if bootstrap:
        rng = np.random.default_rng(seed)
        rows = []
        for _ in range(bootstrap):
            sub = rng.integers(0, len(data), len(data))
            p = _envelope_points(data, gid, sub)
            if len(p) >= 3 and len(np.unique(data.flops[p])) >= 2:
                rows.append(_envelope_line(data, p))
        fit.samples = {k: np.array([r[k] for r in rows]) for k in params}
        fit.level, fit.n_bootstrap, fit.seed = level, bootstrap, seed
    return fit


# ================================================================================================
# isoflop (Approach 2): a parabola of loss in ln N per budget


ISO_OK, ISO_FEW, ISO_CONCAVE, ISO_OUTSIDE = 0, 1, 2, 3
ISO_REASONS = {ISO_FEW: "fewer than 3 distinct model sizes (around the minimum); a parabola needs 3",
               ISO_CONCAVE: "loss is not convex in ln N (no minimum)",
               ISO_OUTSIDE: "the parabola's minimum lies outside the sampled model sizes"}


def _isoflop_optimum(lnN: np.ndarray, lnD: np.ndarray, L: np.ndarray, W: np.ndarray, window: int | None = None):
    """Weighted parabola L ≈ c0 + c1 x + c2 x² (x = ln N − mean) for each row of weights W (R, n).

    `window`: keep only the lowest-loss size and `window` sizes on each side of it (None: all sizes). The
    parabola is a local approximation; far from the minimum real IsoFLOP curves are skewed and can pull
    the vertex (see benchmarks/scaling_real_data.py).

    Returns (status, ln N_opt, ln D_opt, L_opt, coefs), status ISO_OK or why not: fewer than 3 distinct
    sizes, a parabola opening downwards, or a vertex outside the fitted sizes (an extrapolated optimum is
    not a measured one). ln D_opt comes from a weighted line of ln D on ln N through the budget's runs,
    evaluated at N_opt: exactly C/(6 N_opt) when flops = 6·N·D, and still right when the FLOPs-per-token
    convention differs (e.g. counting attention FLOPs).
    """
    uniq, inv = np.unique(lnN, return_inverse=True)
    if window is not None:
        W = W.copy()
        for r in range(len(W)):
            drawn = W[r] > 0
            sizes = np.unique(inv[drawn])
            best = inv[drawn][np.argmin(L[drawn])]
            pos = int(np.searchsorted(sizes, best))
            W[r, ~np.isin(inv, sizes[max(0, pos - window): pos + window + 1])] = 0.0
    m = lnN.mean()
    x = lnN - m
    P = np.stack([np.ones_like(x), x, x * x], -1)  # (n, 3)
    M = np.einsum("rn,ni,nj->rij", W, P, P)
    v = np.einsum("rn,ni,n->ri", W, P, L)
    distinct = (np.stack([W[:, inv == u].sum(1) for u in range(len(uniq))], 1) > 0).sum(1)
    few = distinct < 3
    M[few] = np.eye(3)
    c = np.linalg.solve(M, v[..., None])[..., 0]
    used = W > 0
    x_lo, x_hi = np.where(used, x, np.inf).min(1), np.where(used, x, -np.inf).max(1)
    with np.errstate(all="ignore"):
        xv = -c[:, 1] / (2 * c[:, 2])
        status = np.where(few, ISO_FEW, np.where(c[:, 2] <= 0, ISO_CONCAVE,
                                                 np.where((xv < x_lo) | (xv > x_hi), ISO_OUTSIDE, ISO_OK)))
        Lv = c[:, 0] + c[:, 1] * xv + c[:, 2] * xv * xv
        # ln D on ln N, weighted
        sw = W.sum(1)
        mx, md = (W @ x) / sw, (W @ lnD) / sw
        slope = (W @ (x * lnD) - sw * mx * md) / (W @ (x * x) - sw * mx * mx)
        lnDv = md + slope * (xv - mx)
    return status, xv + m, lnDv, Lv, c, np.stack([x_lo + m, x_hi + m], 1)


def fit_isoflop(data: ScalingData, *, bootstrap: int = 0, level: float = 0.95, seed: int = 0,
                bins_per_decade: float | None = None, window: int | None = None,
                E_fixed: float | None = None, E_prior: tuple[float, float] | None = None) -> Fit:
    """Chinchilla Approach 2: per budget with >= 3 distinct sizes, the vertex of a parabola of loss in
    ln N is (N_opt, D_opt, loss_opt); N_opt = N_coef·C^a, D_opt = D_coef·C^b by log-log least squares,
    and loss_opt = E + (C0/C)^alpha by the frontier power law's least squares (`E_fixed`, `E_prior` as
    there; E, C0, alpha are NaN, with the reason in details["loss_law"], when there are too few budgets).
    `window` = k fits each parabola to the lowest-loss size and k sizes either side (default: all sizes).
    Bootstrap resamples runs within each budget, so every budget keeps its own parabola."""
    _check_e(E_fixed, E_prior)
    _check_bootstrap(bootstrap, level)
    if window is not None and window < 1:
        raise ValueError(f"window = {window}: use at least 1 size each side of the minimum (3 sizes in all), or None.")
    gid, budgets = compute_groups(data, bins_per_decade)
    # Each budget's C is its runs' flops (geometric mean), the convention every approach uses; a budget
    # column only labels the groups (it may count FLOPs differently, or be 1% off each run's whole steps).
    group_flops = np.exp(np.bincount(gid, np.log(data.flops)) / np.bincount(gid))
    lnN, lnD, L = np.log(data.params), np.log(data.tokens), data.loss
    optima, skipped, members = [], [], []
    for g, C in enumerate(budgets):
        rows = np.flatnonzero(gid == g)
        n_sizes = len(np.unique(data.params[rows]))
        status, ln_n, ln_d, l_opt, c, ln_range = _isoflop_optimum(lnN[rows], lnD[rows], L[rows],
                                                                  np.ones((1, len(rows))), window)
        if status[0] != ISO_OK:
            reason = ISO_REASONS[int(status[0])]
            if status[0] == ISO_FEW and n_sizes < 3:
                reason = f"only {n_sizes} distinct model size(s); a parabola needs 3"
            skipped.append({"budget": C, "reason": reason})
            continue
        members.append(rows)
        optima.append({"budget": C, "flops": group_flops[g], "N_opt": math.exp(ln_n[0]), "D_opt": math.exp(ln_d[0]),
                       "loss_opt": l_opt[0], "n_points": len(rows), "n_sizes": n_sizes, "parabola_ln_n": [c[0, 2], c[0, 1], c[0, 0]],
                       "ln_n_center": float(lnN[rows].mean()), "N_range": np.exp(ln_range[0]).tolist()})
    _need("isoflop", "budgets with >= 3 distinct model sizes and a bracketed loss minimum", 3, len(optima),
          "Skipped budgets: " + "; ".join(f"C={s['budget']:.3g}: {s['reason']}" for s in skipped) if skipped else "")
    C = np.array([o["flops"] for o in optima])
    a, N_coef = _loglog(C, [o["N_opt"] for o in optima])
    b, D_coef = _loglog(C, [o["D_opt"] for o in optima])
    lnC_opt, lnL_opt = np.log(C), np.log([o["loss_opt"] for o in optima])
    x_ref = float(lnC_opt.mean())
    X_opt = (lnC_opt - x_ref)[:, None]
    law, need = _LossLaw(lnL_opt, E_fixed, E_prior), (2 if E_fixed is not None else 3) + 1
    loss_params, loss_note = {"E": np.nan, "C0": np.nan, "alpha": np.nan}, {}
    if len(optima) < need:
        loss_note = {"loss_law": f"needs {need} budgets' optima ({need - 1} parameters plus one to spare), has "
                                 f"{len(optima)}; add budgets or fix E (--fix-E)"}
    elif E_fixed is not None and not E_fixed < np.exp(lnL_opt).min():
        raise ValueError(f"fixed E = {E_fixed} is not below the lowest parabola minimum {np.exp(lnL_opt).min():.4g}; "
                         "the irreducible loss must lie below every budget's optimum.")
    else:
        best, fmin = law.fit(X_opt, lnL_opt, np.ones(len(optima)))
        loss_params = {k: float(v) for k, v in _powerlaw_params(law.full(best), x_ref).items()}
        loss_note = {"loss_law": {"objective": fmin, **_e_note(E_fixed, E_prior)}}
    fit = Fit("isoflop", {"a": a, "b": b, "N_coef": N_coef, "D_coef": D_coef, **loss_params},
              {"optima": optima, "skipped_budgets": skipped, "bins_per_decade": bins_per_decade, "window": window,
               **loss_note, **_convention(data)})
    if np.isfinite(loss_params["alpha"]):
        warnings = _rising(loss_params, ("alpha",), {"alpha": "compute C"}) + _leaves_data(fit, data)
        if warnings:
            fit.details["warnings"] = warnings
    if bootstrap:
        rng = np.random.default_rng(seed)
        # (bootstrap, budget) arrays of per-budget optima; NaN where a resample had no valid vertex
        n_opt, d_opt, l_opt = (np.full((bootstrap, len(optima)), np.nan) for _ in range(3))
        for j, rows in enumerate(members):
            W = rng.multinomial(len(rows), np.full(len(rows), 1 / len(rows)), size=bootstrap).astype(np.float64)
            status, ln_n, ln_d, lv, _, _ = _isoflop_optimum(lnN[rows], lnD[rows], L[rows], W, window)
            ok = status == ISO_OK
            n_opt[ok, j], d_opt[ok, j], l_opt[ok, j] = np.exp(ln_n[ok]), np.exp(ln_d[ok]), lv[ok]
        rows, kept = [], []
        for r in range(bootstrap):
            v = np.isfinite(n_opt[r])
            if v.sum() >= 3:
                a_r, nc = _loglog(C[v], n_opt[r, v])
                b_r, dc = _loglog(C[v], d_opt[r, v])
                rows.append((a_r, b_r, nc, dc))
                kept.append(r)
        fit.samples = {k: np.array([r[i] for r in rows]) for i, k in enumerate(("a", "b", "N_coef", "D_coef"))}
        if np.isfinite(loss_params["alpha"]) and kept:
            fit.samples.update(_loss_law_samples(law, best, X_opt, np.log(l_opt[kept]), need, x_ref))
        for j, o in enumerate(optima):
            for k, arr in (("N_opt", n_opt), ("D_opt", d_opt), ("loss_opt", l_opt)):
                o[f"{k}_ci"] = list(_percentile_interval(arr[:, j], level))
        fit.level, fit.n_bootstrap, fit.seed = level, bootstrap, seed
    return fit


def _loss_law_samples(law: _LossLaw, best, X, lnL_RB: np.ndarray, need: int, x_ref: float) -> dict:
    """Approach 2's loss law refitted on each resample's vertex losses lnL_RB (R, budgets; NaN where a
    resample's parabola had no vertex), in one batched fit. Resamples with fewer than `need` vertices give NaN."""
    ok = np.isfinite(lnL_RB)
    pick = law.refit(best, X, None, ok.astype(np.float64), Y=np.where(ok, lnL_RB, 0.0))
    out = _powerlaw_params(law.full(pick), x_ref)
    few = ok.sum(1) < need
    return {k: np.where(few, np.nan, v) for k, v in out.items()}


# ================================================================================================
# parametric (Approach 3): L(N, D) = E + A/N^alpha + B/D^beta


def hoffmann_grid(coarse: bool = False) -> np.ndarray:
    """Hoffmann et al.'s 4500 initialisations as rows (a, b, e, alpha, beta): alpha, beta in {0, 0.5, .., 2},
    e in {-1, -0.5, .., 1}, a, b in {0, 5, .., 25}. `coarse`: a 162-start grid for quick looks."""
    if coarse:
        a, e, al = np.array([5.0, 15.0, 25.0]), np.array([-0.5, 0.5]), np.array([0.5, 1.0, 1.5])
    else:
        a, e, al = np.arange(0.0, 26.0, 5.0), np.arange(-1.0, 1.01, 0.5), np.arange(0.0, 2.01, 0.5)
    grid = np.meshgrid(a, a, e, al, al, indexing="ij")
    return np.stack([g.reshape(-1) for g in grid], -1)


def _parametric_params(theta: np.ndarray, k: float = 6.0) -> dict[str, np.ndarray]:
    """Named parameters from rows (a, b, e, alpha, beta), with the allocation for compute C = k·N·D
    (k: the table's FLOPs per parameter per token, 6 for the 6·N·D convention)."""
    a_, b_, e, alpha, beta = np.moveaxis(np.asarray(theta, np.float64), -1, 0)
    A, B, E = np.exp(a_), np.exp(b_), np.exp(e)
    with np.errstate(all="ignore"):
        valid = (alpha > 0) & (beta > 0)  # otherwise there is no compute-optimal allocation
        s = np.where(valid, alpha + beta, np.nan)
        G = (alpha * A / (beta * B)) ** (1 / s)
        a, b = beta / s, alpha / s
        # N_opt = G·(C/k)^a = N_coef·C^a, D_opt = (C/k)^b / G = D_coef·C^b, as for the other approaches
        return {"E": E, "A": A, "B": B, "alpha": alpha, "beta": beta, "a": a, "b": b, "G": G,
                "N_coef": G * k ** -a, "D_coef": k ** -b / G}


PARAMETRIC_METHODS = ("huber", "vpnls")


def fit_parametric(data: ScalingData, *, bootstrap: int = 0, level: float = 0.95, seed: int = 0,
                   starts: np.ndarray | None = None, bootstrap_starts: np.ndarray | None = None,
                   huber_delta: float = HUBER_DELTA, method: str = "huber", E_fixed: float | None = None,
                   E_prior: tuple[float, float] | None = None) -> Fit:
    """Approach 3. `method`:

    huber  the Hoffmann/Besiroglu recipe: L-BFGS on summed Huber(ln L̂ − ln L) from every start of `starts`
           (default: the 4500-point Hoffmann grid, rows (a, b, e, alpha, beta)), keeping the best.
    vpnls  variable projection (vpnls.py): least squares on L, (E, A, B) in closed form for each (alpha, beta).

    `E_fixed` holds the irreducible loss at a value; `E_prior` = (mean, sd) adds a Gaussian prior on it,
    weighed against the residual variance of the unpenalised fit. A stderr column weights each run (huber:
    by 1/var(ln L), vpnls: by 1/stderr²); vpnls's bootstrap also redraws each loss within its stderr.

    Bootstrap resamples runs; huber starts each resample from the full-data optimum plus `bootstrap_starts`
    (default a 4-point grid; pass an empty array for the optimum alone), all resamples in one batch.
    """
    _check_bootstrap(bootstrap, level)
    _check_e(E_fixed, E_prior)
    if method not in PARAMETRIC_METHODS:
        raise ValueError(f"parametric method {method!r}: choose one of {', '.join(PARAMETRIC_METHODS)}.")
    n_par = 4 if E_fixed is not None else 5
    _need("parametric", f"runs ({n_par} parameters plus one to spare)", n_par + 1, len(data))
    for col, v in (("params", data.params), ("tokens", data.tokens)):
        _need("parametric", f"distinct values of '{col}'", 2, len(np.unique(v)),
              "N and D must both vary to separate A/N^alpha from B/D^beta.")
    _, budgets = compute_groups(data)
    _need("parametric", "compute budgets (groups of runs at similar FLOPs)", 2, len(budgets),
          "At one budget ln N + ln D is fixed, so A/N^alpha and B/D^beta cannot be told apart.")
    if E_fixed is not None and not E_fixed < data.loss.min():
        raise ValueError(f"fixed E = {E_fixed} is not below the best measured loss {data.loss.min():.4g}; "
                         "the irreducible loss must lie below every measured loss.")
    conv = data.convention()
    k = conv["flops_per_param_token"]
    X = np.stack([np.log(data.params), np.log(data.tokens)], -1)
    y = np.log(data.loss)
    if method == "vpnls":
        best, details, sampler = _fit_vpnls(data, X, E_fixed, E_prior)
    else:
        best, details, sampler = _fit_huber(data, X, y, starts, bootstrap_starts, huber_delta, E_fixed, E_prior)
    params = {name: float(v) for name, v in _parametric_params(best, k).items()}
    details.update({"method": method, "flops_per_param_token": k, **_e_note(E_fixed, E_prior), **_convention(data)})
    # alpha or beta <= 0: no compute-optimal allocation either (a, b, G are NaN: null in fit.json)
    warnings = _rising(params, ("alpha", "beta"), {"alpha": "model size N", "beta": "training tokens D"})
    k_lo, k_hi = conv["flops_per_param_token_range"]
    if k_hi / k_lo > 1.25 and not warnings:
        warnings.append(f"flops/(N·D) ranges from {k_lo:.3g} to {k_hi:.3g} across runs; the allocation uses "
                        f"C = {k:.3g}·N·D (their geometric mean), so N_opt is uncertain by up to "
                        f"{(k_hi / k_lo) ** params['a']:.2g}× beyond the bootstrap interval.")
    for name, of in (("A", "model size N"), ("B", "training tokens D")):
        if not params[name] > 0:  # VPNLS's non-negative solve can drop a term: then there is no allocation
            warnings.append(f"{name} = 0: the fitted law does not depend on {of}, so its N_opt and D_opt mean "
                            "nothing. The form does not describe these runs (see --near-optimum), or E is held "
                            "or pulled where the data cannot follow.")
    fit = Fit("parametric", params, details)
    if not warnings or all("flops/(N·D)" in w_ for w_ in warnings):
        warnings += _leaves_data(fit, data)
    if warnings:
        details["warnings"] = warnings
    if bootstrap:
        rng = np.random.default_rng(seed)
        W = rng.multinomial(len(data), np.full(len(data), 1 / len(data)), size=bootstrap).astype(np.float64)
        fit.samples = _parametric_params(sampler(best, W, rng), k)
        fit.level, fit.n_bootstrap, fit.seed = level, bootstrap, seed
    return fit


def _fit_huber(data, X, y, starts, bootstrap_starts, huber_delta, E_fixed, E_prior):
    """The Huber-on-ln L fit: (best theta, details, bootstrap sampler(best, W, rng) -> thetas)."""
    lw = _log_weights(data)
    starts = hoffmann_grid() if starts is None else np.atleast_2d(np.asarray(starts, np.float64))
    objective, delta = _parametric_objective, np.array([huber_delta, 0.0, 0.0])
    if E_fixed is not None:
        objective, delta[1] = _parametric_objective_fixed_e, math.log(E_fixed)
        starts = np.unique(starts[:, [0, 1, 3, 4]], axis=0)
    full = lambda th: th if E_fixed is None else np.insert(th, 2, math.log(E_fixed), axis=-1)
    theta, f = minimize_batch(objective, starts, X, y, lw, delta=delta)
    if E_prior is not None:  # weigh the prior by the unpenalised fit's residuals (Huber: L1-like beyond delta)
        r = np.asarray(_parametric_log_pred(theta[np.argmin(f)], X)) - y
        scale = float(np.mean(np.minimum(r * r, huber_delta * np.abs(r))))
        delta[1:] = math.log(E_prior[0]), _prior_precision(E_prior, scale)
        theta, f = minimize_batch(objective, np.concatenate([theta[np.argmin(f)][None], starts]), X, y, lw,
                                  delta=delta)
    i = int(np.argmin(f))
    best = theta[i]
    details = {"objective": float(f[i]), "huber_delta": huber_delta, "n_starts": len(starts),
               # how many starts reached the best objective: a sanity check that it is not a fluke
               "n_starts_at_best": int(np.sum(f <= f[i] + 1e-9 * abs(f[i]) + 1e-15))}

    def sampler(best_full, W, rng):
        bs = bootstrap_starts
        if bs is None:
            bs = np.array([[ab, ab, best_full[2], ex, ex] for ab in (5.0, 15.0) for ex in (0.3, 1.0)])
        bs = np.asarray(bs, np.float64).reshape(-1, 5)
        if E_fixed is not None:
            bs = bs[:, [0, 1, 3, 4]]
        st = np.concatenate([best[None], bs])
        n = len(W)
        thetas, fs = minimize_batch(objective, np.tile(st, (n, 1)), X, y, np.repeat(W * lw, len(st), axis=0),
                                    delta=delta)
        return full(thetas.reshape(n, len(st), -1)[np.arange(n), fs.reshape(n, -1).argmin(1)])

    return full(best), details, sampler


def _parametric_log_pred(theta, X):
    a, b, e, alpha, beta = theta if len(theta) == 5 else (theta[0], theta[1], -np.inf, theta[2], theta[3])
    return np.logaddexp(np.logaddexp(a - alpha * X[:, 0], b - beta * X[:, 1]), e)


def _fit_vpnls(data, X, E_fixed, E_prior):
    """The variable-projection fit: (best theta, details, bootstrap sampler(best, W, rng) -> thetas)."""
    from t5like.scaling.vpnls import vpnls

    w = np.ones(len(data)) if data.stderr is None else 1.0 / data.stderr ** 2
    theta, rss = vpnls(X[:, 0], X[:, 1], data.loss, w, E_fixed=E_fixed)
    prior = None
    if E_prior is not None:
        # the data term is sum w·r²; with stderr it is a chi² (unit variance), else scale by its residual variance
        var = 1.0 if data.stderr is not None else rss / max(len(data) - 5, 1)
        prior = (E_prior[0], var / E_prior[1] ** 2)
        theta, rss = vpnls(X[:, 0], X[:, 1], data.loss, w, prior=prior)
    details = {"objective": rss, "weighted": data.stderr is not None}

    def sampler(best, W, rng):
        out = np.empty((len(W), 5))
        for r in range(len(W)):
            L = data.loss if data.stderr is None else data.loss + data.stderr * rng.standard_normal(len(data))
            out[r] = vpnls(X[:, 0], X[:, 1], L, W[r] * w, E_fixed=E_fixed, prior=prior, start=best[3:])[0]
        return out

    return theta, details, sampler


def e_profile(data: ScalingData, approach: str, flops, E_values, **options) -> list[dict]:
    """How much the predictions at compute `flops` depend on the irreducible loss: refit with E held at
    each of `E_values` (those not below the best measured loss are skipped); one row per E."""
    if approach not in ("powerlaw", "isoflop", "parametric"):
        raise ValueError(f"approach {approach!r} has no irreducible loss E; use powerlaw, isoflop or parametric.")
    rows = []
    for E in E_values:
        if not 0 < E < data.loss.min():
            continue
        f = run_fit(data, approach, **{**options, "E_fixed": float(E), "E_prior": None, "bootstrap": 0})
        p = f.predict(np.asarray(flops, np.float64))
        rows.append({"E": float(E), "objective": f.details.get("objective"),
                     **{k: float(v) for k, v in p.items() if k in ("loss", "N_opt")}})
    return rows


# ================================================================================================
# Dispatch and fit.json


FITTERS = {"powerlaw": fit_powerlaw, "envelope": fit_envelope, "isoflop": fit_isoflop, "parametric": fit_parametric}


def run_fit(data: ScalingData, approach: str, **options) -> Fit:
    """Run one approach. Options: bootstrap, level, seed; bins_per_decade (envelope, isoflop); window (isoflop);
    E_fixed, E_prior (powerlaw, isoflop's loss law, parametric); method (parametric)."""
    if approach not in FITTERS:
        raise ValueError(f"unknown approach {approach!r}; choose one of {', '.join(APPROACHES)} or all.")
    if approach not in ("envelope", "isoflop"):
        options.pop("bins_per_decade", None)
    if approach != "isoflop":
        options.pop("window", None)
    if approach not in ("powerlaw", "isoflop", "parametric"):
        options.pop("E_fixed", None), options.pop("E_prior", None)
    if approach != "parametric":
        options.pop("method", None)
    return FITTERS[approach](data, **options)


def fit_all(data: ScalingData, *, parametric_starts: np.ndarray | None = None, parametric_method: str = "huber",
            **options) -> dict[str, Fit | str]:
    """Every approach; one that cannot run on this data (too few points, ...) maps to its error message."""
    out: dict[str, Fit | str] = {}
    for name in APPROACHES:
        opts = dict(options)
        if name == "parametric":
            opts["method"] = parametric_method
            if parametric_starts is not None:
                opts["starts"] = parametric_starts
        try:
            out[name] = run_fit(data, name, **opts)
        except ValueError as e:
            out[name] = str(e)
    return out


def fits_to_json(fits: dict[str, Fit | str], meta: dict) -> dict:
    """One approach: its keys at the top level. Several: {"approach": "all", "<approach>": {...}, ...}.
    An approach that failed under `all` is {"error": "<message>"}. `meta` says what was fitted."""
    if len(fits) == 1:
        (f,) = fits.values()
        return {**f.to_dict(), "meta": meta}
    out = {"approach": "all", "meta": meta}
    for name, f in fits.items():
        out[name] = f.to_dict() if isinstance(f, Fit) else {"error": f}
    return out


def save_fits(path: str, fits: dict[str, Fit | str], meta: dict) -> None:
    """Write fit.json (local or gs://) in one step, so a reader never sees half of it."""
    storage.write_atomic(path, json.dumps(fits_to_json(fits, meta), indent=1, allow_nan=False) + "\n")


def load_fits(path: str) -> tuple[dict[str, Fit], dict]:
    """Read fit.json (local or gs://) back: ({approach: Fit} for the approaches that succeeded, meta)."""
    try:
        d = json.loads(read_input(path, "fit.json"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e}); pass a fit.json written by "
                         "`python -m t5like.scaling fit`.") from None
    if "approach" not in d:
        raise ValueError(f"{path}: not a fit.json written by `python -m t5like.scaling fit` (no 'approach' key).")
    if d["approach"] != "all":
        return {d["approach"]: Fit.from_dict(d)}, d.get("meta", {})
    fits = {k: Fit.from_dict(v) for k, v in d.items() if k in APPROACHES and "error" not in v}
    return fits, d.get("meta", {})
