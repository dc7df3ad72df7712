"""Attention kernels: splash (Pallas, interpreted on CPU) against XLA, the AOT TPU compile of a train step
with splash, and config validation of the fused kernels."""
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5like import layers as L
from t5like import train
from t5like.config import Config, MeshConfig, ModelConfig, OptimConfig, TrainConfig
from t5like.data import DataConfig
from t5like.sharding import Sharder, make_mesh

# Other processes on this machine may hold libtpu's lockfile; topology-only (AOT) use needs no TPU to itself.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def packed_segments(B, T, rng):
    """Rows of 2-3 packed segments with trailing padding (segment 0)."""
    seg = np.zeros((B, T), np.int32)
    for b in range(B):
        cuts = sorted(rng.choice(np.arange(8, T - 8), 2, replace=False))
        seg[b, :cuts[0]], seg[b, cuts[0]:cuts[1]], seg[b, cuts[1]:T - 5] = 1, 2, 3
    return jnp.asarray(seg)


def qkv(B, T, N, K, H, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(ks[0], (B, T, N, H)), jax.random.normal(ks[1], (B, T, K, H)),
            jax.random.normal(ks[2], (B, T, K, H)))


def both_kernels(q, k, v, mask, shard=Sharder(), fused="splash"):
    """Outputs and input gradients (of a fixed random projection of the output) from `fused` and XLA."""
    w = jax.random.normal(jax.random.key(9), q.shape, q.dtype)

    def run(impl):
        f = lambda q, k, v: jnp.sum(L.attention_kernel(impl, q, k, v, mask, None, shard) * w)
        out = jax.jit(lambda q, k, v: L.attention_kernel(impl, q, k, v, mask, None, shard))(q, k, v)
        return out, jax.jit(jax.grad(f, argnums=(0, 1, 2)))(q, k, v)
    return run(fused), run("xla")


def test_splash_matches_xla_causal_gqa_under_a_mesh():
    """Causal, GQA (4 query heads on 2 kv heads), packed rows with padding, under shard_map over
    (data=2, tensor=2): outputs and all three input gradients agree with XLA (interpret mode)."""
    mesh = make_mesh(MeshConfig(data=2, fsdp=1, tensor=2), jax.devices()[:4])
    B, T, N, K, H = 2, 128, 4, 2, 32
    seg = packed_segments(B, T, np.random.RandomState(0))
    q, k, v = qkv(B, T, N, K, H)
    (out_s, grads_s), (out_x, grads_x) = both_kernels(q, k, v, L.attention_mask(seg, seg, causal=True),
                                                      Sharder(mesh))
    np.testing.assert_allclose(out_s, out_x, atol=2e-5, rtol=2e-5)
    for gs, gx in zip(grads_s, grads_x):
        np.testing.assert_allclose(gs, gx, atol=1e-4, rtol=1e-4)


def test_splash_bidirectional_masks_other_segments():
    """Bidirectional packed rows (an encoder): splash agrees with XLA, and a key of the last segment
    changes no output of the other segments."""
    B, T, N, H = 2, 128, 2, 32
    seg = packed_segments(B, T, np.random.RandomState(1))
    q, k, v = qkv(B, T, N, N, H, seed=1)
    mask = L.attention_mask(seg, seg, causal=False)
    splash = jax.jit(lambda q, k, v: L.attention_kernel("splash", q, k, v, mask, None, Sharder()))
    out_s = splash(q, k, v)
    np.testing.assert_allclose(out_s, L.attention_kernel("xla", q, k, v, mask, None, Sharder()), atol=2e-5, rtol=2e-5)
    out_moved = splash(q, k.at[:, -10].add(5.0), v)
    other = np.asarray(seg != seg[:, -10:-9])
    np.testing.assert_allclose(np.asarray(out_moved)[other], np.asarray(out_s)[other], atol=1e-5)
    assert not np.allclose(np.asarray(out_moved)[~other], np.asarray(out_s)[~other], atol=1e-3)


def test_train_step_with_splash_compiles_ahead_of_time_for_tpu():
    """The trainer's whole step (forward, backward, AdamW) with splash attention compiles for a v5e 2x2
    topology through libtpu on this CPU host; the compiled program holds the Pallas TPU kernel."""
    from jax.experimental import topologies
    devices = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2", chip_config_name="default",
                                           chips_per_host_bounds=(2, 2, 1), num_slices=1).devices
    cfg = Config(model=ModelConfig(family="decoder", vocab_size=512, d_model=128, num_heads=2, d_ff=256,
                                   num_layers=1, max_len=128, dtype="bfloat16", attention_impl="splash"),
                 data=DataConfig(objective="lm", seq_len=128), optim=OptimConfig(),
                 train=TrainConfig(batch_size=4, steps=10), mesh=MeshConfig(data=2, tensor=2)).validate()
    B, T = cfg.train.batch_size, cfg.data.seq_len
    example = {"inputs": np.zeros((B, T), np.int32), "targets": np.zeros((B, T), np.int32),
               "weights": np.zeros((B, T), np.float32), "segment_ids": np.zeros((B, T), np.int32),
               "positions": np.zeros((B, T), np.int32)}
    setup = train.build(cfg, example, devices=devices)
    compiled = setup.train_step.lower(setup.abstract_state, setup.abstract_batch).compile()
    text = compiled.as_text()
    assert "tpu_custom_call" in text and "splash" in text
    assert compiled.memory_analysis() is not None


on_gpu = pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs an NVIDIA GPU")


@on_gpu
@pytest.mark.parametrize("causal", [True, False])
def test_cudnn_matches_xla_on_packed_rows(causal):
    """GPU only: cuDNN flash attention (bf16, GQA 8 query heads on 2 kv heads, packed rows with padding)
    gives XLA's outputs and input gradients, causal and bidirectional."""
    B, T, N, K, H = 2, 256, 8, 2, 64
    seg = packed_segments(B, T, np.random.RandomState(1))
    q, k, v = (x.astype(jnp.bfloat16) for x in qkv(B, T, N, K, H, seed=1))
    (out_c, grads_c), (out_x, grads_x) = both_kernels(q, k, v, L.attention_mask(seg, seg, causal=causal),
                                                      fused="cudnn")
    f32 = lambda a: np.asarray(a, np.float32)
    np.testing.assert_allclose(f32(out_c), f32(out_x), atol=2e-2, rtol=2e-2)
    for gc, gx in zip(grads_c, grads_x):
        np.testing.assert_allclose(f32(gc), f32(gx), atol=6e-2, rtol=5e-2)


@on_gpu
def test_cudnn_train_step_matches_xla():
    """GPU only: a bf16 decoder's train step with attention_impl=cudnn lowers to the cuDNN custom call and
    reaches XLA's loss and gradient norm on packed data."""
    results = {}
    for impl in ("cudnn", "xla"):
        cfg = Config(model=ModelConfig(family="decoder", vocab_size=256, d_model=128, num_heads=4, num_kv_heads=2,
                                       d_ff=256, num_layers=2, max_len=128, position="rope", dtype="bfloat16",
                                       attention_impl=impl),
                     data=DataConfig(objective="lm", seq_len=128), optim=OptimConfig(learning_rate=1e-3),
                     train=TrainConfig(batch_size=4, steps=2), workdir="/tmp/t5like-cudnn-test").validate()
        rng = np.random.RandomState(0)
        seg = np.asarray(packed_segments(4, 128, rng))
        tokens = rng.randint(3, 256, (4, 129)).astype(np.int32)
        batch = dict(inputs=tokens[:, :-1], targets=tokens[:, 1:], weights=(seg > 0).astype(np.float32),
                     segment_ids=seg, positions=np.broadcast_to(np.arange(128, dtype=np.int32), (4, 128)).copy())
        setup = train.build(cfg, batch)
        gbatch = train.global_batch(setup, batch)
        hlo = setup.train_step.lower(setup.init_state(), gbatch).compile().as_text()
        assert ("__cudnn$fmha" in hlo) == (impl == "cudnn")  # cuDNN's fused attention custom call
        _, metrics = setup.train_step(setup.init_state(), gbatch)
        results[impl] = {k: float(metrics[k]) for k in ("loss", "grad_norm")}
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose(results["cudnn"][key], results["xla"][key], rtol=2e-2)


@pytest.mark.parametrize("overrides, words", [
    (dict(attention_impl="cudnn", dtype="float32"), ["model.attention_impl='cudnn'", "model.dtype='float32'", "bfloat16"]),
    (dict(attention_impl="cudnn", dtype="bfloat16", d_model=120, num_heads=4), ["head dim", "multiple of 8", "30"]),
    (dict(attention_impl="cudnn", dtype="bfloat16", head_dim=512), ["at most", "512"]),
    (dict(attention_impl="splash", position="relative"), ["splash", "model.position='relative'"]),
    (dict(attention_impl="flash"), ["model.attention_impl='flash'", "splash"]),
])
def test_fused_kernels_refuse_what_they_cannot_run(overrides, words):
    with pytest.raises(ValueError) as e:
        dataclasses.replace(ModelConfig(), **overrides).validate()
    for w in words:
        assert w in str(e.value)
    ModelConfig(attention_impl="cudnn", dtype="bfloat16").validate()  # the supported case passes


def test_cudnn_path_keeps_causality_out_of_the_dense_mask():
    """For cuDNN, causality travels as `is_causal`; the dense mask holds segments only, so packed rows
    still cannot see other segments (checked on the mask the kernel receives)."""
    seg = jnp.array([[1, 1, 2, 2, 0]])
    spec = L.attention_mask(seg, seg, causal=True)
    seg_only = np.asarray(spec.dense(with_causal=False))[0, 0]
    assert seg_only[0, 1] and not seg_only[1, 2] and not seg_only[0, 4]  # later token, same segment: visible
    np.testing.assert_array_equal(np.asarray(spec.dense())[0, 0], seg_only & np.tril(np.ones((5, 5), bool)))
