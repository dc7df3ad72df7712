"""Does it learn? Each model family's pre-training experiment and each fine-tuning experiment, shortened, on
one CPU device, against a bar it must clear on held-out data:

  pretrain_decoder, pretrain_encoder, pretrain_encoder_decoder   gpt2_small / bert_base / t5_base at size=tiny
      on 60 stdlib files: eval loss at least 0.15 nats below the best context-free (unigram) model's, and
      top-1 accuracy above 1.5 times its.
  finetune_bert_full, finetune_bert_lora    BERT classifies a line's kind (4 balanced classes): accuracy at
      least 0.4 above the majority-class baseline.
  finetune_t5_lora                          T5 with LoRA answers the kind in words: exact match at least 0.2 above
      the most-common-answer baseline.
  finetune_gpt2_prefix                      GPT-2 prefix tuning, the experiment as it is (300 steps x 32):
      exact match at least 0.15 above the baseline.

Held-out sets have >= 100 examples (400 for prefix tuning), so each fine-tuning margin is at least 4 binomial
standard errors. These are experiments of 1-3 CPU-minutes each, so they live here rather than in the test
suite (which runs every experiment's code path in seconds: tests/test_finetune.py, tests/test_train.py).

    python benchmarks/learning.py --workdir /tmp/learning                  # all seven, one after another
    python benchmarks/learning.py --workdir /tmp/learning --only finetune_t5_lora pretrain_encoder

Prints one row per run (the measured figure, its bar, pass or miss) and writes WORKDIR/learning.json; exits 1
if any run misses its bar. A rerun reuses each finished run's workdir and the time it took (delete the workdir to
train again).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

PRETRAIN = {"decoder": "gpt2_small", "encoder": "bert_base", "encoder_decoder": "t5_base"}
# MLM supervises only 15% of tokens and sits on a unigram plateau first, so it gets more steps.
PRETRAIN_STEPS = {"decoder": 100, "encoder_decoder": 80, "encoder": 600}
# name -> (experiment module, task file, margin over the baseline, overrides)
FINETUNE = {
    "finetune_bert_full": ("finetune_bert_classify", "classify", 0.4,
                           ["finetune.method=full", "train.steps=50", "train.batch_size=16"]),
    "finetune_bert_lora": ("finetune_bert_classify", "classify", 0.4,
                           ["finetune.method=lora", "train.steps=50", "train.batch_size=16"]),
    "finetune_t5_lora": ("finetune_t5_lora", "text", 0.2, ["train.steps=60", "train.batch_size=16"]),
    "finetune_gpt2_prefix": ("finetune_gpt2_prefix", "words", 0.15, []),
}
RUNS = [f"pretrain_{f}" for f in PRETRAIN] + list(FINETUNE)


def pretrain_args(family: str, workdir: str, tokenizer: str) -> list[str]:
    args = ["size=tiny", "data.max_files=60", "data.seq_len=64", f"data.tokenizer_path={tokenizer}",
            f"train.steps={PRETRAIN_STEPS[family]}", "train.batch_size=16", "train.eval_steps=4", "train.eval_every=0",
            "train.progress=false", "train.peak_flops=1e11", "checkpoint.every=10000", "data.validation_fraction=0.1",
            "model.dropout=0", f"workdir={workdir}"]
    return args + (["optim.schedule=constant"] if family == "encoder" else [])


def unigram_baseline(cfg, batches: int = 40) -> tuple[float, float]:
    """A unigram model fitted to the training targets (add-one smoothed), scored on the validation targets:
    (cross-entropy in nats, top-1 accuracy) of the best context-free model."""
    from t5like.data import get_tokenizer, make_iterator
    tok = get_tokenizer(cfg.data, cfg.workdir, cfg.model.vocab_size)
    it = make_iterator(cfg.data, tok, "train", batch_size=cfg.train.batch_size, seed=0)
    counts = np.ones(cfg.model.vocab_size)
    for _ in range(batches):
        b = next(it)
        np.add.at(counts, b["targets"][b["weights"] > 0], 1)
    log_p = np.log(counts / counts.sum())
    val = make_iterator(cfg.data, tok, "validation", batch_size=cfg.train.batch_size, seed=0,
                        num_batches=cfg.train.eval_steps)
    targets = np.concatenate([b["targets"][b["weights"] > 0] for b in val])
    return float(-log_p[targets].mean()), float((targets == counts.argmax()).mean())


def prepare(wd: str) -> dict:
    """The tokenizers and task files every run reads (made once; a rerun reuses them)."""
    from experiments import finetune_tasks
    from t5like.data import DataConfig, get_tokenizer
    files = {"classify": finetune_tasks.line_kinds(os.path.join(wd, "kinds.jsonl"), per_class=150, max_files=150),
             # Prefix tuning of a random base learns slowest: its task keeps the experiment's full size.
             "words": finetune_tasks.line_kind_words(os.path.join(wd, "words.jsonl")),
             "text": finetune_tasks.line_kinds_text(os.path.join(wd, "text.jsonl"), per_class=150, max_files=150)}
    get_tokenizer(DataConfig(source="files", format="jsonl", paths=(files["words"],), objective="completion"),
                  os.path.join(wd, "tok_tasks"), vocab_size=1024)
    get_tokenizer(DataConfig(source="stdlib", max_files=60, tokenizer_train_chars=300_000),
                  os.path.join(wd, "tok_stdlib"), vocab_size=2048)
    return {**files, "tok_tasks": os.path.join(wd, "tok_tasks", "tokenizer", "spm.model"),
            "tok_stdlib": os.path.join(wd, "tok_stdlib", "tokenizer", "spm.model")}


def command(name: str, wd: str, inputs: dict) -> list[str]:
    workdir = os.path.join(wd, name)
    if name.startswith("pretrain_"):
        family = name.removeprefix("pretrain_")
        return [f"experiments.{PRETRAIN[family]}", *pretrain_args(family, workdir, inputs["tok_stdlib"])]
    module, task, _, overrides = FINETUNE[name]
    return [f"experiments.{module}", f"workdir={workdir}", f"data.paths={inputs[task]}",
            f"data.tokenizer_path={inputs['tok_tasks']}", "train.progress=false", "data.validation_fraction=0.2",
            *overrides]


def judge(name: str, wd: str, inputs: dict) -> dict:
    """The run's figure against its bar, from its metrics (pre-training) or summary.json (fine-tuning)."""
    workdir = os.path.join(wd, name)
    if name.startswith("pretrain_"):
        from t5like import train
        from t5like.metrics import read_metrics
        family = name.removeprefix("pretrain_")
        module = __import__(f"experiments.{PRETRAIN[family]}", fromlist=["config"])
        cfg = train.parse_args(module.config, pretrain_args(family, workdir, inputs["tok_stdlib"]))
        base_loss, base_acc = unigram_baseline(cfg)
        final = [r for r in read_metrics(workdir) if "eval_loss" in r][-1]
        loss, acc = final["eval_loss"], final["eval_accuracy"]
        ok = loss < base_loss - 0.15 and acc > 1.5 * base_acc
        return {"figure": f"eval loss {loss:.3f}, accuracy {acc:.3f}",
                "bar": f"loss < {base_loss - 0.15:.3f}, accuracy > {1.5 * base_acc:.3f} (unigram {base_loss:.3f}, "
                       f"{base_acc:.3f})", "ok": bool(ok), "eval_loss": loss, "eval_accuracy": acc,
                "unigram_loss": base_loss, "unigram_accuracy": base_acc}
    with open(os.path.join(workdir, "summary.json")) as f:
        task, margin = json.load(f)["task"], FINETUNE[name][2]
    ok = task["examples"] >= 100 and task["finetuned"] >= task["baseline"] + margin
    return {"figure": f"{task['metric']} {task['finetuned']:.3f} on {task['examples']} held out",
            "bar": f">= {task['baseline'] + margin:.3f} (baseline {task['baseline']:.3f} + {margin}; untuned "
                   f"{task['untuned']:.3f})", "ok": bool(ok), "task": task}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--only", nargs="+", choices=RUNS, default=RUNS, metavar="RUN",
                    help=f"run only these (of {', '.join(RUNS)})")
    args = ap.parse_args(argv)
    from t5like import storage
    wd = os.path.abspath(args.workdir)
    os.makedirs(wd, exist_ok=True)
    inputs = prepare(wd)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", PYTHONUNBUFFERED="1")
    out_path = os.path.join(wd, "learning.json")
    earlier = json.load(open(out_path)) if os.path.exists(out_path) else {}
    results = {}
    for name in args.only:
        log = os.path.join(wd, f"{name}.log")
        seconds, reused = None, os.path.exists(os.path.join(wd, name, "summary.json"))
        if not reused:
            start = time.time()
            with open(log, "w") as out:
                proc = subprocess.run([sys.executable, "-m", *command(name, wd, inputs)], cwd=REPO, env=env,
                                      stdout=out, stderr=subprocess.STDOUT)
            seconds = time.time() - start
            if proc.returncode != 0:
                results[name] = {"figure": f"exited {proc.returncode}", "bar": f"see {log}", "ok": False}
                print(f"{name:26s} exited {proc.returncode}; see {log}", flush=True)
                continue
        if reused:  # keeps the time it was measured in
            seconds = earlier.get(name, {}).get("wall_s")
        results[name] = {**judge(name, wd, inputs), "wall_s": seconds}
        r = results[name]
        print(f"{name:26s} {'pass' if r['ok'] else 'MISS'}  {r['figure']}  bar: {r['bar']}"
              + (f"  ({seconds:.0f} s)" if seconds else "") + ("  (reused)" if reused else ""), flush=True)
    storage.write_atomic(out_path, json.dumps({**earlier, **results}, indent=2))
    missed = [n for n, r in results.items() if not r["ok"]]
    print(f"{len(results) - len(missed)} of {len(results)} cleared their bars"
          + (f"; missed: {', '.join(missed)}" if missed else ""))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
