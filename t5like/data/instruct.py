"""Instruction tuning (data.objective=sft) and preference (data.objective=dpo) batches from JSONL records.

sft   records of t5like.data.chat (chat `messages`, or instruction/input/output), rendered with the tokenizer's
      chat template. Each conversation is a document (its inputs are ids[:-1], its targets ids[1:]); documents
      are packed end to end with segment ids and positions exactly as text documents are (t5like.data.packing:
      a conversation cut by a row's end continues in the next row as a new segment). weights = 1 on the
      assistant tokens only (the template's assistant turns, end-of-turn text included), 0 elsewhere.
      Keys: inputs targets weights segment_ids positions [B, seq_len].
dpo   {"prompt", "chosen", "rejected"} records, one pair per row. A text prompt is followed directly by the
      answer text and EOS (TRL's non-conversational format; BOS first where the tokenizer reads one); a prompt
      that is a list of messages is rendered with the chat template, and the answers are then text or a list of
      assistant messages. The row holds prompt+chosen in its first seq_len/2 positions (segment 1) and
      prompt+rejected in the second half (segment 2): one forward pass scores both, as TRL concatenates them.
      weights = 1 on the answer tokens (with the EOS or end-of-turn). A pair too long for its half keeps the
      end of its prompt and the start of its answer. Keys as for sft, [B, seq_len].
The train/validation split is by a hash of the record's index, as for the other tasks.
"""
from __future__ import annotations

import numpy as np

from t5like.data import sources
from t5like.data.chat import RecordError, chat_template, check_messages, conversation, read_jsonl
from t5like.data.config import DataConfig
from t5like.data.packing import PackedTable


def _records(cfg: DataConfig, split: str):
    files = sources.resolve_paths(cfg.paths, cfg.max_files)
    records = read_jsonl(files)
    keep = sources.split_indices([str(i) for i in range(len(records))], split, cfg.validation_fraction)
    return records, keep


def records_of(cfg: DataConfig, split: str) -> list[tuple[str, dict]]:
    """[(where, record)] of a split."""
    records, keep = _records(cfg, split)
    return [records[i] for i in keep]


def training_texts(cfg: DataConfig):
    """Every text of the records, for fitting a tokenizer when none is given."""
    records, _ = _records(cfg, "all")
    for at, r in records:
        if cfg.objective == "sft":
            yield "\n".join(m["content"] for m in conversation(r, at))
        else:
            yield "\n".join(json_text(r.get(k)) for k in ("prompt", "chosen", "rejected"))


def json_text(x) -> str:
    if isinstance(x, list):
        return "\n".join(str(m.get("content", "")) if isinstance(m, dict) else str(m) for m in x)
    return str(x)


class SFTTable:
    """A split's conversations, tokenised and packed; `rows(ids)` is a batch (id -1 = padding row)."""

    def __init__(self, cfg: DataConfig, tokenizer, split: str):
        records, keep = _records(cfg, split)
        template = chat_template(tokenizer)
        inputs, targets, weights, lengths = [], [], [], []
        for at, record in records:  # every record is checked, whichever split it falls in
            ids, turn = template.encode(conversation(record, at), at)
            if len(ids) < 2:
                raise RecordError(f"{at}: the conversation renders to {len(ids)} token(s); nothing to predict.")
            inputs.append(ids[:-1])
            targets.append(ids[1:])
            weights.append(turn[1:] >= 0)
            lengths.append(len(ids) - 1)
        if len(keep) == 0:
            raise ValueError(f"the {split} split of data.paths is empty ({len(records)} records, data."
                             f"validation_fraction={cfg.validation_fraction}); add records or change the fraction.")
        pick = lambda xs: np.concatenate([np.asarray(xs[i]) for i in keep]).astype(np.int32)
        self._targets, self._weights = pick(targets), pick(weights)
        self._table = PackedTable.from_lengths(pick(inputs), np.asarray(lengths)[keep], cfg.seq_len)
        self.num_rows = self._table.num_rows
        self.num_conversations = len(keep)

    def rows(self, row_ids: np.ndarray) -> dict[str, np.ndarray]:
        row_ids = np.asarray(row_ids, np.int64)
        inputs, segment_ids, positions = self._table.rows(row_ids)
        t = self._table
        side = lambda flat: PackedTable(flat, t.doc_starts, t.row_len).rows(row_ids)[0]
        return {"inputs": inputs, "targets": side(self._targets), "weights": side(self._weights).astype(np.float32),
                "segment_ids": segment_ids, "positions": positions}


def _answer_messages(x, at: str, field: str) -> list[dict]:
    if isinstance(x, str):
        return [{"role": "assistant", "content": x}]
    msgs = check_messages(x, at, field)
    if any(m["role"] != "assistant" for m in msgs):
        raise RecordError(f"{at}: field {field!r} must be text or assistant messages only.")
    return msgs


def encode_pair(record: dict, at: str, tokenizer, template) -> tuple:
    """((ids, answer mask) of prompt+chosen, the same of prompt+rejected) of a preference record."""
    missing = [k for k in ("prompt", "chosen", "rejected") if k not in record]
    if missing:
        raise RecordError(f"{at}: a preference record needs \"prompt\", \"chosen\" and \"rejected\"; it lacks {missing}.")
    prompt, chosen, rejected = record["prompt"], record["chosen"], record["rejected"]
    if chosen == rejected:
        raise RecordError(f"{at}: \"chosen\" and \"rejected\" are the same answer ({json_text(chosen)[:60]!r}), so "
                          "the pair states no preference; fix or drop the record.")
    out = []
    if isinstance(prompt, list):
        prompt = check_messages(prompt, at, "prompt", need_assistant=False)
        for field, answer in (("chosen", chosen), ("rejected", rejected)):
            ids, turn = template.encode(prompt + _answer_messages(answer, at, field), at)
            out.append((ids, turn >= len(prompt)))
        return tuple(out)
    for field, x in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
        if not isinstance(x, str):
            raise RecordError(f"{at}: field {field!r} must be text when \"prompt\" is text (or make \"prompt\" a "
                              "list of messages for the chat template); got " + type(x).__name__ + ".")
    start = [tokenizer.start_id] if getattr(tokenizer, "start_id", 0) >= 0 else []
    p = start + tokenizer.encode(prompt)
    for answer in (chosen, rejected):
        a = tokenizer.encode(answer) + [tokenizer.eos_id]
        out.append((p + a, np.asarray([False] * len(p) + [True] * len(a))))
    return tuple(out)


def _fit(ids: list[int], mask: np.ndarray, length: int) -> tuple[list[int], np.ndarray]:
    """At most `length` tokens: the prompt (before the first answer token) loses its start, then the answer its end."""
    if len(ids) <= length:
        return ids, mask
    first = int(np.argmax(mask)) if mask.any() else len(ids)
    cut = min(len(ids) - length, max(first - 1, 0))  # keep at least one prompt token to predict from
    ids, mask = ids[cut:], mask[cut:]
    return ids[:length], mask[:length]


class PreferenceTable:
    """A split's preference pairs, one a row (see the module docstring); `rows(ids)` is a batch."""

    def __init__(self, cfg: DataConfig, tokenizer, split: str):
        records, keep = _records(cfg, split)
        template = _maybe_template(records, tokenizer)
        half = cfg.seq_len // 2
        rows = {k: [] for k in ("inputs", "targets", "weights", "segment_ids", "positions")}
        encoded = [encode_pair(r, at, tokenizer, template) for at, r in records]  # all checked, whichever split
        if len(keep) == 0:
            raise ValueError(f"the {split} split of data.paths is empty ({len(records)} records); add records or "
                             "change data.validation_fraction.")
        for i in keep:
            row = {k: np.zeros(cfg.seq_len, np.float32 if k == "weights" else np.int32) for k in rows}
            for s, (ids, mask) in enumerate(encoded[i]):
                ids, mask = _fit(ids, mask, half + 1)
                n, o = len(ids) - 1, s * half
                row["inputs"][o:o + n], row["targets"][o:o + n] = ids[:-1], ids[1:]
                row["weights"][o:o + n] = mask[1:]
                row["segment_ids"][o:o + n], row["positions"][o:o + n] = s + 1, np.arange(n)
            for k in rows:
                rows[k].append(row[k])
        self.arrays = {k: np.stack(v) for k, v in rows.items()}
        self.num_rows = len(keep)

    def rows(self, row_ids: np.ndarray) -> dict[str, np.ndarray]:
        real = row_ids >= 0
        return {k: np.where(real[:, None], v[np.where(real, row_ids, 0)], 0).astype(v.dtype)
                for k, v in self.arrays.items()}


def _maybe_template(records, tokenizer):
    """The chat template, when some record's prompt is a conversation (text pairs need none)."""
    return chat_template(tokenizer) if any(isinstance(r.get("prompt"), list) for _, r in records) else None
