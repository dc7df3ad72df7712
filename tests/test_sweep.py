"""The sweep runner: kill and rerun, Ctrl-C, failures, the append-only table, and one real trial.

Most tests run a fake experiment (written into tmp_path, no JAX: it sleeps instead of training, checkpoints
its step, handles SIGTERM like train.py and exits 143) so the runner's logic is tested in seconds. One test
runs a real tiny training trial end to end and checks its FLOPs against the design.
"""
import csv
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from launch.backends import LocalBackend
from launch.plan import load_sweep
from launch.runner import run_sweep
from launch.table import COLUMNS, ResultsTable
from xla import default_optimization, xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FAKE = '''
"""A fake experiment: trials 'train' by sleeping, checkpoint every step, resume, and obey SIGTERM."""
import json, os, signal, sys, time
from t5like.scaling.data import ChinchillaLaw
from t5like.scaling.design import Trial

N = int(os.environ.get("FAKE_TRIALS", "6"))
FAIL = set(os.environ.get("FAKE_FAIL", "").split(","))


def sweep():
    """Trial i: budget i % 3, size i // 3 of a few log-spaced around the Chinchilla optimum."""
    law, per = ChinchillaLaw(), max(1, N // 3)
    trials = []
    for i in range(N):
        budget = [1e18, 1e19, 1e20][i % 3]
        params = int(law.n_opt(budget) * 6.0 ** (2 * (i // 3) / max(1, per - 1) - 1))
        tokens = int(budget / (6 * params))
        fail = ["fake.fail=1"] if f"t{i}" in FAIL else []
        trials.append(Trial(f"t{i}", ("fake.steps=" + os.environ.get("FAKE_STEPS", "6"), f"fake.params={params}",
                                      f"fake.tokens={tokens}", *fail), budget=budget, params=params,
                            non_embedding_params=params, tokens=tokens, steps=6, flops=budget))
    return trials


def prepare(workdir):
    with open(os.path.join(workdir, "prepared.txt"), "a") as f:
        f.write("prepared\\n")
    return ["fake.shared=1"]


def event(wd, text):
    with open(os.path.join(wd, "events.txt"), "a") as f:
        f.write(text + "\\n")


if __name__ == "__main__":
    args = dict(a.split("=", 1) for a in sys.argv[1:])
    wd = args["workdir"]
    assert args.get("fake.shared") == "1", "prepare()'s overrides reach every trial"
    steps, params = int(args["fake.steps"]), int(args["fake.params"])
    state = os.path.join(wd, "state.json")
    start = json.load(open(state))["step"] if os.path.exists(state) else 0
    event(wd, f"start {start}")
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    for step in range(start + 1, steps + 1):
        time.sleep(float(os.environ.get("FAKE_STEP_S", "0.05")))
        if args.get("fake.fail") and step == 2:
            raise RuntimeError("boom: this trial was told to fail")
        event(wd, f"step {step}")
        with open(state + ".tmp", "w") as f:
            json.dump({"step": step}, f)
        os.replace(state + ".tmp", state)
        if stop:
            event(wd, f"preempted {step}")
            sys.exit(143)
    tokens = int(args["fake.tokens"])
    loss = float(ChinchillaLaw().loss(params, tokens))
    with open(os.path.join(wd, "summary.json"), "w") as f:
        json.dump({"step": steps, "params": params, "non_embedding_params": params, "tokens": tokens,
                   "flops": 6.0 * params * tokens, "final_loss": loss + 0.1, "final_eval_loss": loss,
                   "wall_time_s": 0.1, "preempted": False}, f)
    event(wd, "finished")
'''


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """The fake experiment importable here and in the children; returns a runner launcher."""
    mods = tmp_path / "mods"
    mods.mkdir()
    (mods / "fake_exp.py").write_text(FAKE)
    monkeypatch.syspath_prepend(str(mods))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(mods), ROOT]))
    monkeypatch.setenv("PYTHONPATH", env["PYTHONPATH"])
    sys.modules.pop("fake_exp", None)

    def launch(workdir, *args, **env_extra):
        cmd = [sys.executable, "-m", "launch.sweep", "fake_exp", "--workdir", str(workdir), "--no-fit", *args]
        return subprocess.Popen(cmd, cwd=ROOT, env=dict(env, **env_extra), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    return launch


def rows(workdir):
    with open(os.path.join(workdir, "results.csv"), newline="") as f:
        return list(csv.DictReader(f))


def events(workdir, tid):
    path = os.path.join(workdir, "trials", tid, "events.txt")
    return open(path).read().split("\n")[:-1] if os.path.exists(path) else []


def finish(proc, timeout=120):
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def wait_until(cond, proc, timeout=60):
    t0 = time.time()
    while not cond():
        assert proc.poll() is None, proc.communicate()[0]
        assert time.time() - t0 < timeout, "timed out"
        time.sleep(0.05)


def mid_way(workdir, n=6, by_step=None):
    """Some trial has checkpointed a step (at most `by_step`, if given) but not finished."""
    def at(i):
        path = os.path.join(workdir, "trials", f"t{i}", "state.json")
        try:
            step = json.load(open(path))["step"]
        except (OSError, ValueError):
            return False
        return "finished" not in events(workdir, f"t{i}") and (by_step is None or step <= by_step)
    return any(at(i) for i in range(n))


def check_each_trial_once(workdir, n):
    """Exactly one ok row per trial, every trial finished exactly once, no step trained twice."""
    ok = [r["trial_id"] for r in rows(workdir) if r["status"] == "ok"]
    assert sorted(ok) == sorted(f"t{i}" for i in range(n)), ok
    for i in range(n):
        ev = events(workdir, f"t{i}")
        assert ev.count("finished") == 1, (i, ev)
        steps = [e for e in ev if e.startswith("step ")]
        assert len(steps) == len(set(steps)), (i, ev)  # resumed, never redone


def test_sigkill_runner_then_rerun_finishes_without_redoing(fake, tmp_path):
    wd = tmp_path / "sweep"
    proc = fake(wd, "--parallel", "2", FAKE_STEP_S="0.15")
    # Kill the runner once some trials have rows and others are mid-way.
    wait_until(lambda: os.path.exists(wd / "results.csv") and len(rows(wd)) >= 2 and mid_way(wd), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = open(wd / "results.csv").read()
    ok_before = {r["trial_id"] for r in rows(wd) if r["status"] == "ok"}
    assert 2 <= len(ok_before) < 6

    code, out = finish(fake(wd, "--parallel", "2"))
    assert code == 0, out
    assert open(wd / "results.csv").read().startswith(before)  # append-only: nothing lost or rewritten
    check_each_trial_once(wd, 6)
    for tid in ok_before:  # finished trials were not started again
        assert sum(e.startswith("start") for e in events(wd, tid)) == 1, events(wd, tid)
    # The orphaned trials got SIGTERM with their runner, checkpointed, and resumed from there.
    resumed = [i for i in range(6) if sum(e.startswith("start") for e in events(wd, f"t{i}")) == 2]
    assert resumed and all(f"t{i}" not in ok_before for i in resumed)
    assert any(e.startswith("start ") and e != "start 0" for i in resumed for e in events(wd, f"t{i}"))
    # A third run has nothing to do.
    code, out = finish(fake(wd, "--parallel", "2"))
    assert code == 0 and "already have ok rows" in out, out
    assert len(rows(wd)) == 6


def test_sigint_stops_children_cleanly_and_records_nothing_for_them(fake, tmp_path):
    wd = tmp_path / "sweep"
    proc = fake(wd, "--parallel", "2", FAKE_STEP_S="0.2")
    # A trial at most half-way when Ctrl-C lands (on a loaded machine, one caught at its last step could
    # finish before its SIGTERM arrives and leave no trial to check).
    wait_until(lambda: os.path.exists(wd / "results.csv") and len(rows(wd)) >= 1 and mid_way(wd, by_step=3), proc)
    proc.send_signal(signal.SIGINT)
    code, out = finish(proc)
    assert code == 130, out
    assert "rerun the same command" in out
    recorded = {r["trial_id"] for r in rows(wd)}
    assert all(r["status"] == "ok" for r in rows(wd))  # no failed/partial rows for the stopped trials
    stopped = [i for i in range(6) if any(e.startswith("preempted") for e in events(wd, f"t{i}"))]
    assert stopped, ("running trials got SIGTERM and checkpointed", out)
    assert all(f"t{i}" not in recorded for i in stopped)
    with open(wd / "results.csv", "rb") as f:
        assert f.read().endswith(b"\n")

    code, out = finish(fake(wd, "--parallel", "2"))
    assert code == 0, out
    check_each_trial_once(wd, 6)
    assert (wd / "prepared.txt").read_text().count("prepared") == 2  # prepare() ran once per runner


def test_failed_trial_is_recorded_others_finish_and_rerun_retries_it(fake, tmp_path):
    wd = tmp_path / "sweep"
    code, out = finish(fake(wd, "--parallel", "2", FAKE_FAIL="t3"))
    assert code == 1, out
    table = rows(wd)
    assert len(table) == 6
    failed = [r for r in table if r["status"] == "failed"]
    assert [r["trial_id"] for r in failed] == ["t3"]
    assert "boom: this trial was told to fail" in failed[0]["error"] and "exit 1" in failed[0]["error"]
    assert failed[0]["final_eval_loss"] == "" and float(failed[0]["budget"]) == 1e18
    for r in table:
        assert json.loads(r["overrides"])[0] == "fake.steps=6"
        if r["status"] == "ok":
            assert float(r["loss"]) == float(r["final_eval_loss"]) > 0
            assert float(r["wall_time_s"]) > 0

    # The failure was transient: a rerun retries only it, and the latest row is ok.
    code, out = finish(fake(wd, "--parallel", "2"))
    assert code == 0, out
    table = rows(wd)
    assert [r["trial_id"] for r in table[6:]] == ["t3"] and table[6]["status"] == "ok"
    check_each_trial_once(wd, 6)


def test_trial_that_finished_before_its_row_was_written_is_recovered(fake, tmp_path, monkeypatch):
    wd = tmp_path / "sweep"
    code, _ = finish(fake(wd, "--parallel", "2", FAKE_TRIALS="2"))
    assert code == 0
    # Simulate a runner killed after the trial finished but before its row was written.
    lines = open(wd / "results.csv").read().splitlines(keepends=True)
    (wd / "results.csv").write_text("".join(lines[:2]))
    code, out = finish(fake(wd, "--parallel", "2", FAKE_TRIALS="2"))
    assert code == 0, out
    assert sorted(r["trial_id"] for r in rows(wd)) == ["t0", "t1"]
    recovered = rows(wd)[1]
    assert "recovered" in recovered["error"] and recovered["status"] == "ok" and float(recovered["loss"]) > 0
    assert sum(e.startswith("start") for e in events(wd, recovered["trial_id"])) == 1  # not retrained


def test_table_drops_an_incomplete_last_line_and_never_rewrites(tmp_path):
    path = str(tmp_path / "results.csv")
    table = ResultsTable(path)
    table.append({"trial_id": "a", "status": "ok", "error": "line one\nline two", "loss": 1.5})
    with open(path, "a") as f:
        f.write("b,1e18,ok,2.0")  # a write cut short
    assert [r["trial_id"] for r in table.rows()] == ["a"]
    table = ResultsTable(path)  # reopening drops the fragment
    table.append({"trial_id": "c", "status": "failed"})
    got = table.rows()
    assert [r["trial_id"] for r in got] == ["a", "c"]
    assert got[0]["error"] == "line one | line two" and float(got[0]["loss"]) == 1.5
    assert list(got[0]) == list(COLUMNS)
    with open(path, "w") as f:
        f.write("trial_id,loss\n")
    with pytest.raises(ValueError, match="new --workdir"):
        ResultsTable(path)


def test_bad_sweeps_fail_before_anything_runs(fake, tmp_path, monkeypatch):
    mods = tmp_path / "mods"
    (mods / "dup_exp.py").write_text(textwrap.dedent('''
        from t5like.scaling.design import Trial
        def sweep():
            return [Trial("a", ("x=1",)), Trial("a", ("x=2",))]
    '''))
    (mods / "nosweep_exp.py").write_text("def config(): pass\n")
    with pytest.raises(ValueError, match="appears twice"):
        load_sweep("dup_exp")
    with pytest.raises(ValueError, match="no sweep\\(\\) function"):
        load_sweep("nosweep_exp")
    with pytest.raises(ValueError, match="cannot be imported"):
        load_sweep("no_such_module_xyz")
    with pytest.raises(ValueError, match="runner sets workdir"):
        load_sweep("fake_exp", ("workdir=/tmp/x",))
    with pytest.raises(ValueError, match="--parallel"):
        run_sweep(load_sweep("fake_exp"), str(tmp_path / "w"), LocalBackend(), parallel=0)
    assert not (tmp_path / "w").exists()
    # --set changes every trial's id (it is a different run) and reaches the trial.
    base, extra = load_sweep("fake_exp"), load_sweep("fake_exp", ("fake.x=1",))
    assert all(a.id != b.id and b.overrides[-1] == "fake.x=1" for a, b in zip(base.trials, extra.trials))
    # Two runners on one directory would run the same trials twice.
    wd = tmp_path / "busy"
    first = fake(wd, FAKE_STEP_S="0.3")
    wait_until(lambda: os.path.exists(wd / "results.csv"), first)
    code, out = finish(fake(wd))
    assert code == 2 and "another `launch.sweep` is running" in out
    first.send_signal(signal.SIGINT)
    assert finish(first)[0] == 130


def test_isoflop_sweep_runs_the_fit_and_plots(fake, tmp_path):
    wd = tmp_path / "sweep"
    wd.mkdir()
    # An ok row from an earlier design of this sweep must not enter this sweep's fit.
    ResultsTable(str(wd / "results.csv")).append({"trial_id": "old-design", "budget": 1e18, "status": "ok",
                                                  "loss": 9.0, "final_eval_loss": 9.0, "params": 1e8,
                                                  "tokens": 1e9, "flops": 1e18})
    # The fit's time is its optimiser's iterations, not compiling: XLA's default -O2.
    proc = fake(wd, "--parallel", "4", "--fit", FAKE_TRIALS="12", FAKE_STEPS="1", FAKE_STEP_S="0",
                XLA_FLAGS=xla_flags(8), **default_optimization())
    code, out = finish(proc, timeout=300)
    assert code == 0, out
    assert "not in this sweep" in out
    fit = json.load(open(wd / "fit.json"))
    assert "isoflop" in fit and "error" not in fit["isoflop"], fit.get("isoflop")
    assert fit["meta"]["n_points"] == 12
    assert 0.4 < fit["isoflop"]["a"] < 0.6  # the fake's Chinchilla law has a = 0.45
    assert os.path.exists(wd / "plots" / "isoflop.png")


@pytest.mark.slow
def test_one_real_trial_matches_its_design(tmp_path, monkeypatch):
    """A real tiny training trial through the runner: the table's params, tokens and FLOPs are the design's."""
    mods = tmp_path / "mods"
    mods.mkdir()
    (mods / "real_exp.py").write_text(textwrap.dedent('''
        import dataclasses
        from t5like import train
        from t5like.scaling.design import IsoFlopDesign, plan_isoflop
        import experiments.scaling_tiny as tiny

        def config():
            c = tiny.config()
            return dataclasses.replace(c, data=dataclasses.replace(c.data, max_files=60, seq_len=64,
                                                                   tokenizer_train_chars=200_000))

        def sweep():
            d = dataclasses.replace(tiny.design(), budgets=(2e10,), sizes_per_budget=1, min_sizes_per_budget=1,
                                    span=(1.0, 1.0), min_steps=50)
            return plan_isoflop(config(), d).trials

        def prepare(workdir):
            from t5like.data import get_tokenizer
            get_tokenizer(config().data, workdir, config().model.vocab_size)
            return [f"data.tokenizer_path={workdir}/tokenizer/spm.model", "train.progress=false"]

        if __name__ == "__main__":
            train.main(config)
    '''))
    monkeypatch.syspath_prepend(str(mods))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(mods), ROOT]),
               XLA_FLAGS=xla_flags(1))
    wd = tmp_path / "sweep"
    proc = subprocess.run([sys.executable, "-m", "launch.sweep", "real_exp", "--workdir", str(wd), "--no-fit"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (trial,) = load_sweep("real_exp").trials
    (row,) = rows(wd)
    assert row["status"] == "ok" and row["trial_id"] == trial.id
    assert int(row["params"]) == trial.params and int(row["tokens"]) == trial.tokens
    assert int(row["steps"]) == trial.steps >= 50
    assert math.isclose(float(row["flops"]), trial.flops, rel_tol=1e-9)
    assert abs(float(row["flops"]) / 2e10 - 1) < 0.01
    assert 0 < float(row["final_eval_loss"]) < math.log(512)


def test_launch_and_scaling_modules_import_one_way():
    """No import circle among launch/ and t5like/scaling/ (lazy imports inside functions included): each
    module's dependencies run one way, so any of them can be imported first."""
    import ast
    import glob
    graph = {}
    for path in glob.glob(os.path.join(ROOT, "launch", "*.py")) + glob.glob(os.path.join(ROOT, "t5like", "scaling", "*.py")):
        name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
        deps = set()
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.ImportFrom) and node.module:
                pkg = node.module in ("launch", "t5like.scaling")  # `from launch import devices`
                deps |= {f"{node.module}.{a.name}" for a in node.names} if pkg else {node.module}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
        graph[name] = deps
    graph = {k: {d for d in v if d in graph and d != k} for k, v in graph.items()}
    assert graph["launch.sweep"] and graph["launch.backends"], graph  # the walk found the imports

    def cycle_from(start, node, seen):
        for dep in sorted(graph[node]):
            if dep == start:
                return [node, dep]
            if dep not in seen:
                seen.add(dep)
                rest = cycle_from(start, dep, seen)
                if rest:
                    return [node, *rest]
        return None
    cycles = [c for c in (cycle_from(m, m, set()) for m in sorted(graph)) if c]
    assert not cycles, f"import circles: {cycles}"


GRID = '''
"""A grid experiment whose config() reads GRID_STEPS; its trials write a summary without training (and
without importing the config, so a trial takes a fraction of a second)."""
import json, os, sys


def config():
    import dataclasses
    from t5like.config import Config
    c = Config()
    return dataclasses.replace(c, train=dataclasses.replace(c.train, steps=int(os.environ.get("GRID_STEPS", "100"))))


def sweep():
    from t5like.scaling.design import grid
    return grid({"optim.learning_rate": [1e-3, 3e-3]}, config=config())


if __name__ == "__main__":
    args = dict(a.split("=", 1) for a in sys.argv[1:])
    with open(os.path.join(args["workdir"], "summary.json"), "w") as f:
        json.dump({"step": int(os.environ.get("GRID_STEPS", "100")), "final_loss": 2.0, "final_eval_loss": 2.0}, f)
'''


def test_editing_config_reruns_grid_trials_and_keeps_the_old_rows(fake, tmp_path, monkeypatch, capsys):
    """train.steps 100 -> 1000 in config(): the rerun runs both trials again (not "all 2 trials already have
    ok rows" with the old config's results), and the old rows stay in the append-only table."""
    (tmp_path / "mods" / "grid_exp.py").write_text(GRID)
    wd = str(tmp_path / "sweep")
    assert run_sweep(load_sweep("grid_exp"), wd, LocalBackend(2), parallel=2, poll_s=0.05).ok == 2
    before = rows(wd)
    monkeypatch.setenv("GRID_STEPS", "1000")
    edited = load_sweep("grid_exp")
    outcome = run_sweep(edited, wd, LocalBackend(2), parallel=2, poll_s=0.05)
    assert (outcome.ok, outcome.skipped) == (2, 0), capsys.readouterr().err
    after = rows(wd)
    assert after[:2] == before and len(after) == 4  # append-only: the old config's rows are kept
    assert {r["trial_id"] for r in after[2:]} == {t.id for t in edited.trials}
    assert {r["steps"] for r in after} == {"100", "1000"}
    assert "not in this sweep (an earlier design or base config" in capsys.readouterr().err


def test_budgets_and_sizes_make_an_isoflop_sweep_small(fake, tmp_path, capsys):
    """launch.sweep --budgets/--sizes re-plan the experiment's design as t5like.scaling.design's flags do
    (a budget it has keeps its trial ids, so its results are reused); bad values and sweeps that cannot
    be re-planned are errors before anything runs."""
    import experiments.scaling_tiny as tiny
    from launch.sweep import main
    from t5like.scaling.design import plan_isoflop, resize
    full = load_sweep("experiments.scaling_tiny")
    small = load_sweep("experiments.scaling_tiny", budgets=[2e11], sizes=3)
    assert {t.budget for t in small.trials} == {2e11} and len(small.trials) == 3
    assert [t.id for t in small.trials] == [t.id for t in plan_isoflop(tiny.config(),
                                                                       resize(tiny.design(), [2e11], 3)).trials]
    kept = load_sweep("experiments.scaling_tiny", budgets=[6e11])
    assert {t.id for t in kept.trials} == {t.id for t in full.trials if t.budget == 6e11}
    wd = str(tmp_path / "w")
    assert main(["experiments.scaling_tiny", "--workdir", wd, "--list", "--budgets", "2e11", "--sizes", "3"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert len(listed) == 3 and all(line.startswith("pending") and "C=2e+11" in line for line in listed), listed

    (tmp_path / "mods" / "odd_exp.py").write_text(textwrap.dedent('''
        import dataclasses
        from experiments.scaling_tiny import config, design
        from t5like.scaling.design import plan_isoflop
        def sweep():
            return [dataclasses.replace(t, id=t.id + "-odd") for t in plan_isoflop(config(), design()).trials]
    '''))
    tiny_exp = "experiments.scaling_tiny"
    for exp, args, message in ((tiny_exp, ["--sizes", "0"], "--sizes 0: give the number of model sizes per budget"),
                               (tiny_exp, ["--budgets", "-1"], "--budgets -1.0: every budget must be a positive number"),
                               (tiny_exp, ["--budgets", "2e11", "2e11"], "repeats a budget"),
                               (tiny_exp, ["--set", "train.seed=1"], "--set train.seed=1: unknown config key 'train.seed'"),
                               ("fake_exp", ["--budgets", "1e18"], "fake_exp has no config() and design()"),
                               ("odd_exp", ["--sizes", "3"], "odd_exp.sweep() is not plan_isoflop(config(), design())")):
        assert main([exp, "--workdir", wd, *args]) == 2, args
        assert message in capsys.readouterr().err, args
    assert not os.path.exists(wd)


def test_a_one_budget_sweep_finishes_without_a_fit(fake, tmp_path, monkeypatch, capsys):
    """A sweep made small to one budget (--budgets C) has no law to fit: it ends ok, saying so, rather than
    failing in the fit; --fit still asks for it."""
    from launch.sweep import main
    monkeypatch.setenv("FAKE_TRIALS", "2")
    monkeypatch.setenv("FAKE_STEP_S", "0")
    (tmp_path / "mods" / "one_budget_exp.py").write_text(FAKE.replace("[1e18, 1e19, 1e20][i % 3]", "1e18"))
    wd = tmp_path / "sweep"
    assert main(["one_budget_exp", "--workdir", str(wd)]) == 0
    assert "one IsoFLOP budget: no scaling law to fit" in capsys.readouterr().err
    assert len(rows(wd)) == 2 and not (wd / "fit.json").exists()
