"""Training objectives: turn packed rows of token ids into model batches (numpy, int32 / float32).

Every objective sees rows from the packer (`tokens`, `segment_ids`, `positions`, all [B, row_len]) and,
for the random ones, one numpy Generator per row. Keying those generators on (seed, epoch, row) outside
this module keeps the batches a pure function of the iterator position, which is what makes resume exact.

Batch keys, all [B, L]:
  lm:              inputs targets weights segment_ids positions
  prefix_lm:       the lm keys + prefix (1 = bidirectional prefix; those positions have weight 0).
                   Attention: query q sees key k of the same segment if k <= q, or prefix[q] and prefix[k].
  mlm:             inputs targets weights segment_ids positions
  span_corruption: encoder_inputs encoder_segment_ids encoder_positions            [B, seq_len]
                   decoder_inputs targets weights decoder_segment_ids decoder_positions [B, target_len]
lm and prefix_lm also carry target_bytes (int32 [B, L]): the UTF-8 bytes of each scored target's piece (0 where
the weight is 0), which the loss sums beside the log-loss for bits-per-byte (t5like/data/byte_counts.py).
mlm and span_corruption have none: their targets are a random ~15% of the text, and their loss per byte of
those targets is not comparable with a language model's bits-per-byte, so bpb is left undefined there.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Sequence

import numpy as np

from t5like.data.byte_counts import bytes_per_id
from t5like.data.tokenizer import EOS_ID

if TYPE_CHECKING:
    from t5like.data.config import DataConfig
    from t5like.data.tokenizer import Tokenizer

# Objectives whose targets are text a language model predicts in order, so bits-per-byte is defined.
BPB_OBJECTIVES = ("lm", "prefix_lm", "completion", "seq2seq")
FIRST_REGULAR_ID = 3  # ids below this are special; MLM never draws them as random replacements


# ----------------------------------------------------------------------------- span corruption lengths

def noise_counts(length: int, noise_density: float, mean_noise_span_length: float) -> tuple[int, int]:
    """(noise tokens, noise spans) for a chunk of `length` tokens, with T5's clamps.

    Shared by the length helper and the mask so that the predicted lengths are the real ones.
    """
    if length < 2:
        return 0, 0
    num_noise = min(max(round(length * noise_density), 1), length - 1)
    # Every noise span needs a non-noise span before it, hence the cap at length - num_noise.
    num_spans = min(max(round(num_noise / mean_noise_span_length), 1), length - num_noise)
    return num_noise, num_spans


def _corrupted_lengths(length: int, density: float, mean_span: float) -> tuple[int, int]:
    """Encoder and decoder lengths after corrupting `length` raw tokens (each + 1 for EOS)."""
    noise, spans = noise_counts(length, density, mean_span)
    return length - noise + spans + 1, noise + spans + 1


def span_corruption_lengths(cfg: "DataConfig") -> tuple[int, int]:
    """(raw tokens per row, decoder length) so that corrupted rows fill `cfg.seq_len` (T5's random_spans_helper).

    Raises ValueError when `target_len` is too short or there are fewer sentinels than spans.
    """
    density, mean_span = cfg.noise_density, cfg.mean_noise_span_length
    raw = cfg.seq_len - 1  # always fits: a chunk never gets more spans than noise tokens
    while _corrupted_lengths(raw + 1, density, mean_span)[0] <= cfg.seq_len:
        raw += 1
    _, need_targets = _corrupted_lengths(raw, density, mean_span)
    _, spans = noise_counts(raw, density, mean_span)
    if spans > cfg.num_sentinels:
        raise ValueError(f"data.num_sentinels={cfg.num_sentinels} is fewer than the {spans} noise spans a row of "
                         f"data.seq_len={cfg.seq_len} gets; raise num_sentinels to >= {spans} or lower seq_len")
    if cfg.target_len and cfg.target_len < need_targets:
        raise ValueError(f"data.target_len={cfg.target_len} is too short: span corruption of data.seq_len="
                         f"{cfg.seq_len} makes targets of up to {need_targets} tokens; set target_len >= "
                         f"{need_targets} or 0 to derive it")
    return raw, cfg.target_len or need_targets


def random_spans_noise_mask(length: int, noise_density: float, mean_noise_span_length: float,
                            rng: np.random.Generator) -> np.ndarray:
    """T5's noise mask: alternating non-noise / noise spans, starting with non-noise, ending with noise.

    Span lengths are a uniformly random composition of the noise (and non-noise) token counts.
    """
    num_noise, num_spans = noise_counts(length, noise_density, mean_noise_span_length)
    if num_spans == 0:
        return np.zeros(length, bool)

    def random_segmentation(num_items: int, num_segments: int) -> np.ndarray:
        # Cut num_items into num_segments non-empty pieces: choose num_segments-1 of the num_items-1 gaps.
        first = np.zeros(num_items, bool)
        first[rng.choice(num_items - 1, num_segments - 1, replace=False) + 1] = True
        return np.bincount(np.cumsum(first), minlength=num_segments)

    noise = random_segmentation(num_noise, num_spans)
    nonnoise = random_segmentation(length - num_noise, num_spans)
    lengths = np.stack([nonnoise, noise], axis=1).reshape(-1)
    return np.repeat(np.tile([False, True], num_spans), lengths)


def _replace_spans_with_sentinels(tokens: np.ndarray, mask: np.ndarray, vocab_size: int) -> np.ndarray:
    """Each run of masked tokens becomes one sentinel: the i-th run gets id vocab_size - 1 - i (T5 order)."""
    prev = np.concatenate([[False], mask[:-1]])
    first = mask & ~prev
    sentinels = vocab_size - np.cumsum(first)
    return np.where(first, sentinels, tokens)[~(mask & prev)]


# ----------------------------------------------------------------------------- the objective

@dataclasses.dataclass(frozen=True)
class Objective:
    """A batch builder for one objective; `row_len` is how many raw tokens the packer puts in a row."""

    name: str
    seq_len: int
    target_len: int  # decoder length (span_corruption only, else 0)
    row_len: int
    vocab_size: int
    piece_size: int  # SentencePiece ids are [0, piece_size); MLM random replacements come from [3, piece_size)
    mask_id: int
    noise_density: float
    mean_noise_span_length: float
    mlm_probability: float
    # bytes per id (byte_counts.bytes_per_id) for the BPB_OBJECTIVES; None: batches carry no target_bytes
    byte_table: np.ndarray | None = dataclasses.field(default=None, compare=False, repr=False)

    @property
    def is_random(self) -> bool:
        return self.name != "lm"

    def shapes(self, batch_size: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """Shape and dtype of every key of a batch (for initialising a model without reading data)."""
        B, L, T = batch_size, self.seq_len, self.target_len
        i32, f32 = np.dtype(np.int32), np.dtype(np.float32)
        if self.name == "span_corruption":
            return {"encoder_inputs": ((B, L), i32), "encoder_segment_ids": ((B, L), i32),
                    "encoder_positions": ((B, L), i32), "decoder_inputs": ((B, T), i32), "targets": ((B, T), i32),
                    "weights": ((B, T), f32), "decoder_segment_ids": ((B, T), i32),
                    "decoder_positions": ((B, T), i32)}
        keys = ["inputs", "targets", "weights", "segment_ids", "positions"] + (["prefix"] * (self.name == "prefix_lm"))
        keys += ["target_bytes"] * (self.name in BPB_OBJECTIVES)
        return {k: ((B, L), f32 if k == "weights" else i32) for k in keys}

    def __call__(self, tokens: np.ndarray, segment_ids: np.ndarray, positions: np.ndarray,
                 rngs: Sequence[np.random.Generator] | None) -> dict[str, np.ndarray]:
        """Build a batch from packed rows; `rngs` has one Generator per row (None for lm)."""
        if self.name == "lm":
            return self._with_bytes(_lm(tokens, segment_ids, positions))
        assert rngs is not None and len(rngs) == len(tokens), "random objectives need one rng per row"
        if self.name == "prefix_lm":
            return self._with_bytes(_prefix_lm(tokens, segment_ids, positions, rngs))
        if self.name == "mlm":
            return self._mlm(tokens, segment_ids, positions, rngs)
        return self._span_corruption(tokens, segment_ids, rngs)

    def _with_bytes(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.byte_table is not None:
            batch["target_bytes"] = target_bytes(self.byte_table, batch["targets"], batch["weights"])
        return batch

    def _mlm(self, tokens, segment_ids, positions, rngs) -> dict[str, np.ndarray]:
        B, L = tokens.shape
        draws = np.stack([rng.random((2, L)) for rng in rngs])  # [B, 2, L]: select?, then what to do
        random_tokens = np.stack([rng.integers(FIRST_REGULAR_ID, self.piece_size, L) for rng in rngs])
        # EOS is structure, not content: never ask the model to recover it.
        selected = (segment_ids > 0) & (tokens != EOS_ID) & (draws[:, 0] < self.mlm_probability)
        action = draws[:, 1]
        inputs = np.where(selected & (action < 0.8), self.mask_id, tokens)
        inputs = np.where(selected & (action >= 0.8) & (action < 0.9), random_tokens, inputs)
        return {"inputs": inputs.astype(np.int32), "targets": tokens.astype(np.int32),
                "weights": selected.astype(np.float32), "segment_ids": segment_ids.astype(np.int32),
                "positions": positions.astype(np.int32)}

    def _span_corruption(self, tokens, segment_ids, rngs) -> dict[str, np.ndarray]:
        B = tokens.shape[0]
        enc = np.zeros((B, self.seq_len), np.int32)
        dec = np.zeros((B, self.target_len), np.int32)
        enc_len = np.zeros(B, np.int64)
        dec_len = np.zeros(B, np.int64)
        for b in range(B):
            n = int(np.count_nonzero(segment_ids[b]))  # rows are one chunk, so real tokens come first
            if n == 0:
                continue  # padding row
            row = tokens[b, :n]
            mask = random_spans_noise_mask(n, self.noise_density, self.mean_noise_span_length, rngs[b])
            e = np.append(_replace_spans_with_sentinels(row, mask, self.vocab_size), EOS_ID)
            d = np.append(_replace_spans_with_sentinels(row, ~mask, self.vocab_size), EOS_ID)
            enc[b, :len(e)], dec[b, :len(d)] = e, d
            enc_len[b], dec_len[b] = len(e), len(d)
        enc_real = np.arange(self.seq_len) < enc_len[:, None]
        dec_real = np.arange(self.target_len) < dec_len[:, None]
        decoder_inputs = np.zeros_like(dec)
        decoder_inputs[:, 1:] = dec[:, :-1]  # start token = 0, as in T5
        return {"encoder_inputs": enc, "encoder_segment_ids": enc_real.astype(np.int32),
                "encoder_positions": np.where(enc_real, np.arange(self.seq_len), 0).astype(np.int32),
                "decoder_inputs": decoder_inputs, "targets": dec, "weights": dec_real.astype(np.float32),
                "decoder_segment_ids": dec_real.astype(np.int32),
                "decoder_positions": np.where(dec_real, np.arange(self.target_len), 0).astype(np.int32)}


def target_bytes(table: np.ndarray, targets: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """UTF-8 bytes of each scored target (0 where the weight is 0)."""
    return np.where(weights > 0, table[targets], 0).astype(np.int32)


def _lm(tokens, segment_ids, positions) -> dict[str, np.ndarray]:
    # Shift right inside each segment: a segment starts (position 0) with BOS = 0, never the previous doc's EOS.
    inputs = np.zeros_like(tokens)
    inputs[:, 1:] = tokens[:, :-1]
    inputs = np.where(positions == 0, 0, inputs)
    return {"inputs": inputs.astype(np.int32), "targets": tokens.astype(np.int32),
            "weights": (segment_ids > 0).astype(np.float32), "segment_ids": segment_ids.astype(np.int32),
            "positions": positions.astype(np.int32)}


def _prefix_lm(tokens, segment_ids, positions, rngs) -> dict[str, np.ndarray]:
    """Causal LM where the first k tokens of each segment (k uniform in [1, len-1]) form an unscored prefix.

    prefix=1 marks positions the model may attend to bidirectionally within their segment. Their inputs
    hold tokens 0..k-2 and their targets (tokens 0..k-1) get weight 0, so no scored target is visible.
    """
    batch = _lm(tokens, segment_ids, positions)
    B, L = tokens.shape
    split = np.zeros((B, L + 1), np.int64)  # split[b, s] = prefix length of segment s (segment ids <= L)
    for b in range(B):
        lengths = np.bincount(segment_ids[b], minlength=L + 1)
        u = rngs[b].random(L + 1)
        split[b] = np.where(lengths >= 2, 1 + np.floor(u * (lengths - 1)).astype(np.int64), 0)
    prefix = (segment_ids > 0) & (positions < np.take_along_axis(split, segment_ids.astype(np.int64), axis=1))
    batch["weights"] = np.where(prefix, 0, batch["weights"]).astype(np.float32)
    batch["prefix"] = prefix.astype(np.int32)
    return batch


def make_objective(cfg: "DataConfig", tokenizer: "Tokenizer") -> Objective:
    """The Objective for `cfg.objective`, with lengths and special ids taken from cfg and the tokenizer."""
    if tokenizer.num_sentinels != cfg.num_sentinels:
        raise ValueError(f"data.num_sentinels={cfg.num_sentinels} but the tokenizer reserves "
                         f"{tokenizer.num_sentinels}; build both from the same config")
    raw_len, target_len = (span_corruption_lengths(cfg) if cfg.objective == "span_corruption"
                           else (cfg.seq_len, 0))
    return Objective(name=cfg.objective, seq_len=cfg.seq_len, target_len=target_len, row_len=raw_len,
                     vocab_size=tokenizer.vocab_size, piece_size=tokenizer.piece_size,
                     mask_id=tokenizer.mask_id if cfg.num_sentinels else -1, noise_density=cfg.noise_density,
                     mean_noise_span_length=cfg.mean_noise_span_length, mlm_probability=cfg.mlm_probability,
                     byte_table=bytes_per_id(tokenizer) if cfg.objective in BPB_OBJECTIVES else None)


def batch_shapes(cfg: "DataConfig", batch_size: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shapes and dtypes of a batch for `cfg` (no tokenizer or data needed): {key: (shape, dtype)}."""
    cfg.validate()
    target_len = span_corruption_lengths(cfg)[1] if cfg.objective == "span_corruption" else 0
    return Objective(cfg.objective, cfg.seq_len, target_len, 0, 0, 0, 0, 0.0, 0.0, 0.0).shapes(batch_size)
