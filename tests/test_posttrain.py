"""Instruction tuning (data.objective=sft) and DPO (data.objective=dpo): chat templates against transformers'
apply_chat_template, assistant-only loss weights against the template's own role spans ({% generation %}), packing,
the DPO loss against TRL's, the reference model (LoRA: adapters off, the base bitwise frozen; full: a frozen copy),
generate --chat, and bad input refused before anything compiles."""
import dataclasses
import json
import math
import os
import types
from collections import defaultdict

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, traverse_util

from t5like import train
from t5like.config import CheckpointConfig, Config, FinetuneConfig, MeshConfig, ModelConfig, OptimConfig, TrainConfig
from t5like.data import DataConfig, make_iterator
from t5like.data.chat import chat_template
from t5like.data.hf_tokenizer import HFTokenizer
from t5like.data.instruct import SFTTable
from t5like.data.tokenizer import train_tokenizer
from t5like.losses import dpo_loss, dpo_terms

TEXT = open(os.__file__, encoding="utf-8").read()[:40000]

CONVERSATIONS = [
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 2 + 2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3 + 3?"},
     {"role": "assistant", "content": "It is 6, of course."}],
    [{"role": "user", "content": "import os  # what kind?"}, {"role": "assistant", "content": "import"}],
]
INSTRUCTION = {"instruction": "Name the kind of this line.", "input": "def f(x):", "output": "def"}

# Two templates written here in the shapes of Llama 3's and of a plain "role: text" one for GPT-2. The assistant
# text sits in {% generation %} blocks: transformers' return_assistant_tokens_mask reads the role spans from them.
LLAMA_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                  "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] | trim }}<|eot_id|>{% endgeneration %}"
                  "{% else %}{{ m['content'] | trim }}<|eot_id|>{% endif %}{% endfor %}"
                  "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
GPT2_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'assistant' %}assistant:{% generation %} {{ m['content'] }}"
                 "{{ eos_token }}{% endgeneration %}{% else %}{{ m['role'] }}: {{ m['content'] }}\n{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")
LLAMA_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def hf_tokenizer_dir(out_dir, template, specials, bos=None, eos=None):
    """A byte-level BPE tokenizer trained here, saved as a checkpoint's tokenizer with `template`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    os.makedirs(out_dir, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    json.dump({"chat_template": template, "bos_token": bos, "eos_token": eos,
               "tokenizer_class": "PreTrainedTokenizerFast"}, open(os.path.join(out_dir, "tokenizer_config.json"), "w"))
    return out_dir


def write_jsonl(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """HF tokenizers with templates, t5like's own SentencePiece tokenizer, and small SFT and DPO task files."""
    from experiments import finetune_tasks
    root = tmp_path_factory.mktemp("posttrain")
    out = {"llama": hf_tokenizer_dir(str(root / "llama"), LLAMA_TEMPLATE, LLAMA_SPECIALS, "<|begin_of_text|>",
                                     "<|end_of_text|>"),
           "gpt2": hf_tokenizer_dir(str(root / "gpt2"), GPT2_TEMPLATE, ["<|endoftext|>"], "<|endoftext|>",
                                    "<|endoftext|>"),
           "chats": finetune_tasks.line_kind_chats(str(root / "chats.jsonl"), count=64, max_files=60),
           "prefs": finetune_tasks.line_kind_prefs(str(root / "prefs.jsonl"), per_class=24, max_files=60)}
    texts = [open(out["chats"]).read(), open(out["prefs"]).read()]
    train_tokenizer(texts, str(root / "spm"), vocab_size=400, num_sentinels=0, max_chars=10 ** 6)
    out["spm"] = str(root / "spm" / "spm.model")
    out["root"] = root
    return out


@pytest.mark.parametrize("style", ["llama", "gpt2"])
def test_chat_template_matches_transformers_and_masks_assistant_turns(files, tmp_path, style):
    """Token ids equal apply_chat_template's; weights are 1 exactly on the template's assistant spans (HF's
    assistant_masks from {% generation %}), rendered turn by turn without those tags; packing keeps both."""
    import transformers
    hf = transformers.AutoTokenizer.from_pretrained(files[style])
    ours = HFTokenizer(files[style])
    template = chat_template(ours)
    conversations = CONVERSATIONS + [[{"role": "user", "content": INSTRUCTION["instruction"] + "\n\n" +
                                       INSTRUCTION["input"]}, {"role": "assistant", "content": "def"}]]
    for messages in conversations:
        want = hf.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        ids, turn = template.encode(messages, "test")
        assert ids == list(want["input_ids"])
        np.testing.assert_array_equal(turn >= 0, np.asarray(want["assistant_masks"], bool))
        assert (turn >= 0).sum() > 0
        gen = hf.apply_chat_template(messages[:-1], tokenize=True, add_generation_prompt=True, return_dict=False)
        assert template.encode(messages[:-1], "test", add_generation_prompt=True)[0] == list(gen)
    # Packed: conversations end to end in rows of 16 with segment ids; targets and weights are the ids and mask
    # shifted by one, conversation by conversation (the instruction record is the third conversation).
    path = write_jsonl(tmp_path / "sft.jsonl", [{"messages": m} for m in CONVERSATIONS] + [INSTRUCTION])
    cfg = DataConfig(source="files", format="jsonl", paths=(path,), objective="sft", seq_len=16,
                     tokenizer_path=files[style], validation_fraction=0.0, num_sentinels=0)
    table = SFTTable(cfg, ours, "train")
    rows = table.rows(np.arange(table.num_rows))
    real = rows["segment_ids"] > 0
    expected = [template.encode(m, "test") for m in conversations]
    np.testing.assert_array_equal(rows["targets"][real], np.concatenate([np.asarray(i[1:]) for i, _ in expected]))
    np.testing.assert_array_equal(rows["inputs"][real], np.concatenate([np.asarray(i[:-1]) for i, _ in expected]))
    np.testing.assert_array_equal(rows["weights"][real], np.concatenate([t[1:] >= 0 for _, t in expected]))
    assert (rows["weights"][~real] == 0).all() and (rows["positions"][rows["segment_ids"] == 1][:1] == 0).all()


def test_preference_rows_of_a_conversational_prompt(files, tmp_path):
    """A DPO pair whose prompt is a conversation: each half of the row is the template's render of prompt + answer
    (shifted by one), weighted on the answer's assistant span only, as transformers marks it."""
    import transformers
    from t5like.data.instruct import PreferenceTable
    hf = transformers.AutoTokenizer.from_pretrained(files["gpt2"])
    prompt = CONVERSATIONS[0][:-1]
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": prompt, "chosen": "It is 6.",
                                                    "rejected": [{"role": "assistant", "content": "7"}]}])
    cfg = DataConfig(source="files", format="jsonl", paths=(path,), objective="dpo", seq_len=256,
                     tokenizer_path=files["gpt2"], validation_fraction=0.0, num_sentinels=0)
    row = PreferenceTable(cfg, HFTokenizer(files["gpt2"]), "train").rows(np.array([0]))
    for segment, answer in ((1, "It is 6."), (2, "7")):
        want = hf.apply_chat_template(prompt + [{"role": "assistant", "content": answer}], tokenize=True,
                                      return_dict=True, return_assistant_tokens_mask=True)
        ids, mask = np.asarray(want["input_ids"]), np.asarray(want["assistant_masks"], bool)
        start = np.flatnonzero(~mask[:np.flatnonzero(mask)[-1]])[-1] + 1  # the last assistant turn only
        mask[:start] = False
        seg = row["segment_ids"][0] == segment
        np.testing.assert_array_equal(row["targets"][0][seg], ids[1:])
        np.testing.assert_array_equal(row["weights"][0][seg], mask[1:])


def test_simple_template_for_sentencepiece(files):
    """t5like's written-down template: [BOS] <|role|>\\n content (\\n | EOS); weights on assistant content + EOS."""
    from t5like.data.tokenizer import Tokenizer
    tok = Tokenizer.from_file(files["spm"], 400, 0)
    ids, turn = chat_template(tok).encode(CONVERSATIONS[0], "test")
    assert ids[0] == tok.start_id and tok.decode(ids) == (
        "<|system|>\nAnswer briefly.\n<|user|>\nWhat is 2 + 2?\n<|assistant|>\n4<|user|>\nAnd 3 + 3?\n"
        "<|assistant|>\nIt is 6, of course.")
    for i in (2, 4):
        assert [t for t, k in zip(ids, turn) if k == i] == tok.encode(CONVERSATIONS[0][i]["content"]) + [tok.eos_id]
    assert set(turn.tolist()) == {-1, 2, 4}


def _trl_dpo_loss(pi_c, pi_r, ref_c, ref_r, beta):
    """TRL's DPOTrainer._compute_loss (loss_type sigmoid) on given log-probabilities: the trainer around it is a
    stub whose model returns these per-sequence log-probs as one token each. -> (loss, grads, TRL's metrics)."""
    import torch
    from trl import DPOTrainer
    logps = torch.tensor(np.concatenate([pi_c, pi_r])[:, None], dtype=torch.float64, requires_grad=True)
    B = len(pi_c)
    outputs = types.SimpleNamespace(log_probs=logps, entropy=torch.zeros(2 * B, 1), mean_logits=torch.zeros(2 * B, 1),
                                    is_top1=torch.zeros(2 * B, 1, dtype=torch.bool))
    identity = lambda x: x
    trainer = types.SimpleNamespace(
        model=types.SimpleNamespace(training=False), accelerator=types.SimpleNamespace(
            device="cpu", gather=identity, gather_for_metrics=identity), aux_loss_enabled=False, ld_alpha=None,
        precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=["sigmoid"], loss_weights=[1.0],
        beta=beta, label_smoothing=0.0, use_weighting=False, _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0)
    inputs = {"input_ids": torch.zeros(2 * B, 2, dtype=torch.long), "attention_mask": torch.ones(2 * B, 2),
              "completion_mask": torch.ones(2 * B, 2), "ref_chosen_logps": torch.tensor(ref_c, dtype=torch.float64),
              "ref_rejected_logps": torch.tensor(ref_r, dtype=torch.float64)}
    loss = DPOTrainer._compute_loss(trainer, lambda **kw: outputs, inputs, return_outputs=False)
    loss.backward()
    metrics = {k: v[-1] for k, v in trainer._metrics["eval"].items()}
    return float(loss), logps.grad[:, 0].numpy(), metrics


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_loss_and_gradient_equal_trls(beta):
    rng = np.random.default_rng(0)
    pi_c, pi_r, ref_c, ref_r = (rng.normal(-20, 5, 6) for _ in range(4))
    pi_c[0], ref_c[0], pi_r[0], ref_r[0] = -20.0, -18.0, -21.0, -19.0  # a tie in the rewards (exact in float32):
    # counted as not preferred
    want, want_grad, metrics = _trl_dpo_loss(pi_c, pi_r, ref_c, ref_r, beta)

    def mean_loss(pc, pr):
        return dpo_terms(pc, pr, jnp.asarray(ref_c, jnp.float32), jnp.asarray(ref_r, jnp.float32), beta)[0].mean()
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    loss, grads = jax.value_and_grad(mean_loss, argnums=(0, 1))(f32(pi_c), f32(pi_r))
    assert abs(float(loss) - want) <= 1e-6
    np.testing.assert_allclose(np.concatenate(grads), want_grad, atol=1e-6, rtol=0)
    _, chosen, rejected = dpo_terms(f32(pi_c), f32(pi_r), f32(ref_c), f32(ref_r), beta)
    assert abs(float(jnp.mean(chosen > rejected)) - metrics["rewards/accuracies"]) < 1e-6
    assert abs(float(jnp.mean(chosen - rejected)) - metrics["rewards/margins"]) < 1e-5


def tiny_config(files, objective, method, workdir, **train_kw) -> Config:
    return Config(model=ModelConfig(vocab_size=400, d_model=32, num_heads=4, d_ff=64, num_layers=2, max_len=96),
                  data=DataConfig(source="files", format="jsonl", paths=(files["chats" if objective == "sft" else "prefs"],),
                                  objective=objective, seq_len=96 if objective == "sft" else 64,
                                  tokenizer_path=files["spm"], num_sentinels=0, validation_fraction=0.2),
                  optim=OptimConfig(learning_rate=1e-2, warmup_steps=0, schedule="constant", weight_decay=0.0),
                  train=TrainConfig(**{**dict(steps=2, batch_size=8, eval_every=0, eval_steps=1, log_every=1,
                                              progress=False), **train_kw}),
                  finetune=FinetuneConfig(method=method), mesh=MeshConfig(data=-1),
                  checkpoint=CheckpointConfig(every=100, async_save=False), workdir=str(workdir))


def flat(tree) -> dict:
    return traverse_util.flatten_dict(tree)


def test_lora_dpo_starts_at_ln2_and_keeps_the_base_bitwise(files, tmp_path, capsys):
    """LoRA DPO: the reference is the model with its adapters off (no copy), so the first loss is ln 2; the base
    stays bitwise what it started as; the adapters move; eval reports preference accuracy and reward margins.
    Then generate --chat answers a conversation from the run with the template."""
    from t5like import generate
    from t5like.inference import load_for_inference
    from t5like.plugins import Plugin

    class Start(Plugin):  # the params as the run starts (after every other plugin's init)
        def init_params(self, params):
            self.params = flat(jax.tree.map(np.asarray, params))
            return params
    start = Start()
    cfg = tiny_config(files, "dpo", "lora", files["root"] / "dpo_lora")
    train.train(cfg, plugins=[start])
    rows = [json.loads(line) for line in open(os.path.join(cfg.workdir, "metrics.jsonl"))]
    assert abs(rows[0]["loss"] - math.log(2)) < 1e-6 and rows[0]["margin"] == 0.0
    ev = [r for r in rows if "eval_loss" in r][-1]
    assert 0 <= ev["eval_accuracy"] <= 1 and {"eval_margin", "eval_chosen_reward", "eval_rejected_reward"} <= set(ev)
    summary = json.load(open(os.path.join(cfg.workdir, "summary.json")))
    assert summary["dpo_reference"] == "adapters off" and summary["dpo_reference_bytes"] == 0
    start = start.params
    tuned = flat(nnx.state(load_for_inference(cfg.workdir)[1]).to_pure_dict())
    moved = 0
    for k, v in tuned.items():
        if any(str(p).endswith("_lora") for p in k):
            moved += int(not np.array_equal(v, start[k]))
        else:
            np.testing.assert_array_equal(v, start[k], err_msg=f"base parameter {k} moved")
    assert moved > 0
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "import os"}]}])
    assert generate.main(["--workdir", cfg.workdir, "--chat", chat, "--max-new-tokens", "4"]) == 0
    assert "=== conversation 0 ===\n[user] import os\n[assistant] " in capsys.readouterr().out


def test_full_dpo_keeps_a_frozen_copy_and_starts_at_ln2(files):
    """finetune.method=full: the reference is a frozen copy of the starting params (no gradient, not trainable);
    the loss at the start is ln 2 and its gradient reaches the policy only."""
    from t5like.capabilities import plugins_for
    from t5like.models import MODEL_CLASSES
    cfg = tiny_config(files, "dpo", "full", files["root"] / "unused")
    plugins = plugins_for(cfg)
    model = plugins.adapt(MODEL_CLASSES["decoder"](cfg.model, rngs=nnx.Rngs(1)))
    graphdef, state = nnx.split(model)
    params = plugins.init_params(state.to_pure_dict())
    assert not plugins.is_trainable(("reference", "embed", "embedding")) and plugins.is_trainable(("decoder",))
    batch = first_batch(files, cfg)
    loss = lambda p: dpo_loss(nnx.merge(graphdef, p), batch, beta=0.1)
    (total, sums), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    assert abs(float(sums["loss_sum"] / sums["weight"]) - math.log(2)) < 1e-6
    g = flat(grads)
    assert all(float(jnp.abs(v).max()) == 0 for k, v in g.items() if k[0] == "reference")
    assert any(float(jnp.abs(v).max()) > 0 for k, v in g.items() if k[0] != "reference")


def first_batch(files, cfg):
    from t5like.data.tokenizer import Tokenizer
    it = make_iterator(cfg.data, Tokenizer.from_file(files["spm"], 400, 0), "train", batch_size=4, seed=0,
                       process_index=0, process_count=1)
    return {k: jnp.asarray(v) for k, v in next(it).items()}


@pytest.mark.parametrize("method", ["full", "prefix"])  # lora: test_lora_dpo_... trains through it
def test_sft_loss_and_gradients_under_each_method(files, method):
    """The SFT loss (assistant tokens only) through the trainer's seam for each finetune.method: the gradient
    reaches the trainable params and only them."""
    from t5like.capabilities import plugins_for
    from t5like.losses import loss_for
    from t5like.models import MODEL_CLASSES
    cfg = tiny_config(files, "sft", method, files["root"] / "unused")
    plugins = plugins_for(cfg)
    graphdef, state = nnx.split(plugins.adapt(MODEL_CLASSES["decoder"](cfg.model, rngs=nnx.Rngs(0))))
    batch = first_batch(files, cfg)
    assert 0 < float(batch["weights"].sum()) < float((batch["segment_ids"] > 0).sum())
    loss = loss_for("sft", cfg)
    grads, sums = jax.jit(plugins.grad(lambda p, b: loss(nnx.merge(graphdef, p), b)))(state.to_pure_dict(), batch)
    assert float(sums["weight"]) == float(batch["weights"].sum()) and math.isfinite(float(sums["loss_sum"]))
    moved = {k for k, v in flat(grads).items() if float(jnp.abs(v).max()) > 0}
    trainable = {k for k in flat(grads) if plugins.is_trainable(k)}
    assert moved and moved <= trainable
    if method != "full":
        assert all(any(str(p).endswith("_lora") or p == "prefix" for p in k) for k in trainable)


def test_bad_records_fail_before_compile(files, tmp_path):
    """No assistant turn, an unknown role, a template that fails to render, identical chosen and rejected: each a
    ValueError naming the file and line, raised while the data is read (before any model exists)."""
    from t5like.data.tokenizer import Tokenizer
    spm = Tokenizer.from_file(files["spm"], 400, 0)
    ok = {"messages": CONVERSATIONS[1]}

    def read(rows, objective="sft", tokenizer=spm, tokenizer_path=files["spm"]):
        path = write_jsonl(tmp_path / f"{objective}.jsonl", rows)
        cfg = DataConfig(source="files", format="jsonl", paths=(path,), objective=objective, seq_len=32,
                         tokenizer_path=tokenizer_path, num_sentinels=0)
        return make_iterator(cfg, tokenizer, "train", batch_size=2, seed=0, process_index=0, process_count=1), path

    path = str(tmp_path / "sft.jsonl")
    with pytest.raises(ValueError, match=rf"{path}:2: the conversation in 'messages' has no assistant message"):
        read([ok, {"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(ValueError, match=rf"{path}:1: messages\[1\] has unknown role 'bot'; roles are "):
        read([{"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}]}, ok])
    with pytest.raises(ValueError, match=rf"{path}:1: a record needs \"messages\".*its fields are \['text'\]"):
        read([{"text": "x"}])
    strict = hf_tokenizer_dir(str(tmp_path / "strict"), "{% if messages[0]['role'] == 'system' %}"
                              "{{ raise_exception('System role not supported') }}{% endif %}" + GPT2_TEMPLATE,
                              ["<|endoftext|>"], "<|endoftext|>", "<|endoftext|>")
    with pytest.raises(ValueError, match=rf"{path}:2: the chat template of {strict} fails to render this "
                                         r"conversation: TemplateError: System role not supported"):
        read([ok, {"messages": CONVERSATIONS[0]}], tokenizer=HFTokenizer(strict), tokenizer_path=strict)
    path = str(tmp_path / "dpo.jsonl")
    with pytest.raises(ValueError, match=rf"{path}:2: \"chosen\" and \"rejected\" are the same answer \(' def'\)"):
        read([{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "def f(): #", "chosen": " def",
                                                                   "rejected": " def"}], objective="dpo")
    with pytest.raises(ValueError, match="data.seq_len=33 must be even for data.objective='dpo'"):
        DataConfig(source="files", format="jsonl", paths=(path,), objective="dpo", seq_len=33).validate()
    cfg = tiny_config(files, "dpo", "lora", tmp_path / "z")
    with pytest.raises(ValueError, match="optim.label_smoothing=0.1 does not apply to data.objective='dpo'"):
        train.train(dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, label_smoothing=0.1)))
