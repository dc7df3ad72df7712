"""The trainer's one seam: what a capability (fine-tuning, µP, DPO, in-loop eval, profiles...) may change.

A capability is a `Plugin`, built from the config. Each hook's default leaves training as it is:

  check_start(resuming)   before any data or compile work: refuse what cannot work, naming the key
  check_data(train_iter)  once the data is open, before anything compiles
  adapt(model)            add modules to the model before it is created sharded (LoRA adapters, prefixes)
  trainable(path)         which parameters train; the others get no gradient and no optimizer state
  lr_multiplier(path)     a parameter's learning-rate multiplier (µP); it scales the optimizer's step inside
                          optim.make_optimizer, before weight decay, which a wrapper could not leave alone
  wrap_optimizer(opt)     wrap the optax optimizer
  init_params(params)     change freshly initialised params (another run's weights, init scales); a
                          resumed run skips it, since its params come from its own checkpoint
  on_log(step, row)       after a logged step's metrics reach the host
  on_eval(step, params)   at each evaluation: more metrics for that step's eval row
  on_eval_row(step, row)  after an eval row is written, with every plugin's additions (a writer logs it)
  on_save(step)           after a checkpoint save is started
  phase(name, step)       a context manager around each timed part of the loop: "restore", "data" (the
                          next batch), "compile" (the first step of a process), "step", "eval", "save"
  summary(abstract)       entries for summary.json
  on_finish(summary)      once the loop has ended (finished or preempted), with summary.json's entries

The loss is chosen by objective in t5like/losses.py, the other half of the seam. `Plugins` applies a
list of plugins in order; the trainer holds one and names no capability itself (t5like/capabilities.py
lists them). `train(cfg, plugins=[...])` adds plugins of your own, as Levanter's callbacks do.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from t5like.optim import path_keys


class Plugin:
    """A capability's hooks; subclass and override what it changes."""

    uses_rng: bool = False  # the forward pass draws random numbers (e.g. adapter dropout)
    # Which params train (a function of the param's path), or None: this plugin freezes nothing.
    trainable: Optional[Callable[[tuple], bool]] = None
    # A parameter's learning-rate multiplier (a function of its path), or None: this plugin scales none.
    lr_multiplier: Optional[Callable[[tuple], float]] = None

    def check_start(self, resuming: bool) -> None:
        pass

    def check_data(self, train_iter) -> None:
        pass

    def adapt(self, model):
        return model

    def wrap_optimizer(self, optimizer: optax.GradientTransformation) -> optax.GradientTransformation:
        return optimizer

    def init_params(self, params: dict) -> dict:
        return params

    def on_log(self, step: int, row: dict) -> None:
        pass

    def on_eval(self, step: int, params) -> dict:
        return {}

    def on_eval_row(self, step: int, row: dict) -> None:
        pass

    def on_save(self, step: int) -> None:
        pass

    def phase(self, name: str, step: int) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def summary(self, abstract_params) -> dict:
        return {}

    def on_finish(self, summary: dict) -> None:
        pass


class Plugins:
    """A list of plugins applied in order, and the machinery their hooks share: freezing (one gradient
    and one optimizer path for every plugin that freezes), composition of model and optimizer changes."""

    def __init__(self, plugins: Sequence[Plugin]):
        self.plugins = list(plugins)

    def __iter__(self):
        return iter(self.plugins)

    @property
    def uses_rng(self) -> bool:
        return any(p.uses_rng for p in self.plugins)

    @property
    def freezes(self) -> bool:
        return any(p.trainable is not None for p in self.plugins)

    def check_start(self, resuming: bool) -> None:
        for p in self.plugins:
            p.check_start(resuming)

    def check_data(self, train_iter) -> None:
        for p in self.plugins:
            p.check_data(train_iter)

    def adapt(self, model):
        for p in self.plugins:
            model = p.adapt(model)
        return model

    @property
    def lr_multiplier(self) -> Optional[Callable[[tuple], float]]:
        """The product of every plugin's learning-rate multiplier, or None when no plugin has one."""
        fns = [p.lr_multiplier for p in self.plugins if p.lr_multiplier is not None]
        return None if not fns else lambda path: math.prod(f(path) for f in fns)

    def is_trainable(self, path: tuple) -> bool:
        return all(p.trainable(path) for p in self.plugins if p.trainable is not None)

    def trainable_mask(self, params):
        """A tree of bools like `params`: True where the parameter trains."""
        return jax.tree_util.tree_map_with_path(lambda path, _: self.is_trainable(path_keys(path)), params)

    def optimizer(self, optimizer: optax.GradientTransformation) -> optax.GradientTransformation:
        """Each plugin's wrapper, then freezing: frozen params get zero updates and no optimizer state."""
        for p in self.plugins:
            optimizer = p.wrap_optimizer(optimizer)
        if not self.freezes:
            return optimizer
        labels = lambda params: jax.tree.map(lambda t: "train" if t else "frozen", self.trainable_mask(params))
        return optax.transforms.partition({"train": optimizer, "frozen": optax.set_to_zero()}, labels)

    def grad(self, loss_fn: Callable) -> Callable:
        """jax.grad(loss_fn, has_aux=True) over the first argument (a nested dict of params); when a plugin
        freezes params, only the trainable leaves are differentiated (XLA never computes the frozen ones'
        gradients) and the others get zeros."""
        if not self.freezes:
            return jax.grad(loss_fn, has_aux=True)

        def fn(params, *args):
            flat = traverse_util.flatten_dict(params)
            train = {k: v for k, v in flat.items() if self.is_trainable(k)}
            inner = lambda t: loss_fn(traverse_util.unflatten_dict({**flat, **t}), *args)
            grads, aux = jax.grad(inner, has_aux=True)(train)
            full = {k: grads[k] if k in grads else jnp.zeros_like(v) for k, v in flat.items()}
            return traverse_util.unflatten_dict(full), aux

        return fn

    def init_params(self, params: dict) -> dict:
        for p in self.plugins:
            params = p.init_params(params)
        return params

    def on_log(self, step: int, row: dict) -> None:
        for p in self.plugins:
            p.on_log(step, row)

    def on_eval(self, step: int, params) -> dict:
        rows: dict = {}
        for p in self.plugins:
            rows.update(p.on_eval(step, params))
        return rows

    def on_eval_row(self, step: int, row: dict) -> None:
        for p in self.plugins:
            p.on_eval_row(step, row)

    def on_save(self, step: int) -> None:
        for p in self.plugins:
            p.on_save(step)

    @contextlib.contextmanager
    def phase(self, name: str, step: int):
        with contextlib.ExitStack() as stack:
            for p in self.plugins:
                stack.enter_context(p.phase(name, step))
            yield

    def on_finish(self, summary: dict) -> None:
        for p in self.plugins:
            p.on_finish(summary)

    def summary(self, abstract_params) -> dict:
        """Every plugin's entries, and `trainable_params` (all of them when nothing is frozen), counted as
        PEFT's print_trainable_parameters counts."""
        mask = jax.tree.leaves(self.trainable_mask(abstract_params))
        out = {"trainable_params": sum(int(np.prod(x.shape)) for x, t in zip(jax.tree.leaves(abstract_params), mask)
                                       if t)}
        for p in self.plugins:
            out.update(p.summary(abstract_params))
        return out


def optimizer_state_shardings(opt_shapes: Any, param_shardings: dict, abstract_params: dict, replicated):
    """Shardings of an optimizer's state: a leaf whose path ends in a parameter's path, with that parameter's
    shape, is sharded like it (moments); anything else (step counts, Adafactor's factored row/column
    statistics) is small and replicated. Matching by path also pairs the masked subtrees of a partitioned
    (frozen) optimizer, which optax.tree_map_params cannot."""
    shardings = {path_keys(p): s for p, s in jax.tree_util.tree_flatten_with_path(param_shardings)[0]}
    shapes = {path_keys(p): a.shape for p, a in jax.tree_util.tree_flatten_with_path(abstract_params)[0]}

    def one(path, leaf):
        keys = path_keys(path)
        for i in range(len(keys)):
            if shapes.get(keys[i:]) == leaf.shape:
                return shardings[keys[i:]]
        return replicated

    return jax.tree_util.tree_map_with_path(one, opt_shapes)
