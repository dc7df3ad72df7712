"""Tokenizers that come with Hugging Face checkpoints, behind t5like's Tokenizer interface.

A directory with `tokenizer.json` (GPT-2 byte-level BPE, BERT WordPiece, Llama 3, T5 fast) is read with the
`tokenizers` library; one with only `spiece.model` / `tokenizer.model` (T5, Llama 2) with sentencepiece.
Special ids come from the checkpoint (config.json, then tokenizer_config.json / special_tokens_map.json),
never from t5like's own pad=0/eos=1 convention:
  pad_id, eos_id, bos_id, unk_id   as the checkpoint defines them (-1 when it has none)
  start_id                         what decoding reads first: the BOS a decoder-only prompt starts with
                                   (-1: none, GPT-2), or the decoder start token (T5: pad)
  sentinel_id(k), mask_id          T5's <extra_id_k>; BERT's [MASK] is sentinel 0 (the MLM objective's mask)
`encode` adds no special tokens: the decoding and data code add the ones each family reads.
"""
from __future__ import annotations

import json
import os
import re
from typing import Iterable, Optional

SPM_FILES = ("spiece.model", "tokenizer.model")
FILES = ("tokenizer.json", *SPM_FILES, "tokenizer_config.json", "special_tokens_map.json", "config.json",
         "generation_config.json", "vocab.txt", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")
# The named special tokens a chat template sees as variables (transformers' SPECIAL_TOKENS_ATTRIBUTES).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_EXTRA_ID = re.compile(r"^<extra_id_(\d+)>$")


def has_tokenizer(directory: str) -> bool:
    return any(os.path.isfile(os.path.join(directory, f)) for f in ("tokenizer.json", *SPM_FILES))


def _json(directory: str, name: str) -> dict:
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _content(token) -> Optional[str]:
    return token.get("content") if isinstance(token, dict) else token


class HFTokenizer:
    """Text <-> ids with a Hugging Face tokenizer; same interface as t5like.data.tokenizer.Tokenizer."""

    def __init__(self, directory: str):
        self.directory = os.path.abspath(directory)
        self._load()

    def __getstate__(self):  # datasets.map pickles the tokenizer: rebuild it from the directory
        return {"directory": self.directory}

    def __setstate__(self, state):
        self.directory = state["directory"]
        self._load()

    def _load(self) -> None:
        d = self.directory
        if not has_tokenizer(d):
            raise FileNotFoundError(f"{d!r} holds no tokenizer: expected tokenizer.json, spiece.model or "
                                    "tokenizer.model (copy them from the Hugging Face checkpoint).")
        model_cfg, tok_cfg = _json(d, "config.json"), _json(d, "tokenizer_config.json")
        special = {**_json(d, "special_tokens_map.json"), **{k: v for k, v in tok_cfg.items() if k.endswith("_token")}}
        if os.path.isfile(os.path.join(d, "tokenizer.json")):
            from tokenizers import Tokenizer as Backend
            self._tok, self._sp = Backend.from_file(os.path.join(d, "tokenizer.json")), None
            self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
            vocab = self._tok.get_vocab(with_added_tokens=True)
        else:
            import sentencepiece as spm
            path = next(os.path.join(d, f) for f in SPM_FILES if os.path.isfile(os.path.join(d, f)))
            self._tok, self._sp = None, spm.SentencePieceProcessor(model_file=path)
            vocab = {self._sp.id_to_piece(i): i for i in range(self._sp.get_piece_size())}
            for token in tok_cfg.get("additional_special_tokens", []) or []:  # T5's <extra_id_k> live outside spm
                if _EXTRA_ID.match(_content(token) or "") and _content(token) not in vocab:
                    vocab[_content(token)] = None
            for k in range(int(tok_cfg.get("extra_ids", 0) or 0)):
                vocab.setdefault(f"<extra_id_{k}>", None)
            extra = sorted((int(_EXTRA_ID.match(t).group(1)) for t, i in vocab.items() if i is None))
            base = self._sp.get_piece_size()
            for k in extra:  # transformers' T5Tokenizer: <extra_id_k> = vocab_size - 1 - k
                vocab[f"<extra_id_{k}>"] = base + len(extra) - 1 - k
            self.vocab_size = base + len(extra)
        self._vocab = vocab
        self._special = {k: _content(special[k]) for k in SPECIAL_TOKEN_NAMES if _content(special.get(k)) is not None}

        def token_id(name: str) -> int:
            value = model_cfg.get(f"{name}_token_id")
            if isinstance(value, list):
                value = value[0] if value else None
            if value is None and _content(special.get(f"{name}_token")) in vocab:
                value = vocab[_content(special.get(f"{name}_token"))]
            return -1 if value is None else int(value)

        self.pad_id, self.eos_id, self.bos_id, self.unk_id = (token_id(n) for n in ("pad", "eos", "bos", "unk"))
        sentinels = sorted((int(m.group(1)), i) for t, i in vocab.items() if (m := _EXTRA_ID.match(t)))
        self._sentinels = [i for _, i in sentinels]
        mask = _content(special.get("mask_token"))
        if not self._sentinels and mask in vocab:
            self._sentinels = [vocab[mask]]  # BERT: MLM's mask is sentinel 0, as in t5like's own tokenizer
        self.num_sentinels = len(self._sentinels)
        self.piece_size = self.vocab_size - (len(sentinels))
        self.family = "encoder_decoder" if model_cfg.get("is_encoder_decoder") else (
            "encoder" if mask in vocab and model_cfg.get("model_type") == "bert" else "decoder")
        if self.family == "encoder_decoder":
            start = model_cfg.get("decoder_start_token_id")
            self.start_id = self.pad_id if start is None else int(start)
        else:
            self.start_id = self.bos_id if self._adds_bos(tok_cfg, model_cfg) else -1

    def _adds_bos(self, tok_cfg: dict, model_cfg: dict) -> bool:
        """Whether the checkpoint's own tokenizer starts every text with BOS (Llama yes, GPT-2 no)."""
        if self.bos_id < 0:
            return False
        if self._tok is not None:
            return self._tok.encode("a", add_special_tokens=True).ids[:1] == [self.bos_id]
        return bool(tok_cfg.get("add_bos_token", model_cfg.get("model_type") == "llama"))

    def sentinel_id(self, k: int) -> int:
        if not 0 <= k < self.num_sentinels:
            raise ValueError(f"sentinel {k} out of range [0, {self.num_sentinels}) for the tokenizer in "
                             f"{self.directory!r}")
        return self._sentinels[k]

    @property
    def mask_id(self) -> int:
        return self.sentinel_id(0)

    def encode(self, text: str) -> list[int]:
        if self._tok is not None:
            return self._tok.encode(text, add_special_tokens=False).ids
        return self._sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self._tok is not None:
            return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]
        return self._sp.encode(list(texts))

    def special_tokens(self) -> dict[str, str]:
        """{"bos_token": "<s>", ...}: the named special tokens the checkpoint defines, as text."""
        return dict(self._special)

    def encode_with_offsets(self, text: str):
        """(ids, offsets [n, 2]): each token's [start, end) characters in `text` (no special tokens added)."""
        import numpy as np
        if self._tok is None:
            raise ValueError(f"the tokenizer in {self.directory!r} has no tokenizer.json, which chat templates need "
                             "(to map the rendered text's turns to tokens); copy it from the checkpoint.")
        enc = self._tok.encode(text, add_special_tokens=False)
        return enc.ids, np.asarray(enc.offsets, np.int64).reshape(-1, 2)

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text, without pad/eos/bos; T5 sentinels render as <extra_id_k>."""
        drop = {self.pad_id, self.eos_id, self.bos_id} - {-1}
        ids = [int(i) for i in ids if int(i) not in drop]
        if self._tok is not None:
            return self._tok.decode(ids, skip_special_tokens=False)
        by_id = {i: t for t, i in self._vocab.items() if _EXTRA_ID.match(t)}
        out, run = [], []
        for i in ids:
            if i in by_id:
                out += [self._sp.decode(run), by_id[i]]
                run = []
            elif 0 <= i < self._sp.get_piece_size():
                run.append(i)
        return "".join(out + [self._sp.decode(run)])


def num_sentinels_of(directory: str) -> int:
    return HFTokenizer(directory).num_sentinels


def copy_tokenizer(src: str, dst: str) -> list[str]:
    """Copy the tokenizer's files (and config.json, which holds the special ids) from src to dst."""
    import shutil
    os.makedirs(dst, exist_ok=True)
    copied = [f for f in FILES if os.path.isfile(os.path.join(src, f))]
    for f in copied:
        shutil.copyfile(os.path.join(src, f), os.path.join(dst, f))
    return copied
