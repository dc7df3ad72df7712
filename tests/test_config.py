"""Config validation: every numeric field refuses values that cannot be right, naming the field."""
import dataclasses
import re

import pytest

from t5like.config import CheckpointConfig, Config, ModelConfig, OptimConfig, TrainConfig
from t5like.data.config import DataConfig

NAN, INF = float("nan"), float("inf")
# Values no int field can take: zero/negative where counts must be positive, and wrong types.
NOT_A_COUNT = [0, -1, 1.5, True, None, "8"]
NOT_A_FRACTION = [-0.1, 1.0, 1.5, NAN, INF, "0.1", None]
NOT_NON_NEGATIVE = [-1e-9, -1, NAN, INF, -INF, "0", None]

BAD = {
    ModelConfig: {
        "vocab_size": NOT_A_COUNT, "d_model": NOT_A_COUNT, "num_heads": NOT_A_COUNT, "d_ff": NOT_A_COUNT,
        "num_layers": NOT_A_COUNT, "max_len": NOT_A_COUNT,
        # Optional fields: None means "the default", but 0 must not silently mean it too.
        "num_kv_heads": [0, -2, 1.0, True], "head_dim": [0, -8, 16.0, True], "num_decoder_layers": [0, -1, 2.0],
        "scan_unroll": [0, -1, 1.5, True, "8"], "attention_impl": ["flash", "XLA", 0],
        "parametrization": ["MUP", "", None], "base_width": [0, -32, 32.0, True], "base_d_ff": [0, -1, 1.5],
        "base_head_dim": [0, -8, 8.0], "base_depth": [0, -2, 2.0, True], "embed_init_std": [0, -1.0, NAN, INF, "1"],
        "norm_eps": [0, 0.0, -1e-6, NAN, INF, "1e-6", None],
        "rope_theta": [0, -10000.0, 1.0, 0.5, NAN, INF, None],
        "dropout": NOT_A_FRACTION,
        "num_classes": [-1, 2.0, None],
        "relative_buckets": [0, -32, 2, 3, 32.0], "relative_max_distance": [0, -1, 8, 16, 128.0],
    },
    OptimConfig: {
        "learning_rate": [0, 0.0, -3e-4, NAN, INF, "3e-4", None],
        "warmup_steps": [-1, 1.5, None],
        "end_lr_fraction": [-0.1, 1.1, NAN, INF],
        "wsd_decay_fraction": [-0.1, 1.1, NAN],
        "b1": [1.0, 1.5, -0.1, NAN, INF], "b2": [1.0, 2.0, -0.5, NAN],
        "eps": [0, 0.0, -1e-8, NAN, INF],
        "weight_decay": NOT_NON_NEGATIVE, "grad_clip": NOT_NON_NEGATIVE, "z_loss": NOT_NON_NEGATIVE,
        "label_smoothing": NOT_A_FRACTION,
        "grad_accum_steps": NOT_A_COUNT,
    },
    TrainConfig: {"steps": NOT_A_COUNT, "batch_size": NOT_A_COUNT, "eval_steps": NOT_A_COUNT,
                  "log_every": NOT_A_COUNT, "eval_every": [-1, 2.5, None], "peak_flops": NOT_NON_NEGATIVE},
    CheckpointConfig: {"every": NOT_A_COUNT, "keep": NOT_A_COUNT, "keep_period": [-1, 1.5, None]},
    DataConfig: {
        "seq_len": [0, 1, -5, 128.0], "validation_fraction": NOT_A_FRACTION,
        "noise_density": [0, 1, NAN, INF], "mlm_probability": [0.0, 1.0, NAN],
        "mean_noise_span_length": [0.5, -3.0, NAN, INF], "shuffle_buffer": [0, -1],
        "max_files": [-1, 2.0], "target_len": [-1], "num_sentinels": [-1], "num_proc": [0],
        "tokenizer_train_chars": [0],
    },
}
PREFIX = {ModelConfig: "model", OptimConfig: "optim", TrainConfig: "train", CheckpointConfig: "checkpoint",
          DataConfig: "data"}


def test_every_numeric_field_refuses_impossible_values():
    missed, unnamed = [], []
    for cls, fields in BAD.items():
        cls().validate()  # the defaults are valid
        for name, values in fields.items():
            for value in values:
                key = f"{PREFIX[cls]}.{name}={value!r}"
                try:
                    dataclasses.replace(cls(), **{name: value}).validate()
                except Exception as e:  # a ValueError naming the field and value; not a TypeError from deep inside
                    if not isinstance(e, ValueError) or not re.search(rf"\b{re.escape(key)}", str(e)):
                        unnamed.append((key, f"{type(e).__name__}: {e}"))
                else:
                    missed.append(key)
    assert not missed and not unnamed, f"accepted: {missed}; errors not naming the field: {unnamed}"
    with pytest.raises(ValueError, match=r"seed=1\.5"):
        Config(seed=1.5).validate()


def test_none_means_default_and_explicit_values_are_kept():
    cfg = ModelConfig(d_model=128, num_heads=4, num_layers=3).validate()
    assert (cfg.kv_heads, cfg.dim_per_head, cfg.decoder_layers) == (4, 32, 3)
    cfg = ModelConfig(d_model=128, num_heads=4, num_kv_heads=2, head_dim=16, num_layers=3,
                      num_decoder_layers=1, family="encoder_decoder").validate()
    assert (cfg.kv_heads, cfg.dim_per_head, cfg.decoder_layers) == (2, 16, 1)
