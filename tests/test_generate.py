"""Decoding: KV-cache parity, strategies, per-row stopping, sharded parity, bad inputs, the text API and CLI."""
import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from t5like import decoding, generate as gen
from t5like.config import MeshConfig, model_preset
from t5like.decoding import DecodeConfig, beam_search, generate, length_penalty, sample_search
from t5like.models import build_model, create_sharded
from t5like.sharding import Sharder, make_mesh

T_NEW = 8
# Right-padded prompts of different lengths, one of a single token.
PROMPTS = np.random.RandomState(0).randint(3, 2048, (4, 7)).astype(np.int32)
LENGTHS = np.array([7, 3, 5, 1])
PROMPTS[np.arange(7)[None, :] >= LENGTHS[:, None]] = 0

DEC = model_preset("llama_style", "tiny")           # RoPE, GQA (2 kv heads), RMSNorm, SwiGLU
ENCDEC = model_preset("t5_v1_1_base", "tiny")       # T5 relative bias, untied output


@functools.lru_cache(maxsize=None)
def model_for(cfg):
    return build_model(cfg, seed=0)


def run(cfg, decode_cfg, prompts=PROMPTS, lengths=LENGTHS, seed=0):
    return generate(model_for(cfg), prompts, lengths, decode_cfg, rng=seed)


# KV cache == full forward ----------------------------------------------------------------------------

CACHE_CASES = {
    "decoder-rope-gqa": DEC,
    "decoder-learned-layernorm-bias": model_preset("gpt2_small", "tiny"),
    "decoder-relative": dataclasses.replace(DEC, position="relative"),
    "decoder-prefix-lm": DEC,
    "encdec-relative": ENCDEC,
    "encdec-rope-gqa": dataclasses.replace(ENCDEC, position="rope", num_kv_heads=2),
    "encdec-sinusoidal-postnorm": model_preset("transformer_base", "tiny"),
}


@functools.partial(jax.jit, static_argnums=(0, 3, 5))
def cached_logits(graphdef, state, inputs, cache_len, steps_BN, prefix=False):
    """Prefill, then teacher-force `steps_BN` one token at a time through the cache; logits of every step."""
    model = nnx.merge(graphdef, state)
    if model.cfg.family == "decoder":
        cache = model.init_cache(inputs["start"], cache_len)
        prefill_BPV, cache = model.decode_step(inputs["tokens"], cache, prefix=prefix)
    else:
        cache = model.init_cache(inputs["encoder_inputs"], inputs["encoder_segment_ids"], cache_len)
        prefill_BPV, cache = model.decode_step(jnp.zeros((steps_BN.shape[0], 1), jnp.int32), cache)

    def step(cache, token_B):
        logits_B1V, cache = model.decode_step(token_B[:, None], cache)
        return cache, logits_B1V[:, 0]

    _, logits_NBV = jax.lax.scan(step, cache, steps_BN.T)
    return prefill_BPV, logits_NBV.transpose(1, 0, 2)


@pytest.mark.parametrize("case", sorted(CACHE_CASES))
def test_kv_cache_matches_full_forward_at_every_step(case):
    """The causal full forward's logits at position t are those of a forward over the first t+1 tokens
    (tests/test_models.py checks causality), so one forward covers every step of the growing sequence."""
    cfg = CACHE_CASES[case]
    model = model_for(cfg)
    B, P, N = PROMPTS.shape[0], PROMPTS.shape[1], 30  # enough steps to cross cache_read_lengths
    steps = np.random.RandomState(1).randint(3, cfg.vocab_size, (B, N)).astype(np.int32)
    inputs = decoding.model_inputs(cfg.family, PROMPTS, LENGTHS)
    graphdef, state = nnx.split(model)
    prefix = case == "decoder-prefix-lm"
    cache_len = (P + 1 if cfg.family == "decoder" else 1) + N
    prefill, step_logits = map(np.asarray, cached_logits(graphdef, state, inputs, cache_len, steps, prefix))
    if cfg.family == "decoder":
        # Reference rows: [0, prompt, steps], right-padded into one batch with segment ids. A prefix-LM
        # prefix is BOS and the prompt but its last token (whose output predicts the first new token).
        full = np.zeros((B, P + 1 + N), np.int32)
        seg, prefix_ids = np.zeros_like(full), np.zeros_like(full)
        for b, n in enumerate(LENGTHS):
            full[b, 1:n + 1], full[b, n + 1:n + 1 + N] = PROMPTS[b, :n], steps[b]
            seg[b, :n + 1 + N] = 1
            prefix_ids[b, :n] = prefix
        batch = {"inputs": full, "segment_ids": seg, **({"prefix": prefix_ids} if prefix else {})}
        ref = np.asarray(jax.jit(lambda m, x: m(x))(model, batch))
        for b, n in enumerate(LENGTHS):
            np.testing.assert_allclose(prefill[b, P - n:], ref[b, :n + 1], atol=1e-5, rtol=0, err_msg=f"row {b}")
            np.testing.assert_allclose(step_logits[b], ref[b, n + 1:n + 1 + N], atol=1e-5, rtol=0, err_msg=f"row {b}")
    else:
        batch = dict(inputs, decoder_inputs=np.concatenate([np.zeros((B, 1), np.int32), steps], 1))
        ref = np.asarray(jax.jit(lambda m, x: m(x))(model, batch))
        np.testing.assert_allclose(prefill[:, 0], ref[:, 0], atol=1e-5, rtol=0)
        np.testing.assert_allclose(step_logits, ref[:, 1:], atol=1e-5, rtol=0)
    assert np.abs(ref).max() > 0.1  # a real comparison, not two arrays of zeros


# Greedy == beam(1) == top-k 1 == temperature -> 0 -------------------------------------------------------

@pytest.mark.parametrize("other", [
    DecodeConfig("beam", max_new_tokens=T_NEW, num_beams=1, length_penalty=0.0),
    DecodeConfig("sample", max_new_tokens=T_NEW, top_k=1),
    DecodeConfig("sample", max_new_tokens=T_NEW, temperature=1e-6),
], ids=["beam1", "top_k1", "temperature1e-6"])
def test_greedy_equals_degenerate_beam_and_sampling(other):
    greedy_tokens, greedy_scores = run(DEC, DecodeConfig(max_new_tokens=T_NEW))
    tokens, scores = run(DEC, other, seed=3)
    np.testing.assert_array_equal(tokens, greedy_tokens)
    np.testing.assert_allclose(scores, greedy_scores, atol=1e-4)  # alpha=0: beam's score is the log-prob too


def test_greedy_equals_one_beam_encoder_decoder():
    greedy, _ = run(ENCDEC, DecodeConfig(max_new_tokens=T_NEW))
    beam, _ = run(ENCDEC, DecodeConfig("beam", max_new_tokens=T_NEW, num_beams=1, length_penalty=0.0))
    np.testing.assert_array_equal(beam, greedy)


# Beam search ---------------------------------------------------------------------------------------------

V_TOY = 5  # 0 pad (never likely), 1 EOS, 2..4 words
# Markov chain: next-token log-probs given the previous token (row) and the first step's distribution.
FIRST = np.log([1e-9, 1e-9, 0.45, 0.35, 0.2])
CHAIN = np.log(np.array([
    [1e-9, 0.2, 0.3, 0.3, 0.2],
    [1e-9, 0.2, 0.3, 0.3, 0.2],
    [1e-9, 0.3, 0.25, 0.25, 0.2],   # after 2 the mass spreads: greedy's 2 is a trap
    [1e-9, 0.9, 0.04, 0.03, 0.03],  # after 3 the sequence almost surely ends
    [1e-9, 0.02, 0.01, 0.02, 0.95],  # after 4 come more 4s: long, likely, rewarded by a length penalty
]))


def toy_logits_fn(state, tokens_B, step):
    return jnp.asarray(CHAIN, jnp.float32)[tokens_B], state


def toy_logp(seq):
    return FIRST[seq[0]] + sum(CHAIN[a, b] for a, b in zip(seq, seq[1:]))


def brute_force_best(T, alpha):
    """Every sequence beam search may return (ending in EOS at length <= T, or running to T), best first."""
    words = range(2, V_TOY)
    seqs = [w + (1,) for n in range(T) for w in itertools.product(words, repeat=n)]
    seqs += list(itertools.product(words, repeat=T))
    return sorted(((toy_logp(s) / ((5 + len(s)) / 6) ** alpha, s) for s in seqs), reverse=True)


def toy_search(cfg):
    first = jnp.asarray(FIRST, jnp.float32)[None]
    if cfg.strategy == "beam":
        return map(np.asarray, jax.jit(beam_search, static_argnums=(0, 3))(toy_logits_fn, None, first, cfg))
    return map(np.asarray, jax.jit(sample_search, static_argnums=(0, 3))(toy_logits_fn, None, first, cfg,
                                                                       jax.random.key(0)))


def as_sequence(tokens):
    toks = [int(t) for t in tokens]
    return tuple(toks[:toks.index(1) + 1]) if 1 in toks else tuple(toks)


@pytest.mark.parametrize("alpha", [0.0, 2.0])
def test_beam_search_finds_the_best_sequence_where_greedy_does_not(alpha):
    T = 4
    (best_score, best_seq), *_ = brute_force_best(T, alpha)
    greedy_tokens, _ = toy_search(DecodeConfig(max_new_tokens=T))
    assert as_sequence(greedy_tokens[0, 0]) != best_seq  # the toy is a real trap for greedy
    tokens, scores = toy_search(DecodeConfig("beam", max_new_tokens=T, num_beams=3, num_return=3, length_penalty=alpha))
    assert as_sequence(tokens[0, 0]) == best_seq
    assert scores[0, 0] == pytest.approx(best_score, abs=1e-4)
    # Returned beams are distinct, best first, and each score is its sequence's penalised log-prob.
    assert len({as_sequence(t) for t in tokens[0]}) == 3 and np.all(np.diff(scores[0]) <= 0)
    for toks, score in zip(tokens[0], scores[0]):
        seq = as_sequence(toks)
        assert score == pytest.approx(toy_logp(seq) / ((5 + len(seq)) / 6) ** alpha, abs=1e-4)
    if alpha == 0.0:
        assert best_seq == (3, 1)
    else:  # a strong length penalty prefers the long run of 4s to the short (3, EOS)
        assert best_seq == (4, 4, 4, 4)


def test_beams_never_score_below_greedy_on_a_model():
    alpha = 0.6
    greedy_tokens, greedy_logp = run(DEC, DecodeConfig(max_new_tokens=T_NEW))
    tokens, scores = run(DEC, DecodeConfig("beam", max_new_tokens=T_NEW, num_beams=4, num_return=2,
                                           length_penalty=alpha))
    for b in range(len(LENGTHS)):
        greedy_score = greedy_logp[b, 0] / float(length_penalty(len(as_sequence(greedy_tokens[b, 0])), alpha))
        assert scores[b, 0] >= greedy_score - 1e-4
        assert scores[b, 0] >= scores[b, 1]
    assert not np.array_equal(tokens[:, 0], greedy_tokens[:, 0])  # beams explored something greedy did not


# Sampling ------------------------------------------------------------------------------------------------

def nucleus(logits, temperature, top_k, top_p):
    """The tokens sampling may emit, worked in float64 numpy: temperature, then top-k, then top-p."""
    z = logits / temperature
    order = np.argsort(-z)
    keep = order[:top_k] if top_k else order
    p = np.exp(z[keep] - z[keep].max())
    p /= p.sum()
    before = np.cumsum(p) - p
    return set(keep[before < top_p].tolist()), dict(zip(keep[before < top_p].tolist(), p[before < top_p]))


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, None, 0.7), (0.7, 4, 0.8), (1.0, 3, 1.0)])
def test_sampling_stays_inside_the_nucleus(temperature, top_k, top_p):
    V, T, B = 12, 3, 3000
    table = np.random.RandomState(0).normal(0, 1.5, (T, V)).astype(np.float32)

    def logits_fn(state, tokens_B, step):
        return jnp.broadcast_to(jnp.asarray(table)[jnp.minimum(step, T - 1)], (tokens_B.shape[0], V)), state

    cfg = DecodeConfig("sample", max_new_tokens=T, temperature=temperature, top_k=top_k, top_p=top_p, eos_id=-1)
    first = jnp.broadcast_to(jnp.asarray(table[0]), (B, V))
    tokens, _ = jax.jit(sample_search, static_argnums=(0, 3))(logits_fn, None, first, cfg, jax.random.key(0))
    tokens = np.asarray(tokens)[:, 0]
    for t in range(T):
        allowed, probs = nucleus(table[t].astype(np.float64), temperature, top_k, top_p)
        drawn = set(tokens[:, t].tolist())
        assert drawn <= allowed, (t, drawn - allowed)
        assert drawn == allowed  # and the whole nucleus is reachable
        total = sum(probs.values())
        for tok, p in probs.items():  # frequencies follow the renormalised nucleus
            assert np.mean(tokens[:, t] == tok) == pytest.approx(p / total, abs=0.04)


def test_model_sampling_stays_inside_each_steps_nucleus_and_is_seeded():
    top_p = 0.5
    cfg = DecodeConfig("sample", max_new_tokens=T_NEW, top_p=top_p, eos_id=-1)
    prompts = np.random.RandomState(2).randint(3, 2048, (4, 3)).astype(np.int32)
    lengths = np.full(4, 3)  # equal lengths: the reference is one plain forward
    tokens, _ = run(DEC, cfg, prompts, lengths, seed=7)
    again, _ = run(DEC, cfg, prompts, lengths, seed=7)
    other, _ = run(DEC, cfg, prompts, lengths, seed=8)
    np.testing.assert_array_equal(tokens, again)
    assert not np.array_equal(tokens, other)
    seq = np.concatenate([np.zeros((4, 1), np.int32), prompts, tokens[:, 0]], axis=1)
    logits = np.asarray(jax.jit(lambda m, x: m(x))(model_for(DEC), {"inputs": seq[:, :-1]}), np.float64)
    sizes = []
    for b in range(4):
        for t in range(T_NEW):
            allowed, _ = nucleus(logits[b, 3 + t], 1.0, None, top_p)
            assert tokens[b, 0, t] in allowed
            sizes.append(len(allowed))
    assert max(sizes) > 1  # the nucleus was not just the argmax


# Batches: variable lengths, per-row EOS, early stop --------------------------------------------------------

@pytest.mark.parametrize("cfg, decode_cfg", [
    (DEC, DecodeConfig(max_new_tokens=T_NEW)),
    (DEC, DecodeConfig("beam", max_new_tokens=T_NEW, num_beams=4, num_return=2, length_penalty=0.6)),
    (ENCDEC, DecodeConfig(max_new_tokens=T_NEW)),
], ids=["decoder-greedy", "decoder-beam", "encdec-greedy"])
def test_variable_length_batch_matches_each_prompt_alone(cfg, decode_cfg):
    tokens, scores = run(cfg, decode_cfg)
    for b in range(len(LENGTHS)):
        alone, alone_scores = run(cfg, decode_cfg, PROMPTS[b:b + 1], LENGTHS[b:b + 1])
        np.testing.assert_array_equal(tokens[b], alone[0], err_msg=f"row {b}")
        np.testing.assert_allclose(scores[b], alone_scores[0], atol=1e-4)


def test_each_row_stops_at_its_own_eos():
    free, _ = run(DEC, DecodeConfig(max_new_tokens=T_NEW))
    free = free[:, 0]
    assert 1 not in free  # the real EOS never came, so these rows ran free
    # Pretend the token row 0 emits at step 3 is EOS: row 0 must stop there, other rows at their own first
    # occurrence of it (or never), and every token after a row's EOS is padding.
    eos = next(int(t) for t in free[0, 3:] if t not in free[0, :3].tolist() and t != 0)
    tokens, _ = run(DEC, DecodeConfig(max_new_tokens=T_NEW, eos_id=eos))
    stops = []
    for b in range(len(LENGTHS)):
        row = free[b].tolist()
        stop = row.index(eos) + 1 if eos in row else T_NEW
        stops.append(stop)
        np.testing.assert_array_equal(tokens[b, 0, :stop], free[b, :stop])
        assert not tokens[b, 0, stop:].any()
    assert stops[0] < T_NEW and len(set(stops)) > 1


def test_loop_stops_when_every_row_is_done():
    calls = []

    def logits_fn(state, tokens_B, step):
        jax.debug.callback(lambda s: calls.append(int(s)), step)
        # Row b says word 2 until step b + 1, then EOS.
        eos_now = jnp.arange(tokens_B.shape[0]) + 1 == step
        return jnp.where(eos_now[:, None], jnp.eye(V_TOY)[1], jnp.eye(V_TOY)[2]) * 10.0, state

    first = jnp.tile(jnp.eye(V_TOY)[2] * 10.0, (3, 1))
    tokens, _ = jax.jit(sample_search, static_argnums=(0, 3))(logits_fn, None, first,
                                                              DecodeConfig(max_new_tokens=20), jax.random.key(0))
    tokens = np.asarray(tokens)[:, 0]
    for b in range(3):
        np.testing.assert_array_equal(tokens[b], [2] * (b + 1) + [1] + [0] * (20 - b - 2))
    assert len(calls) == 4  # row 2 ends at step 3, not max_new_tokens=20


# Mesh ------------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def sharded_model_for(cfg):
    return create_sharded(cfg, Sharder(make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))), seed=0)


# 24 new tokens: the cache is read at more than one of cache_read_lengths.
@pytest.mark.parametrize("cfg, decode_cfg", [
    (DEC, DecodeConfig("beam", max_new_tokens=24, num_beams=4, num_return=2, length_penalty=0.6)),
    (ENCDEC, DecodeConfig(max_new_tokens=24)),
], ids=["decoder-beam", "encdec-greedy"])
def test_mesh_decoding_matches_single_device(cfg, decode_cfg):
    """8 devices: batch over data x fsdp = 4, heads over tensor = 2 (GQA's 2 kv heads: one per device)."""
    ref_tokens, ref_scores = run(cfg, decode_cfg)
    model = sharded_model_for(cfg)
    tokens, scores = generate(model, PROMPTS, LENGTHS, decode_cfg, rng=0)
    np.testing.assert_array_equal(tokens, ref_tokens)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-4)


def test_mesh_cache_is_sharded_by_logical_names():
    model = sharded_model_for(DEC)
    inputs = decoding._on_mesh(model, decoding.model_inputs("decoder", PROMPTS, LENGTHS))
    graphdef, state = nnx.split(model)

    @jax.jit
    def prefill(state, inputs):
        m = nnx.merge(graphdef, state)
        return m.decode_step(inputs["tokens"], m.init_cache(inputs["start"], 16))[1]

    cache = prefill(state, inputs)
    k = cache.self_kv.k  # [layers, B, K, S, H]: batch over data+fsdp, kv heads over tensor
    assert k.sharding.spec == jax.sharding.PartitionSpec(None, ("data", "fsdp"), "tensor")
    assert k.addressable_shards[0].data.shape == (DEC.num_layers, 1, DEC.kv_heads // 2, 16, DEC.dim_per_head)


# Encoder-only: fill-mask ------------------------------------------------------------------------------------

def test_fill_mask_gives_the_models_top_k_at_each_position():
    cfg = model_preset("bert_base", "tiny")
    model = model_for(cfg)
    ids, lengths = PROMPTS.copy(), LENGTHS
    ids[0, 2] = ids[2, 4] = 2047  # the mask id (sentinel 0)
    top_ids, top_logp = decoding.fill_mask(model, ids, lengths, top_k=3)
    for b, pos in [(0, 2), (2, 4)]:
        x = np.concatenate([ids[b:b + 1, :lengths[b]], [[1]]], axis=1)  # EOS appended, as in training
        logits = np.asarray(nnx.jit(lambda m, x: m({"inputs": x}))(model, x))[0, pos]
        np.testing.assert_array_equal(top_ids[b, pos], np.argsort(-logits)[:3])
        probs = np.exp(logits - logits.max())
        np.testing.assert_allclose(np.exp(top_logp[b, pos]), np.sort(probs / probs.sum())[::-1][:3], rtol=1e-4)


# Text API and CLI --------------------------------------------------------------------------------------------

class CharTokenizer:
    """Stand-in for the SentencePiece tokenizer: one id per character."""
    vocab_size, eos_id, mask_id = 2048, 1, 2047

    def encode(self, text):
        return [3 + ord(c) for c in text]

    def sentinel_id(self, k):
        return self.vocab_size - 1 - k

    def decode(self, ids):
        return "".join(chr(i - 3) if 3 <= i < 1003 else f"<{i}>" for i in map(int, ids) if i > 1)


def test_generate_text_matches_token_level_generate():
    tok = CharTokenizer()
    assert gen.encode_prompt(tok, "a<extra_id_0>b<extra_id_3>") == [3 + ord("a"), 2047, 3 + ord("b"), 2044]
    prompts = ["def f(x):", "ab"]
    texts = gen.generate_text(model_for(DEC), tok, prompts, max_new_tokens=T_NEW)
    ids, lengths = gen._pad_batch([tok.encode(p) for p in prompts], 16, 2)
    tokens, _ = generate(model_for(DEC), ids, lengths, DecodeConfig(max_new_tokens=T_NEW))
    assert texts == [tok.decode(gen._strip(t[0], 1)) for t in tokens]
    assert all(texts)
    fills = gen.fill_mask_text(model_for(model_preset("bert_base", "tiny")), tok, ["a<mask>c <mask>"], top_k=4)
    assert len(fills) == 1 and len(fills[0]) == 2
    for cands in fills[0]:
        probs = [p for _, p in cands]
        assert len(cands) == 4 and all(0 < p <= 1 for p in probs) and probs == sorted(probs, reverse=True)


def test_cli_prints_one_block_per_prompt(monkeypatch, capsys, tmp_path):
    import t5like.inference

    @dataclasses.dataclass
    class RunConfig:
        model: object

    monkeypatch.setattr(t5like.inference, "load_for_inference",
                        lambda workdir: (RunConfig(DEC), model_for(DEC), CharTokenizer()))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('"def f(x):\\n    return"\n{"prompt": "import os"}\n')
    assert gen.main(["--workdir", str(tmp_path), "--prompts-file", str(prompts),
                     "--max-new-tokens", str(T_NEW)]) == 0
    out = capsys.readouterr().out
    assert out.count("=== prompt") == 2 and out.count("--- completion 0") == 2
    assert "def f(x):\n    return" in out and "import os" in out


# Bad input: a ValueError naming the field and value, before anything compiles ---------------------------------

@pytest.mark.parametrize("change, words", [
    (dict(top_p=0.0), ["top_p=0.0", "(0, 1]"]),
    (dict(top_p=1.5), ["top_p=1.5", "(0, 1]"]),
    (dict(top_k=0), ["top_k=0", ">= 1"]),
    (dict(top_k=-1), ["top_k=-1", ">= 1"]),
    (dict(num_beams=0), ["num_beams=0", ">= 1"]),
    (dict(temperature=-0.5), ["temperature=-0.5", ">= 0"]),
    (dict(num_return=3, num_beams=2), ["num_return=3", "num_beams=2"]),
    (dict(strategy="nucleus"), ["strategy='nucleus'"]),
    (dict(max_new_tokens=0), ["max_new_tokens=0"]),
])
def test_bad_decode_settings(change, words, monkeypatch):
    monkeypatch.setattr(decoding, "_generate_jit", None)  # calling it (compiling) would be a TypeError
    with pytest.raises(ValueError) as e:
        run(DEC, dataclasses.replace(DecodeConfig(), **change))
    for w in words:
        assert w in str(e.value)


def test_bad_prompts(monkeypatch):
    monkeypatch.setattr(decoding, "_generate_jit", None)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        run(DEC, DecodeConfig(), PROMPTS, np.array([7, 0, 5, 1]))
    too_long = np.ones((1, DEC.max_len), np.int32) * 5
    with pytest.raises(ValueError, match=r"prompt 0 has 256 tokens.*model.max_len=256.*at most 191"):
        run(DEC, DecodeConfig(max_new_tokens=64), too_long, [DEC.max_len])
    with pytest.raises(ValueError, match="prompt 0 has 256 tokens.*max_len=256"):
        run(ENCDEC, DecodeConfig(), too_long, [DEC.max_len])
    with pytest.raises(ValueError, match="prompt 1 .* empty"):
        gen.generate_text(model_for(DEC), CharTokenizer(), ["hello", ""])
    with pytest.raises(ValueError, match="family='encoder'"):
        run(model_preset("bert_base", "tiny"), DecodeConfig())


def test_cli_rejects_bad_flags_before_loading_and_a_workdir_without_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="top_p=2.0"):  # the workdir does not even exist: flags come first
        gen.main(["--workdir", str(tmp_path / "nope"), "--prompt", "x", "--strategy", "sample", "--top-p", "2"])
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        gen.main(["--workdir", str(tmp_path), "--prompt", "x"])


def test_bad_prompts_file_is_a_clean_error_naming_file_and_line(tmp_path):
    # Found before any checkpoint is read (the workdir does not exist); blank lines count in line numbers.
    path = tmp_path / "p.jsonl"
    cases = [('{"prompt": "a"}\n\n{"text": "b"}\n', ['p.jsonl: line 3 has no "prompt" field', "['text']"]),
             ('"a"\n{"prompt": "b"\n', ["p.jsonl: line 2 is not valid JSON"]),
             ('{"prompt": 5}\n', ["p.jsonl: line 1: the prompt is 5, not text"])]
    for text, words in cases:
        path.write_text(text)
        with pytest.raises(ValueError) as e:
            gen.main(["--workdir", str(tmp_path / "nope"), "--prompts-file", str(path)])
        for w in words:
            assert w in str(e.value), (text, str(e.value))
    import subprocess
    import sys
    path.write_text('{"text": "no prompt field"}\n')
    proc = subprocess.run([sys.executable, "-m", "t5like.generate", "--workdir", str(tmp_path / "nope"),
                           "--prompts-file", str(path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.startswith("error: "), proc.stderr
    assert "line 1 has no \"prompt\" field" in proc.stderr and "Traceback" not in proc.stderr


def test_max_new_tokens_beyond_max_len_is_blamed_not_the_prompt():
    with pytest.raises(ValueError) as e:
        decoding.check_prompt_lengths(np.array([5]), family="decoder", max_len=256,
                                      cfg=DecodeConfig(max_new_tokens=1000))
    msg = str(e.value)
    assert "max_new_tokens=1000 leaves no room for a prompt" in msg and "--max-new-tokens 254" in msg, msg
    assert "at most -" not in msg
    # a prompt that fits alone with room to spare is fine; one too long for the room left is named
    decoding.check_prompt_lengths(np.array([5]), family="decoder", max_len=256, cfg=DecodeConfig(max_new_tokens=250))
    with pytest.raises(ValueError, match=r"prompt 0 has 10 tokens.*at most 5 tokens"):
        decoding.check_prompt_lengths(np.array([10]), family="decoder", max_len=256,
                                      cfg=DecodeConfig(max_new_tokens=250))
