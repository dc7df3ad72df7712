"""Variable projection (VPNLS) for Approach 3: weighted least squares of L = E + A/N^alpha + B/D^beta.

For fixed exponents (alpha, beta) the law is linear in (E, A, B), so those three have a closed form
(non-negative least squares over the 7 subsets of the 3 columns) and only the two exponents are
searched: a grid, then a zooming 9×9 grid around each of its best cells, all vectorised. Fitting loss itself (not log loss) by least
squares lets per-row standard errors enter as weights 1/stderr², and E can be held fixed or given a
Gaussian prior as one more linear row. Pure numpy/scipy: a fit takes milliseconds.
"""
from __future__ import annotations

import itertools

import numpy as np

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


_STEPS = np.linspace(-1.0, 1.0, 9)


def _zoom(x, half, lnN, lnD, L, w, E_fixed, prior, tol: float = 1e-7, max_rounds: int = 80):
    """Refine (alpha, beta) on a 9×9 grid of half-width `half` around x: move to the best cell, and shrink
    the grid 4× whenever the best is inside it (not on its edge), until the half-width is below `tol`."""
    f = np.inf
    for _ in range(max_rounds):
        a, b = (g.reshape(-1) for g in np.meshgrid(x[0] + half * _STEPS, x[1] + half * _STEPS, indexing="ij"))
        keep = (a > 0) & (b > 0) & (a <= 5) & (b <= 5)
        r, _ = _solve(a[keep], b[keep], lnN, lnD, L, w, E_fixed, prior)
        i = int(np.argmin(r))
        edge = abs(abs(a[keep][i] - x[0]) - half) < 1e-12 * half or abs(abs(b[keep][i] - x[1]) - half) < 1e-12 * half
        x, f = np.array([a[keep][i], b[keep][i]]), float(r[i])
        if not edge:
            half /= 4.0
            if half < tol:
                break
    return x, f


def vpnls(lnN, lnD, L, w=None, *, E_fixed: float | None = None, prior: tuple[float, float] | None = None,
          start: tuple[float, float] | None = None, n_refine: int = 4) -> tuple[np.ndarray, float]:
    """Fit (E, A, B, alpha, beta) by weighted least squares (weights `w`, e.g. 1/stderr²).

    `start` (alpha, beta) skips the grid and refines from there (bootstrap resamples). Returns
    (theta = (ln A, ln B, ln E, alpha, beta), the weighted residual sum of squares)."""
    lnN, lnD, L = (np.asarray(v, np.float64) for v in (lnN, lnD, L))
    w = np.ones_like(L) if w is None else np.asarray(w, np.float64)

    if start is None:
        a, b = (g.reshape(-1) for g in np.meshgrid(GRID, GRID, indexing="ij"))
        r, _ = _solve(a, b, lnN, lnD, L, w, E_fixed, prior)
        seeds = [(a[i], b[i]) for i in np.argsort(r)[:n_refine] if np.isfinite(r[i])]
        half = GRID[1] - GRID[0]
    else:
        seeds, half = [tuple(start)], 0.1
    best_x, best_f = None, np.inf
    for x0 in seeds:
        x, f = _zoom(np.asarray(x0, np.float64), half, lnN, lnD, L, w, E_fixed, prior)
        if f < best_f:
            best_x, best_f = x, f
    if best_x is None:
        return np.full(5, np.nan), np.inf
    _, c = _solve(best_x[:1], best_x[1:], lnN, lnD, L, w, E_fixed, prior)
    E, A, B = c[0]
    with np.errstate(divide="ignore"):
        return np.array([np.log(A), np.log(B), np.log(E), best_x[0], best_x[1]]), best_f
