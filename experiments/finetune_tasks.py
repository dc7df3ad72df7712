"""Small fine-tuning tasks built from local data: lines of the Python standard library's own source.

Each writes one JSONL file (the fields t5like.data.tasks reads); swap in your own files with
data.paths=... . Examples are drawn in a fixed order (seeded), so a file is the same on every machine
with the same Python.

  line_kinds        text/label           a stripped source line -> comment | import | def | other
  line_kinds_text   input/target         a stripped source line -> "comment" | "import" | ... (text-to-text)
  signature_names   input/target         a `def` line -> the function's name (a copy task: harder; it needs
                                         positions the decoder can point with, and more steps)
  line_kind_words   prompt/completion    a stripped source line -> " comment" | " import" | ...
  line_kind_chats   messages (sft)       a 3-turn chat: two lines, each answered with its kind, then "first?",
                                         answered with the first line's kind again (it needs the history)
  line_kind_prefs   prompt/chosen/rejected (dpo)  a line + " #"; chosen: its kind, rejected: another kind
"""
from __future__ import annotations

import json
import os
import random
import re

from t5like import storage
from t5like.data.sources import stdlib_files

KINDS = ("comment", "import", "def", "other")
DEF = re.compile(r"^(?:async\s+)?def\s+([A-Za-z_][A-Za-z0-9_]*)\s*\(")


def _lines(max_files: int):
    for path in stdlib_files(max_files):
        with open(path, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if 8 <= len(line) <= 80:
                    yield line


def kind_of(line: str) -> str:
    if line.startswith("#"):
        return "comment"
    if line.startswith(("import ", "from ")) and " import " in f" {line} ":
        return "import"
    if line.startswith(("def ", "async def ", "class ")):
        return "def"
    return "other"


def _balanced(per_class: int, max_files: int, seed: int) -> list[tuple[str, str]]:
    """`per_class` distinct lines of each kind (fewer if the corpus runs out), shuffled."""
    found: dict[str, list[str]] = {k: [] for k in KINDS}
    seen = set()
    for line in _lines(max_files):
        if line not in seen:
            seen.add(line)
            found[kind_of(line)].append(line)
    rng = random.Random(seed)
    rows = []
    for kind, lines in found.items():
        rng.shuffle(lines)
        rows += [(line, kind) for line in lines[:per_class]]
    rng.shuffle(rows)
    return rows


def _write(path: str, rows: list[dict]) -> str:
    # Runs started together may build the same file: each writes its own temporary, then renames.
    storage.write_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))
    return path


def line_kinds(path: str, per_class: int = 600, max_files: int = 400, seed: int = 0) -> str:
    """Classification: 4 balanced classes, so always guessing one class scores 25%."""
    return _write(path, [{"text": line, "label": kind} for line, kind in _balanced(per_class, max_files, seed)])


def line_kind_words(path: str, per_class: int = 600, max_files: int = 400, seed: int = 0) -> str:
    """Completion: the same task as line_kinds, answered in words after the line."""
    return _write(path, [{"prompt": f"{line} #", "completion": f" {kind}"}
                         for line, kind in _balanced(per_class, max_files, seed)])


def line_kinds_text(path: str, per_class: int = 600, max_files: int = 400, seed: int = 0) -> str:
    """Seq2seq: the line_kinds task cast as text-to-text, as T5 casts classification (Raffel et al. 2020)."""
    return _write(path, [{"input": line, "target": kind} for line, kind in _balanced(per_class, max_files, seed)])


def signature_names(path: str, count: int = 2400, max_files: int = 400, seed: int = 0) -> str:
    """Seq2seq: `def name(args):` -> name. Copying the input scores 0; the most common name a few %."""
    rows, seen = [], set()
    for line in _lines(max_files):
        m = DEF.match(line)
        if m and line not in seen:
            seen.add(line)
            rows.append({"input": line, "target": m.group(1)})
    random.Random(seed).shuffle(rows)
    return _write(path, rows[:count])


SYSTEM = "Name the kind of each Python line: comment, import, def or other."


def line_kind_chats(path: str, count: int = 1200, max_files: int = 400, seed: int = 0) -> str:
    """SFT: conversations of three user turns; every answer is one of 4 kinds (balanced lines), so always
    answering the most common kind scores about 25% a turn. Half the conversations carry a system message."""
    rows = _balanced(max(count // 2, 1), max_files, seed)
    rng = random.Random(seed + 1)
    out = []
    for i in range(min(count, len(rows) // 2)):
        (a, ka), (b, kb) = rows[2 * i], rows[2 * i + 1]
        messages = [{"role": "system", "content": SYSTEM}] if rng.random() < 0.5 else []
        messages += [{"role": "user", "content": a}, {"role": "assistant", "content": ka},
                     {"role": "user", "content": b}, {"role": "assistant", "content": kb},
                     {"role": "user", "content": "first?"}, {"role": "assistant", "content": ka}]
        out.append({"messages": messages})
    return _write(path, out)


def line_kind_prefs(path: str, per_class: int = 600, max_files: int = 400, seed: int = 0) -> str:
    """DPO: the right kind is chosen by construction, a wrong one (drawn at random) rejected."""
    rng = random.Random(seed + 2)
    return _write(path, [{"prompt": f"{line} #", "chosen": f" {kind}",
                          "rejected": f" {rng.choice([k for k in KINDS if k != kind])}"}
                         for line, kind in _balanced(per_class, max_files, seed)])


def ensure(path: str, build) -> str:
    """Build the default task file on first use."""
    return path if os.path.exists(path) else build(path)
