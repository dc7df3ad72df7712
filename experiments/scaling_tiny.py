"""An IsoFLOP sweep you can run on a laptop: tiny decoder LMs on the Python standard library's source.

    python -m launch.sweep experiments.scaling_tiny --workdir /tmp/sweep_tiny --parallel 2   # sweep, fit, plots
    python -m t5like.scaling.design --experiment experiments.scaling_tiny --out plan.csv     # just the plan
    python -m experiments.scaling_tiny workdir=/tmp/tiny_base                                # the base model alone

3 budgets × 5 sizes, 5K to 220K parameters (about 20 minutes with --parallel 2 on 2 CPU cores). The
shapes: head_dim 8, d_model / num_layers near 32 (8–64), SwiGLU d_ff = 8/3·d_model; the sizes span 1/4–4×
sqrt(C / (6·100)), i.e. centred on 100 tokens per parameter rather than Chinchilla's 20 (see design()).
Batches grow for the smallest models so no trial takes more than 2000 steps. The vocabulary is small
(512) so that embeddings do not swamp models this small, and the corpus is the whole standard library
(~17M tokens), so even the smallest model at the largest budget sees each token about once.
See t5like/scaling/design.py for the rules.
"""
import os

from t5like import train
from t5like.config import CheckpointConfig, Config, MeshConfig, ModelConfig, OptimConfig, TrainConfig
from t5like.data import DataConfig
from t5like.scaling.design import IsoFlopDesign, Trial, plan_isoflop


def config() -> Config:
    """The family every trial shares; the design replaces the shape, steps, batch, lr and warmup."""
    return Config(
        model=ModelConfig(family="decoder", vocab_size=512, d_model=64, num_heads=8, d_ff=176, num_layers=2,
                          max_len=128, position="rope", activation="swiglu", norm="rmsnorm", tie_embeddings=True),
        data=DataConfig(source="stdlib", objective="lm", seq_len=128, max_files=0, num_sentinels=0,
                        tokenizer_train_chars=1_000_000),
        optim=OptimConfig(name="adamw", learning_rate=3e-3, schedule="cosine", warmup_steps=20, weight_decay=0.1),
        train=TrainConfig(steps=500, batch_size=16, eval_every=0, eval_steps=16, log_every=10),
        mesh=MeshConfig(data=-1),
        checkpoint=CheckpointConfig(every=250, keep=1),
        workdir="runs/scaling_tiny",
    )


def design() -> IsoFlopDesign:
    # tokens_per_param=100 centres the sizes: a first sweep centred on Chinchilla's 20 found the optimum
    # at roughly 80-200 tokens per parameter at these budgets (tiny models, a 512 vocabulary, few steps).
    return IsoFlopDesign(budgets=(2e11, 6e11, 2e12), sizes_per_budget=5, span=(0.25, 4.0), tokens_per_param=100.0,
                         head_dim=8, aspect_ratio=32.0, aspect_range=(8.0, 64.0), min_layers=1, max_layers=8,
                         min_steps=150, max_steps=2000, batch_multiple=8, lr_exponent=0.5, warmup_fraction=0.05,
                         checkpoints_per_trial=2)


def sweep() -> list[Trial]:
    return list(plan_isoflop(config(), design()).trials)


def prepare(workdir: str) -> list[str]:
    """Run once by the sweep runner before any trial: one shared tokenizer (trained here, not 15 times),
    the corpus tokenised into the datasets cache (so trials start in seconds), no progress bars in logs."""
    import dataclasses
    from t5like.data import get_tokenizer, make_iterator
    cfg = config()
    path = os.path.join(os.path.abspath(workdir), "tokenizer", "spm.model")
    tokenizer = get_tokenizer(cfg.data, workdir, cfg.model.vocab_size)
    data = dataclasses.replace(cfg.data, tokenizer_path=path)  # the trials' data config, so the cache matches
    for split in ("train", "validation"):
        make_iterator(data, tokenizer, split, batch_size=cfg.train.batch_size, seed=cfg.seed)
    return [f"data.tokenizer_path={path}", "train.progress=false"]


if __name__ == "__main__":
    result = train.main(config)
    print(result.closing_line())
