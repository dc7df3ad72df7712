"""The IsoFLOP sweep at TPU scale: 1e18 to 1e20 FLOPs, Llama-style decoders on C4.

    python -m t5like.scaling.design --experiment experiments.scaling_isoflop --out plan.csv
    python -m launch.sweep experiments.scaling_isoflop --workdir gs://.../isoflop   # with a cluster backend

5 budgets (1e18 … 1e20, half a decade apart) × 7 sizes over 1/4–4× the Chinchilla guess sqrt(C/120):
about 28M to 3.6B parameters. Shapes: head_dim 128, d_model / num_layers near 128 (64–192), SwiGLU
d_ff = 8/3·d_model rounded to 128, GQA with 4 query heads per kv head. Batch 256 × 2048 tokens,
doubled while a trial would take more than 50k steps. See t5like/scaling/design.py for the rules.
"""
from t5like import train
from t5like.config import CheckpointConfig, Config, MeshConfig, ModelConfig, OptimConfig, TrainConfig
from t5like.data import DataConfig
from t5like.scaling.design import IsoFlopDesign, Trial, plan_isoflop


def config() -> Config:
    return Config(
        model=ModelConfig(family="decoder", vocab_size=32000, d_model=1024, num_heads=8, num_kv_heads=2,
                          head_dim=128, d_ff=2816, num_layers=8, max_len=2048, position="rope", activation="swiglu",
                          norm="rmsnorm", tie_embeddings=False, dtype="bfloat16", remat="minimal"),
        data=DataConfig(source="hub", hub_name="allenai/c4", hub_config="en", objective="lm", seq_len=2048,
                        tokenizer_train_chars=50_000_000),
        optim=OptimConfig(name="adamw", learning_rate=1e-3, schedule="cosine", warmup_steps=1000, b2=0.95,
                          weight_decay=0.1, grad_clip=1.0, end_lr_fraction=0.1),
        train=TrainConfig(steps=10_000, batch_size=256, eval_every=0, eval_steps=40),
        mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
        checkpoint=CheckpointConfig(every=2000, keep=2),
        workdir="runs/scaling_isoflop",
    )


def design() -> IsoFlopDesign:
    return IsoFlopDesign(budgets=(1e18, 3e18, 1e19, 3e19, 1e20), sizes_per_budget=7, span=(0.25, 4.0),
                         head_dim=128, aspect_ratio=128.0, aspect_range=(64.0, 192.0), min_layers=2, max_layers=64,
                         min_steps=1000, max_steps=50_000, batch_multiple=64, lr_exponent=0.5,
                         warmup_fraction=0.02, checkpoints_per_trial=10)


def sweep() -> list[Trial]:
    return list(plan_isoflop(config(), design()).trials)


if __name__ == "__main__":
    train.main(config)
