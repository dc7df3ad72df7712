"""One mixture run, SIGKILLed and resumed, seen through everything that watches it (issue 27): it continues
bitwise (against an uninterrupted twin run in the background), reports each source's eval rows, writes a
profile that XProf's own converter reads, logs to an offline W&B run that the resume continues, and accounts
for its time (goodput) across the restart, against a sleep injected into its data iterator."""
import glob
import json
import math
import os
import shlex
import struct
import sys
import types

import pytest

from t5like import goodput
from t5like.config import TrainConfig
from t5like.data import DataConfig, get_tokenizer
from t5like.metrics import read_metrics
from test_mixture import WORDS, write_sources
from xla import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, EVERY, SLEEP, PAUSE = 10, 4, 0.4, 1.0  # SLEEP: the injected data wait; PAUSE: between kill and resume
KILL_AT = 8  # the 8th batch read (one before the loop, then steps 1-7): killed before step 7, after step 6


def make_shared(root) -> dict:
    get_tokenizer(DataConfig(source="stdlib", max_files=40, tokenizer_train_chars=200_000), str(root / "tok"), 2048)
    dirs = write_sources(root)
    mix = [{"name": n, "source": "files", "paths": [dirs[n]], "weight": w} for n, w in zip(WORDS, (0.5, 0.3, 0.2))]
    return {"root": root, "tokenizer": str(root / "tok" / "tokenizer" / "spm.model"), "mixture": json.dumps(mix)}


def command(shared, workdir, sleep: float, kill_at: int, *extra) -> list[str]:
    args = ["size=tiny", "data.seq_len=32", "train.batch_size=8", "train.eval_steps=1", "train.eval_every=0",
            "train.progress=false", "train.peak_flops=1e11", "optim.schedule=constant",
            f"data.tokenizer_path={shared['tokenizer']}", f"data.mixture={shared['mixture']}",
            f"train.steps={STEPS}", f"checkpoint.every={EVERY}", "train.profile_steps=2,3",
            "train.wandb_project=t5like-test", f"workdir={workdir}", *extra]
    return [sys.executable, os.path.join("tests", "slow_data_run.py"), str(sleep), f"{workdir}.batches",
            str(kill_at), *args]


def background_runs(background, selected):
    """Started before the first test (tests/background.py): the uninterrupted twin (no sleep, no W&B), and the
    run that SIGKILLs itself at KILL_AT, then (after PAUSE s) resumes to the end, one shell command."""
    if any({"twin", "killed"} & fixtures for fixtures in selected.values()):
        shared = background.once("observability", make_shared)
        env = dict(os.environ, XLA_FLAGS=xla_flags(1), PYTHONUNBUFFERED="1", WANDB_MODE="offline",
                   WANDB_SILENT="true")
        background.start("observability_twin", command(shared, shared["root"] / "twin", 0, 0, "train.wandb_project="),
                         cwd=ROOT, env=env)
        w = shared["root"] / "killed"
        chain = (f"{shlex.join(command(shared, w, SLEEP, KILL_AT))}; cp {w}/metrics.jsonl {w}.at_kill.jsonl; "
                 f"sleep {PAUSE}; {shlex.join(command(shared, w, SLEEP, 0))}")
        background.start("observability_killed", ["sh", "-c", chain], cwd=ROOT, env=env)


@pytest.fixture(scope="module")
def shared(background):
    return background.once("observability", make_shared)


@pytest.fixture(scope="module")
def twin(background, shared):
    background.wait("observability_twin")
    return shared["root"] / "twin"


def logged(workdir) -> dict[int, float]:
    rows = [r for r in read_metrics(str(workdir)) if "loss" in r]
    assert [r["step"] for r in rows] == sorted({r["step"] for r in rows}), "duplicated or unordered rows"
    return {r["step"]: r["loss"] for r in rows}


@pytest.fixture(scope="module")
def killed(background, shared):
    out = background.wait("observability_killed")
    workdir = shared["root"] / "killed"
    at_kill = [json.loads(line) for line in open(f"{workdir}.at_kill.jsonl")]
    # The seconds each next() of the training iterator took, in order, as the iterator measured them.
    waits = [float(x) for x in open(f"{workdir}.batches").read().split()]
    return {"workdir": workdir, "out": out, "waits": waits,
            "logged_at_kill": max(r["step"] for r in at_kill if "loss" in r)}


def test_a_killed_mixture_run_resumes_bitwise_and_reports_each_source(killed, twin):
    assert f"resumed from {killed['workdir'] / 'checkpoints'} at step {EVERY}" in killed["out"]
    got, want = logged(killed["workdir"]), logged(twin)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert got == want  # bitwise, every step once
    last = [r for r in read_metrics(str(killed["workdir"])) if "eval_loss" in r][-1]
    for name in WORDS:  # each mixture source is an eval set of its own held-out documents
        assert math.isfinite(last[f"eval/{name}/loss"]) and last[f"eval/{name}/bpb"] > 0
    assert len({last[f"eval/{name}/loss"] for name in WORDS}) == 3


def test_the_profile_is_read_by_xprof_and_names_the_train_step(killed):
    from xprof.convert import raw_to_tool_data
    paths = glob.glob(str(killed["workdir"] / "profile" / "plugins" / "profile" / "*" / "*.xplane.pb"))
    assert len(paths) == 1  # steps 2-3 ran in the first attempt only
    assert any(t.startswith("trace_viewer") for t in raw_to_tool_data.xspace_to_tool_names(paths))
    data, _ = raw_to_tool_data.xspace_to_tool_data(paths, "trace_viewer", {})
    names = {e.get("name") for e in json.loads(data)["traceEvents"]}
    assert {"train 2", "train 3"} <= names  # the step annotations, one per profiled step
    assert "train 4" not in names and any("train_step" in str(n) for n in names)  # the jitted step itself


def wandb_records(path):
    """The records of a .wandb file, parsed with the wandb package's own protobuf schema. The file is a LevelDB
    log: a 7-byte header (':W&B', magic, version), then 32 KiB blocks of chunks, each with a 7-byte header
    (CRC, length, type: 1 full, 2 first, 3 middle, 4 last). wandb 0.31 reads these files in wandb-core (Go)
    only, with no Python reader, so the framing is read here and every record by wandb's Record class."""
    from wandb.proto import wandb_internal_pb2
    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    pos, chunks = 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if left < 7 or (length == 0 and kind == 0):  # block trailer / padding
            pos += left
            continue
        chunks += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            chunks = b""
            yield record


def test_wandb_offline_run_is_read_back_and_the_resume_continues_it(killed):
    workdir = killed["workdir"]
    run_id = (workdir / "wandb_run_id").read_text()
    files = sorted(glob.glob(str(workdir / "wandb" / "offline-run-*" / "run-*.wandb")))
    assert [os.path.basename(f) for f in files] == [f"run-{run_id}.wandb"] * 2  # two attempts, one run
    history, configs, summary = [], [], {}
    for attempt, path in enumerate(files):
        for r in wandb_records(path):
            kind = r.WhichOneof("record_type")
            if kind == "summary" and attempt == 1:
                summary.update({u.key or ".".join(u.nested_key): json.loads(u.value_json) for u in r.summary.update})
            elif kind == "run":
                assert r.run.run_id == run_id
                configs.append({u.key: json.loads(u.value_json) for u in r.run.config.update})
            elif kind == "history":
                row = {i.key or ".".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
                history.append((attempt, row))
    # W&B writes its file every 15 s: the killed attempt's may hold any prefix of what it logged, or nothing.
    assert configs[-1]["train"]["wandb_project"] == "t5like-test"
    assert [m["name"] for m in configs[-1]["data"]["mixture"]] == list(WORDS)
    losses = logged(workdir)
    for attempt, row in history:
        if "loss" in row:
            assert row["loss"] == losses[row["_step"]], (attempt, row["_step"])
    resumed = [row["_step"] for attempt, row in history if attempt == 1 and "loss" in row]
    assert resumed == list(range(EVERY + 1, STEPS + 1))  # the second attempt continues from the checkpoint on
    assert any("eval/web/loss" in row for attempt, row in history if attempt == 1)
    expected = json.loads((workdir / "summary.json").read_text())  # summary.json's entries, in the run's summary
    assert summary["final_loss"] == expected["final_loss"] and summary["final_eval/web/loss"] == \
        expected["final_eval/web/loss"] and summary["attempts"] == expected["attempts"] == 2


def test_goodput_accounts_for_the_injected_wait_and_the_steps_redone(killed, capsys):
    summary = json.loads((killed["workdir"] / "summary.json").read_text())
    seconds, waits = summary["time_s"], killed["waits"]
    assert summary["attempts"] == 2
    # Every batch slept SLEEP s. The trainer reads one more per attempt before its loop (start-up); the killed
    # attempt's last read never returned.
    assert len(waits) == (KILL_AT - 1) + (STEPS - EVERY + 1)
    loop = waits[1:KILL_AT - 1] + waits[KILL_AT:]
    # The data phase holds each measured wait, and less than one more: no read outside the loop is counted, and
    # the rest is the trainer's own time around next() (11 ms a batch seen on a loaded 2-core CI machine).
    assert sum(loop) <= seconds["data"] < sum(loop) + SLEEP
    # Steps 5 and 6 ran before the kill, after the checkpoint of step 4: they were run twice.
    assert killed["logged_at_kill"] in (KILL_AT - 3, KILL_AT - 2)  # the killed run logged them (one step late)
    assert summary["lost_steps"] == KILL_AT - 2 - EVERY
    assert 0 < seconds["lost"] < seconds["step"]
    assert seconds["downtime"] >= PAUSE and seconds["restore"] > 0 and seconds["save"] > 0
    assert seconds["compile"] > 0 and seconds["startup"] > 0 and seconds["eval"] > 0
    counted = sum(v for k, v in seconds.items() if k not in ("lost", "total"))
    assert counted == pytest.approx(seconds["total"], rel=1e-6)  # every second is in one category
    assert summary["goodput"] == pytest.approx((seconds["step"] - seconds["lost"]) / seconds["total"])
    rows = [r for r in read_metrics(str(killed["workdir"])) if "goodput" in r]
    assert rows and rows[-1]["time/lost_s"] > 0  # the metrics carry it too
    goodput.main([str(killed["workdir"])])  # python -m t5like.goodput WORKDIR
    out = capsys.readouterr().out
    assert "over 2 attempt(s)" in out and f"({summary['lost_steps']} steps redone)" in out


def test_a_host_reads_only_the_ended_attempts_records(tmp_path):
    """Every host accounts for the job at each eval and at the end, while host 0 may be rewriting the running
    attempt's record (a gs:// write is not atomic on every server). Before: another host parsed that file too,
    found it cut short and failed the run ("Expecting ',' delimiter"), seen on a two-worker local pod."""
    folder = tmp_path / "goodput"
    folder.mkdir()
    ended = {"start": 0.0, "end": 10.0, "start_step": 0, "last_step": 4, "saves": [[4, 6.0]],
             "seconds": {**dict.fromkeys(goodput.CATEGORIES, 0.0), "step": 6.0, "other": 4.0}}
    (folder / "attempt-0000.json").write_text(json.dumps(ended))
    (folder / "attempt-0001.json").write_text(json.dumps(ended)[:40])  # the running attempt's, half written
    plugin = goodput.Goodput(types.SimpleNamespace(workdir=str(tmp_path)))  # it reads only cfg.workdir
    plugin.index = 1  # as check_start found it: one attempt before this one
    acc = plugin.account()
    assert acc["attempts"] == 2 and acc["seconds"]["step"] == 6.0


@pytest.mark.parametrize("steps, message", [
    ((3, 12), "train.profile_steps=3,12 goes beyond train.steps=10"),
    ((5, 2), "must be two steps FIRST,LAST with 1 <= FIRST <= LAST"),
])
def test_bad_profile_steps_are_clear_errors(steps, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(steps=10, profile_steps=steps).validate()
