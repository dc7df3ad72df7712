"""LoRA and prefix tuning: function-preserving adapters, a frozen base, adapter-only optimizer state, merge,
prefix-aware KV-cache decoding, the experiments end to end, and bad input. All three families; the
training steps run on a 2x2x2 (data, fsdp, tensor) mesh of the 8 simulated CPU devices."""
import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, traverse_util

from experiments import finetune_tasks
from t5like import finetune, train
from t5like.config import (CheckpointConfig, Config, FinetuneConfig, MeshConfig, ModelConfig, OptimConfig,
                           TrainConfig, apply_overrides)
from t5like.data import DataConfig
from t5like.models import MODEL_CLASSES, build_model
from xla import xla_flags

ALL_TARGETS = ("q", "k", "v", "o", "mlp_in", "mlp_out")
FAMILIES = {  # family -> (activation, position): one of each kind of layer across the three
    "decoder": ("swiglu", "rope"), "encoder": ("gelu", "learned"), "encoder_decoder": ("gated_gelu", "relative")}
OBJECTIVE = {"decoder": "completion", "encoder": "classification", "encoder_decoder": "seq2seq"}


def tiny(family: str, **kw) -> ModelConfig:
    act, pos = FAMILIES[family]
    return ModelConfig(**{**dict(family=family, activation=act, position=pos, vocab_size=64, d_model=32, num_heads=4,
                                 num_kv_heads=2 if family == "decoder" else None, d_ff=64, num_layers=2, max_len=32,
                                 num_classes=3 if family == "encoder" else 0, use_bias=family == "encoder"), **kw})


def config(family: str, method: str, **ft) -> Config:
    return Config(model=tiny(family),
                  data=DataConfig(source="files", format="jsonl", paths=("unused.jsonl",),
                                  objective=OBJECTIVE[family], seq_len=8),
                  optim=OptimConfig(learning_rate=1e-2, warmup_steps=0, schedule="constant", weight_decay=0.1),
                  train=TrainConfig(steps=3, batch_size=8),
                  finetune=FinetuneConfig(method=method, lora_targets=ALL_TARGETS, **ft),
                  mesh=MeshConfig(data=2, fsdp=2, tensor=2))


def synthetic_batch(family: str, seed: int = 0, B: int = 8, L: int = 8) -> dict:
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 64, (B, L)).astype(np.int32)
    ones, pos = np.ones((B, L), np.int32), np.broadcast_to(np.arange(L, dtype=np.int32), (B, L)).copy()
    if family == "encoder":
        return {"inputs": ids, "segment_ids": ones, "positions": pos,
                "targets": rng.integers(0, 3, B).astype(np.int32), "weights": np.ones(B, np.float32)}
    if family == "decoder":
        return {"inputs": ids, "targets": np.roll(ids, -1, 1), "weights": np.ones((B, L), np.float32),
                "segment_ids": ones, "positions": pos}
    return {"encoder_inputs": ids, "encoder_segment_ids": ones, "encoder_positions": pos,
            "decoder_inputs": np.roll(ids, 1, 1), "targets": ids[:, ::-1].copy(), "weights": np.ones((B, L), np.float32),
            "decoder_segment_ids": ones, "decoder_positions": pos}


def flat(tree) -> dict:
    return traverse_util.flatten_dict(jax.tree.map(np.asarray, tree))


@functools.partial(nnx.jit, static_argnums=2)
def _task_logits(model, batch, objective):
    return finetune.task_logits(model, batch, objective)


def forward(model, batch, objective):
    # One jitted function for the module: models of the same structure (adapted vs its base) share a compile.
    return _task_logits(model, {k: jnp.asarray(v) for k, v in batch.items()}, objective)


def abstract_like(cfg: ModelConfig):
    """(graphdef, abstract state) of a plain model: a tree to load params into; no eager initialisation."""
    return nnx.split(nnx.eval_shape(lambda: build_model(cfg, seed=0)))


def on_one_device(tree):
    return jax.device_put(tree, jax.devices()[0])


@pytest.mark.parametrize("family", FAMILIES)
def test_fresh_lora_adapter_leaves_logits_unchanged(family):
    cfg = config(family, "lora")
    batch = synthetic_batch(family)
    base = forward(build_model(cfg.model, seed=0), batch, OBJECTIVE[family])
    model = finetune.adapt(build_model(cfg.model, seed=0), cfg)
    adapters = [k for k in flat(nnx.state(model).to_pure_dict()) if finetune.is_adapter(k)]
    # q, k, v, o in every attention (self and, for T5, cross) and both MLP projections, each with A and B.
    attentions = {"decoder": 1, "encoder": 1, "encoder_decoder": 3}[family]
    assert len(adapters) == 2 * (4 * attentions + 2 * (2 if family == "encoder_decoder" else 1))
    np.testing.assert_array_equal(np.asarray(forward(model, batch, OBJECTIVE[family])), np.asarray(base))


def run_steps(cfg: Config, family: str, steps: int = 3):
    """A few real train steps (the trainer's own jitted step) on the config's mesh -> (setup, state0, state)."""
    batch = synthetic_batch(family)
    setup = train.build(cfg, batch)
    state = setup.init_state()
    before = flat(state["params"])
    for _ in range(steps):
        state, metrics = setup.train_step(state, train.global_batch(setup, batch))
    assert np.isfinite(float(metrics["loss"]))
    return setup, before, state


def model_from(setup, params):
    abstract = nnx.eval_shape(lambda: finetune.adapt(
        MODEL_CLASSES[setup.cfg.model.family](setup.cfg.model, rngs=nnx.Rngs(0), shard=setup.sharder), setup.cfg))
    graphdef, state = nnx.split(abstract)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def check_frozen_and_optimizer_state(setup, before, state):
    after = flat(state["params"])
    trainable = {k for k in after if finetune.is_trainable(k, setup.cfg)}
    assert trainable and len(trainable) < len(after)
    for k in after:
        if k in trainable:
            continue
        np.testing.assert_array_equal(after[k], before[k], err_msg=f"frozen {k} changed")
    assert all(finetune.is_adapter(k) or k[0] in finetune.HEAD_MODULES for k in trainable)
    assert any(not np.array_equal(after[k], before[k]) for k in trainable if finetune.is_adapter(k))
    # AdamW keeps two moments per trainable parameter and nothing for the frozen base (plus scalar counts).
    trainable_bytes = sum(after[k].nbytes for k in trainable)
    opt_bytes = sum(x.nbytes for x in jax.tree.leaves(state["opt_state"]) if np.ndim(x) > 0)
    assert opt_bytes == 2 * trainable_bytes
    scalars = [x for x in jax.tree.leaves(state["opt_state"]) if np.ndim(x) == 0]
    assert sum(np.asarray(x).nbytes for x in scalars) <= 16


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_training_freezes_base_and_merge_agrees(family):
    cfg = config(family, "lora", lora_dropout=0.1)
    setup, before, state = run_steps(cfg, family)
    check_frozen_and_optimizer_state(setup, before, state)
    # Parameters stay sharded on the mesh: an adapter's A is laid out by its kernel's logical names.
    a = state["params"][("decoder" if family != "encoder" else "encoder")]["layers"]["mlp"]["wi_lora"]["a"]
    assert a.sharding.spec[1] == "fsdp"  # [layers, embed, rank]: embed over fsdp
    params = on_one_device(state["params"])
    model = model_from(dataclasses.replace(setup, sharder=train.Sharder()), params)
    batch = synthetic_batch(family, seed=1)
    unmerged = np.asarray(forward(model, batch, OBJECTIVE[family]))
    base = np.asarray(forward(model_from(dataclasses.replace(setup, sharder=train.Sharder()),
                                         on_one_device(traverse_util.unflatten_dict(before))), batch, OBJECTIVE[family]))
    assert np.abs(unmerged - base).max() > 1e-3  # training moved the function
    finetune.merge(model)
    assert not any(finetune.is_adapter(k) for k in flat(nnx.state(model).to_pure_dict()))
    merged = np.asarray(forward(model, batch, OBJECTIVE[family]))
    np.testing.assert_allclose(merged, unmerged, atol=1e-5, rtol=0)
    # The merged model has the un-adapted model's parameter tree: it loads into a plain model.
    graphdef, plain_state = abstract_like(cfg.model)
    nnx.replace_by_pure_dict(plain_state, nnx.state(model).to_pure_dict())
    np.testing.assert_allclose(np.asarray(forward(nnx.merge(graphdef, plain_state), batch, OBJECTIVE[family])),
                               unmerged, atol=1e-5, rtol=0)


# Jitted as generation runs them (eager NNX dispatches op by op, which is slow on CPU).
@functools.partial(nnx.jit, static_argnums=(2, 3))
def _init_cache(model, batch, family, length):
    if family == "decoder":
        return model.init_cache(jnp.zeros(batch["inputs"].shape[0], jnp.int32), length)
    return model.init_cache(batch["encoder_inputs"], batch["encoder_segment_ids"], length)


_decode_step = nnx.jit(lambda model, ids, cache: model.decode_step(ids, cache))


def cached_logits(model, family, batch, prefill: int):
    """Logits from KV-cache decoding: prefill `prefill` tokens, then one token per step."""
    ids = jnp.asarray(batch["inputs" if family == "decoder" else "decoder_inputs"])
    cache = _init_cache(model, {k: jnp.asarray(v) for k, v in batch.items()}, family, ids.shape[1])
    out, cache = _decode_step(model, ids[:, :prefill], cache)
    outs = [out]
    for t in range(prefill, ids.shape[1]):
        out, cache = _decode_step(model, ids[:, t:t + 1], cache)
        outs.append(out)
    return np.asarray(jnp.concatenate(outs, axis=1))


@pytest.mark.parametrize("family", FAMILIES)
def test_prefix_tuning_freezes_base_and_cached_decoding_sees_prefixes(family):
    cfg = config(family, "prefix", prefix_length=3, prefix_mlp=family != "encoder", prefix_mlp_hidden=16)
    setup, before, state = run_steps(cfg, family)
    check_frozen_and_optimizer_state(setup, before, state)
    params = on_one_device(state["params"])
    plain = dataclasses.replace(setup, sharder=train.Sharder())
    model = model_from(plain, params)
    batch = synthetic_batch(family, seed=2, L=24)  # 24 decode slots: reads cross cache_read_lengths (16, 24)
    full = np.asarray(forward(model, batch, OBJECTIVE[family]))
    no_prefix = finetune.base_params(params)
    graphdef, base_state = abstract_like(cfg.model)
    nnx.replace_by_pure_dict(base_state, no_prefix)
    assert np.abs(full - np.asarray(forward(nnx.merge(graphdef, base_state), batch, OBJECTIVE[family]))).max() > 1e-3
    if family == "encoder":
        return  # no decoding; the prefix acts through the encoder stack checked above
    np.testing.assert_allclose(cached_logits(model, family, batch, prefill=3), full, atol=1e-5, rtol=0)
    # `merge` replaces the MLP reparametrisation by the prefixes it computes; decoding is unchanged.
    finetune.merge(model)
    stacks = 2 if family == "encoder_decoder" else 1
    assert sorted(k[-1] for k in flat(nnx.state(model).to_pure_dict()) if finetune.is_adapter(k)) == \
        ["key"] * stacks + ["value"] * stacks
    np.testing.assert_allclose(cached_logits(model, family, batch, prefill=5), full, atol=1e-5, rtol=0)


# Bad input ---------------------------------------------------------------------------------------------

def test_train_modules_must_name_a_module():
    cfg = dataclasses.replace(config("decoder", "prefix"), finetune=FinetuneConfig(method="prefix",
                                                                                   train_modules=("lm_head",)))
    with pytest.raises(ValueError, match=r"finetune.train_modules entry 'lm_head' names no top-level module of this "
                                         r"model; its modules are \['decoder', 'embed'\]"):
        finetune.adapt(build_model(cfg.model), cfg)


def test_lora_target_naming_no_module_lists_valid_names():
    cfg = dataclasses.replace(config("encoder", "lora"), finetune=FinetuneConfig(method="lora",
                                                                                 lora_targets=("q", "mlp_gate")))
    with pytest.raises(ValueError, match=r"'mlp_gate' names no module.*gelu.*\['q', 'k', 'v', 'o', 'mlp_in', 'mlp_out'\]"):
        finetune.adapt(build_model(cfg.model), cfg)
    with pytest.raises(ValueError, match=r"finetune.lora_targets entry 'query' names no module; valid targets are "
                                         r"\['q', 'k', 'v', 'o', 'mlp_in', 'mlp_gate', 'mlp_out'\]"):
        apply_overrides(Config(), ["finetune.lora_targets=q,query"]).validate()


@pytest.mark.parametrize("override, words", [
    ("finetune.method=qlora", r"finetune.method='qlora' is not one of \['full', 'lora', 'prefix'\]"),
    ("finetune.lora_rank=0", r"finetune.lora_rank=0 must be a positive integer"),
    ("finetune.lora_alpha=-1", r"finetune.lora_alpha=-1.0 must be a finite number in \(0, inf\)"),
    ("finetune.lora_alpha=nan", r"finetune.lora_alpha=nan must be a finite number"),
    ("finetune.lora_dropout=1.0", r"finetune.lora_dropout=1.0 must be a finite number in \[0, 1\)"),
    ("finetune.prefix_length=0", r"finetune.prefix_length=0 must be a positive integer"),
    ("finetune.prefix_mlp_hidden=-4", r"finetune.prefix_mlp_hidden=-4 must be a positive integer"),
    ("finetune.lora_rank=two", r"finetune.lora_rank='two' is not a valid int"),
    ("finetune.lora_ranks=4", r"unknown config key 'finetune.lora_ranks'. Did you mean: finetune.lora_rank"),
])
def test_bad_finetune_values(override, words):
    with pytest.raises(ValueError, match=words):
        apply_overrides(Config(), [override]).validate()


def test_bad_task_configs(tmp_path):
    with pytest.raises(ValueError, match="data.objective='classification' needs a classification head"):
        dataclasses.replace(config("encoder", "lora"), model=tiny("encoder", num_classes=0)).validate()
    with pytest.raises(ValueError, match="trains a encoder_decoder model, but model.family='decoder'"):
        dataclasses.replace(config("decoder", "lora"), data=DataConfig(
            source="files", format="jsonl", paths=("x.jsonl",), objective="seq2seq")).validate()
    with pytest.raises(ValueError, match="reads labelled examples from files: set data.source='files'"):
        DataConfig(objective="completion").validate()
    path = tmp_path / "t.jsonl"
    path.write_text('{"text": "a b", "label": "x"}\n{"text": "c d", "label": "y"}\n{"text": "e", "label": "z"}\n')
    from t5like.data.tasks import load_examples
    with pytest.raises(ValueError, match=r"needs fields \('input', 'target'\).*lacks \['input', 'target'\]"):
        load_examples(DataConfig(source="files", format="jsonl", paths=(str(path),), objective="seq2seq"))
    from t5like.data.tasks import label_names
    data = DataConfig(source="files", format="jsonl", paths=(str(path),), objective="classification")
    cfg = dataclasses.replace(config("encoder", "lora"), model=tiny("encoder", num_classes=2), data=data)
    with pytest.raises(ValueError, match=r"labels of data.paths are \['x', 'y', 'z'\] but model.num_classes=2; "
                                         r"set model.num_classes=3"):
        finetune.check_labels(cfg, label_names(load_examples(data)))


# The experiments end to end: each fine-tuning experiment, two steps on a small task file, reports its task --------
# (Whether each learns its task is benchmarks/learning.py's: 1-3 CPU-minutes of steps each.)

ROOT = __import__("os").path.dirname(__import__("os").path.dirname(__import__("os").path.abspath(__file__)))


def make_tasks(root) -> dict:
    """Small versions of the experiments' task files and one tokenizer fitted on their text."""
    from t5like.data import get_tokenizer
    files = {"classify": finetune_tasks.line_kinds(str(root / "kinds.jsonl"), per_class=150, max_files=150),
             "words": finetune_tasks.line_kind_words(str(root / "words.jsonl"), per_class=150, max_files=150),
             "text": finetune_tasks.line_kinds_text(str(root / "text.jsonl"), per_class=150, max_files=150)}
    data = DataConfig(source="files", format="jsonl", paths=(files["words"],), objective="completion")
    get_tokenizer(data, str(root / "tok"), vocab_size=1024)
    return {**files, "tokenizer": str(root / "tok" / "tokenizer" / "spm.model"), "root": root}


@pytest.fixture(scope="module")
def tasks(background):
    return background.once("tasks", make_tasks)


# experiment module -> (its task file, its method, the metric it reports)
EXPERIMENTS = {"finetune_bert_classify": ("classify", "lora", "accuracy"),
               "finetune_t5_lora": ("text", "lora", "exact_match"),
               "finetune_gpt2_prefix": ("words", "prefix", "exact_match")}


def workdir(tasks, module):
    return tasks["root"] / module


def background_runs(background, selected):
    """The selected experiments, started before the first test (tests/background.py): each is
    `python -m experiments.MODULE` on one CPU device with its small task file, for two steps."""
    import os
    import sys
    for module, (task, _, _) in EXPERIMENTS.items():
        if f"test_each_experiment_runs_and_reports_its_task[{module}]" not in selected:
            continue
        tasks = background.once("tasks", make_tasks)
        env = dict(os.environ, XLA_FLAGS=xla_flags(1), PYTHONUNBUFFERED="1")
        cmd = [sys.executable, "-m", f"experiments.{module}", f"workdir={workdir(tasks, module)}",
               f"data.paths={tasks[task]}", f"data.tokenizer_path={tasks['tokenizer']}", "train.progress=false",
               "data.validation_fraction=0.2", "train.steps=2", "train.batch_size=8", "optim.warmup_steps=0"]
        background.start(module, cmd, cwd=ROOT, env=env)


@pytest.mark.parametrize("module", sorted(EXPERIMENTS))
def test_each_experiment_runs_and_reports_its_task(background, module):
    """The experiment's own `main`: it trains only what its method trains, and measures the tuned model, the
    un-tuned one and the trivial baseline on the held-out examples (about a fifth of the 600 here)."""
    background.wait(module)
    with open(workdir(background.once("tasks", make_tasks), module) / "summary.json") as f:
        summary = json.load(f)
    _, method, metric = EXPERIMENTS[module]
    task = summary["task"]
    assert task["metric"] == metric and task["method"] == method and 100 <= task["examples"] < 200, task
    for k in ("finetuned", "untuned", "baseline"):
        assert 0 <= task[k] <= 1, task
    assert 0.1 < task["baseline"] < 0.4, task  # 4 balanced kinds: the most common answer is about a quarter
    assert summary["step"] == 2 and 0 < summary["trainable_params"] < summary["params"] / 4, summary


# Runs here, in this process, while the experiments above may still run beside it at low priority.
def test_lora_from_a_pretrained_run_keeps_its_base(tasks, tmp_path):
    """checkpoint.init_from: an MLM run's params become the frozen base of a LoRA classifier (plus a new head);
    a run whose shapes differ is refused, naming the tensor and both shapes."""
    from t5like.inference import load_for_inference
    model = ModelConfig(family="encoder", vocab_size=1024, d_model=32, num_heads=4, d_ff=64, num_layers=2,
                        max_len=64, position="learned", activation="gelu", norm="layernorm", norm_placement="post",
                        embedding_norm=True, use_bias=True)
    pre = Config(model=model, data=DataConfig(source="stdlib", max_files=20, objective="mlm", seq_len=32,
                                              tokenizer_path=tasks["tokenizer"]),
                 optim=OptimConfig(warmup_steps=0), train=TrainConfig(steps=2, batch_size=8, eval_steps=1,
                                                                      eval_every=0, progress=False),
                 checkpoint=CheckpointConfig(every=2, async_save=False), workdir=str(tmp_path / "pre"))
    train.train(pre)
    ft = dataclasses.replace(
        pre, model=dataclasses.replace(model, num_classes=4),
        data=DataConfig(source="files", format="jsonl", paths=(tasks["classify"],), objective="classification",
                        seq_len=32, tokenizer_path=tasks["tokenizer"], validation_fraction=0.2),
        finetune=FinetuneConfig(method="lora", lora_targets=("q", "v")),
        checkpoint=dataclasses.replace(pre.checkpoint, init_from=pre.workdir), workdir=str(tmp_path / "ft"))
    train.train(ft)
    base = flat(nnx.state(load_for_inference(pre.workdir)[1]).to_pure_dict())
    tuned = flat(nnx.state(load_for_inference(ft.workdir)[1]).to_pure_dict())
    for k, v in base.items():
        np.testing.assert_array_equal(tuned[k], v, err_msg=f"{k} is not the pre-trained run's")
    new = sorted(set(tuned) - set(base))
    assert {k[0] for k in new} == {"encoder", "pooler", "classifier"} and all(finetune.is_adapter(k) or
                                                                             k[0] != "encoder" for k in new)
    assert any(np.abs(tuned[k]).max() > 0 for k in new if k[-2:] == ("query_lora", "b"))
    wider = dataclasses.replace(ft, model=dataclasses.replace(ft.model, d_ff=128), workdir=str(tmp_path / "bad"))
    with pytest.raises(ValueError, match=r"parameter encoder/layers/mlp/wi has shape \(2, 32, 64\) there but "
                                         r"\(2, 32, 128\) here"):
        train.train(wider)


def test_config_refuses_a_gate_target_without_a_gate():
    with pytest.raises(ValueError, match=r"'mlp_gate' names no module of this model \(model.activation='gelu' has no "
                                         r"gate projection\); valid targets here are \['q', 'k', 'v', 'o', 'mlp_in', "
                                         r"'mlp_out'\]"):
        dataclasses.replace(config("encoder", "lora"), finetune=FinetuneConfig(
            method="lora", lora_targets=("q", "mlp_gate"))).validate()
