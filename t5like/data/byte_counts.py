"""UTF-8 bytes per token id, for bits-per-byte: a lookup table computed once per tokenizer.

bpb = (summed target log-loss in nats) / ln 2 / (UTF-8 bytes of the targets' decoded text), and the bytes of a
run of targets are the sum of each id's bytes, so the table is all a batch needs (target_bytes = table[targets]).

  SentencePiece   a piece's text with "▁" as a space (1 byte); byte-fallback pieces <0xNN> are 1 byte
  byte-level BPE  (GPT-2, Llama 3) each character of a piece stands for one byte (bytes_to_unicode)
  other HF        (WordPiece, Metaspace) the decoded piece, "##" continuation marks dropped
Special ids (pad, eos, bos, unk, sentinels, added special tokens) decode to no text: 0 bytes.

t5like's own SentencePiece tokenizers keep text exactly (identity normalisation, no dummy prefix), so the sum
equals len(text.encode()) of every document. Tokenizers that normalise (NFKC) or add a dummy-prefix space count
the bytes of the normalised text, as every per-token byte count does; docs/eval.md says so.
"""
from __future__ import annotations

import functools
import json
import re

import numpy as np

_BYTE_PIECE = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


@functools.lru_cache(maxsize=None)
def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's bytes_to_unicode, inverted: the character that stands for each byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _sentencepiece_bytes(sp, ids) -> dict[int, int]:
    out = {}
    for i in ids:
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            out[i] = 0
        elif sp.is_byte(i) or _BYTE_PIECE.match(sp.id_to_piece(i)):
            out[i] = 1
        else:
            out[i] = len(sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
    return out


def _hf_json_bytes(tok, vocab_size: int) -> np.ndarray:
    """A `tokenizers` tokenizer (tokenizer.json): byte-level pieces map back through the byte alphabet."""
    spec = json.loads(tok.to_str())
    byte_level = any(d and d.get("type") == "ByteLevel" for d in _parts(spec.get("decoder")))
    specials = {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
    alphabet = _byte_level_alphabet()
    table = np.zeros(vocab_size, np.int32)
    for i in range(min(vocab_size, tok.get_vocab_size(with_added_tokens=True))):
        piece = tok.id_to_token(i)
        if piece is None or i in specials:
            continue
        if byte_level and all(c in alphabet for c in piece):
            table[i] = len(piece)
        elif _BYTE_PIECE.match(piece):
            table[i] = 1
        elif piece.startswith("##"):  # WordPiece continuation
            table[i] = len(piece[2:].encode("utf-8"))
        else:
            table[i] = len(piece.replace("\u2581", " ").encode("utf-8"))
    return table


def _parts(spec):
    """A decoder spec and, for a Sequence decoder, its parts."""
    if not spec:
        return []
    return [spec, *spec.get("decoders", [])]


def bytes_per_id(tokenizer) -> np.ndarray:
    """int32 [vocab_size]: the UTF-8 bytes each id's piece stands for (t5like Tokenizer or HFTokenizer)."""
    cached = getattr(tokenizer, "_bytes_per_id", None)
    if cached is not None:
        return cached
    table = np.zeros(tokenizer.vocab_size, np.int32)
    if getattr(tokenizer, "_tok", None) is not None:  # HFTokenizer over tokenizer.json
        table = _hf_json_bytes(tokenizer._tok, tokenizer.vocab_size)
    else:  # SentencePiece: t5like's own Tokenizer, or an HFTokenizer over spiece.model
        sp = tokenizer._sp
        for i, n in _sentencepiece_bytes(sp, range(min(sp.get_piece_size(), tokenizer.vocab_size))).items():
            table[i] = n
    for special in (tokenizer.pad_id, tokenizer.eos_id, tokenizer.bos_id, tokenizer.unk_id):
        if 0 <= special < len(table):
            table[special] = 0
    for k in range(tokenizer.num_sentinels):
        table[tokenizer.sentinel_id(k)] = 0
    tokenizer._bytes_per_id = table
    return table
