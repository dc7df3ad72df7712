"""Generate text from a trained run, or from a model in hand.

Command line (loads WORKDIR's latest checkpoint and tokenizer; one block per prompt on stdout):

    python -m t5like.generate --workdir RUN (--prompt TEXT ... | --prompts-file F | --chat F)
        [--strategy greedy|beam|sample] [--num-beams K] [--num-return N] [--length-penalty A]
        [--temperature T] [--top-k K] [--top-p P] [--seed S] [--max-new-tokens N]
        [--quant-weights int8|int4] [--quant-kv-cache int8]

  --quant-weights stores the weight matrices as int8 or int4 (weight-only: activations stay in the model's
  dtype) and --quant-kv-cache int8 keeps the KV cache in int8, both through qwix (t5like/quantization.py,
  docs/quantization.md); the parameter bytes saved are printed to stderr.
  --prompt may be repeated. --prompts-file holds one prompt per line, or, for a .jsonl file, one JSON
  string (or object with a "prompt" field) per line, so prompts may contain newlines.
  Decoder-only runs continue each prompt. Encoder-decoder runs feed it to the encoder: as in T5, write
  <extra_id_0>, <extra_id_1>, ... where spans are missing (they become the sentinel ids). Encoder-only
  runs do fill-mask: write `<mask>` (--mask-marker) where a token is missing; each mask gets its
  --top-k (default 5) candidates with their probabilities, and the prompt is printed filled with the best.

  --chat F answers conversations with the run's chat template (t5like.data.chat; decoder-only): F is a .json
  file holding one conversation (a list of {"role", "content"} messages, or {"messages": [...]}), or a .jsonl
  file with one a line; each gets the assistant's next turn, printed after the conversation.

Python:
    chat_completions(model, tokenizer, [[{"role": "user", "content": "hi"}]]) -> per conversation, [Completion]
    generate_text(model, tokenizer, ["def add(a, b):"], strategy="beam", num_beams=4) -> list[str]
    generate_completions(...)   -> per prompt, a list of Completion(text, ids, score), best first
    fill_mask_text(model, tokenizer, ["x = <mask> + 1"], top_k=5) -> per prompt, per mask, [(piece, prob)]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
from typing import Optional, Sequence

import numpy as np

from t5like.decoding import DecodeConfig, check_prompt_lengths, fill_mask, generate

MASK_MARKER = "<mask>"
SENTINEL = re.compile(r"<extra_id_(\d+)>")


@dataclasses.dataclass(frozen=True)
class Completion:
    text: str
    ids: tuple[int, ...]   # generated ids up to and including EOS (if any)
    score: float


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _pad_batch(rows: list[list[int]], width: int, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded [batch, width] ids and lengths; missing rows repeat row 0 (same shapes, one compile)."""
    rows = rows + [rows[0]] * (batch - len(rows))
    ids = np.zeros((batch, width), np.int32)
    for b, r in enumerate(rows):
        ids[b, :len(r)] = r
    return ids, np.array([len(r) for r in rows])


def _strip(ids: Sequence[int], eos_id: int) -> tuple[int, ...]:
    ids = [int(i) for i in ids]
    return tuple(ids[:ids.index(eos_id) + 1] if eos_id in ids else ids)


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Text -> ids, with each `<extra_id_k>` as sentinel k (T5's span marker, as `decode` renders it)."""
    ids, pos = [], 0
    for m in SENTINEL.finditer(text):
        ids += tokenizer.encode(text[pos:m.start()]) if m.start() > pos else []
        ids.append(tokenizer.sentinel_id(int(m.group(1))))
        pos = m.end()
    return ids + (tokenizer.encode(text[pos:]) if pos < len(text) else [])


def encode_prompts(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    for i, (p, ids) in enumerate(zip(prompts, encoded)):
        if not ids:
            raise ValueError(f"prompt {i} ({p!r}) is empty: it encodes to 0 tokens; give every prompt some text.")
    return encoded


def generate_completions(model, tokenizer, prompts: Sequence[str], cfg: DecodeConfig = DecodeConfig(), *,
                         seed: int = 0, batch_size: int = 16) -> list[list[Completion]]:
    """Decode every prompt; per prompt the returned beams (1 unless beam search with num_return > 1).

    Prompts run in batches of `batch_size`, padded to a multiple of 16 tokens so that prompt sets of
    similar lengths share one compiled program. Sampling draws depend on the seed and batch layout.
    EOS and BOS/decoder-start ids left as None in `cfg` are the tokenizer's (a Hugging Face checkpoint's own).
    """
    if not prompts:
        raise ValueError("no prompts given; pass at least one prompt.")
    return complete_ids(model, tokenizer, encode_prompts(tokenizer, prompts), cfg, seed=seed, batch_size=batch_size)


def complete_ids(model, tokenizer, encoded: list[list[int]], cfg: DecodeConfig = DecodeConfig(), *,
                 seed: int = 0, batch_size: int = 16) -> list[list[Completion]]:
    """generate_completions for prompts given as token ids."""
    # A tokenizer without start_id (not from a checkpoint) follows t5like's convention: BOS = pad = 0.
    cfg = cfg.validate().with_ids(tokenizer.eos_id, getattr(tokenizer, "start_id", 0))
    check_prompt_lengths(np.array([len(e) for e in encoded]), family=model.cfg.family,
                         max_len=model.cfg.max_len, cfg=cfg)
    batch = min(batch_size, len(encoded))
    out: list[list[Completion]] = []
    for start in range(0, len(encoded), batch):
        rows = encoded[start:start + batch]
        room = model.cfg.max_len - cfg.max_new_tokens - 1  # widest prompt that fits
        width = min(_round_up(max(map(len, rows)), 16), max(room, max(map(len, rows))))
        ids, lengths = _pad_batch(rows, width, batch)
        tokens_BnT, scores_Bn = generate(model, ids, lengths, cfg, rng=seed + start)
        for b in range(len(rows)):
            beams = []
            for toks, score in zip(tokens_BnT[b], scores_Bn[b]):
                kept = _strip(toks, cfg.eos_id)
                beams.append(Completion(tokenizer.decode(kept), kept, float(score)))
            out.append(beams)
    return out


def chat_completions(model, tokenizer, conversations: Sequence[list[dict]], cfg: DecodeConfig = DecodeConfig(), *,
                     seed: int = 0, batch_size: int = 16) -> list[list[Completion]]:
    """The assistant's next turn for each conversation (a list of {"role", "content"}), rendered with the
    tokenizer's chat template and its generation prompt (t5like.data.chat). The rendered ids already hold any
    BOS the template writes, so decoding adds none; it stops at the tokenizer's EOS."""
    from t5like.data.chat import chat_template, check_messages
    if not conversations:
        raise ValueError("no conversations given; pass at least one.")
    template = chat_template(tokenizer)
    encoded = []
    for i, messages in enumerate(conversations):
        at = f"conversation {i}"
        ids, _ = template.encode(check_messages(messages, at, need_assistant=False), at, add_generation_prompt=True)
        encoded.append(ids)
    return complete_ids(model, tokenizer, encoded, dataclasses.replace(cfg, start_id=-1), seed=seed,
                        batch_size=batch_size)


def generate_text(model, tokenizer, prompts: Sequence[str], *, strategy: str = "greedy", max_new_tokens: int = 64,
                  num_beams: int = 4, length_penalty: float = 0.6, temperature: float = 1.0,
                  top_k: Optional[int] = None, top_p: float = 1.0, seed: int = 0, prefix_lm: bool = False) -> list[str]:
    """One completion per prompt (the best beam for beam search), without the prompt.
    prefix_lm: the model was trained on the prefix_lm objective (read the prompt bidirectionally)."""
    cfg = DecodeConfig(strategy=strategy, max_new_tokens=max_new_tokens, num_beams=num_beams,
                       length_penalty=length_penalty, temperature=temperature, top_k=top_k, top_p=top_p,
                       prefix_lm=prefix_lm)
    return [beams[0].text for beams in generate_completions(model, tokenizer, prompts, cfg, seed=seed)]


def fill_mask_text(model, tokenizer, prompts: Sequence[str], *, top_k: int = 5,
                   marker: str = MASK_MARKER) -> list[list[list[tuple[str, float]]]]:
    """Encoder-only: for each prompt, for each `marker` in it, the top-k (piece, probability)."""
    rows, mask_positions = [], []
    for i, p in enumerate(prompts):
        pieces = p.split(marker)
        if len(pieces) == 1:
            raise ValueError(f"prompt {i} ({p!r}) has no {marker!r}; mark each missing token with {marker!r} "
                             "(or pass another --mask-marker).")
        ids, where = [], []
        for j, piece in enumerate(pieces):
            ids += encode_prompt(tokenizer, piece)
            if j < len(pieces) - 1:
                where.append(len(ids))
                ids.append(tokenizer.mask_id)
        rows.append(ids)
        mask_positions.append(where)
    width = _round_up(max(map(len, rows)), 16)
    ids, lengths = _pad_batch(rows, width, len(rows))
    top_ids, top_logp = fill_mask(model, ids, lengths, top_k=top_k)
    return [[[(tokenizer.decode([int(t)]), math.exp(float(lp))) for t, lp in zip(top_ids[b, pos], top_logp[b, pos])]
             for pos in mask_positions[b]] for b in range(len(rows))]


# Command line ----------------------------------------------------------------------------------------------

def _jsonl_prompt(path: str, n: int, line: str) -> str:
    """Line n (1-based) of a .jsonl prompts file: a JSON string, or an object with a string "prompt"."""
    fix = 'write each line as a JSON string ("def f(") or an object ({"prompt": "def f("})'
    try:
        item = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: line {n} is not valid JSON ({e.msg} at column {e.colno}); {fix}.") from None
    if isinstance(item, dict):
        if "prompt" not in item:
            raise ValueError(f"{path}: line {n} has no \"prompt\" field (its fields: {sorted(item)}); {fix}.")
        item = item["prompt"]
    if not isinstance(item, str):
        raise ValueError(f"{path}: line {n}: the prompt is {json.dumps(item)[:60]}, not text; {fix}.")
    return item


def read_conversations(path: str) -> list[list]:
    """The conversations of a --chat file (see the module docstring); their messages are checked later."""
    if not os.path.exists(path):
        raise ValueError(f"--chat {path!r} does not exist; pass a .json or .jsonl file of conversations.")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        items = ([json.loads(line) for line in text.splitlines() if line.strip()] if path.endswith(".jsonl")
                 else [json.loads(text)])
    except json.JSONDecodeError as e:
        raise ValueError(f"--chat {path!r} is not valid JSON ({e.msg}, line {e.lineno}); write a list of "
                         '{"role", "content"} messages (.json) or one such list a line (.jsonl).') from None
    out = [item["messages"] if isinstance(item, dict) and "messages" in item else item for item in items]
    if not out:
        raise ValueError(f"--chat {path!r} holds no conversations.")
    return out


def read_prompts(args) -> list[str]:
    if args.prompt:
        prompts = list(args.prompt)
    else:
        if not os.path.exists(args.prompts_file):
            raise ValueError(f"--prompts-file {args.prompts_file!r} does not exist; pass a file of prompts.")
        with open(args.prompts_file, encoding="utf-8") as f:
            lines = [line.rstrip("\n") for line in f]
        if args.prompts_file.endswith(".jsonl"):
            prompts = [_jsonl_prompt(args.prompts_file, n, line) for n, line in enumerate(lines, 1) if line.strip()]
        else:
            prompts = [line for line in lines if line.strip()]
        if not prompts:
            raise ValueError(f"--prompts-file {args.prompts_file!r} holds no prompts; put one prompt per line.")
    for i, p in enumerate(prompts):
        if not p.strip():
            raise ValueError(f"prompt {i} is empty; give every prompt some text.")
    return prompts


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m t5like.generate", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True, help="a training run's directory (its latest checkpoint is used)")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="prompt text; repeat for several")
    src.add_argument("--prompts-file", help="one prompt per line (.jsonl: one JSON string or {'prompt': ...} per line)")
    src.add_argument("--chat", help="conversations to answer with the chat template: a .json file with one (a list "
                                    "of {role, content} messages), or a .jsonl file with one a line")
    ap.add_argument("--strategy", default="greedy", choices=("greedy", "beam", "sample"))
    ap.add_argument("--num-beams", type=int, default=4)
    ap.add_argument("--num-return", type=int, default=1, help="beam: how many beams to print per prompt")
    ap.add_argument("--length-penalty", type=float, default=0.6, help="beam: alpha of ((5+len)/6)^alpha")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=None, help="sample: keep the k most likely tokens (default: "
                                                            "off); fill-mask: candidates per mask (default 5)")
    ap.add_argument("--top-p", type=float, default=1.0, help="sample: nucleus mass (1 = off)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--mask-marker", default=MASK_MARKER, help="encoder-only runs: the missing-token marker")
    ap.add_argument("--quant-weights", default="none", choices=("none", "int8", "int4"),
                    help="decode with weight-only quantized matrices (qwix; needs the t5like[quant] extra)")
    ap.add_argument("--quant-kv-cache", default="none", choices=("none", "int8"),
                    help="decode with an int8 KV cache (one scale per token and kv head)")
    return ap.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    cfg = DecodeConfig(strategy=args.strategy, max_new_tokens=args.max_new_tokens, num_beams=args.num_beams,
                       num_return=args.num_return if args.strategy == "beam" else 1,
                       length_penalty=args.length_penalty, temperature=args.temperature,
                       top_k=args.top_k, top_p=args.top_p).validate()  # bad flags fail before loading
    if args.chat:
        return _chat(args, cfg)
    prompts = read_prompts(args)
    from t5like.inference import load_for_inference
    quantized = args.quant_weights != "none" or args.quant_kv_cache != "none"
    if quantized:  # a family that cannot decode quantized is refused before the checkpoint loads
        from t5like import quantization
        from t5like.checkpoint import read_config
        quantization.check_decoding(read_config(args.workdir).model.family, args.quant_weights, args.quant_kv_cache)
    run_cfg, model, tokenizer = load_for_inference(args.workdir)
    if quantized:
        full, model = model, quantization.quantize_for_decoding(model, weights=args.quant_weights,
                                                                kv_cache=args.quant_kv_cache)
        r = quantization.memory_report(full, model)
        print(f"quantized: weights {args.quant_weights}, KV cache {args.quant_kv_cache}; parameters "
              f"{r['param_bytes'] / 2**20:.2f} MiB -> {r['quantized_param_bytes'] / 2**20:.2f} MiB "
              f"({r['saved_fraction']:.0%} saved)", file=sys.stderr)
    # A model trained as a prefix-LM reads its prompt bidirectionally, as it did in training.
    cfg = dataclasses.replace(cfg, prefix_lm=getattr(getattr(run_cfg, "data", None), "objective", "") == "prefix_lm")
    if run_cfg.model.family == "encoder":
        top_k = 5 if args.top_k is None else args.top_k
        results = fill_mask_text(model, tokenizer, prompts, top_k=top_k, marker=args.mask_marker)
        for i, (prompt, masks) in enumerate(zip(prompts, results)):
            filled = prompt
            print(f"=== prompt {i} ===\n{prompt}")
            for m, cands in enumerate(masks):
                print(f"--- {args.mask_marker} {m}: " + "  ".join(f"{piece!r} {p:.3f}" for piece, p in cands))
                filled = filled.replace(args.mask_marker, cands[0][0], 1)
            print(f"--- filled ---\n{filled}\n")
        return 0
    results = generate_completions(model, tokenizer, prompts, cfg, seed=args.seed, batch_size=args.batch_size)
    for i, (prompt, beams) in enumerate(zip(prompts, results)):
        print(f"=== prompt {i} ===\n{prompt}")
        for rank, c in enumerate(beams):
            ended = "eos" if c.ids and c.ids[-1] == tokenizer.eos_id else "max_new_tokens"
            print(f"--- completion {rank} (score {c.score:.3f}, {len(c.ids)} tokens, stop: {ended}) ---\n{c.text}")
        print()
    return 0


def _chat(args, cfg: DecodeConfig) -> int:
    conversations = read_conversations(args.chat)
    from t5like.inference import load_for_inference
    run_cfg, model, tokenizer = load_for_inference(args.workdir)
    if run_cfg.model.family != "decoder":
        raise ValueError(f"--chat answers with a decoder-only model; {args.workdir} holds a {run_cfg.model.family} "
                         "model. Use --prompt.")
    results = chat_completions(model, tokenizer, conversations, cfg, seed=args.seed, batch_size=args.batch_size)
    for i, (messages, beams) in enumerate(zip(conversations, results)):
        print(f"=== conversation {i} ===")
        for m in messages:
            print(f"[{m['role']}] {m['content']}")
        for rank, c in enumerate(beams):
            ended = "eos" if c.ids and c.ids[-1] == tokenizer.eos_id else "max_new_tokens"
            print(f"[assistant] {c.text}" + ("" if len(beams) == 1 else f"   (beam {rank}, score {c.score:.3f})")
                  + ("" if ended == "eos" else "   (stopped at --max-new-tokens)"))
        print()
    return 0


if __name__ == "__main__":
    from t5like.cli import run
    run(main)
