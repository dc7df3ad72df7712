"""Sweep design: IsoFLOP grids for compute-optimal scaling, plus plain grid and random search.

Every trial's id is a readable ASCII prefix plus a hash of its overrides and of the whole config it runs
(`config_trial_id`), so `grid(space, config=config())` and `random_search(..., config=config())` need the
experiment's base config as `plan_isoflop(config(), design())` does: editing config() makes new trials.

    python -m t5like.scaling.design --experiment experiments.scaling_tiny --out plan.csv

An IsoFLOP design trains, at each compute budget C, models of several sizes N, each for exactly the
tokens that C buys it (Hoffmann et al. 2022, approach 2). The rules, all in `IsoFlopDesign`:

- Sizes. The centre of each budget is the Chinchilla guess N_opt = sqrt(C / (6·20)) (D = 20·N, C = 6·N·D);
  the targets are `sizes_per_budget` values log-spaced over `span` × N_opt (default 1/4 … 4).
  N is the total parameter count (Chinchilla's convention; `size_count="non_embedding"` for Kaplan's).
- Shapes. head_dim is fixed; d_model is a multiple of head_dim (so heads = d_model / head_dim is whole
  and every tensor shards on head boundaries); d_model / num_layers (the aspect ratio) stays within
  `aspect_range`; d_ff = ff_ratio · d_model (4, or 8/3 for gated MLPs, so the MLP costs the same)
  rounded up to a multiple of head_dim. For each target N we take the shapes whose N is within
  `size_tolerance` of it and keep the one whose aspect ratio is nearest `aspect_ratio` (if none is that
  close, simply the nearest N, if within `max_size_miss` (1.5×) of the target). Grouped-query attention keeps the base model's query heads per kv head.
- Tokens. tokens = C / (the model's own training FLOPs per token, `accounting.training_flops`, causal
  attention halved), so each trial's FLOPs by our formula are C to within rounding of the step count:
  steps = round(tokens / (batch · seq_len)), and `min_steps` >= 1 / (2·flops_tolerance) bounds that
  rounding. The 6N convention is reported alongside: flops_6n = 6·N_non_embedding·tokens and
  tokens_6n = C / (6·N_non_embedding).
- Batch. The base config's batch size, doubled while steps > max_steps and halved (down to
  `batch_multiple`) while steps < min_steps. Eval batches are scaled so every trial evaluates on the
  same number of rows (a fair comparison of eval losses).
- Learning rate. lr = base_lr · (base_d_model / d_model) ^ lr_exponent (default 0.5: lr ∝ 1/sqrt(d_model),
  a guessed middle ground), or, when the base model is µP (model.parametrization=mup|completep), base_lr at
  every size: µP carries it across width itself (docs/mup.md; each trial's base shape is the base model's
  d_model in this design's shapes). Or, with `lr_law` (a file from `python -m t5like.scaling lr-law`),
  lr = the fitted law at the trial's budget C (or its N). `Plan.lr_rule` and each trial's `lr_rule` say which. With a linear warmup over
  `warmup_fraction` of the steps; the base schedule (cosine) then decays to the end of each run, as
  Chinchilla found matters.

- Cooldown forks (`cooldown_forks=True`; Hägele et al. 2024). Each size picked at any budget trains
  once, as a stable run at constant lr. Each budget becomes a wsd run whose cooldown is its last
  `cooldown_fraction` of steps, forked from the stable run where that cooldown starts (Trial.parent,
  Trial.fork_step; t5like/fork.py). A size keeps one batch and warmup at all its budgets: see
  `_fork_trials`. The stable run has no budget: it is no IsoFLOP point.
- Seeds. `seeds=(1, 2)` repeats every trial with each seed (Trial.seed; ids get -s1, -s2), to measure
  seed noise beside the eval's standard error over sequences.

A target that cannot be met (below the smallest shape, above the largest, too few steps) is skipped with
the reason in `Plan.skipped`; a budget left with fewer than `min_sizes_per_budget` distinct sizes is a
ValueError naming the budget and each reason, raised before anything trains.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import importlib
import io
import itertools
import json
import math
import sys
import unicodedata
from typing import Optional, Sequence

import numpy as np

from t5like import storage
from t5like.accounting import param_counts, training_flops
from t5like.config import Config, ModelConfig, apply_overrides, to_dict, wsd_decay_steps
from t5like.scaling.data import check_out_file

GATED = ("gated_gelu", "swiglu")


# Trials ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Trial:
    """One training run of a sweep: `python -m EXPERIMENT workdir=DIR/trials/ID *overrides`.

    The planned numbers are filled in by the IsoFLOP design and left None by grid and random search.
    """
    id: str
    overrides: tuple[str, ...]
    budget: Optional[float] = None            # the IsoFLOP budget C this trial belongs to
    params: Optional[int] = None
    non_embedding_params: Optional[int] = None
    tokens: Optional[int] = None
    steps: Optional[int] = None
    batch_size: Optional[int] = None
    flops: Optional[float] = None             # by the model's own formula: steps · batch · FLOPs per sequence
    flops_6n: Optional[float] = None          # 6 · N_non_embedding · tokens
    tokens_6n: Optional[float] = None         # the tokens the 6N convention would give for the budget
    lr_rule: Optional[str] = None             # how this trial's learning rate was set
    seed: Optional[int] = None                # the run's seed (design.seeds repeats trials with others)
    # A cooldown fork: the id of the stable run it starts from, and the step of it. The runner starts the
    # fork once the parent has saved that step, adding checkpoint.fork_from=DIR/trials/PARENT and
    # checkpoint.fork_step=STEP to its overrides (t5like/fork.py).
    parent: Optional[str] = None
    fork_step: Optional[int] = None


def trial_id(prefix: str, overrides: Sequence[str], salt: str = "") -> str:
    """A readable prefix plus a short hash of the overrides (and `salt`, e.g. the base config): a changed
    trial gets a new id and workdir, so a rerun never mistakes an old result (or an incompatible
    checkpoint) for the new trial's."""
    digest = hashlib.sha1(json.dumps([list(overrides), salt]).encode()).hexdigest()[:6]
    return f"{prefix}-{digest}" if prefix else digest


def config_trial_id(prefix: str, base: Config, overrides: Sequence[str], where: str = "",
                    parent: str = "") -> tuple[str, Config]:
    """The id of the trial that runs `base` with `overrides`, and that config. Every sweep (IsoFLOP, grid,
    random search) names its trials here: the id hashes the whole resolved config (less workdir), so
    editing the experiment's config() makes new trials rather than reusing results of the old config.
    A cooldown fork's id also hashes its `parent`'s id: a new parent makes new forks."""
    try:
        cfg = apply_overrides(base, list(overrides)).validate()
    except ValueError as e:
        if not where:
            raise
        raise ValueError(f"{where}: the trial {list(overrides)} is not a valid config: {e}") from None
    salt = json.dumps(to_dict(dataclasses.replace(cfg, workdir="")), sort_keys=True, default=str)
    return trial_id(prefix, overrides, salt + (f"|parent={parent}" if parent else "")), cfg


def _value(v) -> str:
    """A grid or random-search value as an override's text: a list or tuple comma-separated, as
    apply_overrides parses tuple fields (str() would give "['a.txt']", one path with brackets in it)."""
    return ",".join(str(x) for x in v) if isinstance(v, (list, tuple)) else str(v)


def _slug(overrides: Sequence[str], limit: int = 48) -> str:
    """A readable, deterministic ASCII id prefix: accents dropped (données -> donnees), any other
    character outside [A-Za-z0-9._-] made '-', so the id is a safe directory name on every filesystem."""
    parts = []
    for item in overrides:
        key, value = item.split("=", 1)
        parts.append(f"{key.rsplit('.', 1)[-1]}{value}")
    text = "".join(c for c in unicodedata.normalize("NFKD", "_".join(parts)) if not unicodedata.combining(c))
    text = "".join(c if c.isascii() and (c.isalnum() or c in "._-") else "-" for c in text)
    return text[:limit].lstrip("._-")


def _check_config(config, where: str) -> None:
    if not isinstance(config, Config):
        raise ValueError(f"{where}: pass config=config(), the experiment's base Config (got {config!r}): the trial "
                         "ids hash the config each trial runs, so editing config() makes new trials instead of "
                         "reusing the results of the old one.")


def _check_keys(space: dict, where: str) -> None:
    if not space:
        raise ValueError(f"{where}: the search space is empty; give at least one key, e.g. "
                         "{'optim.learning_rate': [1e-3, 3e-3]}.")
    for key in space:
        if not isinstance(key, str) or "=" in key or not key:
            raise ValueError(f"{where}: key {key!r} must be a dotted config key such as 'optim.learning_rate'.")


def grid(space: dict[str, Sequence], base: Sequence[str] = (), *, config: Optional[Config] = None) -> list[Trial]:
    """Every combination (itertools.product, in key order) of the given values, each run on `config` (the
    experiment's base Config, required: the ids hash it); `base` overrides go first."""
    _check_config(config, "grid")
    _check_keys(space, "grid")
    for key, values in space.items():
        if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__") or not len(values):
            raise ValueError(f"grid: {key} must be a non-empty list of values, got {values!r}.")
    trials = []
    for combo in itertools.product(*space.values()):
        varied = [f"{k}={_value(v)}" for k, v in zip(space, combo)]
        overrides = (*base, *varied)
        trials.append(Trial(config_trial_id(_slug(varied), config, overrides, "grid")[0], tuple(overrides)))
    return trials


@dataclasses.dataclass(frozen=True)
class Uniform:
    """A random-search range: uniform in [low, high], or log-uniform with log=True; integer rounds."""
    low: float
    high: float
    log: bool = False
    integer: bool = False

    def sample(self, rng: np.random.Generator):
        if self.log:
            value = math.exp(rng.uniform(math.log(self.low), math.log(self.high)))
        else:
            value = rng.uniform(self.low, self.high)
        return int(round(value)) if self.integer else float(f"{value:.4g}")


@dataclasses.dataclass(frozen=True)
class Choice:
    values: tuple

    def sample(self, rng: np.random.Generator):
        return self.values[int(rng.integers(len(self.values)))]


def random_search(space: dict[str, "Uniform | Choice"], n: int, seed: int = 0,
                  base: Sequence[str] = (), *, config: Optional[Config] = None) -> list[Trial]:
    """`n` trials drawn independently from `space` with numpy's generator seeded by `seed` (so the same
    call gives the same trials, which is what lets a rerun skip the finished ones), each run on `config`
    (the experiment's base Config, required: the ids hash it)."""
    _check_config(config, "random_search")
    _check_keys(space, "random_search")
    if not isinstance(n, int) or n <= 0:
        raise ValueError(f"random_search: n={n!r} must be a positive integer (the number of trials).")
    for key, dist in space.items():
        if not isinstance(dist, (Uniform, Choice)):
            raise ValueError(f"random_search: {key} must be Uniform(low, high) or Choice(values), got {dist!r}.")
        if isinstance(dist, Uniform) and not (dist.low < dist.high and (dist.low > 0 or not dist.log)):
            raise ValueError(f"random_search: {key}={dist} needs low < high (and low > 0 for log=True).")
        if isinstance(dist, Choice) and not dist.values:
            raise ValueError(f"random_search: {key}=Choice(()) is empty; give at least one value.")
    rng = np.random.default_rng(seed)
    trials, seen = [], set()
    for _ in range(n):
        varied = [f"{k}={_value(d.sample(rng))}" for k, d in space.items()]
        overrides = (*base, *varied)
        tid = config_trial_id(_slug(varied), config, overrides, "random_search")[0]
        if tid not in seen:  # a repeated draw (small Choice spaces) would be the same run twice
            seen.add(tid)
            trials.append(Trial(tid, tuple(overrides)))
    return trials


# The IsoFLOP design -----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class IsoFlopDesign:
    """The rules of an IsoFLOP sweep (see the module docstring for what each one means)."""
    budgets: tuple[float, ...]                # compute budgets C in FLOPs
    sizes_per_budget: int = 5
    span: tuple[float, float] = (0.25, 4.0)   # N range as multiples of the Chinchilla N_opt guess
    tokens_per_param: float = 20.0            # the guess: D = 20·N
    size_count: str = "total"                 # which N: "total" params (Chinchilla) or "non_embedding" (Kaplan)
    head_dim: int = 64
    aspect_ratio: float = 64.0                # preferred d_model / num_layers
    aspect_range: tuple[float, float] = (32.0, 128.0)
    min_layers: int = 1
    max_layers: int = 96
    ff_ratio: Optional[float] = None          # None: 4, or 8/3 for gated activations
    size_tolerance: float = 0.15              # shapes this close (relative N) to a target compete on aspect ratio
    max_size_miss: float = 1.5                # a target whose nearest shape is further off than this is skipped
    min_sizes_per_budget: int = 3             # a parabola through the IsoFLOP curve needs 3
    min_steps: int = 100
    max_steps: int = 200_000
    batch_multiple: int = 8                   # batch sizes stay multiples of this (data-parallel devices)
    lr_exponent: float = 0.5                  # lr = base_lr · (base_d_model / d_model) ^ lr_exponent
    lr_law: Optional[str] = None              # lr_law.json (`t5like.scaling lr-law`): lr from the fitted law instead
    warmup_fraction: float = 0.05
    checkpoints_per_trial: int = 4            # so an interrupted trial loses at most a quarter of its work
    flops_tolerance: float = 0.01
    cooldown_forks: bool = False              # one stable run per size; each budget a wsd cooldown forked from it
    cooldown_fraction: float = 0.2            # a fork's cooldown: this fraction of its steps (Hägele et al. 2024)
    seeds: tuple[int, ...] = ()               # repeat every trial with each of these seeds too (seed noise)

    def validate(self) -> "IsoFlopDesign":
        if not self.budgets:
            raise ValueError("design.budgets=() is empty; give compute budgets in FLOPs, e.g. budgets=(1e18, 1e19).")
        for c in self.budgets:
            if not (isinstance(c, (int, float)) and math.isfinite(c) and c > 0):
                raise ValueError(f"design.budgets has {c!r}; every budget must be a positive number of FLOPs.")
        if len(set(self.budgets)) != len(self.budgets):
            raise ValueError(f"design.budgets={self.budgets} repeats a budget; list each once.")
        for name in ("sizes_per_budget", "head_dim", "min_layers", "max_layers", "min_sizes_per_budget",
                     "min_steps", "max_steps", "batch_multiple", "checkpoints_per_trial"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"design.{name}={value!r} must be a positive integer.")
        lo, hi = self.span
        if not 0 < lo <= 1 <= hi or (lo == hi and self.sizes_per_budget > 1):
            raise ValueError(f"design.span={self.span} must be (low, high) with 0 < low <= 1 <= high and low < high "
                             "when sizes_per_budget > 1; e.g. span=(0.25, 4.0).")
        if self.min_sizes_per_budget > self.sizes_per_budget:
            raise ValueError(f"design.min_sizes_per_budget={self.min_sizes_per_budget} exceeds "
                             f"design.sizes_per_budget={self.sizes_per_budget}; lower it or ask for more sizes.")
        a_lo, a_hi = self.aspect_range
        if not 0 < a_lo <= self.aspect_ratio <= a_hi:
            raise ValueError(f"design.aspect_ratio={self.aspect_ratio} must lie in design.aspect_range="
                             f"{self.aspect_range} (low > 0).")
        if self.min_layers > self.max_layers:
            raise ValueError(f"design.min_layers={self.min_layers} > design.max_layers={self.max_layers}.")
        if self.min_steps > self.max_steps:
            raise ValueError(f"design.min_steps={self.min_steps} > design.max_steps={self.max_steps}.")
        if self.size_count not in ("total", "non_embedding"):
            raise ValueError(f"design.size_count={self.size_count!r} must be 'total' or 'non_embedding'.")
        if not 0 < self.flops_tolerance < 0.5:
            raise ValueError(f"design.flops_tolerance={self.flops_tolerance} must be in (0, 0.5), e.g. 0.01.")
        need = math.ceil(0.5 / self.flops_tolerance)
        if self.min_steps < need:
            raise ValueError(f"design.min_steps={self.min_steps} is too few: rounding the step count could miss a "
                             f"budget by 1/(2·steps) > flops_tolerance={self.flops_tolerance}; set min_steps >= {need}.")
        if not 0 <= self.warmup_fraction < 1:
            raise ValueError(f"design.warmup_fraction={self.warmup_fraction} must be in [0, 1).")
        if self.ff_ratio is not None and self.ff_ratio <= 0:
            raise ValueError(f"design.ff_ratio={self.ff_ratio} must be > 0 (or None for 4, 8/3 if gated).")
        _lr_law(self)  # an unreadable lr law is an error here, before any trial is planned
        if self.tokens_per_param <= 0 or self.size_tolerance < 0 or self.max_size_miss < 1:
            raise ValueError(f"design.tokens_per_param={self.tokens_per_param} must be > 0, design.size_tolerance="
                             f"{self.size_tolerance} >= 0 and design.max_size_miss={self.max_size_miss} >= 1.")
        if not 0 < self.cooldown_fraction < 1 - self.warmup_fraction:
            raise ValueError(f"design.cooldown_fraction={self.cooldown_fraction} must be in (0, 1 - warmup_fraction="
                             f"{1 - self.warmup_fraction:g}): the cooldown is the end of each fork's steps, after its "
                             "warmup; Hägele et al. 2024 use 0.2.")
        for seed in self.seeds:
            if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
                raise ValueError(f"design.seeds={self.seeds!r} has {seed!r}; give non-negative integer seeds, e.g. "
                                 "seeds=(1, 2).")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"design.seeds={self.seeds} repeats a seed; list each once.")
        return self


@dataclasses.dataclass(frozen=True)
class Shape:
    num_layers: int
    d_model: int
    num_heads: int
    num_kv_heads: Optional[int]
    d_ff: int
    params: int
    non_embedding_params: int

    @property
    def aspect(self) -> float:
        return self.d_model / self.num_layers


@dataclasses.dataclass(frozen=True)
class Plan:
    """The trials of an IsoFLOP design, and the targets it had to skip (with why)."""
    design: IsoFlopDesign
    trials: tuple[Trial, ...]
    skipped: tuple[str, ...] = ()
    lr_rule: str = ""                         # how each trial's learning rate was set (see the module docstring)

    COLUMNS = ("trial_id", "budget", "params", "non_embedding_params", "tokens", "steps", "batch_size", "flops",
               "flops_error", "flops_6n", "tokens_6n", "seed", "parent", "fork_step", "overrides")

    def rows(self) -> list[dict]:
        out = []
        for t in self.trials:
            row = {"trial_id": t.id, **{c: getattr(t, c) for c in self.COLUMNS[1:-1] if c != "flops_error"}}
            row["flops_error"] = None if t.budget is None else t.flops / t.budget - 1.0  # a stable run has none
            row["overrides"] = json.dumps(list(t.overrides))
            out.append(row)
        return out

    def write(self, path: str) -> None:
        """A .json plan (with the design and skipped targets) or a .csv table, one row per trial."""
        if path.endswith(".json"):
            text = json.dumps({"design": dataclasses.asdict(self.design), "lr_rule": self.lr_rule,
                               "skipped": list(self.skipped),
                               "trials": [{**dataclasses.asdict(t), "overrides": list(t.overrides)}
                                          for t in self.trials]}, indent=1)
        elif path.endswith(".csv"):
            buf = io.StringIO()
            writer = csv.DictWriter(buf, fieldnames=self.COLUMNS, lineterminator="\n")
            writer.writeheader()
            writer.writerows(self.rows())
            text = buf.getvalue()
        else:
            raise ValueError(f"--out {path!r}: the plan is written as .csv or .json; name the file accordingly.")
        storage.write_atomic(path, text)

    def table(self) -> str:
        forks = any(t.parent for t in self.trials)
        lines = [f"{'trial':<34} {'budget':>8} {'params':>9} {'non-emb':>9} {'L':>3} {'d':>5} {'tokens':>9} "
                 f"{'steps':>6} {'batch':>5} {'lr':>8} {'flops/C-1':>9}" + ("  fork of (at step)" if forks else "")]
        for t in self.trials:
            o = dict(item.split("=", 1) for item in t.overrides)
            budget, error = ("stable", "") if t.budget is None else (f"{t.budget:.2e}", f"{t.flops / t.budget - 1:+.2%}")
            lines.append(f"{t.id:<34} {budget:>8} {t.params:>9,} {t.non_embedding_params:>9,} "
                         f"{o['model.num_layers']:>3} {o['model.d_model']:>5} {t.tokens:>9.3g} {t.steps:>6} "
                         f"{t.batch_size:>5} {o['optim.learning_rate']:>8} {error:>9}"
                         + (f"  {t.parent} ({t.fork_step})" if t.parent else ""))
        return "\n".join(lines)


def _ff_ratio(model: ModelConfig, design: IsoFlopDesign) -> float:
    if design.ff_ratio is not None:
        return design.ff_ratio
    return 8.0 / 3.0 if model.activation in GATED else 4.0


def _kv_heads(base: ModelConfig, heads: int) -> Optional[int]:
    """Keep the base's query heads per kv head (MQA stays MQA); None (MHA) stays None."""
    if base.num_kv_heads is None:
        return None
    if base.kv_heads == 1:
        return 1
    group = max(1, base.num_heads // base.kv_heads)
    kv = max(1, heads // group)
    while heads % kv:
        kv -= 1
    return kv


def _shape_model(base: ModelConfig, design: IsoFlopDesign, layers: int, d_model: int) -> ModelConfig:
    heads = d_model // design.head_dim
    d_ff = design.head_dim * math.ceil(_ff_ratio(base, design) * d_model / design.head_dim)
    kw = dict(d_model=d_model, num_layers=layers, num_heads=heads, num_kv_heads=_kv_heads(base, heads), d_ff=d_ff,
              head_dim=design.head_dim if base.head_dim is not None else None)
    if base.num_decoder_layers is not None:
        kw["num_decoder_layers"] = layers
    return dataclasses.replace(base, **kw)


def candidate_shapes(base: ModelConfig, design: IsoFlopDesign) -> list[Shape]:
    """Every shape the rule allows: d_model a multiple of head_dim, aspect ratio within aspect_range."""
    shapes = []
    a_lo, a_hi = design.aspect_range
    for layers in range(design.min_layers, design.max_layers + 1):
        d_lo = max(1, math.ceil(a_lo * layers / design.head_dim))
        d_hi = math.floor(a_hi * layers / design.head_dim)
        for k in range(d_lo, d_hi + 1):
            m = _shape_model(base, design, layers, k * design.head_dim)
            counts = param_counts(m)
            shapes.append(Shape(layers, m.d_model, m.num_heads, m.num_kv_heads, m.d_ff, counts["total"],
                                counts["non_embedding"]))
    if not shapes:
        raise ValueError(f"design.aspect_range={design.aspect_range} with head_dim={design.head_dim} and "
                         f"{design.min_layers}..{design.max_layers} layers allows no shape; widen aspect_range.")
    return shapes


def _size(shape: Shape, design: IsoFlopDesign) -> int:
    return shape.params if design.size_count == "total" else shape.non_embedding_params


def nearest_shape(shapes: list[Shape], target: float, design: IsoFlopDesign) -> Shape:
    """Among shapes within size_tolerance of `target` params, the one nearest the preferred aspect ratio;
    if none is that close, the shape with the nearest param count (in log space)."""
    err = [abs(math.log(_size(s, design) / target)) for s in shapes]
    close = [i for i, e in enumerate(err) if e <= math.log1p(design.size_tolerance)]
    if not close:
        return shapes[int(np.argmin(err))]
    best = min(close, key=lambda i: (abs(math.log(shapes[i].aspect / design.aspect_ratio)), err[i]))
    return shapes[best]


def _fmt_count(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:.0f}"


def _fmt_budget(c: float) -> str:
    """3e+12 -> "3e12", 1.5e15 -> "1.5e15": short and safe in a path."""
    mantissa, exponent = f"{c:.2e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def sequence_lengths(cfg: Config) -> tuple[int, int]:
    """(input length, target length) of one training row, as the trainer's batches have them."""
    if cfg.model.family == "encoder_decoder":
        from t5like.data.objectives import span_corruption_lengths
        return cfg.data.seq_len, span_corruption_lengths(cfg.data)[1]
    return cfg.data.seq_len, 0


def _choose_batch(sequences: float, base_batch: int, design: IsoFlopDesign) -> tuple[int, int]:
    """(batch, steps): the base batch, doubled while steps > max_steps, halved while steps < min_steps."""
    batch = max(design.batch_multiple, base_batch // design.batch_multiple * design.batch_multiple)
    while sequences / batch > design.max_steps:
        batch *= 2
    while sequences / batch < design.min_steps and batch // 2 >= design.batch_multiple \
            and (batch // 2) % design.batch_multiple == 0:
        batch //= 2
    return batch, max(0, round(sequences / batch))


def _fmt_float(x: float) -> str:
    return f"{x:.4g}"


def plan_isoflop(base: Config, design: IsoFlopDesign) -> Plan:
    """The IsoFLOP trials for `base` (the family: architecture, data, optimizer) under `design`'s rules."""
    design = design.validate()
    base = base.validate()
    model = base.model
    if design.head_dim % 2 and model.position == "rope":
        raise ValueError(f"design.head_dim={design.head_dim} is odd but model.position='rope' needs an even "
                         "head dim; use an even head_dim (64 at scale, 16 or 32 for tiny models).")
    seq, target = sequence_lengths(base)
    shapes = candidate_shapes(model, design)
    smallest, largest = min(shapes, key=lambda s: _size(s, design)), max(shapes, key=lambda s: _size(s, design))
    lo, hi = design.span
    factors = np.geomspace(lo, hi, design.sizes_per_budget) if design.sizes_per_budget > 1 else np.array([1.0])

    picks, skipped = [], []
    for budget in design.budgets:
        n_opt = math.sqrt(budget / (6.0 * design.tokens_per_param))
        chosen, reasons = {}, []
        for f in factors:
            target_n = n_opt * f
            shape = nearest_shape(shapes, target_n, design)
            n = _size(shape, design)
            miss = max(n / target_n, target_n / n)
            if miss > design.max_size_miss:
                where = ("below the smallest allowed shape" if shape is smallest else
                         "above the largest allowed shape" if shape is largest else "between the allowed shapes")
                reasons.append(f"N≈{_fmt_count(target_n)} is {where}: the nearest (L={shape.num_layers}, "
                               f"d_model={shape.d_model}) has {_fmt_count(n)} params, {miss:.2f}× off"
                               + ("; raise design.max_layers" if shape is largest else ""))
                continue
            if shape in chosen.values():
                reasons.append(f"N≈{_fmt_count(target_n)} maps to the same shape as a neighbour "
                               f"(L={shape.num_layers}, d_model={shape.d_model})")
                continue
            m = _shape_model(model, design, shape.num_layers, shape.d_model)
            per_seq = training_flops(m, seq, target).per_sequence
            batch, steps = _choose_batch(budget / per_seq, base.train.batch_size, design)
            if steps < design.min_steps:
                reasons.append(f"N≈{_fmt_count(n)} gets {budget / per_seq:.3g} sequences, {steps} steps at batch "
                               f"{batch}, fewer than design.min_steps={design.min_steps}")
                continue
            chosen[float(f)] = shape
            picks.append((budget, shape, batch, steps))
        skipped += [f"budget {budget:.3g}: {r}" for r in reasons]
        if len(chosen) < design.min_sizes_per_budget:
            why = "; ".join(reasons) or "no target sizes"
            raise ValueError(
                f"budget {budget:.3g} FLOPs yields {len(chosen)} distinct model size(s), fewer than "
                f"design.min_sizes_per_budget={design.min_sizes_per_budget} ({why}). Change the budget, widen "
                "design.aspect_range/design.max_layers, or lower design.min_steps/design.min_sizes_per_budget.")
    if design.cooldown_forks:
        trials = _fork_trials(base, design, picks)
    else:
        trials = [_make_trial(base, design, *pick) for pick in picks]
    trials = _with_seeds(base, design, trials)
    ids = [t.id for t in trials]
    if len(set(ids)) != len(ids):
        raise ValueError(f"two trials share an id ({sorted(i for i in ids if ids.count(i) > 1)[0]}); "
                         "list each budget once.")
    return Plan(design, tuple(trials), tuple(skipped), lr_rule(model, design) + (
        f"; cooldown forks: one stable (constant-lr) run per size, each budget a wsd fork of it decaying over the "
        f"last {design.cooldown_fraction:g} of its steps" if design.cooldown_forks else ""))


def _lr_law(design: IsoFlopDesign):
    if not design.lr_law:
        return None
    from t5like.scaling.lrlaw import load_lr_law
    return load_lr_law(design.lr_law)


def lr_rule(model: ModelConfig, design: IsoFlopDesign) -> str:
    law = _lr_law(design)
    if law is not None:
        return law.rule()
    if model.parametrization != "sp":
        return f"lr = base_lr at every size (model.parametrization={model.parametrization}: µP transfers it)"
    return f"lr = base_lr · ({model.d_model} / d_model) ^ {design.lr_exponent}"


def _make_trial(base: Config, design: IsoFlopDesign, budget: float, shape: Shape, batch: int, steps: int) -> Trial:
    warmup = min(steps - 1, round(design.warmup_fraction * steps))
    common, rule = _shape_overrides(base, design, shape, batch, warmup, budget)
    overrides = common + [
        f"train.steps={steps}", f"checkpoint.every={max(1, math.ceil(steps / design.checkpoints_per_trial))}"]
    prefix = f"c{_fmt_budget(budget)}-n{_fmt_count(_size(shape, design))}-l{shape.num_layers}d{shape.d_model}"
    return _trial(base, prefix, overrides, budget, lr_rule=rule)


def _trial(base: Config, prefix: str, overrides: list[str], budget: Optional[float], parent: Optional[Trial] = None,
           fork_step: Optional[int] = None, lr_rule: Optional[str] = None) -> Trial:
    """The Trial that runs `base` with `overrides`; its numbers come from the config it will actually run,
    not from the shape search. A fork's FLOPs and tokens are its whole run's, its parent's part included."""
    tid, cfg = config_trial_id(prefix, base, overrides, parent=f"{parent.id}@{fork_step}" if parent else "")
    batch, steps = cfg.train.batch_size, cfg.train.steps
    counts = param_counts(cfg.model)
    seq, target = sequence_lengths(cfg)
    flops = training_flops(cfg.model, seq, target).per_sequence * batch * steps
    tokens = (seq + target) * batch * steps
    n = counts["non_embedding"]
    return Trial(id=tid, overrides=tuple(overrides), budget=None if budget is None else float(budget),
                 params=counts["total"], non_embedding_params=n, tokens=tokens, steps=steps, batch_size=batch,
                 flops=flops, flops_6n=6.0 * n * tokens, tokens_6n=None if budget is None else budget / (6.0 * n),
                 seed=cfg.seed, parent=parent.id if parent else None, fork_step=fork_step, lr_rule=lr_rule)


def _fork_trials(base: Config, design: IsoFlopDesign, picks: list) -> list[Trial]:
    """Cooldown forks (Hägele et al. 2024): for each model size the design picked at any budget, one stable
    run at constant lr after the warmup, and for each budget that picked the size, a wsd run of the budget's
    steps whose cooldown is its last `cooldown_fraction`, forked from the stable run at the step where that
    cooldown starts. A fork's learning rate over its first steps equals the stable run's, so starting from
    the stable run's state there (params, optimizer, step, data position) is the same as training the wsd
    run from scratch. Every fork of a size shares the stable run's batch and warmup: the batch the rule gives
    the size's largest budget, halved while its smallest budget would get fewer than min_steps (so the
    largest may get more than max_steps); the warmup warmup_fraction of the smallest budget's steps."""
    by_shape: dict[Shape, list] = {}
    for budget, shape, batch, steps in picks:
        by_shape.setdefault(shape, []).append((budget, batch, steps))
    trials = []
    for shape, runs in by_shape.items():
        runs.sort()
        per_seq = training_flops(_shape_model(base.model, design, shape.num_layers, shape.d_model),
                                 *sequence_lengths(base)).per_sequence
        # The largest budget's batch (max_steps), halved while the smallest budget gets fewer than min_steps
        # (it stops at that budget's own batch, which met min_steps when the size was picked).
        batch = _choose_batch(runs[-1][0] / per_seq, base.train.batch_size, design)[0]
        while runs[0][0] / (per_seq * batch) < design.min_steps and batch // 2 >= runs[0][1]:
            batch //= 2
        steps = [max(1, round(budget / (per_seq * batch))) for budget, _, _ in runs]
        starts = [t - wsd_decay_steps(t, design.cooldown_fraction) for t in steps]
        warmup = min(starts[0], round(design.warmup_fraction * steps[0]))
        common, rule = _shape_overrides(base, design, shape, batch, warmup, None)
        name = f"n{_fmt_count(_size(shape, design))}-l{shape.num_layers}d{shape.d_model}"
        longest = max(starts)
        parent = _trial(base, f"stable-{name}", common + [
            "optim.schedule=constant", f"train.steps={longest}",
            f"checkpoint.every={max(1, math.ceil(longest / design.checkpoints_per_trial))}",
            f"checkpoint.keep_steps={','.join(str(s) for s in sorted(set(starts)))}"], None, lr_rule=rule)
        trials.append(parent)
        for (budget, _, _), total, start in zip(runs, steps, starts):
            cooldown = total - start
            trials.append(_trial(base, f"c{_fmt_budget(budget)}-{name}", common + [
                "optim.schedule=wsd", f"optim.wsd_decay_fraction={design.cooldown_fraction:g}",
                f"train.steps={total}",
                f"checkpoint.every={max(1, math.ceil(cooldown / design.checkpoints_per_trial))}"],
                budget, parent, start, lr_rule=rule))
    return trials


def _with_seeds(base: Config, design: IsoFlopDesign, trials: list[Trial]) -> list[Trial]:
    """`trials`, then each again with every seed of design.seeds (a fork's copy starts from its parent's)."""
    if base.seed in design.seeds:
        raise ValueError(f"design.seeds={design.seeds} includes the base config's seed={base.seed}, whose trials the "
                         "plan has already; list only the other seeds.")
    out = list(trials)
    for seed in design.seeds:
        renamed = {}
        for t in trials:
            parent = dataclasses.replace(t, id=renamed[t.parent]) if t.parent else None
            again = _trial(base, f"{t.id.rsplit('-', 1)[0]}-s{seed}", [*t.overrides, f"seed={seed}"], t.budget,
                           parent, t.fork_step, lr_rule=t.lr_rule)
            renamed[t.id] = again.id
            out.append(again)
    return out


def _shape_overrides(base: Config, design: IsoFlopDesign, shape: Shape, batch: int, warmup: int,
                     budget: Optional[float]) -> tuple[list[str], str]:
    """The overrides every run of `shape` has (the shape, the batch, and the lr and warmup the rules give it),
    and the lr rule used. `budget` is None for a stable run and its forks, which share one lr."""
    model = base.model
    mup = model.parametrization != "sp"
    law = _lr_law(design)
    if law is not None:
        if law.of == "flops" and budget is None:
            raise ValueError(f"design.lr_law={design.lr_law} sets the lr by compute, but cooldown forks share one "
                             "stable run (one lr) across budgets; fit the law --of params, or set "
                             "cooldown_forks=False.")
        x = budget if law.of == "flops" else _size(shape, design)
        lr = law.lr(x)
        rule = f"{law.rule()} at {'C' if law.of == 'flops' else 'N'} = {x:.4g}"
    else:
        lr = base.optim.learning_rate * (1.0 if mup else (model.d_model / shape.d_model) ** design.lr_exponent)
        rule = lr_rule(model, design)
    eval_steps = max(1, round(base.train.eval_steps * base.train.batch_size / batch))
    overrides = [f"model.d_model={shape.d_model}", f"model.num_layers={shape.num_layers}",
                 f"model.num_heads={shape.num_heads}", f"model.d_ff={shape.d_ff}"]
    if model.head_dim is not None:
        overrides.append(f"model.head_dim={design.head_dim}")
    if model.num_kv_heads is not None:
        overrides.append(f"model.num_kv_heads={shape.num_kv_heads}")
    if model.num_decoder_layers is not None:
        overrides.append(f"model.num_decoder_layers={shape.num_layers}")
    if mup:  # the base shape: the base model's width in this design's shapes (heads grow, head_dim stays)
        overrides += [f"model.base_head_dim={design.head_dim}",
                      f"model.base_d_ff={_shape_model(model, design, model.num_layers, model.base_width).d_ff}"]
    return overrides + [f"train.batch_size={batch}", f"train.eval_steps={eval_steps}",
                        f"optim.learning_rate={_fmt_float(lr)}", f"optim.warmup_steps={warmup}"], rule


# CLI --------------------------------------------------------------------------------------------------

def load_design(module_name: str) -> tuple[Config, IsoFlopDesign]:
    """An experiment module's base `config()` and `design()`."""
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise ValueError(f"--experiment {module_name!r} cannot be imported ({e}); give a module path such as "
                         "experiments.scaling_tiny.") from None
    for name in ("config", "design"):
        if not callable(getattr(module, name, None)):
            raise ValueError(f"--experiment {module_name}: the module has no {name}() function; an IsoFLOP experiment "
                             "defines config() -> Config and design() -> IsoFlopDesign.")
    return module.config(), module.design()


def resize(design: IsoFlopDesign, budgets: Optional[Sequence[float]] = None,
           sizes: Optional[int] = None) -> IsoFlopDesign:
    """The design with other budgets and/or sizes per budget: the --budgets/--sizes flags of this CLI and
    of launch.sweep, so that `design --budgets B --sizes S` shows what `launch.sweep --budgets B --sizes S`
    runs. A budget the design has keeps its trials (and ids): their results are reused."""
    if budgets is not None:
        bad = [c for c in budgets if not (math.isfinite(c) and c > 0)]
        if bad or not budgets:
            raise ValueError(f"--budgets {' '.join(map(str, budgets))}: every budget must be a positive number of "
                             f"FLOPs (got {bad[0] if bad else 'none'}), e.g. --budgets {' '.join(map(_fmt_budget, design.budgets))}.")
        if len(set(budgets)) != len(budgets):
            raise ValueError(f"--budgets {' '.join(map(str, budgets))} repeats a budget; list each once.")
        design = dataclasses.replace(design, budgets=tuple(float(c) for c in budgets))
    if sizes is not None:
        if not isinstance(sizes, int) or sizes < 1:
            raise ValueError(f"--sizes {sizes}: give the number of model sizes per budget, a positive integer "
                             f"(the design has {design.sizes_per_budget}; an IsoFLOP parabola needs 3).")
        design = dataclasses.replace(design, sizes_per_budget=sizes,
                                     min_sizes_per_budget=min(design.min_sizes_per_budget, sizes))
    return design


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m t5like.scaling.design",
                                 description="Write an experiment's IsoFLOP plan: every trial and its overrides.")
    ap.add_argument("--experiment", required=True, help="module with config() and design(), e.g. experiments.scaling_tiny")
    ap.add_argument("--out", default=None, help="plan.csv or plan.json (default: print the table only)")
    ap.add_argument("--budgets", type=float, nargs="+", default=None, help="replace the design's budgets (FLOPs)")
    ap.add_argument("--sizes", type=int, default=None, help="replace sizes_per_budget")
    args = ap.parse_args(argv)
    try:
        base, design = load_design(args.experiment)
        design = resize(design, args.budgets, args.sizes)
        if args.out:
            check_out_file(args.out, "plan.csv")
        plan = plan_isoflop(base, design)
        print(plan.table())
        print(f"learning rate: {plan.lr_rule}", file=sys.stderr)
        for reason in plan.skipped:
            print(f"skipped: {reason}", file=sys.stderr)
        if args.out:
            plan.write(args.out)
            print(f"wrote {len(plan.trials)} trials to {args.out}", file=sys.stderr)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
