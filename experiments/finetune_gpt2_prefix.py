"""GPT-2-shaped decoder with prefix tuning (Li & Liang 2021): name the kind of a Python source line.

    python -m experiments.finetune_gpt2_prefix                              # a few minutes on 2 CPU cores
    python -m experiments.finetune_gpt2_prefix data.paths=my.jsonl          # your prompt/completion JSONL
    python -m experiments.finetune_gpt2_prefix checkpoint.init_from=runs/gpt2_small_tiny   # from a pre-trained run

Loss on the completion only. Writes held-out exact match of the greedy completion (KV-cache decoding, which
sees the prefixes), the un-fine-tuned model's and the most-common-completion baseline's into
WORKDIR/summary.json ("task").
"""
import dataclasses

from experiments import finetune_tasks
from t5like import train
from t5like.config import (CheckpointConfig, Config, FinetuneConfig, MeshConfig, OptimConfig, TrainConfig,
                           model_preset)
from t5like.data import DataConfig

TASK_FILE = "runs/finetune_data/line_kind_words.jsonl"


def config() -> Config:
    return Config(
        model=dataclasses.replace(model_preset("gpt2_small", "tiny"), vocab_size=1024, max_len=64, dropout=0.0),
        data=DataConfig(source="files", format="jsonl", paths=(TASK_FILE,), objective="completion", seq_len=48,
                        validation_fraction=0.1),
        optim=OptimConfig(learning_rate=1e-2, warmup_steps=20, schedule="cosine", weight_decay=0.0),
        train=TrainConfig(steps=300, batch_size=32, eval_every=0, eval_steps=8),
        finetune=FinetuneConfig(method="prefix", prefix_length=8, prefix_mlp=True, prefix_mlp_hidden=128),
        mesh=MeshConfig(data=-1),
        checkpoint=CheckpointConfig(every=1000, keep=1),
        workdir="runs/finetune_gpt2_prefix")


def main(argv=None) -> dict:
    from t5like.task_metrics import report
    finetune_tasks.ensure(TASK_FILE, finetune_tasks.line_kind_words)
    result = train.main(config, argv)
    return report(result.config.workdir)


if __name__ == "__main__":
    print(main())
