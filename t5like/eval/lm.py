"""lm-evaluation-harness's model interface for t5like models: loglikelihood, loglikelihood_rolling and
generate_until (through t5like's KV-cache decoding), for decoder-only and encoder-decoder models.

    lm = T5likeLM(graphdef, params, tokenizer)        # or t5like.eval.loading.lm_from_workdir("runs/x")
    lm_eval.simple_evaluate(model=lm, tasks=[...])

Requests are tokenised as lm-eval's Hugging Face backend (`hf`) does, and where the two differ nothing
is silently different: TemplateLM's pair encoding (a context's trailing spaces move to the continuation),
the checkpoint's BOS on every text (Llama; none for GPT-2), an empty context scored after the prefix
token (BOS, else EOS), an encoder-decoder's context with its EOS and its continuation without, rolling
windows of `max_length` tokens. Too-long requests are cut from the left as `hf` cuts them: a
decoder's context + continuation to its last max_length + 1 tokens, an encoder's context to its last
max_length; a continuation longer than max_length is refused (hf asserts).
t5like's own runs (their SentencePiece tokenizer) read a start token 0 before every text, as in training,
and a rolling document is scored after it.

Batches have a fixed number of rows (`batch_size`, rounded up to the mesh's batch split) and lengths
padded to a power of two from 16 up (capped at max_length), so a task compiles once per length bucket:
`compiles` counts the distinct programs. Batches are laid out over the run's mesh like training batches.
"""
from __future__ import annotations

import functools
import json
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from tqdm import tqdm

from t5like.data.hf_tokenizer import HFTokenizer

MIN_BUCKET = 16


def bucket(n: int, cap: int) -> int:
    """The padded length for n tokens: a power of two >= 16, at most `cap`."""
    return min(max(MIN_BUCKET, 1 << max(n - 1, 0).bit_length()), cap)


def _score(graphdef, params, batch: dict):
    """Per row: the summed log-probability of the weighted targets, and whether each is the argmax."""
    logits = nnx.merge(graphdef, params)(batch).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    target_logp = jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
    scored = batch["weights"] > 0
    greedy = jnp.all((jnp.argmax(logits, -1) == batch["targets"]) | ~scored, axis=-1)
    return jnp.where(scored, target_logp, 0.0).sum(-1), greedy


@functools.lru_cache(maxsize=None)
def _scorer(mesh):
    """_score jitted once per mesh (every eval of a run reuses its programs), its [B] outputs replicated so
    that every host can read them."""
    from t5like.sharding import replicated
    return jax.jit(_score, static_argnums=(0,), out_shardings=None if mesh is None else replicated(mesh))


class T5likeLM(TemplateLM):
    """lm-eval's LM over a t5like model given as (graphdef, params) and its tokenizer."""

    def __init__(self, graphdef, params, tokenizer, *, batch_size: int = 16, max_gen_toks: int = 256):
        super().__init__()
        self.graphdef, self.params, self.tokenizer = graphdef, params, tokenizer
        model = nnx.merge(graphdef, params)
        self.cfg, self.shard = model.cfg, model.shard
        if self.cfg.family == "encoder":
            raise ValueError("model.family='encoder' has no left-to-right likelihood; lm-eval tasks need a decoder "
                             "or encoder_decoder model.")
        self.backend = "causal" if self.cfg.family == "decoder" else "seq2seq"
        self._max_length = self.cfg.max_len
        self._max_gen_toks = max_gen_toks
        split = 1
        if self.shard.mesh is not None:
            split = self.shard.mesh.shape.get("data", 1) * self.shard.mesh.shape.get("fsdp", 1)
        self.batch_size = -(-batch_size // split) * split  # every batch splits evenly over the mesh
        self.hf = isinstance(tokenizer, HFTokenizer)
        self.programs: set = set()  # (kind, shapes) of every compiled program

    @property
    def compiles(self) -> int:
        return len(self.programs)

    # lm-eval's interface ---------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context is scored after: the BOS a decoder reads (Llama, t5like's 0), else BOS/EOS (hf)."""
        if self.backend == "causal" and self.tokenizer.start_id >= 0:
            return self.tokenizer.start_id
        return self.tokenizer.bos_id if self.tokenizer.bos_id >= 0 else self.tokenizer.eos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> list[int]:
        """Ids with the special tokens the checkpoint's own tokenizer adds (hf's add_special_tokens=True):
        a decoder's BOS (start_id; none for GPT-2), an encoder-decoder's EOS at the end."""
        ids = self.tokenizer.encode(string)
        if add_special_tokens is False:
            return ids
        if self.backend == "causal":
            return ([self.tokenizer.start_id] if self.tokenizer.start_id >= 0 else []) + ids
        return ids + [self.tokenizer.eos_id]

    def tok_decode(self, ids) -> str:
        return self.tokenizer.decode(ids)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """[(request, context ids, continuation ids)] -> [(log-probability, is greedy)], in request order."""
        rows = [self._row(ctx, cont) for _, ctx, cont in requests]
        order = sorted(range(len(rows)), key=lambda i: -rows[i][0])  # longest first: lengths fall bucket by bucket
        out: list = [None] * len(rows)
        B = self.batch_size
        for start in tqdm(range(0, len(order), B), disable=disable_tqdm, desc="t5like loglikelihood"):
            chunk = order[start:start + B]
            batch = self._batch([rows[i][1] for i in chunk])
            logp, greedy = self._run(batch)
            for j, i in enumerate(chunk):
                out[i] = (float(logp[j]), bool(greedy[j]))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """hf's rolling windows: max_length tokens each, the first after the prefix token; one sum per document.
        t5like's own runs score the document after their start token, as they were trained (no BOS target)."""
        windows, owner = [], []
        for i, (string,) in enumerate(r.args for r in requests):
            tokens = self.tok_encode(string, add_special_tokens=None if self.hf else False)
            for ctx, cont in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=tokens, prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logp, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)):
            totals[i] += logp
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, with do_sample) continuations through t5like.decoding, cut at the stop strings."""
        from t5like.decoding import DecodeConfig, generate

        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(json.dumps(r.args[1], sort_keys=True, default=str), []).append(i)
        out: list = [None] * len(requests)
        eos = self.tokenizer.decode([self.eot_token_id]) if self.hf else ""
        bos = 1 if self.backend == "causal" and self.tokenizer.start_id >= 0 else 0
        for indices in groups.values():
            kwargs = normalize_gen_kwargs(dict(requests[indices[0]].args[1]), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos or None)
            max_gen = kwargs.pop("max_gen_toks")
            # The decoder holds BOS + context + generated tokens; the encoder the context + EOS.
            room = self.max_length - max_gen - bos if self.backend == "causal" else self.max_length - 1
            if room < 1:
                raise ValueError(f"max_gen_toks={max_gen} leaves no room for a context in max_length="
                                 f"{self.max_length}; lower the task's generation_kwargs.max_gen_toks.")
            sample = bool(kwargs.get("do_sample")) and float(kwargs.get("temperature", 0.0) or 0.0) > 0
            decode_cfg = DecodeConfig(strategy="sample" if sample else "greedy", max_new_tokens=max_gen,
                                      temperature=float(kwargs.get("temperature") or 1.0) if sample else 1.0,
                                      eos_id=self.tokenizer.eos_id, start_id=self.tokenizer.start_id)
            encoded = {i: self.tokenizer.encode(requests[i].args[0])[-room:] for i in indices}
            indices = sorted(indices, key=lambda i: -len(encoded[i]))
            for start in tqdm(range(0, len(indices), self.batch_size), disable=disable_tqdm,
                              desc="t5like generate_until"):
                chunk = indices[start:start + self.batch_size]
                width = bucket(max(len(encoded[i]) for i in chunk), room)
                ids = np.zeros((self.batch_size, width), np.int32)
                lengths = np.full(self.batch_size, max(len(encoded[chunk[0]]), 1))
                for j, i in enumerate(chunk):
                    ids[j, :len(encoded[i])], lengths[j] = encoded[i], len(encoded[i])
                ids[len(chunk):] = ids[0]  # filler rows repeat the first
                self.programs.add(("generate", width, max_gen))
                model = nnx.merge(self.graphdef, self.params)
                tokens, _ = generate(model, ids, lengths, decode_cfg, rng=start)
                for j, i in enumerate(chunk):
                    row = [int(t) for t in tokens[j, 0]]
                    row = row[:row.index(self.tokenizer.eos_id)] if self.tokenizer.eos_id in row else row
                    out[i] = postprocess_generated_text(self.tokenizer.decode(row), until, None)
        return out

    # Batches ---------------------------------------------------------------------------------------

    def _row(self, ctx: Sequence[int], cont: Sequence[int]) -> tuple[int, dict]:
        """One request as model arrays (unpadded), and its length for sorting; truncated as hf truncates."""
        if not ctx or not cont:
            raise ValueError("a loglikelihood request needs a context and a continuation of at least one token.")
        if len(cont) > self.max_length:
            raise ValueError(f"a continuation of {len(cont)} tokens exceeds max_length={self.max_length} (model.max_len); "
                             "lm-eval's hf backend refuses it too. Shorten the task's targets.")
        if self.backend == "causal":
            tokens = (list(ctx) + list(cont))[-(self.max_length + 1):]
            n = len(tokens) - 1
            weights = np.zeros(n, np.float32)
            weights[n - len(cont):] = 1
            return n, {"inputs": tokens[:-1], "targets": tokens[1:], "weights": weights}
        enc = list(ctx)[-self.max_length:]
        start = self.tokenizer.start_id
        return len(enc) + len(cont), {"encoder_inputs": enc, "decoder_inputs": [start] + list(cont[:-1]),
                                      "targets": list(cont), "weights": np.ones(len(cont), np.float32)}

    def _batch(self, rows: list[dict]) -> dict[str, np.ndarray]:
        """Rows right-padded to their bucket; filler rows (to batch_size) repeat the first row."""
        rows = rows + [rows[0]] * (self.batch_size - len(rows))
        out = {}
        groups = {"": ("inputs", "targets", "weights")} if self.backend == "causal" else {
            "encoder_": ("encoder_inputs",), "decoder_": ("decoder_inputs", "targets", "weights")}
        for prefix, keys in groups.items():
            width = bucket(max(len(r[keys[0]]) for r in rows), self.max_length)
            lengths = np.array([len(r[keys[0]]) for r in rows])
            real = np.arange(width)[None, :] < lengths[:, None]
            for k in keys:
                a = np.zeros((len(rows), width), np.float32 if k == "weights" else np.int32)
                for b, r in enumerate(rows):
                    a[b, :len(r[k])] = r[k]
                out[k] = a
            out[f"{prefix}segment_ids"] = real.astype(np.int32)
            out[f"{prefix}positions"] = np.where(real, np.arange(width), 0).astype(np.int32)
        return out

    def _run(self, batch: dict[str, np.ndarray]):
        self.programs.add(("score",) + tuple(sorted((k, v.shape) for k, v in batch.items())))
        return jax.device_get(_scorer(self.shard.mesh)(self.graphdef, self.params, self._place(batch)))

    def _place(self, batch: dict[str, np.ndarray]) -> dict:
        """Rows over the mesh's batch axes (every host passes the same global rows)."""
        if self.shard.mesh is None:
            return {k: jnp.asarray(v) for k, v in batch.items()}
        out = {}
        for k, v in batch.items():
            sharding = self.shard.named(("batch",) + (None,) * (v.ndim - 1), v.shape)
            out[k] = jax.make_array_from_callback(v.shape, sharding, lambda index, v=v: v[index])
        return out
