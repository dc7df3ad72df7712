"""µP and CompleteP (t5like/parametrization.py, docs/mup.md): the coordinate checks across width and depth, the
rules against Microsoft's `mup` package, sp left bitwise as it was, and the refusals."""
import dataclasses
import json
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from t5like import parametrization as P
from t5like import probe
from t5like.capabilities import plugins_for
from t5like.config import Config, ModelConfig, OptimConfig, TrainConfig
from t5like.data import DataConfig
from t5like.models import build_model
from t5like.optim import make_optimizer
from t5like.optim import path_keys
from t5like.plugins import Plugins
from t5like.finetune import FineTuning
from t5like.train import make_train_step

OBJECTIVE = {"decoder": "lm", "encoder_decoder": "seq2seq", "encoder": "mlm"}


def tiny(family="decoder", width=32, layers=3, parametrization="sp", **kw) -> ModelConfig:
    """4 heads whose head dim grows with the width (so µP's 1/head_dim attention matters), d_ff = 4 d_model."""
    base = dict(vocab_size=256, d_model=width, num_heads=4, d_ff=4 * width, num_layers=layers, max_len=64,
                activation="gelu")
    if family == "encoder_decoder":
        base.update(position="relative", tie_embeddings=False)  # T5's bias and an untied head (µP via init + lr)
    if parametrization != "sp":
        base.update(base_width=32)
    if parametrization == "completep":
        base.update(base_depth=2)
    return ModelConfig(family=family, parametrization=parametrization, **{**base, **kw})


def batch_for(family: str, vocab: int, rows: int = 8, length: int = 32) -> dict:
    r = np.random.default_rng(0)
    ids = lambda: jnp.asarray(r.integers(1, vocab, (rows, length)), jnp.int32)
    if family == "decoder":
        x = ids()
        return {"inputs": x, "targets": jnp.roll(x, -1, 1), "weights": jnp.ones((rows, length))}
    return {"encoder_inputs": ids(), "decoder_inputs": ids(), "targets": ids(), "weights": jnp.ones((rows, length))}


def run_config(model: ModelConfig, lr: float, steps: int, optimizer: str = "adamw") -> Config:
    return Config(model=model, data=DataConfig(objective=OBJECTIVE[model.family]),
                  optim=OptimConfig(name=optimizer, learning_rate=lr, schedule="constant", warmup_steps=0,
                                    weight_decay=0.0, grad_clip=0.0),
                  train=TrainConfig(steps=steps))


def coordinates(model: ModelConfig, lr: float = 3e-3, steps: int = 8, optimizer: str = "adamw") -> dict:
    """mean |activation after `steps` - at init| of every probed activation (each sublayer's output, each
    block's residual stream, the stack's output, the logits) on one fixed batch that the steps train on.
    One jit: the probe at init, `steps` of the trainer's own train step (its plugins and optimizer), the probe."""
    cfg = run_config(model, lr, steps, optimizer)
    plugins = plugins_for(cfg)
    graphdef, state = nnx.split(build_model(model, seed=0))
    params = plugins.init_params(state.to_pure_dict())
    opt, schedule = make_optimizer(cfg.optim, steps, plugins.lr_multiplier)
    opt = plugins.optimizer(opt)
    step = make_train_step(graphdef, cfg, opt, schedule, plugins)
    batch = batch_for(model.family, model.vocab_size)

    def activations(p):
        with probe.capture() as found:
            nnx.merge(graphdef, p)(batch)
        return found

    @jax.jit
    def run(params):
        state = {"params": params, "opt_state": opt.init(params), "step": jnp.zeros((), jnp.int32)}
        state, _ = jax.lax.scan(lambda s, _: step(s, batch), state, None, length=steps)
        # Both probes in one vmapped forward: the program holds one copy of the unrolled model, not two.
        found = jax.vmap(activations)(jax.tree.map(lambda a, b: jnp.stack([a, b]), params, state["params"]))
        return {k: jnp.mean(jnp.abs(v[1] - v[0])) for k, v in found.items()}

    return {k: float(v) for k, v in run(params).items()}


def slopes(sizes: list, rows: list[dict]) -> dict:
    """The slope of log(value) against log(size), per name."""
    return {k: float(np.polyfit(np.log(sizes), np.log([r[k] for r in rows]), 1)[0]) for k in rows[0]}


# The coordinate checks ----------------------------------------------------------------------------------------

# At width 32 (head dim 8) the encoder-decoder's first decoder layer is still 0.11 off flat, so its check starts
# at 64.
WIDTHS = {"decoder": [32, 64, 128, 256], "encoder_decoder": [64, 128, 256]}


@pytest.mark.parametrize("family", ["decoder", "encoder_decoder"])
def test_coordinate_check_across_width(family):
    """Tensor Programs V's coordinate check: after a few Adam steps at one learning rate, how much each
    activation moved does not depend on the width under µP; under sp it grows with it."""
    measured = {}
    for parametrization in ("sp", "mup"):
        # sp only has to show that the check can fail: its two ends suffice.
        widths = WIDTHS[family] if parametrization == "mup" else WIDTHS[family][::len(WIDTHS[family]) - 1]
        rows = [coordinates(tiny(family, w, parametrization=parametrization)) for w in widths]
        measured[parametrization] = slopes(widths, rows)
    names = sorted(measured["mup"])
    assert {"logits", "decoder/2/attn", "decoder/2/mlp", "decoder/2/stream"} <= set(names)
    if family == "encoder_decoder":
        assert {"encoder/2/attn", "decoder/2/cross_attn", "encoder/out"} <= set(names)
    print("\n".join(f"{family} {k:24s} sp {measured['sp'][k]:+.3f}  mup {measured['mup'][k]:+.3f}" for k in names))
    flat = {k: s for k, s in measured["mup"].items() if abs(s) >= 0.1}
    assert not flat, f"µP slopes over 0.1 in magnitude: {flat}"
    assert max(measured["sp"].values()) > 0.3, measured["sp"]  # the check can fail: sp's do grow


DEPTHS = [2, 4, 8, 16]


def test_coordinate_check_across_depth():
    """The same across depth: with CompleteP's 1/depth residual branches, the change of every sublayer output
    (averaged over the layers, and the last layer's), of the stack's output and of the logits stays flat from
    2 to 16 layers; under sp it does not. The residual stream starts at unit scale (model.embed_init_std=1,
    untied head): with GPT-2's 0.02 a pre-norm stack is invariant to how its branches are scaled, so no depth
    rule could show (docs/mup.md). The residual streams' changes are printed, not checked: under CompleteP
    they shrink somewhat with depth here (the random init's share of the branch sum fades like 1/sqrt(depth))."""
    measured = {}
    for parametrization in ("sp", "completep"):
        rows, depths = [], DEPTHS if parametrization == "completep" else DEPTHS[::3]  # sp: its two ends
        for depth in depths:
            model = tiny("decoder", 64, depth, parametrization, embed_init_std=1.0, tie_embeddings=False,
                         scan_unroll=1, **({"base_width": 64} if parametrization != "sp" else {}))
            found, by_kind = coordinates(model), {}
            for k, v in found.items():  # each sublayer kind averaged over the layers; the last layer's own
                by_kind.setdefault(re.sub(r"/\d+/", "/mean/", k), []).append(v)
                if f"/{depth - 1}/" in k:
                    by_kind[k.replace(f"/{depth - 1}/", "/last/")] = [v]
            rows.append({k: float(np.mean(v)) for k, v in by_kind.items()})
        measured[parametrization] = slopes(depths, rows)
    print("\n".join(f"depth {k:24s} sp {measured['sp'][k]:+.3f}  completep {measured['completep'][k]:+.3f}"
                    for k in sorted(measured["sp"])))
    checked = {p: {k: s for k, s in m.items() if not k.endswith("stream")} for p, m in measured.items()}
    assert {"decoder/mean/attn", "decoder/last/mlp", "decoder/out", "logits"} <= set(checked["completep"])
    flat = {k: s for k, s in checked["completep"].items() if abs(s) >= 0.1}
    assert not flat, f"CompleteP slopes over 0.1 in magnitude: {flat}"
    assert max(abs(s) for s in checked["sp"].values()) > 0.3, checked["sp"]


# sp as it was ---------------------------------------------------------------------------------------------------

def test_sp_is_bitwise_the_plain_trainer():
    """Under sp the Parametrization plugin is absent in effect: the same params and losses, bit for bit, as the
    trainer without it (no learning-rate multiplier, the same optimizer chain, params untouched)."""
    cfg = run_config(tiny("encoder_decoder", 32, 2), 1e-2, 3)
    cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, weight_decay=0.1, grad_clip=1.0))
    batch = batch_for("encoder_decoder", 256)
    results = []
    for plugins in (plugins_for(cfg), Plugins([FineTuning(cfg)])):
        assert plugins.lr_multiplier is None
        graphdef, state = nnx.split(build_model(cfg.model, seed=0))
        params = state.to_pure_dict()
        assert plugins.init_params(params) is params
        opt, schedule = make_optimizer(cfg.optim, 3, plugins.lr_multiplier)
        opt = plugins.optimizer(opt)
        step = jax.jit(make_train_step(graphdef, cfg, opt, schedule, plugins))
        s = {"params": params, "opt_state": opt.init(params), "step": jnp.zeros((), jnp.int32)}
        losses = []
        for _ in range(3):
            s, metrics = step(s, batch)
            losses.append(float(metrics["loss"]))
        results.append((losses, jax.tree.leaves(s["params"])))
    assert results[0][0] == results[1][0]
    assert all(np.array_equal(a, b) for a, b in zip(results[0][1], results[1][1]))


def test_base_shape_trains_as_sp():
    """Every multiplier is relative to the base shape: a µP model of the base shape is the sp model, but for
    the zero-initialised query and untied output layer."""
    m = tiny("decoder", 32, 2, "mup", tie_embeddings=False)
    rules = plugins_for(Config(model=m)).plugins[0].rules
    assert all(r.lr == 1.0 and r.init == (0.0 if r.kind in ("query", "output") else 1.0) for r in rules.values())
    assert rules[("decoder", "layers", "attn", "query")].kind == "query"  # kinds do not depend on the width
    assert rules[("lm_head", "kernel")].kind == "output" and rules[("embed", "embedding")].kind == "input"
    assert P.attention_scale(m) is None and P.logits_multiplier(m) == 1.0 and P.branch_multiplier(m) == 1.0


# The rules ---------------------------------------------------------------------------------------------------

def test_rules_per_kind_for_every_family():
    """Each kind of parameter of all three families (self/cross attention, MLPs, norms, tied and untied heads,
    the classifier, T5's relative bias, BERT's MLM transform) gets its kind, under Adam and Adafactor."""
    expect = {"embed/embedding": "input", "decoder/layers/attn/query": "query", "decoder/layers/attn/out": "hidden",
              "decoder/layers/mlp/wo": "hidden", "decoder/layers/attn_norm/scale": "input",
              "decoder/layers/cross_attn/key": "hidden", "decoder/relative_bias/table": "input",
              "lm_head/kernel": "output", "classifier/kernel": "output", "classifier/bias": "scalar",
              "mlm_dense/kernel": "hidden", "pooler/kernel": "hidden", "mlm_bias": "scalar",
              "encoder/layers/mlp/wi_bias": "input", "learned_positions/table": "input"}
    seen = set()
    for family, kw in (("encoder_decoder", {}), ("decoder", dict(tie_embeddings=False)),
                       ("encoder", dict(num_classes=3, use_bias=True, position="learned", num_heads=8))):
        for optimizer in ("adamw", "adafactor"):
            cfg = dataclasses.replace(Config(model=tiny(family, 128, 2, "mup", **kw)),
                                      optim=OptimConfig(name=optimizer))
            rules = plugins_for(cfg).plugins[0].rules
            for path, r in rules.items():
                name = "/".join(path)
                if name in expect:
                    seen.add(name)
                    assert r.kind == expect[name], (name, r)
                m = 4.0  # 128 / 32
                adam = optimizer == "adamw"
                want_lr = {"hidden": 1 / m if adam else m ** -0.5, "query": 1 / m if adam else m ** -0.5,
                           "output": 1 / m if adam else 1.0}.get(r.kind, 1.0)
                want_init = {"output": 0.0 if adam else m ** -0.5, "query": 0.0 if adam else 1.0}.get(r.kind, 1.0)
                assert (r.lr, r.init) == pytest.approx((want_lr, want_init)), (name, r)
    assert seen == set(expect)


def test_weight_decay_is_independent_of_the_multiplier():
    """Weight decay stays lr_t * weight_decay * w whatever a parameter's learning-rate multiplier (MuAdam's
    default): with zero gradients a decayed weight shrinks by the same factor under sp and µP."""
    params = {"decoder": {"layers": {"mlp": {"wi": jnp.ones((4, 4))}}}, "embed": {"embedding": jnp.ones((4, 4))}}
    zeros = jax.tree.map(jnp.zeros_like, params)
    cfg = OptimConfig(learning_rate=0.1, schedule="constant", warmup_steps=0, weight_decay=0.5, grad_clip=0.0,
                      no_decay=())
    for name in ("adamw", "adafactor"):
        c = dataclasses.replace(cfg, name=name)
        for multiplier in (None, lambda path: 0.25 if path[-1] == "wi" else 1.0):
            opt, _ = make_optimizer(c, 10, multiplier)
            updates, _ = opt.update(zeros, opt.init(params), params)
            for u in jax.tree.leaves(updates):
                np.testing.assert_allclose(u, -0.05, rtol=1e-6)


def test_attention_scale_is_one_over_head_dim():
    m = tiny("decoder", 256, 2, "mup")  # head dim 64, base head dim 8
    assert P.attention_scale(m) == pytest.approx(math.sqrt(8) / 64)
    fixed = tiny("decoder", 256, 2, "mup", num_heads=32, base_head_dim=8)  # heads grow, head dim stays 8
    assert P.attention_scale(fixed) is None
    assert P.logits_multiplier(m) == pytest.approx(32 / 256)
    assert P.logits_multiplier(dataclasses.replace(m, tie_embeddings=False)) == 1.0
    assert P.branch_multiplier(tiny("decoder", 256, 8, "completep")) == pytest.approx(2 / 8)


# Against the reference: Microsoft's mup package (PyTorch) ---------------------------------------------------------

def _torch_lm(width: int, tied: bool, vocab: int = 256, heads: int = 4, layers: int = 2):
    """The decoder of `tiny(width, tie_embeddings=tied)` in torch, made µP by mup's own parts: MuReadout (or
    MuSharedReadout on the embedding), 1/head_dim attention; the base shapes and MuAdam come after."""
    import torch
    from mup import MuReadout, MuSharedReadout

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn_norm, self.mlp_norm = (torch.nn.LayerNorm(width, bias=False) for _ in range(2))
            self.query, self.key, self.value = (torch.nn.Linear(width, width, bias=False) for _ in range(3))
            torch.nn.init.zeros_(self.query.weight)  # TP5 D.2's zero query, as mup's Transformer example does
            self.out = torch.nn.Linear(width, width, bias=False)
            self.wi, self.wo = torch.nn.Linear(width, 4 * width, bias=False), torch.nn.Linear(4 * width, width, bias=False)

        def forward(self, x):
            B, T, _ = x.shape
            h = self.attn_norm(x)
            q, k, v = (f(h).view(B, T, heads, -1).transpose(1, 2) for f in (self.query, self.key, self.value))
            o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1 / q.shape[-1])
            x = x + self.out(o.transpose(1, 2).reshape(B, T, width))
            return x + self.wo(torch.nn.functional.gelu(self.wi(self.mlp_norm(x))))

    class LM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(vocab, width)
            self.layers = torch.nn.ModuleList(Block() for _ in range(layers))
            self.final_norm = torch.nn.LayerNorm(width, bias=False)
            self.head = (MuSharedReadout(self.embed.weight, bias=False) if tied else
                         MuReadout(width, vocab, bias=False, readout_zero_init=True))

        def forward(self, ids):
            x = self.embed(ids)
            for layer in self.layers:
                x = layer(x)
            return self.head(self.final_norm(x))

    return LM()


# torch name (layer 0) -> ours
TORCH_NAMES = {"embed.weight": "embed/embedding", "layers.0.query.weight": "decoder/layers/attn/query",
               "layers.0.key.weight": "decoder/layers/attn/key", "layers.0.value.weight": "decoder/layers/attn/value",
               "layers.0.out.weight": "decoder/layers/attn/out", "layers.0.wi.weight": "decoder/layers/mlp/wi",
               "layers.0.wo.weight": "decoder/layers/mlp/wo", "layers.0.attn_norm.weight": "decoder/layers/attn_norm/scale",
               "final_norm.weight": "decoder/final_norm/scale", "head.weight": "lm_head/kernel"}


@pytest.mark.parametrize("tied", [False, True])
def test_rules_match_the_mup_package(tied):
    """Per parameter: our init std and our Adam learning-rate multiplier at width 256 against base width 64,
    and mup's (the std of its tensors after set_base_shapes' re-init, the lr of MuAdam's param groups). Where
    mup puts a forward multiplier (MuReadout's 1/width_mult) and we do not (an untied head), compare the
    effective weight (Adam's symmetry: multiplier x std, multiplier x lr). The query and an untied readout start
    at zero on both sides (TP5 D.2; MuReadout(readout_zero_init=True)). One documented difference: mup rescales a
    MuSharedReadout's weight, the shared embedding, by sqrt(width_mult); we keep it constant."""
    torch = pytest.importorskip("torch")
    mup = pytest.importorskip("mup")
    base_w, width, lr = 64, 256, 1e-2
    m = width / base_w

    torch.manual_seed(0)
    models = {w: _torch_lm(w, tied) for w in (base_w, 2 * base_w, width)}
    for w in (base_w, width):
        mup.set_base_shapes(models[w], models[base_w], delta=models[2 * base_w])
    groups = {id(p): g["lr"] / lr for g in mup.MuAdam(models[width].parameters(), lr=lr).param_groups
              for p in g["params"]}
    models[width](torch.zeros((1, 4), dtype=torch.long))  # a working model
    theirs_std = {n: float(p.detach().std()) for n, p in models[width].named_parameters()}
    theirs_base = {n: float(p.detach().std()) for n, p in models[base_w].named_parameters()}
    theirs_lr = {n: groups[id(p)] for n, p in models[width].named_parameters()}

    ours = {}
    for w in (base_w, width):
        model = tiny("decoder", w, 2, "mup", base_width=base_w, norm="layernorm", tie_embeddings=tied)
        plugins = plugins_for(Config(model=model))
        params = plugins.init_params(nnx.state(build_model(model, seed=0)).to_pure_dict())
        flat = {"/".join(path_keys(k)): v for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}
        ours[w] = ({k: float(jnp.std(v)) for k, v in flat.items()}, plugins.lr_multiplier)
    (ours_base, _), (ours_std, ours_lr) = ours[base_w], ours[width]

    compared = []
    for torch_name, name in TORCH_NAMES.items():
        if torch_name not in theirs_std or (tied and name == "lm_head/kernel"):
            continue
        forward = 1 / m if torch_name == "head.weight" else 1.0  # MuReadout's forward multiplier (base: 1)
        lr_theirs, lr_ours = theirs_lr[torch_name] * forward, ours_lr(tuple(name.split("/")))
        assert lr_ours == pytest.approx(lr_theirs), (name, lr_ours, lr_theirs)
        if "norm" in name:  # ones: no std to compare; both keep them at 1
            continue
        if name.endswith("query") or name == "lm_head/kernel":  # zero-initialised on both sides
            assert ours_std[name] == 0.0 and theirs_std[torch_name] == 0.0, name
            compared.append(name)
            continue
        std_theirs, std_ours = theirs_std[torch_name] / theirs_base[torch_name] * forward, ours_std[name] / ours_base[name]
        if tied and name == "embed/embedding":
            # mup's set_base_shapes re-inits every MuReadout's weight, here the shared embedding, by sqrt(m).
            assert std_theirs == pytest.approx(m ** 0.5, rel=0.05) and std_ours == pytest.approx(1.0, rel=0.05)
        else:
            assert std_ours == pytest.approx(std_theirs, rel=0.05), (name, std_ours, std_theirs)
        compared.append(name)
    assert len(compared) == (7 if tied else 8)


# Refusals -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("change, words", [
    (dict(parametrization="mup2"), "model.parametrization='mup2' is not known for model.family='decoder'"),
    (dict(parametrization="mup", base_width=None), "needs model.base_width"),
    (dict(parametrization="completep", base_depth=None), "needs model.base_depth"),
    (dict(parametrization="mup", d_model=96, d_ff=200, base_width=64), "set model.base_d_ff"),
    (dict(parametrization="mup", d_model=96, d_ff=384, base_width=50), "set model.base_head_dim"),
    (dict(parametrization="mup", d_model=128, base_width=32, base_head_dim=6), "heads"),
    (dict(parametrization="mup", scale_embeddings=True), "model.scale_embeddings"),
    (dict(parametrization="mup", scale_attention=False), "model.scale_attention=false"),
    (dict(parametrization="completep", norm_placement="post"), "pre-norm"),
    (dict(parametrization="mup", base_width=0), "model.base_width=0 must be a positive integer"),
])
def test_bad_parametrization_settings_are_clear_errors(change, words):
    cfg = dataclasses.replace(tiny("decoder", 64, 2, "completep"), **change)
    with pytest.raises(ValueError, match=re.escape(words)):
        cfg.validate()


def _fake_run(path, model: ModelConfig) -> str:
    path.mkdir(parents=True, exist_ok=True)
    from t5like.config import to_dict
    (path / "config.json").write_text(json.dumps(to_dict(Config(model=model, workdir=str(path)))))
    return str(path)


def test_init_from_an_sp_run_is_refused_under_mup(tmp_path):
    """An sp run's weights (a Hugging Face import is one) compute another function under µP's multipliers."""
    src = _fake_run(tmp_path / "hf", tiny("decoder", 64, 2))
    cfg = Config(model=tiny("decoder", 64, 2, "mup"))
    cfg = dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, init_from=src))
    plugin = plugins_for(cfg).plugins[0]
    with pytest.raises(ValueError, match=r"model.parametrization: 'sp' there, 'mup' here.*Hugging Face"):
        plugin.check_start(resuming=False)


def test_resume_with_another_parametrization_is_refused(tmp_path, monkeypatch):
    from t5like import train
    workdir = _fake_run(tmp_path / "run", tiny("decoder", 64, 2, "mup"))
    monkeypatch.setattr(train, "latest_step", lambda _: 10)  # the workdir holds checkpoints
    cfg = Config(model=tiny("decoder", 64, 2, "mup", base_width=16), workdir=workdir)
    with pytest.raises(ValueError, match=r"model.base_width: 32 -> 16"):
        train.check_workdir(cfg)
    cfg = Config(model=tiny("decoder", 64, 2), workdir=workdir)
    with pytest.raises(ValueError, match=r"model.parametrization: 'mup' -> 'sp'"):
        train.check_workdir(cfg)


def test_isoflop_design_keeps_the_base_lr_under_mup():
    """The sweep design: sp rescales the learning rate by a guessed (base_d / d)^0.5, µP keeps the base one
    (and gives every trial its base shape); the plan says which rule it used."""
    from experiments import scaling_tiny
    from t5like.scaling.design import plan_isoflop
    base, design = scaling_tiny.config(), scaling_tiny.design()
    lrs = lambda plan: {o.split("=")[1] for t in plan.trials for o in t.overrides if o.startswith("optim.learning_rate")}
    sp = plan_isoflop(base, design)
    assert len(lrs(sp)) > 1 and "^ 0.5" in sp.lr_rule
    model = dataclasses.replace(base.model, parametrization="mup", base_width=base.model.d_model)
    plan = plan_isoflop(dataclasses.replace(base, model=model), design)  # every trial's config validates
    assert lrs(plan) == {"0.003"} and "base_lr at every size" in plan.lr_rule
    assert all("model.base_head_dim=8" in t.overrides for t in plan.trials)


def test_hugging_face_models_are_sp_and_mup_ones_are_not_exported(tmp_path):
    """An import is standard-parametrized (ModelConfig's default); a µP model has multipliers no Hugging Face
    architecture has, so exporting one is refused before anything is written."""
    transformers = pytest.importorskip("transformers")
    from t5like.hf import gpt2, save_pretrained
    assert gpt2.to_model_config(transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4).to_dict()).parametrization == "sp"
    model = build_model(tiny("decoder", 64, 2, "mup"))
    with pytest.raises(ValueError, match="Export sp models only"):
        save_pretrained(model, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_adapters_keep_their_own_conventions():
    """LoRA under a µP base: the adapters have no rule (learning-rate multiplier 1, their own init), the base's
    params keep theirs."""
    from t5like.config import FinetuneConfig
    from t5like.models import abstract_model
    cfg = Config(model=tiny("decoder", 128, 2, "mup"), finetune=FinetuneConfig(method="lora", lora_targets=("q", "v")))
    plugins = plugins_for(cfg)
    _, state = abstract_model(cfg.model, adapt=plugins.adapt)
    paths = [path_keys(p) for p, _ in jax.tree_util.tree_flatten_with_path(state.to_pure_dict())[0]]
    adapters = [p for p in paths if any(str(k).endswith("_lora") for k in p)]
    assert adapters and all(plugins.lr_multiplier(p) == 1.0 for p in adapters)
    assert plugins.lr_multiplier(("decoder", "layers", "attn", "query")) == pytest.approx(0.25)
