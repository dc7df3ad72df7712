"""BERT-base (110M): encoder-only masked LM (15% of tokens, 80/10/10).

    python -m experiments.bert_base                        # base: C4 from the hub, for a TPU VM
    python -m experiments.bert_base size=tiny              # CPU: tiny model on the stdlib corpus
"""
from typing import Literal

from t5like import train
from t5like.config import CheckpointConfig, Config, MeshConfig, OptimConfig, TrainConfig, model_preset
from t5like.data import DataConfig


def config(size: Literal["base", "tiny"] = "base") -> Config:
    model = model_preset("bert_base", size)  # checks size is "base" or "tiny"
    if size == "tiny":
        return Config(
            model=model,
            data=DataConfig(source="stdlib", objective="mlm", seq_len=128, max_files=300,
                            tokenizer_train_chars=1_000_000),
            # Post-LN: at 2e-3 and above it stays on the unigram plateau (predicts the most frequent token).
            optim=OptimConfig(learning_rate=1e-3, warmup_steps=50),
            train=TrainConfig(steps=300, batch_size=16, eval_every=100, eval_steps=8),
            checkpoint=CheckpointConfig(every=100),
            workdir="runs/bert_base_tiny")
    return Config(
        model=model,
        data=DataConfig(source="hub", hub_name="allenai/c4", hub_config="en", objective="mlm", seq_len=512,
                        tokenizer_train_chars=50_000_000),
        optim=OptimConfig(name="adamw", learning_rate=1e-4, schedule="linear", warmup_steps=10_000, b2=0.999,
                          end_lr_fraction=0.0, weight_decay=0.01),
        train=TrainConfig(steps=1_000_000, batch_size=256, eval_every=10_000, eval_steps=50),
        mesh=MeshConfig(data=-1),
        checkpoint=CheckpointConfig(every=5000, keep=3, keep_period=100_000),
        workdir="runs/bert_base")


if __name__ == "__main__":
    train.main(config)
