"""Optimizers and learning-rate schedules (optax).

Gradient accumulation lives in the train step (a scan over microbatches), not here, so the optimizer
sees one update per step and its state stays the same size.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from t5like.config import OptimConfig


def make_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Peak `learning_rate` after `warmup_steps` of linear warmup (except rsqrt, as T5), then:
      constant  stays at the peak
      cosine    cosine decay to end_lr_fraction * peak at total_steps
      linear    linear decay to end_lr_fraction * peak at total_steps
      wsd       warmup-stable-decay: the last wsd_decay_fraction of steps decay linearly to the end value
      rsqrt     T5: peak * rsqrt(max(step, warmup) / warmup), constant during warmup
    """
    peak, warmup = cfg.learning_rate, cfg.warmup_steps
    end = peak * cfg.end_lr_fraction
    if cfg.schedule == "rsqrt":
        return lambda step: peak * jax.lax.rsqrt(jnp.maximum(step, max(warmup, 1)) / max(warmup, 1))
    warm = optax.linear_schedule(0.0, peak, warmup) if warmup else optax.constant_schedule(peak)
    rest = max(total_steps - warmup, 1)
    if cfg.schedule == "constant":
        after = optax.constant_schedule(peak)
    elif cfg.schedule == "cosine":
        after = optax.cosine_decay_schedule(peak, rest, alpha=cfg.end_lr_fraction)
    elif cfg.schedule == "linear":
        after = optax.linear_schedule(peak, end, rest)
    else:  # wsd
        decay = max(int(round(total_steps * cfg.wsd_decay_fraction)), 1)
        stable = max(rest - decay, 0)
        after = optax.join_schedules([optax.constant_schedule(peak), optax.linear_schedule(peak, end, decay)],
                                     [stable])
    return optax.join_schedules([warm, after], [warmup]) if warmup else after


def param_kind(path: tuple[str, ...]) -> str:
    """Classify a parameter by its path: "norm", "bias", "embedding" (token, position and relative-bias
    tables) or "weight"."""
    names = [str(p) for p in path]
    if any("norm" in n for n in names[:-1]):
        return "norm"
    if names[-1].endswith("bias"):
        return "bias"
    if names[-1] in ("embedding", "table"):
        return "embedding"
    return "weight"


def decay_mask(params, no_decay: tuple[str, ...]):
    """True where weight decay applies."""
    def keep(path, _):
        keys = tuple(getattr(k, "key", getattr(k, "name", k)) for k in path)
        return param_kind(keys) not in no_decay
    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(cfg: OptimConfig, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = make_schedule(cfg, total_steps)
    mask = lambda params: decay_mask(params, cfg.no_decay)
    if cfg.name == "adamw":
        opt = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=mask)
    else:
        opt = optax.adafactor(learning_rate=schedule, weight_decay_rate=cfg.weight_decay or None,
                              weight_decay_mask=mask)
    if cfg.grad_clip > 0:
        opt = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), opt)
    return opt, schedule


def cross_entropy(logits_BLV: jax.Array, targets_BL: jax.Array, weights_BL: jax.Array, *,
                  label_smoothing: float = 0.0, z_loss: float = 0.0) -> tuple[jax.Array, dict]:
    """Weighted token cross-entropy (in float32) with optional label smoothing and z-loss.

    Returns (objective, metrics). metrics["loss"] is the plain cross-entropy (no smoothing, no z-loss)
    so that it is comparable across settings; the objective adds both.
    """
    logits = logits_BLV.astype(jnp.float32)
    # logsumexp written out, so that its max also gives the accuracy (an argmax is a second, slower pass
    # over [B, L, V]: 2-4% of a CPU step at vocab 8192).
    max_BL = jax.lax.stop_gradient(logits.max(-1))
    log_z = max_BL + jnp.log(jnp.sum(jnp.exp(logits - max_BL[..., None]), -1))
    target_logit = jnp.take_along_axis(logits, targets_BL[..., None], axis=-1)[..., 0]
    nll = log_z - target_logit
    objective = nll
    if label_smoothing:
        # Mix the one-hot target with uniform over the other tokens.
        vocab = logits.shape[-1]
        low = label_smoothing / (vocab - 1)
        mean_nll_all = log_z - logits.sum(-1) / vocab
        objective = (1.0 - label_smoothing - low) * nll + low * vocab * mean_nll_all
    if z_loss:
        objective = objective + z_loss * jnp.square(log_z)
    denom = jnp.maximum(weights_BL.sum(), 1.0)
    correct = (target_logit >= max_BL).astype(jnp.float32)  # the target is the top logit (ties count)
    metrics = {"loss": (nll * weights_BL).sum() / denom, "accuracy": (correct * weights_BL).sum() / denom,
               "weight": weights_BL.sum()}
    return (objective * weights_BL).sum() / denom, metrics
