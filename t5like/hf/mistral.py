"""Mistral (MistralForCausalLM) <-> t5like decoder with a sliding window.

Mistral's weights and layers are Llama's (t5like.hf.llama maps them); its config adds `sliding_window`: a
query sees the last W tokens, itself included, which is model.attention_window=W (None: full attention).
"""
from __future__ import annotations

import dataclasses

from t5like.config import ModelConfig
from t5like.hf import llama
from t5like.hf.common import require

ARCHITECTURE, MODEL_TYPE = "MistralForCausalLM", "mistral"


def to_model_config(hf: dict) -> ModelConfig:
    require(hf, ARCHITECTURE, "hidden_act", ("silu",), "silu")
    window = hf.get("sliding_window") or 0
    if not isinstance(window, int) or window < 0:
        raise ValueError(f"{ARCHITECTURE}: config.json has sliding_window={window!r}; it must be a positive "
                         "integer, or null for full attention.")
    return dataclasses.replace(llama.to_model_config({**hf, "attention_bias": False, "mlp_bias": False}),
                               attention_window=window, max_len=hf.get("max_position_embeddings", 4096 * 32))


from_hf = llama.from_hf
to_hf = llama.to_hf


def to_hf_config(cfg: ModelConfig) -> dict:
    out = {k: v for k, v in llama.to_hf_config(cfg).items() if k not in ("attention_bias", "mlp_bias")}
    return {**out, "architectures": [ARCHITECTURE], "model_type": MODEL_TYPE,
            "sliding_window": cfg.attention_window or None}


def check_exportable(cfg: ModelConfig) -> list[str]:
    """Llama's requirements, a sliding window allowed (Llama refuses one)."""
    return [r.replace("Llama needs", "Mistral needs")
            for r in llama.check_exportable(dataclasses.replace(cfg, attention_window=0))]
