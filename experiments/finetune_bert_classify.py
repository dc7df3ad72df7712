"""BERT-shaped encoder: classify a line of Python source (comment / import / def / other), full or LoRA.

    python -m experiments.finetune_bert_classify                           # LoRA, ~1 min on 2 CPU cores
    python -m experiments.finetune_bert_classify finetune.method=full
    python -m experiments.finetune_bert_classify data.paths=my.jsonl model.num_classes=K   # your task
    python -m experiments.finetune_bert_classify checkpoint.init_from=runs/bert_base_tiny  # from a pre-trained run

Reads text/label JSONL (default: built from the standard library by experiments.finetune_tasks) through the
pooled classification head, then writes held-out accuracy, the un-fine-tuned model's and the majority-label
baseline's into WORKDIR/summary.json ("task").
"""
import dataclasses

from experiments import finetune_tasks
from t5like import train
from t5like.config import (CheckpointConfig, Config, FinetuneConfig, MeshConfig, OptimConfig, TrainConfig,
                           model_preset)
from t5like.data import DataConfig

TASK_FILE = "runs/finetune_data/line_kinds.jsonl"


def config() -> Config:
    return Config(
        model=dataclasses.replace(model_preset("bert_base", "tiny"), vocab_size=1024, num_classes=4, max_len=64,
                                  dropout=0.0),
        data=DataConfig(source="files", format="jsonl", paths=(TASK_FILE,), objective="classification", seq_len=48,
                        validation_fraction=0.1),
        optim=OptimConfig(learning_rate=1e-3, warmup_steps=20, schedule="cosine", weight_decay=0.0),
        train=TrainConfig(steps=200, batch_size=32, eval_every=0, eval_steps=8),
        finetune=FinetuneConfig(method="lora", lora_rank=8, lora_alpha=16.0, lora_targets=("q", "k", "v", "o")),
        mesh=MeshConfig(data=-1),
        checkpoint=CheckpointConfig(every=1000, keep=1),
        workdir="runs/finetune_bert_classify")


def main(argv=None) -> dict:
    from t5like.task_metrics import report
    finetune_tasks.ensure(TASK_FILE, finetune_tasks.line_kinds)
    result = train.main(config, argv)
    return report(result.config.workdir)


if __name__ == "__main__":
    print(main())
