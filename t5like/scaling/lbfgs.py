"""Batched L-BFGS in JAX: many starts (and bootstrap resamples) of one small objective at once.

optax.lbfgs under jax.vmap works but is slow on CPU (its zoom line search is a data-dependent
while_loop; vmapped over the 4500 Hoffmann starts it took minutes here). Instead the line search is
vectorised: each iteration evaluates the objective at a fixed ladder of step sizes along the L-BFGS
direction, for every start at once, and keeps the best. Converged starts hand their slot to queued
ones between chunks of iterations (see minimize_batch).

An objective is `objective(theta (P,), w (n,), X (n, k), y (n,), delta) -> scalar`: `w` are per-point
weights (how a bootstrap resample enters) and `delta` a scalar or small vector of constants the objective
may use (a Huber scale, a prior on a parameter, a parameter held fixed).
"""
from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

# Step ladders along the search direction. An L-BFGS direction is well scaled (t = 1 is usually right).
# Steepest descent (first iteration, or after a reset) is taken with unit length, and near an optimum of
# the nearly piecewise-linear Huber objective the right step can be far below that: hence 1 down to 1e-8.
_STEPS = np.array([4.0, 1.0, 1 / 4, 1 / 16, 1 / 128, 1 / 2048])
_STEPS_SD = np.array([1.0, 2.5e-2, 6.3e-4, 1.6e-5, 4e-7, 1e-8])
_MAX_TRIAL_ELEMENTS = 2e7  # slots × steps × points: bounds the trial tensor's memory


def _finite(v):
    return jnp.where(jnp.isfinite(v), v, jnp.inf)


def _batch_fns(objective, w, X, y, delta):
    w_axis = 0 if w.ndim == 2 else None
    f = lambda th, ww: objective(th, ww, X, y, delta)
    value_and_grad = jax.vmap(jax.value_and_grad(f), in_axes=(0, w_axis))
    trials = jax.vmap(jax.vmap(f, in_axes=(0, None)), in_axes=(0, w_axis))
    return value_and_grad, trials


def _two_loop(g, s_hist, y_hist, rho):
    """L-BFGS direction −H·g from the (s, y) history; the newest pair is last, empty slots have rho = 0."""
    def back(q, hist):
        s, yv, r = hist
        a = r * jnp.sum(s * q, -1)
        return q - a[:, None] * yv, a

    def forward(r, hist):
        s, yv, rh, a = hist
        return r + s * (a - rh * jnp.sum(yv * r, -1))[:, None], None

    hist = (jnp.swapaxes(s_hist, 0, 1), jnp.swapaxes(y_hist, 0, 1), rho.T)  # memory axis first, for scan
    q, alphas = jax.lax.scan(back, g, hist, reverse=True)
    has = rho[:, -1] > 0
    sy = jnp.sum(s_hist[:, -1] * y_hist[:, -1], -1)
    yy = jnp.sum(y_hist[:, -1] ** 2, -1)
    gnorm = jnp.maximum(jnp.linalg.norm(g, axis=-1), 1e-300)
    # Without history: a unit-length steepest-descent step, which the step ladder then scales.
    gamma = jnp.where(has, sy / jnp.where(has, yy, 1.0), 1.0 / gnorm)
    r, _ = jax.lax.scan(forward, gamma[:, None] * q, hist + (alphas,))
    d = -r
    descent = jnp.sum(d * g, -1) < 0
    return jnp.where(descent[:, None], d, -g / gnorm[:, None])


@partial(jax.jit, static_argnames=("objective", "n_iter"))
def _lbfgs_chunk(objective, x, s_hist, y_hist, rho, done, w, X, y, delta, n_iter: int, gtol: float):
    """Up to n_iter L-BFGS iterations for every row of x (S, P); rows with done=True stay frozen.
    The (s, y, rho) history carries over between chunks; a fresh start enters with rho = 0."""
    value_and_grad, trials = _batch_fns(objective, w, X, y, delta)
    ladder, ladder_sd = jnp.asarray(_STEPS)[None], jnp.asarray(_STEPS_SD)[None]
    f, g = value_and_grad(x, w)
    f = _finite(f)
    done = done | ~jnp.isfinite(f) | ~jnp.all(jnp.isfinite(g), -1)
    col = lambda m, a: m.reshape((-1,) + (1,) * (a.ndim - 1))

    def body(c):
        i, x, f, g, s_hist, y_hist, rho, done = c
        d = _two_loop(g, s_hist, y_hist, rho)
        had_history = rho[:, -1] > 0
        steps = jnp.where(had_history[:, None], ladder, ladder_sd)
        cand = x[:, None, :] + steps[:, :, None] * d[:, None, :]
        fc = _finite(trials(cand, w))
        j = jnp.argmin(fc, axis=1)
        f_new = jnp.take_along_axis(fc, j[:, None], 1)[:, 0]
        x_new = jnp.take_along_axis(cand, j[:, None, None], 1)[:, 0]
        improved = (f_new < f - 1e-15 * jnp.abs(f)) & ~done
        _, g_new = value_and_grad(x_new, w)
        s, yv = x_new - x, g_new - g
        sy = jnp.sum(s * yv, -1)
        # Keep the curvature pair only when s·y > 0, so the implicit Hessian stays positive definite.
        good = improved & (sy > 1e-12 * jnp.linalg.norm(s, axis=-1) * jnp.linalg.norm(yv, axis=-1))
        push = lambda h, new: jnp.where(col(good, h), jnp.concatenate([h[:, 1:], new[:, None]], 1), h)
        keep = lambda new, old: jnp.where(col(improved, new), new, old)
        # No progress along an L-BFGS direction: forget the history and try steepest descent next.
        # No progress along steepest descent either, or a tiny gradient: this row has converged.
        wipe = ~improved & had_history & ~done
        done = done | (~improved & ~had_history) | ((jnp.max(jnp.abs(g_new), -1) < gtol) & improved)
        s_hist, y_hist = push(s_hist, s), push(y_hist, yv)
        rho = push(rho, 1.0 / jnp.where(good, sy, 1.0))
        s_hist, y_hist, rho = (jnp.where(col(wipe, h), 0.0, h) for h in (s_hist, y_hist, rho))
        return i + 1, keep(x_new, x), keep(f_new, f), keep(g_new, g), s_hist, y_hist, rho, done

    c = jax.lax.while_loop(lambda c: (c[0] < n_iter) & ~jnp.all(c[-1]), body, (0, x, f, g, s_hist, y_hist, rho, done))
    _, x, f, _, s_hist, y_hist, rho, done = c
    return x, f, s_hist, y_hist, rho, done


def minimize_batch(objective, starts: np.ndarray, X: np.ndarray, y: np.ndarray, weights: np.ndarray | None = None,
                   *, delta=0.0, max_iter: int = 1000, chunk_iters: int = 20, memory: int = 10,
                   gtol: float = 1e-10) -> tuple[np.ndarray, np.ndarray]:
    """Minimise objective(theta, w, X, y, delta) from every row of `starts` (S, P).

    `weights` is None (all ones), shape (n,) shared by all starts, or (S, n), one row per start (how a
    bootstrap resample enters: row counts as weights). Returns the final (S, P) parameters and (S,)
    objective values (inf where the start failed).

    Starts stream through a fixed number of slots (a power of two): whenever a start converges, the next
    one takes its slot. One array shape means one compilation (XLA on CPU takes seconds per shape), and
    slow starts do not hold up the rest.
    """
    starts = np.asarray(starts, np.float64)
    S, P = starts.shape
    n = len(y)
    weights = np.ones(n) if weights is None else np.asarray(weights, np.float64)
    per_start = weights.ndim == 2
    # Bound the (slots × steps × points) trial tensor; a power of two so that fits share compilations.
    cap = 2 ** int(math.log2(max(16.0, _MAX_TRIAL_ELEMENTS / (len(_STEPS) * max(n, 1)))))
    slots = min(cap, 512, max(16, 1 << int(math.ceil(math.log2(S)))))

    x_out, f_out = starts.copy(), np.full(S, np.inf)
    owner = np.full(slots, -1)  # the start each slot is working on; -1 = idle
    iters = np.zeros(slots, np.int64)
    x = np.repeat(starts[:1], slots, 0)
    s_hist, y_hist, rho = np.zeros((slots, memory, P)), np.zeros((slots, memory, P)), np.zeros((slots, memory))
    w = np.repeat(weights[:1], slots, 0) if per_start else weights
    queued = 0
    with jax.enable_x64(True):
        Xj, yj, dj = jnp.asarray(X, jnp.float64), jnp.asarray(y, jnp.float64), jnp.asarray(delta, jnp.float64)
        wj = jnp.asarray(w)
        while True:
            free = np.flatnonzero(owner < 0)[: S - queued]
            if len(free):  # load queued starts into idle slots, with an empty history
                x, s_hist, y_hist, rho = (np.array(a) for a in (x, s_hist, y_hist, rho))
                owner[free], iters[free] = np.arange(queued, queued + len(free)), 0
                queued += len(free)
                x[free], s_hist[free], y_hist[free], rho[free] = starts[owner[free]], 0.0, 0.0, 0.0
                if per_start:
                    w[free] = weights[owner[free]]
                    wj = jnp.asarray(w)
            x, f, s_hist, y_hist, rho, done = _lbfgs_chunk(objective, x, s_hist, y_hist, rho, owner < 0, wj, Xj, yj,
                                                           dj, n_iter=chunk_iters, gtol=gtol)
            iters += chunk_iters
            xh, fh, done = np.asarray(x), np.asarray(f), np.asarray(done)
            fin = np.flatnonzero((owner >= 0) & (done | (iters >= max_iter)))
            x_out[owner[fin]], f_out[owner[fin]] = xh[fin], fh[fin]
            owner[fin] = -1
            if queued == S and (owner < 0).all():
                return x_out, f_out
