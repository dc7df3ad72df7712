"""Evaluation beyond the trainer's own eval loss: named eval sets with bits-per-byte, and EleutherAI's
lm-evaluation-harness tasks, in the training loop (plugin.Evaluation) and from the command line
(`python -m t5like.eval`). docs/eval.md is the guide.

  plugin.py    the trainer plugin: data.eval_sets and eval.tasks at every eval
  lm.py        lm-eval's model interface over a t5like model (needs the `eval` extra)
  tasks.py     task names and local YAML files -> loaded lm-eval tasks, checked before any model
  loading.py   a workdir's checkpoint -> that model, on the run's mesh
  __main__.py  the CLI

Bits-per-byte itself is the loss's byte_sum (t5like/losses.py) over byte counts from t5like/data/byte_counts.py.
"""
