"""Llama (LlamaForCausalLM) <-> t5like decoder.

GQA (num_key_value_heads), RMSNorm, SwiGLU (gate_proj is the activated branch), RoPE with rope_theta.
HF stores q/k in the rotate-half layout (it permutes Meta's interleaved weights on conversion), which
is the layout t5like's apply_rope uses, so q_proj/k_proj map without a permutation.
"""
from __future__ import annotations

import numpy as np

from t5like.config import ModelConfig
from t5like.hf.common import linear_in, refuse, require, stack, unstack

ARCHITECTURE, MODEL_TYPE = "LlamaForCausalLM", "llama"
BUFFERS = ("model.layers.*.self_attn.rotary_emb.inv_freq",)


def rope_theta(hf: dict) -> float:
    """transformers 5 nests RoPE settings in rope_parameters; 4.x had rope_theta and rope_scaling."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    kind = params.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if kind != "default":
        raise refuse(ARCHITECTURE, "rope_type", kind, "t5like implements plain RoPE only (rope_type 'default'); "
                     "scaled variants (llama3, linear, dynamic, yarn) change the frequencies.")
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def to_model_config(hf: dict) -> ModelConfig:
    require(hf, ARCHITECTURE, "hidden_act", ("silu",), "silu")
    require(hf, ARCHITECTURE, "attention_bias", (False,), False)
    require(hf, ARCHITECTURE, "mlp_bias", (False,), False)
    d, n = hf["hidden_size"], hf["num_attention_heads"]
    return ModelConfig(
        family="decoder", vocab_size=hf["vocab_size"], d_model=d, num_heads=n,
        num_kv_heads=hf.get("num_key_value_heads") or n, head_dim=hf.get("head_dim") or d // n,
        d_ff=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
        max_len=hf.get("max_position_embeddings", 2048), position="rope", rope_theta=rope_theta(hf),
        activation="swiglu", norm="rmsnorm", norm_placement="pre", norm_eps=hf.get("rms_norm_eps", 1e-6),
        use_bias=False, tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        dropout=hf.get("attention_dropout", 0.0))


def from_hf(cfg: ModelConfig, t) -> dict:
    t.skip(BUFFERS)
    D, N, K, H, F, L, V = (cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.dim_per_head, cfg.d_ff, cfg.num_layers,
                           cfg.vocab_size)
    lay = lambda i, name, shape: t.take(f"model.layers.{i}.{name}", shape)
    w = lambda name, shape: stack(L, lambda i: linear_in(lay(i, name, shape)))
    layers = {
        "attn": {"query": w("self_attn.q_proj.weight", (N * H, D)).reshape(L, D, N, H),
                 "key": w("self_attn.k_proj.weight", (K * H, D)).reshape(L, D, K, H),
                 "value": w("self_attn.v_proj.weight", (K * H, D)).reshape(L, D, K, H),
                 "out": w("self_attn.o_proj.weight", (D, N * H)).reshape(L, N, H, D)},
        "attn_norm": {"scale": stack(L, lambda i: lay(i, "input_layernorm.weight", (D,)))},
        "mlp": {"wi_gate": w("mlp.gate_proj.weight", (F, D)), "wi": w("mlp.up_proj.weight", (F, D)),
                "wo": w("mlp.down_proj.weight", (D, F))},
        "mlp_norm": {"scale": stack(L, lambda i: lay(i, "post_attention_layernorm.weight", (D,)))},
    }
    params = {"embed": {"embedding": t.take("model.embed_tokens.weight", (V, D))},
              "decoder": {"layers": layers, "final_norm": {"scale": t.take("model.norm.weight", (D,))}}}
    if not cfg.tie_embeddings:
        params["lm_head"] = {"kernel": linear_in(t.take("lm_head.weight", (V, D)))}
    elif t.has("lm_head.weight"):
        if not np.array_equal(t.take("lm_head.weight", (V, D)), params["embed"]["embedding"]):
            raise ValueError(f"{ARCHITECTURE}: lm_head.weight differs from model.embed_tokens.weight but config.json "
                             "has tie_word_embeddings=true; set it to false to keep both.")
    return params


def to_hf_config(cfg: ModelConfig) -> dict:
    return {"architectures": [ARCHITECTURE], "model_type": MODEL_TYPE, "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.d_model, "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.kv_heads,
            "head_dim": cfg.dim_per_head, "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.num_layers,
            "max_position_embeddings": cfg.max_len, "hidden_act": "silu", "rms_norm_eps": cfg.norm_eps,
            "rope_theta": cfg.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
            "rope_scaling": None, "attention_bias": False, "mlp_bias": False,
            "tie_word_embeddings": cfg.tie_embeddings, "attention_dropout": cfg.dropout}


def check_exportable(cfg: ModelConfig) -> list[str]:
    want = dict(family="decoder", position="rope", activation="swiglu", norm="rmsnorm", norm_placement="pre",
                use_bias=False, scale_embeddings=False, embedding_norm=False, scale_attention=True,
                type_vocab_size=0, tied_head_rescale=False, attention_window=0)
    return [f"model.{k}={getattr(cfg, k)!r} (Llama needs {v!r})" for k, v in want.items() if getattr(cfg, k) != v]


def to_hf(cfg: ModelConfig, params: dict) -> dict[str, np.ndarray]:
    D = cfg.d_model
    lay = params["decoder"]["layers"]
    a, m = lay["attn"], lay["mlp"]
    L = a["query"].shape[0]
    T = lambda x: np.swapaxes(x, -1, -2)
    out = {"model.embed_tokens.weight": params["embed"]["embedding"],
           "model.norm.weight": params["decoder"]["final_norm"]["scale"]}
    for value, name in [
        (T(a["query"].reshape(L, D, -1)), "self_attn.q_proj.weight"),
        (T(a["key"].reshape(L, D, -1)), "self_attn.k_proj.weight"),
        (T(a["value"].reshape(L, D, -1)), "self_attn.v_proj.weight"),
        (T(a["out"].reshape(L, -1, D)), "self_attn.o_proj.weight"),
        (lay["attn_norm"]["scale"], "input_layernorm.weight"),
        (lay["mlp_norm"]["scale"], "post_attention_layernorm.weight"),
        (T(m["wi_gate"]), "mlp.gate_proj.weight"), (T(m["wi"]), "mlp.up_proj.weight"),
        (T(m["wo"]), "mlp.down_proj.weight")]:
        out.update(unstack(value, f"model.layers.{{}}.{name}"))
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = T(params["lm_head"]["kernel"])
    return out
