"""The embedded default: a small decoder-only LM on the Python standard library's own source.

    python -m experiments.quickstart                      # under 10 minutes on 2 CPU cores
    python -m experiments.quickstart train.steps=50 workdir=/tmp/qs

It trains a SentencePiece vocabulary on first run (cached in WORKDIR/tokenizer), trains, evaluates on
held-out stdlib files, and ends by printing a sample from the trained model.
"""
from t5like import train
from t5like.config import CheckpointConfig, Config, MeshConfig, ModelConfig, OptimConfig, TrainConfig
from t5like.data import DataConfig


def config() -> Config:
    return Config(
        model=ModelConfig(family="decoder", vocab_size=2048, d_model=192, num_heads=6, d_ff=768, num_layers=4,
                          max_len=256, position="rope", activation="swiglu", norm="rmsnorm", tie_embeddings=True),
        data=DataConfig(source="stdlib", objective="lm", seq_len=128, max_files=400,
                        tokenizer_train_chars=2_000_000),
        optim=OptimConfig(name="adamw", learning_rate=3e-3, schedule="cosine", warmup_steps=50, weight_decay=0.1),
        train=TrainConfig(steps=300, batch_size=16, eval_every=100, eval_steps=8),
        mesh=MeshConfig(data=-1),
        checkpoint=CheckpointConfig(every=100, keep=2),
        workdir="runs/quickstart",
    )


def sample(result: train.Result) -> str:
    """A short completion from the trained model, through the same path as `python -m t5like.generate`."""
    from t5like.inference import load_for_inference
    from t5like.generate import generate_text
    _, model, tokenizer = load_for_inference(result.config.workdir)
    return generate_text(model, tokenizer, ["def "], strategy="sample", temperature=0.8, top_k=40,
                         max_new_tokens=120, seed=0)[0]


if __name__ == "__main__":
    result = train.main(config)
    print("\n" + result.closing_line())
    print("--- sample: def ... ---")
    print("def " + sample(result))
