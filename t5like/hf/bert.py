"""BERT (BertForMaskedLM) <-> t5like encoder.

torch Linear weights are [out, in]; post-LayerNorm blocks; word + position + token-type embeddings
then a LayerNorm; the MLM transform (dense, hidden_act, LayerNorm) and a tied decoder with a bias.
HF's "gelu" is the exact (erf) GELU: t5like's "gelu_exact".
"""
from __future__ import annotations

import numpy as np

from t5like.config import ModelConfig
from t5like.hf.common import ACTIVATIONS_BACK, activation, linear_in, require, stack, unstack

ARCHITECTURE, MODEL_TYPE = "BertForMaskedLM", "bert"
# Pre-training heads that BertForMaskedLM does not have either (transformers drops them the same way),
# and buffers.
NOT_IN_MASKED_LM = ("bert.pooler.*", "cls.seq_relationship.*", "bert.embeddings.position_ids")


def to_model_config(hf: dict) -> ModelConfig:
    require(hf, ARCHITECTURE, "position_embedding_type", ("absolute",), "absolute")
    require(hf, ARCHITECTURE, "is_decoder", (False,), False)
    act = activation(hf, ARCHITECTURE, "hidden_act", "gelu")
    return ModelConfig(
        family="encoder", vocab_size=hf["vocab_size"], d_model=hf["hidden_size"],
        num_heads=hf["num_attention_heads"], d_ff=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
        max_len=hf["max_position_embeddings"], position="learned", activation=act, head_activation=act,
        norm="layernorm", norm_placement="post", norm_eps=hf.get("layer_norm_eps", 1e-12), use_bias=True,
        tie_embeddings=hf.get("tie_word_embeddings", True), embedding_norm=True,
        type_vocab_size=hf.get("type_vocab_size", 2), dropout=hf.get("hidden_dropout_prob", 0.0))


def from_hf(cfg: ModelConfig, t) -> dict:
    t.skip(NOT_IN_MASKED_LM)
    D, N, H, F, L, V = cfg.d_model, cfg.num_heads, cfg.dim_per_head, cfg.d_ff, cfg.num_layers, cfg.vocab_size
    e = lambda name, shape: t.take(f"bert.embeddings.{name}", shape)
    lay = lambda i, name, shape: t.take(f"bert.encoder.layer.{i}.{name}", shape)

    def proj(name):  # query/key/value: [N*H, D] -> [D, N, H]
        return stack(L, lambda i: linear_in(lay(i, f"attention.self.{name}.weight", (N * H, D))).reshape(D, N, H))

    def vec(name, n):
        return stack(L, lambda i: lay(i, name, (n,)))

    layers = {
        "attn": {"query": proj("query"), "key": proj("key"), "value": proj("value"),
                 "query_bias": vec("attention.self.query.bias", N * H).reshape(L, N, H),
                 "key_bias": vec("attention.self.key.bias", N * H).reshape(L, N, H),
                 "value_bias": vec("attention.self.value.bias", N * H).reshape(L, N, H),
                 "out": stack(L, lambda i: linear_in(lay(i, "attention.output.dense.weight", (D, N * H))).reshape(N, H, D)),
                 "out_bias": vec("attention.output.dense.bias", D)},
        "attn_norm": {"scale": vec("attention.output.LayerNorm.weight", D),
                      "bias": vec("attention.output.LayerNorm.bias", D)},
        "mlp": {"wi": stack(L, lambda i: linear_in(lay(i, "intermediate.dense.weight", (F, D)))),
                "wi_bias": vec("intermediate.dense.bias", F),
                "wo": stack(L, lambda i: linear_in(lay(i, "output.dense.weight", (D, F)))),
                "wo_bias": vec("output.dense.bias", D)},
        "mlp_norm": {"scale": vec("output.LayerNorm.weight", D), "bias": vec("output.LayerNorm.bias", D)},
    }
    params = {
        "embed": {"embedding": e("word_embeddings.weight", (V, D))},
        "learned_positions": {"table": e("position_embeddings.weight", (cfg.max_len, D))},
        "token_types": e("token_type_embeddings.weight", (cfg.type_vocab_size, D)),
        "embedding_norm": {"scale": e("LayerNorm.weight", (D,)), "bias": e("LayerNorm.bias", (D,))},
        "encoder": {"layers": layers},
        "mlm_dense": {"kernel": linear_in(t.take("cls.predictions.transform.dense.weight", (D, D))),
                      "bias": t.take("cls.predictions.transform.dense.bias", (D,))},
        "mlm_norm": {"scale": t.take("cls.predictions.transform.LayerNorm.weight", (D,)),
                     "bias": t.take("cls.predictions.transform.LayerNorm.bias", (D,))},
        "mlm_bias": t.take("cls.predictions.bias", (V,)),
    }
    if t.has("cls.predictions.decoder.bias"):  # older files store the (shared) bias twice
        if not np.array_equal(t.take("cls.predictions.decoder.bias", (V,)), params["mlm_bias"]):
            raise ValueError("BertForMaskedLM: cls.predictions.decoder.bias differs from cls.predictions.bias; "
                             "transformers ties them, so this checkpoint is inconsistent.")
    if cfg.tie_embeddings:
        if t.has("cls.predictions.decoder.weight"):
            if not np.array_equal(t.take("cls.predictions.decoder.weight", (V, D)), params["embed"]["embedding"]):
                raise ValueError("BertForMaskedLM: cls.predictions.decoder.weight differs from the word embeddings "
                                 "but config.json has tie_word_embeddings=true; set it to false to keep both.")
    else:
        params["lm_head"] = {"kernel": linear_in(t.take("cls.predictions.decoder.weight", (V, D)))}
    return params


def to_hf_config(cfg: ModelConfig) -> dict:
    return {"architectures": [ARCHITECTURE], "model_type": MODEL_TYPE, "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.d_model, "num_attention_heads": cfg.num_heads, "intermediate_size": cfg.d_ff,
            "num_hidden_layers": cfg.num_layers, "max_position_embeddings": cfg.max_len,
            "hidden_act": ACTIVATIONS_BACK[cfg.activation], "layer_norm_eps": cfg.norm_eps,
            "type_vocab_size": cfg.type_vocab_size, "tie_word_embeddings": cfg.tie_embeddings,
            "hidden_dropout_prob": cfg.dropout, "attention_probs_dropout_prob": cfg.dropout,
            "position_embedding_type": "absolute"}


def check_exportable(cfg: ModelConfig) -> list[str]:
    want = dict(family="encoder", position="learned", norm="layernorm", norm_placement="post", use_bias=True,
                num_kv_heads=None, scale_embeddings=False, embedding_norm=True, scale_attention=True,
                tied_head_rescale=False, num_classes=0, head_activation=cfg.activation, attention_window=0)
    bad = [f"model.{k}={getattr(cfg, k)!r} (BERT needs {v!r})" for k, v in want.items() if getattr(cfg, k) != v]
    if cfg.activation not in ACTIVATIONS_BACK:
        bad.append(f"model.activation={cfg.activation!r} (BERT needs one of {sorted(ACTIVATIONS_BACK)})")
    if cfg.type_vocab_size < 1:
        bad.append("model.type_vocab_size=0 (BERT needs token-type embeddings)")
    if cfg.head_dim not in (None, cfg.d_model // cfg.num_heads):
        bad.append(f"model.head_dim={cfg.head_dim} (BERT needs d_model // num_heads)")
    return bad


def to_hf(cfg: ModelConfig, params: dict) -> dict[str, np.ndarray]:
    D, L = cfg.d_model, cfg.num_layers
    lay = params["encoder"]["layers"]
    a, m = lay["attn"], lay["mlp"]
    T = lambda x: np.swapaxes(x, -1, -2)
    out = {"bert.embeddings.word_embeddings.weight": params["embed"]["embedding"],
           "bert.embeddings.position_embeddings.weight": params["learned_positions"]["table"],
           "bert.embeddings.token_type_embeddings.weight": params["token_types"],
           "bert.embeddings.LayerNorm.weight": params["embedding_norm"]["scale"],
           "bert.embeddings.LayerNorm.bias": params["embedding_norm"]["bias"],
           "cls.predictions.transform.dense.weight": params["mlm_dense"]["kernel"].T,
           "cls.predictions.transform.dense.bias": params["mlm_dense"]["bias"],
           "cls.predictions.transform.LayerNorm.weight": params["mlm_norm"]["scale"],
           "cls.predictions.transform.LayerNorm.bias": params["mlm_norm"]["bias"],
           "cls.predictions.bias": params["mlm_bias"]}
    for value, name in [
        (T(a["query"].reshape(L, D, -1)), "attention.self.query.weight"),
        (T(a["key"].reshape(L, D, -1)), "attention.self.key.weight"),
        (T(a["value"].reshape(L, D, -1)), "attention.self.value.weight"),
        (a["query_bias"].reshape(L, -1), "attention.self.query.bias"),
        (a["key_bias"].reshape(L, -1), "attention.self.key.bias"),
        (a["value_bias"].reshape(L, -1), "attention.self.value.bias"),
        (T(a["out"].reshape(L, -1, D)), "attention.output.dense.weight"), (a["out_bias"], "attention.output.dense.bias"),
        (lay["attn_norm"]["scale"], "attention.output.LayerNorm.weight"),
        (lay["attn_norm"]["bias"], "attention.output.LayerNorm.bias"),
        (T(m["wi"]), "intermediate.dense.weight"), (m["wi_bias"], "intermediate.dense.bias"),
        (T(m["wo"]), "output.dense.weight"), (m["wo_bias"], "output.dense.bias"),
        (lay["mlp_norm"]["scale"], "output.LayerNorm.weight"), (lay["mlp_norm"]["bias"], "output.LayerNorm.bias")]:
        out.update(unstack(value, f"bert.encoder.layer.{{}}.{name}"))
    if not cfg.tie_embeddings:
        out["cls.predictions.decoder.weight"] = params["lm_head"]["kernel"].T
    return out
