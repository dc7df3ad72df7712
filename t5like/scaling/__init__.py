"""Scaling laws: fit compute-optimal power laws to sweep results, predict, and plot.

    python -m t5like.scaling fit RESULTS.csv --approach all --bootstrap 200 --out fit.json
    python -m t5like.scaling predict fit.json --flops 1e21
    python -m t5like.scaling plot RESULTS.csv --fit fit.json --out plots/

Library use: `load_csv` / `from_arrays` build a validated `ScalingData`; `run_fit(data, approach)` returns a
`Fit` (parameters, bootstrap samples, `predict`). See fit.py for the four approaches.

Names are imported on first use, so `import t5like.scaling.design` does not pay for JAX.
"""
import importlib

_EXPORTS = {
    "data": ("ChinchillaLaw", "ScalingData", "compute_groups", "from_arrays", "load_csv", "synthetic_isoflop",
             "table_warnings"),
    "fit": ("APPROACHES", "Fit", "fit_all", "fit_envelope", "fit_isoflop", "fit_parametric", "fit_powerlaw",
            "frontier", "hoffmann_grid", "load_fits", "run_fit", "save_fits"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f"t5like.scaling.{_WHERE[name]}"), name)
    raise AttributeError(f"module 't5like.scaling' has no attribute {name!r}")
