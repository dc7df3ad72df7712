"""Evaluation: bytes per token id, lm-eval parity against lm-eval's own Hugging Face backend on random
GPT-2, Llama and T5 checkpoints imported with t5like.hf, tiny local YAML tasks, the CLI, in-loop named eval
sets and tasks across a resume, and the refusals that come before any model is built."""
import copy
import dataclasses
import json
import math
import os

import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from lm_eval.api.instance import Instance  # noqa: E402

from t5like.config import CheckpointConfig, Config, EvalConfig, MeshConfig, ModelConfig, OptimConfig, TrainConfig  # noqa: E402
from t5like.data import DataConfig  # noqa: E402
from t5like.data.byte_counts import bytes_per_id  # noqa: E402
from t5like.data.config import EvalSet  # noqa: E402
from t5like.data.hf_tokenizer import HFTokenizer  # noqa: E402
from t5like.eval import __main__ as cli  # noqa: E402
from t5like.eval.loading import lm_from_workdir  # noqa: E402
from t5like.eval.tasks import load_tasks, metric_rows, run_tasks  # noqa: E402
from t5like.hf.__main__ import import_checkpoint  # noqa: E402
from t5like.metrics import read_metrics  # noqa: E402
from test_hf import CASES, TEXT, byte_bpe, spiece  # noqa: E402  (tests/ is on sys.path)

TOL = 1e-4
UNICODE = "Grüße, 世界! naïve café — tabs\tand  spaces\n\ndef f(x):\n    return x ** 2  # ✓\n"


# Tiny local tasks, in lm-eval's own YAML format with local data files ----------------------------------------

def write_tasks(d) -> str:
    """Three tasks: multiple choice (acc, acc_norm), rolling log-likelihood (bits_per_byte), generation."""
    os.makedirs(d, exist_ok=True)
    words = ["def", "class", "import", "return", "for", "while", "with", "yield"]
    rows = {"mc": [{"question": f"After {w} comes", "choices": [" x", " self", " the end", " (1, 2)"], "label": i % 4}
                   for i, w in enumerate(words)],
            "docs": [{"text": TEXT[i * 900:i * 900 + 300 + 200 * i]} for i in range(3)] + [{"text": UNICODE}],
            "gen": [{"prompt": p, "answer": "x"} for p in ("def f(x):", "import", "class A:\n    def", "for i in")]}
    for name, items in rows.items():
        with open(os.path.join(d, f"{name}.jsonl"), "w") as f:
            f.write("".join(json.dumps(r) + "\n" for r in items))
    data = lambda name, split: (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    {split}: "
                                f"{os.path.join(d, name + '.jsonl')}\n{split}_split: {split}\n")
    tasks = {
        "tiny_mc": data("mc", "validation") + 'output_type: multiple_choice\ndoc_to_text: "{{question}}"\n'
                   'doc_to_choice: "{{choices}}"\ndoc_to_target: label\nmetric_list:\n  - metric: acc\n'
                   '  - metric: acc_norm\n',
        "tiny_ppl": data("docs", "test") + 'output_type: loglikelihood_rolling\ndoc_to_text: ""\n'
                    'doc_to_target: "{{text}}"\nmetric_list:\n  - metric: bits_per_byte\n'
                    '  - metric: word_perplexity\n',
        "tiny_gen": data("gen", "test") + 'output_type: generate_until\ndoc_to_text: "{{prompt}}"\n'
                    'doc_to_target: "{{answer}}"\ngeneration_kwargs:\n  until: ["\\n\\n"]\n  max_gen_toks: 8\n'
                    '  do_sample: false\nmetric_list:\n  - metric: exact_match\n',
    }
    for name, body in tasks.items():
        with open(os.path.join(d, f"{name}.yaml"), "w") as f:
            f.write(f"task: {name}\n{body}")
    return str(d)


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory):
    return write_tasks(tmp_path_factory.mktemp("tasks"))


# Random Hugging Face checkpoints (test_hf's shapes, with the special ids lm-eval's hf backend reads) ---------

def make_checkpoint(name, root) -> tuple[str, str]:
    cls, config = CASES[name]
    config = copy.deepcopy(config)
    if name == "llama":
        config.bos_token_id, config.eos_token_id = 1, 2
    if name.startswith("t5"):
        config.decoder_start_token_id, config.pad_token_id, config.eos_token_id = 0, 0, 1
    torch.manual_seed(0)
    hf_dir, workdir = os.path.join(root, "hf"), os.path.join(root, "run")
    cls(config).eval().save_pretrained(hf_dir)
    if name == "gpt2":
        byte_bpe(hf_dir, 600, ["<|endoftext|>"])
    elif name == "llama":
        byte_bpe(hf_dir, 300, ["<unk>", "<s>", "</s>"], bos="<s>")
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
                  open(os.path.join(hf_dir, "tokenizer_config.json"), "w"))
    else:
        spiece(hf_dir, 200, 20)
    import_checkpoint(hf_dir, workdir)
    return hf_dir, workdir


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """name -> (lm-eval's hf model, t5like's model of the same weights)."""
    from lm_eval.models.huggingface import HFLM
    out = {}
    for name in ("gpt2", "llama", "t5_v1_1"):
        hf_dir, workdir = make_checkpoint(name, str(tmp_path_factory.mktemp(name)))
        ours = lm_from_workdir(workdir, batch_size=8)
        hf = HFLM(pretrained=hf_dir, backend="seq2seq" if name.startswith("t5") else "causal", batch_size=4,
                  device="cpu", dtype="float32", max_length=ours.max_length)
        out[name] = (hf, ours, workdir)
    return out


def instances(kind, args):
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


# Bytes per id -------------------------------------------------------------------------------------------------

def test_bytes_per_id_sum_to_the_utf8_bytes_of_the_text(tmp_path):
    from t5like.data.tokenizer import train_tokenizer
    own = train_tokenizer([TEXT, UNICODE * 3], str(tmp_path / "spm"), vocab_size=512, num_sentinels=100,
                          max_chars=200_000)
    byte_bpe(str(tmp_path), 400, ["<|endoftext|>"])
    gpt2 = HFTokenizer(str(tmp_path))
    texts = [UNICODE, TEXT[:3000], "日本語のテキスト 🎉 emoji"]
    for tok in (own, gpt2):  # lossless tokenizers: byte-fallback SentencePiece, byte-level BPE
        table = bytes_per_id(tok)
        assert table.shape == (tok.vocab_size,) and table[0] == 0  # pad; <|endoftext|>
        for text in texts:
            assert int(table[tok.encode(text)].sum()) == len(text.encode("utf-8")), text
    spiece(str(tmp_path), 200, 20)  # T5-style spiece.model (no byte fallback): the bytes of what it keeps
    (tmp_path / "tokenizer.json").unlink()
    t5 = HFTokenizer(str(tmp_path))
    ids = t5.encode("def f(x):\n    return x")
    assert int(bytes_per_id(t5)[ids].sum()) == len(t5.decode(ids).encode("utf-8")) + 1  # + the dummy-prefix space


# Parity with lm-eval's hf backend ------------------------------------------------------------------------------

LL_REQUESTS = [("The quick brown", " fox"), ("def f(x):", "\n    return x"), ("", "hello world"),
               ("a " * 80, "end of it"), ("import os", " "), ("class A:", " pass")]


@pytest.mark.parametrize("name", ["gpt2", "llama", "t5_v1_1"])
def test_loglikelihood_equals_hf_backend(models, name):
    hf, ours, _ = models[name]
    requests = instances("loglikelihood", [r for r in LL_REQUESTS if r[1].strip() or not name.startswith("t5")])
    want, got = hf.loglikelihood(requests), ours.loglikelihood(requests)
    assert [g for _, g in got] == [g for _, g in want]
    np.testing.assert_allclose([v for v, _ in got], [v for v, _ in want], rtol=0, atol=TOL)
    if name == "gpt2":  # "a " * 80 is longer than GPT-2's 64 positions: cut from the left as hf cuts it
        assert len(ours.tok_encode("a " * 80)) > ours.max_length


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_rolling_and_generation_equal_hf_backend(models, name):
    hf, ours, _ = models[name]
    docs = instances("loglikelihood_rolling", [(TEXT[:50],), (TEXT[:700],), (UNICODE,)])
    # Sums of hundreds of fp32 log-probabilities: equal to fp32 rounding, relative 1e-6 here.
    np.testing.assert_allclose(ours.loglikelihood_rolling(docs), hf.loglikelihood_rolling(docs), rtol=1e-5)
    gens = instances("generate_until", [(c, {"until": ["\n\n"], "max_gen_toks": 8, "do_sample": False})
                                        for c in ("def f(x):", "import", "class A:\n    def", "x")])
    assert ours.generate_until(gens) == hf.generate_until(gens)


def test_tasks_equal_hf_backend(models, tasks_dir):
    names = ["tiny_mc", "tiny_ppl", "tiny_gen"]
    for name in ("gpt2", "llama", "t5_v1_1"):
        hf, ours, _ = models[name]
        run = names if name == "gpt2" else ["tiny_mc"]  # Llama's rolling and generation: the test above
        manager, _ = load_tasks(run, tasks_dir)
        want = run_tasks(hf, run, manager, log_samples=True)
        got = run_tasks(ours, run, manager, log_samples=True)
        w, g = metric_rows(want), metric_rows(got)
        assert w.keys() == g.keys(), name
        for key in w:
            if key.endswith(("/acc", "/acc_norm", "/exact_match")):
                assert g[key] == w[key], (name, key)
            elif key.endswith("/bits_per_byte"):
                assert g[key] == pytest.approx(w[key], abs=TOL), (name, key)
            else:  # word perplexity: exp of a long fp32 sum (~1e12 on a random model), equal to rounding
                assert g[key] == pytest.approx(w[key], rel=1e-5), (name, key)
        if "tiny_gen" in run:
            strings = lambda r: [s["resps"] for s in r["samples"]["tiny_gen"]]
            assert strings(got) == strings(want)
    assert 0 < ours.compiles <= 6  # power-of-two length buckets, one row count


# The CLI and its refusals --------------------------------------------------------------------------------------

def test_cli_prints_a_table_and_writes_lm_eval_json(models, tasks_dir, tmp_path, capsys):
    _, _, workdir = models["gpt2"]
    out = tmp_path / "results.json"
    assert cli.main(["--workdir", workdir, "--tasks", "tiny_mc,tiny_ppl", "--include-path", tasks_dir,
                     "--limit", "4", "--bootstrap-iters", "0", "--output", str(out)]) == 0
    table = capsys.readouterr().out
    assert "tiny_mc" in table and "acc_norm" in table and "bits_per_byte" in table
    results = json.loads(out.read_text())
    assert set(results["results"]) == {"tiny_mc", "tiny_ppl"} and results["config"]["step"] == 0
    assert {"acc,none", "acc_norm,none"} <= set(results["results"]["tiny_mc"])


def test_bad_input_fails_before_any_model(models, tasks_dir, tmp_path, monkeypatch):
    import t5like.eval.loading
    monkeypatch.setattr(t5like.eval.loading, "load_for_inference", lambda *a, **k: pytest.fail("model built"))
    _, _, workdir = models["gpt2"]
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['tiny_mcq'\].*did you mean tiny_mc"):
        cli.main(["--workdir", workdir, "--tasks", "tiny_mcq", "--include-path", tasks_dir])
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "bad.yaml").write_text("task: bad\ndoc_to_text: [unclosed\n")
    with pytest.raises(ValueError, match=r"task file .*bad\.yaml does not parse"):
        cli.main(["--workdir", workdir, "--tasks", "bad", "--include-path", str(broken)])
    with pytest.raises(FileNotFoundError, match="has no complete checkpoint"):
        cli.main(["--workdir", str(tmp_path / "nothing"), "--tasks", "tiny_mc", "--include-path", tasks_dir])
    _, ours, _ = models["gpt2"]
    too_long = instances("loglikelihood", [("x", " y" * (ours.max_length + 5))])
    with pytest.raises(ValueError, match="exceeds max_length=64"):
        ours.loglikelihood(too_long)


# In the loop: named eval sets and a task at every eval, across a resume -------------------------------------

class Crash(Exception):
    pass


def tiny_run(root, tasks_dir, steps=8) -> Config:
    (root / "code").mkdir(parents=True, exist_ok=True)
    for i in range(3):
        (root / "code" / f"m{i}.py").write_text(TEXT[i * 2000:(i + 1) * 2000])
    (root / "prose.jsonl").write_text("".join(json.dumps({"body": UNICODE * (i + 1)}) + "\n" for i in range(4)))
    return Config(
        model=ModelConfig(family="decoder", vocab_size=512, d_model=32, num_heads=2, d_ff=64, num_layers=1, max_len=64),
        data=DataConfig(source="stdlib", max_files=12, seq_len=32, tokenizer_train_chars=60_000, eval_sets=(
            EvalSet("code", source="files", paths=(str(root / "code"),)),
            EvalSet("prose", source="files", paths=(str(root / "prose.jsonl"),), format="jsonl", text_field="body"),
            EvalSet("own", source="stdlib", max_files=12, split="validation"))),  # the run's own eval split
        optim=OptimConfig(learning_rate=1e-2, warmup_steps=2),
        train=TrainConfig(steps=steps, batch_size=8, eval_every=2, eval_steps=2, progress=False, peak_flops=1e11),
        checkpoint=CheckpointConfig(every=4, async_save=False),
        eval=EvalConfig(tasks=("tiny_mc",), include_path=tasks_dir, every=4, limit=4, batch_size=8),
        mesh=MeshConfig(data=-1), workdir=str(root / "run"))


def test_in_loop_eval_sets_and_tasks_once_per_step_across_resume(tmp_path, tasks_dir):
    from t5like import train
    from t5like.plugins import Plugin

    class CrashAt(Plugin):  # dies after step 7 logged: its eval at step 6 is past the checkpoint at 4
        def on_log(self, step, row):
            if step == 7:
                raise Crash()

    cfg = tiny_run(tmp_path, tasks_dir)
    with pytest.raises(Crash):
        train.train(cfg, plugins=[CrashAt()])
    assert 6 in {r["step"] for r in read_metrics(cfg.workdir) if "eval/code/loss" in r}
    result = train.train(cfg)
    rows = [r for r in read_metrics(cfg.workdir) if "eval_loss" in r]
    assert [r["step"] for r in rows] == [2, 4, 6, 8]  # each eval once, the one at 6 rerun after the resume
    for r in rows:
        for name in ("code", "prose"):
            assert math.isfinite(r[f"eval/{name}/loss"]) and 0 < r[f"eval/{name}/bpb"] < 20
        assert ("lm_eval/tiny_mc/acc" in r) == (r["step"] % 4 == 0)
        # A named set read like the run's own eval split gives the trainer's own figures.
        assert r["eval/own/loss"] == pytest.approx(r["eval_loss"], rel=1e-6)
        assert r["eval/own/bpb"] == pytest.approx(r["eval_bpb"], rel=1e-6)
        for key in ("loss_stderr", "bpb_stderr"):  # the standard errors over sequences (tests/test_forks.py)
            assert r[f"eval/own/{key}"] == pytest.approx(r[f"eval_{key}"], rel=1e-5) and 0 < r[f"eval_{key}"] < 0.5
    # eval_bpb is the eval loss's sum over the UTF-8 bytes of the same targets, in bits.
    from t5like.data import get_tokenizer, make_iterator
    tokenizer = get_tokenizer(cfg.data, cfg.workdir, cfg.model.vocab_size)
    batches = list(make_iterator(cfg.data, tokenizer, "validation", batch_size=8, seed=0, num_batches=2))
    tokens, nbytes = (sum(float(b[k].sum()) for b in batches) for k in ("weights", "target_bytes"))
    assert rows[-1]["eval_bpb"] == pytest.approx(rows[-1]["eval_loss"] * tokens / math.log(2) / nbytes, rel=1e-5)
    summary = result.summary
    assert summary["final_eval_bpb"] == rows[-1]["eval_bpb"]
    assert summary["final_eval/prose/bpb"] == rows[-1]["eval/prose/bpb"]
    assert 0 <= summary["final_lm_eval/tiny_mc/acc_norm"] <= 1


def test_in_loop_refusals_come_before_any_work(tmp_path, tasks_dir):
    from t5like import train
    cfg = tiny_run(tmp_path, tasks_dir)
    bad_task = dataclasses.replace(cfg, eval=EvalConfig(tasks=("no_such_task",), include_path=tasks_dir))
    with pytest.raises(ValueError, match="unknown task"):
        train.train(bad_task)
    bad_set = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, eval_sets=(
        EvalSet("code", source="files", paths=(str(tmp_path / "missing/*.txt"),)),)))
    with pytest.raises(ValueError, match=r"data.eval_sets\[0\] \(name='code'\)"):
        train.train(bad_set)
    with pytest.raises(ValueError, match="is used twice"):
        DataConfig(eval_sets=(EvalSet("a", source="stdlib"), EvalSet("a", source="stdlib"))).validate()
    with pytest.raises(ValueError, match=r"name='a/b' must be letters"):
        DataConfig(eval_sets=(EvalSet("a/b", source="stdlib"),)).validate()
    assert not os.path.exists(os.path.join(cfg.workdir, "checkpoints"))
