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
import socket
import sys
import time
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils

from t5like import distributed, storage
from t5like.accounting import param_counts, training_flops
from t5like.capabilities import plugins_for, with_inherited_settings
from t5like.checkpoint import Checkpointer, checkpoint_dir, latest_step, read_config
from t5like.config import Config, apply_overrides, flat_keys, flat_values, key_help, to_dict
from t5like.data import get_tokenizer, make_iterator
from t5like.metrics import MetricsWriter, peak_flops_per_device, read_metrics
from t5like.losses import bits_per_byte, loss_for, ratio_stderr
from t5like.models import sharded_init
from t5like.optim import make_optimizer, mean_metrics
from t5like.plugins import Plugin, Plugins, optimizer_state_shardings
from t5like.sharding import DEFAULT_RULES, Sharder, batch_sharding, make_mesh, replicated

# A preempted run exits with 128 + SIGTERM, after saving, so schedulers see it did not finish.
PREEMPTED_EXIT_CODE = 143


# The steps ----------------------------------------------------------------------------------------

# Dropout draws from a stream of its own: fold_in(key(seed), step) alone would equal the step-th key of
# nnx.Rngs(seed), which initialised the parameters.
DROPOUT_STREAM = 2 ** 31 - 1


def dropout_key(seed: int, step) -> jax.Array:
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), DROPOUT_STREAM), step)


def make_grad_fn(graphdef, cfg: Config, plugins: Optional[Plugins] = None) -> Callable:
    """(params, batch, rng) -> (gradient of the batch's token-mean objective, metrics).

    With grad_accum_steps > 1 the batch is split into microbatches, whose objective SUMS and target weights
    are summed; the total is divided by the total weight once. That is exactly the full batch's token mean,
    however the target tokens are spread over the microbatches.
    """
    plugins = plugins_for(cfg) if plugins is None else plugins
    loss = loss_for(cfg.data.objective, cfg)

    def objective_sum(params, batch, rng):
        return loss(nnx.merge(graphdef, params), batch, rng,
                    label_smoothing=cfg.optim.label_smoothing, z_loss=cfg.optim.z_loss)

    grad_sum = plugins.grad(objective_sum)  # when a plugin freezes params: the trainable ones' gradients only
    accum = cfg.optim.grad_accum_steps

    def grads_and_metrics(params, batch, rng):
        if accum == 1:
            grads, sums = grad_sum(params, batch, rng)
        else:
            # Microbatch i takes rows i, i+accum, ...: every microbatch stays spread over all devices.
            micro = jax.tree.map(lambda x: x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1), batch)

            def body(carry, xs):
                mb, i = xs
                r = None if rng is None else jax.random.fold_in(rng, i)
                return jax.tree.map(jnp.add, carry, grad_sum(params, mb, r)), None

            shapes = jax.eval_shape(grad_sum, params, jax.tree.map(lambda x: x[0], micro), rng)
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
            (grads, sums), _ = jax.lax.scan(body, zeros, (micro, jnp.arange(accum)))
        denom = jnp.maximum(sums["weight"], 1.0)
        return jax.tree.map(lambda g: g / denom, grads), mean_metrics(sums)

    return grads_and_metrics


def make_train_step(graphdef, cfg: Config, optimizer: optax.GradientTransformation, schedule, plugins: Plugins):
    grads_and_metrics = make_grad_fn(graphdef, cfg, plugins)
    use_dropout = cfg.model.dropout > 0 or plugins.uses_rng

    def train_step(state, batch):
        step = state["step"]
        rng = dropout_key(cfg.seed, step) if use_dropout else None
        grads, metrics = grads_and_metrics(state["params"], batch, rng)
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {**metrics, "grad_norm": optax.global_norm(grads), "lr": schedule(step)}
        return {"params": params, "opt_state": opt_state, "step": step + 1}, metrics

    return train_step


def make_eval_step(graphdef, cfg: Config):
    loss = loss_for(cfg.data.objective, cfg)

    def eval_step(params, batch):
        _, sums = loss(nnx.merge(graphdef, params), batch)
        return sums
    return eval_step


# Set-up -------------------------------------------------------------------------------------------

HORIZON_SCHEDULES = ("cosine", "linear", "wsd")  # their shape is built from train.steps


def _resume_key(cfg: Config) -> dict:
    """Fields that must match for a workdir's checkpoints to be resumable by this config. train.steps is
    part of it when the schedule's horizon is built from it, so a resumed run follows the curve it started
    on; an explicit change of learning-rate settings on resume (e.g. a lower peak after a spike) is allowed."""
    o = cfg.optim
    key = {"model": to_dict(cfg.model), "optim.name": o.name, "optim.state_dtype": o.state_dtype,
           "optim.grad_clip": "on" if o.grad_clip > 0 else "off",  # on/off changes the optimizer state's tree
           # as does Adafactor's weight decay, a transformation of its own (AdamW's is always there)
           **({"optim.weight_decay": "on" if o.weight_decay else "off"} if o.name == "adafactor" else {}),
           "train.batch_size": cfg.train.batch_size, "seed": cfg.seed, "finetune": to_dict(cfg.finetune),
           **{f"data.{k}": v for k, v in to_dict(cfg.data).items()
              if k in ("source", "paths", "format", "text_field", "hub_name", "objective",
                       "seq_len", "target_len", "max_files", "validation_fraction", "mixture")}}
    if o.schedule in HORIZON_SCHEDULES:
        key["train.steps"] = cfg.train.steps
    return key


def check_workdir(cfg: Config) -> None:
    """A workdir whose checkpoints were trained with another config is refused before anything is touched.
    Only checkpoints bind a workdir: a config.json without one (a start that failed) is overwritten."""
    if latest_step(cfg.workdir) is None or not storage.exists(storage.join(cfg.workdir, "config.json")):
        return
    old, new = _resume_key(read_config(cfg.workdir)), _resume_key(cfg)
    diffs = []
    for key in sorted(set(old) | set(new)):
        if isinstance(new.get(key), dict):
            diffs += [f"{key}.{k}: {old[key].get(k)!r} -> {v!r}" for k, v in new[key].items() if old[key].get(k) != v]
        elif json.loads(json.dumps(old.get(key))) != json.loads(json.dumps(new.get(key))):
            diffs.append(f"{key}: {old.get(key)!r} -> {new.get(key)!r}")
    if diffs:
        hint = ""
        if any(d.startswith("train.steps") for d in diffs):
            hint = (f" optim.schedule={cfg.optim.schedule!r} is built over train.steps, so changing it would bend "
                    "the learning-rate curve of a run that is under way.")
        raise ValueError(f"workdir={cfg.workdir!r} holds checkpoints trained with an incompatible config "
                         f"({'; '.join(diffs)}).{hint} Nothing was overwritten. Rerun with the old values to resume, "
                         "or use a new workdir (checkpoint.init_from=OLD_WORKDIR starts from its params).")


def write_config(cfg: Config) -> None:
    if jax.process_index() == 0:
        storage.write_atomic(storage.join(cfg.workdir, "config.json"), json.dumps(to_dict(cfg), indent=2))


class WorkdirLock:
    """One trainer per workdir. An flock on WORKDIR/.lock, held by process 0 for the whole run; the kernel
    drops it when the process dies, so a killed run never blocks the next one. Cloud Storage has no locks:
    there, one trainer per gs:// workdir is the launcher's job (launch.tpu names each run)."""

    def __init__(self, workdir: str):
        self.file = None
        if storage.is_remote(workdir) or jax.process_index() != 0:
            return
        import fcntl
        storage.makedirs(workdir)
        path = storage.join(workdir, ".lock")
        self.file = open(path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            self.file.close()
            self.file = None
            raise ValueError(f"workdir={workdir!r} is in use by another trainer ({holder}); wait for it to finish, "
                             "stop it, or use another workdir.") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"pid {os.getpid()} on {socket.gethostname()}")
        self.file.flush()

    def release(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


@dataclasses.dataclass
class Setup:
    """Everything `train` builds before the first step; also used by benchmarks and the AOT compile."""
    cfg: Config
    plugins: Plugins
    sharder: Sharder
    graphdef: Any
    abstract_state: Any           # ShapeDtypeStructs with shardings
    init_state: Callable[[], Any]
    train_step: Callable          # jitted, donates the state
    eval_step: Callable
    batch_shardings: dict
    abstract_batch: dict          # the global batch's ShapeDtypeStructs, with shardings
    flops_per_step: float
    tokens_per_step: int


def build(cfg: Config, example_batch: dict, devices=None, plugins: Optional[Plugins] = None) -> Setup:
    """Mesh, sharded model and optimizer state, and the jitted steps; compiles nothing until first called.
    `example_batch` is one host's batch (its rows are this host's share); `devices` defaults to all;
    `plugins` to the config's own (t5like.capabilities.plugins_for)."""
    plugins = plugins_for(cfg) if plugins is None else plugins
    mesh = make_mesh(cfg.mesh, devices)
    sharder = Sharder(mesh, cfg.mesh.rules or DEFAULT_RULES)
    graphdef, abstract_params, param_shardings, init_params = sharded_init(cfg.model, sharder, seed=cfg.seed,
                                                                           adapt=plugins.adapt)
    abstract_params = abstract_params.to_pure_dict()
    optimizer, schedule = make_optimizer(cfg.optim, cfg.train.steps, plugins.lr_multiplier)
    optimizer = plugins.optimizer(optimizer)
    repl = replicated(mesh)
    opt_shapes = jax.eval_shape(optimizer.init, abstract_params)
    opt_shardings = optimizer_state_shardings(opt_shapes, param_shardings, abstract_params, repl)
    shardings = {"params": param_shardings, "opt_state": opt_shardings, "step": repl}
    init_opt = jax.jit(optimizer.init, out_shardings=opt_shardings)

    def init_state():
        params = init_params()
        return {"params": params, "opt_state": init_opt(params), "step": jax.device_put(jnp.zeros((), jnp.int32), repl)}

    abstract = {"params": abstract_params, "opt_state": opt_shapes, "step": jax.ShapeDtypeStruct((), jnp.int32)}
    abstract_state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)
    hosts = jax.process_count() if devices is None else len({d.process_index for d in devices})
    global_example = {k: np.zeros((np.shape(v)[0] * hosts, *np.shape(v)[1:]), np.asarray(v).dtype)
                      for k, v in example_batch.items()}
    batch_shardings = batch_sharding(sharder, global_example)
    abstract_batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_shardings[k])
                      for k, v in global_example.items()}
    train_step = jax.jit(make_train_step(graphdef, cfg, optimizer, schedule, plugins), donate_argnums=0,
                         in_shardings=(shardings, batch_shardings), out_shardings=(shardings, repl))
    eval_step = jax.jit(make_eval_step(graphdef, cfg), in_shardings=(shardings["params"], batch_shardings),
                        out_shardings=repl)
    seq = example_batch["encoder_inputs" if cfg.model.family == "encoder_decoder" else "inputs"].shape[1]
    target = example_batch["targets"].shape[1] if cfg.model.family == "encoder_decoder" else 0
    flops = training_flops(cfg.model, seq, target)
    return Setup(cfg, plugins, sharder, graphdef, abstract_state, init_state, train_step, eval_step, batch_shardings,
                 abstract_batch, flops.per_sequence * cfg.train.batch_size, cfg.train.batch_size * (seq + target))


def check_state_fits(setup: Setup) -> None:
    """A clear error, before anything is allocated or compiled, when the parameters and optimizer state alone
    exceed memory: per device on accelerators (their reported limit), per host on CPU (physical memory)."""
    def per_device_bytes(x):
        return math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
    need = max(sum(per_device_bytes(x) for x in jax.tree.leaves(setup.abstract_state)), 1)
    device = jax.local_devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and stats.get("bytes_limit"):
        have, where = stats["bytes_limit"], f"each {device.device_kind}"
    elif device.platform == "cpu":
        need *= jax.local_device_count()  # simulated CPU devices share the host's memory
        have, where = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this host"
    else:
        return
    if need > have:
        raise ValueError(f"the parameters and optimizer state need {need / 2**30:.1f} GiB on {where}, which has "
                         f"{have / 2**30:.1f} GiB. Reduce the model (model.d_model, model.num_layers, model.vocab_size), "
                         "store params in bfloat16 (model.param_dtype=bfloat16), or shard them over more devices "
                         "(mesh.fsdp=-1).")


def global_batch(setup: Setup, local: dict) -> dict:
    """Per-host numpy rows -> global arrays sharded over the batch axes."""
    return {k: jax.make_array_from_process_local_data(setup.batch_shardings[k], v) for k, v in local.items()}


# The loop -----------------------------------------------------------------------------------------

def _held_out(batches: Optional[int]) -> str:
    return "the held-out batches" if not batches else f"{batches} held-out batch" + ("es" if batches > 1 else "")


@dataclasses.dataclass
class Result:
    config: Config
    step: int
    loss: float                   # the last logged training batch's loss
    eval_loss: float              # over the held-out batches of the last eval
    preempted: bool
    summary: dict

    def closing_line(self) -> str:
        """What the two losses are: one training batch's, and the held-out set's."""
        held_out = _held_out(self.summary.get("eval_batches"))
        return (f"last train batch loss {self.loss:.3f} (step {self.step}); eval loss {self.eval_loss:.3f} over "
                f"{held_out} (workdir {self.config.workdir})")


class NonFiniteLoss(Exception):
    """The loss or gradient became NaN/inf; nothing was saved for that step."""


def evaluate(setup: Setup, params, eval_iter) -> dict:
    eval_iter.reset()
    totals, batches = None, 0
    for local in eval_iter:
        out = setup.eval_step(params, global_batch(setup, local))
        totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
        batches += 1
    totals = jax.tree.map(float, totals)
    loss = totals["loss_sum"] / max(totals["weight"], 1.0)
    out = {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0)),
           "eval_accuracy": totals["correct_sum"] / max(totals["weight"], 1.0), "eval_batches": batches}
    out["eval_loss_stderr"] = ratio_stderr(totals, "weight")  # over eval sequences
    if "byte_sum" in totals:  # the objectives where bits-per-byte is defined (t5like/losses.py)
        out["eval_bpb"] = bits_per_byte(totals["loss_sum"], totals["byte_sum"])
        stderr = ratio_stderr(totals, "byte")
        out["eval_bpb_stderr"] = None if stderr is None else stderr / math.log(2)
    for k, v in mean_metrics(totals).items():  # a loss's own sums (DPO's rewards) as means
        if k not in ("loss", "accuracy", "weight"):
            out[f"eval_{k}"] = float(v)
    return out


class Preemption:
    """Has a SIGTERM asked this run to stop? One process: a signal handler. Several: JAX's preemption sync
    point, which JAX's distributed runtime arms for SIGTERM; a notice reaching any host makes every host
    return True at the same step, so all of them save that step together."""

    def __init__(self):
        self.multihost = jax.process_count() > 1
        self.flag: list = []
        self.previous = None if self.multihost else signal.signal(signal.SIGTERM, lambda *_: self.flag.append(1))

    def reached(self, step: int) -> bool:
        if self.multihost:
            return multihost_utils.reached_preemption_sync_point(step)
        return bool(self.flag)

    def close(self) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


def _data_position(saved: list[dict], cfg: Config, step: int) -> dict:
    """This host's iterator position from the positions every host of the saving run wrote."""
    hosts = jax.process_count()
    if len(saved) == hosts:
        return saved[jax.process_index()]
    if cfg.data.host_count_invariant:
        # Local sources (a mixture's too) walk one global order, and every host saved the same position (see
        # make_iterator), including the GLOBAL batch size: it holds for any host count.
        return saved[0]
    raise ValueError(f"checkpoint step {step} was saved by {len(saved)} hosts, and this run has {hosts}. A "
                     "data.source='hub' stream (alone or in data.mixture) is split between hosts, so its position "
                     "cannot be carried over: "
                     f"resume with {len(saved)} hosts, or start a new workdir with checkpoint.init_from.")


def train(cfg: Config, plugins: Sequence[Plugin] = ()) -> Result:
    """Train (or resume) `cfg`'s run. `plugins` are added after the config's own (t5like/plugins.py)."""
    cfg = cfg.validate()
    make_mesh(cfg.mesh)  # a mesh the devices cannot fill fails here, not after the tokenizer and data are built
    storage.check_workdir(cfg.workdir)
    lock = WorkdirLock(cfg.workdir)
    try:
        return _train(cfg, plugins_for(cfg, plugins))
    finally:
        lock.release()


def _train(cfg: Config, plugins: Plugins) -> Result:
    check_workdir(cfg)
    plugins.check_start(resuming=latest_step(cfg.workdir) is not None)
    processes = jax.process_count()
    if cfg.train.batch_size % processes:
        raise ValueError(f"train.batch_size={cfg.train.batch_size} must divide evenly over {processes} hosts.")
    per_host = cfg.train.batch_size // processes
    storage.makedirs(cfg.workdir)

    tokenizer = get_tokenizer(cfg.data, cfg.workdir, cfg.model.vocab_size)
    train_iter = make_iterator(cfg.data, tokenizer, "train", batch_size=per_host, seed=cfg.seed)
    eval_iter = make_iterator(cfg.data, tokenizer, "validation", batch_size=per_host, seed=cfg.seed,
                              num_batches=cfg.train.eval_steps)
    plugins.check_data(train_iter)  # before anything compiles
    first_batch_state = train_iter.state()
    setup = build(cfg, next(iter(train_iter)), plugins=plugins)
    train_iter.restore(first_batch_state)
    check_state_fits(setup)

    ckpt = Checkpointer(checkpoint_dir(cfg.workdir), cfg.checkpoint)
    try:
        with plugins.phase("restore", 0):
            start, state, saved_positions = ckpt.restore_latest_readable(setup.abstract_state)
    except ValueError as e:  # UnreadableCheckpoint, CheckpointMismatch: before any step, nothing moved
        ckpt.close()
        raise ValueError(str(e)) from None
    summary_path = storage.join(cfg.workdir, "summary.json")
    if start is not None and start > cfg.train.steps:
        ckpt.close()
        raise ValueError(f"train.steps={cfg.train.steps} is below the step of the latest checkpoint ({start}) in "
                         f"{checkpoint_dir(cfg.workdir)}; a run cannot be shortened. Rerun with train.steps={start} "
                         "(or more, where the schedule allows), or use a new workdir.")
    if start == cfg.train.steps and storage.exists(summary_path):
        summary = json.loads(storage.read_text(summary_path))
        if summary.get("step") == start:
            ckpt.close()
            more = ("raise train.steps to train further" if cfg.optim.schedule not in HORIZON_SCHEDULES else
                    f"its {cfg.optim.schedule} schedule has ended; to train further, start a new workdir with "
                    f"checkpoint.init_from={cfg.workdir}")
            print(f"{cfg.workdir} already finished {start} steps; {more}.", file=sys.stderr)
            return Result(cfg, start, summary["final_loss"], summary["final_eval_loss"], False, summary)
    if start is not None:
        train_iter.restore(_data_position(saved_positions, cfg, start))
        print(f"resumed from {checkpoint_dir(cfg.workdir)} at step {start}", file=sys.stderr)
    else:
        start = 0
        try:
            state = setup.init_state()
        except jax.errors.JaxRuntimeError as e:
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            ckpt.close()
            raise ValueError(f"the model and optimizer state do not fit in device memory ({str(e).splitlines()[0]}). "
                             "Reduce model size (d_model, num_layers, vocab_size), use param_dtype=bfloat16, or "
                             "shard more (mesh.fsdp=-1).") from None
        state["params"] = plugins.init_params(state["params"])

    preemption = Preemption()
    writer = MetricsWriter(cfg.workdir, resume_step=start or None)
    peak, peak_source = peak_flops_per_device(dtype=cfg.model.dtype, given=cfg.train.peak_flops)
    if peak is None:
        print(f"warning: MFU unknown: {peak_source}; training continues, mfu is null in metrics.", file=sys.stderr)
    devices = jax.devices()
    # A CPU "device" simulated by XLA shares the host's cores: the measured peak is per host.
    total_peak = None if peak is None else peak * (processes if devices[0].platform == "cpu" else len(devices))
    counts = param_counts(cfg.model)
    progress = _progress(cfg, start)
    metrics, last_eval, t_last, step, started = {}, {}, time.perf_counter(), start, time.perf_counter()
    preempted = False

    def read(step: int, device_metrics: dict, log: bool) -> None:
        """Bring a step's metrics to the host (they are replicated: every host sees the same values), stop on
        a non-finite loss or gradient, and log them."""
        nonlocal metrics, t_last
        metrics = jax.tree.map(float, device_metrics)
        if not (math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])):
            ckpt.wait()
            good = ckpt.latest_step()
            where = (f"The last good checkpoint is step {good} in {checkpoint_dir(cfg.workdir)}: lower "
                     "optim.learning_rate, raise optim.warmup_steps or set optim.grad_clip, then rerun to "
                     "resume from it." if good is not None else
                     "No checkpoint was saved yet: lower optim.learning_rate, raise optim.warmup_steps or "
                     "set optim.grad_clip, and rerun.")
            raise NonFiniteLoss(f"loss={metrics['loss']}, grad_norm={metrics['grad_norm']} at step {step}; "
                                f"stopped without saving it. {where}")
        if log:
            now = time.perf_counter()
            dt = (now - t_last) / cfg.train.log_every
            t_last = now
            row = {"loss": metrics["loss"], "accuracy": metrics["accuracy"], "lr": metrics["lr"],
                   "grad_norm": metrics["grad_norm"], "step_time": dt, "tokens_per_s": setup.tokens_per_step / dt,
                   "mfu": None if total_peak is None else setup.flops_per_step / dt / total_peak,
                   **{k: v for k, v in metrics.items() if k not in ("loss", "accuracy", "lr", "grad_norm", "weight")}}
            writer.write(step, row)
            progress.update(step, row)
            plugins.on_log(step, row)

    # A logged step's metrics are read one step late, once the next step is dispatched, so the host never
    # waits for the device between steps (1.05x a gpt2-bench step on CPU, docs/profile.md). A step
    # that saves is read at once: a non-finite state is never checkpointed.
    pending = None
    try:
        with plugins.phase("compile", start + 1):  # jit caches what this compiles
            setup.train_step.lower(setup.abstract_state, setup.abstract_batch).compile()
            setup.eval_step.lower(setup.abstract_state["params"], setup.abstract_batch).compile()
            distributed.barrier("steps compiled")
        for step in range(start + 1, cfg.train.steps + 1):
            with plugins.phase("data", step):
                local = next(train_iter)
            with plugins.phase("step", step):
                state, step_metrics = setup.train_step(state, global_batch(setup, local))
                if pending is not None:
                    read(*pending, log=True)
                    pending = None
                preempted = preemption.reached(step)
                save = (step % cfg.checkpoint.every == 0 or step == cfg.train.steps or preempted
                        or step in cfg.checkpoint.keep_steps)
                log = step % cfg.train.log_every == 0 or step == cfg.train.steps
                if save:
                    read(step, step_metrics, log)
                elif log:
                    pending = (step, step_metrics)
            if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step != cfg.train.steps:
                if pending is not None:  # keep rows in step order: this step's training row first
                    read(*pending, log=True)
                    pending = None
                with plugins.phase("eval", step):
                    last_eval = {**evaluate(setup, state["params"], eval_iter),
                                 **plugins.on_eval(step, state["params"])}
                writer.write(step, last_eval)
                progress.eval(step, last_eval)
                plugins.on_eval_row(step, last_eval)
                t_last = time.perf_counter()
            if save:
                with plugins.phase("save", step):
                    write_config(cfg)  # describes the checkpoints from now on
                    writer.flush()
                    ckpt.save(step, state, train_iter.state(), to_dict(cfg))
                plugins.on_save(step)
            if preempted:
                break
        if not preempted:
            with plugins.phase("eval", cfg.train.steps):
                last_eval = {**evaluate(setup, state["params"], eval_iter),
                             **plugins.on_eval(cfg.train.steps, state["params"])}
            writer.write(cfg.train.steps, last_eval)
            progress.eval(cfg.train.steps, last_eval)
            plugins.on_eval_row(cfg.train.steps, last_eval)
    finally:
        progress.close()
        with plugins.phase("save", step):  # close waits for the last checkpoint to be written
            ckpt.close()
        writer.close()
        preemption.close()

    final_loss = metrics.get("loss")
    if final_loss is None:  # resumed at the last step: the loss it logged before it stopped
        final_loss = next((r["loss"] for r in reversed(read_metrics(cfg.workdir)) if "loss" in r), float("nan"))
    summary = {"step": step, "params": counts["total"], "non_embedding_params": counts["non_embedding"],
               "tokens": setup.tokens_per_step * step, "flops": setup.flops_per_step * step,
               "final_loss": final_loss, "final_eval_loss": last_eval.get("eval_loss", float("nan")),
               "eval_batches": last_eval.get("eval_batches"),
               **{f"final_{k}": last_eval[k] for k in ("eval_bpb", "eval_loss_stderr", "eval_bpb_stderr")
                  if k in last_eval},
               "wall_time_s": time.perf_counter() - started, "peak_flops_source": peak_source,
               "preempted": preempted, **plugins.summary(setup.abstract_state["params"])}
    plugins.on_finish(summary)
    if preempted:
        print(f"SIGTERM: saved step {step} to {checkpoint_dir(cfg.workdir)}; rerun the same command to resume.",
              file=sys.stderr)
    elif jax.process_index() == 0:
        storage.write_atomic(summary_path, json.dumps(summary, indent=2))
    return Result(cfg, step, summary["final_loss"], summary["final_eval_loss"], preempted, summary)


class _progress:
    """A tqdm bar with loss, the last eval loss and tokens/s (stderr), or nothing; and a line per eval."""

    def __init__(self, cfg: Config, start: int):
        self.bar = None
        if cfg.train.progress and jax.process_index() == 0:
            from tqdm import tqdm
            self.bar = tqdm(total=cfg.train.steps, initial=start, desc="train", dynamic_ncols=True)
        self.last = start
        self.eval_loss = None

    def update(self, step: int, row: dict) -> None:
        if self.bar is not None:
            self.bar.update(step - self.last)
            mfu = "?" if row["mfu"] is None else f"{row['mfu']:.2f}"
            evals = {} if self.eval_loss is None else {"eval_loss": f"{self.eval_loss:.3f}"}
            self.bar.set_postfix(loss=f"{row['loss']:.3f}", **evals, tok_s=f"{row['tokens_per_s']:.0f}", mfu=mfu)
        self.last = step

    def eval(self, step: int, row: dict) -> None:
        """A line on stderr (above the bar, which shows it from now on): metrics.jsonl is not the only place."""
        self.eval_loss = row["eval_loss"]
        line = (f"step {step}: eval loss {row['eval_loss']:.3f} over {_held_out(row['eval_batches'])} "
                f"(accuracy {row['eval_accuracy']:.3f})")
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        elif jax.process_index() == 0:
            print(line, file=sys.stderr)

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
    cfg = apply_overrides(cfg, overrides)
    # Settings a capability takes from elsewhere (e.g. init_from's model and tokenizer), but not these keys.
    return with_inherited_settings(cfg, {arg.split("=", 1)[0].strip() for arg in overrides})


def _module_name(config_fn: Callable) -> str:
    """The experiment's importable name, also when it runs as `python -m experiments.X` (then __main__)."""
    name = config_fn.__module__
    if name == "__main__":
        spec = getattr(sys.modules["__main__"], "__spec__", None)
        name = spec.name if spec is not None else "experiments.NAME"
    return name


def _print_keys(config_fn: Callable[..., Config], argv: list[str]) -> None:
    """--help: the experiment's own arguments, then every config key with its value (for the experiment
    arguments given, e.g. size=tiny) and a line on what it does."""
    import typing
    params = inspect.signature(config_fn).parameters
    print(f"\nexperiment arguments ({_module_name(config_fn)}.config's parameters):" if params else
          "\nexperiment arguments: none")
    for name, p in params.items():
        choices = typing.get_args(p.annotation) if typing.get_origin(p.annotation) is typing.Literal else ()
        required = p.default is inspect.Parameter.empty
        item = f"{name}={'' if required else p.default}"
        print(f"  {item:<40} {'required' if required else 'the default'}"
              + (f"; one of {' | '.join(map(str, choices))}" if choices else ""))
    given = dict(a.split("=", 1) for a in argv if "=" in a and a.split("=", 1)[0] in params)
    cfg = config_fn(**given)
    print(f"\nkeys, each settable as key=value (values for "
          f"{' '.join(f'{k}={v}' for k, v in given.items()) or 'the default arguments'}):")
    values = flat_values(cfg)
    for key, text in key_help(cfg).items():
        print(f"  {f'{key}={values[key]}':<40} {text}")


def main(config_fn: Callable[..., Config], argv: Optional[list[str]] = None) -> Result:
    """An experiment's command line: `python -m experiments.X [key=value ...] [multi-host flags]`."""
    import argparse
    argv = sys.argv[1:] if argv is None else argv
    module = _module_name(config_fn)
    parser = argparse.ArgumentParser(prog=f"python -m {module}", add_help=False,
                                     usage=f"python -m {module} [key=value ...] [--coordinator HOST:PORT "
                                           "--num-processes N --process-id I]")
    parser.add_argument("-h", "--help", action="store_true")
    distributed.add_flags(parser)
    args, rest = parser.parse_known_args(argv)
    if args.help:
        parser.print_help()
        _print_keys(config_fn, rest)
        sys.exit(0)
    try:
        bad = [a for a in rest if a.startswith("-")]
        if bad:
            raise ValueError(f"unknown flag {bad[0]!r}; flags are --coordinator, --num-processes, --process-id and "
                             "--coordinator-timeout, and config keys are given as key=value (see --help).")
        cluster = distributed.from_args(args)
        cfg = parse_args(config_fn, rest)  # a bad key fails before any host waits for another
        distributed.initialize(cluster)
        result = train(cfg)
    except (ValueError, FileNotFoundError, NonFiniteLoss) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except ConnectionError as e:
        if "coordinator" in str(e):
            print(f"error: {e}", file=sys.stderr)
        else:
            print(f"error: {e}. This machine cannot reach the Hugging Face hub; use local data (data.source=stdlib "
                  "or data.source=files data.paths=...), or size=tiny where the experiment has it.", file=sys.stderr)
        sys.exit(2)
    if result.preempted:
        sys.exit(PREEMPTED_EXIT_CODE)
    return result
