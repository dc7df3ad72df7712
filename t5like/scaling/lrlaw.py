"""A learning-rate (and batch-size) law fitted from a small LR sweep, for the IsoFLOP design to read.

    python -m t5like.scaling lr-law LR_SWEEP.csv --of flops --out lr_law.json

The sweep trains a few sizes or budgets, each at several learning rates. Per group (one compute budget,
or one model size with `--of params`) the optimal LR is the vertex of a parabola of loss in ln LR when 3 or
more LRs bracket the minimum, else the best run's LR (noted in the point). Then lr_opt = coef · X^exponent
by log-log least squares, X the group's compute C (DeepSeek LLM 2024: η_opt = 0.3118·C^-0.125) or model
size N (Porian et al. 2024 tune LR per N). When the batch size varies too, the best run's batch per group
gives batch_opt = coef · X^exponent the same way (DeepSeek: B_opt = 0.292·C^0.3271); the design does not
read the batch law yet: it is recorded for the reader.

An IsoFLOP design with `lr_law="lr_law.json"` sets each trial's learning rate from the law at the trial's
budget (or N), and the plan records the rule per trial.
"""
from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import asdict, dataclass, field

import numpy as np

from t5like import storage
from t5like.scaling.data import METRIC_COLUMNS, OK_STATUSES, _matches, read_input

LR_COLUMNS = ("lr", "learning_rate", "peak_lr")
OVERRIDE_KEY = "optim.learning_rate"
GROUP_RTOL = 0.1


@dataclass
class LrLaw:
    """lr_opt = lr_coef · X^lr_exponent (X: compute C in FLOPs, or params N), optional batch law alike."""
    of: str
    lr_coef: float
    lr_exponent: float
    batch_coef: float | None = None
    batch_exponent: float | None = None
    points: list = field(default_factory=list)
    source: str = ""

    def lr(self, x: float) -> float:
        return float(self.lr_coef * x ** self.lr_exponent)

    def batch(self, x: float) -> float | None:
        return None if self.batch_coef is None else float(self.batch_coef * x ** self.batch_exponent)

    def rule(self) -> str:
        x = "C" if self.of == "flops" else "N"
        text = f"lr = {self.lr_coef:.4g} · {x}^{self.lr_exponent:.4g}"
        if self.batch_coef is not None:
            text += f"; batch_opt = {self.batch_coef:.4g} · {x}^{self.batch_exponent:.4g} (not applied)"
        return text + (f" (lr law {self.source})" if self.source else "")

    def summary(self) -> str:
        lines = [f"{self.rule()}, from {len(self.points)} groups:"]
        for p in self.points:
            lines.append(f"  {self.of} {p['x']:.3g}: lr_opt {p['lr_opt']:.3g} ({p['how']}, {p['n_runs']} runs)"
                         + (f", batch {p['batch_opt']:g}" if p.get("batch_opt") else ""))
        return "\n".join(lines)

    def write(self, path: str) -> None:
        storage.write_atomic(path, json.dumps(asdict(self), indent=1) + "\n")


def load_lr_law(path: str) -> LrLaw:
    """Read lr_law.json (local or gs://), with an error naming the file when it is not one."""
    try:
        d = json.loads(read_input(path, "lr law"))
    except FileNotFoundError as e:
        raise ValueError(f"design.lr_law: {e}") from None
    try:
        law = LrLaw(**{k: d[k] for k in ("of", "lr_coef", "lr_exponent")},
                    **{k: d.get(k) for k in ("batch_coef", "batch_exponent")}, points=d.get("points", []),
                    source=d.get("source") or str(path))
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not an lr law written by `python -m t5like.scaling lr-law` ({e}).") from None
    if law.of not in ("flops", "params") or not (law.lr_coef > 0 and math.isfinite(law.lr_exponent)):
        raise ValueError(f"{path}: of={law.of!r}, lr_coef={law.lr_coef}: expected of flops|params and lr_coef > 0.")
    return law


def _lr_from_overrides(text: str) -> float | None:
    try:
        items = json.loads(text)
    except (json.JSONDecodeError, TypeError):
        items = str(text).split()
    for item in items:
        key, _, value = str(item).partition("=")
        if key == OVERRIDE_KEY:
            return float(value)
    return None


def load_lr_sweep(path: str, *, lr_column: str | None = None, batch_column: str | None = None,
                  loss_column: str | None = None, metric: str = "loss", where=(), params_column: str = "params",
                  tokens_column: str = "tokens", flops_column: str = "flops") -> dict[str, np.ndarray]:
    """Columns params, flops, lr, loss (and batch) of an LR sweep's table; rows with a status other than
    ok/finished are dropped. The LR comes from `lr_column`, else lr/learning_rate/peak_lr, else the
    `optim.learning_rate=` item of an `overrides` column (as the sweep runner writes it)."""
    text = read_input(path, "LR sweep table").decode("utf-8-sig")
    records = list(csv.DictReader(io.StringIO(text, newline="")))
    header = list(records[0]) if records else []
    have = ", ".join(header)
    for column, value in where:
        if column not in header:
            raise ValueError(f"--where {column}={value}: {path} has no column '{column}' (columns are: {have}).")
        records = [r for r in records if _matches(r.get(column), value)]
    if "status" in header:
        records = [r for r in records if str(r["status"]).strip().lower() in OK_STATUSES]
    if not records:
        raise ValueError(f"{path}: no rows left to fit (after --where and dropping runs whose status is not ok).")
    loss_column = loss_column or next((c for c in METRIC_COLUMNS[metric] if c in header), None)
    if loss_column is None or loss_column not in header:
        raise ValueError(f"{path}: no loss column for --metric {metric} (looked for "
                         f"{', '.join(METRIC_COLUMNS[metric])}; columns are: {have}); name it with --loss-column.")
    for col, flag in ((params_column, "--params-column"), (tokens_column, "--tokens-column")):
        if col not in header:
            raise ValueError(f"{path}: missing column '{col}' (columns are: {have}); name it with {flag}.")
    lr_column = lr_column or next((c for c in LR_COLUMNS if c in header), None)
    if lr_column is not None and lr_column not in header:
        raise ValueError(f"{path}: --lr-column {lr_column!r} is not a column (columns are: {have}).")
    if lr_column is None and "overrides" not in header:
        raise ValueError(f"{path}: no learning-rate column (looked for {', '.join(LR_COLUMNS)} and an overrides "
                         f"column with {OVERRIDE_KEY}=; columns are: {have}); name it with --lr-column.")
    batch_column = batch_column or ("batch_size" if "batch_size" in header else None)
    out = {k: [] for k in ("params", "flops", "lr", "loss", "batch")}
    for i, r in enumerate(records):
        lr = float(r[lr_column]) if lr_column else _lr_from_overrides(r.get("overrides"))
        if lr is None:
            raise ValueError(f"{path}: row {i + 1} has no {OVERRIDE_KEY}= in its overrides; name the LR column "
                             "with --lr-column.")
        n, d = float(r[params_column]), float(r[tokens_column])
        flops = float(r[flops_column]) if flops_column in header and (r.get(flops_column) or "").strip() else 6 * n * d
        out["params"].append(n), out["flops"].append(flops), out["lr"].append(lr)
        out["loss"].append(float(r[loss_column]))
        out["batch"].append(float(r[batch_column]) if batch_column else np.nan)
    arrays = {k: np.asarray(v, np.float64) for k, v in out.items()}
    for k in ("params", "flops", "lr", "loss"):
        bad = ~(np.isfinite(arrays[k]) & (arrays[k] > 0))
        if bad.any():
            raise ValueError(f"{path}: {bad.sum()} row(s) with a non-positive or missing {k} (first: row "
                             f"{np.flatnonzero(bad)[0] + 1}); fix or drop them.")
    arrays["source"] = str(path)
    return arrays


def _groups(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    gid = np.empty(len(x), np.int64)
    g, first = 0, x[order[0]]
    for i in order:
        if x[i] > first * (1 + GROUP_RTOL):
            g, first = g + 1, x[i]
        gid[i] = g
    return gid


def _optimum_lr(lr: np.ndarray, loss: np.ndarray) -> tuple[float, str]:
    """Vertex of loss ≈ parabola in ln lr when >= 3 LRs bracket a minimum, else the best run's LR."""
    best = float(lr[np.argmin(loss)])
    u = np.unique(lr)
    if len(u) >= 3:
        x = np.log(lr)
        c2, c1, _ = np.polyfit(x, loss, 2)
        if c2 > 0:
            v = -c1 / (2 * c2)
            if x.min() < v < x.max():
                return float(math.exp(v)), "parabola vertex"
    edge = " (at the edge of the swept LRs: widen the sweep)" if best in (u.min(), u.max()) else ""
    return best, "best run" + edge


def fit_lr_law(rows: dict, of: str = "flops") -> LrLaw:
    """The LR law (and batch law when the batch varies) from `load_lr_sweep`'s columns."""
    if of not in ("flops", "params"):
        raise ValueError(f"--of {of!r}: the LR law is a power law of flops (compute) or params (N).")
    x = rows[of]
    gid = _groups(x)
    points = []
    for g in range(gid.max() + 1):
        m = gid == g
        if len(np.unique(rows["lr"][m])) < 2:
            continue
        lr_opt, how = _optimum_lr(rows["lr"][m], rows["loss"][m])
        i = np.flatnonzero(m)[np.argmin(rows["loss"][m])]
        b = rows["batch"][i]
        points.append({"x": float(np.exp(np.log(x[m]).mean())), "lr_opt": lr_opt, "how": how, "n_runs": int(m.sum()),
                       "batch_opt": None if not np.isfinite(b) else float(b)})
    if len(points) < 2:
        raise ValueError(f"an LR law needs at least 2 groups (by {of}) each swept over >= 2 learning rates; got "
                         f"{len(points)}. Sweep the LR at more {'budgets' if of == 'flops' else 'model sizes'}.")
    lx = np.log([p["x"] for p in points])
    k, c = np.polyfit(lx, np.log([p["lr_opt"] for p in points]), 1)
    law = LrLaw(of=of, lr_coef=float(math.exp(c)), lr_exponent=float(k), points=points, source=rows.get("source", ""))
    batches = [p["batch_opt"] for p in points]
    if all(b is not None for b in batches) and len(set(batches)) > 1:
        kb, cb = np.polyfit(lx, np.log(batches), 1)
        law.batch_coef, law.batch_exponent = float(math.exp(cb)), float(kb)
    return law
