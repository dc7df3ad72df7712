"""SentencePiece tokenizer with T5 conventions: pad=0, eos=1, unk=2, no bos, sentinels at the top.

The model's vocabulary is `vocab_size` ids. SentencePiece owns ids [0, piece_size) with
piece_size <= vocab_size - num_sentinels; sentinel k is id vocab_size - 1 - k (T5's <extra_id_k>),
and MLM's [MASK] is sentinel 0.
"""
from __future__ import annotations

import io
import json
import os
import re
from typing import Iterable, Iterator

import sentencepiece as spm


PAD_ID, EOS_ID, UNK_ID, BOS_ID = 0, 1, 2, -1
_SENTINEL = re.compile(r"<extra_id_(\d+)>")
_MAX_SENTENCE_CHARS = 4000  # spm silently skips "sentences" longer than max_sentence_length bytes


class Tokenizer:
    """Text <-> ids. `vocab_size` is the model's vocabulary, which includes the sentinels."""

    pad_id, eos_id, unk_id, bos_id = PAD_ID, EOS_ID, UNK_ID, BOS_ID
    start_id = PAD_ID  # decoding reads pad first (decoder-only BOS, decoder start), as training batches do

    def __init__(self, model_proto: bytes, vocab_size: int, num_sentinels: int):
        self._init(model_proto, vocab_size, num_sentinels)

    def _init(self, model_proto: bytes, vocab_size: int, num_sentinels: int) -> None:
        self._proto, self.vocab_size, self.num_sentinels = model_proto, vocab_size, num_sentinels
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.piece_size = self._sp.get_piece_size()
        if self.piece_size > vocab_size - num_sentinels:
            raise ValueError(f"vocab_size={vocab_size} is too small for this tokenizer: it has {self.piece_size} "
                             f"pieces plus data.num_sentinels={num_sentinels} sentinels; set vocab_size >= "
                             f"{self.piece_size + num_sentinels} (or retrain the tokenizer)")
        ids = (self._sp.pad_id(), self._sp.eos_id(), self._sp.unk_id(), self._sp.bos_id())
        if ids != (PAD_ID, EOS_ID, UNK_ID, BOS_ID):
            raise ValueError(f"tokenizer has (pad, eos, unk, bos) ids {ids}; t5like needs {(0, 1, 2, -1)} "
                             "(T5 convention); retrain it with `python -m t5like.data train-tokenizer`")

    @classmethod
    def from_file(cls, path: str, vocab_size: int, num_sentinels: int) -> "Tokenizer":
        from t5like import storage
        return cls(storage.read_bytes(path), vocab_size, num_sentinels)

    # Pickle as the model bytes: datasets.map needs that for num_proc > 1 and to fingerprint its cache.
    def __getstate__(self):
        return {"model_proto": self._proto, "vocab_size": self.vocab_size, "num_sentinels": self.num_sentinels}

    def __setstate__(self, state):
        self._init(state["model_proto"], state["vocab_size"], state["num_sentinels"])

    def sentinel_id(self, k: int) -> int:
        if not 0 <= k < self.num_sentinels:
            raise ValueError(f"sentinel {k} out of range [0, {self.num_sentinels})")
        return self.vocab_size - 1 - k

    @property
    def mask_id(self) -> int:
        """MLM's [MASK]: the first sentinel, an id SentencePiece never produces."""
        return self.sentinel_id(0)

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._sp.encode(texts, num_threads=-1)

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text; sentinels render as <extra_id_k>, pad/eos as nothing, other unused ids as unk."""
        out, run = [], []
        first_sentinel = self.vocab_size - self.num_sentinels
        for i in map(int, ids):
            if first_sentinel <= i < self.vocab_size:
                out.append(self._sp.decode(run))
                out.append(f"<extra_id_{self.vocab_size - 1 - i}>")
                run = []
            else:
                run.append(i if 0 <= i < self.piece_size else UNK_ID)
        out.append(self._sp.decode(run))
        return "".join(out)


# ----------------------------------------------------------------------------- training

def _sentences(texts: Iterable[str], max_chars: int) -> Iterator[str]:
    """Cut documents into spm "sentences" at line ends (keeping the newlines) until max_chars are used."""
    used = 0
    for text in texts:
        chunk = ""
        for line in text.splitlines(keepends=True):
            while len(line) > _MAX_SENTENCE_CHARS:  # minified/data lines: hard-cut them
                yield line[:_MAX_SENTENCE_CHARS]
                used += _MAX_SENTENCE_CHARS
                line = line[_MAX_SENTENCE_CHARS:]
            if len(chunk) + len(line) > _MAX_SENTENCE_CHARS:
                yield chunk
                used, chunk = used + len(chunk), ""
            chunk += line
            if used >= max_chars:
                return
        if chunk:
            yield chunk
            used += len(chunk)
        if used >= max_chars:
            return


def train_tokenizer(texts: Iterable[str], out_dir: str, vocab_size: int, num_sentinels: int,
                    max_chars: int) -> Tokenizer:
    """Train a unigram SentencePiece model on up to `max_chars` of `texts`; write out_dir/spm.model
    (with spm.vocab and meta.json); out_dir may be local or gs://.

    Whitespace and newlines are kept exactly (identity normalisation, no dummy prefix) and unseen
    characters fall back to bytes, so decode(encode(x)) == x for code.
    """
    num_pieces = vocab_size - num_sentinels
    if num_pieces < 300:
        raise ValueError(f"vocab_size={vocab_size} leaves {num_pieces} SentencePiece pieces after "
                         f"data.num_sentinels={num_sentinels}; byte fallback alone needs 259, so set "
                         f"vocab_size >= {300 + num_sentinels}")
    sentences = list(_sentences(texts, max_chars))
    if not any(s.strip() for s in sentences):
        raise ValueError("no text to train the tokenizer on; check data.source / data.paths")
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences), model_writer=model, model_type="unigram", vocab_size=num_pieces,
            pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=BOS_ID, byte_fallback=True,
            normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
            allow_whitespace_only_pieces=True, split_digits=True, user_defined_symbols=["\n"],
            max_sentence_length=4 * _MAX_SENTENCE_CHARS + 16, num_threads=os.cpu_count() or 1,
            minloglevel=2)
    except RuntimeError as e:
        raise _explain_spm_error(e, vocab_size, num_sentinels, max_chars) from e
    from t5like import storage

    tokenizer = Tokenizer(model.getvalue(), vocab_size, num_sentinels)
    sp = tokenizer._sp
    vocab = "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i)}\n" for i in range(tokenizer.piece_size))
    meta = {"vocab_size": vocab_size, "num_sentinels": num_sentinels, "pieces": tokenizer.piece_size,
            "train_chars": sum(map(len, sentences))}
    # out_dir may be gs://. spm.model goes last, so its presence means the other files are there too.
    storage.makedirs(out_dir)
    storage.write_atomic(storage.join(out_dir, "spm.vocab"), vocab.encode("utf-8"))
    storage.write_atomic(storage.join(out_dir, "meta.json"), json.dumps(meta, indent=1))
    storage.write_atomic(storage.join(out_dir, "spm.model"), model.getvalue())
    return tokenizer


def _explain_spm_error(e: RuntimeError, vocab_size: int, num_sentinels: int, max_chars: int) -> Exception:
    msg = str(e)
    if m := re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", msg):
        most = int(m.group(2)) + num_sentinels
        return ValueError(
            f"vocab_size={vocab_size} is too large for the tokenizer training text: SentencePiece can make at most "
            f"{m.group(2)} pieces from it, so with data.num_sentinels={num_sentinels} vocab_size must be <= {most}. "
            f"Fix: lower vocab_size to <= {most}, or train on more text (data.tokenizer_train_chars={max_chars}, "
            "more files / data.max_files).")
    if m := re.search(r"smaller than required_chars\. (\d+) vs (\d+)", msg):
        least = int(m.group(2)) + num_sentinels
        return ValueError(f"vocab_size={vocab_size} is too small: the training text has more distinct characters "
                          f"than pieces; set vocab_size >= {least} (with data.num_sentinels={num_sentinels})")
    return ValueError(f"SentencePiece training failed (vocab_size={vocab_size}): {msg}")
