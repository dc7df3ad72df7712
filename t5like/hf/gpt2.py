"""GPT-2 (GPT2LMHeadModel) <-> t5like decoder.

Conv1D weights are [in, out] already; c_attn fuses q, k, v along its output; gelu_new is t5like's
"gelu" (tanh approximation); learned positions, pre-LayerNorm with biases, tied head.
"""
from __future__ import annotations

import numpy as np

from t5like.config import ModelConfig
from t5like.hf.common import ACTIVATIONS_BACK, activation, require, stack, unstack

ARCHITECTURE, MODEL_TYPE = "GPT2LMHeadModel", "gpt2"
# Buffers some GPT-2 files carry (causal masks), not weights.
BUFFERS = ("*.attn.bias", "*.attn.masked_bias")


def to_model_config(hf: dict) -> ModelConfig:
    require(hf, ARCHITECTURE, "scale_attn_weights", (True,), True)
    require(hf, ARCHITECTURE, "scale_attn_by_inverse_layer_idx", (False,), False)
    require(hf, ARCHITECTURE, "add_cross_attention", (False,), False)
    d = hf["n_embd"]
    return ModelConfig(
        family="decoder", vocab_size=hf["vocab_size"], d_model=d, num_heads=hf["n_head"],
        d_ff=hf.get("n_inner") or 4 * d, num_layers=hf["n_layer"], max_len=hf["n_positions"], position="learned",
        activation=activation(hf, ARCHITECTURE, "activation_function", "gelu_new"), norm="layernorm",
        norm_placement="pre", norm_eps=hf.get("layer_norm_epsilon", 1e-5), use_bias=True,
        tie_embeddings=hf.get("tie_word_embeddings", True), dropout=hf.get("resid_pdrop", 0.0))


def _prefix(t) -> str:
    return "transformer." if t.has("transformer.wte.weight") else ""  # the original files have no prefix


def from_hf(cfg: ModelConfig, t) -> dict:
    t.skip(BUFFERS)
    p = _prefix(t)
    D, N, H, F, L = cfg.d_model, cfg.num_heads, cfg.dim_per_head, cfg.d_ff, cfg.num_layers
    h = lambda i, name, shape: t.take(f"{p}h.{i}.{name}", shape)

    def qkv(part: int, bias: bool):
        def one(i):
            if bias:
                return h(i, "attn.c_attn.bias", (3 * D,))[part * D:(part + 1) * D].reshape(N, H)
            return h(i, "attn.c_attn.weight", (D, 3 * D))[:, part * D:(part + 1) * D].reshape(D, N, H)
        return stack(L, one)

    layers = {
        "attn_norm": {"scale": stack(L, lambda i: h(i, "ln_1.weight", (D,))),
                      "bias": stack(L, lambda i: h(i, "ln_1.bias", (D,)))},
        "attn": {"query": qkv(0, False), "key": qkv(1, False), "value": qkv(2, False),
                 "query_bias": qkv(0, True), "key_bias": qkv(1, True), "value_bias": qkv(2, True),
                 "out": stack(L, lambda i: h(i, "attn.c_proj.weight", (D, D)).reshape(N, H, D)),
                 "out_bias": stack(L, lambda i: h(i, "attn.c_proj.bias", (D,)))},
        "mlp_norm": {"scale": stack(L, lambda i: h(i, "ln_2.weight", (D,))),
                     "bias": stack(L, lambda i: h(i, "ln_2.bias", (D,)))},
        "mlp": {"wi": stack(L, lambda i: h(i, "mlp.c_fc.weight", (D, F))),
                "wi_bias": stack(L, lambda i: h(i, "mlp.c_fc.bias", (F,))),
                "wo": stack(L, lambda i: h(i, "mlp.c_proj.weight", (F, D))),
                "wo_bias": stack(L, lambda i: h(i, "mlp.c_proj.bias", (D,)))},
    }
    params = {
        "embed": {"embedding": t.take(f"{p}wte.weight", (cfg.vocab_size, D))},
        "learned_positions": {"table": t.take(f"{p}wpe.weight", (cfg.max_len, D))},
        "decoder": {"layers": layers, "final_norm": {"scale": t.take(f"{p}ln_f.weight", (D,)),
                                                     "bias": t.take(f"{p}ln_f.bias", (D,))}},
    }
    if not cfg.tie_embeddings:
        params["lm_head"] = {"kernel": t.take("lm_head.weight", (cfg.vocab_size, D)).T.copy()}
    elif t.has("lm_head.weight"):  # some files store the tied head too: it must be the same matrix
        if not np.array_equal(t.take("lm_head.weight", (cfg.vocab_size, D)), params["embed"]["embedding"]):
            raise ValueError(f"{ARCHITECTURE}: lm_head.weight differs from transformer.wte.weight but config.json "
                             "has tie_word_embeddings=true; set it to false to keep both.")
    return params


def to_hf_config(cfg: ModelConfig) -> dict:
    return {"architectures": [ARCHITECTURE], "model_type": MODEL_TYPE, "vocab_size": cfg.vocab_size,
            "n_embd": cfg.d_model, "n_head": cfg.num_heads, "n_layer": cfg.num_layers, "n_inner": cfg.d_ff,
            "n_positions": cfg.max_len, "activation_function": ACTIVATIONS_BACK[cfg.activation],
            "layer_norm_epsilon": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
            "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
            "scale_attn_weights": True}


def check_exportable(cfg: ModelConfig) -> list[str]:
    want = dict(family="decoder", position="learned", norm="layernorm", norm_placement="pre", use_bias=True,
                num_kv_heads=None, scale_embeddings=False, embedding_norm=False, scale_attention=True,
                type_vocab_size=0, tied_head_rescale=False, attention_window=0)
    bad = [f"model.{k}={getattr(cfg, k)!r} (GPT-2 needs {v!r})" for k, v in want.items() if getattr(cfg, k) != v]
    if cfg.activation not in ACTIVATIONS_BACK:
        bad.append(f"model.activation={cfg.activation!r} (GPT-2 needs one of {sorted(ACTIVATIONS_BACK)})")
    if cfg.head_dim not in (None, cfg.d_model // cfg.num_heads):
        bad.append(f"model.head_dim={cfg.head_dim} (GPT-2 needs d_model // num_heads)")
    return bad


def to_hf(cfg: ModelConfig, params: dict) -> dict[str, np.ndarray]:
    D, L = cfg.d_model, cfg.num_layers
    lay = params["decoder"]["layers"]
    a, m = lay["attn"], lay["mlp"]
    p = "transformer."
    out = {f"{p}wte.weight": params["embed"]["embedding"], f"{p}wpe.weight": params["learned_positions"]["table"],
           f"{p}ln_f.weight": params["decoder"]["final_norm"]["scale"],
           f"{p}ln_f.bias": params["decoder"]["final_norm"]["bias"]}
    c_attn = np.concatenate([a[k].reshape(L, D, D) for k in ("query", "key", "value")], axis=-1)
    c_attn_bias = np.concatenate([a[k].reshape(L, D) for k in ("query_bias", "key_bias", "value_bias")], axis=-1)
    for value, name in [
        (lay["attn_norm"]["scale"], "ln_1.weight"), (lay["attn_norm"]["bias"], "ln_1.bias"),
        (c_attn, "attn.c_attn.weight"), (c_attn_bias, "attn.c_attn.bias"),
        (a["out"].reshape(L, D, D), "attn.c_proj.weight"), (a["out_bias"], "attn.c_proj.bias"),
        (lay["mlp_norm"]["scale"], "ln_2.weight"), (lay["mlp_norm"]["bias"], "ln_2.bias"),
        (m["wi"], "mlp.c_fc.weight"), (m["wi_bias"], "mlp.c_fc.bias"),
        (m["wo"], "mlp.c_proj.weight"), (m["wo_bias"], "mlp.c_proj.bias")]:
        out.update(unstack(value, f"{p}h.{{}}.{name}"))
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = params["lm_head"]["kernel"].T
    return out
