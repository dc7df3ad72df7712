"""Sharding on 8 simulated devices: mesh parity, real parameter shards, scan, FLOPs vs XLA."""
import dataclasses
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from t5like.accounting import training_flops
from t5like.config import MeshConfig, ModelConfig, model_preset
from t5like.models import build_model, create_sharded
from t5like.sharding import Sharder, batch_sharding, make_mesh

FAMILY_PRESETS = {"encoder": "bert_base", "decoder": "llama_style", "encoder_decoder": "t5_v1_1_base"}
MESHES = [(8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 2, 4)]


def make_batch(cfg: ModelConfig, batch: int = 8, length: int = 16) -> dict:
    rng = np.random.RandomState(0)
    ids = rng.randint(3, cfg.vocab_size, (batch, length)).astype(np.int32)
    targets = rng.randint(3, cfg.vocab_size, (batch, length)).astype(np.int32)
    seg = np.ones((batch, length), np.int32)
    seg[:, length // 2:] = 2  # two packed segments per row
    pos = np.concatenate([np.arange(length // 2)] * 2)[None].repeat(batch, 0).astype(np.int32)
    if cfg.family == "encoder_decoder":
        return dict(encoder_inputs=ids, decoder_inputs=targets, targets=targets, encoder_segment_ids=seg,
                    decoder_segment_ids=seg, encoder_positions=pos, decoder_positions=pos)
    return dict(inputs=ids, targets=targets, segment_ids=seg, positions=pos)


def loss_and_logits(graphdef, params, batch):
    logits = nnx.merge(graphdef, params)(batch)
    logp = jax.nn.log_softmax(logits)
    nll = -jnp.take_along_axis(logp, batch["targets"][..., None], -1).mean()
    return nll, logits


grad_fn = jax.value_and_grad(loss_and_logits, argnums=1, has_aux=True)


def run(model, batch, sharder=None):
    graphdef, params = nnx.split(model)
    if sharder is not None:
        batch = jax.device_put(batch, batch_sharding(sharder, batch))
    (loss, logits), grads = jax.jit(grad_fn, static_argnums=0)(graphdef, params, batch)
    return np.asarray(logits), jax.tree.map(np.asarray, grads), float(loss)


@pytest.mark.parametrize("family", sorted(FAMILY_PRESETS))
def test_mesh_parity_forward_and_gradients(family):
    cfg = model_preset(FAMILY_PRESETS[family], "tiny")
    batch = make_batch(cfg)

    def on_mesh(shape):
        sharder = Sharder(make_mesh(MeshConfig(*shape)))
        return run(create_sharded(cfg, sharder, seed=0), batch, sharder)

    # Each mesh is its own program and compiling is most of the time: XLA compiles without holding the GIL,
    # so the meshes compile side by side on the cores. Each result is checked against the one-device run.
    with ThreadPoolExecutor(len(MESHES)) as pool:
        results = pool.map(on_mesh, MESHES)
        ref_logits, ref_grads, ref_loss = run(build_model(cfg, seed=0), batch)
        for shape, (logits, grads, loss) in zip(MESHES, results):
            np.testing.assert_allclose(logits, ref_logits, atol=1e-5, rtol=1e-5, err_msg=f"mesh {shape}")
            assert loss == pytest.approx(ref_loss, abs=1e-5)
            for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads)):
                np.testing.assert_allclose(g, r, atol=1e-5, rtol=1e-5, err_msg=f"mesh {shape} {path}")


def test_fsdp_shards_every_large_matrix():
    cfg = dataclasses.replace(model_preset("llama_style", "tiny"), num_kv_heads=4)
    mesh = make_mesh(MeshConfig(data=1, fsdp=8, tensor=1))
    model = create_sharded(cfg, Sharder(mesh), seed=0)
    checked = 0
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        array = var.get_value()
        if array.ndim < 2 or array.size < 4096:
            continue
        checked += 1
        shards = array.addressable_shards
        assert len(shards) == 8 and len({s.device for s in shards}) == 8
        for s in shards:
            assert s.data.size * 8 == array.size, (path, s.data.shape, array.shape)
            assert s.data.nbytes * 8 == array.nbytes
        embed_dim = list(var.get_metadata()["logical_axes"]).index("embed")
        assert shards[0].data.shape[embed_dim] * 8 == array.shape[embed_dim]
    assert checked >= 6  # embedding, q, k, v, out, mlp in/gate/out


def test_tensor_parallel_shards_heads_and_mlp():
    cfg = model_preset("gpt2_small", "tiny")
    mesh = make_mesh(MeshConfig(data=2, fsdp=1, tensor=4))
    model = create_sharded(cfg, Sharder(mesh), seed=0)
    wi = model.decoder.layers.mlp.wi.get_value()  # [layers, embed, mlp]
    assert wi.sharding.spec == jax.sharding.PartitionSpec(None, None, "tensor")
    assert wi.addressable_shards[0].data.shape == (cfg.num_layers, cfg.d_model, cfg.d_ff // 4)
    q = model.decoder.layers.attn.query.get_value()  # [layers, embed, heads, head_dim]
    assert q.addressable_shards[0].data.shape[2] == cfg.num_heads // 4


def lowered_size(num_layers: int, scan_unroll=1) -> int:
    cfg = dataclasses.replace(model_preset("llama_style", "tiny"), num_layers=num_layers, scan_unroll=scan_unroll)
    graphdef, params = nnx.split(nnx.eval_shape(lambda: build_model(cfg)))
    batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), make_batch(cfg, 2, 16))
    return len(jax.jit(grad_fn, static_argnums=0).lower(graphdef, params, batch).as_text())


def test_scan_keeps_program_size_flat_in_depth():
    """scan_unroll=1 (the TPU/GPU default) keeps the program flat in depth; the CPU default (None) unrolls
    every layer, so its program grows with depth."""
    two, twelve = lowered_size(2), lowered_size(12)
    assert abs(twelve - two) / two < 0.02, (two, twelve)
    assert lowered_size(12, scan_unroll=None) > 2 * lowered_size(2, scan_unroll=None)  # 2.5x measured


@pytest.mark.parametrize("name, seq, target", [("gpt2_small", 128, 0), ("bert_base", 128, 0),
                                               ("t5_v1_1_base", 128, 64), ("llama_style", 128, 0)])
def test_flops_formula_matches_xla_cost_analysis(name, seq, target):
    """XLA counts every op, including norms, softmax and the loss, which the formula leaves out. At
    d_model=256 these elementwise ops are a few percent of the matmul FLOPs, so we allow 6%.
    XLA's attention computes the full square, so compare without the causal halving.
    XLA's cost analysis counts a while-loop body once, whatever its trip count, so each scanned stack
    has one layer here; the formula is linear in depth by construction."""
    cfg = dataclasses.replace(model_preset(name, "tiny"), d_model=256, d_ff=1024, num_heads=4, vocab_size=2048,
                              num_layers=1, num_decoder_layers=1)
    if cfg.num_kv_heads:
        cfg = dataclasses.replace(cfg, num_kv_heads=2)
    graphdef, params = nnx.split(nnx.eval_shape(lambda: build_model(cfg)))
    batch = make_batch(cfg, 2, seq)
    if target:
        batch = {k: (v[:, :target] if k.startswith("decoder") or k == "targets" else v) for k, v in batch.items()}
    batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), batch)
    compiled = jax.jit(grad_fn, static_argnums=0).lower(graphdef, params, batch).compile()
    cost = compiled.cost_analysis()
    xla_flops = (cost[0] if isinstance(cost, list) else cost)["flops"]
    ours = 2 * training_flops(cfg, seq, target, causal_halving=False).per_sequence
    assert ours == pytest.approx(xla_flops, rel=0.06), (ours, xla_flops, ours / xla_flops)
