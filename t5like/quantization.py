"""Quantization through Qwix (Google's JAX quantization library): int8 training, and int8/int4 weights and an
int8 KV cache for decoding.

  model.quant=int8                        quantization-aware training: every weight matmul of the layers
                                          (attention projections, MLP, an untied output head) quantizes its
                                          input per token and its weight per output channel to int8 and
                                          multiplies in int8 (int32 sums), as MaxText's int8 training does;
                                          gradients pass straight through the rounding
  quantize_for_decoding(model, weights="int8", kv_cache="int8")
                                          a copy of the model whose weight matrices are stored as int8 (or
                                          int4) with one scale per output channel (weight-only: activations stay
                                          in the model's dtype), and whose decode cache keeps keys and values
                                          as int8 with one scale per (token, kv head)

Scales are symmetric absmax, qwix's: s = max|x| / 127.5 over the contracted axes (the head dim for the KV
cache), q = clip(round(x / s), -128, 127). Token embeddings, norms, biases and LoRA/prefix adapters stay in
floating point (MaxText quantizes its dense layers only).

qwix is imported only when something is quantized (the optional `quant` extra: pip install '.[quant]');
unquantized weights and caches pass through `einsum`, `kv_write` and `kv_read` as plain arrays. Weights are
quantized by surgery on the model's params (qwix.quantize on each kernel) rather than by qwix's interception
(qwix.quantize_model): its NNX path replaces a param inside the call that first uses it, which our layers
run inside lax.scan over nnx.split/merge stacks, and Flax refuses that mutation (TraceContextError).
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

WEIGHT_TYPES = ("none", "int8", "int4")         # quantize_for_decoding(weights=...)
KV_CACHE_TYPES = ("none", "int8")               # quantize_for_decoding(kv_cache=...)


def _qwix():
    try:
        import qwix
    except ImportError as e:  # an optional feature: say how to get it
        raise ImportError("quantization needs qwix: pip install 'qwix>=0.1.8,<0.2' (or the t5like[quant] "
                          "extra).") from e
    return qwix


def _qtype(name: str):
    return {"int8": jnp.int8, "int4": jnp.int4}[name]


# Quantization-aware training --------------------------------------------------------------------------

def _free_axes(eq: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Each operand's axes that `eq` (two operands) does not contract: those that get their own scale."""
    ins, out = eq.split("->")
    lhs, rhs = ins.split(",")
    contracted = set(lhs) & set(rhs) - set(out)
    return (tuple(i for i, c in enumerate(lhs) if c not in contracted),
            tuple(i for i, c in enumerate(rhs) if c not in contracted))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def int8_einsum(eq: str, x: jax.Array, w: jax.Array) -> jax.Array:
    """einsum(eq, x, w) with x and w quantized to int8 (absmax scales over the other axes' slices) and multiplied in
    int8; the gradient is that of the float einsum at the quantized x and w (straight-through rounding)."""
    return _int8_forward(eq, x, w)[0]


def _int8_forward(eq, x, w):
    qwix = _qwix()
    x_axes, w_axes = _free_axes(eq)
    qx = qwix.quantize(x, jnp.int8, channelwise_axes=x_axes)
    qw = qwix.quantize(w, jnp.int8, channelwise_axes=w_axes)
    return qwix.einsum(eq, qx, qw).astype(x.dtype), (qx, qw)


def _int8_fwd(eq, x, w):
    return _int8_forward(eq, x, w)  # residuals: the int8 operands and their scales (in x's and w's dtypes)


def _int8_bwd(eq, res, g):
    qx, qw = res
    qwix = _qwix()
    _, vjp = jax.vjp(lambda a, b: jnp.einsum(eq, a, b), qwix.dequantize(qx), qwix.dequantize(qw))
    return vjp(g.astype(qx.scale.dtype))


int8_einsum.defvjp(_int8_fwd, _int8_bwd)


def einsum(eq: str, x: jax.Array, w: Any, quant: str) -> jax.Array:
    """A layer's weight matmul: w weight-only quantized (a qwix QArray, from quantize_for_decoding), or
    int8 training (quant='int8'), else the plain einsum."""
    if not isinstance(w, jax.Array):
        return _qwix().einsum(eq, x, w).astype(x.dtype)
    if quant == "int8":
        return int8_einsum(eq, x, w)
    return jnp.einsum(eq, x, w)


# Decoding: weight-only quantization and the KV cache ---------------------------------------------------

def check_decoding(family: str, weights: str, kv_cache: str) -> None:
    """Refuse, before anything is built, what quantized decoding cannot do: naming the field, the value, a fix."""
    if weights not in WEIGHT_TYPES:
        raise ValueError(f"weights={weights!r} is not one of {list(WEIGHT_TYPES)}; pass --quant-weights int8 "
                         "(or int4, or none).")
    if kv_cache not in KV_CACHE_TYPES:
        raise ValueError(f"kv_cache={kv_cache!r} is not one of {list(KV_CACHE_TYPES)}; pass --quant-kv-cache int8 "
                         "(or none).")
    if family == "encoder" and (weights != "none" or kv_cache != "none"):
        raise ValueError(f"quantized decoding (weights={weights!r}, kv_cache={kv_cache!r}) is for models that "
                         f"decode: model.family={family!r} has no decoder or KV cache (fill-mask runs one "
                         "forward in full precision); leave --quant-weights and --quant-kv-cache at none.")


def quantize_for_decoding(model: nnx.Module, *, weights: str = "int8", kv_cache: str = "none") -> nnx.Module:
    """A copy of `model` for decoding (t5like.decoding): each layer's `quantized_kernels` stored as a qwix QArray of
    `weights` values with one float scale per output channel (and per layer), and with kv_cache='int8' an int8
    KV cache. The original model is left as it was."""
    check_decoding(model.cfg.family, weights, kv_cache)
    qwix = _qwix()
    model = nnx.clone(model)
    params, free_axes = [], []
    for path, module in nnx.iter_graph(model):
        if not isinstance(module, nnx.Module):
            continue
        if kv_cache != "none" and hasattr(module, "kv_cache_quant"):
            module.kv_cache_quant = kv_cache
        start = 1 if "layers" in path else 0  # a scanned stack's params lead with the layer axis: a scale per layer
        # A layer class lists its weight matrices and how many of their leading dims its matmul contracts
        # (layers.Attention, MLP, Dense): each other dim gets its own scale.
        for name, contracted in getattr(type(module), "quantized_kernels", {}).items():
            param = getattr(module, name, None)
            if weights != "none" and isinstance(param, nnx.Param) and isinstance(param[...], jax.Array):
                params.append(param)
                free_axes.append(tuple(i for i in range(param[...].ndim) if not start <= i < start + contracted))
    quantize = jax.jit(lambda ws: [qwix.quantize(w, _qtype(weights), channelwise_axes=free)
                                   for w, free in zip(ws, free_axes)])
    for param, value in zip(params, quantize([p[...] for p in params])):
        param.set_value(value)
    return model

def kv_write(x: jax.Array, like: Any):
    """New keys or values [B, K, T, H] in the form of the cache `like`: its dtype, or an int8 QArray with one
    scale per (row, kv head, token)."""
    if isinstance(like, jax.Array):
        return x.astype(like.dtype)
    return _qwix().quantize(x.astype(jnp.float32), like.qtype, channelwise_axes=(0, 1, 2))


def kv_read(c: Any, dtype) -> jax.Array:
    """A (slice of a) cache in the compute dtype."""
    if isinstance(c, jax.Array):
        return c.astype(dtype)
    return _qwix().dequantize(c).astype(dtype)


def empty_kv(shape: tuple[int, ...], dtype, quant: str):
    """A zero cache [layers, B, K, S, H]: floats, or an int8 QArray with float32 scales [layers, B, K, S, 1]."""
    if quant == "none":
        return jnp.zeros(shape, dtype)
    qwix = _qwix()
    return qwix.QArray(jnp.zeros(shape, jnp.int8), jnp.ones((*shape[:-1], 1), jnp.float32), qtype=jnp.int8)


def nbytes(tree) -> int:
    """Bytes of every array in a tree (a model's state, a cache)."""
    return int(sum(np.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def weight_bytes(tree) -> int:
    """Bytes of a tree as stored: int4 counts half a byte per value (jnp reports 1)."""
    total = 0.0
    for x in jax.tree.leaves(tree):
        bits = 4 if x.dtype == jnp.int4 else 8 * jnp.dtype(x.dtype).itemsize
        total += np.prod(x.shape) * bits / 8
    return int(total)


def memory_report(model: nnx.Module, quantized: nnx.Module) -> dict:
    """Parameter bytes before and after quantize_for_decoding, and the bytes saved."""
    before, after = weight_bytes(nnx.state(model)), weight_bytes(nnx.state(quantized))
    return {"param_bytes": before, "quantized_param_bytes": after, "saved_bytes": before - after,
            "saved_fraction": (before - after) / before}

