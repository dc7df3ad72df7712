"""The trainer: train state, the jitted train and eval steps, and the loop.

Read top to bottom: `main` (experiment CLI) -> `train` (set-up, resume, loop) -> `make_train_step`.
The train state is a plain dict {"params", "opt_state", "step"} of sharded arrays; the model is
rebuilt from it inside the step with `nnx.merge`, which keeps the hot path free of NNX's Python
bookkeeping.
"""
from __future__ import annotations

import dataclasses
import difflib
import inspect
import json
import math
import os
import signal
import sys
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from t5like import finetune
from t5like.accounting import param_counts, training_flops
from t5like.checkpoint import Checkpointer, checkpoint_dir, read_config
from t5like.config import Config, apply_overrides, flat_keys, to_dict
from t5like.data import get_tokenizer, make_iterator
from t5like.metrics import MetricsWriter, peak_flops_per_device
from t5like.models import FAMILIES
from t5like.optim import cross_entropy, make_optimizer
from t5like.sharding import Sharder, batch_sharding, make_mesh, replicated, state_shardings

# A preempted run exits with 128 + SIGTERM, after saving, so schedulers see it did not finish.
PREEMPTED_EXIT_CODE = 143


# The steps ----------------------------------------------------------------------------------------

def make_loss_fn(graphdef, cfg: Config):
    def loss_fn(params, batch, rng):
        logits = finetune.task_logits(nnx.merge(graphdef, params), batch, cfg.data.objective, rng)
        return cross_entropy(logits, batch["targets"], batch["weights"],
                             label_smoothing=cfg.optim.label_smoothing, z_loss=cfg.optim.z_loss)
    return loss_fn


def make_train_step(graphdef, cfg: Config, optimizer: optax.GradientTransformation, schedule):
    grad_fn = finetune.value_and_grad(make_loss_fn(graphdef, cfg), cfg)  # only trainable params under lora/prefix
    accum = cfg.optim.grad_accum_steps
    use_dropout = cfg.model.dropout > 0 or (cfg.finetune.method == "lora" and cfg.finetune.lora_dropout > 0)

    def train_step(state, batch):
        step = state["step"]
        rng = jax.random.fold_in(jax.random.key(cfg.seed), step) if use_dropout else None
        if accum == 1:
            (_, metrics), grads = grad_fn(state["params"], batch, rng)
        else:
            # Microbatch i takes rows i, i+accum, ...: every microbatch stays spread over all devices.
            micro = jax.tree.map(lambda x: x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1), batch)

            def body(carry, xs):
                mb, i = xs
                r = None if rng is None else jax.random.fold_in(rng, i)
                (_, m), g = grad_fn(state["params"], mb, r)
                return jax.tree.map(jnp.add, carry, (g, m)), None

            (_, m_shape), g_shape = jax.eval_shape(grad_fn, state["params"], jax.tree.map(lambda x: x[0], micro), rng)
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (g_shape, m_shape))
            (grads, metrics), _ = jax.lax.scan(body, zeros, (micro, jnp.arange(accum)))
            grads, metrics = jax.tree.map(lambda x: x / accum, (grads, metrics))
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {**metrics, "grad_norm": optax.global_norm(grads), "lr": schedule(step)}
        return {"params": params, "opt_state": opt_state, "step": step + 1}, metrics

    return train_step


def make_eval_step(graphdef, cfg: Config):
    def eval_step(params, batch):
        logits = finetune.task_logits(nnx.merge(graphdef, params), batch, cfg.data.objective)
        _, m = cross_entropy(logits, batch["targets"], batch["weights"])
        return {"loss_sum": m["loss"] * m["weight"], "correct": m["accuracy"] * m["weight"], "weight": m["weight"]}
    return eval_step


# Set-up -------------------------------------------------------------------------------------------

# Fields that must match for a workdir's checkpoints to be resumable by this config.
def _resume_key(cfg: Config) -> dict:
    return {"model": to_dict(cfg.model), "optim.name": cfg.optim.name, "train.batch_size": cfg.train.batch_size,
            "seed": cfg.seed, "finetune": to_dict(cfg.finetune), **{f"data.{k}": v for k, v in to_dict(cfg.data).items()
                                 if k in ("source", "paths", "format", "text_field", "hub_name", "objective",
                                          "seq_len", "target_len", "max_files", "validation_fraction")}}


def check_workdir(cfg: Config) -> None:
    """An existing run in the workdir must be compatible; otherwise stop before touching anything."""
    if not os.path.exists(os.path.join(cfg.workdir, "config.json")):
        return
    old, new = _resume_key(read_config(cfg.workdir)), _resume_key(cfg)
    diffs = []
    for key in new:
        if isinstance(new[key], dict):
            diffs += [f"{key}.{k}: {old[key].get(k)!r} -> {v!r}" for k, v in new[key].items() if old[key].get(k) != v]
        elif json.loads(json.dumps(old[key])) != json.loads(json.dumps(new[key])):
            diffs.append(f"{key}: {old[key]!r} -> {new[key]!r}")
    if diffs:
        raise ValueError(f"workdir={cfg.workdir!r} holds a run with an incompatible config ({'; '.join(diffs)}). "
                         "Nothing was overwritten. Use a new workdir, or checkpoint.init_from=OLD_WORKDIR to start "
                         "from its params.")


def write_config(cfg: Config) -> None:
    path = os.path.join(cfg.workdir, "config.json")
    with open(path + ".tmp", "w") as f:
        json.dump(to_dict(cfg), f, indent=2)
    os.replace(path + ".tmp", path)


@dataclasses.dataclass
class Setup:
    """Everything `train` builds before the first step; also used by the benchmark."""
    cfg: Config
    sharder: Sharder
    graphdef: Any
    abstract_state: Any           # ShapeDtypeStructs with shardings
    init_state: Callable[[], Any]
    train_step: Callable          # jitted, donates the state
    eval_step: Callable
    batch_shardings: dict
    flops_per_step: float
    tokens_per_step: int


def build(cfg: Config, example_batch: dict) -> Setup:
    """Mesh, model, optimizer and the jitted steps; compiles nothing until first called."""
    mesh = make_mesh(cfg.mesh)
    sharder = Sharder(mesh, cfg.mesh.rules or Sharder().rules)
    model_cls = FAMILIES[cfg.model.family]
    make_model = lambda: finetune.adapt(model_cls(cfg.model, rngs=nnx.Rngs(cfg.seed), shard=sharder), cfg)
    abstract_model = nnx.eval_shape(make_model)
    graphdef, abstract_params = nnx.split(abstract_model)
    param_shardings = state_shardings(abstract_params, sharder).to_pure_dict()
    optimizer, schedule = make_optimizer(cfg.optim, cfg.train.steps)
    optimizer = finetune.freeze(optimizer, cfg)  # lora/prefix: state and updates for trainable params only

    def init_state():
        params = nnx.state(make_model()).to_pure_dict()
        params = jax.lax.with_sharding_constraint(params, param_shardings)
        return {"params": params, "opt_state": optimizer.init(params), "step": jnp.zeros((), jnp.int32)}

    # The optimizer state's shardings follow the params' through XLA's propagation; read them off the
    # compiled init so the train step, restore and init all agree.
    init = jax.jit(init_state).lower().compile()
    shardings = init.output_shardings
    abstract_state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                  jax.eval_shape(init_state), shardings)
    batch_shardings = batch_sharding(sharder, example_batch)
    train_step = jax.jit(make_train_step(graphdef, cfg, optimizer, schedule), donate_argnums=0,
                         in_shardings=(shardings, batch_shardings), out_shardings=(shardings, replicated(mesh)))
    eval_step = jax.jit(make_eval_step(graphdef, cfg), in_shardings=(shardings["params"], batch_shardings),
                        out_shardings=replicated(mesh))
    seq = example_batch["encoder_inputs" if cfg.model.family == "encoder_decoder" else "inputs"].shape[1]
    target = example_batch["targets"].shape[1] if cfg.model.family == "encoder_decoder" else 0
    flops = training_flops(cfg.model, seq, target)
    return Setup(cfg, sharder, graphdef, abstract_state, init, train_step, eval_step, batch_shardings,
                 flops.per_sequence * cfg.train.batch_size, cfg.train.batch_size * (seq + target))


def global_batch(setup: Setup, local: dict) -> dict:
    """Per-host numpy rows -> global arrays sharded over the batch axes."""
    return {k: jax.make_array_from_process_local_data(setup.batch_shardings[k], v) for k, v in local.items()}


# The loop -----------------------------------------------------------------------------------------

@dataclasses.dataclass
class Result:
    config: Config
    step: int
    loss: float
    eval_loss: float
    preempted: bool
    summary: dict


def evaluate(setup: Setup, params, eval_iter) -> dict:
    eval_iter.reset()
    totals = None
    for local in eval_iter:
        out = setup.eval_step(params, global_batch(setup, local))
        totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
    totals = jax.tree.map(float, totals)
    loss = totals["loss_sum"] / max(totals["weight"], 1.0)
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0)),
            "eval_accuracy": totals["correct"] / max(totals["weight"], 1.0)}


def train(cfg: Config) -> Result:
    cfg = cfg.validate()
    check_workdir(cfg)
    if cfg.checkpoint.init_from:
        finetune.init_from_plan(cfg)  # the other run exists and its params fit this model (adapters aside)
    os.makedirs(cfg.workdir, exist_ok=True)
    processes = jax.process_count()
    if cfg.train.batch_size % processes:
        raise ValueError(f"train.batch_size={cfg.train.batch_size} must divide evenly over {processes} hosts.")
    per_host = cfg.train.batch_size // processes

    tokenizer = get_tokenizer(cfg.data, cfg.workdir, cfg.model.vocab_size)
    train_iter = make_iterator(cfg.data, tokenizer, "train", batch_size=per_host, seed=cfg.seed)
    eval_iter = make_iterator(cfg.data, tokenizer, "validation", batch_size=per_host, seed=cfg.seed,
                              num_batches=cfg.train.eval_steps)
    if cfg.data.objective == "classification":
        finetune.check_labels(cfg, train_iter.table.labels)  # before anything compiles
    write_config(cfg)  # after the data is known good, so a failed start leaves no run behind
    first_batch_state = train_iter.state()
    setup = build(cfg, next(iter(train_iter)))
    train_iter.restore(first_batch_state)

    ckpt = Checkpointer(checkpoint_dir(cfg.workdir), cfg.checkpoint)
    start = ckpt.latest_step()
    summary_path = os.path.join(cfg.workdir, "summary.json")
    if start is not None and start >= cfg.train.steps and os.path.exists(summary_path):
        ckpt.close()
        with open(summary_path) as f:
            summary = json.load(f)
        print(f"{cfg.workdir} already finished {start} steps; raise train.steps to train further.", file=sys.stderr)
        return Result(cfg, start, summary["final_loss"], summary["final_eval_loss"], False, summary)
    if start is not None:
        state, data_state = ckpt.restore(start, setup.abstract_state)
        train_iter.restore(data_state)
        print(f"resumed from {checkpoint_dir(cfg.workdir)} at step {start}", file=sys.stderr)
    else:
        start = 0
        state = setup.init_state()
        if cfg.checkpoint.init_from:
            state["params"] = finetune.load_init_params(cfg, state["params"])
            print(f"initialised params from {cfg.checkpoint.init_from}", file=sys.stderr)

    preempted = []
    previous_handler = signal.signal(signal.SIGTERM, lambda *_: preempted.append(True))
    writer = MetricsWriter(cfg.workdir)
    peak, peak_source = peak_flops_per_device()
    devices = jax.devices()
    # A CPU "device" simulated by XLA shares the host's cores: the measured peak is per host.
    total_peak = peak * (processes if devices[0].platform == "cpu" else len(devices))
    counts = param_counts(cfg.model)
    progress = _progress(cfg, start)
    metrics, last_eval, t_last, step, started = {}, {}, time.perf_counter(), start, time.perf_counter()
    try:
        for step in range(start + 1, cfg.train.steps + 1):
            state, metrics = setup.train_step(state, global_batch(setup, next(train_iter)))
            if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                metrics = jax.tree.map(float, metrics)
                if not math.isfinite(metrics["loss"]):
                    ckpt.wait()
                    raise FloatingPointError(
                        f"loss is {metrics['loss']} at step {step}; stopped without saving. The last good checkpoint "
                        f"is step {ckpt.latest_step()} in {checkpoint_dir(cfg.workdir)}. Lower optim.learning_rate "
                        "or raise optim.warmup_steps, then rerun to resume from it.")
                now = time.perf_counter()
                dt = (now - t_last) / cfg.train.log_every
                t_last = now
                row = {"loss": metrics["loss"], "accuracy": metrics["accuracy"], "lr": metrics["lr"],
                       "grad_norm": metrics["grad_norm"], "step_time": dt,
                       "tokens_per_s": setup.tokens_per_step / dt, "mfu": setup.flops_per_step / dt / total_peak}
                writer.write(step, row)
                progress.update(step, row)
            if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step != cfg.train.steps:
                last_eval = evaluate(setup, state["params"], eval_iter)
                writer.write(step, last_eval)
                t_last = time.perf_counter()
            if step % cfg.checkpoint.every == 0 or step == cfg.train.steps or preempted:
                ckpt.save(step, state, train_iter.state(), to_dict(cfg))
            if preempted:
                break
        if not preempted and cfg.train.steps > start:
            last_eval = evaluate(setup, state["params"], eval_iter)
            writer.write(cfg.train.steps, last_eval)
    finally:
        progress.close()
        ckpt.close()
        writer.close()
        signal.signal(signal.SIGTERM, previous_handler)

    summary = {"step": step, "params": counts["total"], "non_embedding_params": counts["non_embedding"],
               "tokens": setup.tokens_per_step * step, "flops": setup.flops_per_step * step,
               "final_loss": metrics.get("loss", float("nan")), "final_eval_loss": last_eval.get("eval_loss", float("nan")),
               "wall_time_s": time.perf_counter() - started, "peak_flops_source": peak_source,
               "preempted": bool(preempted)}
    if preempted:
        print(f"SIGTERM: saved step {step} to {checkpoint_dir(cfg.workdir)}; rerun the same command to resume.",
              file=sys.stderr)
    elif jax.process_index() == 0:
        with open(summary_path + ".tmp", "w") as f:
            json.dump(summary, f, indent=2)
        os.replace(summary_path + ".tmp", summary_path)
    return Result(cfg, step, summary["final_loss"], summary["final_eval_loss"], bool(preempted), summary)


class _progress:
    """A tqdm bar with loss and tokens/s (stderr), or nothing."""

    def __init__(self, cfg: Config, start: int):
        self.bar = None
        if cfg.train.progress and jax.process_index() == 0:
            from tqdm import tqdm
            self.bar = tqdm(total=cfg.train.steps, initial=start, desc="train", dynamic_ncols=True)
        self.last = start

    def update(self, step: int, row: dict) -> None:
        if self.bar is not None:
            self.bar.update(step - self.last)
            self.bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}",
                                 mfu=f"{row['mfu']:.2f}")
        self.last = step

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# Experiment CLI -----------------------------------------------------------------------------------

def parse_args(config_fn: Callable[..., Config], argv: list[str]) -> Config:
    """`key=value` arguments: the experiment's own (its `config()` parameters, e.g. size=tiny), then
    dotted config overrides checked against the dataclass field types."""
    params = inspect.signature(config_fn).parameters
    kwargs, overrides = {}, []
    for arg in argv:
        if "=" not in arg:
            raise ValueError(f"argument {arg!r} is not key=value; e.g. train.steps=100.")
        key, value = arg.split("=", 1)
        if key in params:
            kwargs[key] = value
        else:
            overrides.append(arg)
    cfg = config_fn(**kwargs)
    known = list(flat_keys(cfg)) + list(params)
    for arg in overrides:
        key = arg.split("=", 1)[0]
        if key not in known:
            near = difflib.get_close_matches(key, known, n=5, cutoff=0.5)
            hint = f"did you mean: {', '.join(near)}?" if near else "run with --help to list the keys."
            raise ValueError(f"unknown config key {key!r}; {hint}")
    return apply_overrides(cfg, overrides)


def main(config_fn: Callable[..., Config], argv: Optional[list[str]] = None) -> Result:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        cfg = config_fn()
        print(f"usage: python -m {config_fn.__module__} [key=value ...]\n\nkeys (current values):")
        for key in flat_keys(cfg):
            value = cfg
            for part in key.split("."):
                value = getattr(value, part)
            print(f"  {key}={value}")
        sys.exit(0)
    try:
        cfg = parse_args(config_fn, argv)
        result = train(cfg)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except ConnectionError as e:
        print(f"error: {e}. This machine cannot reach the Hugging Face hub; use local data (data.source=stdlib or "
              "data.source=files data.paths=...), or size=tiny where the experiment has it.", file=sys.stderr)
        sys.exit(2)
    if result.preempted:
        sys.exit(PREEMPTED_EXIT_CODE)
    return result
