"""Typed configs: the model, the mesh, and named model presets.

Every config is a frozen dataclass. `validate()` runs before anything is built or
compiled, and each error names the field, the value and a fix.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
from typing import Optional

FAMILIES = ("encoder", "decoder", "encoder_decoder")
POSITIONS = ("sinusoidal", "learned", "relative", "rope", "none")
ACTIVATIONS = ("relu", "gelu", "gelu_exact", "gated_gelu", "swiglu")  # "gelu" is the tanh approximation
HEAD_ACTIVATIONS = ("relu", "gelu", "gelu_exact")
NORMS = ("layernorm", "rmsnorm")
NORM_PLACEMENTS = ("pre", "post")
REMAT_POLICIES = ("none", "minimal", "full")
DTYPES = ("float32", "bfloat16", "float16")
QUANT_MODES = ("none", "int8")  # model.quant (t5like/quantization.py)
STATE_DTYPES = ("float32", "bfloat16")  # optim.state_dtype
ATTENTION_IMPLS = (None, "xla", "cudnn", "splash")
# Parametrizations each family supports (t5like/parametrization.py, docs/mup.md).
PARAMETRIZATIONS = {family: ("sp", "mup", "completep") for family in FAMILIES}


def _choice(field: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{field}={value!r} is not one of {list(allowed)}; set {field} to one of those.")


def _positive(field: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{field}={value!r} must be a positive integer; set {field} to 1 or more.")


def _non_negative(field: str, value, hint: str = "") -> None:
    """An integer >= 0 (0 usually meaning "off")."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{field}={value!r} must be an integer >= 0" + (f"; {hint}" if hint else "."))


def _real(field: str, value, low: float | None = None, high: float | None = None, *, low_open: bool = False,
          high_open: bool = False, hint: str = "") -> None:
    """A finite number in the interval [low, high] (an end excluded with *_open; None = unbounded).
    NaN and inf are refused everywhere: no config field means anything by them."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        lo = "(-inf" if low is None else ("(" if low_open else "[") + f"{low:g}"
        hi = "inf)" if high is None else f"{high:g}" + (")" if high_open else "]")
        raise ValueError(f"{field}={value!r} must be a finite number in {lo}, {hi}" + (f"; {hint}" if hint else "."))


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """One config for all three families. Defaults are a tiny decoder-only model."""
    family: str = "decoder"                 # encoder (BERT), decoder (GPT) or encoder_decoder (T5)
    vocab_size: int = 2048                  # token ids, sentinels included
    d_model: int = 128                      # width of the residual stream
    num_heads: int = 4                      # query heads per attention
    num_kv_heads: Optional[int] = None      # None = num_heads (MHA); 1 = MQA; in between = GQA
    head_dim: Optional[int] = None          # None = d_model // num_heads
    d_ff: int = 512                         # hidden width of each MLP
    num_layers: int = 2                     # encoder layers, or decoder layers for decoder-only
    num_decoder_layers: Optional[int] = None  # encoder-decoder only; None = num_layers
    max_len: int = 512                      # for learned positions and the decode cache
    position: str = "rope"                  # how attention sees token positions
    activation: str = "swiglu"              # the MLP's; gated_gelu and swiglu add a gate projection
    norm: str = "rmsnorm"                   # the normalisation layers' kind
    norm_placement: str = "pre"             # "post" is the original Transformer
    norm_eps: float = 1e-6                  # added to the variance in every norm
    use_bias: bool = False                  # biases in the dense projections (GPT-2, BERT)
    tie_embeddings: bool = True             # the output projection is the token embedding's transpose
    scale_embeddings: bool = False          # multiply token embeddings by sqrt(d_model) (Vaswani et al.)
    embed_init_std: Optional[float] = None  # token embedding init; None: 0.02 (d_model**-0.5 with scale_embeddings)
    embedding_norm: bool = False            # norm the summed embeddings (BERT); post-norm stacks need one of these two
    dropout: float = 0.0                    # training only; 0 = none
    relative_buckets: int = 32              # position=relative: T5's distance buckets
    relative_max_distance: int = 128        # position=relative: distances beyond share the last bucket
    rope_theta: float = 10000.0             # position=rope: base of the rotary wavelengths
    num_classes: int = 0                    # encoder-only: >0 adds a pooled classification head
    dtype: str = "float32"                  # compute dtype
    param_dtype: str = "float32"            # stored parameters (and, unless optim.state_dtype, optimizer moments)
    # "int8": quantization-aware training, every weight matmul multiplies int8 inputs and weights (MaxText's
    # int8 training; t5like/quantization.py, docs/quantization.md). "none": as param_dtype/dtype say.
    quant: str = "none"
    remat: str = "none"                     # recompute activations in the backward pass to save memory
    # Layers per scan iteration. None: all of them on CPU and GPU (no loop: its stacked residual buffers,
    # zero-filled and copied every step, cost more than the longer compile; on an H100 the 1.1B Llama step
    # ran 1.2x faster unrolled, see README), 1 on TPU (a program that stays small at any depth).
    scan_unroll: Optional[int] = None
    # Attention kernel: None lets JAX pick; "xla"; "cudnn" (GPU flash attention, bf16/fp16); "splash"
    # (TPU Pallas kernel, self-attention; cross-attention and decoding steps stay on XLA). See
    # layers.attention_kernel.
    attention_impl: Optional[str] = None    # None = JAX picks
    # Sliding-window (local) self-attention: a query sees the keys less than W positions away, itself
    # included (causal: the W most recent tokens, as Mistral's sliding_window=W; bidirectional: W-1 on each
    # side). 0 = off (full attention). Cross-attention is never windowed. See docs/attention.md.
    attention_window: int = 0
    # Variants that pretrained checkpoints need (t5like.hf); the defaults are t5like's own models.
    scale_attention: bool = True            # divide attention logits by sqrt(head_dim); T5 folds it into its init
    type_vocab_size: int = 0                # >0 adds token-type embeddings (BERT segments A/B), batch key "token_types"
    head_activation: str = "gelu"           # encoder-only: activation of the MLM transform (BERT: its hidden_act)
    tied_head_rescale: bool = False         # multiply the last hidden state by d_model**-0.5 before a tied head (T5)
    # Hyperparameter transfer (t5like/parametrization.py, docs/mup.md): "sp" (standard), "mup" (µP: the best
    # learning rate and init carry across width) or "completep" (also across depth). Under mup/completep the
    # multipliers are relative to a base shape: this model with every width scaled by base_width / d_model.
    parametrization: str = "sp"
    base_width: Optional[int] = None        # d_model of the base shape; required by mup and completep
    base_d_ff: Optional[int] = None         # None: d_ff * base_width / d_model (must be whole)
    base_head_dim: Optional[int] = None     # None: head dim * base_width / d_model (heads fixed, head dim grows)
    base_depth: Optional[int] = None        # num_layers of the base shape; required by completep

    # None means "the default"; 0 is an error (validate), never a silent default.
    @property
    def kv_heads(self) -> int:
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def dim_per_head(self) -> int:
        return self.d_model // self.num_heads if self.head_dim is None else self.head_dim

    @property
    def decoder_layers(self) -> int:
        return self.num_layers if self.num_decoder_layers is None else self.num_decoder_layers

    def validate(self) -> "ModelConfig":
        _choice("model.family", self.family, FAMILIES)
        _choice("model.position", self.position, POSITIONS)
        _choice("model.activation", self.activation, ACTIVATIONS)
        _choice("model.norm", self.norm, NORMS)
        _choice("model.norm_placement", self.norm_placement, NORM_PLACEMENTS)
        _choice("model.head_activation", self.head_activation, HEAD_ACTIVATIONS)
        _choice("model.remat", self.remat, REMAT_POLICIES)
        _choice("model.dtype", self.dtype, DTYPES)
        _choice("model.param_dtype", self.param_dtype, DTYPES)
        _choice("model.quant", self.quant, QUANT_MODES)
        if self.quant != "none" and importlib.util.find_spec("qwix") is None:
            raise ValueError(f"model.quant={self.quant!r} trains through qwix, which is not installed; "
                             "pip install 'qwix>=0.1.8,<0.2' (the t5like[quant] extra), or set model.quant=none.")
        for name in ("vocab_size", "d_model", "num_heads", "d_ff", "num_layers", "max_len"):
            _positive(f"model.{name}", getattr(self, name))
        if self.scan_unroll is not None:
            _positive("model.scan_unroll", self.scan_unroll)
        for name in ("num_kv_heads", "head_dim", "num_decoder_layers"):  # None = default; 0 is not
            if getattr(self, name) is not None:
                _positive(f"model.{name}", getattr(self, name))
        _real("model.norm_eps", self.norm_eps, 0, low_open=True, hint="e.g. 1e-6 (T5) or 1e-5 (GPT-2, Llama).")
        _real("model.rope_theta", self.rope_theta, 1, low_open=True,
              hint="RoPE wavelengths grow as theta^(2i/d); 10000 is standard, larger for long contexts.")
        _real("model.dropout", self.dropout, 0, 1, high_open=True, hint="e.g. 0.1, or 0 for none.")
        if self.embed_init_std is not None:
            _real("model.embed_init_std", self.embed_init_std, 0, low_open=True,
                  hint="e.g. 0.02 (GPT-2), or 1.0 for a residual stream that starts at unit scale (completep).")
        _non_negative("model.num_classes", self.num_classes, "0 = no classification head.")
        _positive("model.relative_buckets", self.relative_buckets)
        _positive("model.relative_max_distance", self.relative_max_distance)
        if self.relative_buckets < 4 or self.relative_max_distance <= self.relative_buckets // 2:
            raise ValueError(f"model.relative_buckets={self.relative_buckets}, model.relative_max_distance="
                             f"{self.relative_max_distance}: T5's log-bucketing needs at least 4 buckets and a max "
                             "distance above half of them (its exact range); T5 uses 32 and 128.")
        if self.head_dim is None and self.d_model % self.num_heads:
            raise ValueError(
                f"model.num_heads={self.num_heads} does not divide model.d_model={self.d_model}; "
                f"pick num_heads from the divisors of {self.d_model}, or set model.head_dim explicitly.")
        if self.num_kv_heads is not None:
            if self.num_heads % self.num_kv_heads:
                raise ValueError(
                    f"model.num_kv_heads={self.num_kv_heads} does not divide model.num_heads={self.num_heads}; "
                    "use a divisor of num_heads (1 for MQA, num_heads for MHA).")
        if self.position == "rope" and self.dim_per_head % 2:
            raise ValueError(f"model.position='rope' needs an even head dim, got {self.dim_per_head}; "
                             "change model.d_model/model.num_heads or model.head_dim.")
        _non_negative("model.type_vocab_size", self.type_vocab_size, "0 = no token-type embeddings.")
        if self.tied_head_rescale and not self.tie_embeddings:
            raise ValueError("model.tied_head_rescale=True rescales the input of a tied output projection, but "
                             "model.tie_embeddings=False; set tie_embeddings=True or tied_head_rescale=False.")
        self._validate_attention_impl()
        self._validate_parametrization()
        if self.num_classes and self.family != "encoder":
            raise ValueError(f"model.num_classes={self.num_classes} is for family='encoder' only; "
                             f"got family={self.family!r}. Set model.num_classes=0.")
        return self

    def _validate_parametrization(self) -> None:
        """The parametrization exists for the family and its base shape is a whole model (before any compile)."""
        allowed = PARAMETRIZATIONS[self.family]
        if self.parametrization not in allowed:
            raise ValueError(f"model.parametrization={self.parametrization!r} is not known for model.family="
                             f"{self.family!r}; set it to one of {list(allowed)}.")
        for name in ("base_width", "base_d_ff", "base_head_dim", "base_depth"):
            if getattr(self, name) is not None:
                _positive(f"model.{name}", getattr(self, name))
        if self.parametrization == "sp":
            return
        p = f"model.parametrization={self.parametrization!r}"
        if self.base_width is None:
            raise ValueError(f"{p} needs model.base_width, the d_model of the base shape whose learning rate and "
                             f"init you tuned (e.g. model.base_width={min(self.d_model, 256)}).")
        if self.parametrization == "completep" and self.base_depth is None:
            raise ValueError(f"{p} needs model.base_depth, the num_layers of the base shape "
                             f"(e.g. model.base_depth={min(self.num_layers, 4)}).")
        D0, D = self.base_width, self.d_model
        if self.base_d_ff is None and self.d_ff * D0 % D:
            raise ValueError(f"{p}: the base shape's d_ff = model.d_ff * model.base_width / model.d_model = "
                             f"{self.d_ff} * {D0} / {D} is not whole; set model.base_d_ff, or a model.base_width "
                             f"that keeps d_ff / d_model whole.")
        H = self.dim_per_head
        if self.base_head_dim is None and H * D0 % D:
            raise ValueError(f"{p}: the base shape's head dim = head dim * model.base_width / model.d_model = "
                             f"{H} * {D0} / {D} is not whole; set model.base_head_dim (the head dim of the base "
                             "shape; equal to the head dim when width grows by adding heads).")
        H0 = self.base_head_dim or H * D0 // D
        for name, heads in (("num_heads", self.num_heads), ("num_kv_heads", self.kv_heads)):
            if heads * H * D0 % (D * H0):  # the base keeps heads * head_dim in ratio to d_model
                raise ValueError(f"{p}: the base shape has {heads} * {H} * {D0} / ({D} * {H0}) {name.replace('num_', '')}"
                                 f" (model.{name} * head dim * base_width / (d_model * base head dim)), not a whole "
                                 "number; change model.base_head_dim or model.base_width.")
        why = {"scale_embeddings": (self.scale_embeddings, "multiplies the input embedding by sqrt(d_model), so the "
                                    "input layer's effective learning rate would grow with width; set "
                                    "model.scale_embeddings=false"),
               "tied_head_rescale": (self.tied_head_rescale, "is a width-dependent output multiplier (d_model**-0.5) "
                                     "of its own; µP sets the output multiplier; set model.tied_head_rescale=false"),
               "scale_attention=false": (not self.scale_attention, "folds 1/sqrt(head_dim) into the query init (T5), "
                                         "and µP sets the attention scale; set model.scale_attention=true")}
        for name, (bad, reason) in why.items():
            if bad:
                raise ValueError(f"{p}: model.{name} {reason} (or use model.parametrization='sp').")
        if self.parametrization == "completep" and self.norm_placement != "pre":
            raise ValueError(f"{p} scales each residual branch by base_depth / num_layers, which needs pre-norm "
                             "residual stacks (post-norm renormalises after every add); set "
                             "model.norm_placement='pre' or use model.parametrization='mup'.")

    def _validate_attention_impl(self) -> None:
        _choice("model.attention_impl", self.attention_impl, ATTENTION_IMPLS)
        _non_negative("model.attention_window", self.attention_window, "0 = full attention, W > 0 = each query "
                      "sees the W nearest keys (Mistral uses 4096).")
        if self.attention_window and self.attention_impl == "cudnn" and self.family != "decoder":
            raise ValueError(f"model.attention_window={self.attention_window} with model.attention_impl='cudnn': "
                             f"cuDNN's sliding window is causal only, and model.family={self.family!r} has "
                             "bidirectional self-attention (an encoder); use model.attention_impl=xla, or "
                             "model.attention_window=0.")
        H = self.dim_per_head
        if self.attention_impl == "cudnn":
            if self.dtype not in ("bfloat16", "float16"):
                raise ValueError(f"model.attention_impl='cudnn' needs a 16-bit compute dtype, got "
                                 f"model.dtype={self.dtype!r}; set model.dtype=bfloat16 (or float16), or use "
                                 "model.attention_impl=xla.")
            if H % 8 or H > 256:
                raise ValueError(f"model.attention_impl='cudnn' needs a head dim that is a multiple of 8 and at most "
                                 f"256 (128 before Hopper), got {H}; change model.head_dim (or d_model/num_heads), "
                                 "or use model.attention_impl=xla.")
        if self.attention_impl == "splash" and self.position == "relative":
            raise ValueError("model.attention_impl='splash' takes no attention bias, and model.position='relative' "
                             "adds one; use model.attention_impl=xla, or another model.position.")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh shape. -1 on one axis means all remaining devices."""
    data: int = -1                          # batch rows split over it, parameters replicated
    fsdp: int = 1                           # batch rows, parameters and optimizer state split over it
    tensor: int = 1                         # heads, MLP width and vocabulary split over it
    # Context parallelism: activations' `length` is sharded over this axis; attention all-gathers K/V.
    context: int = 1
    # Multislice: how many slices (TPU slices joined over the data-centre network; processes on CPU/GPU) the
    # data and fsdp axes span. The axes above are per slice: mesh `data` is dcn_data x data in all. The
    # product is the number of slices; only these axes' collectives cross DCN (docs/multihost.md).
    dcn_data: int = 1                       # slices the data axis spans (1 = one slice)
    dcn_fsdp: int = 1                       # slices the fsdp axis spans (1 = one slice)
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
        use_bias=True, tie_embeddings=True, embedding_norm=True, dropout=0.1, max_len=512),
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


# Training configs ---------------------------------------------------------------------------------

OPTIMIZERS = ("adamw", "adafactor")
SCHEDULES = ("constant", "cosine", "rsqrt", "wsd", "linear")
DECAY_EXCLUDABLE = ("norm", "bias", "embedding")


def wsd_decay_steps(total_steps: int, decay_fraction: float) -> int:
    """The steps a wsd schedule of `total_steps` decays over: its cooldown, which starts at step
    total_steps - wsd_decay_steps(...) when the warmup is shorter than the rest (where a cooldown fork of a
    stable run branches off, t5like/scaling/design.py)."""
    return max(int(round(total_steps * decay_fraction)), 1)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    name: str = "adamw"                     # the optimizer
    learning_rate: float = 3e-4             # the peak, reached after warmup
    schedule: str = "cosine"                # learning-rate shape after warmup
    warmup_steps: int = 100                 # linear warmup from 0 to the peak
    end_lr_fraction: float = 0.1            # cosine / linear / wsd end at this fraction of the peak
    wsd_decay_fraction: float = 0.2         # wsd: the last 20% of steps decay linearly
    b1: float = 0.9                         # decay of the first-moment average
    b2: float = 0.95                        # decay of the second-moment average
    eps: float = 1e-8                       # AdamW's denominator floor
    weight_decay: float = 0.1               # decoupled (AdamW); for Adafactor, its weight_decay_rate
    no_decay: tuple[str, ...] = ("norm", "bias", "embedding")  # parameter kinds exempt from weight decay
    grad_clip: float = 1.0                  # global-norm clipping; 0 = off
    grad_accum_steps: int = 1               # microbatches per optimizer step
    z_loss: float = 0.0                     # coefficient of log(Z)^2 (PaLM uses 1e-4)
    label_smoothing: float = 0.0            # mass moved from the target to the uniform distribution
    # Both Adam moments stored in this dtype (updates are computed in float32); None: the params' dtype.
    # "bfloat16" halves the optimizer's memory under float32 params.
    state_dtype: Optional[str] = None

    def validate(self) -> "OptimConfig":
        _choice("optim.name", self.name, OPTIMIZERS)
        _choice("optim.schedule", self.schedule, SCHEDULES)
        for kind in self.no_decay:
            _choice("optim.no_decay entry", kind, DECAY_EXCLUDABLE)
        _real("optim.learning_rate", self.learning_rate, 0, low_open=True, hint="the peak rate, e.g. 3e-4.")
        _non_negative("optim.warmup_steps", self.warmup_steps)
        _positive("optim.grad_accum_steps", self.grad_accum_steps)
        for name in ("end_lr_fraction", "wsd_decay_fraction"):
            _real(f"optim.{name}", getattr(self, name), 0, 1)
        for name in ("b1", "b2"):  # decay rates of the moment averages: 1 would never update them
            _real(f"optim.{name}", getattr(self, name), 0, 1, high_open=True, hint="AdamW uses b1=0.9, b2=0.95-0.999.")
        _real("optim.eps", self.eps, 0, low_open=True, hint="it keeps m/(sqrt(v)+eps) finite where v=0; e.g. 1e-8.")
        _real("optim.weight_decay", self.weight_decay, 0, hint="e.g. 0.1, or 0 for none.")
        _real("optim.grad_clip", self.grad_clip, 0, hint="a global-norm bound, e.g. 1.0, or 0 for no clipping.")
        _real("optim.z_loss", self.z_loss, 0, hint="e.g. 1e-4 (PaLM), or 0 for none.")
        _real("optim.label_smoothing", self.label_smoothing, 0, 1, high_open=True,
              hint="1 would train towards the uniform distribution; e.g. 0.1, or 0 for none.")
        if self.state_dtype is not None:
            _choice("optim.state_dtype", self.state_dtype, STATE_DTYPES)
            if self.name != "adamw":
                raise ValueError(f"optim.state_dtype={self.state_dtype!r} sets the dtype of Adam's two moments, "
                                 f"but optim.name={self.name!r} keeps factored statistics instead; set "
                                 "optim.name=adamw, or leave optim.state_dtype unset.")
        return self


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000                       # optimizer steps in the whole run
    batch_size: int = 32                    # global, across all hosts and microbatches
    eval_every: int = 200                   # steps between evals; 0 = only at the end
    eval_steps: int = 20                    # validation batches per eval
    log_every: int = 1                      # steps between rows of metrics.jsonl
    progress: bool = True                   # a progress bar on stderr
    # Peak FLOP/s per device for MFU (per host on CPU, whose simulated devices share its cores). 0 = the
    # data-sheet table, or on CPU one matmul measured at start. Set it where the table is wrong for your part
    # (H100 PCIe) or to make CPU runs' MFU comparable without the measurement's noise.
    peak_flops: float = 0.0
    # A jax.profiler trace of steps FIRST..LAST (train.profile_steps=FIRST,LAST) into WORKDIR/profile, on the
    # hosts in profile_hosts; open it with TensorBoard's profile plugin or XProf (docs/observability.md).
    profile_steps: tuple[int, ...] = ()
    profile_hosts: tuple[int, ...] = (0,)   # process indices that write a trace
    # Weights & Biases project to log config, metrics and summary to (host 0; needs the `wandb` extra); "" = off.
    wandb_project: str = ""

    def validate(self) -> "TrainConfig":
        _positive("train.steps", self.steps)
        _positive("train.batch_size", self.batch_size)
        _positive("train.eval_steps", self.eval_steps)
        _positive("train.log_every", self.log_every)
        _non_negative("train.eval_every", self.eval_every, "0 = only at the end.")
        _real("train.peak_flops", self.peak_flops, 0, hint="FLOP/s per device, e.g. 756e12 for an H100 PCIe; "
              "0 = the data-sheet table (a measured matmul on CPU).")
        p = self.profile_steps
        if p and (len(p) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) for x in p)
                  or not 1 <= p[0] <= p[1]):
            raise ValueError(f"train.profile_steps={p!r} must be two steps FIRST,LAST with 1 <= FIRST <= LAST, e.g. "
                             "train.profile_steps=10,12 (skip the first steps: they compile).")
        if p and p[1] > self.steps:
            raise ValueError(f"train.profile_steps={p[0]},{p[1]} goes beyond train.steps={self.steps}; profile steps "
                             f"up to {self.steps}, e.g. train.profile_steps={max(1, self.steps - 2)},{self.steps}.")
        if not isinstance(self.profile_hosts, tuple) or not all(
                isinstance(h, int) and not isinstance(h, bool) and h >= 0 for h in self.profile_hosts):
            raise ValueError(f"train.profile_hosts={self.profile_hosts!r} must be process indices >= 0, e.g. 0,1.")
        if not isinstance(self.wandb_project, str):
            raise ValueError(f"train.wandb_project={self.wandb_project!r} must be a project name, or '' for off.")
        return self


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every: int = 500                        # save every N steps (and always at the end)
    keep: int = 3                           # keep the last K
    keep_period: int = 0                    # also keep every M-th step forever; 0 = off
    async_save: bool = True                 # write checkpoints while training continues
    init_from: str = ""                     # another run's workdir: start from its params, with its model and tokenizer
    keep_steps: tuple[int, ...] = ()        # also save these steps, and keep them forever (a cooldown fork's start)
    fork_from: str = ""                     # another run's workdir: start from its whole state at fork_step
    fork_step: int = 0                      # the step of fork_from to start from (t5like/fork.py)

    def validate(self) -> "CheckpointConfig":
        _positive("checkpoint.every", self.every)
        _positive("checkpoint.keep", self.keep)
        _non_negative("checkpoint.keep_period", self.keep_period, "0 = off.")
        for step in self.keep_steps:
            if not isinstance(step, int) or isinstance(step, bool) or step <= 0:
                raise ValueError(f"checkpoint.keep_steps={self.keep_steps!r} has {step!r}; give positive step "
                                 "numbers, e.g. checkpoint.keep_steps=800,1600.")
        _non_negative("checkpoint.fork_step", self.fork_step)
        if bool(self.fork_from) != bool(self.fork_step):
            raise ValueError(f"checkpoint.fork_from={self.fork_from!r} and checkpoint.fork_step={self.fork_step} go "
                             "together: a fork starts from step fork_step of the run in fork_from; set both or "
                             "neither.")
        if self.fork_from and self.init_from:
            raise ValueError(f"checkpoint.fork_from={self.fork_from!r} and checkpoint.init_from={self.init_from!r}: "
                             "a run starts from one other run; a fork takes its whole state (params, optimizer, "
                             "step, data position), init_from only its params. Clear one of them.")
        return self


FINETUNE_METHODS = ("full", "lora", "prefix")
# LoRA targets: the projections of every attention (self and cross) and MLP in every stack.
LORA_TARGETS = ("q", "k", "v", "o", "mlp_in", "mlp_gate", "mlp_out")


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """What fine-tuning trains. "full": every parameter. "lora": low-rank adapters on `lora_targets`
    (Hu et al. 2021; scale lora_alpha / lora_rank, as PEFT). "prefix": learned key/value prefixes of
    `prefix_length` per self-attention layer (Li & Liang 2021), optionally through their MLP.
    Under lora/prefix the base is frozen; `train_modules` (and a classification head) also train."""
    method: str = "full"                    # what trains: every parameter, or LoRA / prefix adapters
    lora_rank: int = 8                      # rank of each LoRA update
    lora_alpha: float = 16.0                # the update is scaled by lora_alpha / lora_rank
    lora_dropout: float = 0.0               # on the adapters' input
    lora_targets: tuple[str, ...] = ("q", "v")  # projections that get adapters
    prefix_length: int = 16                 # learned key/value positions per layer
    prefix_mlp: bool = False                # Li & Liang's reparametrisation: prefixes = MLP(embedding)
    prefix_mlp_hidden: int = 512            # width of the prefix MLP
    train_modules: tuple[str, ...] = ()     # top-level modules trained besides the adapters (PEFT modules_to_save)
    dpo_beta: float = 0.1                   # data.objective=dpo: strength of the pull to the reference (TRL's beta)

    def validate(self) -> "FinetuneConfig":
        _choice("finetune.method", self.method, FINETUNE_METHODS)
        _positive("finetune.lora_rank", self.lora_rank)
        _positive("finetune.prefix_length", self.prefix_length)
        _positive("finetune.prefix_mlp_hidden", self.prefix_mlp_hidden)
        _real("finetune.lora_alpha", self.lora_alpha, 0, low_open=True,
              hint="the adapter scale is lora_alpha / lora_rank; Hu et al. use alpha = 2 * rank.")
        _real("finetune.lora_dropout", self.lora_dropout, 0, 1, high_open=True, hint="e.g. 0.05.")
        _real("finetune.dpo_beta", self.dpo_beta, 0, low_open=True, hint="TRL and Rafailov et al. use 0.1.")
        if not isinstance(self.prefix_mlp, bool):
            raise ValueError(f"finetune.prefix_mlp={self.prefix_mlp!r} must be true or false.")
        for name in ("lora_targets", "train_modules"):
            value = getattr(self, name)
            if not isinstance(value, tuple) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"finetune.{name}={value!r} must be a tuple of names, e.g. finetune.{name}="
                                 f"{'q,v' if name == 'lora_targets' else 'pooler'} on the command line.")
        if self.method == "lora" and not self.lora_targets:
            raise ValueError(f"finetune.lora_targets is empty; name projections from {list(LORA_TARGETS)}, "
                             "e.g. finetune.lora_targets=q,v.")
        for t in self.lora_targets:
            if t not in LORA_TARGETS:
                raise ValueError(f"finetune.lora_targets entry {t!r} names no module; valid targets are "
                                 f"{list(LORA_TARGETS)} (e.g. finetune.lora_targets=q,k,v,o).")
        return self


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """lm-evaluation-harness tasks run in the training loop (t5like/eval; needs the `eval` extra). Their
    metrics go into the eval rows as <task>/<metric> (e.g. hellaswag/acc_norm)."""
    tasks: tuple[str, ...] = ()             # lm-eval task names; () = none
    include_path: str = ""                  # a directory of task YAML files (local tasks); "" = lm-eval's own only
    every: int = 0                          # run the tasks at the evals whose step is a multiple of this; 0 = every eval
    limit: int = 0                          # examples per task; 0 = all
    num_fewshot: int = -1                   # -1 = each task's own
    batch_size: int = 16                    # requests per forward pass (rounded up to the mesh's batch split)

    def validate(self) -> "EvalConfig":
        if not isinstance(self.tasks, tuple) or not all(isinstance(t, str) and t for t in self.tasks):
            raise ValueError(f"eval.tasks={self.tasks!r} must be task names, e.g. eval.tasks=hellaswag,arc_easy.")
        _non_negative("eval.every", self.every, "0 runs the tasks at every eval.")
        _non_negative("eval.limit", self.limit, "0 evaluates every example.")
        _positive("eval.batch_size", self.batch_size)
        if not isinstance(self.num_fewshot, int) or self.num_fewshot < -1:
            raise ValueError(f"eval.num_fewshot={self.num_fewshot!r} must be -1 (the task's own) or >= 0.")
        return self


def _data_config():
    from t5like.data.config import DataConfig  # data owns its config; imported lazily to keep this light
    return DataConfig()


SEED_MAX = 2 ** 32 - 1


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: "DataConfig" = dataclasses.field(default_factory=_data_config)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    finetune: FinetuneConfig = dataclasses.field(default_factory=FinetuneConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)   # lm-eval tasks in the training loop
    workdir: str = "runs/default"           # checkpoints, metrics, config.json (a local path or gs://)
    seed: int = 0                           # parameters' init, data order, dropout

    def validate(self) -> "Config":
        # JAX's PRNG keys take up to 2**63 - 1, but numpy's seeds (the hub stream's shuffle) stop at 2**32 - 1.
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed <= SEED_MAX:
            raise ValueError(f"seed={self.seed!r} must be an integer in [0, {SEED_MAX}] (2**32 - 1, what numpy's "
                             "and JAX's random generators both accept), e.g. seed=0.")
        self.model.validate()
        self.data.validate()
        self.optim.validate()
        self.train.validate()
        self.checkpoint.validate()
        self.finetune.validate()
        self.eval.validate()
        if self.eval.tasks and self.model.family == "encoder":
            raise ValueError(f"eval.tasks={self.eval.tasks!r} need a model that scores text left to right (decoder "
                             "or encoder_decoder); model.family='encoder' has none. Clear eval.tasks.")
        if self.eval.tasks and self.eval.every and self.train.eval_every and self.eval.every % self.train.eval_every:
            raise ValueError(f"eval.every={self.eval.every} is not a multiple of train.eval_every="
                             f"{self.train.eval_every}: the tasks run at evals, so they would run only at the last "
                             f"step. Set eval.every to a multiple of {self.train.eval_every} (or 0: every eval).")
        objective_family = {"lm": "decoder", "prefix_lm": "decoder", "mlm": "encoder",
                            "span_corruption": "encoder_decoder", "completion": "decoder",
                            "classification": "encoder", "seq2seq": "encoder_decoder", "sft": "decoder",
                            "dpo": "decoder"}
        if objective_family[self.data.objective] != self.model.family:
            raise ValueError(
                f"data.objective={self.data.objective!r} trains a {objective_family[self.data.objective]} model, "
                f"but model.family={self.model.family!r}; objectives per family: {objective_family}.")
        if self.data.seq_len > self.model.max_len:
            raise ValueError(f"data.seq_len={self.data.seq_len} exceeds model.max_len={self.model.max_len}; "
                             "raise model.max_len or lower data.seq_len.")
        self._validate_context()
        if self.train.batch_size % self.optim.grad_accum_steps:
            raise ValueError(f"train.batch_size={self.train.batch_size} is not divisible by "
                             f"optim.grad_accum_steps={self.optim.grad_accum_steps}.")
        gated = self.model.activation in ("gated_gelu", "swiglu")
        if self.finetune.method == "lora" and "mlp_gate" in self.finetune.lora_targets and not gated:
            raise ValueError(f"finetune.lora_targets entry 'mlp_gate' names no module of this model "
                             f"(model.activation={self.model.activation!r} has no gate projection); valid targets "
                             f"here are {[t for t in LORA_TARGETS if t != 'mlp_gate']}.")
        if self.data.objective == "classification" and self.model.num_classes < 2:
            raise ValueError(f"data.objective='classification' needs a classification head: model.num_classes="
                             f"{self.model.num_classes}; set model.num_classes to the number of labels.")
        if self.checkpoint.fork_step and self.checkpoint.fork_step >= self.train.steps:
            raise ValueError(f"checkpoint.fork_step={self.checkpoint.fork_step} is not below train.steps="
                             f"{self.train.steps}: a fork trains on from that step; raise train.steps or fork earlier.")
        if not self.workdir:
            raise ValueError("workdir='' : set workdir=DIR, where the run's checkpoints and metrics go.")
        return self

    def _validate_context(self) -> None:
        """Context parallelism shards every sequence of the batch over mesh.context: each length must divide."""
        n = self.mesh.context
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"mesh.context={n!r} must be a positive integer (1 = no context parallelism); "
                             "-1 is not allowed on this axis.")
        if n == 1:
            return
        from t5like.data import batch_shapes
        for key, (shape, _) in batch_shapes(self.data, 1).items():
            if len(shape) > 1 and shape[1] % n:
                field = "data.target_len" if key.startswith("decoder_") else "data.seq_len"
                raise ValueError(f"mesh.context={n} does not divide the length {shape[1]} of batch[{key!r}] "
                                 f"({field}); every sequence is split into mesh.context equal parts: set {field} "
                                 f"to a multiple of {n}, or another mesh.context.")
        if self.model.attention_impl == "splash":
            for key, (shape, _) in batch_shapes(self.data, 1).items():
                if len(shape) > 1 and shape[1] // n % 128:
                    raise ValueError(f"mesh.context={n} with model.attention_impl='splash': each shard's queries "
                                     f"(batch[{key!r}] length {shape[1]} / {n} = {shape[1] // n}) must be a multiple "
                                     f"of 128; set data.seq_len (and data.target_len) to a multiple of {128 * n}, "
                                     "or use model.attention_impl=xla.")


# key=value overrides ------------------------------------------------------------------------------

def field_help(cls) -> dict[str, str]:
    """{field: one line} from the comments in `cls`'s source: a field's trailing comment, else the first
    sentence of the comment block above it. So a field documents itself, for --help, by its comment."""
    import inspect
    import re
    names = {f.name for f in dataclasses.fields(cls)}
    out, above = {}, []
    for line in inspect.getsource(cls).splitlines():
        text = line.strip()
        if text.startswith(("def ", "@")) and out:  # the fields are over
            break
        if text.startswith("#"):
            above.append(text.lstrip("#").strip())
            continue
        field = re.match(r"(\w+)\s*:[^=]*=", text)
        if field and field.group(1) in names:
            trailing = text.split("  # ", 1)[1].strip() if "  # " in text else ""
            block = " ".join(above)
            out[field.group(1)] = trailing or (block.split(". ")[0].rstrip(".") + "." if block else "")
        above = []
    return out


def key_choices() -> dict[str, tuple]:
    """The allowed values of the keys that take one of a few."""
    from t5like.data.config import FORMATS, OBJECTIVES, SOURCES
    return {"model.family": FAMILIES, "model.position": POSITIONS, "model.activation": ACTIVATIONS,
            "model.head_activation": HEAD_ACTIVATIONS, "model.norm": NORMS, "model.norm_placement": NORM_PLACEMENTS,
            "model.remat": REMAT_POLICIES, "model.dtype": DTYPES, "model.param_dtype": DTYPES,
            "model.attention_impl": ATTENTION_IMPLS, "optim.name": OPTIMIZERS, "optim.schedule": SCHEDULES,
            "finetune.method": FINETUNE_METHODS, "data.source": SOURCES, "data.format": FORMATS,
            "data.objective": OBJECTIVES}


def key_help(cfg, prefix: str = "") -> dict[str, str]:
    """{"train.steps": one line of help, ...} for every leaf key of `cfg` (see flat_keys), choices included."""
    out, comments, choices = {}, field_help(type(cfg)), key_choices()
    for f in dataclasses.fields(cfg):
        value, key = getattr(cfg, f.name), prefix + f.name
        if dataclasses.is_dataclass(value):
            out.update(key_help(value, key + "."))
            continue
        text = comments.get(f.name, "")
        if key in choices and not all(str(c) in text for c in choices[key]):
            text += f" [{' | '.join('none' if c is None else str(c) for c in choices[key])}]"
        out[key] = text.strip()
    return out


@functools.lru_cache(maxsize=None)  # resolving the hints is slow and flat_keys asks per field: a plan took seconds
def _field_types(cls) -> dict[str, object]:
    import typing
    from t5like.data.config import EvalSet, MixtureSource, MixtureStage
    return typing.get_type_hints(cls, localns={"DataConfig": type(_data_config()), "EvalSet": EvalSet,
                                               "MixtureSource": MixtureSource, "MixtureStage": MixtureStage})


def flat_keys(cfg, prefix: str = "") -> dict[str, object]:
    """{"train.steps": int, ...} for every leaf field."""
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        key = prefix + f.name
        if dataclasses.is_dataclass(value):
            out.update(flat_keys(value, key + "."))
        else:
            out[key] = _field_types(type(cfg))[f.name]
    return out


def flat_values(cfg, prefix: str = "") -> dict[str, object]:
    """{"train.steps": 1000, ...}: every leaf field's value."""
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out.update(flat_values(value, prefix + f.name + "."))
        else:
            out[prefix + f.name] = value
    return out


def parse_value(key: str, text: str, typ) -> object:
    """Parse `text` as `typ`: int, float, bool, str, Optional[...] ('none'), tuple[...] (comma-separated)."""
    import typing
    origin, args = typing.get_origin(typ), typing.get_args(typ)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)) and type(None) in args:
        if text.lower() in ("none", "null", ""):
            return None
        return parse_value(key, text, next(a for a in args if a is not type(None)))
    if origin is tuple and args and dataclasses.is_dataclass(args[0]):  # e.g. data.eval_sets: a JSON list
        import json
        try:
            items = json.loads(text)
            return tuple(args[0](**item) for item in items)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{key}={text!r} is not a JSON list of {args[0].__name__} objects ({e}); e.g. "
                             f"""{key}='[{{"name": "code", "source": "files", "paths": ["code/*.py"]}}]'.""") from None
    if origin is tuple:
        if args and args[-1] is Ellipsis:
            return tuple(parse_value(key, t.strip(), args[0]) for t in text.split(",") if t.strip())
        raise ValueError(f"{key} cannot be set from the command line; set it in the experiment module.")
    try:
        if typ is bool:
            if text.lower() in ("true", "1", "yes"):
                return True
            if text.lower() in ("false", "0", "no"):
                return False
            raise ValueError
        if typ is int:
            return int(float(text)) if "e" in text.lower() and float(text).is_integer() else int(text)
        if typ is float:
            return float(text)
        if typ is str:
            return text
    except ValueError:
        pass
    else:
        raise ValueError(f"{key} has type {typ}, which cannot be set from the command line.")
    name = getattr(typ, "__name__", str(typ))
    noun = {"int": "an integer", "float": "a number", "bool": "true or false"}.get(name, f"a {name}")
    raise ValueError(f"{key}={text!r} is not a valid {name}; give {noun}, e.g. {key}="
                     f"{ {'int': '100', 'float': '0.001', 'bool': 'true'}.get(name, 'VALUE') }.")


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply `dotted.key=value` overrides, checked against the dataclass field types."""
    import difflib
    keys = flat_keys(cfg)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value; e.g. train.steps=100.")
        key, text = item.split("=", 1)
        key = key.strip()
        if key not in keys:
            near = difflib.get_close_matches(key, list(keys), n=5, cutoff=0.5)
            hint = f" Did you mean: {', '.join(near)}?" if near else f" Known keys: {', '.join(sorted(keys))}."
            raise ValueError(f"unknown config key {key!r}.{hint}")
        value = parse_value(key, text.strip(), keys[key])
        cfg = _replace_path(cfg, key.split("."), value)
    return cfg


def _replace_path(obj, path: list[str], value):
    if len(path) == 1:
        return dataclasses.replace(obj, **{path[0]: value})
    return dataclasses.replace(obj, **{path[0]: _replace_path(getattr(obj, path[0]), path[1:], value)})


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(cls, data: dict):
    """Rebuild a (nested) config dataclass from `to_dict` output, e.g. a saved config.json."""
    types = _field_types(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value, typ = data[f.name], types[f.name]
        if dataclasses.is_dataclass(typ):
            value = from_dict(typ, value)
        elif isinstance(value, list):
            value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        kwargs[f.name] = value
    return cls(**kwargs)
