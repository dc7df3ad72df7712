"""Typed configs: the model, the mesh, and named model presets.

Every config is a frozen dataclass. `validate()` runs before anything is built or
compiled, and each error names the field, the value and a fix.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

FAMILIES = ("encoder", "decoder", "encoder_decoder")
POSITIONS = ("sinusoidal", "learned", "relative", "rope", "none")
ACTIVATIONS = ("relu", "gelu", "gated_gelu", "swiglu")
NORMS = ("layernorm", "rmsnorm")
NORM_PLACEMENTS = ("pre", "post")
REMAT_POLICIES = ("none", "minimal", "full")
DTYPES = ("float32", "bfloat16", "float16")


def _choice(field: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{field}={value!r} is not one of {list(allowed)}; set {field} to one of those.")


def _positive(field: str, value) -> None:
    if not isinstance(value, int) or value <= 0:
        raise ValueError(f"{field}={value!r} must be a positive integer.")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """One config for all three families. Defaults are a tiny decoder-only model."""
    family: str = "decoder"
    vocab_size: int = 2048
    d_model: int = 128
    num_heads: int = 4
    num_kv_heads: Optional[int] = None      # None = num_heads (MHA); 1 = MQA; in between = GQA
    head_dim: Optional[int] = None          # None = d_model // num_heads
    d_ff: int = 512
    num_layers: int = 2                     # encoder layers, or decoder layers for decoder-only
    num_decoder_layers: Optional[int] = None  # encoder-decoder only; None = num_layers
    max_len: int = 512                      # for learned positions and the decode cache
    position: str = "rope"
    activation: str = "swiglu"
    norm: str = "rmsnorm"
    norm_placement: str = "pre"             # "post" is the original Transformer
    norm_eps: float = 1e-6
    use_bias: bool = False
    tie_embeddings: bool = True
    scale_embeddings: bool = False          # multiply token embeddings by sqrt(d_model) (Vaswani et al.)
    dropout: float = 0.0
    relative_buckets: int = 32
    relative_max_distance: int = 128
    rope_theta: float = 10000.0
    num_classes: int = 0                    # encoder-only: >0 adds a pooled classification head
    dtype: str = "float32"                  # compute dtype
    param_dtype: str = "float32"
    remat: str = "none"
    attention_impl: Optional[str] = None    # None lets JAX pick; "cudnn" for the fused GPU kernel

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.d_model // self.num_heads

    @property
    def decoder_layers(self) -> int:
        return self.num_decoder_layers or self.num_layers

    def validate(self) -> "ModelConfig":
        _choice("model.family", self.family, FAMILIES)
        _choice("model.position", self.position, POSITIONS)
        _choice("model.activation", self.activation, ACTIVATIONS)
        _choice("model.norm", self.norm, NORMS)
        _choice("model.norm_placement", self.norm_placement, NORM_PLACEMENTS)
        _choice("model.remat", self.remat, REMAT_POLICIES)
        _choice("model.dtype", self.dtype, DTYPES)
        _choice("model.param_dtype", self.param_dtype, DTYPES)
        for name in ("vocab_size", "d_model", "num_heads", "d_ff", "num_layers", "max_len"):
            _positive(f"model.{name}", getattr(self, name))
        if self.head_dim is None and self.d_model % self.num_heads:
            raise ValueError(
                f"model.num_heads={self.num_heads} does not divide model.d_model={self.d_model}; "
                f"pick num_heads from the divisors of {self.d_model}, or set model.head_dim explicitly.")
        if self.num_kv_heads is not None:
            _positive("model.num_kv_heads", self.num_kv_heads)
            if self.num_heads % self.num_kv_heads:
                raise ValueError(
                    f"model.num_kv_heads={self.num_kv_heads} does not divide model.num_heads={self.num_heads}; "
                    "use a divisor of num_heads (1 for MQA, num_heads for MHA).")
        if self.position == "rope" and self.dim_per_head % 2:
            raise ValueError(f"model.position='rope' needs an even head dim, got {self.dim_per_head}; "
                             "change model.d_model/model.num_heads or model.head_dim.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout={self.dropout} must be in [0, 1).")
        if self.num_classes and self.family != "encoder":
            raise ValueError(f"model.num_classes={self.num_classes} is for family='encoder' only; "
                             f"got family={self.family!r}. Set model.num_classes=0.")
        return self


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh shape. -1 on one axis means all remaining devices."""
    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    # Logical axis -> mesh axis (or tuple of axes, or None). None uses sharding.DEFAULT_RULES.
    rules: Optional[tuple] = None


# Presets ------------------------------------------------------------------------------------------
# Each preset is a base ModelConfig; "tiny" shrinks it to train in seconds on CPU while keeping
# its architecture (positions, norms, activations, head layout).

def _tiny(cfg: ModelConfig, **kw) -> ModelConfig:
    heads = 4
    # Keep the head layout's kind: MHA stays MHA, MQA stays MQA, GQA keeps 2 query heads per kv head.
    kv = None if cfg.num_kv_heads is None else 1 if cfg.kv_heads == 1 else heads // 2
    base = dict(vocab_size=2048, d_model=128, num_heads=heads, num_kv_heads=kv, head_dim=None,
                d_ff=512 if cfg.activation in ("relu", "gelu") else 384, num_layers=2,
                num_decoder_layers=None if cfg.num_decoder_layers is None else 2, max_len=256)
    base.update(kw)
    return dataclasses.replace(cfg, **base)


PRESETS: dict[str, ModelConfig] = {
    # Vaswani et al. 2017: post-LN, sinusoidal, ReLU, 6+6 layers, d=512, 8 heads, ff=2048, shared embeddings.
    "transformer_base": ModelConfig(
        family="encoder_decoder", vocab_size=37000, d_model=512, num_heads=8, d_ff=2048, num_layers=6,
        num_decoder_layers=6, position="sinusoidal", activation="relu", norm="layernorm",
        norm_placement="post", norm_eps=1e-6, use_bias=True, tie_embeddings=True,
        scale_embeddings=True, dropout=0.1, max_len=512),
    # Devlin et al. 2018.
    "bert_base": ModelConfig(
        family="encoder", vocab_size=30522, d_model=768, num_heads=12, d_ff=3072, num_layers=12,
        position="learned", activation="gelu", norm="layernorm", norm_placement="post", norm_eps=1e-12,
        use_bias=True, tie_embeddings=True, dropout=0.1, max_len=512),
    # Radford et al. 2019 (124M).
    "gpt2_small": ModelConfig(
        family="decoder", vocab_size=50257, d_model=768, num_heads=12, d_ff=3072, num_layers=12,
        position="learned", activation="gelu", norm="layernorm", norm_placement="pre", norm_eps=1e-5,
        use_bias=True, tie_embeddings=True, dropout=0.1, max_len=1024),
    # Raffel et al. 2020, v1.1: gated-GELU, RMSNorm, shared relative bias, untied output, no dropout in pre-training.
    "t5_v1_1_base": ModelConfig(
        family="encoder_decoder", vocab_size=32128, d_model=768, num_heads=12, d_ff=2048, num_layers=12,
        num_decoder_layers=12, position="relative", activation="gated_gelu", norm="rmsnorm",
        norm_placement="pre", norm_eps=1e-6, use_bias=False, tie_embeddings=False, dropout=0.0, max_len=512),
    # Llama-style: RoPE, RMSNorm, SwiGLU, GQA, untied.
    "llama_style": ModelConfig(
        family="decoder", vocab_size=32000, d_model=2048, num_heads=16, num_kv_heads=4, d_ff=5632,
        num_layers=22, position="rope", activation="swiglu", norm="rmsnorm", norm_placement="pre",
        norm_eps=1e-5, use_bias=False, tie_embeddings=False, dropout=0.0, max_len=2048),
}


def model_preset(name: str, size: str = "base") -> ModelConfig:
    """A named preset at full size ("base") or CPU size ("tiny")."""
    if name not in PRESETS:
        raise ValueError(f"model preset {name!r} is unknown; choose one of {sorted(PRESETS)}.")
    if size not in ("base", "tiny"):
        raise ValueError(f"preset size={size!r} must be 'base' or 'tiny'.")
    cfg = PRESETS[name]
    return _tiny(cfg) if size == "tiny" else cfg
