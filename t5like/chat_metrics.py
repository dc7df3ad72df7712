"""Held-out metrics of instruction tuning (sft) and preference tuning (dpo) runs, against the un-tuned model.

    sft_report(workdir) -> {"metric": "exact_match", "turns", "finetuned", "untuned", "baseline", ...}
        every assistant turn of the validation conversations, answered greedily from the true history before it
        (rendered with the chat template and its generation prompt; its end when it is longer than the model's
        positions); exact match of the answer's ids. Baseline:
        always the train split's most common assistant answer.
    dpo_report(workdir) -> {"metric": "preference_accuracy", "pairs", "finetuned", "untuned", ...}
        on the validation pairs: the share whose chosen answer gets the higher DPO reward (TRL's
        rewards/accuracies; the rewards are beta * (log p - log p_ref)); the mean reward margin; and each model's
        own ranking, the share where log p(chosen) > log p(rejected), for the tuned and the un-tuned (starting)
        model. At the start every reward is 0, so reward accuracy is 0 there (ties): the starting model's own
        ranking is its chance-level counterpart.
Both are written into WORKDIR/summary.json under "task". The un-tuned model is the run's step-0 model
(t5like.task_metrics.untuned_model).
"""
from __future__ import annotations

import collections
import json
import os

import numpy as np
from flax import nnx

from t5like import storage
from t5like.data.chat import chat_template, conversation
from t5like.data.instruct import PreferenceTable, records_of
from t5like.decoding import DecodeConfig
from t5like.generate import complete_ids
from t5like.losses import pair_logprobs, reference_model
from t5like.task_metrics import untuned_model

BATCH = 64


def _turns(cfg, split: str) -> list[tuple[list[dict], str]]:
    """(history, answer) for every assistant turn of the split's conversations."""
    out = []
    for at, record in records_of(cfg.data, split):
        messages = conversation(record, at)
        out += [(messages[:i], m["content"]) for i, m in enumerate(messages) if m["role"] == "assistant"]
    return out


def _exact_match(model, tokenizer, turns, max_new_tokens: int) -> np.ndarray:
    """A history longer than the model's positions keeps its end, as packed training rows may."""
    template = chat_template(tokenizer)
    room = model.cfg.max_len - max_new_tokens
    prompts = [template.encode(h, "validation", add_generation_prompt=True)[0][-room:] for h, _ in turns]
    got = complete_ids(model, tokenizer, prompts, DecodeConfig(max_new_tokens=max_new_tokens, start_id=-1),
                       batch_size=BATCH)
    eos = tokenizer.eos_id
    return np.array([list(c[0].ids[:-1] if c[0].ids and c[0].ids[-1] == eos else c[0].ids)
                     == tokenizer.encode(a) for c, (_, a) in zip(got, turns)])


def _write(workdir: str, task: dict) -> dict:
    path = os.path.join(workdir, "summary.json")
    summary = json.load(open(path)) if os.path.exists(path) else {}
    summary["task"] = task
    storage.write_atomic(path, json.dumps(summary, indent=2))
    return task


def sft_report(workdir: str) -> dict:
    from t5like.inference import load_for_inference
    cfg, model, tokenizer = load_for_inference(workdir)
    turns = _turns(cfg, "validation")
    new_tokens = max(len(tokenizer.encode(a)) for _, a in turns) + 1
    common = collections.Counter(a for _, a in _turns(cfg, "train")).most_common(1)[0][0]
    tuned = _exact_match(model, tokenizer, turns, new_tokens)
    nth = np.array([sum(m["role"] == "assistant" for m in h) for h, _ in turns])  # 0 for a first answer
    task = {"metric": "exact_match", "turns": len(turns),
            "conversations": len(records_of(cfg.data, "validation")),
            "finetuned": float(tuned.mean()),
            "finetuned_by_turn": [float(tuned[nth == i].mean()) for i in range(nth.max() + 1)],
            "untuned": float(_exact_match(untuned_model(cfg), tokenizer, turns, new_tokens).mean()),
            "baseline": float(np.mean([a == common for _, a in turns])),
            "baseline_kind": f"most common answer {common!r}", "method": cfg.finetune.method}
    return _write(workdir, task)


def _pair_scores(model, table: PreferenceTable):
    policy = nnx.jit(lambda m, b: pair_logprobs(m(b), b))
    reference = nnx.jit(lambda m, b: pair_logprobs(reference_model(m)(b), b))
    out = {k: [] for k in ("pc", "pr", "rc", "rr")}
    for i in range(0, table.num_rows, BATCH):
        rows = np.arange(i, i + BATCH)
        batch = table.rows(np.where(rows < table.num_rows, rows, -1))
        for (a, b), fn in ((("pc", "pr"), policy), (("rc", "rr"), reference)):
            c, r = fn(model, batch)
            out[a].append(np.asarray(c)), out[b].append(np.asarray(r))
    return {k: np.concatenate(v)[:table.num_rows] for k, v in out.items()}


def dpo_report(workdir: str) -> dict:
    from t5like.inference import load_for_inference
    cfg, model, tokenizer = load_for_inference(workdir)
    table = PreferenceTable(cfg.data, tokenizer, "validation")
    beta = cfg.finetune.dpo_beta
    s = _pair_scores(model, table)
    chosen, rejected = beta * (s["pc"] - s["rc"]), beta * (s["pr"] - s["rr"])
    start = _pair_scores(untuned_model(cfg), table)
    task = {"metric": "preference_accuracy", "pairs": table.num_rows,
            "finetuned": float(np.mean(chosen > rejected)), "reward_margin": float(np.mean(chosen - rejected)),
            "finetuned_ranking": float(np.mean(s["pc"] > s["pr"])),
            "untuned": float(np.mean(start["pc"] > start["pr"])),
            "untuned_reward_accuracy": float(np.mean(beta * (start["pc"] - start["rc"])
                                                     > beta * (start["pr"] - start["rr"]))),
            "method": cfg.finetune.method, "dpo_beta": beta}
    return _write(workdir, task)
