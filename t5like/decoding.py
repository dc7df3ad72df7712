"""Decoding: prefill once, then incremental steps against a preallocated KV cache, all in one jitted loop.

  generate(model, prompt_ids, prompt_lengths, DecodeConfig, rng) -> tokens [B, n, T], scores [B, n]
  fill_mask(model, ids, lengths, top_k)                          -> top ids and log-probs per position

Strategies: greedy; beam search with the GNMT/T5X length penalty ((5 + len) / 6) ** alpha; sampling
with temperature, top-k and top-p (nucleus), alone or combined. The search loops (`sample_search`,
`beam_search`) only see a `logits_fn(state, tokens_B, step) -> (logits_BV, state)`, so they run as
well on a hand-written distribution as on a model.

Conventions (those the training batches use):
  decoder-only     the model reads [0 (BOS), prompt...] and continues it. Prompts of different lengths are
                   left-padded, so every row writes the same cache slot at every step; each row's
                   positions count from its own first token. With prefix_lm (for models trained on the
                   prefix_lm objective) [BOS, prompt] but its last token is the bidirectional prefix, as
                   in training, where the first scored token's input is the one after the prefix.
  encoder-decoder  the encoder reads [prompt..., EOS] (right-padded); the decoder starts from token 0.
  Every row stops at its own EOS (then emits 0); the loop stops when every row has.
  The ids above are t5like's (BOS/decoder start = pad = 0, EOS = 1); DecodeConfig.start_id / eos_id set a
  checkpoint's own (t5like.generate takes them from the tokenizer): start_id=-1 reads no BOS (GPT-2).

With a sliding window (model.attention_window=W) shorter than a decode, the KV cache keeps W slots per layer, a
ring buffer (Attention.attend_ring): its memory and each step's attention stay O(W) however long the decode.

Decoding runs under the model's Sharder: cache and activations carry the training names
(batch over data/fsdp, kv heads over tensor). Bad settings raise ValueError before anything compiles.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from t5like.data.tokenizer import EOS_ID, PAD_ID  # t5like's own ids; imported checkpoints bring theirs

Array = jax.Array
STRATEGIES = ("greedy", "beam", "sample")
NEG_INF = -1e9  # finite, so that dead beams never turn scores into NaN

# (state, tokens_B, step) -> (next-token logits [B, V], state). `step` counts tokens generated so far.
LogitsFn = Callable[[Any, Array, Array], tuple[Array, Any]]


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    strategy: str = "greedy"
    max_new_tokens: int = 64
    num_beams: int = 4              # beam
    num_return: int = 1             # beam: how many of the best beams to return (<= num_beams)
    length_penalty: float = 0.6     # beam: alpha in ((5 + len) / 6) ** alpha; 0 ranks by log-probability
    temperature: float = 1.0        # sample: 0 is greedy
    top_k: Optional[int] = None     # sample: keep the k most likely tokens; None = off
    top_p: float = 1.0              # sample: keep the smallest set with probability >= p; 1 = off
    eos_id: Optional[int] = None    # None: the tokenizer's (text API), else t5like's 1; -1 never stops (benchmarks)
    start_id: Optional[int] = None  # decoder-only BOS / decoder start; None: the tokenizer's, else 0; -1: no BOS
    cache_len: int = 0              # cache slots; 0 = just enough (prompt + max_new_tokens)
    prefix_lm: bool = False         # decoder-only: prefill the prompt as a prefix-LM prefix (bidirectional)

    def validate(self) -> "DecodeConfig":
        """ValueError naming the field, the value and a fix (flag names are those of `python -m t5like.generate`)."""
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy={self.strategy!r} is not one of {list(STRATEGIES)}; pass --strategy "
                             "greedy, beam or sample.")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens!r} must be a positive integer; "
                             "pass e.g. --max-new-tokens 64.")
        if not isinstance(self.num_beams, int) or self.num_beams < 1:
            raise ValueError(f"num_beams={self.num_beams!r} must be an integer >= 1; pass e.g. --num-beams 4 "
                             "(1 beam is greedy search).")
        if not isinstance(self.num_return, int) or not 1 <= self.num_return <= self.num_beams:
            raise ValueError(f"num_return={self.num_return!r} must be in [1, num_beams={self.num_beams}]; "
                             "lower --num-return or raise --num-beams.")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0; pass --temperature 1.0 to sample "
                             "the model's distribution, lower to sharpen it (0 is greedy).")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise ValueError(f"top_k={self.top_k!r} must be an integer >= 1 (sample from the k most likely "
                             "tokens); pass e.g. --top-k 40, or leave it out to turn it off.")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]: nucleus sampling keeps the smallest set of "
                             "tokens whose probability reaches top_p; pass e.g. --top-p 0.9, or 1.0 to turn it off.")
        if self.eos_id is not None and self.eos_id < -1:
            raise ValueError(f"eos_id={self.eos_id} must be a token id, or -1 to never stop early.")
        if self.start_id is not None and self.start_id < -1:
            raise ValueError(f"start_id={self.start_id} must be a token id, or -1 to read no BOS (decoder-only).")
        if self.cache_len < 0:
            raise ValueError(f"cache_len={self.cache_len} must be >= 0 (0 = prompt + max_new_tokens).")
        return self

    def with_ids(self, eos_id: int, start_id: int) -> "DecodeConfig":
        """Fill the ids left as None (a tokenizer's, or t5like's defaults); explicit ones win."""
        return dataclasses.replace(self, eos_id=eos_id if self.eos_id is None else self.eos_id,
                                   start_id=start_id if self.start_id is None else self.start_id)


def check_prompt_lengths(lengths: np.ndarray, *, family: str, max_len: int, cfg: DecodeConfig) -> None:
    """Every prompt non-empty and, with its special token and the new tokens, inside model.max_len."""
    if family == "decoder" and 1 + 1 + cfg.max_new_tokens > max_len:  # BOS + at least one prompt token
        raise ValueError(f"max_new_tokens={cfg.max_new_tokens} leaves no room for a prompt: the decoder's "
                         f"model.max_len={max_len} holds BOS, the prompt and the new tokens; pass --max-new-tokens "
                         f"{max_len - 2} or less (fewer for longer prompts).")
    for i, n in enumerate(np.asarray(lengths).tolist()):
        if n < 1:
            raise ValueError(f"prompt {i} is empty (0 tokens); give every prompt at least one token.")
        bos = 0 if cfg.start_id == -1 else 1
        if family == "decoder" and n + bos + cfg.max_new_tokens > max_len:
            raise ValueError(
                f"prompt {i} has {n} tokens: with {bos} BOS token and max_new_tokens={cfg.max_new_tokens} it needs "
                f"{n + bos + cfg.max_new_tokens} positions, more than model.max_len={max_len}; shorten it to at most "
                f"{max_len - bos - cfg.max_new_tokens} tokens or lower --max-new-tokens.")
        if family in ("encoder_decoder", "encoder") and n + 1 > max_len:
            raise ValueError(f"prompt {i} has {n} tokens; with its EOS that is more than model.max_len={max_len}; "
                             f"shorten it to at most {max_len - 1} tokens.")
    if family == "encoder_decoder" and cfg.max_new_tokens + 1 > max_len:
        raise ValueError(f"max_new_tokens={cfg.max_new_tokens} does not fit the decoder's model.max_len={max_len}; "
                         f"pass --max-new-tokens {max_len - 1} or less.")


# Token choice -----------------------------------------------------------------------------------------

def filter_logits(logits_BV: Array, *, temperature: float, top_k: Optional[int], top_p: float) -> Array:
    """Tempered logits with everything outside the top-k and then outside the top-p nucleus set to -inf."""
    logits_BV = logits_BV.astype(jnp.float32) / temperature
    if top_k:
        kth_B1 = jax.lax.top_k(logits_BV, min(top_k, logits_BV.shape[-1]))[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
    if top_p < 1.0:
        sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
        probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
        # Keep a token while the mass before it is < p: the smallest prefix whose mass reaches p.
        keep_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV < top_p
        cutoff_B1 = jnp.take_along_axis(sorted_BV, keep_BV.sum(-1, keepdims=True) - 1, axis=-1)
        logits_BV = jnp.where(logits_BV < cutoff_B1, -jnp.inf, logits_BV)
    return logits_BV


def choose_tokens(logits_BV: Array, rng: Array, cfg: DecodeConfig) -> Array:
    if cfg.strategy == "greedy" or cfg.temperature == 0.0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    filtered_BV = filter_logits(logits_BV, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p)
    # One key per row, so a row's draw does not depend on how the batch is laid out.
    keys = jax.random.split(rng, logits_BV.shape[0])
    return jax.vmap(jax.random.categorical)(keys, filtered_BV).astype(jnp.int32)


def _at_step(tokens_BT: Array, step: Array, new_B: Array) -> Array:
    return jnp.where(jnp.arange(tokens_BT.shape[-1]) == step, new_B[..., None], tokens_BT)


# Searches ----------------------------------------------------------------------------------------------

def take_rows(state: Any, rows_B: Array) -> Any:
    """Default state reordering: every leaf has batch on axis 0."""
    return jax.tree.map(lambda x: jnp.take(x, rows_B, axis=0), state)


def sample_search(logits_fn: LogitsFn, state: Any, first_logits_BV: Array, cfg: DecodeConfig,
                  rng: Array) -> tuple[Array, Array]:
    """Greedy or sampled decoding -> tokens [B, 1, T] (0 after EOS) and their log-probability under the
    model [B, 1] (untempered, unfiltered)."""
    cfg = cfg.with_ids(EOS_ID, PAD_ID)
    B, T = first_logits_BV.shape[0], cfg.max_new_tokens

    def cond(carry):
        step, _, _, _, done_B, _ = carry
        return (step < T) & ~jnp.all(done_B)

    def body(carry):
        step, logits_BV, state, tokens_BT, done_B, logp_B = carry
        token_B = jnp.where(done_B, PAD_ID, choose_tokens(logits_BV, jax.random.fold_in(rng, step), cfg))
        token_logp_B = jnp.take_along_axis(jax.nn.log_softmax(logits_BV), token_B[:, None], axis=-1)[:, 0]
        logp_B = logp_B + jnp.where(done_B, 0.0, token_logp_B)
        tokens_BT = _at_step(tokens_BT, step, token_B)
        done_B = done_B | (token_B == cfg.eos_id)
        logits_BV, state = logits_fn(state, token_B, step + 1)
        return step + 1, logits_BV, state, tokens_BT, done_B, logp_B

    carry = (jnp.zeros((), jnp.int32), first_logits_BV.astype(jnp.float32), state, jnp.zeros((B, T), jnp.int32),
             jnp.zeros((B,), bool), jnp.zeros((B,), jnp.float32))
    _, _, _, tokens_BT, _, logp_B = jax.lax.while_loop(cond, body, carry)
    return tokens_BT[:, None], logp_B[:, None]


def length_penalty(length, alpha: float):
    """GNMT (Wu et al. 2016), as in T5X: a finished beam's score is log p / ((5 + len) / 6) ** alpha."""
    return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


def beam_search(logits_fn: LogitsFn, state: Any, first_logits_BV: Array, cfg: DecodeConfig,
                reorder: Callable[[Any, Array], Any] = take_rows) -> tuple[Array, Array]:
    """Beam search -> the best `cfg.num_return` beams [B, n, T] (0 after EOS) and their scores [B, n].

    Each step extends the K alive beams of a row by every token and keeps the 2K best candidates. A
    candidate ending in EOS is finished (score log p / penalty(len), len counting the EOS) if it ranks
    within the top K (as in HF transformers: with K = 1 this is exactly greedy); the K best others
    stay alive. A row is done when it has K finished beams and no alive beam can still beat the worst
    of them. Beams that reach max_new_tokens without EOS compete as they are, scored at that length.
    `state` has B rows; it is expanded to B*K (beam k of row b is row b*K + k) with `reorder`.
    """
    cfg = cfg.with_ids(EOS_ID, PAD_ID)
    B, V = first_logits_BV.shape
    K, T, alpha = cfg.num_beams, cfg.max_new_tokens, cfg.length_penalty
    C = 2 * K  # candidates per row and step: enough that K of them do not end in EOS
    row_offset_B1 = (jnp.arange(B, dtype=jnp.int32) * K)[:, None]
    state = reorder(state, jnp.repeat(jnp.arange(B, dtype=jnp.int32), K))
    lp = functools.partial(length_penalty, alpha=alpha)

    def cond(carry):
        step, done_B = carry[0], carry[-1]
        return (step < T) & ~jnp.all(done_B)

    def body(carry):
        step, logits_XV, state, alive_BKT, alive_logp_BK, fin_BKT, fin_score_BK, done_B = carry  # X = B*K
        cand_logp_BKV = alive_logp_BK[:, :, None] + jax.nn.log_softmax(logits_XV).reshape(B, K, V)
        top_logp_BC, top_idx_BC = jax.lax.top_k(cand_logp_BKV.reshape(B, K * V), min(C, K * V))
        parent_BC, token_BC = top_idx_BC // V, (top_idx_BC % V).astype(jnp.int32)
        cand_BCT = _at_step(jnp.take_along_axis(alive_BKT, parent_BC[:, :, None], axis=1), step, token_BC)
        is_eos_BC = token_BC == cfg.eos_id

        # Finished: EOS candidates ranked within the top K join the K best finished so far.
        rank_C = jnp.arange(top_logp_BC.shape[1])
        new_fin_BC = jnp.where(is_eos_BC & (rank_C < K), top_logp_BC / lp(step + 1), NEG_INF)
        fin_score_BK, idx = jax.lax.top_k(jnp.concatenate([fin_score_BK, new_fin_BC], axis=1), K)
        fin_BKT = jnp.take_along_axis(jnp.concatenate([fin_BKT, cand_BCT], axis=1), idx[:, :, None], axis=1)

        # Alive: the K best candidates that did not end.
        alive_logp_BK, idx = jax.lax.top_k(jnp.where(is_eos_BC, NEG_INF, top_logp_BC), K)
        alive_BKT = jnp.take_along_axis(cand_BCT, idx[:, :, None], axis=1)
        parent_BK = jnp.take_along_axis(parent_BC, idx, axis=1)
        token_BK = jnp.take_along_axis(token_BC, idx, axis=1)
        state = reorder(state, (row_offset_B1 + parent_BK).reshape(-1))
        logits_XV, state = logits_fn(state, token_BK.reshape(-1), step + 1)

        # The best any alive beam can still score: log p only falls, the penalty is monotone in length.
        bound_B = alive_logp_BK[:, 0] / jnp.maximum(lp(step + 2), lp(T))
        worst_fin_B = fin_score_BK[:, -1]
        done_B = done_B | ((worst_fin_B > NEG_INF / 2) & (worst_fin_B >= bound_B))
        return step + 1, logits_XV, state, alive_BKT, alive_logp_BK, fin_BKT, fin_score_BK, done_B

    alive_logp_BK = jnp.where(jnp.arange(K) == 0, 0.0, NEG_INF)[None].repeat(B, 0)  # K copies; only one live
    carry = (jnp.zeros((), jnp.int32), jnp.repeat(first_logits_BV.astype(jnp.float32), K, axis=0), state,
             jnp.zeros((B, K, T), jnp.int32), alive_logp_BK, jnp.zeros((B, K, T), jnp.int32),
             jnp.full((B, K), NEG_INF), jnp.zeros((B,), bool))
    steps, _, _, alive_BKT, alive_logp_BK, fin_BKT, fin_score_BK, done_B = jax.lax.while_loop(cond, body, carry)

    # Rows that never finished K beams ran to max_new_tokens: their alive beams compete, unended.
    alive_score_BK = jnp.where(done_B[:, None], NEG_INF, alive_logp_BK / lp(steps))
    scores_Bn, idx = jax.lax.top_k(jnp.concatenate([fin_score_BK, alive_score_BK], axis=1), cfg.num_return)
    tokens_BnT = jnp.take_along_axis(jnp.concatenate([fin_BKT, alive_BKT], axis=1), idx[:, :, None], axis=1)
    return tokens_BnT, scores_Bn


def search(logits_fn: LogitsFn, state: Any, first_logits_BV: Array, cfg: DecodeConfig, rng: Array,
           reorder: Callable[[Any, Array], Any] = take_rows) -> tuple[Array, Array]:
    if cfg.strategy == "beam":
        return beam_search(logits_fn, state, first_logits_BV, cfg, reorder)
    return sample_search(logits_fn, state, first_logits_BV, cfg, rng)


# Models ------------------------------------------------------------------------------------------------

def _model_logits_fn(model) -> LogitsFn:
    def logits_fn(cache, token_B, step):
        logits_B1V, cache = model.decode_step(token_B[:, None], cache)
        return logits_B1V[:, 0], cache
    return logits_fn


def _reorder_cache(cache, rows_B):
    return cache.take(rows_B)


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("cfg", "cache_len"))
def _generate_jit(graphdef, state, inputs: dict, rng: Array, *, cfg: DecodeConfig, cache_len: int):
    model = nnx.merge(graphdef, state)
    if model.cfg.family == "decoder":
        cache = model.init_cache(inputs["start"], cache_len)
        logits_B1V, cache = model.decode_step(inputs["tokens"], cache, last_only=True, prefix=cfg.prefix_lm)
    else:
        cache = model.init_cache(inputs["encoder_inputs"], inputs["encoder_segment_ids"], cache_len)
        start_B1 = jnp.full((inputs["encoder_inputs"].shape[0], 1), cfg.start_id, jnp.int32)
        logits_B1V, cache = model.decode_step(start_B1, cache)
    return search(_model_logits_fn(model), cache, logits_B1V[:, -1], cfg, rng, _reorder_cache)


def model_inputs(family: str, prompt_ids: np.ndarray, lengths: np.ndarray, *, start_id: int = PAD_ID,
                 eos_id: int = EOS_ID) -> dict[str, np.ndarray]:
    """Right-padded prompt ids [B, P] -> the arrays decoding starts from (see the module docstring)."""
    B, P = prompt_ids.shape
    if family == "decoder":
        bos = 0 if start_id == -1 else 1
        tokens = np.zeros((B, P + bos), np.int32)   # slot P + bos - n - 1 holds the BOS
        for b, n in enumerate(lengths):
            tokens[b, P + bos - n:] = prompt_ids[b, :n]
            if bos:
                tokens[b, P - n] = start_id
        return {"tokens": tokens, "start": (P - lengths).astype(np.int32)}
    encoder_inputs = np.zeros((B, P + 1), np.int32)
    segment_ids = np.zeros((B, P + 1), np.int32)
    for b, n in enumerate(lengths):
        encoder_inputs[b, :n], encoder_inputs[b, n] = prompt_ids[b, :n], eos_id
        segment_ids[b, :n + 1] = 1
    return {"encoder_inputs": encoder_inputs, "encoder_segment_ids": segment_ids}


def _on_mesh(model, arrays: dict[str, np.ndarray]) -> dict:
    """Inputs laid out as the model's training batches are: rows over the batch axes."""
    if model.shard.mesh is None:
        return {k: jnp.asarray(v) for k, v in arrays.items()}
    return {k: jax.device_put(v, model.shard.named(("batch",) + (None,) * (v.ndim - 1), v.shape))
            for k, v in arrays.items()}


def generate(model, prompt_ids, prompt_lengths, cfg: DecodeConfig = DecodeConfig(),
             rng: Union[int, Array] = 0) -> tuple[np.ndarray, np.ndarray]:
    """Continue B prompts -> (tokens [B, n, max_new_tokens], scores [B, n]).

    prompt_ids: int [B, P], right-padded text ids (no BOS/EOS: this adds the family's special tokens);
    prompt_lengths: int [B]. Tokens after a row's EOS are 0. n is cfg.num_return for beam search, else 1.
    Scores: beam, the length-penalised log-probability; greedy/sample, the log-probability under the model.
    Compiles once per (model, cfg, P, B); the width P of `prompt_ids` (not the longest prompt) sets the shape.
    """
    cfg = cfg.validate().with_ids(EOS_ID, PAD_ID)
    family, max_len = model.cfg.family, model.cfg.max_len
    if family == "encoder_decoder" and cfg.start_id == -1:
        raise ValueError("start_id=-1 (no BOS) is for decoder-only models; an encoder-decoder's decoder needs a "
                         "start token (T5: the pad id, 0).")
    if family == "encoder":
        raise ValueError("model.family='encoder' cannot generate text; use fill_mask (the CLI does for encoder runs).")
    prompt_ids, lengths = np.asarray(prompt_ids, np.int32), np.asarray(prompt_lengths, np.int64)
    if prompt_ids.ndim != 2 or lengths.shape != prompt_ids.shape[:1]:
        raise ValueError(f"prompt_ids must be [B, P] and prompt_lengths [B]; got {prompt_ids.shape} and "
                         f"{lengths.shape}.")
    if np.any(lengths > prompt_ids.shape[1]):
        raise ValueError(f"prompt_lengths {lengths.tolist()} exceed the prompt_ids width {prompt_ids.shape[1]}.")
    check_prompt_lengths(lengths, family=family, max_len=max_len, cfg=cfg)
    inputs = model_inputs(family, prompt_ids, lengths, start_id=cfg.start_id, eos_id=cfg.eos_id)
    bos = 0 if cfg.start_id == -1 else 1
    needed = (prompt_ids.shape[1] + bos if family == "decoder" else 1) + cfg.max_new_tokens
    if cfg.cache_len and cfg.cache_len < needed:
        raise ValueError(f"cache_len={cfg.cache_len} is too small: this batch needs {needed} slots "
                         "(padded prompt + BOS + max_new_tokens); raise it or set 0.")
    key = jax.random.key(int(rng)) if isinstance(rng, (int, np.integer)) else rng
    graphdef, state = nnx.split(model)
    tokens, scores = _generate_jit(graphdef, state, _on_mesh(model, inputs), key, cfg=cfg,
                                   cache_len=cfg.cache_len or needed)
    return np.asarray(tokens), np.asarray(scores)


# Encoder-only: fill-mask --------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("top_k",))
def _fill_mask_jit(graphdef, state, inputs: dict, *, top_k: int):
    model = nnx.merge(graphdef, state)
    logp_BLV = jax.nn.log_softmax(model(inputs), axis=-1)
    return jax.lax.top_k(logp_BLV, top_k)


def fill_mask(model, ids, lengths, *, top_k: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """MLM predictions: right-padded ids [B, L] (masked positions hold the mask id, no EOS) -> the top-k
    token ids [B, L + 1, k] at every position and their log-probabilities. An EOS is appended, as in training."""
    if model.cfg.family != "encoder":
        raise ValueError(f"fill_mask needs an encoder-only model; this one is model.family={model.cfg.family!r}.")
    if not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k={top_k!r} must be an integer >= 1 (candidates per masked position); "
                         "pass e.g. --top-k 5.")
    ids, lengths = np.asarray(ids, np.int32), np.asarray(lengths, np.int64)
    check_prompt_lengths(lengths, family="encoder", max_len=model.cfg.max_len, cfg=DecodeConfig())
    B, L = ids.shape
    inputs, segment_ids = np.zeros((B, L + 1), np.int32), np.zeros((B, L + 1), np.int32)
    for b, n in enumerate(lengths):
        inputs[b, :n], inputs[b, n] = ids[b, :n], EOS_ID
        segment_ids[b, :n + 1] = 1
    graphdef, state = nnx.split(model)
    top_logp, top_ids = _fill_mask_jit(graphdef, state, _on_mesh(model, {"inputs": inputs, "segment_ids": segment_ids}),
                                       top_k=min(top_k, model.cfg.vocab_size))
    return np.asarray(top_ids), np.asarray(top_logp)
