"""Layers and families: positions, masks, parameter counts, presets, bad configs."""
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from t5like import layers as L
from t5like.accounting import param_counts
from t5like.config import PRESETS, MeshConfig, ModelConfig, model_preset
from t5like.models import build_model
from t5like.sharding import DEFAULT_RULES, make_mesh, validate_rules

TINY = {name: model_preset(name, "tiny") for name in PRESETS}
# Jitted calls: eager NNX dispatches op by op, which is slow on CPU.
forward = nnx.jit(lambda model, batch: model(batch))


def batch_for(cfg: ModelConfig, ids: np.ndarray, **extra) -> dict:
    if cfg.family == "encoder_decoder":
        return {"encoder_inputs": ids, "decoder_inputs": ids, **extra}
    return {"inputs": ids, **extra}


# Positions ---------------------------------------------------------------------------------------

def test_sinusoidal_matches_closed_form():
    d, pos = 16, np.array([[0, 1, 5, 99]])
    pe = np.asarray(L.sinusoidal_positions(jnp.asarray(pos), d))
    for j, p in enumerate(pos[0]):
        for i in range(d // 2):
            assert pe[0, j, 2 * i] == pytest.approx(math.sin(p / 10000 ** (2 * i / d)), abs=1e-5)
            assert pe[0, j, 2 * i + 1] == pytest.approx(math.cos(p / 10000 ** (2 * i / d)), abs=1e-5)


@pytest.mark.parametrize("rel, bidirectional, expected", [
    # Worked by hand from T5's formula, 32 buckets, max distance 128.
    (0, True, 0), (-1, True, 1), (1, True, 17), (-7, True, 7), (-8, True, 8),
    (-20, True, 10), (-128, True, 15), (-1000, True, 15), (20, True, 26),
    (0, False, 0), (5, False, 0), (-15, False, 15), (-20, False, 17), (-1000, False, 31),
])
def test_relative_position_buckets_match_t5(rel, bidirectional, expected):
    got = L.relative_position_bucket(jnp.asarray([rel]), bidirectional, 32, 128)
    assert int(got[0]) == expected


def test_rope_rotates_by_relative_offset():
    # <rope(q, m), rope(k, n)> depends only on m - n.
    q = jax.random.normal(jax.random.key(0), (1, 1, 1, 8))
    k = jax.random.normal(jax.random.key(1), (1, 1, 1, 8))
    dot = lambda m, n: float(jnp.sum(L.apply_rope(q, jnp.array([[m]]), 1e4) * L.apply_rope(k, jnp.array([[n]]), 1e4)))
    assert dot(7, 3) == pytest.approx(dot(14, 10), rel=1e-4)
    assert dot(7, 3) != pytest.approx(dot(7, 4), rel=1e-3)


# Masks -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["gpt2_small", "llama_style"])
def test_causal_decoder_ignores_future_tokens(name):
    cfg = TINY[name]
    model = build_model(cfg)
    ids = np.random.RandomState(0).randint(3, cfg.vocab_size, (2, 12))
    changed = ids.copy()
    changed[:, 7:] = np.random.RandomState(1).randint(3, cfg.vocab_size, (2, 5))
    a, b = forward(model, batch_for(cfg, ids)), forward(model, batch_for(cfg, changed))
    np.testing.assert_allclose(a[:, :7], b[:, :7], atol=1e-5)
    assert not np.allclose(a[:, 7:], b[:, 7:], atol=1e-3)


@pytest.mark.parametrize("name", ["gpt2_small", "bert_base", "t5_v1_1_base", "llama_style"])
def test_packed_segments_do_not_interact(name):
    cfg = TINY[name]
    model = build_model(cfg)
    rng = np.random.RandomState(0)
    ids = rng.randint(3, cfg.vocab_size, (1, 12))
    seg = np.array([[1] * 5 + [2] * 7])
    pos = np.array([list(range(5)) + list(range(7))])
    changed = ids.copy()
    changed[:, 5:] = rng.randint(3, cfg.vocab_size, (1, 7))  # rewrite segment 2 only
    if cfg.family == "encoder_decoder":
        extra = dict(encoder_segment_ids=seg, encoder_positions=pos, decoder_segment_ids=seg, decoder_positions=pos)
    else:
        extra = dict(segment_ids=seg, positions=pos)
    a, b = forward(model, batch_for(cfg, ids, **extra)), forward(model, batch_for(cfg, changed, **extra))
    np.testing.assert_allclose(a[:, :5], b[:, :5], atol=1e-5)
    # The first segment alone gives the same output as inside the packed row.
    alone = forward(model, batch_for(cfg, ids[:, :5]))
    np.testing.assert_allclose(a[:, :5], alone, atol=1e-4)


def test_prefix_lm_is_bidirectional_inside_the_prefix():
    cfg = TINY["llama_style"]
    model = build_model(cfg)
    ids = np.random.RandomState(0).randint(3, cfg.vocab_size, (1, 10))
    prefix = np.array([[1] * 4 + [0] * 6])
    changed = ids.copy()
    changed[0, 3] = (ids[0, 3] + 1) % cfg.vocab_size  # last prefix token
    a, b = forward(model, {"inputs": ids, "prefix": prefix}), forward(model, {"inputs": changed, "prefix": prefix})
    assert not np.allclose(a[:, 0], b[:, 0], atol=1e-4)  # position 0 sees position 3
    c = ids.copy()
    c[0, 6] = (ids[0, 6] + 1) % cfg.vocab_size  # a token after the prefix stays causal
    np.testing.assert_allclose(forward(model, {"inputs": ids, "prefix": prefix})[:, :6],
                               forward(model, {"inputs": c, "prefix": prefix})[:, :6], atol=1e-5)


def test_attention_mask_shapes_and_values():
    seg = jnp.array([[1, 1, 2, 0]])
    m = np.asarray(L.attention_mask(seg, seg, causal=True).dense())[0, 0]
    expected = np.array([[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], bool)
    np.testing.assert_array_equal(m, expected)


# Families, counts and dtypes -----------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(PRESETS))
def test_param_counts_match_the_model(name):
    for cfg in (TINY[name], dataclasses.replace(TINY[name], tie_embeddings=not TINY[name].tie_embeddings)):
        model = build_model(cfg)
        actual = sum(v.size for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
        counts = param_counts(cfg)
        assert counts["total"] == actual
        assert 0 < counts["non_embedding"] < counts["total"]


def test_full_size_presets_have_published_sizes():
    # Published sizes, as each paper rounds them.
    assert param_counts(PRESETS["gpt2_small"])["total"] == pytest.approx(124e6, rel=0.01)
    assert param_counts(PRESETS["bert_base"])["total"] == pytest.approx(110e6, rel=0.02)
    assert param_counts(PRESETS["t5_v1_1_base"])["total"] == pytest.approx(248e6, rel=0.02)


def test_encoder_classification_head():
    cfg = dataclasses.replace(TINY["bert_base"], num_classes=3)
    model = build_model(cfg)
    logits = model.classify({"inputs": np.ones((2, 8), np.int32)})
    assert logits.shape == (2, 3)
    with pytest.raises(ValueError, match="num_classes"):
        build_model(TINY["bert_base"]).classify({"inputs": np.ones((2, 8), np.int32)})


def test_bf16_compute_with_fp32_params():
    cfg = dataclasses.replace(TINY["llama_style"], dtype="bfloat16", param_dtype="float32")
    model = build_model(cfg)
    params = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert all(p.dtype == jnp.float32 for p in params)
    ids = np.random.RandomState(0).randint(3, cfg.vocab_size, (2, 8))
    logits = forward(model, {"inputs": ids})
    ref = forward(build_model(TINY["llama_style"]), {"inputs": ids})
    assert logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits)))
    np.testing.assert_allclose(logits, ref, atol=0.1)  # same weights, bf16 rounding only

    def loss(m):
        return m({"inputs": ids}).mean()
    grads = nnx.jit(nnx.grad(loss))(model)
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))


def test_remat_and_scan_give_same_gradients():
    """One reference (no remat; layers unrolled, the CPU default) against remat=minimal through the scanned
    loop (scan_unroll=1, the TPU/GPU default) and remat=full: all three give the same gradients."""
    ids = np.random.RandomState(0).randint(3, 2048, (2, 8))
    grads = {}
    for name, change in (("none", dict(remat="none")), ("minimal_scan", dict(remat="minimal", scan_unroll=1)),
                         ("full", dict(remat="full"))):
        model = build_model(dataclasses.replace(TINY["t5_v1_1_base"], **change))
        grads[name] = nnx.jit(nnx.grad(lambda m: m({"encoder_inputs": ids, "decoder_inputs": ids}).std()))(model)
    for other in ("minimal_scan", "full"):
        for a, b in zip(jax.tree.leaves(grads["none"]), jax.tree.leaves(grads[other])):
            np.testing.assert_allclose(a, b, atol=1e-6)


# Bad configs: a ValueError naming the field and value, before anything is built --------------------

@pytest.mark.parametrize("change, words", [
    (dict(d_model=130, num_heads=4), ["num_heads=4", "d_model=130"]),
    (dict(num_heads=4, num_kv_heads=3), ["num_kv_heads=3", "num_heads=4"]),
    (dict(activation="tanh"), ["model.activation", "'tanh'"]),
    (dict(position="alibi"), ["model.position", "'alibi'"]),
    (dict(family="gpt"), ["model.family", "'gpt'"]),
])
def test_bad_model_configs(change, words):
    with pytest.raises(ValueError) as e:
        build_model(dataclasses.replace(ModelConfig(), **change))
    for w in words:
        assert w in str(e.value)


def test_bad_mesh_and_rules():
    with pytest.raises(ValueError, match=r"has 12 devices but 8"):
        make_mesh(MeshConfig(data=3, fsdp=4, tensor=1))
    with pytest.raises(ValueError, match="do not divide"):
        make_mesh(MeshConfig(data=-1, fsdp=3))
    with pytest.raises(ValueError, match="'model'.*does not exist"):
        validate_rules(DEFAULT_RULES + (("mlp", "model"),))
    with pytest.raises(ValueError, match="does not exist"):
        make_mesh(MeshConfig(rules=(("batch", ("data", "pipeline")),)))
    assert make_mesh(MeshConfig(data=2, fsdp=-1, tensor=2)).shape == {"data": 2, "fsdp": 2, "context": 1, "tensor": 2}


def test_bert_preset_learns_from_context():
    """Each token repeats its left neighbour, so masked tokens are predictable from context only.
    Regression: post-norm BERT without its embedding LayerNorm started with near-zero activations and
    never learned to use attention."""
    import optax
    from t5like.optim import cross_entropy, mean_metrics
    cfg = dataclasses.replace(TINY["bert_base"], vocab_size=64, dropout=0.0)
    graphdef, params = nnx.split(build_model(cfg))
    params = params.to_pure_dict()
    opt = optax.adam(1e-3)
    opt_state = opt.init(params)
    rng = np.random.RandomState(0)

    @functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 2})  # step-bound: not -O0
    def step(params, opt_state, batch):
        def loss(p):
            objective, sums = cross_entropy(nnx.merge(graphdef, p)(batch), batch["targets"], batch["weights"])
            return objective / jnp.maximum(sums["weight"], 1.0), mean_metrics(sums)
        (_, metrics), grads = jax.value_and_grad(loss, has_aux=True)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, metrics

    for _ in range(250):
        tokens = np.repeat(rng.randint(3, 60, (32, 16)), 2, axis=1)
        selected = rng.rand(32, 32) < 0.15
        batch = dict(inputs=np.where(selected, 63, tokens), targets=tokens, weights=selected.astype(np.float32))
        params, opt_state, metrics = step(params, opt_state, batch)
    assert float(metrics["accuracy"]) > 0.6  # a context-free model gets ~1/57


def test_write_gradient_once_is_the_identity_with_the_same_gradient():
    """Unrolled stacks on CPU pass each layer's input through it (a fusion boundary for XLA in the backward)."""
    from t5like.models import write_gradient_once
    x = jnp.asarray(np.random.RandomState(0).randn(2, 3, 4).astype(np.float32))
    loss = lambda x: (jnp.sin(x) ** 2 * jnp.arange(4.0)).sum()  # noqa: E731
    np.testing.assert_array_equal(jax.jit(write_gradient_once)(x), x)
    np.testing.assert_array_equal(jax.jit(jax.grad(lambda x: loss(write_gradient_once(x))))(x),
                                  jax.jit(jax.grad(loss))(x))
    # A gradient that is not a number stays one: the boundary's other branch returns NaN everywhere.
    nan_at_first = jax.grad(lambda x: (write_gradient_once(x) * jnp.where(x == x[0, 0, 0], jnp.nan, 1.0)).sum())(x)
    assert np.isnan(np.asarray(nan_at_first)).all()
