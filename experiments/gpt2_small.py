"""GPT-2 small (124M): decoder-only causal LM.

    python -m experiments.gpt2_small                       # base: C4 from the hub, for a TPU VM
    python -m experiments.gpt2_small size=tiny             # CPU: tiny model on the stdlib corpus
"""
from typing import Literal

from t5like import train
from t5like.config import CheckpointConfig, Config, MeshConfig, OptimConfig, TrainConfig, model_preset
from t5like.data import DataConfig


def config(size: Literal["base", "tiny"] = "base") -> Config:
    model = model_preset("gpt2_small", size)  # checks size is "base" or "tiny"
    if size == "tiny":
        return Config(
            model=model,
            data=DataConfig(source="stdlib", objective="lm", seq_len=128, max_files=300,
                            tokenizer_train_chars=1_000_000),
            optim=OptimConfig(learning_rate=2e-3, warmup_steps=30),
            train=TrainConfig(steps=300, batch_size=16, eval_every=100, eval_steps=8),
            checkpoint=CheckpointConfig(every=100),
            workdir="runs/gpt2_small_tiny")
    return Config(
        model=model,
        data=DataConfig(source="hub", hub_name="allenai/c4", hub_config="en", objective="lm", seq_len=1024,
                        tokenizer_train_chars=50_000_000),
        optim=OptimConfig(name="adamw", learning_rate=6e-4, schedule="cosine", warmup_steps=2000, b2=0.95,
                          weight_decay=0.1, grad_clip=1.0),
        train=TrainConfig(steps=100_000, batch_size=512, eval_every=2000, eval_steps=50),
        mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
        checkpoint=CheckpointConfig(every=2000, keep=3, keep_period=20_000),
        workdir="runs/gpt2_small")


if __name__ == "__main__":
    train.main(config)
