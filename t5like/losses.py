"""The loss, chosen by objective: the second half of the trainer's seam (the first is t5like/plugins.py).

    loss = loss_for(objective, cfg)
    objective_sum, sums = loss(model, batch, rng, label_smoothing=..., z_loss=...)

Every loss returns SUMS over its targets (the objective to differentiate, and {"loss_sum", "correct_sum",
"weight"}), so gradient accumulation and evaluation divide by the total weight once. A batch that carries
target_bytes (the objectives where bits-per-byte is defined) also gets "byte_sum", its targets' UTF-8 bytes:
bpb = loss_sum / ln 2 / byte_sum (`bits_per_byte`). The per-row sums beside them give each eval's standard
error over sequences (`ratio_stderr`). Any other "<name>_sum" a loss returns is reported as
its mean over the weight (<name> in training rows, eval_<name> in eval rows). A new objective is one function
and one entry in LOSSES.

DPO (Rafailov et al. 2023; data.objective=dpo, batches of t5like.data.instruct): per pair, with log-probabilities
summed over the answer tokens under the policy (pi) and the frozen reference (ref),
    h = (pi_chosen - pi_rejected) - (ref_chosen - ref_rejected)
    loss = -log sigmoid(beta h);  rewards = beta (pi - ref);  accuracy = share of pairs whose chosen reward
    beats the rejected one (ties count as wrong)
as TRL's DPOTrainer (loss_type "sigmoid", its default) computes them. The weight is the number of pairs, so the gradient
is that of the mean over pairs.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from t5like.models import without_adapters
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


# DPO --------------------------------------------------------------------------------------------------

def pair_logprobs(logits_BLV: jax.Array, batch: dict) -> tuple[jax.Array, jax.Array]:
    """(chosen, rejected) [B]: each answer's log-probability, summed over its weighted tokens; a preference row
    holds the chosen answer in segment 1 and the rejected one in segment 2."""
    logp_BLV = jax.nn.log_softmax(logits_BLV.astype(jnp.float32), axis=-1)
    token_BL = jnp.take_along_axis(logp_BLV, batch["targets"][..., None], axis=-1)[..., 0] * batch["weights"]
    seg_BL = batch["segment_ids"]
    return (token_BL * (seg_BL == 1)).sum(-1), (token_BL * (seg_BL == 2)).sum(-1)


def dpo_terms(pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta: float):
    """(per-pair loss, chosen reward, rejected reward) from summed log-probabilities (see the module docstring)."""
    h = (pi_chosen - pi_rejected) - (ref_chosen - ref_rejected)
    return -jax.nn.log_sigmoid(beta * h), beta * (pi_chosen - ref_chosen), beta * (pi_rejected - ref_rejected)


def reference_model(model):
    """DPO's frozen reference: a kept copy (model.reference, finetune.method=full), else the model with its
    adapters off (LoRA, prefix): the same arrays, no second copy."""
    reference = getattr(model, "reference", None)
    return reference if reference is not None else without_adapters(model)


def dpo_loss(model, batch: dict, rng=None, *, beta: float, label_smoothing: float = 0.0,
             z_loss: float = 0.0) -> tuple[jax.Array, dict]:
    """DPO's sums over the batch's pairs: the objective, loss_sum, correct_sum (pairs ranked right), weight
    (pairs), and chosen_reward_sum, rejected_reward_sum, margin_sum. label_smoothing and z_loss are refused
    before training (t5like/preference.py): TRL's sigmoid loss has neither."""
    del label_smoothing, z_loss
    pi_c, pi_r = pair_logprobs(model(batch, rng=rng), batch)
    ref_c, ref_r = jax.lax.stop_gradient(pair_logprobs(reference_model(model)(batch), batch))
    losses, chosen, rejected = dpo_terms(pi_c, pi_r, ref_c, ref_r, beta)
    real = (batch["segment_ids"] > 0).any(-1).astype(jnp.float32)  # padding rows of an eval pass count 0
    total = (losses * real).sum()
    return total, {"loss_sum": total, "correct_sum": ((chosen > rejected) * real).sum(), "weight": real.sum(),
                   "chosen_reward_sum": (chosen * real).sum(), "rejected_reward_sum": (rejected * real).sum(),
                   "margin_sum": ((chosen - rejected) * real).sum()}


# Objectives whose loss is not cross-entropy against batch["targets"]: objective -> (config -> loss).
LOSSES: dict[str, Callable] = {
    "dpo": lambda cfg: functools.partial(dpo_loss, beta=0.1 if cfg is None else cfg.finetune.dpo_beta),
}


def loss_for(objective: str, cfg=None) -> Callable:
    """The loss of `objective` (data.objective) with `cfg`'s settings (t5like.config.Config; None: defaults):
    (model, batch, rng, label_smoothing=, z_loss=) -> (objective sum, sums)."""
    if objective in LOSSES:
        return LOSSES[objective](cfg)
    return functools.partial(cross_entropy_loss, objective=objective)
