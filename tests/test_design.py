"""IsoFLOP design: every trial spends its budget (by the model's own FLOPs formula), the sizes span the
requested range under the stated shape rule, overrides build valid configs, and bad budgets fail early."""
import csv
import dataclasses
import json
import math

import pytest

import experiments.scaling_isoflop as big
import experiments.scaling_tiny as tiny
from t5like.accounting import param_counts, training_flops
from t5like.config import apply_overrides
from t5like.scaling.design import (Choice, IsoFlopDesign, Uniform, grid, main, plan_isoflop, random_search,
                                   sequence_lengths)

EXPERIMENTS = {"tiny": tiny, "tpu": big}


def recompute(base, trial):
    """What the trainer will count for this trial, from its overrides alone."""
    cfg = apply_overrides(base, list(trial.overrides)).validate()
    seq, target = sequence_lengths(cfg)
    per_seq = training_flops(cfg.model, seq, target).per_sequence
    return cfg, per_seq * cfg.train.batch_size * cfg.train.steps


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_trial_spends_its_budget(name):
    exp = EXPERIMENTS[name]
    base, design = exp.config(), exp.design()
    plan = plan_isoflop(base, design)
    assert {t.budget for t in plan.trials} == set(design.budgets)
    for t in plan.trials:
        cfg, flops = recompute(base, t)
        assert abs(flops / t.budget - 1) < 0.01, (t.id, flops, t.budget)
        assert math.isclose(flops, t.flops, rel_tol=1e-12)
        counts = param_counts(cfg.model)
        assert (t.params, t.non_embedding_params) == (counts["total"], counts["non_embedding"])
        assert t.tokens == cfg.train.batch_size * cfg.train.steps * cfg.data.seq_len == t.steps * t.batch_size * cfg.data.seq_len
        assert t.flops_6n == 6 * t.non_embedding_params * t.tokens
        assert math.isclose(t.tokens_6n, t.budget / (6 * t.non_embedding_params))
        assert design.min_steps <= t.steps <= design.max_steps
        assert cfg.optim.warmup_steps < cfg.train.steps
        # Every trial evaluates on the same number of rows (within one batch), so eval losses compare.
        assert abs(cfg.train.eval_steps * cfg.train.batch_size - base.train.eval_steps * base.train.batch_size) \
            <= cfg.train.batch_size


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_shapes_follow_the_rule_and_sizes_span_the_range(name):
    exp = EXPERIMENTS[name]
    base, design = exp.config(), exp.design()
    plan = plan_isoflop(base, design)
    gated = base.model.activation in ("swiglu", "gated_gelu")
    for budget in design.budgets:
        trials = [t for t in plan.trials if t.budget == budget]
        n_opt = math.sqrt(budget / (6 * design.tokens_per_param))  # D = k·N, C = 6 N D
        sizes = [t.params for t in trials]
        assert len(sizes) >= design.min_sizes_per_budget
        assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes), sizes  # distinct, smallest first
        lo, hi = design.span
        assert n_opt * lo / 1.5 <= sizes[0] <= n_opt * lo * 1.5, (budget, sizes[0], n_opt * lo)
        assert n_opt * hi / 1.5 <= sizes[-1] <= n_opt * hi * 1.5, (budget, sizes[-1], n_opt * hi)
        assert sizes[-1] / sizes[0] > (hi / lo) / 3
        for t in trials:
            m = apply_overrides(base, list(t.overrides)).model
            assert m.d_model % design.head_dim == 0 and m.num_heads * m.dim_per_head == m.d_model
            assert m.dim_per_head == design.head_dim
            assert design.aspect_range[0] <= m.d_model / m.num_layers <= design.aspect_range[1]
            assert m.d_ff % design.head_dim == 0
            assert abs(m.d_ff / m.d_model - (8 / 3 if gated else 4)) < design.head_dim / m.d_model + 1e-9
            if base.model.num_kv_heads is not None:
                assert m.num_heads % m.kv_heads == 0 and m.kv_heads < m.num_heads
        # Bigger models get fewer tokens at one budget, and a smaller learning rate (lr ∝ d_model^-0.5).
        toks = [t.tokens for t in trials]
        assert toks == sorted(toks, reverse=True)
        lrs = [apply_overrides(base, list(t.overrides)).optim.learning_rate for t in trials]
        assert lrs == sorted(lrs, reverse=True)


def test_budgets_that_yield_no_trial_are_clear_errors():
    base, design = tiny.config(), tiny.design()
    # Too small: even the smallest shape would train for fewer than min_steps.
    with pytest.raises(ValueError, match=r"budget 1e\+09 FLOPs yields 0 distinct .*fewer than design.min_steps"):
        plan_isoflop(base, dataclasses.replace(design, budgets=(2e11, 1e9)))
    # Too large for the allowed depths.
    with pytest.raises(ValueError, match=r"budget 1e\+20 .*above the largest allowed shape.*max_layers"):
        plan_isoflop(base, dataclasses.replace(design, budgets=(1e20,), max_steps=10**9))
    # A span that collapses onto one shape.
    with pytest.raises(ValueError, match=r"budget 2e\+11 FLOPs yields 1 distinct.*same shape"):
        plan_isoflop(base, dataclasses.replace(design, budgets=(2e11,), span=(0.99, 1.01)))
    for bad, field in [(dict(budgets=()), "design.budgets"), (dict(budgets=(1e12, -1.0)), "design.budgets"),
                       (dict(span=(2.0, 4.0)), "design.span"), (dict(min_steps=10), "design.min_steps"),
                       (dict(aspect_ratio=200.0), "design.aspect_ratio"),
                       (dict(sizes_per_budget=2), "design.min_sizes_per_budget"),
                       (dict(size_count="all"), "design.size_count")]:
        with pytest.raises(ValueError, match=field):
            plan_isoflop(base, dataclasses.replace(design, **bad))


def test_plan_files_and_cli(tmp_path, capsys):
    out = tmp_path / "plan.csv"
    assert main(["--experiment", "experiments.scaling_tiny", "--out", str(out)]) == 0
    plan = plan_isoflop(tiny.config(), tiny.design())
    with open(out, newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["trial_id"] for r in table] == [t.id for t in plan.trials]
    for r, t in zip(table, plan.trials):
        assert json.loads(r["overrides"]) == list(t.overrides)
        assert int(r["params"]) == t.params and float(r["flops"]) == t.flops and abs(float(r["flops_error"])) < 0.01
        for key in ("model.d_model=", "model.num_layers=", "train.steps=", "train.batch_size=",
                    "optim.learning_rate="):
            assert any(o.startswith(key) for o in t.overrides)
    assert main(["--experiment", "experiments.scaling_tiny", "--budgets", "1e12", "--out",
                 str(tmp_path / "plan.json")]) == 0
    saved = json.load(open(tmp_path / "plan.json"))
    assert {t["budget"] for t in saved["trials"]} == {1e12} and saved["design"]["head_dim"] == tiny.design().head_dim
    capsys.readouterr()
    assert main(["--experiment", "experiments.scaling_tiny", "--budgets", "1e5"]) == 2
    assert "budget 1e+05" in capsys.readouterr().err
    assert main(["--experiment", "experiments.quickstart"]) == 2
    assert "no design() function" in capsys.readouterr().err
    # The same design gives the same ids (a rerun skips finished trials); a changed rule gives new ones.
    again = plan_isoflop(tiny.config(), tiny.design())
    assert [t.id for t in again.trials] == [t.id for t in plan.trials]
    other = plan_isoflop(tiny.config(), dataclasses.replace(tiny.design(), lr_exponent=1.0))
    assert not {t.id for t in other.trials} & {t.id for t in plan.trials if "l2d64" not in t.id}
    base = tiny.config()
    edited = dataclasses.replace(base, data=dataclasses.replace(base.data, max_files=100))
    assert not {t.id for t in plan_isoflop(edited, tiny.design()).trials} & {t.id for t in plan.trials}


def test_grid_and_random_search():
    trials = grid({"optim.learning_rate": [1e-3, 3e-3], "train.batch_size": [8, 16, 32]}, base=("train.steps=10",),
                  config=tiny.config())
    assert len(trials) == 6 and len({t.id for t in trials}) == 6
    assert trials[0].overrides == ("train.steps=10", "optim.learning_rate=0.001", "train.batch_size=8")
    assert trials[-1].overrides[1:] == ("optim.learning_rate=0.003", "train.batch_size=32")
    space = {"optim.learning_rate": Uniform(1e-4, 1e-2, log=True), "model.num_layers": Uniform(1, 4, integer=True),
             "train.batch_size": Choice((8, 16))}
    a, b = random_search(space, 5, seed=3, config=tiny.config()), random_search(space, 5, seed=3, config=tiny.config())
    assert [t.overrides for t in a] == [t.overrides for t in b] and [t.id for t in a] == [t.id for t in b]
    assert [t.overrides for t in random_search(space, 5, seed=4, config=tiny.config())] != [t.overrides for t in a]
    for t in a:
        values = dict(o.split("=") for o in t.overrides)
        assert 1e-4 <= float(values["optim.learning_rate"]) <= 1e-2
        assert values["model.num_layers"] in {"1", "2", "3", "4"} and values["train.batch_size"] in {"8", "16"}
        apply_overrides(tiny.config(), list(t.overrides)).validate()  # they are real config keys and values
    with pytest.raises(ValueError, match="non-empty list"):
        grid({"optim.learning_rate": []}, config=tiny.config())
    with pytest.raises(ValueError, match="low < high"):
        random_search({"optim.learning_rate": Uniform(0.0, 1.0, log=True)}, 3, config=tiny.config())
    with pytest.raises(ValueError, match="n=0"):
        random_search(space, 0, config=tiny.config())
    with pytest.raises(ValueError, match="grid: the trial .* unknown config key 'optim.lr'"):
        grid({"optim.lr": [1e-3]}, config=tiny.config())


def test_grid_and_random_search_ids_hash_the_base_config():
    """Editing the experiment's config() (train.steps 100 -> 1000) gives every grid and random-search trial a
    new id, as an IsoFLOP plan's trials get: a rerun must not take the old config's results for them."""
    base = tiny.config()
    edited = dataclasses.replace(base, train=dataclasses.replace(base.train, steps=base.train.steps * 10))
    space = {"optim.learning_rate": [1e-3, 3e-3]}
    rand = {"optim.learning_rate": Uniform(1e-4, 1e-2, log=True)}
    for make in (lambda cfg: grid(space, config=cfg), lambda cfg: random_search(rand, 3, seed=1, config=cfg)):
        old, again, new = make(base), make(base), make(edited)
        assert [t.id for t in old] == [t.id for t in again]  # deterministic: a rerun finds its trials
        assert [t.overrides for t in old] == [t.overrides for t in new]
        assert not {t.id for t in old} & {t.id for t in new}, [t.id for t in old]
    for call in (lambda: grid(space), lambda: random_search(rand, 2)):
        with pytest.raises(ValueError, match="pass config=config\(\)"):
            call()


def test_grid_ids_are_ascii_directory_names():
    """A value with non-ASCII letters gives a deterministic ASCII id that the runner accepts; a list value
    becomes the comma-separated override a tuple field parses (not the text "['a.txt']")."""
    from launch.plan import _ID
    paths = ["corpus/données.txt", "corpus/日本語.txt", "Ærø/naïve.txt"]
    trials = grid({"data.paths": paths}, config=tiny.config())
    assert [t.id for t in trials] == [t.id for t in grid({"data.paths": paths}, config=tiny.config())]
    assert len({t.id for t in trials}) == 3
    for t in trials:
        assert t.id.isascii() and _ID.match(t.id), t.id
    assert trials[0].id.startswith("pathscorpus-donnees.txt-")
    (listed,) = grid({"data.paths": [["a.txt", "b.txt"]]}, config=tiny.config())
    assert listed.overrides == ("data.paths=a.txt,b.txt",)
    assert apply_overrides(tiny.config(), list(listed.overrides)).data.paths == ("a.txt", "b.txt")


@pytest.mark.parametrize("experiment", ["gpt2_small", "bert_base", "t5_base"])
def test_other_families_spend_their_budgets(experiment):
    """Learned positions and GELU (GPT-2), an encoder (BERT), an encoder-decoder with span corruption (T5):
    the design's FLOPs are the trainer's formula's, for both stacks."""
    import importlib
    base = importlib.import_module(f"experiments.{experiment}").config(size="tiny")
    design = IsoFlopDesign(budgets=(3e12, 1e13), sizes_per_budget=4, head_dim=16, aspect_ratio=32.0,
                           aspect_range=(16.0, 64.0), max_layers=8, min_steps=100, max_steps=5000)
    plan = plan_isoflop(base, design)
    assert len({t.budget for t in plan.trials}) == 2
    for t in plan.trials:
        cfg, flops = recompute(base, t)
        assert abs(flops / t.budget - 1) < 0.01 and math.isclose(flops, t.flops, rel_tol=1e-12)
        seq, target = sequence_lengths(cfg)
        assert t.tokens == (seq + target) * cfg.train.batch_size * cfg.train.steps
        if cfg.model.family == "encoder_decoder":
            assert target > 0 and cfg.model.decoder_layers == cfg.model.num_layers


@pytest.mark.parametrize("name", ["mup_transfer", "scaling_isoflop", "scaling_tiny"])
def test_every_experiment_sweep_plans_and_applies(name):
    """Each shipped sweep plans (launch.sweep calls `sweep()`), its ids are unique, and every trial's overrides
    apply to the experiment's config: a sweep that breaks is found here, not an hour into a benchmark."""
    import importlib
    module = importlib.import_module(f"experiments.{name}")
    trials = module.sweep()
    assert trials and len({t.id for t in trials}) == len(trials)
    for t in trials:
        apply_overrides(module.config(), list(t.overrides))
