"""T5 v1.1 base (248M): encoder-decoder, span corruption (15% noise, mean span 3), Adafactor + rsqrt.

    python -m experiments.t5_base                          # base: C4 from the hub, for a TPU VM
    python -m experiments.t5_base size=tiny                # CPU: tiny model on the stdlib corpus
"""
from typing import Literal

from t5like import train
from t5like.config import CheckpointConfig, Config, MeshConfig, OptimConfig, TrainConfig, model_preset
from t5like.data import DataConfig


def config(size: Literal["base", "tiny"] = "base") -> Config:
    model = model_preset("t5_v1_1_base", size)  # checks size is "base" or "tiny"
    if size == "tiny":
        return Config(
            model=model,
            data=DataConfig(source="stdlib", objective="span_corruption", seq_len=128, max_files=300,
                            tokenizer_train_chars=1_000_000),
            optim=OptimConfig(name="adafactor", learning_rate=1e-2, schedule="rsqrt", warmup_steps=30,
                              weight_decay=0.0),
            train=TrainConfig(steps=300, batch_size=16, eval_every=100, eval_steps=8),
            checkpoint=CheckpointConfig(every=100),
            workdir="runs/t5_base_tiny")
    return Config(
        model=model,
        data=DataConfig(source="hub", hub_name="allenai/c4", hub_config="en", objective="span_corruption",
                        seq_len=512, target_len=114, tokenizer_train_chars=50_000_000),
        optim=OptimConfig(name="adafactor", learning_rate=1e-2, schedule="rsqrt", warmup_steps=10_000,
                          weight_decay=0.0, grad_clip=0.0),
        train=TrainConfig(steps=524_288, batch_size=128, eval_every=10_000, eval_steps=50),
        mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
        checkpoint=CheckpointConfig(every=5000, keep=3, keep_period=100_000),
        workdir="runs/t5_base")


if __name__ == "__main__":
    train.main(config)
