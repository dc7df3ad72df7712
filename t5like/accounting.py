"""Parameter counts and training FLOPs, from the config alone.

Conventions (written down so MFU and scaling numbers can be compared):
- A matmul of an [M, K] by [K, N] costs 2·M·K·N FLOPs. Training = forward + backward = 3 × forward
  (the backward computes gradients for both inputs and weights).
- Counted: every weight matmul (attention projections, MLP, output logits, MLM transform) and the two
  attention matmuls (QKᵀ and AV): 4·S·N·H forward FLOPs per query token over S keys.
- Causal self-attention counts half of that (`causal_halving=True`, as MaxText does): on average a
  token attends to half the sequence. XLA's dense kernel computes the full square, so for comparing
  with XLA's cost analysis, pass `causal_halving=False`.
- Not counted: embedding lookups (gathers), norms, softmax, activations, biases, the loss.
- Encoder-decoder: encoder tokens and decoder tokens are counted separately. Cross-attention key and
  value projections run once per encoder token and decoder layer, so they are charged to encoder tokens.
- Non-embedding parameters exclude the token embedding, an untied output projection, learned position
  tables and relative-position bias tables (Kaplan et al. 2020).
"""
from __future__ import annotations

import dataclasses

from t5like.config import ModelConfig


def _attention_weights(cfg: ModelConfig) -> tuple[int, int]:
    """(query+output, key+value) weight counts of one attention layer, biases excluded."""
    D, N, K, H = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.dim_per_head
    return 2 * D * N * H, 2 * D * K * H


def _mlp_weights(cfg: ModelConfig) -> int:
    return (3 if cfg.activation in ("gated_gelu", "swiglu") else 2) * cfg.d_model * cfg.d_ff


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    """Exact parameter counts: {"total", "non_embedding", "embedding"}."""
    D, V, F, N, K, H = cfg.d_model, cfg.vocab_size, cfg.d_ff, cfg.num_heads, cfg.kv_heads, cfg.dim_per_head
    b = cfg.use_bias
    norm = D * (2 if cfg.norm == "layernorm" and b else 1)
    qo, kv = _attention_weights(cfg)
    attn = qo + kv + ((N * H + 2 * K * H + D) if b else 0)
    mlp = _mlp_weights(cfg) + ((F + D) if b else 0)
    self_block = 2 * norm + attn + mlp
    cross_block = self_block + norm + attn
    final_norm = norm if cfg.norm_placement == "pre" else 0
    rel = cfg.relative_buckets * N if cfg.position == "relative" else 0
    emb_norm = norm if cfg.embedding_norm else 0  # one, shared by every stack that embeds tokens

    embedding = V * D + (0 if cfg.tie_embeddings else D * V)
    embedding += cfg.max_len * D if cfg.position == "learned" else 0
    embedding += cfg.type_vocab_size * D  # token-type embeddings (BERT)
    if cfg.family == "decoder":
        body = cfg.num_layers * self_block + final_norm + emb_norm
        embedding += rel
    elif cfg.family == "encoder":
        body = cfg.num_layers * self_block + final_norm + emb_norm + (D * D + D) + norm  # + MLM transform, norm
        body += V  # MLM output bias
        if cfg.num_classes:
            body += (D * D + D) + (D * cfg.num_classes + cfg.num_classes)
        embedding += rel
    else:
        body = cfg.num_layers * self_block + cfg.decoder_layers * cross_block + 2 * final_norm + emb_norm
        embedding += 2 * rel
    return {"total": body + embedding, "non_embedding": body, "embedding": embedding}


@dataclasses.dataclass(frozen=True)
class TrainingFlops:
    """Training FLOPs (forward + backward) for one example."""
    per_encoder_token: float   # 0 for decoder-only
    per_decoder_token: float   # the only term for decoder-only; for encoder-only, per encoder token
    encoder_tokens: int
    decoder_tokens: int

    @property
    def per_sequence(self) -> float:
        return self.per_encoder_token * self.encoder_tokens + self.per_decoder_token * self.decoder_tokens

    @property
    def per_token(self) -> float:
        """Per token processed (encoder + decoder tokens): what `tokens` means in scaling sweeps."""
        return self.per_sequence / (self.encoder_tokens + self.decoder_tokens)


def training_flops(cfg: ModelConfig, seq_len: int, target_len: int = 0, *,
                   causal_halving: bool = True) -> TrainingFlops:
    """Training FLOPs per token for a row of `seq_len` tokens (encoder side for encoder-decoder) and,
    for encoder-decoder, `target_len` decoder tokens."""
    D, V, NH = cfg.d_model, cfg.vocab_size, cfg.num_heads * cfg.dim_per_head
    qo, kv = _attention_weights(cfg)
    mlp = _mlp_weights(cfg)
    causal = 0.5 if causal_halving else 1.0

    def fwd_attention(keys: int, factor: float) -> float:
        return 4.0 * keys * NH * factor

    if cfg.family == "decoder":
        per_layer = 2 * (qo + kv + mlp) + fwd_attention(seq_len, causal)
        fwd = cfg.num_layers * per_layer + 2 * D * V
        return TrainingFlops(0.0, 3 * fwd, 0, seq_len)
    if cfg.family == "encoder":
        per_layer = 2 * (qo + kv + mlp) + fwd_attention(seq_len, 1.0)
        fwd = cfg.num_layers * per_layer + 2 * (D * D + D * V)
        return TrainingFlops(0.0, 3 * fwd, 0, seq_len)
    if target_len <= 0:
        raise ValueError(f"target_len={target_len}: encoder-decoder FLOPs need the decoder length; pass target_len > 0.")
    enc = cfg.num_layers * (2 * (qo + kv + mlp) + fwd_attention(seq_len, 1.0))
    enc += cfg.decoder_layers * 2 * kv  # cross-attention K/V projections of the encoder output
    dec = cfg.decoder_layers * (2 * (qo + kv + mlp) + fwd_attention(target_len, causal)
                                + 2 * qo + fwd_attention(seq_len, 1.0))
    dec += 2 * D * V
    return TrainingFlops(3 * enc, 3 * dec, seq_len, target_len)
