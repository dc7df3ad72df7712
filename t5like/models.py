"""Three transformer families on the layers of `t5like.layers`.

  EncoderOnly     BERT-style: bidirectional stack, MLM head, optional pooled classifier.
  DecoderOnly     GPT/Llama-style: causal stack (prefix-LM when the batch carries `prefix`), LM head.
  EncoderDecoder  T5-style: encoder, decoder with cross-attention, shared token embedding.

Every model maps a batch dict (the keys the data pipeline produces) to float32 logits [B, L, V].
Layers are stacked with `nnx.vmap` and run with `lax.scan`, so program size does not grow with depth.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import nnx, struct

from t5like import layers as L
from t5like import parametrization, probe, quantization
from t5like.config import ModelConfig
from t5like.sharding import Sharder, state_shardings

Array = jax.Array

# model.remat name -> what jax.checkpoint saves ("none" applies no checkpointing).
CHECKPOINT_POLICIES = {
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
        self.branch_multiplier = parametrization.branch_multiplier(cfg)  # CompleteP's 1/depth; 1 otherwise

    def _scaled(self, y):
        return y if self.branch_multiplier == 1.0 else y * self.branch_multiplier

    def _residual(self, x, norm, branch, rng, name: str):
        # Vaswani et al. (post-norm): LayerNorm(x + Sublayer(x)); pre-norm: x + Sublayer(LayerNorm(x)).
        y = probe.record(name, branch(x if self.post_norm else norm(x)))
        y = L.dropout(self._scaled(y), self.dropout_rate, rng)
        return norm(x + y) if self.post_norm else x + y

    def __call__(self, x_BTD: Array, *, mask, bias, positions, shard: Sharder, rng=None,
                 encoded_BSD=None, cross_mask=None, prefix_kv=None) -> Array:
        r = [None] * 3 if rng is None else list(jax.random.split(rng, 3))
        # LoRA dropout keys (t5like.finetune), folded in so that the residual dropout keys stay as they were.
        a = [None] * 3 if rng is None else [jax.random.fold_in(rng, 3 + i) for i in range(3)]
        x_BTD = self._residual(x_BTD, self.attn_norm, lambda h: self.attn(
            h, h, mask_B1TS=mask, bias_BNTS=bias, q_positions_BT=positions, k_positions_BS=positions,
            shard=shard, rng=a[0], prefix_kv=prefix_kv), r[0], "attn")
        if self.cross:
            x_BTD = self._residual(x_BTD, self.cross_norm, lambda h: self.cross_attn(
                h, encoded_BSD, mask_B1TS=cross_mask, shard=shard, rng=a[1]), r[1], "cross_attn")
        x_BTD = self._residual(x_BTD, self.mlp_norm, lambda h: self.mlp(h, shard, a[2]), r[2], "mlp")
        return probe.record("stream", shard(x_BTD, ("batch", "length", "act_embed")))


    # Decoding: the same residual branches as __call__, with a KV cache and no dropout.
    def _norm_in(self, x, norm):
        return x if self.post_norm else norm(x)

    def _add(self, x, y, norm):
        y = self._scaled(y)
        return norm(x + y) if self.post_norm else x + y

    def decode(self, x_BTD: Array, k_LBKSH: Array, v_LBKSH: Array, layer: Array, *, index, mask, bias, positions,
               shard: Sharder, cross_k_BKSH=None, cross_v_BKSH=None, cross_mask=None, prefix_kv=None,
               ring: bool = False):
        """One layer (number `layer` of the stack) over T new tokens: self-attention against, and into, the
        stack's cache [layers, B, K, S, H] (a sliding window's ring buffer with `ring`); cross-attention against
        the encoder's keys/values, computed once before decoding. Returns (x, k, v): the cache with this layer's
        new slots written."""
        attend = self.attn.attend_ring if ring else self.attn.attend_cached
        y, k_LBKSH, v_LBKSH = attend(self._norm_in(x_BTD, self.attn_norm), positions, k_LBKSH,
                                                      v_LBKSH, layer, index, mask_B1TS=mask, bias_BNTS=bias,
                                                      shard=shard, prefix_kv=prefix_kv)
        x_BTD = self._add(x_BTD, y, self.attn_norm)
        if self.cross:
            q_BTNH = self.cross_attn.project_query(self._norm_in(x_BTD, self.cross_norm), None, shard)
            y = self.cross_attn.attend_stored(q_BTNH, cross_k_BKSH, cross_v_BKSH, cross_mask, None, shard)
            x_BTD = self._add(x_BTD, y, self.cross_norm)
        x_BTD = self._add(x_BTD, self.mlp(self._norm_in(x_BTD, self.mlp_norm), shard), self.mlp_norm)
        return shard(x_BTD, ("batch", "length", "act_embed")), k_LBKSH, v_LBKSH


@jax.custom_vjp
def write_gradient_once(x: Array) -> Array:
    """The identity, whose gradient XLA must compute and write out before anything uses it."""
    return x


def _write_gradient_once_fwd(x):
    return x, None


def _write_gradient_once_bwd(_, g):
    # A conditional is a boundary XLA does not fuse across (XLA CPU drops optimization barriers). XLA cannot fold
    # its predicate, and removes a conditional whose branches are the same: a NaN gradient comes out all NaN.
    first = g.reshape(-1)[0]
    return (jax.lax.cond(first == first, lambda g: g, lambda g: jnp.full_like(g, jnp.nan), g),)


write_gradient_once.defvjp(_write_gradient_once_fwd, _write_gradient_once_bwd)


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
        self.probe_name = "decoder" if causal else "encoder"
        self.scan_unroll = cfg.scan_unroll
        self.prefix = None  # prefix tuning (t5like.finetune): a module giving each layer's key/value prefixes
        self.kv_cache_quant = "none"  # "int8": decode caches of int8 keys/values (quantization.quantize_for_decoding)

    def __call__(self, x_BTD, *, mask, positions, shard: Sharder, rng=None, encoded_BSD=None, cross_mask=None):
        bias = None if self.relative_bias is None else self.relative_bias(positions, positions)
        graphdef, params = nnx.split(self.layers)
        keys = None if rng is None else jax.random.split(rng, self.num_layers)
        platform = L.platform(shard)
        unroll = min(self.scan_unroll or (1 if platform == "tpu" else self.num_layers), self.num_layers)
        # XLA CPU fuses the residual stream's gradient, a chain of adds through every layer above, into each of
        # its consumers instead of writing it once; unrolled on CPU, each layer's input gradient is written out
        # first (docs/profile.md). The values agree to float rounding.
        write_gradients = unroll > 1 and platform == "cpu"

        def body(x, xs):
            layer_params, key, prefix_kv = xs
            layer = nnx.merge(graphdef, layer_params)
            x = write_gradient_once(x) if write_gradients else x
            return layer(x, mask=mask, bias=bias, positions=positions, shard=shard, rng=key,
                         encoded_BSD=encoded_BSD, cross_mask=cross_mask, prefix_kv=prefix_kv), None

        if self.remat != "none":
            body = jax.checkpoint(body, policy=CHECKPOINT_POLICIES[self.remat], prevent_cse=False)
        if probe.active():  # coordinate checks: layer by layer, so each sublayer's output can be recorded
            for i in range(self.num_layers):
                with probe.scope(f"{self.probe_name}/{i}"):
                    x_BTD, _ = body(x_BTD, jax.tree.map(lambda a: a[i], (params, keys, self._prefix_kv())))
        else:
            x_BTD, _ = jax.lax.scan(body, x_BTD, (params, keys, self._prefix_kv()), unroll=unroll)
        x_BTD = x_BTD if self.final_norm is None else self.final_norm(x_BTD)
        return probe.record(f"{self.probe_name}/out", x_BTD)


    def _prefix_kv(self):
        """Every layer's prefix keys and values, each [layers, P, K, H], or None."""
        return None if self.prefix is None else self.prefix()

    # Decoding ---------------------------------------------------------------------------------------
    # The cache of a stack is stacked on the layer axis, like its params, and scanned together with them.

    def empty_cache(self, batch_size: int, length: int, shard: Sharder) -> "KVCache":
        num_layers, _, K, H = self.layers.attn.key.shape  # [layers, D, K, H]
        shape = (num_layers, batch_size, K, length, H)
        empty = lambda: L.on_cache(shard, quantization.empty_kv(shape, self.layers.attn.dtype, self.kv_cache_quant),
                                   KV_CACHE_AXES)
        return KVCache(empty(), empty())

    def cross_kv(self, encoded_BSD: Array, shard: Sharder) -> "KVCache":
        """Every layer's cross-attention keys and values of the encoder output, computed once per prompt."""
        graphdef, params = nnx.split(self.layers)

        def body(_, layer_params):
            layer = nnx.merge(graphdef, layer_params)
            k_BSKH, v_BSKH = layer.cross_attn.project_kv(encoded_BSD, None, shard)
            return None, (jnp.swapaxes(k_BSKH, 1, 2), jnp.swapaxes(v_BSKH, 1, 2))

        _, (k, v) = jax.lax.scan(body, None, params)
        return KVCache(shard(k, KV_CACHE_AXES), shard(v, KV_CACHE_AXES))

    def decode(self, x_BTD: Array, cache: "KVCache", *, index, mask, q_positions_BT, k_positions_BS,
               shard: Sharder, cross: Optional["KVCache"] = None, cross_mask=None,
               ring: bool = False) -> tuple[Array, "KVCache"]:
        """T new tokens through every layer, writing their keys/values into `cache` at slot `index`."""
        # T5 bias of each query position against every cache slot (causal buckets in a decoder stack).
        bias = None if self.relative_bias is None else self.relative_bias(q_positions_BT, k_positions_BS)
        graphdef, params = nnx.split(self.layers)

        # The whole cache rides in the loop's carry and each layer writes only its T new slots into it, in
        # place. Scanning over the cache as inputs/outputs instead rewrote all S slots of every layer at
        # every step: at batch 8 on CPU that copying took more time than the model.
        def body(carry, xs):
            x, k_LBKSH, v_LBKSH = carry
            layer_params, i, cross_k, cross_v, prefix_kv = xs
            layer = nnx.merge(graphdef, layer_params)
            x, k_LBKSH, v_LBKSH = layer.decode(x, k_LBKSH, v_LBKSH, i, index=index, mask=mask, bias=bias,
                                               positions=q_positions_BT, shard=shard, cross_k_BKSH=cross_k,
                                               cross_v_BKSH=cross_v, cross_mask=cross_mask, prefix_kv=prefix_kv,
                                               ring=ring)
            return (x, k_LBKSH, v_LBKSH), None

        xs = (params, jnp.arange(self.num_layers), None if cross is None else cross.k,
              None if cross is None else cross.v, self._prefix_kv())
        (x_BTD, k, v), _ = jax.lax.scan(body, (x_BTD, cache.k, cache.v), xs)
        x_BTD = x_BTD if self.final_norm is None else self.final_norm(x_BTD)
        return x_BTD, KVCache(L.on_cache(shard, k, KV_CACHE_AXES), L.on_cache(shard, v, KV_CACHE_AXES))


def _segments_and_positions(batch: dict, prefix: str, ids_BL: Array):
    seg = batch.get(f"{prefix}segment_ids")
    pos = batch.get(f"{prefix}positions")
    if seg is None:
        seg = jnp.ones_like(ids_BL)
    if pos is None:
        pos = jnp.broadcast_to(jnp.arange(ids_BL.shape[1]), ids_BL.shape)
    return seg, pos


# Decode caches ----------------------------------------------------------------------------------------

KV_CACHE_AXES = ("layers",) + L.CACHE_NAMES


@struct.dataclass
class KVCache:
    """Keys and values of every layer of a stack: k, v [layers, B, K, S, H]; each (row, kv head)'s slots are
    contiguous, so decoding streams them without a transpose. An int8 cache (quantize_for_decoding) holds each
    as a qwix QArray: int8 values and float32 scales [layers, B, K, S, 1]."""
    k: Any
    v: Any


@struct.dataclass
class DecodeCache:
    """Everything decoding carries from step to step besides the tokens.

    Prompts are left-padded, so every row writes the same slot at each step; row b's real tokens
    start at slot start_B[b] and its positions count from there.
    """
    self_kv: KVCache                       # [layers, B, K, S, H], S = the static decode length
    start_B: Array                         # int32 [B]
    index: Array                           # int32 scalar: the next slot to write
    cross_kv: Optional[KVCache] = None     # encoder-decoder: [layers, B, K, S_enc, H]
    encoder_valid_BS: Optional[Array] = None  # encoder-decoder: bool [B, S_enc], False on encoder padding
    # model.attention_window when self_kv is a ring buffer of that many slots (Attention.attend_ring); 0: a
    # plain cache, slot i holding token i (also under a window, when the decode fits in the window).
    window: int = struct.field(pytree_node=False, default=0)

    @property
    def length(self) -> int:
        return self.self_kv.k.shape[3]

    def take(self, rows_B: Array) -> "DecodeCache":
        """Rows `rows_B` of the cache (beam search: expand prompts into beams, reorder beams)."""
        def rows(x, axis):
            return None if x is None else jnp.take(x, rows_B, axis=axis)
        kv = lambda c: None if c is None else KVCache(*(jax.tree.map(lambda a: rows(a, 1), x) for x in (c.k, c.v)))
        return DecodeCache(kv(self.self_kv), rows(self.start_B, 0), self.index, kv(self.cross_kv),
                           rows(self.encoder_valid_BS, 0), window=self.window)


def _decode_step(model, ids_BT: Array, cache: DecodeCache, last_only: bool,
                 prefix: bool = False) -> tuple[Array, DecodeCache]:
    """T new tokens at slots [cache.index, cache.index + T) -> float32 logits [B, T or 1, V], updated cache.
    `prefix`: all but the last of them attend to each other bidirectionally (a prefix-LM prompt)."""
    T, S = ids_BT.shape[1], cache.length
    slots_T = cache.index + jnp.arange(T, dtype=jnp.int32)
    prefix_end = slots_T[-1] if prefix else None
    if cache.window:  # keys: the ring's slots (the token each holds), then the new tokens
        k_slots_S = jnp.concatenate([L.ring_slots(cache.index, S), slots_T])
        mask = L.ring_mask(cache.start_B, slots_T, k_slots_S, cache.window, prefix_end)
    else:
        k_slots_S = jnp.arange(S, dtype=jnp.int32)
        mask = L.decode_mask(cache.start_B, slots_T, S, prefix_end=prefix_end)
    # Clamped at 0 so padding slots never index outside a learned position table (NaN in a gather).
    q_positions_BT = jnp.maximum(slots_T[None, :] - cache.start_B[:, None], 0)
    k_positions_BS = jnp.maximum(k_slots_S[None, :] - cache.start_B[:, None], 0)
    cross_mask = None if cache.encoder_valid_BS is None else cache.encoder_valid_BS[:, None, None, :]
    x = model.embed_tokens(ids_BT, q_positions_BT)
    x, self_kv = model.decoder.decode(x, cache.self_kv, index=cache.index, mask=mask, q_positions_BT=q_positions_BT,
                                      k_positions_BS=k_positions_BS, shard=model.shard, cross=cache.cross_kv,
                                      cross_mask=cross_mask, ring=bool(cache.window))
    logits = model.logits(x[:, -1:] if last_only else x)
    return logits, cache.replace(self_kv=self_kv, index=cache.index + T)


class _Base(nnx.Module):
    """Token + absolute position embedding and the output projection, shared by all families."""

    def _init_io(self, cfg: ModelConfig, shard: Sharder, rngs: nnx.Rngs):
        self.cfg, self.shard = cfg, shard
        self.embed = L.Embed(cfg, rngs=rngs)
        self.learned_positions = L.LearnedPositions(cfg, rngs=rngs) if cfg.position == "learned" else None
        self.token_types = L.param(rngs, (cfg.type_vocab_size, cfg.d_model), (None, "embed"),
                                   L.dtype_of(cfg.param_dtype), 0.02) if cfg.type_vocab_size else None
        self.embedding_norm = L.Norm(cfg, rngs=rngs) if cfg.embedding_norm else None
        self.lm_head = None if cfg.tie_embeddings else L.Dense(
            cfg.d_model, cfg.vocab_size, ("embed", "vocab"), cfg, rngs=rngs, use_bias=False)

    def embed_tokens(self, ids_BL: Array, positions_BL: Array, rng=None, token_types_BL=None) -> Array:
        x = self.embed(ids_BL, self.shard)
        if self.token_types is not None:  # BERT segments; absent types are type 0
            types_BL = jnp.zeros_like(ids_BL) if token_types_BL is None else token_types_BL
            x = x + jnp.take(self.token_types[...], types_BL, axis=0).astype(x.dtype)
        if self.cfg.position == "sinusoidal":
            x = x + L.sinusoidal_positions(positions_BL, self.cfg.d_model).astype(x.dtype)
        elif self.cfg.position == "learned":
            x = x + self.learned_positions(positions_BL).astype(x.dtype)
        if self.embedding_norm is not None:
            x = self.embedding_norm(x)
        x = L.dropout(x, self.cfg.dropout, rng)
        return self.shard(x, ("batch", "length", "act_embed"))

    def _encode_bidirectional(self, batch: dict, ids_key: str, prefix: str, rng) -> Array:
        """Embed `batch[ids_key]` and run `self.encoder` with a bidirectional, segment-local mask."""
        ids = batch[ids_key]
        seg, pos = _segments_and_positions(batch, prefix, ids)
        r = _split(rng, 2)
        mask = L.attention_mask(seg, seg, causal=False, window=self.cfg.attention_window)
        x = self.embed_tokens(ids, pos, r[0], token_types_BL=batch.get(f"{prefix}token_types"))
        return self.encoder(x, mask=mask, positions=pos, shard=self.shard, rng=r[1])

    def _cache_slots(self, length: int) -> tuple[int, int]:
        """(slots, ring window) of a decode cache for `length` tokens: a sliding window W shorter than the
        decode keeps only W slots, a ring buffer; otherwise one slot per token (window 0)."""
        W = self.cfg.attention_window
        return (W, W) if 0 < W < length else (length, 0)

    def logits(self, x_BLD: Array) -> Array:
        if self.cfg.tied_head_rescale:  # T5: the tied head sees the hidden state scaled by d_model**-0.5
            x_BLD = x_BLD * self.cfg.d_model ** -0.5
        multiplier = parametrization.logits_multiplier(self.cfg)  # µP's 1/width on a tied head; 1 otherwise
        if multiplier != 1.0:
            x_BLD = x_BLD * multiplier
        y = self.embed.attend(x_BLD) if self.lm_head is None else self.lm_head(x_BLD)
        return probe.record("logits", self.shard(y.astype(jnp.float32), ("batch", "length", "act_vocab")))


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
        mask = L.attention_mask(seg, seg, causal=True, prefix_BT=batch.get("prefix"), window=self.cfg.attention_window)
        x = self.decoder(self.embed_tokens(ids, pos, r[0]), mask=mask, positions=pos, shard=self.shard, rng=r[1])
        return self.logits(x)

    def init_cache(self, start_B: Array, length: int) -> DecodeCache:
        """An empty cache for `length` tokens of left-padded rows whose real tokens start at start_B: `length`
        slots, or a ring of model.attention_window slots when the window is shorter."""
        slots, window = self._cache_slots(length)
        return DecodeCache(self.decoder.empty_cache(start_B.shape[0], slots, self.shard),
                           start_B.astype(jnp.int32), jnp.zeros((), jnp.int32), window=window)

    def decode_step(self, ids_BT: Array, cache: DecodeCache, *, last_only: bool = False, prefix: bool = False):
        """Prefill (T = prompt length) or one decoding step (T = 1): (float32 logits [B, T, V], cache).
        `prefix=True` prefills as a prefix-LM was trained: the prompt but its last token is bidirectional."""
        return _decode_step(self, ids_BT, cache, last_only, prefix)


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
        return self._encode_bidirectional(batch, "inputs", "", rng)

    def __call__(self, batch: dict, *, rng: Optional[Array] = None) -> Array:
        h = self.shard(self.mlm_dense(self.encode(batch, rng=rng)), ("batch", "length", "act_embed"))
        x = self.mlm_norm(L.ACTIVATION_FNS[self.cfg.head_activation](h))
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
        return self._encode_bidirectional(batch, "encoder_inputs", "encoder_", rng)

    def decode(self, batch: dict, encoded_BSD: Array, *, rng=None) -> Array:
        ids = batch["decoder_inputs"]
        seg, pos = _segments_and_positions(batch, "decoder_", ids)
        enc_seg, _ = _segments_and_positions(batch, "encoder_", batch["encoder_inputs"])
        r = _split(rng, 2)
        mask = L.attention_mask(seg, seg, causal=True, window=self.cfg.attention_window)
        cross_mask = L.attention_mask(seg, enc_seg, causal=False)
        x = self.decoder(self.embed_tokens(ids, pos, r[0]), mask=mask, positions=pos, shard=self.shard,
                         rng=r[1], encoded_BSD=encoded_BSD, cross_mask=cross_mask)
        return self.logits(x)

    def __call__(self, batch: dict, *, rng: Optional[Array] = None) -> Array:
        r = _split(rng, 2)
        return self.decode(batch, self.encode(batch, rng=r[0]), rng=r[1])

    def init_cache(self, encoder_inputs_BS: Array, encoder_segment_ids_BS: Array, length: int) -> DecodeCache:
        """Run the encoder once and keep every decoder layer's cross-attention keys/values, plus an empty
        self-attention cache of `length` slots. Encoder rows are right-padded (segment id 0)."""
        encoded = self.encode({"encoder_inputs": encoder_inputs_BS, "encoder_segment_ids": encoder_segment_ids_BS})
        B = encoder_inputs_BS.shape[0]
        slots, window = self._cache_slots(length)
        return DecodeCache(self.decoder.empty_cache(B, slots, self.shard), jnp.zeros((B,), jnp.int32),
                           jnp.zeros((), jnp.int32), self.decoder.cross_kv(encoded, self.shard),
                           encoder_segment_ids_BS > 0, window=window)

    def decode_step(self, ids_BT: Array, cache: DecodeCache, *, last_only: bool = False):
        """Decoder tokens (the first is the start token 0) -> (float32 logits [B, T, V], cache)."""
        return _decode_step(self, ids_BT, cache, last_only)


# model.family name -> its class.
MODEL_CLASSES = {"encoder": EncoderOnly, "decoder": DecoderOnly, "encoder_decoder": EncoderDecoder}


def without_adapters(model):
    """A copy of `model` (sharing its arrays) with fine-tuning's adapters off: no `<kernel>_lora` module (LoRA)
    and no `prefix` (prefix tuning). PEFT's disable_adapter(): what DPO's reference computes under LoRA/prefix."""
    copy = nnx.merge(*nnx.split(model))
    for name in ("encoder", "decoder"):
        stack = getattr(copy, name, None)
        if not isinstance(stack, Stack):
            continue
        stack.prefix = None
        for module in (stack.layers.attn, getattr(stack.layers, "cross_attn", None), stack.layers.mlp):
            for attr in [a for a in vars(module) if a.endswith("_lora")] if module is not None else []:
                delattr(module, attr)
    return copy


def build_model(cfg: ModelConfig, *, seed: int = 0, shard: Sharder = Sharder()):
    """Build eagerly on the default device (tests, small models)."""
    return MODEL_CLASSES[cfg.validate().family](cfg, rngs=nnx.Rngs(seed), shard=shard)


def abstract_model(cfg: ModelConfig, shard: Sharder = Sharder(), *, seed: int = 0, adapt=None):
    """(graphdef, abstract state): shapes, dtypes and logical names, with nothing allocated.
    `adapt(model) -> model` adds modules before creation (the plugins of t5like.capabilities)."""
    adapt = adapt or (lambda m: m)
    model = nnx.eval_shape(lambda: adapt(MODEL_CLASSES[cfg.family](cfg, rngs=nnx.Rngs(seed), shard=shard)))
    return nnx.split(model)


def sharded_init(cfg: ModelConfig, shard: Sharder, *, seed: int = 0, adapt=None):
    """(graphdef, abstract state, param shardings, init) where `init()` returns the params as a pure dict, created inside
    one jit whose outputs land directly in their shards: no full replica exists on any one device.
    The trainer and `create_sharded` both use this; it is the one sharded-init path."""
    cfg.validate()
    graphdef, abstract_state = abstract_model(cfg, shard, seed=seed, adapt=adapt)
    shardings = state_shardings(abstract_state, shard).to_pure_dict()

    def init():
        model = (adapt or (lambda m: m))(MODEL_CLASSES[cfg.family](cfg, rngs=nnx.Rngs(seed), shard=shard))
        return nnx.state(model).to_pure_dict()

    return graphdef, abstract_state, shardings, jax.jit(init, out_shardings=shardings)


def create_sharded(cfg: ModelConfig, shard: Sharder, *, seed: int = 0):
    """The model, created sharded on `shard.mesh` (on the default device when there is no mesh)."""
    if shard.mesh is None:
        return build_model(cfg, seed=seed, shard=shard)
    graphdef, abstract_state, _, init = sharded_init(cfg, shard, seed=seed)
    nnx.replace_by_pure_dict(abstract_state, init())
    return nnx.merge(graphdef, abstract_state)
