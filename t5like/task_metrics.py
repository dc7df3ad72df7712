"""Held-out task metrics of a fine-tuning run, against the un-fine-tuned model and a trivial baseline.

    report(workdir) -> {"metric", "examples", "finetuned", "untuned", "baseline", "baseline_kind"}
                       (also written into WORKDIR/summary.json under "task")

  classification  accuracy of the pooled head;                  baseline: always the train split's majority label
  seq2seq         exact match of the greedy output (token ids);  baseline: the better of copying the input and
                                                                 always the train split's most common target
  completion      exact match of the greedy completion;          baseline: always the most common completion
The un-fine-tuned model is the run's step-0 model: its base (from checkpoint.init_from, or the seed's init)
with fresh adapters (so for LoRA exactly the base; for prefix tuning the base plus an untrained prefix).
"""
from __future__ import annotations

import collections
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from t5like import finetune, storage
from t5like.config import Config
from t5like.data import sources
from t5like.data.objectives import EOS_ID
from t5like.data.tasks import TASK_FIELDS, TaskTable, load_examples

BATCH = 64  # examples per forward / generate call; the last batch is padded so one shape compiles


def _examples(cfg: Config, split: str) -> tuple[list, list]:
    ds = load_examples(cfg.data)
    keep = sources.split_indices([str(i) for i in range(len(ds))], split, cfg.data.validation_fraction)
    first, second = TASK_FIELDS[cfg.data.objective]
    ds = ds.select(keep)
    return [str(x) for x in ds[first]], list(ds[second])


def _strip_eos(ids) -> list[int]:
    ids = list(ids)
    return ids[:ids.index(EOS_ID)] if EOS_ID in ids else ids


def _generate_all(model, cfg: Config, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    from t5like.decoding import DecodeConfig, generate
    width = max(len(p) for p in prompts)
    out = []
    for i in range(0, len(prompts), BATCH):
        chunk = prompts[i:i + BATCH]
        chunk = chunk + [[EOS_ID]] * (BATCH - len(chunk))
        ids = np.zeros((BATCH, width), np.int32)
        for b, p in enumerate(chunk):
            ids[b, :len(p)] = p
        tokens, _ = generate(model, ids, np.array([len(p) for p in chunk]),
                             DecodeConfig(strategy="greedy", max_new_tokens=max_new_tokens))
        out += [_strip_eos(t) for t in tokens[:, 0]]
    return out[:len(prompts)]


def task_metric(model, cfg: Config, tokenizer) -> tuple[float, int]:
    """(accuracy or exact match on the validation split, number of examples)."""
    objective = cfg.data.objective
    if objective == "classification":
        table = TaskTable(cfg.data, tokenizer, "validation")
        classify = nnx.jit(lambda m, b: jnp.argmax(m.classify(b), -1))
        correct = 0
        for i in range(0, table.num_rows, BATCH):
            rows = np.arange(i, i + BATCH)
            batch = table.rows(np.where(rows < table.num_rows, rows, -1))
            pred = np.asarray(classify(model, {k: jnp.asarray(v) for k, v in batch.items()
                                               if k in ("inputs", "segment_ids", "positions")}))
            correct += int(((pred == batch["targets"]) * batch["weights"]).sum())
        return correct / table.num_rows, table.num_rows
    firsts, seconds = _examples(cfg, "validation")
    wanted = tokenizer.encode_batch([str(s) for s in seconds])
    new_tokens = max(len(w) for w in wanted) + 1  # and EOS
    # As in training: an input keeps its start (EOS appended), a prompt its end (BOS and the completion added).
    limit = cfg.data.seq_len - 1 if objective == "seq2seq" else cfg.data.seq_len - new_tokens - 1
    prompts = [ids[-limit:] if objective == "completion" else ids[:limit]
               for ids in tokenizer.encode_batch(firsts)]
    got = _generate_all(model, cfg, prompts, new_tokens)
    return float(np.mean([g == w for g, w in zip(got, wanted)])), len(wanted)


def baseline(cfg: Config, tokenizer) -> tuple[float, str]:
    """(the trivial baseline's score on the validation split, what it is)."""
    _, train_seconds = _examples(cfg, "train")
    firsts, seconds = _examples(cfg, "validation")
    common = collections.Counter(map(str, train_seconds)).most_common(1)[0][0]
    if cfg.data.objective == "classification":
        return float(np.mean([str(s) == common for s in seconds])), f"majority label {common!r}"
    wanted = tokenizer.encode_batch([str(s) for s in seconds])
    majority = float(np.mean([w == tokenizer.encode(common) for w in wanted]))
    if cfg.data.objective == "completion":
        return majority, f"most common completion {common!r}"
    copy = float(np.mean([w == x for w, x in zip(wanted, tokenizer.encode_batch(firsts))]))
    return (copy, "copy the input") if copy >= majority else (majority, f"most common target {common!r}")


def untuned_model(cfg: Config):
    """The run's step-0 model on the default device: base (init_from or the seed's init) + fresh adapters."""
    from t5like.models import MODEL_CLASSES
    model = finetune.adapt(MODEL_CLASSES[cfg.model.family](cfg.model, rngs=nnx.Rngs(cfg.seed)), cfg)
    if cfg.checkpoint.init_from:
        graphdef, state = nnx.split(model)
        params = finetune.load_init_params(cfg, jax.device_put(state.to_pure_dict(), jax.devices()[0]))
        nnx.replace_by_pure_dict(state, params)
        model = nnx.merge(graphdef, state)
    return model


def report(workdir: str) -> dict:
    """Measure the fine-tuned, the un-fine-tuned and the trivial baseline; add them to summary.json."""
    from t5like.inference import load_for_inference
    cfg, model, tokenizer = load_for_inference(workdir)
    if cfg.data.objective not in TASK_FIELDS:
        raise ValueError(f"{workdir} trained data.objective={cfg.data.objective!r}, not a fine-tuning task "
                         f"({sorted(TASK_FIELDS)}); there is no task metric to report.")
    finetuned, n = task_metric(model, cfg, tokenizer)
    untuned, _ = task_metric(untuned_model(cfg), cfg, tokenizer)
    base, kind = baseline(cfg, tokenizer)
    task = {"metric": "accuracy" if cfg.data.objective == "classification" else "exact_match", "examples": n,
            "finetuned": finetuned, "untuned": untuned, "baseline": base, "baseline_kind": kind,
            "method": cfg.finetune.method}
    path = os.path.join(workdir, "summary.json")
    summary = json.load(open(path)) if os.path.exists(path) else {}
    summary["task"] = task
    storage.write_atomic(path, json.dumps(summary, indent=2))
    return task
