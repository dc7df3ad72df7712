"""T5 v1.0 / v1.1 (T5ForConditionalGeneration) <-> t5like encoder_decoder.

No 1/sqrt(d) on attention logits (scale_attention=False); one relative-bias table per stack, stored in
block 0's self-attention; d_kv * num_heads may differ from d_model (head_dim); RMSNorm without bias;
v1.0: ReLU, tied head on the hidden state times d_model**-0.5 (tied_head_rescale); v1.1: gated-GELU
(gelu_new) with wi_0 the gated branch, no rescale, usually an untied lm_head.
"""
from __future__ import annotations

import numpy as np

from t5like.config import ModelConfig
from t5like.hf.common import linear_in, refuse, stack, unstack

ARCHITECTURE, MODEL_TYPE = "T5ForConditionalGeneration", "t5"
# feed_forward_proj -> t5like activation (HF maps "gated-gelu" to gelu_new, the tanh approximation).
FEED_FORWARD = {"relu": "relu", "gated-gelu": "gated_gelu", "gated-silu": "swiglu", "gelu": "gelu_exact"}
FEED_FORWARD_BACK = {v: k for k, v in FEED_FORWARD.items()}
COPIES_OF_SHARED = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")


def rescales_tied_head(hf: dict) -> bool:
    """transformers < 5 rescaled whenever tie_word_embeddings (default true); 5.x saves scale_decoder_outputs."""
    if "scale_decoder_outputs" in hf:
        return bool(hf["scale_decoder_outputs"])
    return hf.get("tie_word_embeddings", True) is not False


def to_model_config(hf: dict, untied_head: bool = False) -> ModelConfig:
    proj = hf.get("feed_forward_proj", "relu")
    if proj not in FEED_FORWARD:
        raise refuse(ARCHITECTURE, "feed_forward_proj", proj, f"supported: {sorted(FEED_FORWARD)}.")
    rescale = rescales_tied_head(hf)
    if rescale and untied_head:
        raise refuse(ARCHITECTURE, "scale_decoder_outputs", True, "t5like rescales only a tied head, and this "
                     "checkpoint has an lm_head.weight that differs from shared.weight.")
    return ModelConfig(
        family="encoder_decoder", vocab_size=hf["vocab_size"], d_model=hf["d_model"], num_heads=hf["num_heads"],
        head_dim=hf["d_kv"], d_ff=hf["d_ff"], num_layers=hf["num_layers"],
        num_decoder_layers=hf.get("num_decoder_layers") or hf["num_layers"], max_len=hf.get("n_positions", 512),
        position="relative", relative_buckets=hf.get("relative_attention_num_buckets", 32),
        relative_max_distance=hf.get("relative_attention_max_distance", 128), activation=FEED_FORWARD[proj],
        norm="rmsnorm", norm_placement="pre", norm_eps=hf.get("layer_norm_epsilon", 1e-6), use_bias=False,
        tie_embeddings=not untied_head, tied_head_rescale=rescale and not untied_head, scale_attention=False,
        dropout=hf.get("dropout_rate", 0.0))


def untied_head(t) -> bool:
    """Whether the file's lm_head.weight is its own matrix (v1.1) rather than absent or a copy of shared."""
    if not t.has("lm_head.weight"):
        return False
    shape = t.shape("shared.weight")
    return not np.array_equal(t.take("lm_head.weight", shape), t.take("shared.weight", shape))


def _stack_params(cfg: ModelConfig, t, side: str, L: int) -> dict:
    D, N, H, F = cfg.d_model, cfg.num_heads, cfg.dim_per_head, cfg.d_ff
    b = lambda i, name, shape: t.take(f"{side}.block.{i}.layer.{name}", shape)

    def attention(sub: str, kind: str) -> dict:
        w = lambda i, x: linear_in(b(i, f"{sub}.{kind}.{x}.weight", (N * H, D)))
        return {"query": stack(L, lambda i: w(i, "q").reshape(D, N, H)),
                "key": stack(L, lambda i: w(i, "k").reshape(D, N, H)),
                "value": stack(L, lambda i: w(i, "v").reshape(D, N, H)),
                "out": stack(L, lambda i: linear_in(b(i, f"{sub}.{kind}.o.weight", (D, N * H))).reshape(N, H, D))}

    ff = "1" if side == "encoder" else "2"
    mlp = {"wo": stack(L, lambda i: linear_in(b(i, f"{ff}.DenseReluDense.wo.weight", (D, F))))}
    if cfg.activation in ("gated_gelu", "swiglu"):
        mlp["wi_gate"] = stack(L, lambda i: linear_in(b(i, f"{ff}.DenseReluDense.wi_0.weight", (F, D))))
        mlp["wi"] = stack(L, lambda i: linear_in(b(i, f"{ff}.DenseReluDense.wi_1.weight", (F, D))))
    else:
        mlp["wi"] = stack(L, lambda i: linear_in(b(i, f"{ff}.DenseReluDense.wi.weight", (F, D))))
    layers = {"attn": attention("0", "SelfAttention"),
              "attn_norm": {"scale": stack(L, lambda i: b(i, "0.layer_norm.weight", (D,)))},
              "mlp": mlp, "mlp_norm": {"scale": stack(L, lambda i: b(i, f"{ff}.layer_norm.weight", (D,)))}}
    if side == "decoder":
        layers["cross_attn"] = attention("1", "EncDecAttention")
        layers["cross_norm"] = {"scale": stack(L, lambda i: b(i, "1.layer_norm.weight", (D,)))}
    bias = t.take(f"{side}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                  (cfg.relative_buckets, N))
    return {"layers": layers, "final_norm": {"scale": t.take(f"{side}.final_layer_norm.weight", (D,))},
            "relative_bias": {"table": bias}}


def from_hf(cfg: ModelConfig, t) -> dict:
    shared = t.take("shared.weight", (cfg.vocab_size, cfg.d_model))
    for name in COPIES_OF_SHARED:  # older files repeat the shared embedding
        if t.has(name) and not np.array_equal(t.take(name, shared.shape), shared):
            raise ValueError(f"{ARCHITECTURE}: {name} differs from shared.weight; t5like (like transformers) "
                             "uses one token embedding for encoder and decoder.")
    params = {"embed": {"embedding": shared},
              "encoder": _stack_params(cfg, t, "encoder", cfg.num_layers),
              "decoder": _stack_params(cfg, t, "decoder", cfg.decoder_layers)}
    if not cfg.tie_embeddings:
        params["lm_head"] = {"kernel": linear_in(t.take("lm_head.weight", shared.shape))}
    elif t.has("lm_head.weight"):
        t.take("lm_head.weight", shared.shape)  # an identical copy of shared (checked in untied_head)
    return params


def to_hf_config(cfg: ModelConfig) -> dict:
    return {"architectures": [ARCHITECTURE], "model_type": MODEL_TYPE, "vocab_size": cfg.vocab_size,
            "d_model": cfg.d_model, "num_heads": cfg.num_heads, "d_kv": cfg.dim_per_head, "d_ff": cfg.d_ff,
            "num_layers": cfg.num_layers, "num_decoder_layers": cfg.decoder_layers, "is_encoder_decoder": True,
            "relative_attention_num_buckets": cfg.relative_buckets,
            "relative_attention_max_distance": cfg.relative_max_distance,
            "feed_forward_proj": FEED_FORWARD_BACK[cfg.activation], "layer_norm_epsilon": cfg.norm_eps,
            "dropout_rate": cfg.dropout, "n_positions": cfg.max_len,
            # Both transformers 4 (tie_word_embeddings) and 5 (scale_decoder_outputs) read the rescale right.
            "tie_word_embeddings": cfg.tied_head_rescale, "scale_decoder_outputs": cfg.tied_head_rescale}


def check_exportable(cfg: ModelConfig) -> list[str]:
    want = dict(family="encoder_decoder", position="relative", norm="rmsnorm", norm_placement="pre",
                use_bias=False, num_kv_heads=None, scale_embeddings=False, embedding_norm=False,
                scale_attention=False, type_vocab_size=0, attention_window=0)
    bad = [f"model.{k}={getattr(cfg, k)!r} (T5 needs {v!r})" for k, v in want.items() if getattr(cfg, k) != v]
    if cfg.activation not in FEED_FORWARD_BACK:
        bad.append(f"model.activation={cfg.activation!r} (T5 needs one of {sorted(FEED_FORWARD_BACK)})")
    return bad


def to_hf(cfg: ModelConfig, params: dict) -> dict[str, np.ndarray]:
    T = lambda x: np.swapaxes(x, -1, -2)
    out = {"shared.weight": params["embed"]["embedding"]}
    # Untied, or tied without the rescale (which transformers ties only with it): write the head itself.
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = T(params["lm_head"]["kernel"])
    elif not cfg.tied_head_rescale:
        out["lm_head.weight"] = params["embed"]["embedding"]
    for side in ("encoder", "decoder"):
        s = params[side]
        lay = s["layers"]
        L, D = lay["attn_norm"]["scale"].shape

        def attention(a, sub, kind):
            for x, k in (("q", "query"), ("k", "key"), ("v", "value")):
                out.update(unstack(T(a[k].reshape(L, D, -1)), f"{side}.block.{{}}.layer.{sub}.{kind}.{x}.weight"))
            out.update(unstack(T(a["out"].reshape(L, -1, D)), f"{side}.block.{{}}.layer.{sub}.{kind}.o.weight"))

        attention(lay["attn"], "0", "SelfAttention")
        out.update(unstack(lay["attn_norm"]["scale"], f"{side}.block.{{}}.layer.0.layer_norm.weight"))
        ff = "1" if side == "encoder" else "2"
        if side == "decoder":
            attention(lay["cross_attn"], "1", "EncDecAttention")
            out.update(unstack(lay["cross_norm"]["scale"], f"{side}.block.{{}}.layer.1.layer_norm.weight"))
        m = lay["mlp"]
        if "wi_gate" in m:
            out.update(unstack(T(m["wi_gate"]), f"{side}.block.{{}}.layer.{ff}.DenseReluDense.wi_0.weight"))
            out.update(unstack(T(m["wi"]), f"{side}.block.{{}}.layer.{ff}.DenseReluDense.wi_1.weight"))
        else:
            out.update(unstack(T(m["wi"]), f"{side}.block.{{}}.layer.{ff}.DenseReluDense.wi.weight"))
        out.update(unstack(T(m["wo"]), f"{side}.block.{{}}.layer.{ff}.DenseReluDense.wo.weight"))
        out.update(unstack(lay["mlp_norm"]["scale"], f"{side}.block.{{}}.layer.{ff}.layer_norm.weight"))
        out[f"{side}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = s["relative_bias"]["table"]
        out[f"{side}.final_layer_norm.weight"] = s["final_norm"]["scale"]
    return out
