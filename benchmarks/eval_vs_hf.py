"""t5like's lm-eval model against lm-eval's own Hugging Face backend (`hf`), same tasks, same weights, one
process; one JSON line.

    python benchmarks/eval_vs_hf.py [--examples 200] [--docs 24] [--rounds 2] [--torch-threads 2]

The model: a randomly initialised GPT-2 (transformers, no download; --layers/--d-model/--positions) with a
byte-level BPE tokenizer trained here on the standard library's source, imported with t5like.hf. The tasks:
local lm-eval YAML tasks on standard-library text, a 4-way multiple choice (loglikelihood: acc, acc_norm) and
a rolling perplexity task (loglikelihood_rolling: bits_per_byte). Both backends run lm-eval's simple_evaluate
on the same tasks, interleaved round by round (t5like, hf, t5like, ...), so load from other processes hits
both alike. Reported: each backend's first round (t5like's includes its compiles; hf has none) and best later
round, the speed-up of the best rounds, t5like's compile count, and whether the metrics agree (acc and
acc_norm equal, bits_per_byte within 1e-4). CPU: torch with --torch-threads, JAX on the host's cores.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, __file__.rsplit("/benchmarks/", 1)[0])


def stdlib_texts(n: int, chars: int) -> list[str]:
    from t5like.data.sources import stdlib_files
    out = []
    for path in stdlib_files(0):
        text = open(path, encoding="utf-8", errors="replace").read()
        if len(text) >= chars:
            out.append(text[:chars])
        if len(out) == n:
            break
    return out


def make_model(root: str, args) -> tuple[str, str]:
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from t5like.hf.__main__ import import_checkpoint
    hf_dir, workdir = os.path.join(root, "hf"), os.path.join(root, "run")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=args.d_model, n_head=args.d_model // 64, n_layer=args.layers,
                                     vocab_size=args.vocab, n_positions=args.positions, bos_token_id=0, eos_token_id=0)
    transformers.GPT2LMHeadModel(config).eval().save_pretrained(hf_dir)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(stdlib_texts(200, 5000), trainers.BpeTrainer(
        vocab_size=args.vocab, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(os.path.join(hf_dir, "tokenizer.json"))
    import_checkpoint(hf_dir, workdir)
    return hf_dir, workdir


def make_tasks(root: str, args) -> str:
    import random
    d = os.path.join(root, "tasks")
    os.makedirs(d)
    rng = random.Random(0)
    texts = stdlib_texts(args.examples + args.docs, 1200)
    mc = []
    for i in range(args.examples):
        t = texts[i]
        cut = rng.randrange(100, 600)
        choices = [t[cut:cut + 40]] + [texts[rng.randrange(len(texts))][cut:cut + 40] for _ in range(3)]
        mc.append({"question": t[max(0, cut - 300):cut], "choices": choices, "label": 0})
    docs = [{"text": t} for t in texts[args.examples:]]
    for name, rows in (("mc", mc), ("docs", docs)):
        with open(os.path.join(d, f"{name}.jsonl"), "w") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))
    data = lambda name: (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {d}/{name}.jsonl\n"
                         "test_split: test\n")
    with open(os.path.join(d, "bench_mc.yaml"), "w") as f:
        f.write("task: bench_mc\n" + data("mc") + 'output_type: multiple_choice\ndoc_to_text: "{{question}}"\n'
                'doc_to_choice: "{{choices}}"\ndoc_to_target: label\nmetric_list:\n  - metric: acc\n'
                "  - metric: acc_norm\n")
    with open(os.path.join(d, "bench_ppl.yaml"), "w") as f:
        f.write("task: bench_ppl\n" + data("docs") + 'output_type: loglikelihood_rolling\ndoc_to_text: ""\n'
                'doc_to_target: "{{text}}"\nmetric_list:\n  - metric: bits_per_byte\n')
    return d


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=200, help="multiple-choice examples (4 requests each)")
    ap.add_argument("--docs", type=int, default=24, help="documents of the rolling task (1200 characters each)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--positions", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16, help="requests per forward pass, both backends")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--torch-threads", type=int, default=2)
    args = ap.parse_args()

    import torch
    from lm_eval.models.huggingface import HFLM

    from t5like.eval.loading import lm_from_workdir
    from t5like.eval.tasks import load_tasks, metric_rows, run_tasks
    torch.set_num_threads(args.torch_threads)
    root = tempfile.mkdtemp(prefix="eval-vs-hf-")
    hf_dir, workdir = make_model(root, args)
    tasks = ["bench_mc", "bench_ppl"]
    manager, _ = load_tasks(tasks, make_tasks(root, args))
    ours = lm_from_workdir(workdir, batch_size=args.batch_size)
    hf = HFLM(pretrained=hf_dir, backend="causal", batch_size=args.batch_size, device="cpu", dtype="float32",
              max_length=ours.max_length)
    times = {"t5like": [], "hf": []}
    metrics = {}
    for _ in range(args.rounds):
        for name, lm in (("t5like", ours), ("hf", hf)):
            start = time.perf_counter()
            metrics[name] = metric_rows(run_tasks(lm, tasks, manager))
            times[name].append(time.perf_counter() - start)
    a, b = metrics["t5like"], metrics["hf"]
    agree = (a.keys() == b.keys() and all(a[k] == b[k] for k in a if k.endswith(("/acc", "/acc_norm")))
             and all(abs(a[k] - b[k]) <= 1e-4 for k in a if k.endswith("/bits_per_byte")))
    best = {k: min(v[1:] or v) for k, v in times.items()}
    print(json.dumps({"benchmark": "eval_vs_hf", "model": f"gpt2 {args.layers}x{args.d_model} vocab {args.vocab}",
                      "requests": {"loglikelihood": 4 * args.examples, "rolling_docs": args.docs},
                      "batch_size": args.batch_size, "first_s": {k: round(v[0], 2) for k, v in times.items()},
                      "best_s": {k: round(v, 2) for k, v in best.items()},
                      "speedup": round(best["hf"] / best["t5like"], 2), "t5like_compiles": ours.compiles,
                      "metrics_agree": agree, "metrics": {"t5like": a, "hf": b},
                      "devices": f"{len(__import__('jax').devices())} x {__import__('jax').devices()[0].platform}",
                      "torch_threads": args.torch_threads}))


if __name__ == "__main__":
    main()
