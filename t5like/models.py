"""Three transformer families on the layers of `t5like.layers`.

  EncoderOnly     BERT-style: bidirectional stack, MLM head, optional pooled classifier.
  DecoderOnly     GPT/Llama-style: causal stack (prefix-LM when the batch carries `prefix`), LM head.
  EncoderDecoder  T5-style: encoder, decoder with cross-attention, shared token embedding.

Every model maps a batch dict (the keys the data pipeline produces) to float32 logits [B, L, V].
Layers are stacked with `nnx.vmap` and run with `lax.scan`, so program size does not grow with depth.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from t5like import layers as L
from t5like.config import ModelConfig
from t5like.sharding import Sharder, state_shardings

Array = jax.Array

REMAT_POLICIES = {
    # "minimal": keep the weight matmuls' outputs, recompute attention scores and elementwise ops.
    "minimal": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # "full": keep only each layer's input; recompute the whole layer in the backward pass.
    "full": jax.checkpoint_policies.nothing_saveable,
}


class Block(nnx.Module):
    """Self-attention, optional cross-attention, MLP; each a residual branch with pre- or post-norm."""

    def __init__(self, cfg: ModelConfig, *, cross: bool, rngs: nnx.Rngs):
        self.attn_norm = L.Norm(cfg, rngs=rngs)
        self.attn = L.Attention(cfg, rngs=rngs)
        self.cross = cross
        if cross:
            self.cross_norm = L.Norm(cfg, rngs=rngs)
            self.cross_attn = L.Attention(dataclasses.replace(cfg, position="none"), rngs=rngs)
        self.mlp_norm = L.Norm(cfg, rngs=rngs)
        self.mlp = L.MLP(cfg, rngs=rngs)
        self.post_norm = cfg.norm_placement == "post"
        self.dropout_rate = cfg.dropout

    def _residual(self, x, norm, branch, rng):
        if self.post_norm:  # Vaswani et al.: LayerNorm(x + Sublayer(x))
            return norm(x + L.dropout(branch(x), self.dropout_rate, rng))
        return x + L.dropout(branch(norm(x)), self.dropout_rate, rng)

    def __call__(self, x_BTD: Array, *, mask, bias, positions, shard: Sharder, rng=None,
                 encoded_BSD=None, cross_mask=None) -> Array:
        r = [None] * 3 if rng is None else list(jax.random.split(rng, 3))
        x_BTD = self._residual(x_BTD, self.attn_norm, lambda h: self.attn(
            h, h, mask_B1TS=mask, bias_BNTS=bias, q_positions_BT=positions, k_positions_BS=positions,
            shard=shard), r[0])
        if self.cross:
            x_BTD = self._residual(x_BTD, self.cross_norm, lambda h: self.cross_attn(
                h, encoded_BSD, mask_B1TS=cross_mask, shard=shard), r[1])
        x_BTD = self._residual(x_BTD, self.mlp_norm, lambda h: self.mlp(h, shard), r[2])
        return shard(x_BTD, ("batch", "length", "act_embed"))


def stacked(make, num_layers: int, rngs: nnx.Rngs):
    """`num_layers` copies of a module, parameters stacked on a leading `layers` axis."""
    @nnx.split_rngs(splits=num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(r):
        return make(r)

    module = create(rngs)
    for _, var in nnx.iter_graph(module):
        if isinstance(var, nnx.Variable) and "logical_axes" in var.get_metadata():
            var.set_metadata(logical_axes=("layers",) + tuple(var.get_metadata()["logical_axes"]))
    return module


class Stack(nnx.Module):
    """A scanned stack of Blocks, a final norm (pre-norm only) and the stack's shared relative bias."""

    def __init__(self, cfg: ModelConfig, num_layers: int, *, causal: bool, cross: bool, rngs: nnx.Rngs):
        self.layers = stacked(lambda r: Block(cfg, cross=cross, rngs=r), num_layers, rngs)
        self.final_norm = L.Norm(cfg, rngs=rngs) if cfg.norm_placement == "pre" else None
        self.relative_bias = (L.RelativePositionBias(cfg, bidirectional=not causal, rngs=rngs)
                              if cfg.position == "relative" else None)
        self.num_layers, self.remat = num_layers, cfg.remat

    def __call__(self, x_BTD, *, mask, positions, shard: Sharder, rng=None, encoded_BSD=None, cross_mask=None):
        bias = None if self.relative_bias is None else self.relative_bias(positions, positions)
        graphdef, params = nnx.split(self.layers)
        keys = None if rng is None else jax.random.split(rng, self.num_layers)

        def body(x, xs):
            layer_params, key = xs
            layer = nnx.merge(graphdef, layer_params)
            return layer(x, mask=mask, bias=bias, positions=positions, shard=shard, rng=key,
                         encoded_BSD=encoded_BSD, cross_mask=cross_mask), None

        if self.remat != "none":
            body = jax.checkpoint(body, policy=REMAT_POLICIES[self.remat], prevent_cse=False)
        x_BTD, _ = jax.lax.scan(body, x_BTD, (params, keys))
        return x_BTD if self.final_norm is None else self.final_norm(x_BTD)


def _segments_and_positions(batch: dict, prefix: str, ids_BL: Array):
    seg = batch.get(f"{prefix}segment_ids")
    pos = batch.get(f"{prefix}positions")
    if seg is None:
        seg = jnp.ones_like(ids_BL)
    if pos is None:
        pos = jnp.broadcast_to(jnp.arange(ids_BL.shape[1]), ids_BL.shape)
    return seg, pos


class _Base(nnx.Module):
    """Token + absolute position embedding and the output projection, shared by all families."""

    def _init_io(self, cfg: ModelConfig, shard: Sharder, rngs: nnx.Rngs):
        self.cfg, self.shard = cfg, shard
        self.embed = L.Embed(cfg, rngs=rngs)
        self.learned_positions = L.LearnedPositions(cfg, rngs=rngs) if cfg.position == "learned" else None
        self.lm_head = None if cfg.tie_embeddings else L.Dense(
            cfg.d_model, cfg.vocab_size, ("embed", "vocab"), cfg, rngs=rngs, use_bias=False)

    def embed_tokens(self, ids_BL: Array, positions_BL: Array, rng=None) -> Array:
        x = self.embed(ids_BL, self.shard)
        if self.cfg.position == "sinusoidal":
            x = x + L.sinusoidal_positions(positions_BL, self.cfg.d_model).astype(x.dtype)
        elif self.cfg.position == "learned":
            x = x + self.learned_positions(positions_BL).astype(x.dtype)
        x = L.dropout(x, self.cfg.dropout, rng)
        return self.shard(x, ("batch", "length", "act_embed"))

    def logits(self, x_BLD: Array) -> Array:
        y = self.embed.attend(x_BLD) if self.lm_head is None else self.lm_head(x_BLD)
        return self.shard(y.astype(jnp.float32), ("batch", "length", "act_vocab"))


def _split(rng, n):
    return [None] * n if rng is None else list(jax.random.split(rng, n))


class DecoderOnly(_Base):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, shard: Sharder = Sharder()):
        self._init_io(cfg, shard, rngs)
        self.decoder = Stack(cfg, cfg.num_layers, causal=True, cross=False, rngs=rngs)

    def __call__(self, batch: dict, *, rng: Optional[Array] = None) -> Array:
        ids = batch["inputs"]
        seg, pos = _segments_and_positions(batch, "", ids)
        r = _split(rng, 2)
        mask = L.attention_mask(seg, seg, causal=True, prefix_BT=batch.get("prefix"))
        x = self.decoder(self.embed_tokens(ids, pos, r[0]), mask=mask, positions=pos, shard=self.shard, rng=r[1])
        return self.logits(x)


class EncoderOnly(_Base):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, shard: Sharder = Sharder()):
        self._init_io(cfg, shard, rngs)
        self.encoder = Stack(cfg, cfg.num_layers, causal=False, cross=False, rngs=rngs)
        # BERT's MLM transform: dense, gelu, norm, then the (tied) output projection with a bias.
        # Its output lives in embedding space, so it is not sharded like an MLP hidden layer: with the
        # output over `tensor`, the tied projection contracted a tensor-sharded dim into a
        # tensor-sharded vocab, and XLA's CPU partitioner gave wrong gradients on a 2x2x2 mesh.
        self.mlm_dense = L.Dense(cfg.d_model, cfg.d_model, ("embed", None), cfg, rngs=rngs, use_bias=True)
        self.mlm_norm = L.Norm(cfg, rngs=rngs)
        self.mlm_bias = L.param(rngs, (cfg.vocab_size,), ("vocab",), L.dtype_of(cfg.param_dtype), init="zeros")
        if cfg.num_classes:
            self.pooler = L.Dense(cfg.d_model, cfg.d_model, ("embed", None), cfg, rngs=rngs, use_bias=True)
            self.classifier = L.Dense(cfg.d_model, cfg.num_classes, ("embed", "classes"), cfg, rngs=rngs,
                                      use_bias=True)

    def encode(self, batch: dict, *, rng=None) -> Array:
        ids = batch["inputs"]
        seg, pos = _segments_and_positions(batch, "", ids)
        r = _split(rng, 2)
        mask = L.attention_mask(seg, seg, causal=False)
        return self.encoder(self.embed_tokens(ids, pos, r[0]), mask=mask, positions=pos, shard=self.shard, rng=r[1])

    def __call__(self, batch: dict, *, rng: Optional[Array] = None) -> Array:
        h = self.shard(self.mlm_dense(self.encode(batch, rng=rng)), ("batch", "length", "act_embed"))
        x = self.mlm_norm(jax.nn.gelu(h, approximate=True))
        return self.logits(x) + self.mlm_bias[...].astype(jnp.float32)

    def classify(self, batch: dict, *, rng: Optional[Array] = None) -> Array:
        """Pooled ([first token] -> dense -> tanh) classification logits [B, num_classes]."""
        if not self.cfg.num_classes:
            raise ValueError("model.num_classes=0: this encoder has no classification head; set model.num_classes.")
        pooled = jnp.tanh(self.pooler(self.encode(batch, rng=rng)[:, 0]))
        return self.classifier(pooled).astype(jnp.float32)


class EncoderDecoder(_Base):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, shard: Sharder = Sharder()):
        self._init_io(cfg, shard, rngs)  # one token embedding, shared by encoder and decoder (T5)
        self.encoder = Stack(cfg, cfg.num_layers, causal=False, cross=False, rngs=rngs)
        self.decoder = Stack(cfg, cfg.decoder_layers, causal=True, cross=True, rngs=rngs)

    def encode(self, batch: dict, *, rng=None) -> Array:
        ids = batch["encoder_inputs"]
        seg, pos = _segments_and_positions(batch, "encoder_", ids)
        r = _split(rng, 2)
        mask = L.attention_mask(seg, seg, causal=False)
        return self.encoder(self.embed_tokens(ids, pos, r[0]), mask=mask, positions=pos, shard=self.shard, rng=r[1])

    def decode(self, batch: dict, encoded_BSD: Array, *, rng=None) -> Array:
        ids = batch["decoder_inputs"]
        seg, pos = _segments_and_positions(batch, "decoder_", ids)
        enc_seg, _ = _segments_and_positions(batch, "encoder_", batch["encoder_inputs"])
        r = _split(rng, 2)
        mask = L.attention_mask(seg, seg, causal=True)
        cross_mask = L.attention_mask(seg, enc_seg, causal=False)
        x = self.decoder(self.embed_tokens(ids, pos, r[0]), mask=mask, positions=pos, shard=self.shard,
                         rng=r[1], encoded_BSD=encoded_BSD, cross_mask=cross_mask)
        return self.logits(x)

    def __call__(self, batch: dict, *, rng: Optional[Array] = None) -> Array:
        r = _split(rng, 2)
        return self.decode(batch, self.encode(batch, rng=r[0]), rng=r[1])


FAMILIES = {"encoder": EncoderOnly, "decoder": DecoderOnly, "encoder_decoder": EncoderDecoder}


def build_model(cfg: ModelConfig, *, seed: int = 0, shard: Sharder = Sharder()):
    """Build eagerly on the default device (tests, small models)."""
    return FAMILIES[cfg.validate().family](cfg, rngs=nnx.Rngs(seed), shard=shard)


def create_sharded(cfg: ModelConfig, shard: Sharder, *, seed: int = 0):
    """Abstract init to learn shapes and logical names, then a jitted init whose outputs land
    directly in their shards: no full replica is materialised on any one device."""
    cfg.validate()
    make = functools.partial(FAMILIES[cfg.family], cfg, shard=shard)
    abstract = nnx.eval_shape(lambda: make(rngs=nnx.Rngs(seed)))
    graphdef, abstract_state = nnx.split(abstract)
    if shard.mesh is None:
        return build_model(cfg, seed=seed, shard=shard)
    shardings = state_shardings(abstract_state, shard)

    @functools.partial(jax.jit, out_shardings=shardings)
    def init():
        return nnx.state(make(rngs=nnx.Rngs(seed)))

    return nnx.merge(graphdef, init())
