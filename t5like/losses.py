"""The loss, chosen by objective: the second half of the trainer's seam (the first is t5like/plugins.py).

    loss = loss_for(objective)
    objective_sum, sums = loss(model, batch, rng, label_smoothing=..., z_loss=...)

Every loss returns SUMS over its targets (the objective to differentiate, and {"loss_sum", "correct_sum",
"weight"}), so gradient accumulation and evaluation divide by the total weight once. A batch that carries
target_bytes (the objectives where bits-per-byte is defined) also gets "byte_sum", its targets' UTF-8 bytes:
bpb = loss_sum / ln 2 / byte_sum (`bits_per_byte`). The per-row sums beside them give each eval's standard
error over sequences (`ratio_stderr`). A new objective
(e.g. a preference loss) is one function and one entry in LOSSES.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Optional

import jax

from t5like.optim import cross_entropy


def task_logits(model, batch: dict, objective: str, rng=None) -> jax.Array:
    """float32 logits the loss reads: [B, num_classes] for classification, else [B, L, V]."""
    if objective == "classification":
        return model.classify(batch, rng=rng)
    return model(batch, rng=rng)


def cross_entropy_loss(model, batch: dict, rng=None, *, objective: str, **kwargs) -> tuple[jax.Array, dict]:
    """Cross-entropy of the task's logits against its targets: every token objective, and classification."""
    return cross_entropy(task_logits(model, batch, objective, rng), batch["targets"], batch["weights"],
                         target_bytes_BL=batch.get("target_bytes"), **kwargs)


def ratio_stderr(sums: dict, count: str = "weight") -> Optional[float]:
    """The standard error over rows (eval sequences) of the loss per `count` (per token: "weight"; per UTF-8
    byte: "byte"), R = sum_i s_i / sum_i c_i, from the per-row sums `optim.row_sums` adds up: the ratio
    estimator's (delta-method) variance, n/(n-1) * sum_i (s_i - R c_i)^2 / (sum_i c_i)^2. With equal counts
    per row it is the sample standard deviation of the rows' mean losses over sqrt(n). None below 2 rows."""
    n, total = sums.get(f"rows_{count}"), sums.get(f"{'byte_sum' if count == 'byte' else 'weight'}")
    if not n or n < 2 or not total:
        return None
    r = sums["loss_sum"] / total
    sq = sums["rows_loss_sq"] - 2 * r * sums[f"rows_loss_{count}"] + r * r * sums[f"rows_{count}_sq"]
    return math.sqrt(max(sq, 0.0) * n / (n - 1)) / total


def bits_per_byte(loss_sum: float, byte_sum: Optional[float]) -> Optional[float]:
    """Summed log-loss in nats over the UTF-8 bytes it predicted, in bits; None where bytes are not counted."""
    if not byte_sum:
        return None
    return loss_sum / math.log(2) / byte_sum


# Objectives whose loss is not cross-entropy against batch["targets"] (none yet; e.g. a preference loss).
LOSSES: dict[str, Callable] = {}


def loss_for(objective: str) -> Callable:
    """The loss of `objective` (data.objective): (model, batch, rng, label_smoothing=, z_loss=) -> sums."""
    return LOSSES.get(objective) or functools.partial(cross_entropy_loss, objective=objective)
