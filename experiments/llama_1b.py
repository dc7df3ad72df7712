"""Llama-style 1.1B decoder (TinyLlama's shape: d=2048, 22 layers, GQA 16/4, SwiGLU 5632, 32k vocab), seq 2048.

    python -m launch.compile experiments.llama_1b --topology v5p-8       # will it fit? (on any CPU machine)
    python -m launch.tpu run experiments.llama_1b --name llama1b --tpu v5p-8 --zone us-east5-a \\
        --workdir gs://BUCKET/llama1b                                     # train on a Cloud TPU VM
    python -m experiments.llama_1b size=tiny                              # CPU: same architecture, tiny

bf16 compute with fp32 parameters and AdamW state, FSDP over every chip, full remat per layer.
"""
import dataclasses
from typing import Literal

from t5like import train
from t5like.config import CheckpointConfig, Config, MeshConfig, OptimConfig, TrainConfig, model_preset
from t5like.data import DataConfig


def config(size: Literal["base", "tiny"] = "base") -> Config:
    model = model_preset("llama_style", size)  # checks size is "base" or "tiny"
    if size == "tiny":
        return Config(
            model=model,
            data=DataConfig(source="stdlib", objective="lm", seq_len=128, max_files=300,
                            tokenizer_train_chars=1_000_000),
            optim=OptimConfig(learning_rate=2e-3, warmup_steps=30),
            train=TrainConfig(steps=300, batch_size=16, eval_every=100, eval_steps=8),
            mesh=MeshConfig(data=1, fsdp=-1),
            checkpoint=CheckpointConfig(every=100),
            workdir="runs/llama_1b_tiny")
    return Config(
        model=dataclasses.replace(model, dtype="bfloat16", remat="full"),
        data=DataConfig(source="hub", hub_name="allenai/c4", hub_config="en", objective="lm", seq_len=2048,
                        tokenizer_train_chars=50_000_000),
        optim=OptimConfig(name="adamw", learning_rate=3e-4, schedule="cosine", warmup_steps=2000, b2=0.95,
                          weight_decay=0.1, grad_clip=1.0),
        # 256 x 2048 = 0.5M tokens per step; 40k steps = 21B tokens (about 20 per parameter).
        train=TrainConfig(steps=40_000, batch_size=256, eval_every=2000, eval_steps=50),
        mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
        checkpoint=CheckpointConfig(every=1000, keep=3, keep_period=10_000),
        workdir="runs/llama_1b")


if __name__ == "__main__":
    train.main(config)
