"""Direct preference optimisation (DPO) of a GPT-2-shaped decoder on pairs where one answer is right by construction.

    python -m experiments.finetune_dpo                                 # a few minutes on 2 CPU cores
    python -m experiments.finetune_dpo finetune.method=lora            # reference = adapters off, no copy
    python -m experiments.finetune_dpo checkpoint.init_from=runs/X     # from a run (e.g. an SFT one) of this shape
    python -m experiments.finetune_dpo data.paths=my_pairs.jsonl       # your prompt/chosen/rejected JSONL

Each pair (experiments.finetune_tasks.line_kind_prefs): a Python source line + " #"; chosen: its kind, rejected:
another kind. finetune.method=full keeps a frozen copy of the starting parameters as the reference
(t5like/preference.py). Writes held-out preference accuracy (the share of pairs whose chosen answer gets the
higher reward), the reward margin and the un-tuned model's own ranking into WORKDIR/summary.json ("task").
"""
import dataclasses

from experiments import finetune_tasks
from t5like import train
from t5like.config import (CheckpointConfig, Config, FinetuneConfig, MeshConfig, OptimConfig, TrainConfig,
                           model_preset)
from t5like.data import DataConfig

TASK_FILE = "runs/finetune_data/line_kind_prefs.jsonl"


def config() -> Config:
    return Config(
        model=dataclasses.replace(model_preset("gpt2_small", "tiny"), vocab_size=1024, max_len=64, dropout=0.0),
        data=DataConfig(source="files", format="jsonl", paths=(TASK_FILE,), objective="dpo", seq_len=64,
                        validation_fraction=0.1),
        optim=OptimConfig(learning_rate=3e-3, warmup_steps=20, schedule="cosine", weight_decay=0.0),
        train=TrainConfig(steps=200, batch_size=32, eval_every=0, eval_steps=4),
        finetune=FinetuneConfig(method="full", dpo_beta=0.1),
        mesh=MeshConfig(data=-1),
        checkpoint=CheckpointConfig(every=1000, keep=1),
        workdir="runs/finetune_dpo")


def main(argv=None) -> dict:
    from t5like.chat_metrics import dpo_report
    finetune_tasks.ensure(TASK_FILE, finetune_tasks.line_kind_prefs)
    result = train.main(config, argv)
    return dpo_report(result.config.workdir)


if __name__ == "__main__":
    print(main())
