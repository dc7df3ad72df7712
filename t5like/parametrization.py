"""Hyperparameter transfer: µP across width (Yang et al. 2022, Tensor Programs V) and CompleteP across depth
(Dey et al. 2025, arXiv 2505.01618). docs/mup.md has the rules table, the choices and the departures.

    model.parametrization = "sp" | "mup" | "completep"
    model.base_width, base_d_ff, base_head_dim     the base shape (the model the hyperparameters were tuned on)
    model.base_depth                               its depth (completep)

Everything is relative to the base shape, so a model of the base shape trains as under sp, but for µP's zero
init of the query and of an untied output layer (Adam). Two halves:

- Forward multipliers the model reads from its config (`attention_scale`, `branch_multiplier`,
  `logits_multiplier`): 1/head_dim attention, CompleteP's 1/depth residual branches, and the tied output
  head's 1/width. Under sp each is the identity and the model's code path is the one it always had.
- Per-parameter rules (`rules_for`), derived from the parameter tree, its logical axis names and the base
  shape's tree, as the mup package derives them (a dim is "width" when it differs between the base shape and
  the base at twice the width, mup's "delta" model):
      input    fan-in not width (embeddings, position tables, T5's relative bias, norms, biases)
      hidden   fan-in and fan-out width (attention, MLP, the MLM transform, the pooler)
      query    the hidden kernels [embed, heads, head_dim] of self- and cross-attention
      output   fan-in width, fan-out not (an untied LM head, the classifier)
      scalar   no width dim at all
  applied by the `Parametrization` plugin (t5like/plugins.py): init multipliers on fresh params
  (`init_params`) and learning-rate multipliers (`lr_multiplier`, applied inside t5like/optim.py, before
  weight decay).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from t5like.checkpoint import read_config
from t5like.config import Config, ModelConfig
from t5like.optim import path_keys
from t5like.plugins import Plugin
from t5like.sharding import logical_axes

KINDS = ("input", "hidden", "query", "output", "scalar")
HEAD_AXES = ("heads", "kv_heads", "head_dim")  # heads x head_dim is one width (a fan-in of the attention output)
# Which keys of a model config define the parametrization: a run started from another run's params (init_from)
# must have the same ones.
KEYS = ("parametrization", "base_width", "base_d_ff", "base_head_dim", "base_depth")


# The base shape --------------------------------------------------------------------------------------------

def base_head_dim(cfg: ModelConfig) -> int:
    return cfg.base_head_dim or cfg.dim_per_head * cfg.base_width // cfg.d_model


def base_config(cfg: ModelConfig) -> ModelConfig:
    """The base shape: `cfg` with d_model = base_width, d_ff = base_d_ff, the base head dim, and as many heads
    as keep heads x head_dim in ratio to d_model (ModelConfig.validate checks that all of these are whole)."""
    D0, H, H0 = cfg.base_width, cfg.dim_per_head, base_head_dim(cfg)
    heads = lambda n: n * H * D0 // (cfg.d_model * H0)
    return dataclasses.replace(cfg, d_model=D0, d_ff=cfg.base_d_ff or cfg.d_ff * D0 // cfg.d_model,
                               num_heads=heads(cfg.num_heads), head_dim=H0, base_d_ff=None, base_head_dim=None,
                               num_kv_heads=None if cfg.num_kv_heads is None else heads(cfg.num_kv_heads))


def delta_config(cfg: ModelConfig) -> ModelConfig:
    """The base shape at twice its width (mup's "delta" model): the dims that differ from the base's are the
    width dims, whatever this model's own width (at the base itself too)."""
    b = base_config(cfg)
    return dataclasses.replace(b, d_model=2 * b.d_model, d_ff=2 * b.d_ff, num_heads=2 * b.num_heads,
                               num_kv_heads=None if b.num_kv_heads is None else 2 * b.num_kv_heads)


def width_mult(cfg: ModelConfig) -> float:
    return 1.0 if cfg.parametrization == "sp" else cfg.d_model / cfg.base_width


def depth_mult(cfg: ModelConfig) -> float:
    return cfg.num_layers / cfg.base_depth if cfg.parametrization == "completep" else 1.0


# Forward multipliers (read by t5like/layers.py and t5like/models.py) -----------------------------------------

def attention_scale(cfg: ModelConfig) -> Optional[float]:
    """The attention logits' scale; None is the kernels' default 1/sqrt(head_dim). µP needs 1/head_dim (queries
    and keys become correlated in training, so q.k grows like head_dim, not its root); this is sqrt(H0)/H, which
    is 1/sqrt(H) at the base head dim H0: a base-shape model is unchanged, and a model whose heads grow in number
    at a fixed head dim too."""
    if not cfg.scale_attention:
        return 1.0  # T5: folded into the query init (refused under mup/completep by ModelConfig.validate)
    if cfg.parametrization == "sp" or cfg.dim_per_head == base_head_dim(cfg):
        return None
    return math.sqrt(base_head_dim(cfg)) / cfg.dim_per_head


def branch_multiplier(cfg: ModelConfig) -> float:
    """CompleteP (alpha = 1): every residual branch is scaled by base_depth / num_layers."""
    return 1.0 / depth_mult(cfg)


def logits_multiplier(cfg: ModelConfig) -> float:
    """µP's output multiplier 1/width_mult (MuReadout), where the model must apply it: a tied head. An untied
    head gets it through its init and learning rate instead (Adam's symmetry, see `output_rule`)."""
    return 1.0 / width_mult(cfg) if cfg.tie_embeddings else 1.0


# Per-parameter rules ----------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Rule:
    kind: str            # one of KINDS
    fan_in_mult: float   # the fan-in's size over the base shape's (1 when the fan-in is not width)
    init: float          # multiplier of the standard init's std
    lr: float            # multiplier of the learning rate


def _groups(names: tuple, shape: tuple, base: tuple, delta: tuple) -> list[tuple[bool, float]]:
    """(is width, size over base size) per group of dims: heads x head_dim is one group, every other dim its own.
    A dim is width where the delta shape's differs from the base's."""
    groups: list[list] = []
    for i, name in enumerate(names):
        if groups and name in HEAD_AXES and groups[-1][0] in HEAD_AXES:
            groups[-1][1].append(i)
        else:
            groups.append([name, [i]])
    return [(any(delta[i] != base[i] for i in dims), math.prod(shape[i] / base[i] for i in dims))
            for _, dims in groups]


def classify(names: tuple, shape: tuple, base: tuple, delta: tuple) -> tuple[str, float]:
    """(kind, fan-in multiplier) of a parameter from its logical names, its shape, the base shape's and the
    delta shape's. Kernels are laid out [fan-in..., fan-out...] (lookup tables [ids, embed]); a leading `layers`
    axis is not a dim."""
    if names and names[0] == "layers":
        names, shape, base, delta = names[1:], shape[1:], base[1:], delta[1:]
    groups = _groups(tuple(names), tuple(shape), tuple(base), tuple(delta))
    if not any(w for w, _ in groups):
        return "scalar", 1.0
    if len(groups) == 1:  # a vector: a bias, a norm's scale
        return "input", 1.0
    (w_in, r_in), w_out = groups[0], any(w for w, _ in groups[1:])
    if w_in and w_out:
        return ("query" if tuple(names) == ("embed", "heads", "head_dim") else "hidden"), r_in
    return ("output", r_in) if w_in else ("input", 1.0)


def rule(kind: str, fan_in_mult: float, optimizer: str) -> Rule:
    """µP's multipliers of a parameter kind (Tensor Programs V, Table 3; the mup package), relative to sp's
    init and learning rate. sp's init is already µP's for every kind but the output (fan-in init for hidden
    kernels, constant for embeddings and vectors).

    Adam: hidden lr 1/m (MuAdam); output: mup's forward multiplier 1/m, applied as Adam's symmetry allows (a
    forward multiplier c equals init x c and lr x c, up to Adam's eps): lr x 1/m, and the init zero (TP5's
    zero readout, mup's readout_zero_init), as the query's (TP5 D.2): the terms the init leaves in their
    outputs' changes vanish only as m^-1/2, and at small widths they bend the coordinate check.
    Adafactor (t5like's: optax.adafactor with multiply_by_parameter_scale, steps scaled by the parameter's RMS):
    the RMS already carries the init's width dependence, so hidden lr x m^-1/2 (RMS ~ m^-1/2 supplies the
    rest of µP's 1/m) and output lr x 1 with init x m^-1/2 (RMS ~ 1/m). Nothing starts at zero: a zero RMS
    would make the steps those of its 1e-3 floor."""
    m, adam = fan_in_mult, optimizer == "adamw"
    if kind in ("hidden", "query"):
        return Rule(kind, m, 0.0 if kind == "query" and adam else 1.0, 1.0 / m if adam else m ** -0.5)
    if kind == "output":
        return Rule(kind, m, 0.0 if adam else m ** -0.5, 1.0 / m if adam else 1.0)
    return Rule(kind, m, 1.0, 1.0)


def param_shapes(state: nnx.State) -> dict[tuple, tuple[tuple, tuple]]:
    """{path: (logical names, shape)} of every parameter of an (abstract) model state."""
    out = {}
    for path, var in jax.tree_util.tree_flatten_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]:
        out[path_keys(path)] = (logical_axes(var), tuple(var.get_value().shape))
    return out


def rules_for(cfg: ModelConfig, state: nnx.State, base_state: nnx.State, delta_state: nnx.State,
              optimizer: str) -> dict[tuple, Rule]:
    """The rule of every parameter of `state` (the model) against `base_state` (its base shape) and
    `delta_state` (the base at twice the width: which dims are width)."""
    base, delta = param_shapes(base_state), param_shapes(delta_state)
    rules = {}
    for path, (names, shape) in param_shapes(state).items():
        if path not in base or len(base[path][1]) != len(shape):
            raise ValueError(f"parameter {'/'.join(map(str, path))} has no counterpart in the base shape "
                             f"{base_config(cfg)}; the base must have the same architecture.")
        rules[path] = rule(*classify(names, shape, base[path][1], delta[path][1]), optimizer)
    return rules


# The plugin -------------------------------------------------------------------------------------------------

class Parametrization(Plugin):
    """model.parametrization: learning-rate multipliers and init multipliers of µP/CompleteP; under sp none
    (no lr_multiplier, params untouched). Adapters (LoRA, prefixes) have no rule and keep their own conventions.
    `abstract_state(model_cfg) -> nnx.State` builds a config's abstract model (t5like.models.abstract_model)."""

    def __init__(self, cfg: Config, abstract_state: Callable[[ModelConfig], nnx.State]):
        self.cfg = cfg
        self.rules: dict[tuple, Rule] = {}
        if cfg.model.parametrization != "sp":
            m = cfg.model
            self.rules = rules_for(m, abstract_state(m), abstract_state(base_config(m)),
                                   abstract_state(delta_config(m)), cfg.optim.name)
            self.lr_multiplier = lambda path: self.rules[path].lr if path in self.rules else 1.0

    def check_start(self, resuming: bool) -> None:
        """A run that starts from another's params (checkpoint.init_from, e.g. an imported Hugging Face model,
        which is sp) must compute the same function with them: the same parametrization and base shape."""
        src = self.cfg.checkpoint.init_from
        if not src or resuming:
            return
        theirs = read_config(src).model
        diffs = [f"model.{k}: {getattr(theirs, k)!r} there, {getattr(self.cfg.model, k)!r} here" for k in KEYS
                 if getattr(theirs, k) != getattr(self.cfg.model, k)]
        if diffs:
            raise ValueError(f"checkpoint.init_from={src!r} was trained with another parametrization ("
                             f"{'; '.join(diffs)}). Its weights compute another function under these multipliers "
                             "(an imported Hugging Face model is always sp), so µP cannot be applied to them: use "
                             "that run's model.parametrization and base shape, or train from scratch.")

    def init_params(self, params: dict) -> dict:
        def one(path, x):
            r = self.rules.get(path_keys(path))
            if r is None or r.init == 1.0:
                return x
            return jnp.zeros_like(x) if r.init == 0.0 else (x * r.init).astype(x.dtype)
        return params if not self.rules else jax.tree_util.tree_map_with_path(one, params)

    def summary(self, abstract_params) -> dict:
        m = self.cfg.model
        if m.parametrization == "sp":
            return {}
        return {"parametrization": m.parametrization, "width_mult": width_mult(m), "depth_mult": depth_mult(m)}
