"""T5-shaped encoder-decoder with LoRA: name the kind of a Python source line, text-to-text.

    python -m experiments.finetune_t5_lora                                  # a few minutes on 2 CPU cores
    python -m experiments.finetune_t5_lora data.paths=my.jsonl              # your input/target JSONL
    python -m experiments.finetune_t5_lora data.paths=runs/finetune_data/signature_names.jsonl  # def line -> name
    python -m experiments.finetune_t5_lora checkpoint.init_from=runs/t5_base_tiny   # from a pre-trained run

Writes held-out exact match (greedy decoding with the KV cache), the un-fine-tuned model's and the trivial
baseline's (copy the input, or always the most common target) into WORKDIR/summary.json ("task").
"""
import dataclasses

from experiments import finetune_tasks
from t5like import train
from t5like.config import (CheckpointConfig, Config, FinetuneConfig, MeshConfig, OptimConfig, TrainConfig,
                           model_preset)
from t5like.data import DataConfig

TASK_FILE = "runs/finetune_data/line_kinds_text.jsonl"


def config() -> Config:
    return Config(
        model=dataclasses.replace(model_preset("t5_v1_1_base", "tiny"), vocab_size=1024, max_len=64),
        data=DataConfig(source="files", format="jsonl", paths=(TASK_FILE,), objective="seq2seq", seq_len=32,
                        target_len=16, validation_fraction=0.1),
        optim=OptimConfig(learning_rate=3e-3, warmup_steps=20, schedule="cosine", weight_decay=0.0),
        train=TrainConfig(steps=300, batch_size=32, eval_every=0, eval_steps=8),
        finetune=FinetuneConfig(method="lora", lora_rank=16, lora_alpha=32.0,
                                lora_targets=("q", "k", "v", "o", "mlp_in", "mlp_gate", "mlp_out")),
        mesh=MeshConfig(data=-1),
        checkpoint=CheckpointConfig(every=1000, keep=1),
        workdir="runs/finetune_t5_lora")


def main(argv=None) -> dict:
    from t5like.task_metrics import report
    finetune_tasks.ensure(TASK_FILE, finetune_tasks.line_kinds_text)
    result = train.main(config, argv)
    return report(result.config.workdir)


if __name__ == "__main__":
    print(main())
