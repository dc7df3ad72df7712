"""Hugging Face interop, against transformers itself on small randomly initialised models (no download):
logit parity both ways, bitwise round trips, greedy generation, tokenizers, sharded loading, refusals, CLI."""
import argparse
import copy
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from flax import nnx  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from t5like.config import MeshConfig, model_preset  # noqa: E402
from t5like.data.hf_tokenizer import HFTokenizer  # noqa: E402
from t5like.decoding import DecodeConfig, generate  # noqa: E402
from t5like.hf import load_pretrained, save_pretrained  # noqa: E402
from t5like.models import build_model  # noqa: E402
from t5like.sharding import Sharder, make_mesh  # noqa: E402
from xla import xla_flags  # noqa: E402

TOL = 1e-4
TEXT = open(argparse.__file__, encoding="utf-8").read()[:60000]

# Odd shapes on purpose: 3 GPT-2 heads and a 1001-token vocabulary; T5 with d_kv * heads != d_model and
# 3 decoder layers; Llama with 6 query / 2 KV heads, rope_theta 5000 and a tied head; BERT with 2 token types;
# Mistral with a sliding window of 3, shorter than every sequence below (13 tokens, 27 when generating).
CASES = {
    "gpt2": (transformers.GPT2LMHeadModel, transformers.GPT2Config(
        n_embd=48, n_head=3, n_layer=2, vocab_size=1001, n_positions=64, bos_token_id=0, eos_token_id=0,
        initializer_range=0.2)),
    "bert": (transformers.BertForMaskedLM, transformers.BertConfig(
        hidden_size=32, num_attention_heads=2, num_hidden_layers=2, intermediate_size=64, vocab_size=211,
        max_position_embeddings=64, type_vocab_size=2)),
    "t5_v1_0": (transformers.T5ForConditionalGeneration, transformers.T5Config(
        d_model=32, d_kv=12, num_heads=4, d_ff=64, num_layers=2, num_decoder_layers=3, vocab_size=224,
        feed_forward_proj="relu")),
    "t5_v1_1": (transformers.T5ForConditionalGeneration, transformers.T5Config(
        d_model=32, d_kv=12, num_heads=4, d_ff=64, num_layers=2, vocab_size=224, feed_forward_proj="gated-gelu",
        tie_word_embeddings=False)),
    "llama": (transformers.LlamaForCausalLM, transformers.LlamaConfig(
        hidden_size=48, num_attention_heads=6, num_key_value_heads=2, intermediate_size=64, num_hidden_layers=2,
        vocab_size=320, rope_theta=5000.0, tie_word_embeddings=True, max_position_embeddings=128,
        initializer_range=0.2)),
    "mistral": (transformers.MistralForCausalLM, transformers.MistralConfig(
        hidden_size=48, num_attention_heads=6, num_key_value_heads=2, intermediate_size=64, num_hidden_layers=2,
        vocab_size=320, sliding_window=3, max_position_embeddings=128, initializer_range=0.2)),
}
AUTO = {"gpt2": transformers.AutoModelForCausalLM, "llama": transformers.AutoModelForCausalLM,
        "mistral": transformers.AutoModelForCausalLM,
        "bert": transformers.AutoModelForMaskedLM, "t5_v1_0": transformers.AutoModelForSeq2SeqLM,
        "t5_v1_1": transformers.AutoModelForSeq2SeqLM}


# Tokenizers, trained here on a little text -------------------------------------------------------------------

def byte_bpe(out_dir, vocab_size, specials, bos=None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if bos is not None:  # Llama: every text starts with BOS
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, specials.index(bos))])
    tok.save(os.path.join(out_dir, "tokenizer.json"))


def wordpiece(out_dir, vocab_size):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer, tok.decoder = (normalizers.BertNormalizer(), pre_tokenizers.BertPreTokenizer(),
                                                      decoders.WordPiece())
    tok.train_from_iterator([TEXT], trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    json.dump({"mask_token": "[MASK]", "pad_token": "[PAD]", "unk_token": "[UNK]"},
              open(os.path.join(out_dir, "tokenizer_config.json"), "w"))


def spiece(out_dir, pieces, extra_ids):
    import sentencepiece as spm
    spm.SentencePieceTrainer.train(sentence_iterator=iter(TEXT.splitlines()), model_prefix=os.path.join(out_dir, "spiece"),
                                   vocab_size=pieces, model_type="bpe", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   minloglevel=2, hard_vocab_limit=True)
    json.dump({"extra_ids": extra_ids, "eos_token": "</s>", "pad_token": "<pad>"},
              open(os.path.join(out_dir, "tokenizer_config.json"), "w"))


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """name -> (torch model, directory it was saved to, with its tokenizer)."""
    out = {}
    for i, (name, (cls, config)) in enumerate(CASES.items()):
        torch.manual_seed(i)
        model = cls(config).eval()
        d = str(tmp_path_factory.mktemp(name))
        model.save_pretrained(d)
        out[name] = (model, d)
    byte_bpe(out["gpt2"][1], 600, ["<|endoftext|>"])
    for name in ("llama", "mistral"):
        byte_bpe(out[name][1], 300, ["<unk>", "<s>", "</s>"], bos="<s>")
    wordpiece(out["bert"][1], 200)
    for name in ("t5_v1_0", "t5_v1_1"):
        spiece(out[name][1], 200, 20)
    return out


@pytest.fixture(scope="module")
def imported(hf):
    return {name: load_pretrained(d) for name, (_, d) in hf.items()}


# Logit parity -------------------------------------------------------------------------------------------------

def batch_for(name, vocab, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (2, 13))
    if name == "bert":  # two segments: token type 0 then 1
        return {"inputs": ids, "token_types": (np.arange(13) >= 6).astype(np.int64)[None].repeat(2, 0)}
    if name.startswith("t5"):
        return {"encoder_inputs": ids, "decoder_inputs": rng.integers(0, vocab, (2, 9))}
    return {"inputs": ids}


def hf_logits(model, name, batch):
    t = {k: torch.tensor(v) for k, v in batch.items()}
    with torch.no_grad():
        if name == "bert":
            return model(input_ids=t["inputs"], token_type_ids=t["token_types"]).logits.numpy()
        if name.startswith("t5"):
            return model(input_ids=t["encoder_inputs"], decoder_input_ids=t["decoder_inputs"]).logits.numpy()
        return model(input_ids=t["inputs"]).logits.numpy()


def t5like_logits(model, batch):
    return np.asarray(model({k: jnp.asarray(v) for k, v in batch.items()}))


@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_transformers_both_ways(name, hf, imported, tmp_path):
    hf_model, _ = hf[name]
    cfg, model = imported[name]
    batch = batch_for(name, cfg.model.vocab_size)
    ref = hf_logits(hf_model, name, batch)
    assert np.abs(ref).max() > 0.1  # not a degenerate all-zero comparison
    assert np.abs(t5like_logits(model, batch) - ref).max() < TOL
    # t5like -> export -> transformers' own loader.
    save_pretrained(model, str(tmp_path))
    back = AUTO[name].from_pretrained(str(tmp_path)).eval()
    assert type(back).__name__ == type(hf_model).__name__
    assert np.abs(hf_logits(back, name, batch) - ref).max() < TOL


@pytest.mark.parametrize("name", list(CASES))
def test_import_export_round_trip_is_bitwise(name, hf, imported, tmp_path):
    _, d = hf[name]
    _, model = imported[name]
    save_pretrained(model, str(tmp_path))
    original, exported = load_file(os.path.join(d, "model.safetensors")), load_file(str(tmp_path / "model.safetensors"))
    for key, value in original.items():
        assert exported[key].shape == value.shape and exported[key].tobytes() == value.tobytes(), key
    extra = set(exported) - set(original)
    # transformers 5 saves a T5 head tied without the rescale as a tie; older transformers need it written out.
    assert extra == ({"lm_head.weight"} if name == "t5_v1_1" else set())
    if extra:
        assert exported["lm_head.weight"].tobytes() == original["shared.weight"].tobytes()


def test_sharded_and_bfloat16_checkpoints_load(hf, imported, tmp_path):
    hf_model, _ = hf["llama"]
    hf_model.save_pretrained(str(tmp_path / "shards"), max_shard_size="40KB")
    assert os.path.isfile(tmp_path / "shards" / "model.safetensors.index.json")
    _, sharded = load_pretrained(str(tmp_path / "shards"))
    _, model = imported["llama"]
    same = jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), nnx_params(sharded), nnx_params(model))
    assert all(jax.tree.leaves(same))
    # bfloat16 weights (numpy has no bfloat16: read from the raw bytes), upcast exactly.
    copy.deepcopy(hf_model).to(torch.bfloat16).save_pretrained(str(tmp_path / "bf16"))
    _, bf = load_pretrained(str(tmp_path / "bf16"))
    want = hf_model.model.embed_tokens.weight.detach().to(torch.bfloat16).float().numpy()
    assert np.array_equal(np.asarray(bf.embed.embedding[...]), want)


def nnx_params(model):
    return nnx.state(model).to_pure_dict()


def test_parameters_land_sharded_on_the_mesh(hf):
    hf_model, d = hf["llama"]
    mesh = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2))
    _, model = load_pretrained(d, shard=Sharder(mesh))
    wi = model.decoder.layers.mlp.wi[...]                     # [layers=2, embed=48, mlp=64]
    assert wi.shape == (2, 48, 64)
    assert {s.data.shape for s in wi.addressable_shards} == {(2, 12, 32)}  # embed over fsdp, mlp over tensor
    q = model.decoder.layers.attn.query[...]                  # [2, 48, heads=6, 8]
    assert {s.data.shape for s in q.addressable_shards} == {(2, 12, 3, 8)}
    batch = batch_for("llama", 320)
    assert np.abs(t5like_logits(model, batch) - hf_logits(hf_model, "llama", batch)).max() < TOL


@pytest.mark.parametrize("preset", ["gpt2_small", "llama_style"])
def test_t5like_trained_models_export_to_transformers(preset, tmp_path):
    """A model t5like built itself (untied head and GQA for llama_style) exports as its HF architecture."""
    model = build_model(model_preset(preset, "tiny"), seed=3)
    assert save_pretrained(model, str(tmp_path)) == {"gpt2_small": "GPT2LMHeadModel",
                                                     "llama_style": "LlamaForCausalLM"}[preset]
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    batch = batch_for(preset, model.cfg.vocab_size)
    assert np.abs(hf_logits(back, preset, batch) - t5like_logits(model, batch)).max() < TOL


# Greedy generation ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["gpt2", "t5_v1_1", "llama", "mistral"])
def test_greedy_generation_matches_transformers(name, hf, imported):
    hf_model, d = hf[name]
    _, model = imported[name]
    tok = HFTokenizer(d)
    prompts = np.random.default_rng(1).integers(3, 200, (2, 6))
    n = 20
    cfg = DecodeConfig(max_new_tokens=n, eos_id=tok.eos_id, start_id=tok.start_id)
    ours, _ = generate(model, prompts, np.array([6, 6]), cfg)
    if name.startswith("t5"):  # the encoder reads the prompt and EOS; decoding starts from pad
        inputs = np.concatenate([prompts, np.full((2, 1), tok.eos_id)], axis=1)
    elif tok.start_id >= 0:     # Llama: BOS first
        inputs = np.concatenate([np.full((2, 1), tok.start_id), prompts], axis=1)
    else:                       # GPT-2: the prompt as it is
        inputs = prompts
    with torch.no_grad():
        ref = hf_model.generate(torch.tensor(inputs), max_new_tokens=n, do_sample=False, num_beams=1,
                                eos_token_id=tok.eos_id, pad_token_id=tok.pad_id if tok.pad_id >= 0 else tok.eos_id,
                                attention_mask=torch.ones_like(torch.tensor(inputs)),
                                **({"decoder_start_token_id": tok.start_id} if name.startswith("t5") else {})).numpy()
    ref = ref[:, 1:] if name.startswith("t5") else ref[:, inputs.shape[1]:]
    for b in range(2):
        want = ref[b].tolist()
        want = want[:want.index(tok.eos_id) + 1] if tok.eos_id in want else want
        got = ours[b, 0, :len(want)].tolist()
        assert got == want and len(want) > 1


# Tokenizers ----------------------------------------------------------------------------------------------------

def test_tokenizers_keep_the_checkpoints_special_ids(hf, tmp_path):
    gpt2, llama, bert, t5 = (HFTokenizer(hf[n][1]) for n in ("gpt2", "llama", "bert", "t5_v1_0"))
    text = "parser.add_argument('--foo', help='bar')\n"
    for tok in (gpt2, llama, t5):
        assert tok.decode(tok.encode(text)).strip() == text.strip()
    assert (gpt2.eos_id, gpt2.start_id) == (0, -1)             # no BOS read before a GPT-2 prompt
    assert (llama.bos_id, llama.eos_id, llama.start_id) == (1, 2, 1)
    assert bert.mask_id == 4 and bert.pad_id == 0 and bert.num_sentinels == 1
    # T5 (sentencepiece): pad 0, eos 1, sentinels counted down from the top, decoder start = pad.
    assert (t5.pad_id, t5.eos_id, t5.start_id, t5.vocab_size, t5.num_sentinels) == (0, 1, 0, 220, 20)
    assert t5.sentinel_id(0) == 219 and t5.decode([t5.sentinel_id(3)]) == "<extra_id_3>"
    assert "encode_batch" in dir(gpt2) and gpt2.encode_batch([text, "x"])[0] == gpt2.encode(text)
    # Llama 2 style: only a sentencepiece tokenizer.model (unk 0, bos 1, eos 2), BOS read before prompts.
    import sentencepiece as spm
    spm.SentencePieceTrainer.train(sentence_iterator=iter(TEXT.splitlines()), model_prefix=str(tmp_path / "tokenizer"),
                                   vocab_size=250, model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                   minloglevel=2)
    json.dump({"model_type": "llama", "bos_token_id": 1, "eos_token_id": 2}, open(tmp_path / "config.json", "w"))
    llama2 = HFTokenizer(str(tmp_path))
    assert (llama2.bos_id, llama2.eos_id, llama2.pad_id, llama2.start_id, llama2.vocab_size) == (1, 2, -1, 1, 250)
    assert llama2.decode([1] + llama2.encode("def add(a, b)") + [2]) == "def add(a, b)"


# Refusals -------------------------------------------------------------------------------------------------------

def edited_copy(src, dst, config=None, tensors=None):
    shutil.copytree(src, dst)
    if config:
        cfg = json.load(open(os.path.join(dst, "config.json")))
        cfg.update(config)
        json.dump(cfg, open(os.path.join(dst, "config.json"), "w"))
    if tensors:
        weights = load_file(os.path.join(dst, "model.safetensors"))
        tensors(weights)
        save_file(weights, os.path.join(dst, "model.safetensors"))
    return str(dst)


def test_bad_checkpoints_are_refused_naming_the_problem(hf, tmp_path):
    gpt2 = hf["gpt2"][1]
    cases = [
        (dict(config={"architectures": ["FalconForCausalLM"]}),
         r"unsupported architecture \['FalconForCausalLM'\].*GPT2LMHeadModel.*BertForMaskedLM.*LlamaForCausalLM"
         r".*MistralForCausalLM"),
        (dict(tensors=lambda w: w.pop("transformer.h.1.ln_2.bias")), r"missing tensor 'transformer.h.1.ln_2.bias'"),
        (dict(tensors=lambda w: w.update({"transformer.h.0.attn.extra.weight": np.zeros(3, np.float32)})),
         r"extra tensors .*transformer.h.0.attn.extra.weight"),
        (dict(tensors=lambda w: w.update({"transformer.h.0.mlp.c_fc.weight": np.zeros((48, 100), np.float32)})),
         r"shape mismatch for tensor 'transformer.h.0.mlp.c_fc.weight': the checkpoint has \(48, 100\), the config "
         r"implies \(48, 192\)"),
        (dict(config={"activation_function": "swish"}), r"activation_function='swish'.*supported activations"),
        (dict(config={"scale_attn_by_inverse_layer_idx": True}), r"scale_attn_by_inverse_layer_idx=True"),
    ]
    for i, (edit, pattern) in enumerate(cases):
        with pytest.raises(ValueError, match=pattern):
            load_pretrained(edited_copy(gpt2, tmp_path / str(i), **edit))
    llama = edited_copy(hf["llama"][1], tmp_path / "rope", config={
        "rope_parameters": {"rope_type": "llama3", "rope_theta": 5000.0, "factor": 8.0}})
    with pytest.raises(ValueError, match=r"rope_type='llama3'"):
        load_pretrained(llama)
    with pytest.raises(ValueError, match=r"matches no Hugging Face architecture.*position='sinusoidal'"):
        save_pretrained(nnx.eval_shape(lambda: build_model(model_preset("transformer_base", "tiny"))),
                        str(tmp_path / "out"))  # refused before any weight is read


# Command line: import -> generate / fine-tune -> export ----------------------------------------------------------

def start_cli(*args):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    env["XLA_FLAGS"] = xla_flags(1)  # one CPU device is enough here
    return subprocess.Popen([sys.executable, "-m", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)


def finished(proc, ok=True) -> subprocess.CompletedProcess:
    out, err = proc.communicate(timeout=300)
    assert (proc.returncode == 0) == ok, err[-3000:]
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def cli(*args, ok=True):
    return finished(start_cli(*args), ok)


def test_cli_import_generate_export(hf, tmp_path):
    hf_model, d = hf["gpt2"]
    run = str(tmp_path / "run")
    cli("t5like.hf", "import", "--hf", d, "--workdir", run)
    # Everything below reads the imported run and nothing else: the commands run side by side.
    prompt = "def parse_args(self, args=None"
    generating = start_cli("t5like.generate", "--workdir", run, "--prompt", prompt, "--max-new-tokens", "20")
    out_dir = str(tmp_path / "hf_out")
    exporting = start_cli("t5like.hf", "export", "--workdir", run, "--out", out_dir)
    reimporting = start_cli("t5like.hf", "import", "--hf", d, "--workdir", run)
    bare = edited_copy(d, tmp_path / "bare")
    os.remove(os.path.join(bare, "tokenizer.json"))
    bare_importing = start_cli("t5like.hf", "import", "--hf", bare, "--workdir", str(tmp_path / "run2"))
    # The workdir is a run: its config names the tokenizer it brought, and init_from accepts it.
    from t5like.checkpoint import read_config
    from t5like.config import CheckpointConfig, Config
    from t5like.finetune import init_from_plan
    cfg = read_config(run)
    assert cfg.data.tokenizer_path == os.path.join(run, "tokenizer") and cfg.model.activation == "gelu"
    assert init_from_plan(Config(model=cfg.model, checkpoint=CheckpointConfig(init_from=run)))
    # Generation through the CLI equals transformers' greedy continuation of the same text.
    tok = HFTokenizer(d)
    ids = torch.tensor([tok.encode(prompt)])
    with torch.no_grad():
        ref = hf_model.generate(ids, max_new_tokens=20, do_sample=False, eos_token_id=tok.eos_id,
                                pad_token_id=tok.eos_id, attention_mask=torch.ones_like(ids))[0, ids.shape[1]:]
    assert tok.decode(ref.tolist()) in finished(generating).stdout
    # Export: transformers loads it and the tokenizer comes along.
    finished(exporting)
    back = transformers.AutoModelForCausalLM.from_pretrained(out_dir).eval()
    batch = batch_for("gpt2", 1001)
    assert np.abs(hf_logits(back, "gpt2", batch) - hf_logits(hf_model, "gpt2", batch)).max() < TOL
    assert os.path.isfile(os.path.join(out_dir, "tokenizer.json"))
    assert json.load(open(os.path.join(out_dir, "config.json")))["eos_token_id"] == 0
    # Refusals print `error: ...` and exit 2 before any work.
    proc = finished(reimporting, ok=False)
    assert proc.returncode == 2 and "error: --workdir" in proc.stderr and "already holds a run" in proc.stderr
    proc = finished(bare_importing, ok=False)
    assert proc.returncode == 2 and "has no tokenizer" in proc.stderr
