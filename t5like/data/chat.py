"""Conversations: records from JSONL, and chat templates that turn them into token ids and a loss mask.

Records (one JSON object a line; errors name the file and line):
  {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}   multi-turn chat
  {"instruction": "...", "input": "...", "output": "..."}                        single turn ("input" optional)
The second becomes [user: instruction (+ a blank line + input), assistant: output].

Templates (`chat_template(tokenizer)`):
  HFChatTemplate    a Hugging Face tokenizer's own `chat_template` (chat_template.jinja, or tokenizer_config.json),
                    rendered as transformers' apply_chat_template renders it: jinja2's sandbox with trim_blocks and
                    lstrip_blocks, the loopcontrols extension, raise_exception / strftime_now, a tojson that does not
                    escape HTML, the special tokens (bos_token, eos_token, ...) as variables; the text is then
                    tokenised whole, with no special tokens added.
  SimpleTemplate    for t5like's SentencePiece tokenizers, which carry no template. Written down:
                        [BOS=0] then per message  "<|ROLE|>\n" + content + ("\n" | EOS for the assistant)
                    generation prompt "<|assistant|>\n"; each piece is encoded on its own and the ids joined.

The loss mask marks the tokens of every assistant turn: for a Hugging Face template, the characters that the
template adds when the conversation grows by that turn (the render of the turns before it plus the generation
prompt, up to the render that includes it: the content and the template's end-of-turn text), mapped to tokens
by their offsets. TRL marks the same span with `{% generation %}` tags in the template; this needs none, and
refuses a template that does not render a conversation turn by turn (each render a prefix of the next).
"""
from __future__ import annotations

import json
import os
from datetime import datetime
from typing import Optional

import numpy as np

ROLES = ("system", "user", "assistant")


class RecordError(ValueError):
    pass


def where(path: str, line: int) -> str:
    return f"{path}:{line}"


def read_jsonl(paths: list[str]) -> list[tuple[str, dict]]:
    """[(where, record)] of every non-blank line of the files; a line that is not a JSON object is refused."""
    out = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise RecordError(f"{where(path, n)} is not valid JSON ({e.msg} at column {e.colno}); write one "
                                      "JSON object a line.") from None
                if not isinstance(record, dict):
                    raise RecordError(f"{where(path, n)} is {type(record).__name__}, not a JSON object.")
                out.append((where(path, n), record))
    if not out:
        raise RecordError(f"data.paths ({paths}) hold no records.")
    return out


def check_messages(messages, at: str, field: str = "messages", need_assistant: bool = True) -> list[dict]:
    """The messages of a record, checked: a list of {role, content} with known roles and string content."""
    if not isinstance(messages, list) or not messages:
        raise RecordError(f"{at}: field {field!r} must be a non-empty list of {{\"role\", \"content\"}} objects.")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise RecordError(f"{at}: {field}[{i}] must be an object with \"role\" and \"content\"; got {m!r:.80}.")
        if m["role"] not in ROLES:
            raise RecordError(f"{at}: {field}[{i}] has unknown role {m['role']!r}; roles are {list(ROLES)}.")
        if not isinstance(m["content"], str):
            raise RecordError(f"{at}: {field}[{i}].content must be text; got {type(m['content']).__name__}.")
        out.append({"role": m["role"], "content": m["content"]})
    if need_assistant and not any(m["role"] == "assistant" for m in out):
        raise RecordError(f"{at}: the conversation in {field!r} has no assistant message, so nothing would be "
                          "trained on it; add an assistant turn or drop the record.")
    return out


def conversation(record: dict, at: str) -> list[dict]:
    """A record's messages: its `messages`, or an instruction/input/output record as one user-assistant turn."""
    if "messages" in record:
        return check_messages(record["messages"], at)
    if "instruction" in record and "output" in record:
        for k in ("instruction", "input", "output"):
            if k in record and not isinstance(record[k], str):
                raise RecordError(f"{at}: field {k!r} must be text; got {type(record[k]).__name__}.")
        user = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
        return [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]
    raise RecordError(f"{at}: a record needs \"messages\" (a list of {{role, content}}) or \"instruction\" and "
                      f"\"output\" (with an optional \"input\"); its fields are {sorted(record)}.")


# Templates ---------------------------------------------------------------------------------------------

class SimpleTemplate:
    """t5like's written-down template for tokenizers without one (see the module docstring)."""

    name = "t5like simple template"

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._headers = {r: tokenizer.encode(f"<|{r}|>\n") for r in ROLES}
        self._newline = tokenizer.encode("\n")

    def encode(self, messages: list[dict], at: str = "", add_generation_prompt: bool = False):
        """(ids, turn) [n]: turn[t] = the index of the assistant message token t belongs to, else -1."""
        ids, turn = [self.tokenizer.start_id], [-1]
        for i, m in enumerate(messages):
            body = self.tokenizer.encode(m["content"])
            head = self._headers[m["role"]]
            if m["role"] == "assistant":
                ids += head + body + [self.tokenizer.eos_id]
                turn += [-1] * len(head) + [i] * (len(body) + 1)
            else:
                ids += head + body + self._newline
                turn += [-1] * (len(head) + len(body) + len(self._newline))
        if add_generation_prompt:
            ids += self._headers["assistant"]
            turn += [-1] * len(self._headers["assistant"])
        return ids, np.asarray(turn, np.int32)


def read_chat_template(directory: str) -> Optional[str]:
    """A Hugging Face tokenizer directory's chat template: chat_template.jinja (transformers 5 writes it),
    else tokenizer_config.json's "chat_template" (a string, or a list of named ones: the "default")."""
    path = os.path.join(directory, "chat_template.jinja")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return f.read()
    cfg_path = os.path.join(directory, "tokenizer_config.json")
    if not os.path.isfile(cfg_path):
        return None
    with open(cfg_path, encoding="utf-8") as f:
        template = json.load(f).get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template


def _environment():
    try:
        import jinja2
        from jinja2.ext import Extension, loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise ImportError("chat templates need jinja2: pip install 't5like[chat]' (jinja2>=3.1.6).") from None

    class Generation(Extension):
        # transformers' {% generation %} ... {% endgeneration %} marks assistant text; here it renders its body.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env, jinja2


class HFChatTemplate:
    """A Hugging Face tokenizer's own chat template (see the module docstring)."""

    def __init__(self, tokenizer, template: str):
        self.tokenizer = tokenizer
        self.name = f"the chat template of {tokenizer.directory}"
        env, self._jinja = _environment()
        try:
            self._template = env.from_string(template)
        except self._jinja.TemplateError as e:
            raise ValueError(f"{self.name} does not compile: {e}. Fix the tokenizer's chat_template.") from None
        self._special = tokenizer.special_tokens()

    def render(self, messages: list[dict], at: str, add_generation_prompt: bool = False) -> str:
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         tools=None, documents=None, **self._special)
        except Exception as e:  # the template's own raise_exception, or any error inside it
            raise RecordError(f"{at}: {self.name} fails to render this conversation: {type(e).__name__}: {e}") \
                from None

    def encode(self, messages: list[dict], at: str = "", add_generation_prompt: bool = False):
        """(ids, turn) [n]: turn[t] = the index of the assistant message token t belongs to, else -1."""
        text = self.render(messages, at, add_generation_prompt)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self.render(messages[:i], at, add_generation_prompt=True)
            upto = self.render(messages[:i + 1], at)
            if not (upto.startswith(before) and text.startswith(upto)):
                raise RecordError(f"{at}: {self.name} does not render this conversation turn by turn (the render of "
                                  f"its first {i} messages with the generation prompt is not the start of the render "
                                  f"with message {i}, or that is not the start of the whole), so the assistant turn's "
                                  "tokens cannot be located for the loss.")
            spans.append((len(before), len(upto), i))
        ids, offsets = self.tokenizer.encode_with_offsets(text)
        turn = np.full(len(ids), -1, np.int32)
        for a, b, i in spans:
            turn[(offsets[:, 0] < b) & (offsets[:, 1] > a)] = i
        return ids, turn


def chat_template(tokenizer):
    """The template conversations are rendered with for `tokenizer` (see the module docstring)."""
    directory = getattr(tokenizer, "directory", None)
    if directory is None:
        return SimpleTemplate(tokenizer)
    template = read_chat_template(directory)
    if not template:
        raise ValueError(f"the Hugging Face tokenizer in {directory} has no chat_template (chat_template.jinja or "
                         "tokenizer_config.json's \"chat_template\"); add the checkpoint's template there.")
    return HFChatTemplate(tokenizer, template)
