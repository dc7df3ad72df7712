"""Scaling-law input tables: CSV loading, validation, compute grouping and synthetic sweeps.

Every fit in `fit.py` takes a `ScalingData`. It is built either from a CSV (`load_csv`) or from arrays
(`from_arrays`); both validate everything up front so that a bad table fails with a message that names
the row, the column and a fix, before any optimiser runs.
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field, replace

import numpy as np

from t5like import storage

# A sweep runner's table marks each run; only these count. Rows of other statuses (failed, running, ...)
# are skipped, so a NaN loss on a failed run is not an error.
OK_STATUSES = ("ok", "finished")
# The loss column to use when none is named: the first of these that the table has, per metric (--metric):
# nats per token, or bits per UTF-8 byte (the eval's tokenizer-independent loss, `eval_bpb`).
METRIC_COLUMNS = {"loss": ("loss", "final_eval_loss", "eval_loss"), "bpb": ("bpb", "final_eval_bpb", "eval_bpb")}
METRIC_UNITS = {"loss": "nats/token", "bpb": "bits/byte"}
LOSS_COLUMN_FALLBACKS = METRIC_COLUMNS["loss"]
# A per-row standard error of the loss (over eval sequences) sits in the column "<loss column>_stderr".
STDERR_SUFFIX = "_stderr"


@dataclass(frozen=True)
class ScalingData:
    """One row per training run (or checkpoint): model size, tokens, compute and loss.

    `flops` is 6·params·tokens when the table had no flops column (`flops_from_6nd`). `budget` is the
    nominal IsoFLOP budget when the table had one. `rows` holds each row's 1-based data-row number in the
    source, so that later messages can point at it; for a CSV (`rows_are_lines`) that is its line number.
    """

    params: np.ndarray
    tokens: np.ndarray
    flops: np.ndarray
    loss: np.ndarray
    budget: np.ndarray | None = None
    rows: np.ndarray | None = None
    loss_column: str = "loss"
    columns: dict[str, str] = field(default_factory=dict)
    flops_from_6nd: bool = False
    source: str = "<arrays>"
    n_skipped_status: int = 0
    rows_are_lines: bool = False
    where: tuple[str, ...] = ()        # the COLUMN=VALUE row filters the rows passed (fit --where)
    n_skipped_where: int = 0
    notes: tuple[str, ...] = ()        # what loading decided about the table, e.g. an empty budget column
    stderr: np.ndarray | None = None   # standard error of each row's loss, when the table has one
    metric: str = "loss"               # what `loss` measures: "loss" (nats/token) or "bpb" (bits/byte)

    def __len__(self) -> int:
        return len(self.loss)

    def subset(self, idx: np.ndarray) -> "ScalingData":
        """Rows `idx` (an index or boolean array; repeats allowed, as in a bootstrap resample)."""
        pick = lambda a: None if a is None else a[idx]
        return replace(self, params=self.params[idx], tokens=self.tokens[idx], flops=self.flops[idx],
                       loss=self.loss[idx], budget=pick(self.budget), rows=pick(self.rows), stderr=pick(self.stderr))

    def convention(self) -> dict:
        """The table's one compute convention: every fit takes C from `flops` (the table's own flops column
        when it has one, else 6·N·D). `flops_per_param_token` k is the geometric mean of flops/(N·D) over
        the runs: the parametric fit allocates a budget as C = k·N·D."""
        k = self.flops / (self.params * self.tokens)
        k_mean = float(np.exp(np.mean(np.log(k))))
        if self.flops_from_6nd:
            text = "C = 6·N·D (the table has no flops column)"
        else:
            text = (f"C = the table's '{self.columns.get('flops', 'flops')}' column "
                    f"(about {k_mean:.3g}·N·D; {k.min():.3g}–{k.max():.3g}·N·D across runs)")
        return {"text": text, "from_6nd": self.flops_from_6nd, "flops_per_param_token": k_mean,
                "flops_per_param_token_range": [float(k.min()), float(k.max())]}

    def meta(self) -> dict:
        """What went into a fit, for fit.json."""
        return {"source": self.source, "n_points": len(self), "loss_column": self.loss_column,
                "metric": self.metric, "units": METRIC_UNITS.get(self.metric, self.metric),
                "stderr_column": self.columns.get("stderr"),
                "columns": dict(self.columns), "flops_from_6nd": self.flops_from_6nd,
                "has_budget": self.budget is not None, "n_skipped_status": self.n_skipped_status,
                "where": list(self.where), "n_skipped_where": self.n_skipped_where,
                "flops_convention": self.convention(), "warnings": [*self.notes, *table_warnings(self)]}


def _check_values(name: str, values: np.ndarray, rows: np.ndarray, column: str | None = None) -> None:
    """NaN or non-positive entries are errors: scaling laws live in log space."""
    column = column or name
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        i = bad[0]
        raise ValueError(f"row {rows[i]}: column '{column}' is {values[i]} ({bad.size} row(s) with NaN/inf in "
                         f"'{column}'). Drop those rows, or give them a status other than ok/finished.")
    bad = np.flatnonzero(values <= 0)
    if bad.size:
        i = bad[0]
        raise ValueError(f"row {rows[i]}: column '{column}' = {values[i]:g} is not positive ({bad.size} row(s)); "
                         f"scaling fits work in log space and need {name} > 0. Fix or drop those rows.")


def from_arrays(params, tokens, loss, flops=None, budget=None, *, stderr=None, rows=None, loss_column: str = "loss",
                columns: dict[str, str] | None = None, source: str = "<arrays>",
                n_skipped_status: int = 0, metric: str = "loss") -> ScalingData:
    """Validate arrays and build a `ScalingData`. Missing `flops` means flops = 6·params·tokens. `stderr`:
    each loss's standard error (fits weight by it; bootstraps add noise of that size)."""
    arrays = {"params": params, "tokens": tokens, "loss": loss}
    if flops is not None:
        arrays["flops"] = flops
    if budget is not None:
        arrays["budget"] = budget
    if stderr is not None:
        arrays["stderr"] = stderr
    arrays = {k: np.asarray(v, dtype=np.float64).reshape(-1) for k, v in arrays.items()}
    n = len(arrays["loss"])
    for k, v in arrays.items():
        if len(v) != n:
            raise ValueError(f"column '{k}' has {len(v)} values but 'loss' has {n}; all columns need one value per run.")
    if n == 0:
        raise ValueError("no data rows: the table is empty (after dropping runs whose status is not ok/finished).")
    rows = np.arange(1, n + 1) if rows is None else np.asarray(rows)
    columns = dict(columns or {k: k for k in arrays})
    for k, v in arrays.items():
        _check_values(k, v, rows, columns.get(k, k))
    from_6nd = flops is None
    if from_6nd:
        arrays["flops"] = 6.0 * arrays["params"] * arrays["tokens"]
    return ScalingData(params=arrays["params"], tokens=arrays["tokens"], flops=arrays["flops"], loss=arrays["loss"],
                       budget=arrays.get("budget"), rows=rows, loss_column=loss_column, columns=columns,
                       flops_from_6nd=from_6nd, source=source, n_skipped_status=n_skipped_status,
                       stderr=arrays.get("stderr"), metric=metric)


def read_input(path: str, what: str) -> bytes:
    """The bytes of a file the user named (local or gs://), or an error that names it and says what is wrong."""
    try:
        data = storage.read_bytes(path)
    except FileNotFoundError:
        if storage.is_remote(path):
            bucket = "gs://" + str(path)[len("gs://"):].split("/", 1)[0]
            if not storage.exists(bucket):
                raise FileNotFoundError(f"{path}: bucket {bucket} does not exist (or this account cannot see it); "
                                        f"check the {what}'s path.") from None
        raise FileNotFoundError(f"{path}: no such file; check the {what}'s path.") from None
    except IsADirectoryError:
        data = b""
    if not data and storage.path(path).is_dir():  # on gs:// a "directory" reads as empty
        raise ValueError(f"{path} is a directory; pass the {what} file itself.")
    return data


def check_out_file(out: str, example: str) -> None:
    """--out names a file (local or gs://): refuse a directory or an unusable place before any work."""
    if storage.path(out).is_dir():
        raise ValueError(f"--out {out!r} is a directory; name the file to write, e.g. {storage.join(out, example)}.")
    storage.check_workdir(str(storage.path(out).parent), "--out's directory")


def parse_where(items) -> tuple[tuple[str, str], ...]:
    """`--where COLUMN=VALUE` filters as (column, value) pairs; a malformed one is an error naming it."""
    out = []
    for item in items or ():
        column, eq, value = str(item).partition("=")
        if not eq or not column.strip():
            raise ValueError(f"--where {item!r}: give COLUMN=VALUE, e.g. --where status=ok (rows whose COLUMN "
                             "equals VALUE; repeat --where to require several).")
        out.append((column.strip(), value.strip()))
    return tuple(out)


def _matches(cell: str, value: str) -> bool:
    """A cell equals a filter value as text, or as numbers (so budget=1e18 matches the runner's 1e+18)."""
    cell = (cell or "").strip()
    if cell == value:
        return True
    try:
        return float(cell) == float(value)
    except ValueError:
        return False


def load_csv(path: str, *, loss_column: str | None = None, params_column: str = "params",
             tokens_column: str = "tokens", flops_column: str = "flops", budget_column: str = "budget",
             status_column: str = "status", where=(), metric: str = "loss",
             stderr_column: str | None = None) -> ScalingData:
    """Read a sweep table (or any CSV with params, tokens, loss columns) and validate it.

    Optional columns: `flops` (else 6·N·D), `budget` (nominal IsoFLOP budget, used to group runs; a column
    empty in every row, as a grid or random-search sweep's table has it, counts as absent) and `status`
    (if present, only rows with status ok/finished are used). `where`: COLUMN=VALUE filters (strings or
    (column, value) pairs) that every row used must pass. `path` may be local or gs://.

    `metric` ("loss": nats/token, or "bpb": bits/byte) picks the loss column when none is named. The
    loss's standard error is read from `stderr_column`, by default "<loss column>_stderr" when present.
    """
    if metric not in METRIC_COLUMNS:
        raise ValueError(f"--metric {metric!r}: choose one of {', '.join(METRIC_COLUMNS)} (nats/token or bits/byte).")
    where = tuple(w if isinstance(w, tuple) else parse_where([w])[0] for w in where)
    try:
        text = read_input(path, "results table").decode("utf-8-sig")  # -sig: tolerate a spreadsheet's BOM
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}); save the table as a UTF-8 CSV.") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    header = [h.strip() for h in (reader.fieldnames or [])]
    reader.fieldnames = header
    records = list(reader)
    if not header:
        raise ValueError(f"{path}: empty file, expected a CSV header with at least params, tokens, loss columns.")
    have = ", ".join(header)

    def need(col: str, flag: str) -> None:
        if col not in header:
            raise ValueError(f"{path}: missing column '{col}' (columns are: {have}). Add it, or name the column "
                             f"to use with {flag}.")

    if loss_column is None:
        wanted = METRIC_COLUMNS[metric]
        loss_column = next((c for c in wanted if c in header), None)
        if loss_column is None:
            hint = (" Eval rows carry eval_bpb where the objective defines it; add it to the table, or fit "
                    "--metric loss." if metric == "bpb" else "")
            raise ValueError(f"{path}: --metric {metric}: missing column '{wanted[0]}' (also looked for "
                             f"{', '.join(wanted[1:])}; columns are: {have}). Name the column with --loss-column."
                             + hint)
    need(loss_column, "--loss-column")
    need(params_column, "--params-column")
    need(tokens_column, "--tokens-column")

    # Line numbers as a spreadsheet shows them: the header is line 1.
    lines = np.arange(2, len(records) + 2)
    n_where = 0
    for column, value in where:
        if column not in header:
            raise ValueError(f"--where {column}={value}: {path} has no column '{column}' (columns are: {have}).")
        keep = [_matches(r.get(column), value) for r in records]
        if not any(keep):
            seen = sorted({(r.get(column) or "").strip() for r in records})
            shown = ", ".join(repr(v) for v in seen[:10]) + (f" (and {len(seen) - 10} more)" if len(seen) > 10 else "")
            raise ValueError(f"--where {column}={value}: no row of {path} left (after the filters before it) has "
                             f"'{column}' = {value!r}; its values there are: {shown or 'none'}. Fix the value or "
                             "drop the filter.")
        n_where += len(records) - sum(keep)
        records = [r for r, k in zip(records, keep) if k]
        lines = lines[np.asarray(keep, bool)]
    n_skipped = 0
    if status_column in header:
        keep = [str(r[status_column]).strip().lower() in OK_STATUSES for r in records]
        n_skipped = len(records) - sum(keep)
        if n_skipped == len(records):
            seen = sorted({str(r[status_column]).strip() for r in records})
            raise ValueError(f"{path}: no rows with status ok/finished in column '{status_column}' "
                             f"(statuses seen: {seen}); nothing to fit.")
        records = [r for r, k in zip(records, keep) if k]
        lines = lines[np.asarray(keep, bool)]

    def column(col: str) -> np.ndarray:
        out = np.empty(len(records))
        for i, r in enumerate(records):
            text = (r.get(col) or "").strip()
            if text == "":
                out[i] = np.nan  # reported as NaN by from_arrays, naming the row
                continue
            try:
                out[i] = float(text)
            except ValueError:
                raise ValueError(f"{path}: line {lines[i]}: column '{col}' = {text!r} is not a number.") from None
        return out

    notes = []
    cols = {"params": params_column, "tokens": tokens_column, "loss": loss_column}
    if stderr_column is not None:
        need(stderr_column, "--stderr-column")
        cols["stderr"] = stderr_column
    elif loss_column + STDERR_SUFFIX in header:
        cols["stderr"] = loss_column + STDERR_SUFFIX
        notes.append(f"fits weight each row by 1/stderr² from column '{cols['stderr']}'.")
    if flops_column in header:
        cols["flops"] = flops_column
    if budget_column in header:
        if any((r.get(budget_column) or "").strip() for r in records):
            cols["budget"] = budget_column
        else:  # the runner leaves it empty for grid and random-search trials: they have no IsoFLOP budget
            notes.append(f"column '{budget_column}' is empty in every row used (a grid or random-search sweep's "
                         "table), so runs are grouped into budgets by their flops, as without the column.")
    values = {k: column(c) for k, c in cols.items()}
    empty = [i for i, r in enumerate(records) if "budget" in cols and not (r.get(budget_column) or "").strip()]
    if empty:  # some rows of an IsoFLOP sweep, some of a grid or random search: two tables in one
        raise ValueError(f"{path}: column '{budget_column}' is empty in {len(empty)} row(s) (lines "
                         f"{_lines(lines, empty)}: trials without an IsoFLOP budget, as a grid or random search "
                         f"writes them) but set in {len(lines) - len(empty)}; fit them apart with --where, e.g. "
                         f"--where {budget_column}= for the rows without a budget, or drop those rows.")
    try:
        data = from_arrays(**values, rows=lines, loss_column=loss_column, columns=cols, source=str(path),
                           n_skipped_status=n_skipped, metric=metric)
    except ValueError as e:
        # from_arrays says "row <n>"; in a file that is the line number.
        raise ValueError(f"{path}: {str(e).replace('row ', 'line ', 1)}") from None
    return replace(data, rows_are_lines=True, where=tuple(f"{c}={v}" for c, v in where), n_skipped_where=n_where,
                   notes=tuple(notes))


# ------------------------------------------------------------------------------------------------
# Grouping runs into compute budgets


GROUP_RTOL = 0.1  # runs whose flops agree within 10% share a budget (about 2 significant figures)


def compute_groups(data: ScalingData, bins_per_decade: float | None = None,
                   rtol: float = GROUP_RTOL) -> tuple[np.ndarray, np.ndarray]:
    """Assign each run to a compute budget; returns (group id per row, budget C per group).

    With a `budget` column its values are the groups and the budgets. Otherwise runs are grouped by
    flops: with `bins_per_decade`, into fixed log-spaced bins; by default, sorted by flops and cut
    wherever a run's flops exceed its group's smallest by more than `rtol` (so 0.98e18 and 1.02e18
    land together, which rounding to 2 significant figures would split at 1.0e18). A group's C is then
    the geometric mean of its runs' flops.
    """
    if data.budget is not None:
        budgets, gid = np.unique(data.budget, return_inverse=True)
        return gid, budgets.astype(np.float64)
    if bins_per_decade:
        _, gid = np.unique(np.round(np.log10(data.flops) * bins_per_decade), return_inverse=True)
    else:
        order = np.argsort(data.flops, kind="stable")
        gid_sorted = np.empty(len(order), np.int64)
        g, first = 0, data.flops[order[0]]
        for k, i in enumerate(order):
            if data.flops[i] > first * (1 + rtol):
                g, first = g + 1, data.flops[i]
            gid_sorted[k] = g
        gid = np.empty_like(gid_sorted)
        gid[order] = gid_sorted
    budgets = np.exp(np.bincount(gid, np.log(data.flops)) / np.bincount(gid))
    return gid, budgets


def near_optimum(data: ScalingData, frac: float, bins_per_decade: float | None = None) -> ScalingData:
    """The runs whose loss is within `frac` (relative) of their budget's best. Far from the optimum an IsoFLOP
    curve holds runs a parametric law does not describe (tiny models trained on many tokens, huge ones on
    few, losses twice the optimum's), and least squares lets them pull the fit away from the frontier."""
    if not frac > 0:
        raise ValueError(f"--near-optimum {frac}: give the relative loss window, e.g. 0.03 (runs within 3% of "
                         "their budget's best loss).")
    gid, _ = compute_groups(data, bins_per_decade)
    best = np.full(gid.max() + 1, np.inf)
    np.minimum.at(best, gid, data.loss)
    return data.subset(np.flatnonzero(data.loss <= best[gid] * (1 + frac)))


# ------------------------------------------------------------------------------------------------
# Degenerate tables: what a fit cannot see for itself

# A flops column more than this factor away from 6·N·D is in other units or counts something else.
CONVENTION_FACTOR = 10.0
# A budget column this far from its runs' flops was computed under another convention than the flops.
BUDGET_FACTOR = 1.5


def _lines(rows: np.ndarray, idx) -> str:
    idx = list(idx)
    shown = ", ".join(str(rows[i]) for i in idx[:5])
    return shown + (f" (and {len(idx) - 5} more)" if len(idx) > 5 else "")


def table_warnings(data: ScalingData) -> list[str]:
    """What is wrong with a table although each value is valid: duplicated runs, a flops column in
    other units, one budget or one model size. Fits that cannot be identified on such a table refuse
    (see fit.py); these warnings go into fit.json's meta and the CLI's output."""
    out = []
    rows = data.rows if data.rows is not None else np.arange(1, len(data) + 1)
    where = "lines" if data.rows_are_lines else "rows"
    budget = data.budget if data.budget is not None else np.zeros(len(data))  # not NaN: NaN != NaN in unique
    key = np.stack([data.params, data.tokens, data.flops, data.loss, budget], 1)
    _, inverse, counts = np.unique(key, axis=0, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    dup_groups = [np.flatnonzero(inverse == g) for g in np.flatnonzero(counts > 1)]
    if dup_groups:
        listed = "; ".join(f"{where} {_lines(rows, g)}" for g in dup_groups[:5])
        out.append(f"{sum(len(g) - 1 for g in dup_groups)} exactly duplicated row(s) ({listed}): the same run "
                   "entered twice counts twice in every fit. Drop the copies, or rerun the runs if they are "
                   "meant to be repeats (a real repeat does not reproduce the loss to the last digit).")
    if not data.flops_from_6nd:
        k = data.convention()["flops_per_param_token"]
        if not 6.0 / CONVENTION_FACTOR <= k <= 6.0 * CONVENTION_FACTOR:
            col = data.columns.get("flops", "flops")
            out.append(f"column '{col}' is on average {k / 6.0:.3g}× 6·N·D (flops/(N·D) = {k:.3g}, where a "
                       "transformer's training FLOPs are about 6·N·D): it disagrees with the FLOPs convention by "
                       "orders of magnitude. Is it in other units (PFLOP/s-days, per step, per token)? Convert "
                       "it to total training FLOPs, or drop the column to use 6·N·D.")
    if data.budget is not None:
        ratio = data.flops / data.budget
        bad = np.flatnonzero((ratio > BUDGET_FACTOR) | (ratio < 1 / BUDGET_FACTOR))
        if bad.size:
            out.append(f"{bad.size} row(s) have flops far from their budget ({where} {_lines(rows, bad)}; "
                       f"flops/budget = {ratio[bad[0]]:.3g} at the first): the budget column and the flops follow "
                       "different conventions. Budgets only group the runs; every fit uses the flops as C.")
    _, budgets = compute_groups(data)
    if len(budgets) < 2:
        out.append(f"all {len(data)} runs are at one compute budget (C ≈ {budgets[0]:.3g}): no fit can say how "
                   "loss or the optimal size changes with compute. Add runs at more budgets.")
    sizes = np.unique(data.params)
    if len(sizes) < 2:
        out.append(f"all {len(data)} runs have one model size (N = {sizes[0]:.4g}): there is no compute-optimal "
                   "size to find, only that model's learning curve. Add runs of other sizes.")
    return out


# ------------------------------------------------------------------------------------------------
# A known law, for synthetic sweeps and for evaluating parametric fits


@dataclass(frozen=True)
class ChinchillaLaw:
    """L(N, D) = E + A/N^alpha + B/D^beta (Hoffmann et al. 2022). Defaults are their published fit."""

    E: float = 1.69
    A: float = 406.4
    B: float = 410.7
    alpha: float = 0.34
    beta: float = 0.28

    def loss(self, N, D):
        return self.E + self.A / np.power(N, self.alpha) + self.B / np.power(D, self.beta)

    @property
    def a(self) -> float:  # N_opt ∝ C^a
        return self.beta / (self.alpha + self.beta)

    @property
    def b(self) -> float:  # D_opt ∝ C^b
        return self.alpha / (self.alpha + self.beta)

    @property
    def G(self) -> float:
        return (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / (self.alpha + self.beta))

    @property
    def frontier_alpha(self) -> float:
        """Exponent of the compute frontier: L*(C) - E ∝ C^-(alpha·beta/(alpha+beta))."""
        return self.alpha * self.beta / (self.alpha + self.beta)

    def n_opt(self, C):
        """Loss-minimising N at compute C, with C = 6·N·D."""
        return self.G * np.power(np.asarray(C) / 6.0, self.a)

    def d_opt(self, C):
        return np.power(np.asarray(C) / 6.0, self.b) / self.G


def synthetic_isoflop(law: ChinchillaLaw = ChinchillaLaw(), budgets=None, sizes_per_budget: int = 9,
                      span_decades: float = 1.5, noise: float = 0.01, seed: int = 0,
                      off_center_decades: float = 0.0) -> ScalingData:
    """An IsoFLOP sweep drawn from `law`: for each budget C, `sizes_per_budget` model sizes log-spaced over
    `span_decades` around the true N_opt (shifted by up to ±off_center_decades at random, as real sweeps
    are rarely centred), D = C/(6N), and loss × exp(noise·ε), ε ~ N(0, 1)."""
    rng = np.random.default_rng(seed)
    budgets = np.logspace(18, 22, 9) if budgets is None else np.asarray(budgets, dtype=np.float64)
    N, D, C = [], [], []
    for c in budgets:
        center = law.n_opt(c) * 10.0 ** rng.uniform(-off_center_decades, off_center_decades)
        n = center * np.logspace(-span_decades / 2, span_decades / 2, sizes_per_budget)
        N.append(n), D.append(c / (6.0 * n)), C.append(np.full(sizes_per_budget, c))
    N, D, C = map(np.concatenate, (N, D, C))
    L = law.loss(N, D) * np.exp(noise * rng.standard_normal(len(N)))
    return from_arrays(N, D, L, flops=C, budget=C, source=f"synthetic(seed={seed})")

