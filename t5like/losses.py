"""The loss, chosen by objective: the second half of the trainer's seam (the first is t5like/plugins.py).

    loss = loss_for(objective)
    objective_sum, sums = loss(model, batch, rng, label_smoothing=..., z_loss=...)

Every loss returns SUMS over its targets (the objective to differentiate, and {"loss_sum", "correct_sum",
"weight"}), so gradient accumulation and evaluation divide by the total weight once. A new objective
(e.g. a preference loss) is one function and one entry in LOSSES.
"""
from __future__ import annotations

import functools
from typing import Callable

import jax

from t5like.optim import cross_entropy


def task_logits(model, batch: dict, objective: str, rng=None) -> jax.Array:
    """float32 logits the loss reads: [B, num_classes] for classification, else [B, L, V]."""
    if objective == "classification":
        return model.classify(batch, rng=rng)
    return model(batch, rng=rng)


def cross_entropy_loss(model, batch: dict, rng=None, *, objective: str, **kwargs) -> tuple[jax.Array, dict]:
    """Cross-entropy of the task's logits against its targets: every token objective, and classification."""
    return cross_entropy(task_logits(model, batch, objective, rng), batch["targets"], batch["weights"], **kwargs)


# Objectives whose loss is not cross-entropy against batch["targets"] (none yet; e.g. a preference loss).
LOSSES: dict[str, Callable] = {}


def loss_for(objective: str) -> Callable:
    """The loss of `objective` (data.objective): (model, batch, rng, label_smoothing=, z_loss=) -> sums."""
    return LOSSES.get(objective) or functools.partial(cross_entropy_loss, objective=objective)
