"""Sliding-window attention (model.attention_window): the blockwise XLA path and splash's local mask against a
dense masked reference, cached decoding with a W-slot ring buffer against full recomputation, and refusals."""
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5like import layers as L
from t5like.config import ModelConfig
from t5like.models import build_model
from t5like.sharding import Sharder

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def packed(B, T, rng):
    """Rows of 2-3 packed segments with trailing padding (segment 0)."""
    seg = np.zeros((B, T), np.int32)
    for b in range(B):
        cuts = sorted(rng.choice(np.arange(8, T - 8), 2, replace=False))
        seg[b, :cuts[0]], seg[b, cuts[0]:cuts[1]], seg[b, cuts[1]:T - 5] = 1, 2, 3
    return jnp.asarray(seg)


def reference(q, k, v, seg, W, causal, prefix=None):
    """Softmax attention under a mask written out position by position, independently of MaskSpec."""
    B, T, N, H = q.shape
    t, s = np.arange(T)[:, None], np.arange(T)[None, :]
    mask = (np.asarray(seg)[:, :, None] == np.asarray(seg)[:, None, :]) & (np.abs(t - s) < W)[None]
    if causal:
        allowed = np.broadcast_to(s <= t, mask.shape)
        if prefix is not None:
            p = np.asarray(prefix)
            allowed = allowed | (p[:, :, None] & p[:, None, :])
        mask = mask & allowed
    k, v = (jnp.repeat(x, N // x.shape[2], axis=2) for x in (k, v))
    logits = jnp.einsum("btnh,bsnh->bnts", q, k) * H ** -0.5
    probs = jax.nn.softmax(jnp.where(jnp.asarray(mask)[:, None], logits, -1e30), axis=-1)
    return jnp.einsum("bnts,bsnh->btnh", probs, v)


def qkv(B, T, N, K, H, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(ks[0], (B, T, N, H)), jax.random.normal(ks[1], (B, T, K, H)),
            jax.random.normal(ks[2], (B, T, K, H)))


@pytest.mark.parametrize("kind", ["causal", "bidirectional", "prefix_lm"])
def test_blockwise_window_matches_dense_masked_reference(kind):
    """GQA (4 query heads on 2 kv heads), packed rows with padding, T = 77 not a multiple of W = 9: the
    blockwise path (what model.attention_impl=xla runs once T >= 4W) and the dense masked path both give the
    reference's outputs and q/k/v gradients within 1e-5."""
    B, T, N, K, H, W = 2, 77, 4, 2, 16, 9
    seg = packed(B, T, np.random.RandomState(0))
    prefix = jnp.asarray(np.arange(T)[None].repeat(B, 0) < np.array([[20], [33]])) if kind == "prefix_lm" else None
    causal = kind != "bidirectional"
    mask = L.attention_mask(seg, seg, causal=causal, prefix_BT=prefix, window=W)
    q, k, v = qkv(B, T, N, K, H)
    w = jax.random.normal(jax.random.key(9), q.shape)
    paths = {"reference": lambda q, k, v: reference(q, k, v, seg, W, causal, prefix),
             "blockwise": lambda q, k, v: L.attention_kernel("xla", q, k, v, mask, None, Sharder()),
             "dense": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask.dense())}
    got = {name: (jax.jit(f)(q, k, v), jax.jit(jax.grad(lambda *a: jnp.sum(f(*a) * w), argnums=(0, 1, 2)))(q, k, v))
           for name, f in paths.items()}
    hlo = jax.jit(paths["blockwise"]).lower(q, k, v).as_text()
    assert f"{-(-T // W)}x{W}x" in hlo.replace(",", "x")  # blockwise: [.., T/W blocks, W, ..], no T x T logits
    ref_out, ref_grads = got.pop("reference")
    for name, (out, grads) in got.items():
        err = float(jnp.abs(out - ref_out).max())
        assert err < 1e-5, (name, err)
        for g, rg in zip(grads, ref_grads):
            assert float(jnp.abs(g - rg).max()) < 1e-5, name


def test_splash_local_mask_matches_xla():
    """Splash with its LocalMask (interpreted on CPU): causal GQA, packed rows, W = 40, as the XLA path."""
    B, T, N, K, H, W = 1, 256, 2, 1, 32, 40
    seg = packed(B, T, np.random.RandomState(2))
    mask = L.attention_mask(seg, seg, causal=True, window=W)
    q, k, v = qkv(B, T, N, K, H, seed=2)
    out_s = jax.jit(lambda q, k, v: L.attention_kernel("splash", q, k, v, mask, None, Sharder()))(q, k, v)
    np.testing.assert_allclose(out_s, reference(q, k, v, seg, W, True), atol=2e-5, rtol=2e-5)


def test_splash_window_compiles_for_tpu():
    """The splash kernel with a local mask, forward and backward, compiles through libtpu for a v5e chip."""
    pytest.importorskip("libtpu")
    from jax.experimental import topologies
    from t5like.config import MeshConfig
    from t5like.sharding import make_mesh
    devices = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2", chip_config_name="default",
                                           chips_per_host_bounds=(2, 2, 1), num_slices=1).devices
    shard = Sharder(make_mesh(MeshConfig(data=4), devices))
    B, T, N, H = 4, 512, 2, 128
    seg = jax.ShapeDtypeStruct((B, T), jnp.int32, sharding=shard.named(("batch", None), (B, T)))
    x = jax.ShapeDtypeStruct((B, T, N, H), jnp.bfloat16, sharding=shard.named(("batch", None, None, None), (B, T, N, H)))

    def loss(q, k, v, seg):
        mask = L.attention_mask(seg, seg, causal=True, window=128)
        return jnp.sum(L.attention_kernel("splash", q, k, v, mask, None, shard).astype(jnp.float32))
    text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, x, x, seg).compile().as_text()
    assert "tpu_custom_call" in text


@pytest.mark.parametrize("family, position", [("decoder", "rope"), ("encoder_decoder", "relative")])
def test_ring_buffer_decoding_matches_full_recomputation(family, position):
    """Decoding 20 tokens with W = 5 keeps a ring of 5 slots; a 7-token prefill (longer than the window), then
    one token at a time, gives the logits of the whole sequence run at once, left-padded rows included."""
    cfg = ModelConfig(family=family, vocab_size=97, d_model=32, num_heads=4, num_kv_heads=2, d_ff=64, num_layers=2,
                      max_len=64, position=position, attention_window=5)
    model = build_model(cfg, seed=1)
    B, T, P = 2, 20, 7
    ids = np.random.RandomState(0).randint(2, 97, (B, T)).astype(np.int32)
    if family == "decoder":
        start = np.array([0, 3], np.int32)
        seg = (np.arange(T)[None] >= start[:, None]).astype(np.int32)
        pos = np.maximum(np.arange(T)[None] - start[:, None], 0).astype(np.int32)
        full = np.asarray(model({"inputs": ids, "segment_ids": seg, "positions": pos}))
        cache = model.init_cache(jnp.asarray(start), T)
    else:
        start = np.zeros(B, np.int32)
        enc, enc_seg = ids[:, :6], np.ones((B, 6), np.int32)
        full = np.asarray(model({"encoder_inputs": enc, "encoder_segment_ids": enc_seg, "decoder_inputs": ids}))
        cache = model.init_cache(jnp.asarray(enc), jnp.asarray(enc_seg), T)
    assert cache.window == 5 and cache.self_kv.k.shape[3] == 5      # [layers, B, K, slots, H]: W slots
    step = jax.jit(lambda c, t: model.decode_step(t, c))
    logits, cache = step(cache, jnp.asarray(ids[:, :P]))
    got = [np.asarray(logits)]
    for t in range(P, T):
        logits, cache = step(cache, jnp.asarray(ids[:, t:t + 1]))
        got.append(np.asarray(logits))
    real = np.arange(T)[None] >= start[:, None]
    assert np.abs(np.concatenate(got, 1) - full)[real].max() < 1e-5


@pytest.mark.parametrize("overrides, words", [
    (dict(attention_window=-1), ["model.attention_window=-1", ">= 0"]),
    (dict(attention_window=64, attention_impl="cudnn", dtype="bfloat16", family="encoder"),
     ["model.attention_window=64", "model.attention_impl='cudnn'", "causal only", "model.attention_impl=xla"]),
])
def test_a_window_a_kernel_cannot_run_is_refused(overrides, words):
    with pytest.raises(ValueError) as e:
        dataclasses.replace(ModelConfig(), **overrides).validate()
    for w in words:
        assert w in str(e.value)
    ModelConfig(attention_window=64, attention_impl="cudnn", dtype="bfloat16").validate()  # causal: supported
