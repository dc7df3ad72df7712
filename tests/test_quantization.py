"""Quantization (t5like/quantization.py, through qwix): int8/int4 weight-only decoding and the int8 KV cache on a
model trained here, int8 training's forward against an independent fake-quant, bfloat16 Adam state, bad input."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from t5like import layers as L
from t5like import quantization
from t5like.config import Config, ModelConfig, OptimConfig, model_preset
from t5like.decoding import DecodeConfig, generate
from t5like.models import build_model
from t5like.optim import make_optimizer
from t5like.sharding import Sharder

VOCAB, SEQ = 64, 32
CFG = dataclasses.replace(model_preset("llama_style", "tiny"), vocab_size=VOCAB, max_len=64)  # RoPE, GQA, SwiGLU
# A Markov chain over tokens 2..VOCAB-1 whose likeliest successor has probability 0.6: a trained model has a clear
# but not certain argmax, so rounding errors could flip some of its greedy choices.
_rng = np.random.RandomState(0)
SUCCESSOR = _rng.permutation(np.arange(2, VOCAB))


def batches(n: int, batch: int = 16):
    rng = np.random.RandomState(1)
    for _ in range(n):
        x = np.zeros((batch, SEQ), np.int32)
        x[:, 0] = rng.randint(2, VOCAB, batch)
        for t in range(1, SEQ):
            follow = rng.rand(batch) < 0.6
            x[:, t] = np.where(follow, SUCCESSOR[x[:, t - 1] - 2], rng.randint(2, VOCAB, batch))
        yield {"inputs": jnp.asarray(x)}


def train(cfg: ModelConfig, steps: int):
    """`steps` of Adam on next-token cross-entropy; the model and each step's loss."""
    model = build_model(cfg, seed=0)
    graphdef, params = nnx.split(model)
    opt = optax.adam(3e-3)

    @jax.jit
    def step(params, opt_state, batch):
        def loss_fn(p):
            logits = nnx.merge(graphdef, p)(batch)[:, :-1]
            return optax.softmax_cross_entropy_with_integer_labels(logits, batch["inputs"][:, 1:]).mean()
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state, losses = opt.init(params), []
    for batch in batches(steps):
        params, opt_state, loss = step(params, opt_state, batch)
        losses.append(float(loss))
    return nnx.merge(graphdef, params), losses


@functools.lru_cache(maxsize=None)
def trained():
    return train(CFG, 100)[0]


PROMPTS = np.asarray(next(batches(1, batch=8))["inputs"])[:, :6]
LENGTHS = np.array([6, 4, 5, 3, 6, 2, 6, 1])
GREEDY = DecodeConfig(max_new_tokens=24, eos_id=-1)


def greedy(model):
    return np.asarray(generate(model, PROMPTS, LENGTHS, GREEDY)[0][:, 0])


def test_int8_weight_only_decoding_agrees_with_full_precision_and_saves_memory():
    model = trained()
    full = greedy(model)
    assert (full[:, 1:] == SUCCESSOR[full[:, :-1] - 2]).mean() > 0.9  # the model learned the chain
    q8 = quantization.quantize_for_decoding(model, weights="int8")
    assert (greedy(q8) == full).mean() >= 0.95

    # Every kernel is stored as int8 with a scale per output channel; the original model is untouched.
    state = nnx.to_flat_state(nnx.state(q8))
    names = {"query", "key", "value", "out", "wi", "wi_gate", "wo", "kernel"}  # every matrix in a layer
    kernels = {path: v for path, v in state if path[-1] in names}
    assert len(kernels) == 4 + 3 + (not CFG.tie_embeddings)  # attention's four, the gated MLP's three, a head
    assert kernels and all(v.get_value().qvalue.dtype == jnp.int8 for v in kernels.values())
    assert all(isinstance(v.get_value(), jax.Array) for path, v in nnx.to_flat_state(nnx.state(model)))
    report = quantization.memory_report(model, q8)
    float_kernel_bytes = sum(4 * np.prod(v.get_value().shape) for v in kernels.values())
    # int8 values are a quarter of float32; the per-channel scales cost a little of the rest.
    assert 0.70 * float_kernel_bytes < report["saved_bytes"] < 0.75 * float_kernel_bytes
    assert report["param_bytes"] - report["saved_bytes"] == quantization.weight_bytes(nnx.state(q8))


def test_int8_kv_cache_decodes_as_full_precision_in_fewer_bytes():
    model = trained()
    full = greedy(model)
    q = quantization.quantize_for_decoding(model, weights="int8", kv_cache="int8")
    assert (greedy(q) == full).mean() >= 0.95
    cache = lambda m: jax.eval_shape(lambda: m.init_cache(jnp.zeros(8, jnp.int32), 31)).self_kv
    H = CFG.dim_per_head  # each head-dim vector: H int8 values and one float32 scale, against H float32 values
    assert quantization.nbytes(cache(q)) / quantization.nbytes(cache(model)) == pytest.approx((H + 4) / (4 * H))
    # int4 weights: a quarter of int8's precision, still close on a trained model (no bar: reported only).
    assert (greedy(quantization.quantize_for_decoding(model, weights="int4")) == full).mean() > 0.5


def fake_quant(a: np.ndarray, contracted: tuple) -> np.ndarray:
    """Symmetric absmax int8 round trip with one scale per slice over the contracted axes, in numpy, by qwix's
    convention: the largest magnitude maps to 127.5 (the top bucket is [126.5, 127.5)), values round to the
    nearest even integer and are clipped to int8's [-128, 127]. Float32 arithmetic, as the operands'."""
    a = a.astype(np.float32)
    scale = np.abs(a).max(axis=contracted, keepdims=True) / np.float32(127.5)
    return np.clip(np.round(a / scale), -128, 127).astype(np.float64) * scale


def largest_positive(a: np.ndarray, contracted: int) -> np.ndarray:
    """`a` with each slice's sign flipped so that its largest magnitude is positive: that element sits on the
    rounding tie 127.5, which 1-ulp differences in the division send to 127 or 128, clipped to 127 either way
    (a negative one could become -127 or -128)."""
    top = np.take_along_axis(a, np.expand_dims(np.abs(a).argmax(contracted), contracted), axis=contracted)
    return a * np.sign(top)


def test_int8_training_forward_is_fake_quant_and_it_trains():
    cfg = dataclasses.replace(CFG, quant="int8", activation="relu")
    mlp = L.MLP(cfg, rngs=nnx.Rngs(0))
    for p in (mlp.wi, mlp.wo):  # kernels [in, out]: one scale per output column
        p.set_value(jnp.asarray(largest_positive(np.asarray(p[...]), 0)))
    x = largest_positive(np.asarray(jax.random.normal(jax.random.key(1), (2, 5, cfg.d_model))), 2)
    wi, wo = (np.asarray(p[...], np.float64) for p in (mlp.wi, mlp.wo))
    h = np.maximum(fake_quant(x, (2,)) @ fake_quant(wi, (0,)), 0)  # relu: h's largest is positive too
    expected = fake_quant(h, (2,)) @ fake_quant(wo, (0,))
    got = np.asarray(mlp(jnp.asarray(x, jnp.float32), Sharder()))
    plain = np.maximum(x.astype(np.float64) @ wi, 0) @ wo
    err = np.abs(expected - plain).max()
    assert err > 1e-3  # quantization changes the output visibly...
    np.testing.assert_allclose(got, expected, atol=err / 1000, rtol=0)  # ...and exactly as fake-quant says

    _, losses = train(dataclasses.replace(CFG, quant="int8"), 40)
    assert np.mean(losses[-5:]) < 0.8 * losses[0]


def test_bfloat16_optimizer_state_is_half_the_bytes_and_stays_bfloat16():
    params = nnx.state(build_model(CFG, seed=0), nnx.Param).to_pure_dict()
    sizes = {}
    for dtype in (None, "bfloat16"):
        opt, _ = make_optimizer(OptimConfig(state_dtype=dtype), 100)
        shapes = jax.eval_shape(opt.init, params)
        sizes[dtype] = sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(shapes)
                           if jnp.issubdtype(x.dtype, jnp.floating))
        if dtype:
            state = opt.init(params)
            grads = jax.tree.map(jnp.ones_like, params)
            _, state = jax.jit(opt.update)(grads, state, params)
            assert {x.dtype for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)} == {
                jnp.dtype(jnp.bfloat16)}
    param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    assert sizes[None] == 2 * param_bytes  # AdamW: two float32 moments per parameter
    assert sizes["bfloat16"] * 2 == sizes[None]


@pytest.mark.parametrize("change, words", [
    (lambda c: dataclasses.replace(c, model=dataclasses.replace(c.model, quant="int4")), ["model.quant", "int4"]),
    (lambda c: dataclasses.replace(c, optim=dataclasses.replace(c.optim, name="adafactor", state_dtype="bfloat16")),
     ["optim.state_dtype", "adafactor"]),
    (lambda c: dataclasses.replace(c, optim=dataclasses.replace(c.optim, state_dtype="int8")),
     ["optim.state_dtype", "int8"]),
])
def test_bad_quantization_settings_name_the_field(change, words):
    with pytest.raises(ValueError) as e:
        change(Config()).validate()
    assert all(w in str(e.value) for w in words)


def test_quantized_decoding_of_an_encoder_or_an_unknown_type_is_refused_before_any_work():
    encoder = build_model(model_preset("bert_base", "tiny"), seed=0)
    with pytest.raises(ValueError, match="model.family='encoder'"):
        quantization.quantize_for_decoding(encoder, weights="int8")
    with pytest.raises(ValueError, match="weights='fp8'"):
        quantization.quantize_for_decoding(build_model(CFG), weights="fp8")
    with pytest.raises(ValueError, match="kv_cache='int4'"):
        quantization.quantize_for_decoding(build_model(CFG), weights="none", kv_cache="int4")


class Chars:
    """One id per character, inside CFG's vocabulary."""
    vocab_size, eos_id = VOCAB, 1

    def encode(self, text):
        return [2 + ord(c) % (VOCAB - 2) for c in text]

    def decode(self, ids):
        return "".join(chr(96 + int(i) % 26) for i in ids if int(i) > 1)


def test_generate_cli_decodes_quantized_and_reports_the_memory_saved(monkeypatch, capsys, tmp_path):
    import t5like.inference
    from t5like import generate as gen
    from t5like.config import to_dict

    def workdir(family_cfg):
        path = tmp_path / family_cfg.family
        path.mkdir()
        (path / "config.json").write_text(__import__("json").dumps(to_dict(Config(model=family_cfg))))
        return str(path)

    # An encoder run is refused from its config.json, before its (absent) checkpoint would load.
    with pytest.raises(ValueError, match="model.family='encoder'"):
        gen.main(["--workdir", workdir(model_preset("bert_base", "tiny")), "--prompt", "x = 1",
                  "--quant-weights", "int8"])
    monkeypatch.setattr(t5like.inference, "load_for_inference",
                        lambda workdir: (Config(model=CFG), build_model(CFG, seed=0), Chars()))
    assert gen.main(["--workdir", workdir(CFG), "--prompt", "def f(x):", "--max-new-tokens", "4",
                     "--quant-weights", "int8", "--quant-kv-cache", "int8"]) == 0
    out = capsys.readouterr()
    assert out.out.count("=== prompt") == 1
    assert "quantized: weights int8, KV cache int8" in out.err and "saved" in out.err
