"""Optimizers and learning-rate schedules (optax).

Weight decay means one thing for every optimizer: decoupled decay scaled by the learning rate
(Loshchilov & Hutter). Each step, a decayed weight w also moves by -lr_t * weight_decay * w, so with
zero gradients it is multiplied by exactly (1 - lr_t * weight_decay). This is optax.adamw's rule; for
Adafactor it is added here, because optax.adafactor's `weight_decay_rate` is applied after the
learning-rate scaling (w shrinks by weight_decay * w per step, whatever the learning rate).

Gradient accumulation lives in the train step (a scan over microbatches), not here, so the optimizer
sees one update per step and its state stays the same size.
"""
from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import optax

from t5like.config import OptimConfig, wsd_decay_steps


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
        decay = wsd_decay_steps(total_steps, cfg.wsd_decay_fraction)
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


def path_keys(path) -> tuple:
    """A jax tree path as plain keys: ('decoder', 'layers', 'attn', 'query')."""
    return tuple(getattr(k, "key", getattr(k, "name", k)) for k in path)


def decay_mask(params, no_decay: tuple[str, ...]):
    """True where weight decay applies."""
    def keep(path, _):
        return param_kind(path_keys(path)) not in no_decay
    return jax.tree_util.tree_map_with_path(keep, params)


def decoupled_weight_decay(schedule: optax.Schedule, weight_decay: float, mask) -> optax.GradientTransformation:
    """Adds -schedule(count) * weight_decay * w to the (already learning-rate-scaled) updates of masked w."""
    def init(params):
        del params
        return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

    def update(updates, state, params):
        lr = schedule(state.count)
        decayed = jax.tree.map(lambda u, w: u - lr * weight_decay * w.astype(u.dtype), updates, params)
        return decayed, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

    return optax.masked(optax.GradientTransformation(init, update), mask)


def scale_by_multiplier(multiplier: Callable[[tuple], float]) -> optax.GradientTransformation:
    """Each parameter's update times `multiplier(path)` (path as plain keys); a multiplier of 1 leaves it be."""
    def update(updates, state, params=None):
        del params
        def one(path, u):
            m = multiplier(path_keys(path))
            return u if m == 1.0 else u * jnp.asarray(m, u.dtype)
        return jax.tree_util.tree_map_with_path(one, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def with_state_dtype(inner: optax.GradientTransformation, dtype) -> optax.GradientTransformation:
    """`inner` with its floating-point state stored in `dtype` (optim.state_dtype): each step casts the state
    up to float32, updates it there and rounds it back, so only the stored moments lose precision. Integer
    state (step counts) is left alone. optax's own mu_dtype covers Adam's first moment only."""
    def cast(tree, to):
        return jax.tree.map(lambda x: x.astype(to) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)

    def init(params):
        return cast(inner.init(params), dtype)

    def update(updates, state, params=None):
        updates, state = inner.update(updates, cast(state, jnp.float32), params)
        return updates, cast(state, dtype)

    return optax.GradientTransformation(init, update)


def make_optimizer(cfg: OptimConfig, total_steps: int, lr_multiplier: Optional[Callable[[tuple], float]] = None
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optimizer and its schedule. `lr_multiplier(path)`, if given (µP: t5like/parametrization.py), scales
    each parameter's learning rate: its step, not its weight decay, which stays lr_t * weight_decay * w (so the
    decay's timescale does not change with a parameter's multiplier; MuAdam's default)."""
    schedule = make_schedule(cfg, total_steps)
    mask = lambda params: decay_mask(params, cfg.no_decay)
    if cfg.name == "adamw" and lr_multiplier is None:
        opt = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=mask)
    else:
        if cfg.name == "adamw":
            opt = optax.adam(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
        else:
            opt = optax.adafactor(learning_rate=schedule)
        if lr_multiplier is not None:
            opt = optax.chain(opt, scale_by_multiplier(lr_multiplier))
        if cfg.weight_decay:
            opt = optax.chain(opt, decoupled_weight_decay(schedule, cfg.weight_decay, mask))
    if cfg.state_dtype is not None:
        opt = with_state_dtype(opt, jnp.dtype(cfg.state_dtype))
    if cfg.grad_clip > 0:
        opt = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), opt)
    return opt, schedule


def cross_entropy(logits_BLV: jax.Array, targets_BL: jax.Array, weights_BL: jax.Array, *,
                  label_smoothing: float = 0.0, z_loss: float = 0.0,
                  target_bytes_BL: Optional[jax.Array] = None) -> tuple[jax.Array, dict]:
    """Weighted token cross-entropy (in float32) with optional label smoothing and z-loss, as SUMS over
    tokens: (objective_sum, {"loss_sum", "correct_sum", "weight"}). Dividing by the weight happens once,
    after every microbatch is summed, so accumulation gives the full batch's token mean exactly.

    "loss_sum" is the plain cross-entropy (no smoothing, no z-loss), comparable across settings; the
    objective adds both. `row_sums` adds the sums over rows (sequences) that the standard error of the mean
    loss over sequences needs (`losses.ratio_stderr`), and with `target_bytes_BL` the byte count and its
    sums for bits-per-byte.
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
    weights = weights_BL.astype(jnp.float32)
    correct = (target_logit >= max_BL).astype(jnp.float32)  # the target is the top logit (ties count)
    sums = {"loss_sum": (nll * weights).sum(), "correct_sum": (correct * weights).sum(), "weight": weights.sum()}
    rows = lambda x_BL: x_BL.reshape(x_BL.shape[0], -1).sum(-1)  # [B, L] (or [B]: classification) -> [B]
    loss_B, weight_B = rows(nll * weights), rows(weights)
    sums.update(row_sums(loss_B, weight_B, "weight"))
    if target_bytes_BL is not None:
        bytes_B = rows(target_bytes_BL.astype(jnp.float32))
        sums.update(byte_sum=bytes_B.sum(), **row_sums(loss_B, bytes_B, "byte"))
    return (objective * weights).sum(), sums


def row_sums(loss_B: jax.Array, count_B: jax.Array, name: str) -> dict:
    """Per-row sums for the standard error of sum(loss) / sum(count) over rows: sum(loss^2),
    sum(loss * count), sum(count^2), and the rows that count (count > 0)."""
    return {"rows_loss_sq": jnp.square(loss_B).sum(), f"rows_loss_{name}": (loss_B * count_B).sum(),
            f"rows_{name}_sq": jnp.square(count_B).sum(), f"rows_{name}": (count_B > 0).sum().astype(jnp.float32)}


def mean_metrics(sums: dict) -> dict:
    """Token means from `cross_entropy`'s sums: loss, accuracy, and the weight they were taken over; any other
    "<name>_sum" a loss returns (DPO's rewards) as its mean, <name>."""
    denom = jnp.maximum(sums["weight"], 1.0)
    extra = {k[:-4]: v / denom for k, v in sums.items() if k.endswith("_sum") and k not in MEAN_METRIC_SUMS}
    return {"loss": sums["loss_sum"] / denom, "accuracy": sums["correct_sum"] / denom, "weight": sums["weight"],
            **extra}


# Sums every loss returns, or that have a meaning of their own (bits-per-byte); any other "<name>_sum" of a
# loss (DPO's rewards) is reported as a mean over the weight, <name>.
MEAN_METRIC_SUMS = ("loss_sum", "correct_sum", "byte_sum")
