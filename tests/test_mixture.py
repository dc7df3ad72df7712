"""Weighted data mixtures (data.mixture, data.mixture_stages): proportions, stages, host-count invariant resume,
bad input. The training-loop side (bitwise resume after SIGKILL, per-source eval rows) is in test_observability."""
import json
import math
import types

import numpy as np
import pytest

from t5like import train
from t5like.data import DataConfig, get_tokenizer, make_iterator

WORDS = {"web": "apple banana cherry", "code": "dog elephant fox", "books": "green house island"}


def write_sources(root) -> dict[str, str]:
    """Three sources whose documents each repeat their own words, so a row shows which source it came from."""
    dirs = {}
    for name, words in WORDS.items():
        d = root / name
        d.mkdir()
        for i in range(12):
            (d / f"{i}.txt").write_text(f"{words} {i} " * 25)
        dirs[name] = str(d)
    return dirs


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixture")
    dirs = write_sources(root)
    tok = get_tokenizer(DataConfig(source="stdlib", max_files=40, tokenizer_train_chars=200_000), str(root / "tok"),
                        2048)
    return {"dirs": dirs, "tok": tok, "root": root}


def mixture(dirs, weights=(0.5, 0.3, 0.2), **kw) -> list[dict]:
    return [{"name": n, "source": "files", "paths": [dirs[n]], "weight": w, **kw} for n, w in zip(WORDS, weights)]


def it(corpus, cfg, host=(0, 1), batch=8, split="train", **kw):
    return make_iterator(cfg, corpus["tok"], split, batch_size=batch, seed=3, process_index=host[0],
                         process_count=host[1], **kw)


def test_proportions_within_one_percent_and_rows_come_from_their_source(corpus):
    weights = (0.5, 0.3, 0.2)
    mix = it(corpus, DataConfig(mixture=mixture(corpus["dirs"], weights), seq_len=32), batch=100)
    counts = np.zeros(3)
    for i in range(100):  # 10,000 sequences
        batch = next(mix)
        counts += np.bincount(mix.last_sources, minlength=3)
        if i == 0:  # each row holds its source's own words
            for row, s in zip(batch["inputs"], mix.last_sources):
                text = corpus["tok"].decode([int(t) for t in row if t > 2])
                assert WORDS[list(WORDS)[s]].split()[0][:3] in text, (s, text)
    assert counts.sum() == 10_000
    assert np.abs(counts / 10_000 - weights).max() < 0.01, counts


def test_stages_switch_at_the_stated_step(corpus):
    stages = [{"start": 4, "weights": {"code": 1.0}}, {"start": 7, "weights": {"web": 1.0, "books": 3.0}}]
    cfg = DataConfig(mixture=mixture(corpus["dirs"]), mixture_stages=stages, seq_len=32)
    mix = it(corpus, cfg, batch=40)
    seen = {}
    for step in range(1, 9):
        next(mix)
        seen[step] = np.bincount(mix.last_sources, minlength=3)
    assert all(seen[s][0] > 0 and seen[s][2] > 0 for s in (1, 2, 3))  # the sources' own weights
    assert all(seen[s].tolist() == [0, 40, 0] for s in (4, 5, 6))  # code only, from step 4 exactly
    assert all(seen[s][1] == 0 and seen[s][2] > seen[s][0] for s in (7, 8))  # web:books = 1:3 from step 7
    assert seen[7][0] + seen[8][0] == 20 and seen[7][2] + seen[8][2] == 60


def test_resume_on_a_different_host_count_gives_the_same_batches(corpus):
    """Two hosts save after 3 batches; one host resumes from host 0's position (train._data_position's rule for
    local sources) and yields exactly what the two hosts together go on to yield; and so does a host of three."""
    cfg = DataConfig(mixture=mixture(corpus["dirs"]), objective="span_corruption", seq_len=32)  # random draws too
    two = [it(corpus, cfg, host=(h, 2), batch=6) for h in range(2)]
    for _ in range(3):
        [next(m) for m in two]
    saved = [m.state() for m in two]
    assert saved[0] == saved[1]
    position = train._data_position(saved, types.SimpleNamespace(data=cfg), 3)  # this test process is one host
    one = it(corpus, cfg, host=(0, 1), batch=12)
    one.restore(json.loads(json.dumps(position)))  # as the checkpoint stores it
    three = [it(corpus, cfg, host=(h, 3), batch=4) for h in range(3)]
    for m in three:
        m.restore(position)
    for _ in range(4):
        halves = [next(m) for m in two]
        whole, thirds = next(one), [next(m) for m in three]
        for k in whole:
            np.testing.assert_array_equal(whole[k], np.concatenate([h[k] for h in halves]), err_msg=k)
            np.testing.assert_array_equal(whole[k], np.concatenate([t[k] for t in thirds]), err_msg=k)
    hub = DataConfig(mixture=[*mixture(corpus["dirs"])[:2], {"name": "hub", "source": "hub", "hub_name": "json",
                                                              "paths": ["x.jsonl"]}])
    with pytest.raises(ValueError, match="split between hosts"):
        train._data_position(saved, types.SimpleNamespace(data=hub), 3)


def test_a_hub_stream_in_a_mixture_resumes_on_the_same_hosts(corpus):
    path = corpus["root"] / "hub.jsonl"
    path.write_text("".join(json.dumps({"text": f"quartz river stone {i} " * 9}) + "\n" for i in range(40)))
    src = {"name": "hub", "source": "hub", "hub_name": "json", "paths": [str(path)], "weight": 0.4}
    cfg = DataConfig(mixture=[*mixture(corpus["dirs"])[:2], src], seq_len=32, shuffle=False)
    a = it(corpus, cfg)
    for _ in range(3):
        next(a)
    b = it(corpus, cfg)
    b.restore(json.loads(json.dumps(a.state())))
    for _ in range(3):
        x, y = next(a), next(b)
        assert (a.last_sources == 2).any()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


@pytest.mark.parametrize("change, message", [
    ({"weight": -1.0}, r"data.mixture\[1\].weight=-1.0 must be a finite number >= 0"),
    ({"weight": math.nan}, r"data.mixture\[1\].weight=nan must be a finite number >= 0"),
    ({"source": "wiki"}, r"data.mixture\[1\].source='wiki' is not one of \('stdlib', 'files', 'hub'\)"),
    ("zero", r"data.mixture's weights are all zero"),
    ("unknown", r"data.mixture_stages\[0\].weights names 'wiki', which is no source of data.mixture"),
    ("order", r"data.mixture_stages\[1\].start=5 must be an integer step after 9"),
])
def test_bad_mixtures_are_clear_errors_before_any_work(tmp_path, corpus, change, message, capsys):
    mix = mixture(corpus["dirs"])
    stages = []
    if change == "zero":
        mix = mixture(corpus["dirs"], (0, 0.0, 0))
    elif change == "unknown":
        stages = [{"start": 3, "weights": {"wiki": 1.0}}]
    elif change == "order":
        stages = [{"start": 9, "weights": {"web": 1.0}}, {"start": 5, "weights": {"code": 1.0}}]
    else:
        mix[1].update(change)
    with pytest.raises(ValueError, match=message):
        DataConfig(mixture=mix, mixture_stages=stages).validate()
    # The same through the command line: exit 2 with the message, before a tokenizer or workdir exists.
    module = __import__("experiments.gpt2_small", fromlist=["config"])
    workdir = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        train.main(module.config, ["size=tiny", f"workdir={workdir}", f"data.mixture={json.dumps(mix)}",
                                   f"data.mixture_stages={json.dumps(stages)}"])
    assert e.value.code == 2
    assert "data.mixture" in capsys.readouterr().err and not workdir.exists()
