"""Scaling-law figures (matplotlib, Agg): each is written as PNG and PDF.

  loss_vs_compute   all runs, the compute frontier and its power-law fit, extrapolated 100× past the data
                    (shaded: bootstrap interval if the fit has one, else the extrapolation region)
  isoflop           loss against N per budget, the fitted parabolas and their minima
  optimal_allocation  N_opt and D_opt against C: optima, fitted power laws, Chinchilla's 20 tokens/param
"""
from __future__ import annotations

import io

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from t5like import storage  # noqa: E402
from t5like.scaling.data import ScalingData, compute_groups  # noqa: E402
from t5like.scaling.fit import Fit  # noqa: E402

EXTRAPOLATE = 100.0  # draw fits out to this multiple of the largest budget
LOSS_LABEL = "loss [nats/token]"
C_LABEL = "training compute C [FLOPs]"


def _ci_text(fit: Fit, name: str) -> str:
    ci = fit.ci(name)
    return f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""


def _c_grid(data: ScalingData) -> np.ndarray:
    return np.logspace(np.log10(data.flops.min()) - 0.3, np.log10(data.flops.max() * EXTRAPOLATE), 200)


def _grid(ax) -> None:
    ax.grid(True, which="major", alpha=0.35)
    ax.grid(True, which="minor", alpha=0.1)


def _plain_log_y(ax) -> None:
    """Loss spans well under a decade, where a log axis gets one or two labels (3×10^0): place evenly
    spaced plain-number ticks instead. Call after set_ylim."""
    lo, hi = ax.get_ylim()
    ticks = [t for t in matplotlib.ticker.MaxNLocator(8).tick_values(lo, hi) if lo <= t <= hi]
    ax.yaxis.set_major_locator(matplotlib.ticker.FixedLocator(ticks))
    ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%.3g"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())


def _shade_extrapolation(ax, data: ScalingData) -> None:
    ax.axvspan(data.flops.max(), data.flops.max() * EXTRAPOLATE, color="0.93", zorder=0, label="extrapolation")


def plot_loss_vs_compute(ax, data: ScalingData, fits: dict[str, Fit]) -> None:
    from t5like.scaling.fit import frontier

    ax.scatter(data.flops, data.loss, s=10, color="0.6", label="runs", zorder=2)
    fr = frontier(data.flops, data.loss, data.budget)
    ax.plot(data.flops[fr], data.loss[fr], "o", ms=5, mfc="none", color="k", label="compute frontier", zorder=3)
    C = _c_grid(data)
    _shade_extrapolation(ax, data)
    pl = fits.get("powerlaw")
    if pl is not None:
        p = pl.params
        label = (f"L = {p['E']:.3g} + ({p['C0']:.2g}/C)$^{{{p['alpha']:.3f}}}$\n"
                 f"α = {p['alpha']:.3f}{_ci_text(pl, 'alpha')}, E = {p['E']:.3f}{_ci_text(pl, 'E')}")
        ax.plot(C, pl.predict(C)["loss"], color="C3", lw=2, label=label, zorder=4)
        band = pl.predict_interval(C).get("loss")
        if band is not None:
            ax.fill_between(C, band[:, 0], band[:, 1], color="C3", alpha=0.2, lw=0,
                            label=f"{pl.level:.0%} bootstrap interval", zorder=1)
    iso = fits.get("isoflop")
    if iso is not None and np.isfinite(iso.params.get("alpha", np.nan)):
        opt = iso.details["optima"]
        ax.plot([o["flops"] for o in opt], [o["loss_opt"] for o in opt], "*", ms=9, color="C1", mec="k", mew=0.5,
                zorder=4, label="IsoFLOP minima")
        p = iso.params
        ax.plot(C, iso.predict(C)["loss"], color="C1", lw=1.5, zorder=4,
                label=f"IsoFLOP minima: L = {p['E']:.3g} + ({p['C0']:.2g}/C)$^{{{p['alpha']:.3f}}}$")
    par = fits.get("parametric")
    if par is not None and np.isfinite(par.params["G"]):
        ax.plot(C, par.predict(C)["loss"], color="C0", ls="--", lw=1.5, zorder=4,
                label=f"parametric L(N_opt, D_opt): E = {par.params['E']:.3f}")
    ax.set(xscale="log", yscale="log", xlabel=C_LABEL, ylabel=LOSS_LABEL, title="Loss against compute")
    lo = data.loss.min() if pl is None else min(data.loss.min(), pl.predict(C)["loss"].min())
    ax.set_ylim(lo * 0.95, np.percentile(data.loss, 98) * 1.05)
    _plain_log_y(ax)
    _grid(ax)
    ax.legend(fontsize=8, loc="upper right")


def plot_isoflop(ax, data: ScalingData, fits: dict[str, Fit]) -> None:
    iso = fits.get("isoflop")
    bins = iso.details.get("bins_per_decade") if iso else None
    gid, budgets = compute_groups(data, bins)
    norm = matplotlib.colors.LogNorm(budgets.min(), budgets.max() if budgets.max() > budgets.min() else budgets.min() * 10)
    cmap = plt.get_cmap("viridis")
    for g, C in enumerate(budgets):
        rows = gid == g
        ax.plot(data.params[rows], data.loss[rows], "o", ms=4, color=cmap(norm(C)), alpha=0.8)
    if iso is not None:
        for o in iso.details["optima"]:
            color = cmap(norm(o["budget"]))
            n_range = o.get("N_range") or [data.params[np.isclose(budgets[gid], o["budget"])].min(),
                                            data.params[np.isclose(budgets[gid], o["budget"])].max()]
            x = np.linspace(*np.log(n_range), 100)  # over the sizes the parabola was fitted to
            c2, c1, c0 = o["parabola_ln_n"]
            u = x - o["ln_n_center"]
            ax.plot(np.exp(x), c0 + c1 * u + c2 * u * u, color=color, lw=1.2)
            xerr = None
            if o.get("N_opt_ci") and None not in o["N_opt_ci"]:
                lo, hi = o["N_opt_ci"]
                xerr = [[o["N_opt"] - lo], [hi - o["N_opt"]]]
            ax.errorbar(o["N_opt"], o["loss_opt"], xerr=xerr, fmt="*", ms=11, color=color, mec="k", mew=0.6,
                        ecolor="k", elinewidth=0.8, capsize=2, zorder=5)
        # legend entries for the marker kinds; the colour bar says which budget is which
        ax.plot([], [], "o", color="0.4", ms=4, label="runs")
        ax.plot([], [], "-", color="0.4", label="parabola in ln N")
        ax.plot([], [], "*", color="0.4", mec="k", ms=11, label="minimum (N_opt)" + (", bootstrap CI" if iso.samples else ""))
        ax.legend(fontsize=8, loc="best")
        title = f"IsoFLOP profiles ({len(iso.details['optima'])} budgets fitted"
        title += f", {len(iso.details['skipped_budgets'])} skipped)" if iso.details["skipped_budgets"] else ")"
    else:
        title = "IsoFLOP profiles (no IsoFLOP fit)"
    sm = matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap)
    plt.colorbar(sm, ax=ax, label="budget C [FLOPs]")
    ax.set(xscale="log", xlabel="parameters N", ylabel=LOSS_LABEL, title=title)
    ax.set_ylim(data.loss.min() * 0.98, np.percentile(data.loss, 95) * 1.02)
    _grid(ax)


def plot_allocation(ax_n, ax_d, data: ScalingData, fits: dict[str, Fit]) -> None:
    C = _c_grid(data)
    styles = {"isoflop": ("C1", "-", "*"), "envelope": ("C2", "--", "s"), "parametric": ("C0", ":", None)}
    for ax, key, col in ((ax_n, "N_opt", "params"), (ax_d, "D_opt", "tokens")):
        for name, (color, ls, marker) in styles.items():
            f = fits.get(name)
            if f is None or not np.isfinite(f.params.get("a", np.nan)):
                continue
            exp = f.params["a" if key == "N_opt" else "b"]
            ax.plot(C, f.predict(C)[key], color=color, ls=ls, lw=1.8,
                    label=f"{name}: ∝ C$^{{{exp:.3f}}}$" + _ci_text(f, "a" if key == "N_opt" else "b"))
            band = f.predict_interval(C).get(key)
            if band is not None:
                ax.fill_between(C, band[:, 0], band[:, 1], color=color, alpha=0.12, lw=0)
            if name == "isoflop":
                pts = f.details["optima"]
                x, y = [o.get("flops", o["budget"]) for o in pts], [o[key] for o in pts]
                err = None
                if pts and pts[0].get(f"{key}_ci"):
                    err = np.abs(np.array([o[f"{key}_ci"] for o in pts], dtype=float).T - np.array(y, float))
                ax.errorbar(x, y, yerr=err, fmt=marker, color=color, mec="k", mew=0.5, ms=9, capsize=2,
                            label="IsoFLOP minima")
            elif name == "envelope":
                pts = f.details["points"]
                ax.plot([p["flops"] for p in pts], [p[col] for p in pts], marker, color=color, mfc="none", ms=6,
                        label="lowest-loss run per budget")
        # Chinchilla's rule of thumb: D = 20 N, so C = 6·N·D = 120 N² and N = sqrt(C/120).
        ref = np.sqrt(C / 120.0) * (1.0 if key == "N_opt" else 20.0)
        ax.plot(C, ref, color="0.5", lw=1, ls="-.", label="20 tokens/param (N = √(C/120))")
        _shade_extrapolation(ax, data)
        unit = "parameters" if key == "N_opt" else "tokens"
        ax.set(xscale="log", yscale="log", xlabel=C_LABEL, ylabel=f"{key} [{unit}]",
               title=f"Compute-optimal {'model size' if key == 'N_opt' else 'training tokens'}")
        _grid(ax)
        ax.legend(fontsize=7.5, loc="upper left")


def plot_all(data: ScalingData, fits: dict[str, Fit], out_dir: str) -> list[str]:
    """Write the three figures as PNG and PDF under out_dir (local or gs://); returns the paths written."""
    storage.makedirs(out_dir)
    paths = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        for ext in ("png", "pdf"):
            path = storage.join(out_dir, f"{name}.{ext}")
            buf = io.BytesIO()  # render in memory, then one write: savefig cannot write to gs://
            fig.savefig(buf, format=ext, dpi=130)
            storage.write_atomic(path, buf.getvalue())
            paths.append(path)
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    plot_loss_vs_compute(ax, data, fits)
    save(fig, "loss_vs_compute")

    fig, ax = plt.subplots(figsize=(8, 5.5))
    plot_isoflop(ax, data, fits)
    save(fig, "isoflop")

    fig, (ax_n, ax_d) = plt.subplots(1, 2, figsize=(13, 5.5))
    plot_allocation(ax_n, ax_d, data, fits)
    save(fig, "optimal_allocation")
    return paths
