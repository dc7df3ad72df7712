"""Transformer building blocks in Flax NNX.

Shape suffixes: B batch, T query length, S key length, D d_model, N query heads, K kv heads,
H head dim, F d_ff, V vocab. Every parameter carries `logical_axes` metadata that
`t5like.sharding` maps onto the mesh; activations are constrained through a `Sharder`.

Modules hold only parameters and static settings (plain trees, no shared references).
Dropout takes an explicit PRNG key per call rather than an `nnx.Rngs` inside the module, so that
layers stacked under `lax.scan` stay pure functions of (params, inputs, key).
"""
from __future__ import annotations

import functools
import math
import zlib
from typing import Callable, Optional

import jax
import jax.numpy as jnp
from flax import nnx, struct

from t5like import parametrization, quantization
from t5like.config import ModelConfig
from t5like.sharding import Sharder

Array = jax.Array


KV_NAMES = ("batch", "length", "act_kv_heads", None)     # keys/values [B, S, K, H]
KV_GATHERED_NAMES = ("batch", None, "act_kv_heads", None)  # the same, whole along the length (context parallelism)
CACHE_NAMES = ("batch", "act_kv_heads", "length", None)  # a decode cache's [B, K, S, H]


def dtype_of(name: str):
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[name]


def matmul(eq: str, x: Array, w, quant: str = "none") -> Array:
    """A weight matmul: jnp.einsum, or through t5like.quantization when the weight is quantized (decoding) or
    model.quant trains in int8."""
    if quant == "none" and isinstance(w, jax.Array):
        return jnp.einsum(eq, x, w)
    return quantization.einsum(eq, x, w, quant)


def on_cache(shard: "Sharder", c, names):
    """A sharding constraint on a cache: an array, or a quantized one's values and scales alike."""
    return jax.tree.map(lambda a: shard(a, names), c)


def cache_update(c, x_BKTH: Array, at: tuple):
    """The stack's cache c [layers, B, K, S, H] (an array, or int8 values and scales) with new keys or values
    [B, K, T, H] written at `at`."""
    return jax.tree.map(lambda a, n: jax.lax.dynamic_update_slice(a, n[None], at), c,
                        quantization.kv_write(x_BKTH, c))


def param(rngs: nnx.Rngs, shape: tuple[int, ...], names: tuple[str, ...], dtype, stddev: float = 1.0,
          init: str = "normal") -> nnx.Param:
    if init == "zeros":
        value = jnp.zeros(shape, dtype)
    elif init == "ones":
        value = jnp.ones(shape, dtype)
    else:
        value = (stddev * jax.random.truncated_normal(rngs.params(), -2.0, 2.0, shape, jnp.float32)).astype(dtype)
    return nnx.Param(value, logical_axes=names)


def dropout(x: Array, rate: float, rng: Optional[Array]) -> Array:
    """Inverted dropout; a None key (eval, decoding) is the identity."""
    if rng is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


# Adapters (t5like.finetune attaches them; a model without them runs exactly as before) -------------------

class LoRA(nnx.Module):
    """Hu et al. 2021: a low-rank update scale * dropout(x) A B beside a frozen projection W.

    A [in..., r] is random and B [r, out...] zero, so a fresh adapter changes nothing; `in`/`out` are the
    kernel's contracted and produced dims (e.g. [D] and [N, H] for a query kernel [D, N, H])."""

    def __init__(self, in_shape: tuple[int, ...], out_shape: tuple[int, ...], in_names: tuple, out_names: tuple,
                 rank: int, scale: float, rate: float, dtype_name: str, *, rngs: nnx.Rngs):
        pd = dtype_of(dtype_name)
        self.a = param(rngs, (*in_shape, rank), (*in_names, None), pd, math.prod(in_shape) ** -0.5)
        self.b = param(rngs, (rank, *out_shape), (None, *out_names), pd, init="zeros")
        self.scale, self.rate, self.num_in = scale, rate, len(in_shape)

    def __call__(self, x: Array, rng: Optional[Array]) -> Array:
        x = dropout(x, self.rate, rng)
        h = jnp.tensordot(x, self.a[...].astype(x.dtype), axes=self.num_in)
        return self.scale * jnp.tensordot(h, self.b[...].astype(x.dtype), axes=1)


def adapted(module: nnx.Module, kernel: str, x: Array, y: Array, rng: Optional[Array]) -> Array:
    """y plus the LoRA update of `module.<kernel>` when an adapter `<kernel>_lora` is attached."""
    lora = getattr(module, f"{kernel}_lora", None)
    if lora is None:
        return y
    return y + lora(x, None if rng is None else jax.random.fold_in(rng, zlib.crc32(kernel.encode()))).astype(y.dtype)


def with_prefix(k: Array, v: Array, mask_B1TS: Array, bias_BNTS: Optional[Array],
                prefix_kv: Optional[tuple[Array, Array]], shard: Sharder, *, length_axis: int = 1):
    """Prepend learned prefix keys/values [P, K, H] (Li & Liang 2021): every query sees all P of them.
    They carry no position, so a relative bias (T5) is 0 on their columns. k, v are [B, S, K, H]
    (length_axis 1) or a decode cache's [B, K, S, H] (length_axis 2)."""
    if prefix_kv is None:
        return k, v, mask_B1TS, bias_BNTS
    pk_PKH, pv_PKH = prefix_kv
    B, P = k.shape[0], pk_PKH.shape[0]
    names = KV_NAMES if length_axis == 1 else CACHE_NAMES

    def grow(p_PKH, x):
        p = p_PKH if length_axis == 1 else jnp.swapaxes(p_PKH, 0, 1)
        return shard(jnp.concatenate([jnp.broadcast_to(p.astype(x.dtype), (B, *p.shape)), x], length_axis), names)

    mask = jnp.concatenate([jnp.ones((*mask_B1TS.shape[:3], P), bool), jnp.broadcast_to(
        mask_B1TS, (B, *mask_B1TS.shape[1:]))], axis=-1)
    if bias_BNTS is not None:
        bias_BNTS = jnp.concatenate([jnp.zeros((*bias_BNTS.shape[:3], P), bias_BNTS.dtype), bias_BNTS], -1)
    return grow(pk_PKH, k), grow(pv_PKH, v), mask, bias_BNTS


# Embeddings and positions --------------------------------------------------------------------------

class Embed(nnx.Module):
    """Token embedding; `attend` reuses it as the output projection when embeddings are tied."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        stddev = cfg.embed_init_std or (cfg.d_model ** -0.5 if cfg.scale_embeddings else 0.02)
        self.embedding = param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"),
                               dtype_of(cfg.param_dtype), stddev)
        self.scale = math.sqrt(cfg.d_model) if cfg.scale_embeddings else 1.0
        self.dtype = dtype_of(cfg.dtype)

    def __call__(self, ids_BL: Array, shard: Sharder) -> Array:
        # All-gather the table before the lookup, as FSDP does for every weight. A lookup partitioned
        # over the table (its scatter-add gradient especially) while ids are sharded over the same mesh
        # axes made XLA's SPMD partitioner rematerialise, and gave wrong gradients on a 2x2x2 CPU mesh.
        table_VD = shard(self.embedding[...], (None, None))
        x_BLD = jnp.take(table_VD, ids_BL, axis=0).astype(self.dtype)
        return x_BLD * self.scale if self.scale != 1.0 else x_BLD

    def attend(self, x_BLD: Array) -> Array:
        return jnp.einsum("bld,vd->blv", x_BLD, self.embedding[...].astype(self.dtype))


def sinusoidal_positions(positions_BL: Array, d_model: int) -> Array:
    """Vaswani et al. 2017: PE[p, 2i] = sin(p / 10000^(2i/d)), PE[p, 2i+1] = cos(same)."""
    i = jnp.arange(d_model // 2, dtype=jnp.float32)
    angles_BLI = positions_BL[..., None].astype(jnp.float32) / (10000.0 ** (2.0 * i / d_model))
    pe = jnp.stack([jnp.sin(angles_BLI), jnp.cos(angles_BLI)], axis=-1)  # interleave sin, cos
    return pe.reshape(*positions_BL.shape, 2 * (d_model // 2))


class LearnedPositions(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.table = param(rngs, (cfg.max_len, cfg.d_model), (None, "embed"), dtype_of(cfg.param_dtype), 0.02)

    def __call__(self, positions_BL: Array) -> Array:
        return jnp.take(self.table[...], positions_BL, axis=0)


def apply_rope(x_BLNH: Array, positions_BL: Array, theta: float) -> Array:
    """Rotary embedding, rotate-half form (GPT-NeoX / Llama layout)."""
    half = x_BLNH.shape[-1] // 2
    freqs = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles_BLH = positions_BL[..., None].astype(jnp.float32) * freqs
    sin, cos = jnp.sin(angles_BLH)[:, :, None, :], jnp.cos(angles_BLH)[:, :, None, :]
    x1, x2 = jnp.split(x_BLNH.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x_BLNH.dtype)


def relative_position_bucket(relative_position: Array, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> Array:
    """T5's log-bucketing of (key position - query position).

    Half the buckets (per direction) are exact offsets; the rest grow logarithmically up to
    `max_distance`, beyond which everything shares the last bucket.
    """
    n = -relative_position
    bucket = jnp.zeros_like(n)
    if bidirectional:
        num_buckets //= 2
        bucket = bucket + (n < 0).astype(n.dtype) * num_buckets
        n = jnp.abs(n)
    else:
        n = jnp.maximum(n, 0)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    eps = jnp.finfo(jnp.float32).eps
    large = max_exact + (jnp.log(n.astype(jnp.float32) / max_exact + eps) / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).astype(n.dtype)
    large = jnp.minimum(large, num_buckets - 1)
    return bucket + jnp.where(is_small, n, large)


class RelativePositionBias(nnx.Module):
    """One table per stack, shared by all its layers (as in T5)."""

    def __init__(self, cfg: ModelConfig, *, bidirectional: bool, rngs: nnx.Rngs):
        self.table = param(rngs, (cfg.relative_buckets, cfg.num_heads), ("relative_buckets", "heads"),
                           dtype_of(cfg.param_dtype), 0.1)
        self.bidirectional = bidirectional
        self.num_buckets, self.max_distance = cfg.relative_buckets, cfg.relative_max_distance

    def __call__(self, q_positions_BT: Array, k_positions_BS: Array) -> Array:
        rel_BTS = k_positions_BS[:, None, :] - q_positions_BT[:, :, None]
        buckets = relative_position_bucket(rel_BTS, self.bidirectional, self.num_buckets, self.max_distance)
        bias_BTSN = jnp.take(self.table[...].astype(jnp.float32), buckets, axis=0)
        return bias_BTSN.transpose(0, 3, 1, 2)  # [B, N, T, S]


# Masks ----------------------------------------------------------------------------------------------

@struct.dataclass
class MaskSpec:
    """Who may attend to whom, kept as segment ids (plus causality and a prefix) until a kernel asks.

    Tokens attend only within their own packed segment. Padding (segment 0) attends to padding,
    which keeps every softmax row non-empty; its outputs carry zero loss weight.
    Prefix-LM: inside the prefix attention is bidirectional, after it causal.
    Fused kernels take segment ids (splash) or `is_causal` (cuDNN) directly, so no [B, 1, T, S]
    array is built for them; the XLA kernel gets `dense()`.
    """
    q_segment_ids_BT: Array
    k_segment_ids_BS: Array
    prefix_BT: Optional[Array] = None
    causal: bool = struct.field(pytree_node=False, default=False)
    self_attention: bool = struct.field(pytree_node=False, default=False)  # same ids on both sides: no empty rows
    window: int = struct.field(pytree_node=False, default=0)  # model.attention_window: keys |t - s| < window; 0 = all

    def dense(self, *, with_causal: bool = True, with_window: bool = True) -> Array:
        """Boolean [B, 1, T, S]: True where query t may attend to key s."""
        mask = self.q_segment_ids_BT[:, :, None] == self.k_segment_ids_BS[:, None, :]
        t, s = self.q_segment_ids_BT.shape[1], self.k_segment_ids_BS.shape[1]
        if self.causal and with_causal:
            allowed = jnp.arange(s)[None, :] <= jnp.arange(t)[:, None]
            if self.prefix_BT is not None:
                p = self.prefix_BT.astype(bool)
                allowed = allowed[None] | (p[:, :, None] & p[:, None, :])
            mask = mask & allowed
        if self.window and with_window:
            mask = mask & (jnp.abs(jnp.arange(t)[:, None] - jnp.arange(s)[None, :]) < self.window)
        return mask[:, None, :, :]


def attention_mask(q_segment_ids_BT: Array, k_segment_ids_BS: Array, *, causal: bool,
                   prefix_BT: Optional[Array] = None, window: int = 0) -> MaskSpec:
    """The mask of (packed) self- or cross-attention; `.dense()` is the boolean [B, 1, T, S] form.
    `window` (model.attention_window, self-attention only) keeps the keys less than `window` positions away."""
    return MaskSpec(q_segment_ids_BT, k_segment_ids_BS, prefix_BT, causal=causal,
                    self_attention=q_segment_ids_BT is k_segment_ids_BS, window=window)


def decode_mask(start_B: Array, q_slots_T: Array, num_slots: int, prefix_end: Optional[Array] = None) -> Array:
    """Boolean [B, 1, T, S] for attention against a decode cache of S slots.

    Rows are left-padded: row b's tokens live in slots [start_B[b], ...). A query at slot q sees the real
    slots up to and including q, and with `prefix_end` (prefix-LM prefill) every real slot before it when
    q is before it too. A padding query also sees itself, so no softmax row is empty and the padding's
    cached values stay finite (a masked NaN would still poison the output: 0 * NaN = NaN).
    """
    k_S = jnp.arange(num_slots)
    visible_TS = k_S[None, :] <= q_slots_T[:, None]
    if prefix_end is not None:
        visible_TS = visible_TS | ((k_S[None, :] < prefix_end) & (q_slots_T[:, None] < prefix_end))
    real_BS = k_S[None, :] >= start_B[:, None]
    self_TS = k_S[None, :] == q_slots_T[:, None]
    return (visible_TS[None] & (real_BS[:, None, :] | self_TS[None]))[:, None]


def ring_slots(index: Array, num_slots: int) -> Array:
    """The token number each slot of a ring buffer holds before writing at `index`: slot j holds the latest
    i < index with i % num_slots == j; negative where the slot is still empty."""
    j = jnp.arange(num_slots)
    return index - 1 - jnp.mod(index - 1 - j, num_slots)


def ring_mask(start_B: Array, q_slots_T: Array, k_slots_S: Array, window: int,
              prefix_end: Optional[Array] = None) -> Array:
    """Boolean [B, 1, T, S] of sliding-window decoding: queries at token numbers q_slots_T against keys at
    k_slots_S (the ring's slots, then the new tokens; negative = empty). As `decode_mask`, with keys further
    than `window` - 1 tokens away hidden as in training."""
    q, k = q_slots_T[:, None], k_slots_S[None, :]
    visible_TS = (k >= 0) & (k <= q)
    if prefix_end is not None:
        visible_TS = visible_TS | ((k >= 0) & (k < prefix_end) & (q < prefix_end))
    visible_TS = visible_TS & (jnp.abs(q - k) < window)
    real_BS = k_slots_S[None, :] >= start_B[:, None]
    return (visible_TS[None] & (real_BS[:, None, :] | (k == q)[None]))[:, None]


def cache_read_lengths(num_slots: int) -> tuple[int, ...]:
    """The lengths decoding reads a cache of `num_slots` slots at: attention reads the shortest that holds
    every filled slot, not the whole cache, so early steps of a long decode do not pay for its end. At most
    8 lengths, multiples of 16: each is one branch of a lax.switch, and each branch adds compile time."""
    width = max(16, -(-num_slots // (8 * 16)) * 16)
    return tuple(range(width, num_slots, width)) + (num_slots,)


# Attention kernels ----------------------------------------------------------------------------------

def platform(shard: Sharder) -> str:
    """The platform the program is compiled for: the mesh's devices (TPU even when compiled ahead of time
    on a CPU host), else the default backend."""
    return shard.mesh.devices.flat[0].platform if shard.mesh is not None else jax.default_backend()


def context_size(shard: Sharder) -> int:
    """How many shards the length of activations has (mesh.context): 1 without context parallelism."""
    if shard.mesh is None:
        return 1
    axes = dict(shard.rules).get("length")
    axes = () if axes is None else axes if isinstance(axes, tuple) else (axes,)
    return math.prod(shard.mesh.shape.get(a, 1) for a in axes)


def attention_kernel(impl: Optional[str], q_BTNH: Array, k_BSKH: Array, v_BSKH: Array, mask: "MaskSpec | Array",
                     bias_BNTS: Optional[Array], shard: Sharder, scale: Optional[float] = None) -> Array:
    """softmax(scale * q k^T + bias, masked) v through the kernel `impl` (model.attention_impl); scale None
    is 1/sqrt(H) (T5 uses 1: its scale is folded into the query init).

    None/"xla": XLA's fused-by-the-compiler attention over a dense mask; None lets JAX pick.
    "cudnn": cuDNN flash attention; causality goes in as `is_causal`, packed segments as a dense
        segment-equality mask (the kernel has no segment ids).
    "splash": Pallas splash attention (TPU) with segment ids and a static causal mask, under shard_map
        (batch and heads stay sharded). Interpreted on other platforms (tests).
    A dense mask (prefix tuning's widened keys) always goes to XLA, as does cross-attention under splash:
    a padding query there can see no key at all, a row splash leaves undefined.
    A sliding window (mask.window): XLA computes it blockwise (`windowed_attention`, cost ~T*W) once the
    sequence spans 4 windows, densely masked below that or with a bias; splash takes its LocalMask; cuDNN
    its causal `local_window_size`.
    Context parallelism (mesh.context > 1, queries' length sharded over it): the dense path all-gathers K/V
    over the length, so each device attends its query shard to every key (docs/sharding.md); the blockwise
    path needs only the neighbouring blocks, which XLA exchanges itself; splash gathers them in its shard_map.
    """
    if not isinstance(mask, MaskSpec):
        return jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, bias=bias_BNTS, mask=mask, scale=scale,
                                            implementation="xla" if impl in ("splash", "cudnn") else impl)
    if impl in (None, "xla") and mask.window and bias_BNTS is None and q_BTNH.shape[1] >= 4 * mask.window \
            and q_BTNH.shape[1] == k_BSKH.shape[1]:
        return windowed_attention(q_BTNH, k_BSKH, v_BSKH, mask, scale)
    if impl != "splash" and context_size(shard) > 1:
        k_BSKH, v_BSKH = shard(k_BSKH, KV_GATHERED_NAMES), shard(v_BSKH, KV_GATHERED_NAMES)
    if impl == "splash" and mask.self_attention:
        if bias_BNTS is not None:
            raise ValueError("model.attention_impl='splash' takes no attention bias (model.position='relative'); "
                             "use model.attention_impl=xla or another model.position.")
        if mask.prefix_BT is not None:
            raise ValueError("model.attention_impl='splash' cannot express a prefix-LM mask (a batch with 'prefix'); "
                             "use model.attention_impl=xla for data.objective=prefix_lm.")
        return splash_attention(q_BTNH, k_BSKH, v_BSKH, mask, shard, scale)
    if impl == "cudnn" and mask.prefix_BT is None:
        if mask.window and not mask.causal:
            raise ValueError(f"model.attention_impl='cudnn' has a causal sliding window only; this attention is "
                             f"bidirectional with model.attention_window={mask.window}: use model.attention_impl=xla.")
        return jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, bias=bias_BNTS,
                                            mask=mask.dense(with_causal=False, with_window=False), scale=scale,
                                            is_causal=mask.causal, implementation="cudnn",
                                            local_window_size=(mask.window - 1, 0) if mask.window else None)
    return jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, bias=bias_BNTS, mask=mask.dense(), scale=scale,
                                        implementation="xla" if impl == "splash" else impl)


def windowed_attention(q_BTNH: Array, k_BTKH: Array, v_BTKH: Array, mask: MaskSpec,
                       scale: Optional[float] = None) -> Array:
    """Sliding-window self-attention computed blockwise, so that its cost grows with T*W, not T^2.

    The sequence is cut into blocks of C = W positions. A query's keys lie less than W positions away, so in
    its own block or the previous one (causal), or also the next one (bidirectional, prefix-LM): each query
    block attends to 2 (or 3) key blocks, [B, T/C, C, 2C or 3C] logits in all, masked exactly as `dense()`
    (segments, causality, prefix, |t - s| < W). T is padded up to a multiple of C with keys no query sees.
    Logits and softmax in float32, as jax.nn.dot_product_attention's XLA path.
    """
    B, T, N, H = q_BTNH.shape
    K, W = k_BTKH.shape[2], mask.window
    C = W
    n = -(-T // C)
    two_sided = not mask.causal or mask.prefix_BT is not None

    def blocks(x, fill):  # [B, T, ...] -> [B, n, C, ...], padded with `fill`
        x = jnp.pad(x, [(0, 0), (0, n * C - T)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
        return x.reshape(B, n, C, *x.shape[2:])

    def neighbours(x, fill):  # [B, n, C, ...] -> the key blocks of each query block, [B, n, 2C or 3C, ...]
        edge = jnp.full_like(x[:, :1], fill)
        parts = [jnp.concatenate([edge, x[:, :-1]], 1), x] + ([jnp.concatenate([x[:, 1:], edge], 1)] if two_sided else [])
        return jnp.concatenate(parts, axis=2)

    q_BnCKGH = blocks(q_BTNH, 0).reshape(B, n, C, K, N // K, H)
    k_BnJKH, v_BnJKH = (neighbours(blocks(x, 0), 0) for x in (k_BTKH, v_BTKH))
    # Padding keys carry segment -2 and padding queries -1: they match nothing, and nothing is lost.
    q_seg_BnC = blocks(mask.q_segment_ids_BT.astype(jnp.int32), -1)
    k_seg_BnJ = neighbours(blocks(mask.k_segment_ids_BS.astype(jnp.int32), -2), -2)
    q_pos_nC = jnp.arange(n * C).reshape(n, C)
    k_pos_nJ = jnp.concatenate([q_pos_nC - C, q_pos_nC] + ([q_pos_nC + C] if two_sided else []), axis=1)
    d_nCJ = q_pos_nC[:, :, None] - k_pos_nJ[:, None, :]
    visible_BnCJ = (q_seg_BnC[..., None] == k_seg_BnJ[:, :, None, :]) & (jnp.abs(d_nCJ) < W)[None]
    if mask.causal:
        allowed = (d_nCJ >= 0)[None]
        if mask.prefix_BT is not None:
            p_q = blocks(mask.prefix_BT.astype(bool), False)
            p_k = neighbours(p_q, False)
            allowed = allowed | (p_q[..., None] & p_k[:, :, None, :])
        visible_BnCJ = visible_BnCJ & allowed

    logits = jnp.einsum("bnckgh,bnjkh->bnkgcj", q_BnCKGH, k_BnJKH, preferred_element_type=jnp.float32)
    logits = logits * (H ** -0.5 if scale is None else scale)
    logits = jnp.where(visible_BnCJ[:, :, None, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v_BnJKH.dtype)
    o_BnCKGH = jnp.einsum("bnkgcj,bnjkh->bnckgh", probs, v_BnJKH)
    return o_BnCKGH.reshape(B, n * C, N, H)[:, :T].astype(q_BTNH.dtype)


def cache_attention(q_BTNH: Array, k_BKSH: Array, v_BKSH: Array, mask_B1TS: Array, bias_BNTS: Optional[Array],
                    scale: Optional[float] = None) -> Array:
    """Attention of T new tokens against a decode cache laid out [B, K, S, H]: each (row, kv head)'s keys are
    contiguous, so the two einsums stream them without a transpose (on CPU, one token at batch 8 against 1024
    slots: 2.2x faster than jax.nn.dot_product_attention over [B, S, K, H]). Logits and softmax in float32."""
    B, T, N, H = q_BTNH.shape
    K = k_BKSH.shape[1]
    q_BTKGH = q_BTNH.reshape(B, T, K, N // K, H)
    logits_BKGTS = jnp.einsum("btkgh,bksh->bkgts", q_BTKGH, k_BKSH, preferred_element_type=jnp.float32)
    logits_BKGTS = logits_BKGTS * (H ** -0.5 if scale is None else scale)
    if bias_BNTS is not None:
        logits_BKGTS = logits_BKGTS + bias_BNTS.astype(jnp.float32).reshape(
            bias_BNTS.shape[0], K, N // K, *bias_BNTS.shape[2:])
    logits_BKGTS = jnp.where(mask_B1TS[:, :, None], logits_BKGTS, jnp.finfo(jnp.float32).min)
    probs_BKGTS = jax.nn.softmax(logits_BKGTS, axis=-1).astype(v_BKSH.dtype)
    return jnp.einsum("bkgts,bksh->btkgh", probs_BKGTS, v_BKSH).reshape(B, T, N, H)


SPLASH_BLOCK = 512  # the largest query/key block; sequences must be a multiple of min(512, length) and of 128


def splash_attention(q_BTNH: Array, k_BSKH: Array, v_BSKH: Array, mask: MaskSpec, shard: Sharder,
                     scale: Optional[float] = None) -> Array:
    """Splash under shard_map: batch and heads stay sharded, and with context parallelism the queries keep their
    length shard while keys and values are whole (all-gathered). Each context shard then runs the kernel whose
    static mask starts at its own first query (`offset`): one kernel per shard, picked by lax.switch."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa
    from t5like.sharding import logical_to_spec

    T, S, H = q_BTNH.shape[1], k_BSKH.shape[1], q_BTNH.shape[3]
    for name, n in (("query", T), ("key", S)):
        if n % 128:
            raise ValueError(f"model.attention_impl='splash' needs {name} lengths that are multiples of 128, "
                             f"got {n}; set data.seq_len (and data.target_len) to a multiple of 128.")
    sharded = shard.mesh is not None and shard.mesh.size > 1
    spec = lambda names, x: logical_to_spec(names, x.shape, shard.mesh, shard.rules)
    context_axes = spec(("batch", "length"), mask.q_segment_ids_BT)[1] if sharded else None
    context = 1 if context_axes is None else math.prod(shard.mesh.shape[a] for a in (
        context_axes if isinstance(context_axes, tuple) else (context_axes,)))
    Tq = T // context  # each shard's queries
    if Tq % 128:
        raise ValueError(f"model.attention_impl='splash' with mesh.context={context} needs each shard's queries "
                         f"(length {T} / {context} = {Tq}) to be a multiple of 128; set data.seq_len to a multiple "
                         f"of {128 * context}, or use model.attention_impl=xla.")
    interpret = platform(shard) != "tpu"
    bq, bkv = min(SPLASH_BLOCK, Tq), min(SPLASH_BLOCK, S)
    while Tq % bq:
        bq //= 2
    while S % bkv:
        bkv //= 2
    sizes = sa.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq, block_kv_dkv=bkv,
                          block_kv_dkv_compute=bkv, block_q_dq=bq, block_kv_dq=bkv)
    groups = q_BTNH.shape[2] // k_BSKH.shape[2]

    def kernel_at(offset: int, N: int):
        if mask.window:  # LocalMask's window counts the keys beside the query: W - 1 of them, W with itself
            base = sa.LocalMask((Tq, S), (mask.window - 1, 0 if mask.causal else mask.window - 1), offset=offset)
        elif mask.causal:
            base = sa.CausalMask((Tq, S), offset=offset)
        else:
            base = sa.FullMask((Tq, S))
        return sa.make_splash_mha(sa.MultiHeadMask([base] * N), head_shards=1, q_seq_shards=1,
                                  block_sizes=sizes, interpret=interpret)

    def local(q_BNTH, k_BKSH, v_BKSH, q_seg_BT, k_seg_BS):
        # Per shard: the kernel works on one sequence [heads, length, head_dim]; vmap over the local batch.
        N = q_BNTH.shape[1]
        k_BNSH, v_BNSH = (jnp.repeat(x, groups, axis=1) for x in (k_BKSH, v_BKSH))  # GQA: share kv heads

        def run(kernel):
            return jax.vmap(lambda q, k, v, qs, ks: kernel(q, k, v, segment_ids=sa.SegmentIds(qs, ks)))(
                q_BNTH, k_BNSH, v_BNSH, q_seg_BT, k_seg_BS)
        if context == 1:
            return run(kernel_at(0, N))
        kernels = [kernel_at(i * Tq, N) for i in range(context)]
        return jax.lax.switch(jax.lax.axis_index(context_axes), [functools.partial(run, k) for k in kernels])

    # The kernel does not scale the logits.
    args = ((q_BTNH * (H ** -0.5 if scale is None else scale)).transpose(0, 2, 1, 3), k_BSKH.transpose(0, 2, 1, 3), v_BSKH.transpose(0, 2, 1, 3),
            mask.q_segment_ids_BT.astype(jnp.int32), mask.k_segment_ids_BS.astype(jnp.int32))
    if sharded:
        heads = ("batch", "act_heads", "length", None)
        kv = ("batch", "act_kv_heads", None, None)
        q_spec = spec(heads, args[0])
        kv_spec = spec(kv, args[1])
        if groups > 1 and kv_spec[1] != q_spec[1]:
            q_spec = spec(("batch", None, "length", None), args[0])  # kv heads replicated: keep q heads whole too
        q_seg_spec, k_seg_spec = spec(("batch", "length"), args[3]), spec(("batch", None), args[4])
        local = jax.shard_map(local, mesh=shard.mesh, in_specs=(q_spec, kv_spec, kv_spec, q_seg_spec, k_seg_spec),
                              out_specs=q_spec, check_vma=False)
    return local(*args).transpose(0, 2, 1, 3).astype(q_BTNH.dtype)


# Attention, MLP, norms ------------------------------------------------------------------------------

class Attention(nnx.Module):
    """Multi-head attention with num_kv_heads for GQA/MQA; self- or cross-attention."""
    # Weight matrices, and how many leading dims each matmul contracts (t5like.quantization scales the others).
    quantized_kernels = {"query": 1, "key": 1, "value": 1, "out": 2}

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        D, N, K, H = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.dim_per_head
        pd = dtype_of(cfg.param_dtype)
        # Standard fan-in init; the 1/sqrt(H) logit scale is applied by dot_product_attention (T5 instead
        # folds it into this init and applies none: doing both leaves attention uniform at the start).
        self.query = param(rngs, (D, N, H), ("embed", "heads", "head_dim"), pd, D ** -0.5)
        self.key = param(rngs, (D, K, H), ("embed", "kv_heads", "head_dim"), pd, D ** -0.5)
        self.value = param(rngs, (D, K, H), ("embed", "kv_heads", "head_dim"), pd, D ** -0.5)
        self.out = param(rngs, (N, H, D), ("heads", "head_dim", "embed"), pd, (N * H) ** -0.5)
        self.use_bias = cfg.use_bias
        if cfg.use_bias:
            self.query_bias = param(rngs, (N, H), ("heads", "head_dim"), pd, init="zeros")
            self.key_bias = param(rngs, (K, H), ("kv_heads", "head_dim"), pd, init="zeros")
            self.value_bias = param(rngs, (K, H), ("kv_heads", "head_dim"), pd, init="zeros")
            self.out_bias = param(rngs, (D,), ("embed",), pd, init="zeros")
        self.rope_theta = cfg.rope_theta if cfg.position == "rope" else None
        self.dtype = dtype_of(cfg.dtype)
        self.impl = cfg.attention_impl
        self.quant = cfg.quant
        # None: dot_product_attention's 1/sqrt(H); T5 folds it into the init (1.0); µP's 1/H (parametrization).
        self.logit_scale = parametrization.attention_scale(cfg)

    def _w(self, p):
        return p[...].astype(self.dtype)

    def project_query(self, x_BTD: Array, positions_BT: Optional[Array], shard: Sharder, rng=None) -> Array:
        q_BTNH = matmul("btd,dnh->btnh", x_BTD, self._w(self.query), self.quant)
        q_BTNH = adapted(self, "query", x_BTD, q_BTNH, rng)
        if self.use_bias:
            q_BTNH = q_BTNH + self._w(self.query_bias)
        if self.rope_theta is not None:
            q_BTNH = apply_rope(q_BTNH, positions_BT, self.rope_theta)
        return shard(q_BTNH, ("batch", "length", "act_heads", None))

    def project_kv(self, x_BSD: Array, positions_BS: Optional[Array], shard: Sharder,
                   rng=None) -> tuple[Array, Array]:
        k_BSKH = adapted(self, "key", x_BSD, matmul("bsd,dkh->bskh", x_BSD, self._w(self.key), self.quant), rng)
        v_BSKH = matmul("bsd,dkh->bskh", x_BSD, self._w(self.value), self.quant)
        v_BSKH = adapted(self, "value", x_BSD, v_BSKH, rng)
        if self.use_bias:
            k_BSKH, v_BSKH = k_BSKH + self._w(self.key_bias), v_BSKH + self._w(self.value_bias)
        if self.rope_theta is not None:
            k_BSKH = apply_rope(k_BSKH, positions_BS, self.rope_theta)
        return shard(k_BSKH, KV_NAMES), shard(v_BSKH, KV_NAMES)

    def project_qkv(self, x_BTD: Array, positions_BT: Optional[Array], shard: Sharder) -> tuple[Array, Array, Array]:
        """Self-attention with as many kv heads as query heads: q, k and v from one 3x wider matmul, which
        runs faster on CPU (1.08x a gpt2-bench step) and transposes x once for the three weight gradients.
        The weights stay three parameters, stacked on a new leading axis so every shard stays aligned."""
        w_CDNH = jnp.stack([self._w(self.query), self._w(self.key), self._w(self.value)])
        qkv_BTCNH = matmul("btd,cdnh->btcnh", x_BTD, w_CDNH, self.quant)
        if self.use_bias:
            qkv_BTCNH = qkv_BTCNH + jnp.stack([self._w(self.query_bias), self._w(self.key_bias),
                                               self._w(self.value_bias)])
        q_BTNH, k_BTNH, v_BTNH = (qkv_BTCNH[:, :, i] for i in range(3))
        if self.rope_theta is not None:
            q_BTNH = apply_rope(q_BTNH, positions_BT, self.rope_theta)
            k_BTNH = apply_rope(k_BTNH, positions_BT, self.rope_theta)
        return (shard(q_BTNH, ("batch", "length", "act_heads", None)), shard(k_BTNH, KV_NAMES),
                shard(v_BTNH, KV_NAMES))

    def attend(self, q_BTNH: Array, k_BSKH: Array, v_BSKH: Array, mask: "MaskSpec | Array",
               bias_BNTS: Optional[Array], shard: Sharder, rng=None) -> Array:
        """Attention of q over k, v through the kernel `model.attention_impl`. `mask` is a MaskSpec, or a
        dense boolean [B, 1, T, S] where prefixes widen the keys."""
        # The T5 bias is added to the logits before softmax; jax.nn.dot_product_attention takes it as `bias`.
        bias = None if bias_BNTS is None else bias_BNTS.astype(q_BTNH.dtype)
        o_BTNH = attention_kernel(self.impl, q_BTNH, k_BSKH, v_BSKH, mask, bias, shard, scale=self.logit_scale)
        return self.project_out(o_BTNH, shard, rng)

    def attend_stored(self, q_BTNH: Array, k_BKSH: Array, v_BKSH: Array, mask_B1TS: Array,
                     bias_BNTS: Optional[Array], shard: Sharder) -> Array:
        """Decoding: attention of q over stored keys/values [B, K, S, H], a self-attention cache's or the
        encoder's (see `cache_attention`)."""
        return self.project_out(cache_attention(q_BTNH, k_BKSH, v_BKSH, mask_B1TS, bias_BNTS, self.logit_scale),
                                shard, None)

    def project_out(self, o_BTNH: Array, shard: Sharder, rng=None) -> Array:
        o_BTNH = shard(o_BTNH, ("batch", "length", "act_heads", None))
        y_BTD = adapted(self, "out", o_BTNH, matmul("btnh,nhd->btd", o_BTNH, self._w(self.out), self.quant),
                        rng)
        if self.use_bias:
            y_BTD = y_BTD + self._w(self.out_bias)
        return shard(y_BTD, ("batch", "length", "act_embed"))

    def attend_cached(self, x_BTD: Array, positions_BT: Array, k_LBKSH: Array, v_LBKSH: Array, layer: Array,
                      index: Array, *, mask_B1TS: Array, shard: Sharder, bias_BNTS: Optional[Array] = None,
                      prefix_kv=None) -> tuple[Array, Array, Array]:
        """Self-attention of T new tokens against a preallocated cache of S slots (decoding).

        Writes the new keys/values into the stack's cache [layers, B, K, S, H] at `layer`, slots
        [index, index + T) (RoPE already applied, so they are never rotated again), then attends over the
        first slots of this layer, as many as the shortest of `cache_read_lengths(S)` that holds every filled
        one; `mask_B1TS` [B, 1, T, S] hides empty and padding slots. Writing before reading lets XLA update
        the cache in place: no step copies a whole cache (a cost growing with S). Returns the output and the
        updated cache.
        """
        q_BTNH = self.project_query(x_BTD, positions_BT, shard)
        k_BTKH, v_BTKH = self.project_kv(x_BTD, positions_BT, shard)
        at = (layer, 0, 0, index, 0)
        k_LBKSH = cache_update(k_LBKSH, jnp.swapaxes(k_BTKH, 1, 2), at)
        v_LBKSH = cache_update(v_LBKSH, jnp.swapaxes(v_BTKH, 1, 2), at)

        def read(length: int) -> Array:
            k_BKSH, v_BKSH = (shard(quantization.kv_read(jax.tree.map(lambda a: a[layer, :, :, :length], c),
                                                         self.dtype), CACHE_NAMES) for c in (k_LBKSH, v_LBKSH))
            bias = None if bias_BNTS is None else bias_BNTS[..., :length]
            # Prefixes are not written into the cache: they are the same at every step, prepended here.
            k, v, mask, bias = with_prefix(k_BKSH, v_BKSH, mask_B1TS[..., :length], bias, prefix_kv, shard,
                                           length_axis=2)
            return self.attend_stored(q_BTNH, k, v, mask, bias, shard)

        lengths = cache_read_lengths(k_LBKSH.shape[3])  # one length: switch calls its branch, no conditional
        shortest = jnp.searchsorted(jnp.asarray(lengths), index + x_BTD.shape[1])
        y_BTD = jax.lax.switch(shortest, [functools.partial(read, n) for n in lengths])
        return y_BTD, k_LBKSH, v_LBKSH

    def attend_ring(self, x_BTD: Array, positions_BT: Array, k_LBKRH: Array, v_LBKRH: Array, layer: Array,
                    index: Array, *, mask_B1TS: Array, shard: Sharder, bias_BNTS: Optional[Array] = None,
                    prefix_kv=None) -> tuple[Array, Array, Array]:
        """Sliding-window decoding: self-attention of T new tokens against a ring buffer of R = W slots.

        Token number i (counting from the cache's slot 0) lives in ring slot i % R until token i + R replaces
        it, so the ring always holds the last R tokens: all a windowed query can see. The new tokens attend
        to the ring's R slots followed by themselves (`mask_B1TS` is [B, 1, T, R + T], see `ring_mask`); then
        the last min(T, R) of them are written into their slots. Returns the output and the updated ring.
        """
        q_BTNH = self.project_query(x_BTD, positions_BT, shard)
        k_BTKH, v_BTKH = self.project_kv(x_BTD, positions_BT, shard)
        T, R = x_BTD.shape[1], k_LBKRH.shape[3]
        new_k, new_v = (jnp.swapaxes(x, 1, 2) for x in (k_BTKH, v_BTKH))  # [B, K, T, H]
        # The new tokens as the cache will hold them (its dtype, or int8): each step sees what later steps will.
        new_k, new_v = (quantization.kv_read(quantization.kv_write(x, c), self.dtype)
                        for c, x in ((k_LBKRH, new_k), (v_LBKRH, new_v)))
        ring = lambda c: quantization.kv_read(jax.tree.map(lambda a: a[layer], c), self.dtype)  # [B, K, R, H]
        k_BKSH, v_BKSH = (shard(jnp.concatenate([ring(c), x], axis=2), CACHE_NAMES)
                          for c, x in ((k_LBKRH, new_k), (v_LBKRH, new_v)))
        k, v, mask, bias = with_prefix(k_BKSH, v_BKSH, mask_B1TS, bias_BNTS, prefix_kv, shard, length_axis=2)
        y_BTD = self.attend_stored(q_BTNH, k, v, mask, bias, shard)
        keep = min(T, R)
        slots = (index + jnp.arange(T - keep, T)) % R

        def write(c, x):
            def one(a, n):
                ring_BKRH = a[layer].at[:, :, slots].set(n[:, :, T - keep:])
                return jax.lax.dynamic_update_slice(a, ring_BKRH[None], (layer, 0, 0, 0, 0))
            return jax.tree.map(one, c, quantization.kv_write(x, c))
        return y_BTD, write(k_LBKRH, new_k), write(v_LBKRH, new_v)

    def __call__(self, x_BTD: Array, context_BSD: Array, *, mask_B1TS: "MaskSpec | Array", shard: Sharder,
                 bias_BNTS: Optional[Array] = None, q_positions_BT: Optional[Array] = None,
                 k_positions_BS: Optional[Array] = None, rng: Optional[Array] = None, prefix_kv=None) -> Array:
        lora_qkv = any(getattr(self, f"{k}_lora", None) is not None for k in ("query", "key", "value"))
        fusable = isinstance(self.query[...], jax.Array)  # weights quantized for decoding are not stacked
        if x_BTD is context_BSD and self.query.shape == self.key.shape and not lora_qkv and fusable:
            q, k, v = self.project_qkv(x_BTD, q_positions_BT, shard)
        else:
            q = self.project_query(x_BTD, q_positions_BT, shard, rng)
            k, v = self.project_kv(context_BSD, k_positions_BS, shard, rng)
        if prefix_kv is not None:  # prefixes widen the keys: the kernels' segment ids cannot say that
            mask_B1TS = mask_B1TS.dense() if isinstance(mask_B1TS, MaskSpec) else mask_B1TS
            k, v, mask_B1TS, bias_BNTS = with_prefix(k, v, mask_B1TS, bias_BNTS, prefix_kv, shard)
        return self.attend(q, k, v, mask_B1TS, bias_BNTS, shard, rng)


ACTIVATION_FNS: dict[str, Callable[[Array], Array]] = {
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_exact": lambda x: jax.nn.gelu(x, approximate=False),
    "gated_gelu": lambda x: jax.nn.gelu(x, approximate=True),
    "swiglu": jax.nn.silu,
}


class MLP(nnx.Module):
    """Feed-forward: act(x W_i) W_o, or the gated form act(x W_i0) * (x W_i1) W_o."""
    quantized_kernels = {"wi": 1, "wi_gate": 1, "wo": 1}

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        D, F, pd = cfg.d_model, cfg.d_ff, dtype_of(cfg.param_dtype)
        self.gated = cfg.activation in ("gated_gelu", "swiglu")
        self.wi = param(rngs, (D, F), ("embed", "mlp"), pd, D ** -0.5)
        if self.gated:
            self.wi_gate = param(rngs, (D, F), ("embed", "mlp"), pd, D ** -0.5)
        self.wo = param(rngs, (F, D), ("mlp", "embed"), pd, F ** -0.5)
        self.use_bias = cfg.use_bias
        if cfg.use_bias:
            self.wi_bias = param(rngs, (F,), ("mlp",), pd, init="zeros")
            self.wo_bias = param(rngs, (D,), ("embed",), pd, init="zeros")
        self.activation = cfg.activation
        self.dtype = dtype_of(cfg.dtype)
        self.quant = cfg.quant

    def __call__(self, x_BLD: Array, shard: Sharder, rng: Optional[Array] = None) -> Array:
        act = ACTIVATION_FNS[self.activation]
        h_BLF = matmul("bld,df->blf", x_BLD, self.wi[...].astype(self.dtype), self.quant)
        h_BLF = adapted(self, "wi", x_BLD, h_BLF, rng)
        if self.use_bias:
            h_BLF = h_BLF + self.wi_bias[...].astype(self.dtype)
        if self.gated:
            gate_BLF = matmul("bld,df->blf", x_BLD, self.wi_gate[...].astype(self.dtype), self.quant)
            h_BLF = act(adapted(self, "wi_gate", x_BLD, gate_BLF, rng)) * h_BLF
        else:
            h_BLF = act(h_BLF)
        h_BLF = shard(h_BLF, ("batch", "length", "act_mlp"))
        y_BLD = matmul("blf,fd->bld", h_BLF, self.wo[...].astype(self.dtype), self.quant)
        y_BLD = adapted(self, "wo", h_BLF, y_BLD, rng)
        if self.use_bias:
            y_BLD = y_BLD + self.wo_bias[...].astype(self.dtype)
        return shard(y_BLD, ("batch", "length", "act_embed"))


class Norm(nnx.Module):
    """LayerNorm or RMSNorm, computed in float32."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        pd = dtype_of(cfg.param_dtype)
        self.kind, self.eps, self.dtype = cfg.norm, cfg.norm_eps, dtype_of(cfg.dtype)
        self.scale = param(rngs, (cfg.d_model,), ("embed",), pd, init="ones")
        self.use_bias = cfg.norm == "layernorm" and cfg.use_bias
        if self.use_bias:
            self.bias = param(rngs, (cfg.d_model,), ("embed",), pd, init="zeros")

    def __call__(self, x_BLD: Array) -> Array:
        x = x_BLD.astype(jnp.float32)
        if self.kind == "layernorm":
            x = x - x.mean(-1, keepdims=True)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + self.eps)
        x = x * self.scale[...].astype(jnp.float32)
        if self.use_bias:
            x = x + self.bias[...].astype(jnp.float32)
        return x.astype(self.dtype)


class Dense(nnx.Module):
    """A plain projection with named axes (output heads, poolers)."""
    quantized_kernels = {"kernel": 1}

    def __init__(self, d_in: int, d_out: int, names: tuple[str, str], cfg: ModelConfig, *, rngs: nnx.Rngs,
                 use_bias: bool):
        pd = dtype_of(cfg.param_dtype)
        self.kernel = param(rngs, (d_in, d_out), names, pd, d_in ** -0.5)
        self.use_bias = use_bias
        if use_bias:
            self.bias = param(rngs, (d_out,), (names[1],), pd, init="zeros")
        self.dtype = dtype_of(cfg.dtype)
        self.quant = cfg.quant

    def __call__(self, x: Array) -> Array:
        y_NO = matmul("nd,do->no", x.reshape(-1, x.shape[-1]), self.kernel[...].astype(self.dtype), self.quant)
        y = y_NO.reshape(*x.shape[:-1], y_NO.shape[-1])
        return y + self.bias[...].astype(self.dtype) if self.use_bias else y
