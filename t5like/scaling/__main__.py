"""Command line for scaling-law fits.

    python -m t5like.scaling fit RESULTS.csv --approach all --bootstrap 200 --out fit.json
    python -m t5like.scaling predict fit.json --flops 1e21
    python -m t5like.scaling plot RESULTS.csv --fit fit.json --out plots/
    python -m t5like.scaling validate RESULTS.csv --out validate.json   # fit small budgets, predict the largest
    python -m t5like.scaling lr-law LR_SWEEP.csv --out lr_law.json       # optimal LR (and batch) vs compute

RESULTS.csv is a sweep runner's table or any CSV with params, tokens and loss columns (flops optional,
else 6·params·tokens; budget optional, else runs whose flops agree within 10% form one budget; a budget
column empty in every row, as a grid or random-search sweep writes it, counts as absent). `--where
COLUMN=VALUE` (repeatable; every one must hold) keeps only the matching rows, e.g. one setting of a table
holding several. fit.json's meta records every option (columns, --where, grouping, bootstrap, grid), and
`plot --fit fit.json` reads the table with them; a flag given to plot wins.

One compute convention per table: every approach takes C from the table's own flops column when it has
one, else C = 6·N·D; budgets only group runs. fit.json's meta.flops_convention states it, with k, the
table's flops/(N·D); `predict --flops C` reads C in that convention. A table with one budget or one
model size, duplicated rows, or a flops column orders of magnitude from 6·N·D gets warnings (stderr and
meta.warnings); an approach that cannot be identified on it is refused. A powerlaw or parametric fit
whose exponent is <= 0 (loss not falling with C, N or D) gets a warning naming it (output and fit.json).

fit.json is one JSON object. For one approach its fitted parameters are top-level keys; with
`--approach all` each approach is a key ("powerlaw", "envelope", "isoflop", "parametric") holding that
object, or {"error": ...} if it could not run on this data. Per approach:
  powerlaw    E, C0, alpha (L = E + (C0/C)^alpha), frontier (the runs fitted)
  envelope    a, b, N_coef, D_coef (N_opt = N_coef·C^a, D_opt = D_coef·C^b), points
  isoflop     a, b, N_coef, D_coef, optima [{budget, N_opt, D_opt, loss_opt, ...}], skipped_budgets;
              E, C0, alpha: the loss law loss_opt = E + (C0/C)^alpha through the optima (NaN, with the reason
              in loss_law, under 4 optima, or 3 with --fix-E)
  parametric  E, A, B, alpha, beta (L = E + A/N^alpha + B/D^beta); a = beta/(alpha+beta), b = alpha/(alpha+beta),
              G = (alpha·A/(beta·B))^(1/(alpha+beta)): N_opt = G·(C/k)^a = N_coef·C^a, D_opt = (C/k)^b/G = D_coef·C^b
              with C = k·N·D, k = flops_per_param_token (6 without a flops column)
--metric loss|bpb picks the loss column (loss/final_eval_loss/eval_loss, or bpb/final_eval_bpb/eval_bpb);
a column "<loss column>_stderr" (or --stderr-column) weights the fits by each row's standard error.
--fix-E E holds the irreducible loss of powerlaw, isoflop's loss law and parametric; --E-prior MEAN,SD gives it a Gaussian
prior. --method vpnls fits parametric by variable projection (least squares on L) instead of Huber on ln L.
A powerlaw or parametric fit that predicts, beyond the data, a loss above one already measured warns.

With --bootstrap N each parameter also has <name>_ci = [lo, hi] and "bootstrap" stores the
resampled parameters (so `predict` can give intervals). "meta" records the input and options.
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from t5like import storage
from t5like.scaling.data import check_out_file, load_csv, near_optimum, parse_where
from t5like.scaling.fit import APPROACHES, Fit, fit_all, hoffmann_grid, load_fits, run_fit, save_fits


# The data and fit options fit.json records (meta) and `plot --fit` reads back, with their defaults. The
# flags default to None so that plot can tell a flag given (it wins) from one left out (fit.json's value).
SETTINGS = {"loss_column": None, "params_column": "params", "tokens_column": "tokens", "flops_column": "flops",
            "budget_column": "budget", "bins_per_decade": None, "where": [], "bootstrap": 0, "level": 0.95,
            "seed": 0, "grid": "hoffmann", "isoflop_window": None, "metric": "loss", "stderr_column": None,
            "fix_E": None, "E_prior": None, "method": "huber", "near_optimum": None}


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("results", help="CSV of runs: params, tokens, loss (or final_eval_loss) [, flops, budget, status]")
    p.add_argument("--loss-column", default=None, help="loss column (default: loss, else final_eval_loss, eval_loss)")
    p.add_argument("--params-column", default=None, help="default params")
    p.add_argument("--tokens-column", default=None, help="default tokens")
    p.add_argument("--flops-column", default=None, help="default flops; used if present, else flops = 6·params·tokens")
    p.add_argument("--budget-column", default=None,
                   help="default budget: nominal IsoFLOP budget, used to group runs if present (and not all empty)")
    p.add_argument("--bins-per-decade", type=float, default=None,
                   help="group runs into log-spaced flops bins (default: runs whose flops agree within 10%%)")
    p.add_argument("--metric", choices=("loss", "bpb"), default=None,
                   help="fit nats/token (loss, default) or bits/byte (bpb): picks the loss column when none is named")
    p.add_argument("--stderr-column", default=None,
                   help="standard error of each row's loss (default: '<loss column>_stderr' when present)")
    p.add_argument("--where", action="append", default=None, metavar="COLUMN=VALUE",
                   help="use only rows whose COLUMN equals VALUE (as text or as a number; repeatable: all must "
                        "hold), e.g. to fit one setting of a table that holds several")


def _add_fit_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bootstrap", type=int, default=None, help="resample runs N times for intervals (default 0: none)")
    p.add_argument("--level", type=float, default=None, help="interval level (default 0.95)")
    p.add_argument("--seed", type=int, default=None, help="default 0")
    p.add_argument("--grid", choices=("hoffmann", "coarse"), default=None,
                   help="parametric starts: Hoffmann et al.'s 4500 (default), or a coarse 162 for a quick look")
    p.add_argument("--isoflop-window", type=int, default=None, metavar="K",
                   help="fit each IsoFLOP parabola to the lowest-loss size and K sizes each side (default: all)")
    p.add_argument("--fix-E", dest="fix_E", type=float, default=None, metavar="E",
                   help="hold the irreducible loss E of powerlaw, isoflop's loss law and parametric at this value")
    p.add_argument("--E-prior", dest="E_prior", type=_pair, default=None, metavar="MEAN,SD",
                   help="a Gaussian prior on E (powerlaw, isoflop, parametric), in the loss's units")
    p.add_argument("--near-optimum", type=float, default=None, metavar="FRAC",
                   help="fit only runs within FRAC of their budget's best loss, e.g. 0.03 (default: all runs)")
    p.add_argument("--method", choices=("huber", "vpnls"), default=None,
                   help="parametric: Huber on ln L from the Hoffmann grid (default) or variable projection (vpnls)")


def _pair(text: str) -> list[float]:
    try:
        mean, sd = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give MEAN,SD, e.g. 1.7,0.1") from None
    return [mean, sd]


def _settle(args, recorded: dict | None = None) -> list[str]:
    """Fill every option left out on the command line from `recorded` (a fit.json's meta), else its
    default; returns the names taken from `recorded`."""
    taken = []
    for name, default in SETTINGS.items():
        if getattr(args, name) is not None:
            continue
        value = (recorded or {}).get(name)
        setattr(args, name, default if value is None else value)
        if value is not None and value != default:
            taken.append(name)
    return taken


def _recorded(meta: dict) -> dict:
    """The options a fit.json's meta records. One written before the options were recorded has only the
    columns it used (and the grouping/window options), which is what the plots need."""
    got = {k: meta[k] for k in SETTINGS if k in meta}
    columns = meta.get("columns") or {}
    for name in ("params", "tokens", "flops", "budget"):
        if f"{name}_column" not in got and name in columns:
            got[f"{name}_column"] = columns[name]
    return got


def _load(args) -> "ScalingData":  # noqa: F821
    return load_csv(args.results, loss_column=args.loss_column, params_column=args.params_column,
                    tokens_column=args.tokens_column, flops_column=args.flops_column,
                    budget_column=args.budget_column, where=parse_where(args.where), metric=args.metric,
                    stderr_column=args.stderr_column)


def _fit(data, approach: str, args) -> dict[str, Fit | str]:
    opts = dict(bootstrap=args.bootstrap, level=args.level, seed=args.seed, bins_per_decade=args.bins_per_decade,
                window=args.isoflop_window, E_fixed=args.fix_E, E_prior=args.E_prior)
    grid = hoffmann_grid(coarse=args.grid == "coarse")
    if approach == "all":
        return fit_all(data, **opts, parametric_starts=grid, parametric_method=args.method)
    if approach == "parametric":
        opts["starts"], opts["method"] = grid, args.method
    return {approach: run_fit(data, approach, **opts)}


def cmd_fit(args) -> int:
    _settle(args)
    if args.out:
        check_out_file(args.out, "fit.json")
    data = _load(args)
    if args.near_optimum is not None:
        data = near_optimum(data, args.near_optimum, args.bins_per_decade)
    fits = _fit(data, args.approach, args)
    # Every option, so that `plot --fit fit.json` (and a reader) knows what was fitted to what.
    meta = {**data.meta(), "approach": args.approach, **{k: getattr(args, k) for k in SETTINGS},
            "loss_column": data.loss_column, "where": list(data.where)}
    if not any(isinstance(f, Fit) for f in fits.values()):
        raise ValueError("no approach could be fitted:\n  " + "\n  ".join(f"{k}: {v}" for k, v in fits.items()))
    print(f"compute: {meta['flops_convention']['text']}", file=sys.stderr)
    for w in meta["warnings"]:
        print(f"warning: {w}", file=sys.stderr)
    for name, f in fits.items():
        print(f.summary() if isinstance(f, Fit) else f"{name}: skipped: {f}", file=sys.stderr)
        for w in f.details.get("warnings", []) if isinstance(f, Fit) else []:
            print(f"warning: {name}: {w}", file=sys.stderr)
    if args.out:
        save_fits(args.out, fits, meta)
        print(f"wrote {args.out}", file=sys.stderr)
    else:
        from t5like.scaling.fit import fits_to_json
        json.dump(fits_to_json(fits, meta), sys.stdout, indent=1)
        print()
    return 0


def _fmt(x: float) -> str:
    return "n/a" if x is None or not np.isfinite(x) else (f"{x:.4g}" if 1e-3 <= abs(x) < 1e5 else f"{x:.3e}")


def cmd_predict(args) -> int:
    fits, meta = load_fits(args.fit)
    if args.approach:
        if args.approach not in fits:
            raise ValueError(f"{args.fit} has no successful '{args.approach}' fit; it has: {', '.join(fits) or 'none'}.")
        fits = {args.approach: fits[args.approach]}
    convention = (meta.get("flops_convention") or {}).get("text", "unknown (fit.json predates this field)")
    for w in meta.get("warnings", []):
        print(f"warning: {w}", file=sys.stderr)
    for name, f in fits.items():
        for w in f.details.get("warnings", []):
            print(f"warning: {name}: {w}", file=sys.stderr)
    rows = []
    for C in args.flops:
        if not C > 0:
            raise ValueError(f"--flops {C}: compute must be positive.")
        for name, f in fits.items():
            # NaN: a quantity this fit could not give (Approach 2's loss law with too few budgets)
            point = {k: float(v) for k, v in f.predict(C).items() if np.isfinite(v)}
            ci = {k: v.tolist() for k, v in f.predict_interval(C).items() if k in point}
            rows.append({"flops": C, "approach": name, **point, **{f"{k}_ci": v for k, v in ci.items()},
                         "flops_convention": convention})
    if args.json:
        json.dump(rows, sys.stdout, indent=1)
        print()
        return 0
    level = next((f.level for f in fits.values() if f.samples), None)
    print(f"{args.fit}: " + (f"[{level:.0%} bootstrap intervals]" if level else "(no bootstrap: point estimates only)"))
    print(f"compute: {convention}")
    cols = (("loss", f"{meta.get('metric', 'loss')} [{meta.get('units', 'nats/token')}]"), ("N_opt", "N_opt [params]"), ("D_opt", "D_opt [tokens]"),
            ("tokens_per_param", "tokens/param"))
    print(f"{'C [FLOPs]':>10}  {'approach':<11}" + "".join(f"  {h:<28}" for _, h in cols))
    for r in rows:
        cells = []
        for k, _ in cols:
            v = r.get(k)
            cell = "-" if v is None else _fmt(v)
            if r.get(f"{k}_ci"):
                lo, hi = r[f"{k}_ci"]
                cell += f" [{_fmt(lo)}, {_fmt(hi)}]"
            cells.append(f"  {cell:<28}")
        print(f"{r['flops']:>10.3g}  {r['approach']:<11}" + "".join(cells))
    return 0


def cmd_plot(args) -> int:
    from t5like.scaling.plot import plot_all  # matplotlib only when plotting

    storage.check_workdir(args.out, "--out")
    fits: dict[str, Fit] = {}
    meta = {}
    if args.fit:
        fits, meta = load_fits(args.fit)
    taken = _settle(args, _recorded(meta))
    if taken:  # the table is read as the fit read it (columns, row filters); flags given here win
        print(f"plot: from {args.fit}: " + ", ".join(f"{k}={getattr(args, k)}" for k in taken), file=sys.stderr)
    data = _load(args)
    missing = [a for a in ("powerlaw", "isoflop", "envelope", "parametric") if a not in fits]
    for name in missing:  # fit what the plots need; approaches that cannot run on this data are left out
        try:
            fits[name] = _fit(data, name, args)[name]
        except ValueError as e:
            print(f"{name}: not plotted: {e}", file=sys.stderr)
    paths = plot_all(data, fits, args.out)
    for p in paths:
        print(p)
    return 0


def cmd_validate(args) -> int:
    from t5like.scaling.validate import VARIANTS, format_report, validate

    if args.bootstrap is None:
        args.bootstrap = 100  # validate states intervals by default
    _settle(args)
    if args.out:
        check_out_file(args.out, "validate.json")
    data = _load(args)
    variants = tuple(args.approach or VARIANTS)
    report = validate(data, split=args.split, holdout=args.holdout, variants=variants,
                      bootstrap=args.bootstrap, level=args.level,
                      seed=args.seed, bins_per_decade=args.bins_per_decade, window=args.isoflop_window,
                      E_fixed=args.fix_E, E_prior=args.E_prior, starts=hoffmann_grid(coarse=args.grid == "coarse"),
                      profile=not args.no_e_profile, near=args.near_optimum)
    report["where"] = list(data.where)
    print(format_report(report))
    text = json.dumps(report, indent=1, allow_nan=False, default=float)
    if args.out:
        storage.write_atomic(args.out, text + "\n")
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


def cmd_lr_law(args) -> int:
    from t5like.scaling.lrlaw import fit_lr_law, load_lr_sweep

    if args.out:
        check_out_file(args.out, "lr_law.json")
    rows = load_lr_sweep(args.results, lr_column=args.lr_column, batch_column=args.batch_column,
                         loss_column=args.loss_column, metric=args.metric, where=parse_where(args.where),
                         params_column=args.params_column, tokens_column=args.tokens_column,
                         flops_column=args.flops_column)
    law = fit_lr_law(rows, of=args.of)
    print(law.summary())
    if args.out:
        law.write(args.out)
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m t5like.scaling", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("fit", help="fit scaling laws to a table of runs, write fit.json")
    _add_data_args(p)
    p.add_argument("--approach", choices=APPROACHES + ("all",), default="all")
    _add_fit_args(p)
    p.add_argument("--out", default=None, help="fit.json to write (default: print JSON to stdout)")
    p.set_defaults(func=cmd_fit)

    p = sub.add_parser("predict", help="loss, N_opt, D_opt at a compute budget from fit.json")
    p.add_argument("fit", help="fit.json from the fit command")
    p.add_argument("--flops", type=float, action="append", required=True, help="compute in FLOPs (repeatable)")
    p.add_argument("--approach", choices=APPROACHES, default=None, help="only this approach's prediction")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("plot", help="loss-vs-compute, IsoFLOP and N_opt/D_opt plots (PNG and PDF)")
    _add_data_args(p)
    p.add_argument("--fit", default=None, help="fit.json to plot (approaches it lacks are fitted here)")
    _add_fit_args(p)
    p.add_argument("--out", required=True, help="directory for the figures")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("validate", help="leave the future out: fit the smaller budgets, predict the held-out "
                                        "largest, report each approach's error (JSON with --out)")
    _add_data_args(p)
    _add_fit_args(p)
    p.add_argument("--split", type=float, default=None, metavar="C",
                   help="fit budgets <= C, hold out those above (default: hold out the largest budget)")
    p.add_argument("--holdout", type=float, nargs="+", default=None, metavar="C",
                   help="hold out these budgets (each above every fitted one)")
    p.add_argument("--approach", action="append", default=None,
                   choices=("powerlaw", "envelope", "isoflop", "parametric", "parametric_vpnls"),
                   help="validate only these (repeatable; default all five)")
    p.add_argument("--no-e-profile", action="store_true", help="skip the refits with E held at 0.9–1.1× its value")
    p.add_argument("--out", default=None, help="validate.json to write")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("lr-law", help="fit the optimal learning rate (and batch) as a power law of compute or "
                                      "N from an LR sweep; the IsoFLOP design reads the file (lr_law=...)")
    p.add_argument("results", help="CSV of the LR sweep's runs: params, tokens [, flops], loss, learning rate")
    p.add_argument("--lr-column", default=None, help="default: lr, learning_rate, peak_lr, or optim.learning_rate "
                                                     "from an overrides column")
    p.add_argument("--batch-column", default=None, help="default: batch_size if present (its law is fitted too)")
    p.add_argument("--loss-column", default=None)
    p.add_argument("--metric", choices=("loss", "bpb"), default="loss")
    p.add_argument("--params-column", default="params")
    p.add_argument("--tokens-column", default="tokens")
    p.add_argument("--flops-column", default="flops")
    p.add_argument("--where", action="append", default=None, metavar="COLUMN=VALUE")
    p.add_argument("--of", choices=("flops", "params"), default="flops",
                   help="what the optimal LR is a power law of (DeepSeek LLM: compute; Porian et al.: N)")
    p.add_argument("--out", default=None, help="lr_law.json to write")
    p.set_defaults(func=cmd_lr_law)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
