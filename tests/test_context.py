"""Context parallelism (mesh.context): activations' length sharded over the `context` axis, attention across it
by all-gathered K/V. Checked on the 8 simulated CPU devices against the same computation without the axis."""
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

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def packed(B, T, rng):
    """Rows of 2-3 packed segments with trailing padding (segment 0)."""
    seg = np.zeros((B, T), np.int32)
    for b in range(B):
        cuts = sorted(rng.choice(np.arange(8, T - 8), 2, replace=False))
        seg[b, :cuts[0]], seg[b, cuts[0]:cuts[1]], seg[b, cuts[1]:T - 5] = 1, 2, 3
    return seg


@pytest.mark.parametrize("mesh_cfg, causal, window", [
    (MeshConfig(data=1, context=8), True, 0),
    (MeshConfig(data=1, context=8), False, 0),
    (MeshConfig(data=2, context=4), True, 8),      # a sliding window: the blockwise path across the shards
])
def test_attention_across_the_context_axis_matches_dense(mesh_cfg, causal, window):
    """GQA (4 query heads on 2 kv heads), packed rows with padding: outputs and q/k/v gradients with the length
    sharded over `context` equal those on one device within 1e-5; the dense path all-gathers K/V."""
    B, T, N, K, H = 2, 64, 4, 2, 16
    seg = jnp.asarray(packed(B, T, np.random.RandomState(0)))
    ks = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(ks[0], (B, T, N, H))
    k, v = (jax.random.normal(key, (B, T, K, H)) for key in ks[1:3])
    w = jax.random.normal(ks[3], q.shape)

    def run(shard, put):
        mask = L.attention_mask(seg, seg, causal=causal, window=window)
        f = lambda q, k, v: L.attention_kernel("xla", q, k, v, mask, None, shard)
        loss = lambda q, k, v: jnp.sum(f(q, k, v) * w)
        args = [put(x, names) for x, names in ((q, ("batch", "length", "act_heads", None)),
                                               (k, L.KV_NAMES), (v, L.KV_NAMES))]
        fwd = jax.jit(f).lower(*args).compile()
        return fwd(*args), jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(*args), fwd.as_text()

    shard = Sharder(make_mesh(mesh_cfg))
    out, grads, hlo = run(shard, lambda x, names: jax.device_put(x, shard.named(names, x.shape)))
    ref_out, ref_grads, _ = run(Sharder(), lambda x, names: x)
    assert out.sharding.spec[1] == "context"                      # queries and outputs stay sharded on length
    assert ("all-gather" in hlo) == (window == 0)                 # dense: K/V gathered; blockwise: halo only
    assert float(jnp.abs(out - ref_out).max()) < 1e-5
    for g, rg in zip(grads, ref_grads):
        assert float(jnp.abs(g - rg).max()) < 1e-5


def test_splash_across_the_context_axis(causal=True, window=0):
    """Splash (interpreted on CPU) with queries sharded over context=4 and K/V gathered: each shard's kernel has its
    own mask offset (CausalMask here; LocalMask takes it the same way); outputs equal XLA's on one device (MQA,
    causal, packed rows with padding)."""
    B, T, N, K, H = 2, 512, 2, 1, 32
    seg = jnp.asarray(packed(B, T, np.random.RandomState(1)))
    ks = jax.random.split(jax.random.key(1), 3)
    q = jax.random.normal(ks[0], (B, T, N, H))
    k, v = (jax.random.normal(key, (B, T, K, H)) for key in ks[1:])
    mask = L.attention_mask(seg, seg, causal=causal, window=window)
    shard = Sharder(make_mesh(MeshConfig(data=2, context=4)))
    out = jax.jit(lambda q, k, v: L.attention_kernel("splash", q, k, v, mask, None, shard))(q, k, v)
    ref = L.attention_kernel("xla", q, k, v, mask, None, Sharder())
    assert float(jnp.abs(out - ref).max()) < 1e-5


def test_splash_with_a_context_axis_compiles_for_tpu():
    """The splash kernels of a context axis (forward and backward, causal) compile through libtpu for a v5e 2x2."""
    pytest.importorskip("libtpu")
    from jax.experimental import topologies
    devices = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2", chip_config_name="default",
                                           chips_per_host_bounds=(2, 2, 1), num_slices=1).devices
    shard = Sharder(make_mesh(MeshConfig(data=2, context=2), devices))
    B, T, N, H = 2, 512, 2, 128
    seg = jax.ShapeDtypeStruct((B, T), jnp.int32, sharding=shard.named(("batch", "length"), (B, T)))
    names = ("batch", "length", None, None)
    x = jax.ShapeDtypeStruct((B, T, N, H), jnp.bfloat16, sharding=shard.named(names, (B, T, N, H)))

    def loss(q, k, v, seg):
        mask = L.attention_mask(seg, seg, causal=True)
        return jnp.sum(L.attention_kernel("splash", q, k, v, mask, None, shard).astype(jnp.float32))
    text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, x, x, seg).compile().as_text()
    assert "tpu_custom_call" in text and "all-gather" in text


def tiny(family, mesh, steps):
    model = ModelConfig(family=family, vocab_size=256, d_model=64, num_heads=4, num_kv_heads=2, d_ff=128,
                        num_layers=1, max_len=64, position="relative" if family == "encoder_decoder" else "rope")
    objective = {"decoder": "lm", "encoder_decoder": "seq2seq"}[family]
    files = dict(source="files", format="jsonl", paths=("train.jsonl",)) if objective == "seq2seq" else {}
    return Config(model=model, data=DataConfig(objective=objective, seq_len=64, target_len=32, **files),
                  optim=OptimConfig(learning_rate=3e-3, warmup_steps=0), train=TrainConfig(batch_size=4, steps=steps),
                  mesh=mesh, workdir="/tmp/t5like-context-test").validate()


def batches(family, steps):
    """Packed rows with padding, fresh tokens every step."""
    rng = np.random.RandomState(0)
    out = []
    for _ in range(steps):
        lengths = {"": 64} if family == "decoder" else {"encoder_": 64, "decoder_": 32}
        batch = {}
        for prefix, T in lengths.items():
            seg = packed(4, T, rng)
            pos = np.zeros_like(seg)
            for b in range(4):
                for s in np.unique(seg[b]):
                    idx = np.flatnonzero(seg[b] == s)
                    pos[b, idx] = np.arange(len(idx))
            batch[f"{prefix}segment_ids"], batch[f"{prefix}positions"] = seg, pos
        if family == "decoder":
            tokens = rng.randint(3, 256, (4, 65)).astype(np.int32)
            batch.update(inputs=tokens[:, :-1], targets=tokens[:, 1:], weights=(batch["segment_ids"] > 0) * 1.0)
        else:
            tokens = rng.randint(3, 256, (4, 33)).astype(np.int32)
            batch.update(encoder_inputs=rng.randint(3, 256, (4, 64)).astype(np.int32), decoder_inputs=tokens[:, :-1],
                         targets=tokens[:, 1:], weights=(batch["decoder_segment_ids"] > 0) * 1.0)
        out.append({k: np.asarray(v, np.float32 if k == "weights" else np.int32) for k, v in batch.items()})
    return out


def test_training_with_a_context_axis_reaches_the_same_losses():
    """A decoder (GQA, RoPE, packed rows with padding) trains 10 steps to the same losses with mesh.context=4
    as without the axis, within 1e-5."""
    data = batches("decoder", 10)
    losses = {}
    for context in (1, 4):
        cfg = tiny("decoder", MeshConfig(data=2, context=context), 10)
        setup = train.build(cfg, data[0], devices=jax.devices()[:2 * context])
        state = setup.init_state()
        losses[context] = []
        for batch in data:
            state, metrics = setup.train_step(state, train.global_batch(setup, batch))
            losses[context].append(float(metrics["loss"]))
    np.testing.assert_allclose(losses[4], losses[1], atol=1e-5, rtol=0)
    assert losses[1][-1] < losses[1][0]  # it trains


def test_encoder_decoder_logits_with_a_context_axis():
    """A T5-style encoder-decoder (relative bias; encoder and decoder self-attention and cross-attention all
    across the axis): logits with mesh.context=8 equal those on one device within 1e-5, sharded on length."""
    from t5like.models import build_model
    batch = {k: jnp.asarray(v) for k, v in batches("encoder_decoder", 1)[0].items()}
    cfg = tiny("encoder_decoder", MeshConfig(data=1), 1).model
    shard = Sharder(make_mesh(MeshConfig(data=1, context=8)))
    ref = jax.jit(lambda b: build_model(cfg, seed=0)(b))(batch)
    out = jax.jit(lambda b: build_model(cfg, seed=0, shard=shard)(b))(batch)
    assert out.sharding.spec[1] == "context"
    assert float(jnp.abs(out - ref).max()) < 1e-5


def test_a_tiny_preset_compiles_for_tpu_with_a_context_axis():
    """llama_1b at its tiny size, mesh fsdp=2 x context=2 on a v5e 2x2 slice, compiles ahead of time through
    libtpu (launch.compile's check, as `python -m launch.compile ... mesh.context=2` runs it)."""
    pytest.importorskip("libtpu")
    from launch.compile import check, load_config
    from launch.tpu_types import parse_tpu_type
    cfg = load_config("experiments.llama_1b", ["size=tiny", "mesh.fsdp=2", "mesh.context=2", "train.batch_size=4"])
    result = check(cfg, parse_tpu_type("v5e-4"))
    assert result["fits"] is True and result["num_devices"] == 4 and result["per_device_bytes"] > 0


@pytest.mark.parametrize("overrides, words", [
    (["mesh.context=3"], ["mesh.context=3", "does not divide the length 64", "data.seq_len", "multiple of 3"]),
    (["mesh.context=2", "model.attention_impl=splash"], ["mesh.context=2", "splash", "length 64 / 2 = 32",
                                                          "multiple of 256"]),
    (["mesh.context=-1"], ["mesh.context=-1", "positive integer"]),
])
def test_a_context_axis_that_cannot_work_is_refused(overrides, words):
    from t5like.config import apply_overrides
    with pytest.raises(ValueError) as e:
        apply_overrides(tiny("decoder", MeshConfig(data=1), 1), overrides).validate()
    for w in words:
        assert w in str(e.value)
