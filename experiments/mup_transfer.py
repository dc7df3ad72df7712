"""Does the best learning rate transfer? Tiny decoder LMs on the standard library's source, sp against µP across
width and sp against CompleteP across depth (docs/mup.md; the figure: benchmarks/mup_transfer.py).

    python benchmarks/mup_transfer.py --workdir /tmp/mup_transfer            # the sweep, the argmins, the PNG
    python -m launch.sweep experiments.mup_transfer --workdir /tmp/mup_transfer --parallel 2   # just the sweep
    python -m experiments.mup_transfer workdir=/tmp/mup_base                # the base model alone

Width grid: d_model 32, 64, 128, 256 (4 heads, so the head dim grows 8 -> 64; d_ff = 4 d_model, 4 layers) x
7 learning rates a factor 2 apart x {sp, mup}; µP's base shape is width 32. Depth grid: 2, 4, 8, 16 layers at
width 64 x the same learning rates x {sp, completep}, base depth 2, both with a unit-scale residual stream
(model.embed_init_std=1: see docs/mup.md for why the depth rule needs it) and an untied head (a unit-scale
tied table would start the logits at std sqrt(d_model)). 200 steps of Adam at batch 8 x 64 tokens each, a
constant learning rate after a 20-step warmup, no weight decay; eval on 16 held-out batches.

MUP_TRANSFER_GRID=reduced (read where the sweep is planned) shrinks it to 2 widths, 2 depths and 2 learning
rates, to check the whole path in a few minutes; pass --set train.steps=20 too.
"""
import os

from t5like import train
from t5like.config import CheckpointConfig, Config, MeshConfig, ModelConfig, OptimConfig, TrainConfig
from t5like.data import DataConfig
from t5like.scaling.design import Trial, grid

WIDTHS = (32, 64, 128, 256)
DEPTHS = (2, 4, 8, 16)
LEARNING_RATES = tuple(2.0 ** e for e in range(-11, -4))  # 4.9e-4 ... 3.1e-2
DEPTH_WIDTH = 64


def config() -> Config:
    """The base shape (width 32, 4 layers); a trial overrides the width or depth, the learning rate and the
    parametrization. base_width/base_depth only matter under mup/completep."""
    return Config(
        model=ModelConfig(family="decoder", vocab_size=512, d_model=32, num_heads=4, d_ff=128, num_layers=4,
                          max_len=64, position="rope", activation="gelu", norm="rmsnorm", tie_embeddings=True,
                          base_width=32, base_depth=2),
        data=DataConfig(source="stdlib", objective="lm", seq_len=64, max_files=300, num_sentinels=0,
                        tokenizer_train_chars=1_000_000),
        optim=OptimConfig(name="adamw", learning_rate=3e-3, schedule="constant", warmup_steps=20, weight_decay=0.0),
        train=TrainConfig(steps=200, batch_size=8, eval_every=0, eval_steps=16, log_every=20),
        mesh=MeshConfig(data=-1),
        checkpoint=CheckpointConfig(every=200, keep=1),
        workdir="runs/mup_transfer",
    )


def _lr(x: float) -> str:
    return f"{x:.4g}"


def sweep() -> list[Trial]:
    reduced = os.environ.get("MUP_TRANSFER_GRID") == "reduced"
    widths, depths = (WIDTHS[:2], DEPTHS[:2]) if reduced else (WIDTHS, DEPTHS)
    lrs = [_lr(x) for x in (LEARNING_RATES[2:4] if reduced else LEARNING_RATES)]
    trials, base_config = [], config()
    for parametrization in ("sp", "mup"):
        for w in widths:
            trials += grid({"optim.learning_rate": lrs}, base=(
                f"model.parametrization={parametrization}", f"model.d_model={w}", f"model.d_ff={4 * w}"), config=base_config)
    for parametrization in ("sp", "completep"):
        for depth in depths:
            trials += grid({"optim.learning_rate": lrs}, base=(
                f"model.parametrization={parametrization}", f"model.d_model={DEPTH_WIDTH}",
                f"model.d_ff={4 * DEPTH_WIDTH}", f"model.base_width={DEPTH_WIDTH}", f"model.num_layers={depth}",
                "model.embed_init_std=1.0", "model.tie_embeddings=false", "model.scan_unroll=1"), config=base_config)
    return trials


def prepare(workdir: str) -> list[str]:
    """One shared tokenizer and tokenised corpus for every trial (as experiments/scaling_tiny.py)."""
    import dataclasses
    from t5like.data import get_tokenizer, make_iterator
    cfg = config()
    path = os.path.join(os.path.abspath(workdir), "tokenizer", "spm.model")
    tokenizer = get_tokenizer(cfg.data, workdir, cfg.model.vocab_size)
    data = dataclasses.replace(cfg.data, tokenizer_path=path)
    for split in ("train", "validation"):
        make_iterator(data, tokenizer, split, batch_size=cfg.train.batch_size, seed=cfg.seed)
    return [f"data.tokenizer_path={path}", "train.progress=false"]


if __name__ == "__main__":
    result = train.main(config)
    print(f"final train loss {result.loss:.3f}, eval loss {result.eval_loss:.3f} (workdir {result.config.workdir})")
