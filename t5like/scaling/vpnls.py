"""Variable projection (VPNLS) for Approach 3: weighted least squares of L = E + A/N^alpha + B/D^beta.

For fixed exponents (alpha, beta) the law is linear in (E, A, B), so those three have a closed form
(non-negative least squares over the 7 subsets of the 3 columns) and only the two exponents are
searched: a grid, then Nelder-Mead from its best cells. Fitting loss itself (not log loss) by least
squares lets per-row standard errors enter as weights 1/stderr², and E can be held fixed or given a
Gaussian prior as one more linear row. Pure numpy/scipy: a fit takes milliseconds.
"""
from __future__ import annotations

import itertools

import numpy as np
from scipy.optimize import minimize

# Exponent grid: both exponents of published fits lie in (0.05, 1.5).
GRID = np.linspace(0.02, 1.6, 56)
_SUBSETS = [np.array(s) for r in (3, 2, 1) for s in itertools.combinations(range(3), r)]


def _solve(alpha, beta, lnN, lnD, L, w, E_fixed, prior):
    """Best non-negative (E, A, B) for each exponent pair; returns (rss (K,), coefs (K, 3)).

    `prior` = (mu, weight): the extra term weight·(E − mu)². `E_fixed`: E is that value, only A, B fitted."""
    alpha, beta = np.atleast_1d(alpha), np.atleast_1d(beta)
    K, n = len(alpha), len(L)
    cols = np.empty((K, n, 3))
    cols[:, :, 0] = 1.0
    cols[:, :, 1] = np.exp(-alpha[:, None] * lnN)
    cols[:, :, 2] = np.exp(-beta[:, None] * lnD)
    target = np.broadcast_to(L - (E_fixed or 0.0), (K, n))
    sw = np.sqrt(w)
    M, t = cols * sw[:, None], target * sw
    if prior is not None and E_fixed is None:
        mu, pw = prior
        row = np.zeros((K, 1, 3))
        row[:, 0, 0] = np.sqrt(pw)
        M = np.concatenate([M, row], 1)
        t = np.concatenate([t, np.full((K, 1), np.sqrt(pw) * mu)], 1)
    scale = np.maximum(np.linalg.norm(M, axis=1), 1e-300)  # (K, 3): columns to unit length for conditioning
    Ms = M / scale[:, None, :]
    best_rss, best = np.full(K, np.inf), np.zeros((K, 3))
    for s in _SUBSETS:
        if E_fixed is not None and 0 in s:
            continue
        A = Ms[:, :, s]
        G = np.einsum("kni,knj->kij", A, A) + 1e-13 * np.eye(len(s))
        c = np.linalg.solve(G, np.einsum("kni,kn->ki", A, t)[..., None])[..., 0]
        rss = np.sum((t - np.einsum("kni,ki->kn", A, c)) ** 2, 1)
        ok = np.all(c >= 0, 1) & (rss < best_rss)
        full = np.zeros((K, 3))
        full[:, s] = c / scale[:, s]
        best_rss, best = np.where(ok, rss, best_rss), np.where(ok[:, None], full, best)
    if E_fixed is not None:
        best[:, 0] = E_fixed
    return best_rss, best


def vpnls(lnN, lnD, L, w=None, *, E_fixed: float | None = None, prior: tuple[float, float] | None = None,
          start: tuple[float, float] | None = None, n_refine: int = 4) -> tuple[np.ndarray, float]:
    """Fit (E, A, B, alpha, beta) by weighted least squares (weights `w`, e.g. 1/stderr²).

    `start` (alpha, beta) skips the grid and refines from there (bootstrap resamples). Returns
    (theta = (ln A, ln B, ln E, alpha, beta), the weighted residual sum of squares)."""
    lnN, lnD, L = (np.asarray(v, np.float64) for v in (lnN, lnD, L))
    w = np.ones_like(L) if w is None else np.asarray(w, np.float64)

    def rss(x):
        if x[0] <= 0 or x[1] <= 0 or x[0] > 5 or x[1] > 5:
            return np.inf
        return float(_solve(x[:1], x[1:], lnN, lnD, L, w, E_fixed, prior)[0][0])

    if start is None:
        a, b = (g.reshape(-1) for g in np.meshgrid(GRID, GRID, indexing="ij"))
        r, _ = _solve(a, b, lnN, lnD, L, w, E_fixed, prior)
        seeds = [(a[i], b[i]) for i in np.argsort(r)[:n_refine] if np.isfinite(r[i])]
    else:
        seeds = [tuple(start)]
    best_x, best_f = None, np.inf
    for x0 in seeds:
        res = minimize(rss, np.asarray(x0, np.float64), method="Nelder-Mead",
                       options={"xatol": 1e-8, "fatol": 1e-15, "maxiter": 4000})
        if res.fun < best_f:
            best_x, best_f = res.x, float(res.fun)
    if best_x is None:
        return np.full(5, np.nan), np.inf
    _, c = _solve(best_x[:1], best_x[1:], lnN, lnD, L, w, E_fixed, prior)
    E, A, B = c[0]
    with np.errstate(divide="ignore"):
        return np.array([np.log(A), np.log(B), np.log(E), best_x[0], best_x[1]]), best_f
