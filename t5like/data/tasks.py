"""Fine-tuning tasks: labelled examples from local JSONL (or json/csv/parquet) files through HF `datasets`.

One example per row, never packed; each objective reads two columns:
  seq2seq         input / target       encoder reads input + EOS; decoder predicts target + EOS
  completion      prompt / completion  decoder reads [BOS, prompt, completion]; loss on completion + EOS only
  classification  text / label         encoder reads [CLS, text, EOS] and the pooled head predicts the label

Batch keys (all rows padded to fixed lengths, padding rows of an eval pass have weight 0):
  seq2seq:        encoder_inputs encoder_segment_ids encoder_positions            [B, seq_len]
                  decoder_inputs targets weights decoder_segment_ids decoder_positions [B, target_len or seq_len]
  completion:     inputs targets weights segment_ids positions                    [B, seq_len]
  classification: inputs segment_ids positions [B, seq_len]; targets weights [B]
seq2seq and completion also carry target_bytes (UTF-8 bytes per scored target, for bits-per-byte).
Labels may be integers (class ids) or strings (sorted, then numbered from 0). Too-long examples are cut:
the input/text at its end, the prompt at its start (the completion is what is scored).
The train/validation split is by a hash of each example's row index, as for other json sources.
"""
from __future__ import annotations

import numpy as np

from t5like.data import sources
from t5like.data.byte_counts import bytes_per_id
from t5like.data.config import DataConfig
from t5like.data.objectives import target_bytes
from t5like.data.tokenizer import EOS_ID, PAD_ID

TASK_FIELDS = {"seq2seq": ("input", "target"), "completion": ("prompt", "completion"),
               "classification": ("text", "label")}
CLS_ID = PAD_ID  # position 0 of a classification row, pooled by the head (BERT's [CLS]); its segment id is 1


def load_examples(cfg: DataConfig):
    """All rows of cfg.paths as a Dataset, checked for the objective's two columns."""
    if cfg.source != "files" or cfg.format == "text":
        raise ValueError(f"data.objective={cfg.objective!r} reads labelled examples: set data.source='files', "
                         f"data.format='jsonl' and data.paths to files with fields {TASK_FIELDS[cfg.objective]}; "
                         f"got data.source={cfg.source!r}, data.format={cfg.format!r}.")
    files = sources.resolve_paths(cfg.paths, cfg.max_files)
    for f in files:
        sources.check_file(f, cfg.format)
    ds = sources._load(cfg, sources._BUILDERS[cfg.format], files, cfg.cache_dir or None)
    missing = [c for c in TASK_FIELDS[cfg.objective] if c not in ds.column_names]
    if missing:
        raise ValueError(f"data.objective={cfg.objective!r} needs fields {TASK_FIELDS[cfg.objective]} in every row "
                         f"of data.paths; {files[0]} lacks {missing} (its columns are {ds.column_names}).")
    return ds


def label_names(ds) -> list:
    """The sorted distinct labels of a classification dataset (ints stay ints)."""
    labels = ds["label"]
    if any(not isinstance(x, (int, str)) or isinstance(x, bool) for x in labels):
        raise ValueError("classification labels must be integers (class ids) or strings (class names); found "
                         f"{sorted({type(x).__name__ for x in labels})}.")
    return sorted(set(labels))


def training_texts(cfg: DataConfig):
    """Every text field of the examples, for fitting a tokenizer on a task when no tokenizer is given."""
    ds = load_examples(cfg)
    fields = [f for f in TASK_FIELDS[cfg.objective] if f != "label"]
    for i in np.random.default_rng(0).permutation(len(ds)):
        row = ds[int(i)]
        yield "\n".join(str(row[f]) for f in fields)


class TaskTable:
    """A split's examples tokenised into fixed-length arrays; `rows(ids)` is a batch (id -1 = padding row).
    Every host holds the whole split and takes its rows of each global batch (pipeline.BatchIterator)."""

    def __init__(self, cfg: DataConfig, tokenizer, split: str):
        ds = load_examples(cfg)
        self.objective = cfg.objective
        self.labels = label_names(ds) if cfg.objective == "classification" else None
        ds = ds.select(sources.split_indices([str(i) for i in range(len(ds))], split, cfg.validation_fraction))
        first, second = TASK_FIELDS[cfg.objective]
        a = tokenizer.encode_batch([str(x) for x in ds[first]])
        L = cfg.seq_len
        if cfg.objective == "classification":
            # Integer labels are class ids; string labels are numbered in sorted order.
            index = {name: name if isinstance(name, int) else i for i, name in enumerate(self.labels)}
            self.arrays = _classification(a, [index[x] for x in ds[second]], L)
        else:
            b = tokenizer.encode_batch([str(x) for x in ds[second]])
            if cfg.objective == "seq2seq":
                self.arrays = _seq2seq(a, b, L, cfg.target_len or L)
            else:
                self.arrays = _completion(a, b, L)
            self.arrays["target_bytes"] = target_bytes(bytes_per_id(tokenizer), self.arrays["targets"],
                                                       self.arrays["weights"])
        self.num_rows = len(ds)

    def rows(self, row_ids: np.ndarray) -> dict[str, np.ndarray]:
        real = row_ids >= 0
        out = {}
        for k, v in self.arrays.items():
            x = v[np.where(real, row_ids, 0)]
            out[k] = np.where(real.reshape(-1, *[1] * (x.ndim - 1)), x, 0).astype(v.dtype)
        return out


def _right_pad(seqs: list[list[int]], length: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.zeros((len(seqs), length), np.int32)
    real = np.zeros((len(seqs), length), bool)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], real[i, :len(s)] = s, True
    return ids, real


def _positions(real: np.ndarray) -> np.ndarray:
    return np.where(real, np.arange(real.shape[1]), 0).astype(np.int32)


def _seq2seq(inputs, targets, enc_len: int, dec_len: int) -> dict[str, np.ndarray]:
    enc, enc_real = _right_pad([x[:enc_len - 1] + [EOS_ID] for x in inputs], enc_len)
    tgt, dec_real = _right_pad([y[:dec_len - 1] + [EOS_ID] for y in targets], dec_len)
    dec = np.zeros_like(tgt)
    dec[:, 1:] = tgt[:, :-1]  # start token 0, as in T5
    return {"encoder_inputs": enc, "encoder_segment_ids": enc_real.astype(np.int32),
            "encoder_positions": _positions(enc_real), "decoder_inputs": np.where(dec_real, dec, 0).astype(np.int32),
            "targets": tgt, "weights": dec_real.astype(np.float32),
            "decoder_segment_ids": dec_real.astype(np.int32), "decoder_positions": _positions(dec_real)}


def _completion(prompts, completions, seq_len: int) -> dict[str, np.ndarray]:
    rows, scored = [], []
    for p, c in zip(prompts, completions):
        c = c[:seq_len - 1] + [EOS_ID]              # completion + EOS, at most seq_len tokens of targets
        p = p[max(0, len(p) - (seq_len - len(c))):] if len(c) < seq_len else []  # keep the prompt's end
        rows.append([0] + p + c)                     # [BOS, prompt, completion, EOS]; inputs drop the last
        scored.append(len(p))                        # targets from index len(p) on are the completion's
    tokens, real = _right_pad([r[:-1] for r in rows], seq_len)
    targets, _ = _right_pad([r[1:] for r in rows], seq_len)
    weights = real & (np.arange(seq_len)[None, :] >= np.array(scored)[:, None])
    return {"inputs": tokens, "targets": targets, "weights": weights.astype(np.float32),
            "segment_ids": real.astype(np.int32), "positions": _positions(real)}


def _classification(texts, labels, seq_len: int) -> dict[str, np.ndarray]:
    ids, real = _right_pad([[CLS_ID] + t[:seq_len - 2] + [EOS_ID] for t in texts], seq_len)
    return {"inputs": ids, "segment_ids": real.astype(np.int32), "positions": _positions(real),
            "targets": np.asarray(labels, np.int32), "weights": np.ones(len(labels), np.float32)}
