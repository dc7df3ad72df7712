"""Tests for t5like.data: tokenizer, packing, objectives, resume, sharding, sources and bad input."""
import dataclasses
import json
import os

import numpy as np
import pytest

from t5like.data import DataConfig, Tokenizer, batch_shapes, get_tokenizer, make_iterator
from t5like.data import sources
from t5like.data.__main__ import main as cli_main
from t5like.data.objectives import EOS_ID, random_spans_noise_mask, span_corruption_lengths
from t5like.data.packing import PackedTable, StreamPacker

VOCAB = 512  # 412 SentencePiece pieces + 100 sentinels
OBJECTIVES = ("lm", "prefix_lm", "mlm", "span_corruption")
KEYS = {
    "lm": {"inputs", "targets", "weights", "segment_ids", "positions", "target_bytes"},
    "prefix_lm": {"inputs", "targets", "weights", "segment_ids", "positions", "prefix", "target_bytes"},
    "mlm": {"inputs", "targets", "weights", "segment_ids", "positions"},
    "span_corruption": {"encoder_inputs", "encoder_segment_ids", "encoder_positions", "decoder_inputs", "targets",
                        "weights", "decoder_segment_ids", "decoder_positions"},
}
DOCS = [  # small corpus with code-like whitespace, unicode and a long document that spans many rows
    "def f(x):\n    return x + 1\n",
    "Grüße, 世界! tabs\tand  double  spaces\n\n",
    "class A:\n    pass\n" * 40,
    "one line",
    "x = [1, 2, 3]  # comment\n",
    "if __name__ == '__main__':\n\tmain()\n",
]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("hf_cache"))


@pytest.fixture(scope="module")
def stdlib_cfg(cache_dir):
    return DataConfig(source="stdlib", max_files=30, seq_len=64, validation_fraction=0.1, cache_dir=cache_dir,
                      tokenizer_train_chars=200_000)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="module")
def tok(stdlib_cfg, workdir):
    return get_tokenizer(stdlib_cfg, workdir, VOCAB)


@pytest.fixture(scope="module")
def docs_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("docs")
    for i, text in enumerate(DOCS):
        (d / f"doc{i}.txt").write_text(text, encoding="utf-8")
    return d


@pytest.fixture(scope="module")
def small_cfg(docs_dir, cache_dir):
    """Six text files, few rows: epochs are short, so iterators cross epoch boundaries quickly."""
    return DataConfig(source="files", paths=(str(docs_dir / "*.txt"),), seq_len=16, validation_fraction=0.0,
                      cache_dir=cache_dir)


def _it(cfg, tok, split="train", batch_size=4, seed=0, **kw):
    return make_iterator(cfg, tok, split, batch_size=batch_size, seed=seed, process_index=kw.pop("process_index", 0),
                         process_count=kw.pop("process_count", 1), **kw)


def _docs_in(tokens):
    """Split a flat token stream at EOS into documents (SentencePiece never emits EOS inside text)."""
    docs, cur = [], []
    for t in tokens.tolist():
        cur.append(t)
        if t == EOS_ID:
            docs.append(tuple(cur))
            cur = []
    assert not cur, "stream must end with EOS"
    return docs


# ----------------------------------------------------------------------------- tokenizer

def test_tokenizer_conventions_and_roundtrip(tok, stdlib_cfg, workdir):
    assert (tok.pad_id, tok.eos_id, tok.unk_id, tok.bos_id) == (0, 1, 2, -1)
    assert tok.vocab_size == VOCAB and tok.piece_size == VOCAB - 100
    assert tok.sentinel_id(0) == VOCAB - 1 and tok.sentinel_id(99) == VOCAB - 100 and tok.mask_id == VOCAB - 1
    texts = list(sources.load_documents(stdlib_cfg, "train")["text"][:10]) + DOCS
    for text in texts:
        ids = tok.encode(text)
        assert tok.decode(ids) == text  # whitespace, newlines and non-ASCII survive exactly
        assert max(ids) < tok.piece_size and EOS_ID not in ids and 0 not in ids
    assert tok.decode([5, tok.sentinel_id(3), 6]).count("<extra_id_3>") == 1
    all_ids = [i for t in texts for i in tok.encode(t)]
    assert all_ids.count(tok.unk_id) == 0
    assert len(all_ids) < 0.7 * sum(map(len, texts))  # it learned multi-character pieces

    # Reused, not retrained, on the next call; a different vocab_size is refused with a fix.
    model = os.path.join(workdir, "tokenizer", "spm.model")
    mtime = os.path.getmtime(model)
    assert get_tokenizer(stdlib_cfg, workdir, VOCAB).encode("abc") == tok.encode("abc")
    assert os.path.getmtime(model) == mtime
    with pytest.raises(ValueError, match=r"vocab_size=1024.*delete"):
        get_tokenizer(stdlib_cfg, workdir, 1024)
    # Picklable (datasets.map with num_proc > 1 needs it).
    import pickle
    assert pickle.loads(pickle.dumps(tok)).encode(DOCS[1]) == tok.encode(DOCS[1])


def test_cli_train_tokenizer(tmp_path):
    out = tmp_path / "tok"
    assert cli_main(["train-tokenizer", "--out", str(out), "--vocab-size", "600", "--max-files", "8"]) == 0
    t = Tokenizer.from_file(str(out / "spm.model"), 600, 100)
    assert t.piece_size == 500 and t.decode(t.encode(DOCS[0])) == DOCS[0]
    assert json.loads((out / "meta.json").read_text())["vocab_size"] == 600


# ----------------------------------------------------------------------------- packing

def test_packing_keeps_every_token_once():
    rng = np.random.default_rng(0)
    docs = [np.append(rng.integers(3, 100, n), EOS_ID) for n in rng.integers(0, 50, 40)]
    docs.append(np.append(rng.integers(3, 100, 200), EOS_ID))  # longer than several rows
    table = PackedTable.from_lengths(np.concatenate(docs), [len(d) for d in docs], row_len=16)
    tokens, seg, pos = table.rows(np.arange(table.num_rows))
    assert tokens.shape == (table.num_rows, 16)
    assert (seg[:-1] > 0).all()  # only the last row has padding
    # Cut rows into segments; glue a segment to the previous one when it continues a cut document.
    recovered, cur = [], []
    for r in range(table.num_rows):
        for s in range(1, seg[r].max() + 1):
            m = seg[r] == s
            assert (pos[r][m] == np.arange(m.sum())).all()  # positions restart at each segment
            assert np.flatnonzero(m).max() - np.flatnonzero(m).min() + 1 == m.sum()  # contiguous
            cur += tokens[r][m].tolist()
            if cur[-1] == EOS_ID:
                recovered.append(cur)
                cur = []
        assert (np.diff(seg[r][seg[r] > 0]) >= 0).all()
    assert not cur
    assert recovered == [d.tolist() for d in docs]
    # A padding row (id -1) is all zeros.
    assert not any(a.any() for a in table.rows(np.array([-1])))


def test_stream_packer_matches_table():
    rng = np.random.default_rng(1)
    docs = [np.append(rng.integers(3, 100, n), EOS_ID) for n in rng.integers(0, 40, 30)]
    table = PackedTable.from_lengths(np.concatenate(docs), [len(d) for d in docs], row_len=8)
    packer, got = StreamPacker(8), []
    for d in docs:
        packer.add(d)
        while packer.num_tokens >= 6 * 8:  # leaves several whole documents in the buffer
            got.append(packer.pop_rows(2))
            state = json.loads(json.dumps(packer.state()))
            packer = StreamPacker(8)
            packer.restore(state)  # the carry-over buffer survives a round trip
    got.append(packer.pop_rows(-(-packer.num_tokens // 8)))
    for want, have in zip(table.rows(np.arange(table.num_rows)), (np.concatenate(x) for x in zip(*got))):
        np.testing.assert_array_equal(want, have)


def test_pipeline_packs_each_document_exactly_once(small_cfg, tok):
    it = _it(small_cfg, tok, batch_size=4)
    # The packed table holds the documents, each followed by EOS.
    assert sorted(_docs_in(it.table.tokens)) == sorted(tuple(tok.encode(d) + [EOS_ID]) for d in DOCS)
    # One epoch of the shuffled iterator visits every row exactly once.
    n = it.num_rows
    rows = np.concatenate([next(it)["targets"] for _ in range(-(-2 * n // 4))])
    want = it.table.rows(np.arange(n))[0]
    for epoch in rows[:n], rows[n:2 * n]:
        assert sorted(map(tuple, epoch.tolist())) == sorted(map(tuple, want.tolist()))
    assert not np.array_equal(rows[:n], want)  # ...in a shuffled order
    assert not np.array_equal(rows[:n], rows[n:2 * n])  # ...reshuffled every epoch


# ----------------------------------------------------------------------------- objectives

@pytest.mark.parametrize("objective", OBJECTIVES)
def test_batch_keys_shapes_dtypes(small_cfg, tok, objective):
    cfg = dataclasses.replace(small_cfg, objective=objective)
    batch = next(_it(cfg, tok, batch_size=3))
    assert set(batch) == KEYS[objective]
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == batch_shapes(cfg, 3)
    target_len = span_corruption_lengths(cfg)[1] if objective == "span_corruption" else 16
    for k, v in batch.items():
        length = 16 if k.startswith("encoder") or (objective != "span_corruption") else target_len
        assert v.shape == (3, length), k
        assert v.dtype == (np.float32 if k == "weights" else np.int32), k


def test_lm_inputs_targets_segments_positions(small_cfg, tok):
    cfg = dataclasses.replace(small_cfg, seq_len=32)
    rows = _it(cfg, tok).num_rows
    batch = next(_it(cfg, tok, batch_size=rows))  # the whole corpus
    inp, tgt, w, seg, pos = (batch[k] for k in ("inputs", "targets", "weights", "segment_ids", "positions"))
    assert (w == (seg > 0)).all()
    assert (seg[:, 1:] > seg[:, :-1]).sum() >= 4  # the checks below see segment starts mid-row
    for b in range(rows):
        for t in range(32):
            if seg[b, t] == 0:
                assert inp[b, t] == tgt[b, t] == pos[b, t] == 0
            elif t == 0 or seg[b, t] != seg[b, t - 1]:
                assert pos[b, t] == 0 and inp[b, t] == 0  # BOS at every segment start
                assert seg[b, t] == (1 if t == 0 else seg[b, t - 1] + 1)
                if t > 0:
                    assert tgt[b, t - 1] == EOS_ID  # the previous document ended here
            else:
                assert pos[b, t] == pos[b, t - 1] + 1 and inp[b, t] == tgt[b, t - 1]


def test_lm_rows_cover_documents_in_order(stdlib_cfg, tok):
    # The unshuffled validation pass reproduces the validation documents token for token.
    it = _it(stdlib_cfg, tok, "validation", batch_size=8)
    batches = list(it)
    stream = np.concatenate([b["targets"][b["weights"] > 0] for b in batches])
    texts = sources.load_documents(stdlib_cfg, "validation")["text"]
    assert [tok.decode(d) for d in _docs_in(stream)] == list(texts)
    # Finite, deterministic and repeatable.
    again = list(it)
    assert len(again) == len(batches) and all(np.array_equal(a["inputs"], b["inputs"]) for a, b in zip(again, batches))
    padded = list(_it(stdlib_cfg, tok, "validation", batch_size=8, num_batches=len(batches) + 2))
    assert len(padded) == len(batches) + 2 and not padded[-1]["weights"].any()


def test_prefix_lm(stdlib_cfg, tok):
    cfg = dataclasses.replace(stdlib_cfg, objective="prefix_lm")
    batch = next(_it(cfg, tok, batch_size=8))
    lm = next(_it(dataclasses.replace(stdlib_cfg, objective="lm"), tok, batch_size=8))
    for k in ("inputs", "targets", "segment_ids", "positions"):
        np.testing.assert_array_equal(batch[k], lm[k])  # same rows, same causal layout
    prefix, w, seg, pos = batch["prefix"].astype(bool), batch["weights"], batch["segment_ids"], batch["positions"]
    assert not (prefix & (w > 0)).any()  # prefix positions are never scored
    assert ((w > 0) | prefix | (seg == 0)).all()
    splits = []
    for b in range(8):
        for s in range(1, seg[b].max() + 1):
            m = seg[b] == s
            k = prefix[b][m].sum()
            assert (prefix[b][m] == (pos[b][m] < k)).all()  # the prefix is the start of the segment
            if m.sum() >= 2:
                assert 1 <= k <= m.sum() - 1
                splits.append(k / m.sum())
    assert len(set(splits)) > 3  # split points are random


def test_span_corruption_statistics_and_reconstruction(stdlib_cfg, tok):
    cfg = dataclasses.replace(stdlib_cfg, objective="span_corruption", seq_len=128)
    raw_len, target_len = span_corruption_lengths(cfg)
    assert (raw_len, target_len) == (141, 29)
    assert span_corruption_lengths(dataclasses.replace(cfg, seq_len=512)) == (568, 114)  # T5's numbers
    it = _it(cfg, tok, "validation", batch_size=16)
    noise = nonnoise = 0
    span_lengths = []
    for i, batch in zip(range(6), it):
        raw = it.table.rows(np.arange(16 * i, 16 * i + 16))[0]
        for b in range(16):
            enc = batch["encoder_inputs"][b][batch["encoder_segment_ids"][b] > 0]
            dec = batch["targets"][b][batch["weights"][b] > 0]
            np.testing.assert_array_equal(batch["decoder_inputs"][b][1:], batch["targets"][b][:-1])
            assert batch["decoder_inputs"][b][0] == 0
            if not len(enc):
                continue
            assert enc[-1] == EOS_ID and dec[-1] == EOS_ID
            sentinels = [t for t in enc[:-1] if t >= tok.vocab_size - 100]
            assert sentinels == list(range(tok.vocab_size - 1, tok.vocab_size - 1 - len(sentinels), -1))
            assert [t for t in dec[:-1] if t >= tok.vocab_size - 100] == sentinels
            assert dec[0] == tok.vocab_size - 1  # targets start with the first sentinel
            # Put the spans back: inputs + targets reconstruct the original chunk.
            spans, cur = {}, None
            for t in dec[:-1]:
                if t >= tok.vocab_size - 100:
                    cur = spans.setdefault(t, [])
                else:
                    cur.append(t)
            rebuilt = [x for t in enc[:-1] for x in (spans[t] if t in spans else [t])]
            row = raw[b][raw[b] > 0]  # pad (0) only ever fills the end of the last row
            assert rebuilt == row.tolist()
            if len(row) == raw_len:
                assert len(enc) in (128, 127)  # full rows fill the encoder
            noise += sum(map(len, spans.values()))
            nonnoise += len(row) - sum(map(len, spans.values()))
            span_lengths += [len(s) for s in spans.values()]
    assert abs(noise / (noise + nonnoise) - 0.15) < 0.01
    assert abs(np.mean(span_lengths) - 3.0) < 0.3 and np.std(span_lengths) > 0.5  # random span lengths


def test_noise_mask_matches_t5_counts():
    rng = np.random.default_rng(0)
    for n in (2, 3, 10, 141, 568):
        masks = [random_spans_noise_mask(n, 0.15, 3.0, rng) for _ in range(20)]
        for m in masks:
            assert m.sum() == min(max(round(n * 0.15), 1), n - 1)
            assert not m[0] and m[-1]  # starts with non-noise, ends with noise (T5)
    assert len({tuple(m) for m in masks}) > 1


def test_mlm_rates(stdlib_cfg, small_cfg, tok):
    cfg = dataclasses.replace(stdlib_cfg, objective="mlm")
    it = _it(cfg, tok, batch_size=32)
    batches = [next(it) for _ in range(4)]
    inp = np.concatenate([b["inputs"] for b in batches])
    tgt = np.concatenate([b["targets"] for b in batches])
    sel = np.concatenate([b["weights"] for b in batches]) > 0
    seg = np.concatenate([b["segment_ids"] for b in batches])
    candidates = (seg > 0) & (tgt != EOS_ID)
    assert not (sel & ~candidates).any()  # never padding or EOS
    assert (inp[~sel] == tgt[~sel]).all()
    assert abs(sel.sum() / candidates.sum() - 0.15) < 0.02
    masked = (inp == tok.mask_id) & sel
    kept = (inp == tgt) & sel
    randomized = sel & ~masked & ~kept
    assert abs(masked.sum() / sel.sum() - 0.8) < 0.04
    assert abs(kept.sum() / sel.sum() - 0.1) < 0.03
    assert abs(randomized.sum() / sel.sum() - 0.1) < 0.03
    assert (inp[randomized] >= 3).all() and (inp[randomized] < tok.piece_size).all()
    # EOS is never selected (checked where there are many of them).
    it = _it(dataclasses.replace(small_cfg, objective="mlm"), tok, batch_size=32)
    batches = [next(it) for _ in range(16)]
    eos = np.concatenate([b["targets"] == EOS_ID for b in batches])
    assert eos.sum() > 50 and not np.concatenate([b["weights"] for b in batches])[eos].any()


# ----------------------------------------------------------------------------- resume and determinism

@pytest.mark.parametrize("objective", OBJECTIVES)
def test_resume_is_exact(small_cfg, tok, objective):
    cfg = dataclasses.replace(small_cfg, objective=objective)
    it = _it(cfg, tok, batch_size=5, seed=7)
    for _ in range(7):
        next(it)
    state = json.loads(json.dumps(it.state()))
    want = [next(it) for _ in range(8)]
    assert state["epoch"] == 0 and it.state()["epoch"] >= 1  # the resumed stretch crosses an epoch boundary
    fresh = _it(cfg, tok, batch_size=5, seed=7)
    fresh.restore(state)
    for a, b in zip(want, (next(fresh) for _ in range(8))):
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    # A different seed gives different batches; a changed batch size is refused.
    other = _it(cfg, tok, batch_size=5, seed=8)
    assert any(not np.array_equal(next(other)[k], v) for k, v in next(_it(cfg, tok, batch_size=5, seed=7)).items())
    with pytest.raises(ValueError, match="batch_size"):
        _it(cfg, tok, batch_size=4).restore(state)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_eval_pass_pads_with_zero_weight_rows(small_cfg, tok, objective):
    """More eval batches than validation rows: the pass ends in padding rows that carry no weight,
    also for the random objectives, whose per-row noise is seeded from the row id."""
    cfg = dataclasses.replace(small_cfg, objective=objective, validation_fraction=0.5)
    num_rows = sum(len(b["targets"]) for b in _it(cfg, tok, "validation", batch_size=4))
    it = _it(cfg, tok, "validation", batch_size=4, num_batches=num_rows // 4 + 3)
    batches = list(it)
    assert len(batches) == num_rows // 4 + 3
    assert batches[-1]["weights"].sum() == 0
    assert (batches[-1]["targets"] == 0).all()


@pytest.mark.parametrize("objective, key", [("span_corruption", "encoder_inputs"), ("mlm", "inputs")])
def test_random_objective_noise_changes_per_epoch(small_cfg, tok, objective, key):
    # seq_len 64: with a single noise span per row (seq_len 16) T5's mask has no freedom at all.
    cfg = dataclasses.replace(small_cfg, objective=objective, seq_len=64, shuffle=False)
    it = _it(cfg, tok, batch_size=1)
    first = [next(it)[key] for _ in range(it.num_rows)]
    second = [next(it)[key] for _ in range(it.num_rows)]
    assert sum(not np.array_equal(a, b) for a, b in zip(first, second)) > len(first) // 2


# ----------------------------------------------------------------------------- splits and hosts

def test_train_validation_disjoint_and_hosts_partition(stdlib_cfg, tok):
    files = sources.stdlib_files(30)
    text = [open(f, encoding="utf-8").read() for f in files]
    keys = sources._relative_keys(files)
    train, val = (sources.split_indices(keys, s, 0.1) for s in ("train", "validation"))
    assert len(val) and not set(train) & set(val) and sorted([*train, *val]) == list(range(len(files)))
    assert list(sources.load_documents(stdlib_cfg, "train")["text"]) == [text[i] for i in train]
    assert list(sources.load_documents(stdlib_cfg, "validation")["text"]) == [text[i] for i in val]
    shares = [sources.host_share(train, i, 2) for i in range(2)]
    assert len(shares[0]) and len(shares[1]) and not set(shares[0]) & set(shares[1])
    assert sorted([*shares[0], *shares[1]]) == list(train)
    for i in range(2):
        assert list(sources.load_documents(stdlib_cfg, "train", i, 2)["text"]) == [text[j] for j in shares[i]]

def test_hosts_take_their_rows_of_one_global_order(stdlib_cfg, tok):
    """Local sources: host h of n yields rows [h*B/n, (h+1)*B/n) of the one-host global batch, so a run's
    data, its random masks and its saved position do not depend on the host count."""
    cfg = dataclasses.replace(stdlib_cfg, objective="span_corruption")
    whole = _it(cfg, tok, batch_size=4)
    hosts = [_it(cfg, tok, batch_size=2, process_index=i, process_count=2) for i in range(2)]
    for _ in range(3):
        full, parts = next(whole), [next(h) for h in hosts]
        for key in full:
            np.testing.assert_array_equal(full[key], np.concatenate([p[key] for p in parts]))
        assert not np.array_equal(parts[0]["encoder_inputs"], parts[1]["encoder_inputs"])  # masks differ by host
    assert hosts[0].state() == hosts[1].state() == {**whole.state(), "batch_size": 4}


def test_split_is_stable_and_independent_of_location():
    keys = [f"pkg/mod{i}.py" for i in range(200)]
    val = sources.split_indices(keys, "validation", 0.1)
    np.testing.assert_array_equal(val, sources.split_indices(list(keys), "validation", 0.1))
    assert 5 < len(val) < 40
    assert set(val).isdisjoint(sources.split_indices(keys, "train", 0.1))
    rel = sources._relative_keys([f"/mnt/a/corpus/{k}" for k in keys])
    assert rel == sources._relative_keys([f"/data/corpus/{k}" for k in keys])
    # Tiny corpora still get one validation document.
    assert len(sources.split_indices(["a", "b"], "validation", 0.02)) == 1


# ----------------------------------------------------------------------------- sources and formats

def _write_formats(d):
    import pandas as pd

    texts = DOCS
    (d / "a.json").write_text(json.dumps([{"text": t, "id": i} for i, t in enumerate(texts)]))
    (d / "a.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in texts))
    pd.DataFrame({"text": texts}).to_csv(d / "a.csv", index=False)
    pd.DataFrame({"text": texts}).to_parquet(d / "a.parquet")
    return {"json": ("a.json", "text"), "jsonl": ("a.jsonl", "body"), "csv": ("a.csv", "text"),
            "parquet": ("a.parquet", "text")}


@pytest.mark.parametrize("fmt", ["json", "jsonl", "csv", "parquet"])
def test_structured_formats_load(tmp_path, cache_dir, tok, fmt):
    name, field = _write_formats(tmp_path)[fmt]
    cfg = DataConfig(source="files", paths=(str(tmp_path / name),), format=fmt, text_field=field, seq_len=16,
                     validation_fraction=0.0, cache_dir=cache_dir)
    it = _it(cfg, tok)
    assert sorted(tok.decode(d) for d in _docs_in(it.table.tokens)) == sorted(DOCS)
    with pytest.raises(ValueError, match="data.text_field='nope'.*columns"):
        _it(dataclasses.replace(cfg, text_field="nope"), tok)


@pytest.mark.filterwarnings("ignore:os.fork")  # the workers only run SentencePiece, never JAX
def test_tokenize_with_worker_processes(stdlib_cfg, tok, tmp_path):
    one = _it(stdlib_cfg, tok).table
    two = _it(dataclasses.replace(stdlib_cfg, num_proc=2, cache_dir=str(tmp_path)), tok).table
    np.testing.assert_array_equal(one.tokens, two.tokens)
    np.testing.assert_array_equal(one.doc_starts, two.doc_starts)


def test_text_files_one_document_per_file(small_cfg, tok):
    texts = sorted(sources.load_documents(small_cfg, "train")["text"])
    assert texts == sorted(DOCS)


def test_streaming_source_matches_local_and_resumes(tmp_path, cache_dir, tok):
    # source="hub" with a packaged builder + data_files exercises the real streaming path offline.
    for i in range(2):
        (tmp_path / f"part{i}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCS[i::2]))
    paths = tuple(str(tmp_path / f"part{i}.jsonl") for i in range(2))
    # mlm: the row-keyed noise must survive the resume too.
    stream_cfg = DataConfig(source="hub", hub_name="json", paths=paths, text_field="text", seq_len=16,
                            shuffle=False, cache_dir=cache_dir, objective="mlm")
    local_cfg = DataConfig(source="files", paths=paths, format="jsonl", seq_len=16, shuffle=False,
                           validation_fraction=0.0, cache_dir=cache_dir, objective="mlm")
    stream, local = _it(stream_cfg, tok, batch_size=3), _it(local_cfg, tok, batch_size=3)
    for _ in range(4):  # same packing, so the same rows (until the local epoch ends with a padded row)
        a, b = next(stream), next(local)
        assert all(np.array_equal(a[k], b[k]) for k in a)
    state = json.loads(json.dumps(stream.state()))
    assert state["stream"] is not None and len(state["buffer"]) <= 2  # the carry-over buffer stays small
    want = [next(stream) for _ in range(25)]
    assert stream.state()["epoch"] >= 1  # the stretch after the checkpoint re-reads the stream
    fresh = _it(stream_cfg, tok, batch_size=3)
    fresh.restore(state)
    assert fresh.state() == state
    for a in want:
        b = next(fresh)
        assert all(np.array_equal(a[k], b[k]) for k in a)
    # A finite pass (the eval path) reads each document once, in order, and can be repeated.
    stream_cfg = dataclasses.replace(stream_cfg, objective="lm")
    val = _it(dataclasses.replace(stream_cfg, hub_validation_split="train"), tok, "validation", batch_size=4)
    passes = [np.concatenate([b["targets"][b["weights"] > 0] for b in val]) for _ in range(2)]
    np.testing.assert_array_equal(passes[0], passes[1])
    assert [tok.decode(d) for d in _docs_in(passes[0])] == DOCS[0::2] + DOCS[1::2]
    # Two hosts read disjoint files that together are the whole corpus, and each packs only its own.
    shares = [[ex["text"] for ex in sources.open_stream(stream_cfg, "train", i, 2, shuffle=False, seed=0)]
              for i in range(2)]
    assert shares[0] and shares[1] and not set(shares[0]) & set(shares[1])
    assert sorted(shares[0] + shares[1]) == sorted(DOCS)
    it = _it(stream_cfg, tok, batch_size=2, process_index=1, process_count=2)
    seen = np.concatenate([b["targets"][b["weights"] > 0] for b in (next(it) for _ in range(6))])
    seen = seen[: np.flatnonzero(seen == EOS_ID)[-1] + 1]
    assert set(shares[1]) == {tok.decode(d) for d in _docs_in(seen)}


# ----------------------------------------------------------------------------- bad input

def test_missing_path(tmp_path, tok):
    cfg = DataConfig(source="files", paths=(str(tmp_path / "nope.txt"),))
    with pytest.raises(FileNotFoundError, match=r"data\.paths.*nope\.txt"):
        _it(cfg, tok)


def test_empty_file(tmp_path, tok, cache_dir):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match=r"empty\.txt is empty"):
        _it(DataConfig(source="files", paths=(str(tmp_path / "empty.txt"),), cache_dir=cache_dir), tok)
    (tmp_path / "blank.jsonl").write_text(json.dumps({"text": ""}) + "\n")
    with pytest.raises(ValueError, match="no text"):
        _it(DataConfig(source="files", paths=(str(tmp_path / "blank.jsonl"),), format="jsonl",
                       validation_fraction=0.0, cache_dir=cache_dir), tok)


def test_non_utf8_file(tmp_path, tok, cache_dir):
    (tmp_path / "latin1.txt").write_bytes("ok ".encode() * 1000 + "café".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.txt is not UTF-8: invalid byte at offset 3003.*convert"):
        _it(DataConfig(source="files", paths=(str(tmp_path / "latin1.txt"),), cache_dir=cache_dir), tok)


def test_vocab_too_large(tmp_path, cache_dir):
    (tmp_path / "small.txt").write_text("def f(x):\n    return x * 2\n" * 50)
    cfg = DataConfig(source="files", paths=(str(tmp_path / "small.txt"),), validation_fraction=0.0,
                     cache_dir=cache_dir)
    with pytest.raises(ValueError, match=r"vocab_size=8000 is too large.*at most \d+ pieces.*<= \d+.*Fix"):
        get_tokenizer(cfg, str(tmp_path / "run"), 8000)
    assert not os.path.exists(tmp_path / "run" / "tokenizer")  # nothing half-written


@pytest.mark.parametrize("change, match", [
    ({"objective": "gpt"}, r"data\.objective='gpt' is not one of"),
    ({"source": "web"}, r"data\.source='web'"),
    ({"format": "xml"}, r"data\.format='xml'"),
    ({"noise_density": 1.5}, r"data\.noise_density=1\.5 must be strictly between 0 and 1"),
    ({"mlm_probability": 0.0}, r"data\.mlm_probability=0\.0"),
    ({"seq_len": "128"}, r"data\.seq_len='128' has the wrong type"),
    ({"paths": "corpus.txt"}, r"data\.paths='corpus\.txt' has the wrong type.*tuple"),
    ({"source": "files"}, r"data\.paths is empty"),
    ({"objective": "span_corruption", "target_len": 5}, r"data\.target_len=5 is too short.*>= 29"),
    ({"objective": "span_corruption", "num_sentinels": 3}, r"data\.num_sentinels=3 is fewer than the \d+ noise spans"),
    ({"tokenizer_path": "/no/such/spm.model"}, r"data\.tokenizer_path='/no/such/spm\.model' does not exist"),
])
def test_config_validation(change, match):
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        dataclasses.replace(DataConfig(), **change).validate()
    DataConfig().validate()  # the defaults are valid


def test_iterator_argument_errors(small_cfg, tok):
    with pytest.raises(ValueError, match="split='test'"):
        _it(small_cfg, tok, split="test")
    with pytest.raises(ValueError, match="batch_size=0"):
        _it(small_cfg, tok, batch_size=0)
    with pytest.raises(ValueError, match="process_index=2"):
        _it(small_cfg, tok, process_index=2, process_count=2)
    with pytest.raises(ValueError, match="validation split of 6 documents is empty"):
        _it(small_cfg, tok, split="validation")
    with pytest.raises(ValueError, match="host 7 of 8 gets none"):
        sources.load_documents(small_cfg, "train", 7, 8)


def test_bad_jsonl_line_is_named_with_file_and_line(tmp_path, cache_dir):
    from t5like.data.sources import load_documents
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCS))
    (tmp_path / "b.jsonl").write_text('{"text": "x = 1"}\n\n{"text": "y = 2"}\n{"text": oops}\n')
    cfg = DataConfig(source="files", paths=(str(tmp_path / "*.jsonl"),), format="jsonl", validation_fraction=0.0,
                     cache_dir=cache_dir)
    with pytest.raises(ValueError, match=r"b\.jsonl: line 4 is not valid JSON .*'\{\"text\": oops\}'.*fix or delete"):
        load_documents(cfg, "train")
    (tmp_path / "b.jsonl").write_text('{"text": "x = 1"}\n"just a string"\n')
    with pytest.raises(ValueError, match=r"b\.jsonl: line 2 is a JSON string, not an object such as \{\"text\""):
        load_documents(cfg, "train")


def test_one_document_cannot_be_split_says_so(tmp_path, cache_dir):
    from t5like.data.sources import load_documents
    (tmp_path / "one.txt").write_text("x = 1\n")
    cfg = DataConfig(source="files", paths=(str(tmp_path / "one.txt"),), validation_fraction=0.02, cache_dir=cache_dir)
    assert len(load_documents(cfg, "train")) == 1
    with pytest.raises(ValueError) as e:
        load_documents(cfg, "validation")
    msg = str(e.value)
    assert "validation_fraction=0.02" in msg and "single document" in msg and "at least 2" in msg, msg
    assert "validation_fraction=0 " not in msg
