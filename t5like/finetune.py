"""Parameter-efficient fine-tuning: LoRA (Hu et al. 2021) and prefix tuning (Li & Liang 2021).

    model = adapt(MODEL_CLASSES[family](cfg.model, rngs=...), cfg)   # attach adapters (nothing for method=full)
    merge(model)                                                # fold adapters into the base (export, decoding)

The trainer reaches this module only through two plugins of its seam (t5like/plugins.py): `FineTuning`
(adapters, which params train, a classification head's labels) and `InitFrom` (checkpoint.init_from).

Adapters are ordinary parameters of the model (plain NNX trees with logical axis names), so they are
created sharded, checkpointed and restored like every other parameter:
  LoRA     `<kernel>_lora` modules (layers.LoRA) beside the adapted kernels of every stack's layers;
           the projections add scale * dropout(x) A B (layers.adapted). B starts at zero.
  prefix   `prefix` on every Stack: keys/values [layers, P, K, H] that every self-attention query sees,
           learned directly or through Li & Liang's MLP reparametrisation (which `merge` drops).
The base is frozen by the seam's one freezing path (Plugins.optimizer and Plugins.grad): frozen params get
no optimizer state, and only the trainable leaves are differentiated.
"""
from __future__ import annotations

import dataclasses
import sys

import jax
import jax.numpy as jnp
from flax import nnx
from flax import traverse_util

from t5like import layers as L, storage
from t5like.checkpoint import latest_step_or_raise, load_params, read_config
from t5like.config import LORA_TARGETS, Config, ModelConfig
from t5like.losses import task_logits  # noqa: F401  (the classification forward, part of the fine-tuning API)
from t5like.models import Stack, abstract_model, stacked
from t5like.plugins import Plugin

# target name -> (attention or MLP modules of a Block, the kernel it adapts)
TARGET_KERNELS = {"q": ("attention", "query"), "k": ("attention", "key"), "v": ("attention", "value"),
                  "o": ("attention", "out"), "mlp_in": ("mlp", "wi"), "mlp_gate": ("mlp", "wi_gate"),
                  "mlp_out": ("mlp", "wo")}
assert tuple(TARGET_KERNELS) == LORA_TARGETS
ADAPTER_SEED_OFFSET = 0x5EED  # adapters draw from their own stream: the base init is the same as without them
HEAD_MODULES = ("pooler", "classifier")  # a classification head is new at fine-tuning time, so it trains


def _stacks(model) -> list[Stack]:
    return [getattr(model, n) for n in ("encoder", "decoder") if isinstance(getattr(model, n, None), Stack)]


def _kernel_shapes(kernel: str, shape: tuple[int, ...], names: tuple) -> tuple:
    """(in_shape, out_shape, in_names, out_names) of a stacked kernel [layers, ...]."""
    shape, names = shape[1:], names[1:]
    n_in = 2 if kernel == "out" else 1  # out: [N, H, D]; every other kernel contracts one dim
    return shape[:n_in], shape[n_in:], names[:n_in], names[n_in:]


class Prefix(nnx.Module):
    """Key/value prefixes of one stack: P positions for each of its layers.

    Direct: the prefixes are parameters. With `prefix_mlp` (Li & Liang's reparametrisation, which they
    found steadier to train): prefixes = MLP(E) for a learned E [P, D]; the MLP is only a training device,
    and `merge` replaces it by the prefixes it produces."""

    def __init__(self, cfg: ModelConfig, num_layers: int, length: int, mlp_hidden: int, *, rngs: nnx.Rngs):
        K, H, D = cfg.kv_heads, cfg.dim_per_head, cfg.d_model
        pd = L.dtype_of(cfg.param_dtype)
        self.mlp = mlp_hidden > 0
        if self.mlp:
            self.embedding = L.param(rngs, (length, D), (None, "embed"), pd, 1.0)
            self.w1 = L.param(rngs, (D, mlp_hidden), ("embed", "mlp"), pd, D ** -0.5)
            self.b1 = L.param(rngs, (mlp_hidden,), ("mlp",), pd, init="zeros")
            self.w2 = L.param(rngs, (mlp_hidden, num_layers, 2, K, H), ("mlp", "layers", None, "kv_heads", "head_dim"),
                              pd, mlp_hidden ** -0.5)
        else:
            # Keys and values of a unit-RMS input through a fan-in projection are about N(0, 1).
            self.key = L.param(rngs, (num_layers, length, K, H), ("layers", None, "kv_heads", "head_dim"), pd)
            self.value = L.param(rngs, (num_layers, length, K, H), ("layers", None, "kv_heads", "head_dim"), pd)

    def __call__(self) -> tuple[jax.Array, jax.Array]:
        """(keys, values), each [layers, P, K, H]."""
        if not self.mlp:
            return self.key[...], self.value[...]
        h_PF = jnp.tanh(self.embedding[...] @ self.w1[...] + self.b1[...])
        kv_PLTKH = jnp.einsum("pf,fltkh->pltkh", h_PF, self.w2[...])
        kv_LTPKH = kv_PLTKH.transpose(1, 2, 0, 3, 4)
        return kv_LTPKH[:, 0], kv_LTPKH[:, 1]


def adapt(model, cfg: Config, seed: int = None):
    """Attach `cfg.finetune`'s adapters to `model` (in place) and return it; method=full changes nothing."""
    ft = cfg.finetune.validate()
    if ft.method == "full":
        return model
    check_train_modules(nnx.state(model).to_pure_dict(), cfg)
    rngs = nnx.Rngs((cfg.seed if seed is None else seed) + ADAPTER_SEED_OFFSET)
    if ft.method == "prefix":
        for stack in _stacks(model):
            stack.prefix = nnx.data(Prefix(cfg.model, stack.num_layers, ft.prefix_length,
                                           ft.prefix_mlp_hidden if ft.prefix_mlp else 0, rngs=rngs))
        return model
    for target in ft.lora_targets:
        found = 0
        for stack in _stacks(model):
            kind, kernel = TARGET_KERNELS[target]
            modules = [stack.layers.mlp] if kind == "mlp" else [stack.layers.attn] + (
                [stack.layers.cross_attn] if stack.layers.cross else [])
            for module in modules:
                if getattr(module, kernel, None) is None:
                    continue
                var = getattr(module, kernel)
                in_shape, out_shape, in_names, out_names = _kernel_shapes(
                    kernel, var.shape, tuple(var.get_metadata()["logical_axes"]))
                lora = stacked(lambda r: L.LoRA(in_shape, out_shape, in_names, out_names, ft.lora_rank,
                                                ft.lora_alpha / ft.lora_rank, ft.lora_dropout,
                                                cfg.model.param_dtype, rngs=r), stack.num_layers, rngs)
                setattr(module, f"{kernel}_lora", lora)
                found += 1
        if not found:
            have = [t for t, (kind, k) in TARGET_KERNELS.items()
                    if any(getattr(s.layers.mlp if kind == "mlp" else s.layers.attn, k, None) is not None
                           for s in _stacks(model))]
            raise ValueError(f"finetune.lora_targets entry {target!r} names no module of this model "
                             f"(model.activation={cfg.model.activation!r}); valid targets here are {have}.")
    return model


# Which parameters train ----------------------------------------------------------------------------

def is_adapter(path: tuple) -> bool:
    return any(str(p).endswith("_lora") or str(p) == "prefix" for p in path)


def is_trainable(path: tuple, cfg: Config) -> bool:
    """Under lora/prefix: adapters, `train_modules`, and a classification head; under full: everything."""
    if cfg.finetune.method == "full":
        return True
    head = HEAD_MODULES if cfg.data.objective == "classification" else ()
    return is_adapter(path) or str(path[0]) in cfg.finetune.train_modules + head


def check_train_modules(params, cfg: Config) -> None:
    """Each `finetune.train_modules` entry names a top-level module of the model."""
    tops = sorted({str(p[0]) for p in traverse_util.flatten_dict(params, keep_empty_nodes=False)})
    for name in cfg.finetune.train_modules:
        if name not in tops:
            raise ValueError(f"finetune.train_modules entry {name!r} names no top-level module of this model; "
                             f"its modules are {tops}.")


def base_params(params) -> dict:
    """The params without adapters (a nested dict), e.g. to check the base stayed frozen."""
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({k: v for k, v in flat.items() if not is_adapter(k)})


# Merge ---------------------------------------------------------------------------------------------

def merge(model):
    """Fold LoRA adapters into their kernels (W += scale * A B, per layer) and replace MLP-reparametrised
    prefixes by the prefixes they produce; in place, returns the model. A LoRA-merged model has the base
    model's parameter tree, so it exports and decodes as an un-adapted one."""
    for stack in _stacks(model):
        for module in (stack.layers.attn, getattr(stack.layers, "cross_attn", None), stack.layers.mlp):
            if module is None:
                continue
            for kernel in ("query", "key", "value", "out", "wi", "wi_gate", "wo"):
                lora = getattr(module, f"{kernel}_lora", None)
                if lora is None:
                    continue
                var = getattr(module, kernel)
                delta = jax.vmap(lambda a, b: lora.scale * jnp.tensordot(a, b, axes=1))(lora.a[...], lora.b[...])
                var[...] = (var[...].astype(jnp.float32) + delta.astype(jnp.float32)).astype(var.dtype)
                delattr(module, f"{kernel}_lora")
        if stack.prefix is not None and stack.prefix.mlp:
            prefix, names = stack.prefix, ("layers", None, "kv_heads", "head_dim")
            k, v = prefix()
            prefix.key, prefix.value = nnx.Param(k, logical_axes=names), nnx.Param(v, logical_axes=names)
            for name in ("embedding", "w1", "b1", "w2"):
                delattr(prefix, name)
            prefix.mlp = False
    return model


# Starting from another run -------------------------------------------------------------------------

def _abstract_params(cfg: Config) -> dict:
    _, state = abstract_model(cfg.model, adapt=lambda model: adapt(model, cfg))
    return traverse_util.flatten_dict(state.to_pure_dict())


# ModelConfig fields a fine-tune may set apart from the run it starts from: how it trains and computes
# (dropout, precision and int8 training, rematerialisation, the scan, the attention kernel) and a new
# classification head.
# Every other field is the source's: `with_source_settings` takes it from there unless the command line sets
# it, and `init_from_plan` refuses a value that changes the function the source's parameters define.
FINETUNE_FREE_FIELDS = ("dropout", "num_classes", "dtype", "param_dtype", "quant", "remat", "scan_unroll",
                        "attention_impl")


def function_settings(m: ModelConfig) -> dict:
    """{"model.<field>": value} for the fields that change what a model with given parameters computes: None
    defaults resolved (num_kv_heads=None is num_heads), and fields this architecture ignores left out."""
    skip = set(FINETUNE_FREE_FIELDS)
    if m.position != "learned":
        skip.add("max_len")  # sizes only the decode cache; with learned positions, also the position table
    if m.position != "relative":
        skip |= {"relative_buckets", "relative_max_distance"}
    if m.position != "rope":
        skip.add("rope_theta")
    if m.family != "encoder":
        skip.add("head_activation")  # the MLM transform
    if m.family != "encoder_decoder":
        skip.add("num_decoder_layers")
    if not m.tie_embeddings:
        skip.add("tied_head_rescale")
    effective = {"num_kv_heads": m.kv_heads, "head_dim": m.dim_per_head, "num_decoder_layers": m.decoder_layers}
    return {f"model.{f.name}": effective.get(f.name, getattr(m, f.name))
            for f in dataclasses.fields(m) if f.name not in skip}


def _source_config(cfg: Config) -> tuple[Config, bool]:
    """(the config whose settings a run with `checkpoint.init_from` inherits, whether it is the workdir's own):
    the source run's on a fresh start; on a rerun, the workdir's own config.json, which holds the settings
    inherited when it started (so a resume needs no source). Reads files only: no JAX backend starts here,
    before a multi-host run's distributed set-up."""
    if storage.exists(storage.join(cfg.workdir, "config.json")):
        own = read_config(cfg.workdir)
        if own.checkpoint.init_from == cfg.checkpoint.init_from:
            return own, True
    try:
        return read_config(cfg.checkpoint.init_from), False
    except FileNotFoundError as e:
        raise ValueError(f"checkpoint.init_from={cfg.checkpoint.init_from!r}: {e}") from None


def source_tokenizer(src: Config, src_workdir: str) -> str:
    """The tokenizer a run used: its data.tokenizer_path, or the one it trained into WORKDIR/tokenizer/."""
    return src.data.tokenizer_path or storage.join(src_workdir, "tokenizer", "spm.model")


def with_source_settings(cfg: Config, explicit: set) -> Config:
    """`cfg` with the model and tokenizer of `checkpoint.init_from` wherever `explicit` (the keys the command
    line set) does not name them, so a fine-tune of an imported checkpoint needs no model.* keys. Fields in
    FINETUNE_FREE_FIELDS stay this run's. Differences that remain are `init_from_plan`'s to refuse."""
    if not cfg.checkpoint.init_from:
        return cfg
    src, own = _source_config(cfg)
    model = {f.name: getattr(src.model, f.name) for f in dataclasses.fields(src.model)
             if f.name not in FINETUNE_FREE_FIELDS and f"model.{f.name}" not in explicit}
    data = {}  # the source's tokenizer: its ids are the rows of the source's embeddings
    if "data.tokenizer_path" not in explicit:
        data["tokenizer_path"] = src.data.tokenizer_path if own else source_tokenizer(src, cfg.checkpoint.init_from)
    if "data.num_sentinels" not in explicit:
        data["num_sentinels"] = src.data.num_sentinels
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **model),
                               data=dataclasses.replace(cfg.data, **data))


def init_from_plan(cfg: Config) -> dict:
    """{path: shape} of the params to take from `checkpoint.init_from`: all of ours but the adapters and a new
    classification head, which must exist there with the same shapes, in a model that computes the same
    function (`function_settings`). Raises ValueError, naming every difference, before any work."""
    src = cfg.checkpoint.init_from
    try:
        other = read_config(src)
        latest_step_or_raise(src)
    except FileNotFoundError as e:
        raise ValueError(f"checkpoint.init_from={src!r}: {e}") from None
    if other.model.family != cfg.model.family:
        raise ValueError(f"checkpoint.init_from={src!r} holds a {other.model.family} model but model.family="
                         f"{cfg.model.family!r}; start from a run of the same family.")
    theirs_fn, ours_fn = function_settings(other.model), function_settings(cfg.model)
    differ = [f"{k}={ours_fn.get(k)!r} here but {theirs_fn.get(k)!r} there"
              for k in sorted(set(theirs_fn) | set(ours_fn)) if theirs_fn.get(k) != ours_fn.get(k)]
    theirs, ours = _abstract_params(other), _abstract_params(cfg)
    if any(is_adapter(k) for k in theirs):
        raise ValueError(f"checkpoint.init_from={src!r} is a finetune.method={other.finetune.method!r} run with "
                         "adapters; merge them first (t5like.finetune.merge) or start from its base run.")
    new_ok = lambda k: is_adapter(k) or (cfg.data.objective == "classification" and k[0] in HEAD_MODULES)
    plan, params = {}, []
    for k, v in ours.items():
        if k not in theirs:
            if not new_ok(k):
                params.append(f"parameter {'/'.join(k)} is missing there")
        elif theirs[k].shape != v.shape:
            params.append(f"parameter {'/'.join(k)} has shape {theirs[k].shape} there but {v.shape} here")
        else:
            plan[k] = v.shape
    if differ or params:
        # A model that computes another function from the same parameters would train from a silently wrong start.
        raise ValueError(f"checkpoint.init_from={src!r} holds a model that differs from this one: "
                         f"{'; '.join(differ + params)}. Leave those keys off the command line to take the source's "
                         "values; a fine-tune may change only model." + ", model.".join(FINETUNE_FREE_FIELDS) + ".")
    return plan


def load_init_params(cfg: Config, params: dict) -> dict:
    """`params` (sharded, freshly initialised) with every parameter of `init_from_plan` read from the other
    run's latest checkpoint into the same shardings; adapters and a new head keep their fresh values."""
    plan = init_from_plan(cfg)
    flat = traverse_util.flatten_dict(params)
    target = traverse_util.unflatten_dict({k: jax.ShapeDtypeStruct(flat[k].shape, flat[k].dtype,
                                                                   sharding=flat[k].sharding) for k in plan})
    loaded = traverse_util.flatten_dict(load_params(cfg.checkpoint.init_from, target))
    return traverse_util.unflatten_dict({**flat, **loaded})


def check_labels(cfg: Config, labels) -> None:
    """Classification: the data's labels (t5like.data.tasks.label_names) fit the model's head."""
    if cfg.data.objective != "classification":
        return
    ints = all(isinstance(x, int) for x in labels)
    if (ints and (min(labels) < 0 or max(labels) >= cfg.model.num_classes)) or len(labels) > cfg.model.num_classes:
        raise ValueError(f"the labels of data.paths are {labels[:20]} but model.num_classes={cfg.model.num_classes}; "
                         f"set model.num_classes={max(labels) + 1 if ints else len(labels)}.")


# The trainer's plugins ------------------------------------------------------------------------------

class FineTuning(Plugin):
    """finetune.method=lora|prefix: adapters on the model, a frozen base (the seam freezes it); with
    data.objective=classification, the data's labels checked against the head before anything compiles."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        ft = cfg.finetune
        self.uses_rng = ft.method == "lora" and ft.lora_dropout > 0
        if ft.method != "full":
            self.trainable = lambda path: is_trainable(path, cfg)

    def adapt(self, model):
        return adapt(model, self.cfg)

    def check_data(self, train_iter) -> None:
        if self.cfg.data.objective == "classification":
            check_labels(self.cfg, train_iter.table.labels)


class InitFrom(Plugin):
    """checkpoint.init_from=RUN: a fresh run starts from RUN's params (adapters and a new head aside)."""

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def check_start(self, resuming: bool) -> None:
        # A fresh start's source exists and fits this model; a resume needs only its own checkpoints, so the
        # source may since have moved.
        if not resuming:
            init_from_plan(self.cfg)

    def init_params(self, params: dict) -> dict:
        params = load_init_params(self.cfg, params)
        print(f"initialised params from {self.cfg.checkpoint.init_from}", file=sys.stderr)
        return params
