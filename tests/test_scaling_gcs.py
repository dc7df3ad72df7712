"""The scaling harness and `t5like.data train-tokenizer` on gs:// paths, against the real Cloud Storage API
server of tests/gcs.py (fake-gcs-server). Inputs are uploaded, and outputs checked, through the server's
own JSON API, not through the code under test.
"""
import csv
import io
import json
import os
import subprocess
import sys
import urllib.parse
import urllib.request

import numpy as np
import pytest

from t5like.scaling import ChinchillaLaw, load_csv, load_fits, synthetic_isoflop
from t5like.scaling.__main__ import main as scaling_main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAW = ChinchillaLaw()
PLOTS = {f"{n}.{e}" for n in ("loss_vs_compute", "isoflop", "optimal_allocation") for e in ("png", "pdf")}


def upload(server, name: str, data: bytes) -> None:
    url = (f"{server.url}/upload/storage/v1/b/{server.bucket}/o?uploadType=media"
           f"&name={urllib.parse.quote(name, safe='')}")
    req = urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": "application/octet-stream"})
    urllib.request.urlopen(req, timeout=10).read()


def download(server, name: str) -> bytes:
    url = f"{server.url}/storage/v1/b/{server.bucket}/o/{urllib.parse.quote(name, safe='')}?alt=media"
    return urllib.request.urlopen(url, timeout=10).read()


def table_bytes(header, rows) -> bytes:
    """A CSV as a spreadsheet exports it: UTF-8 with a BOM and CRLF line ends."""
    lines = [",".join(header)] + [",".join(map(str, r)) for r in rows]
    return ("\ufeff" + "\r\n".join(lines) + "\r\n").encode("utf-8")


def run_cli(server, cwd, *args):
    env = {**os.environ, **server.env, "PYTHONPATH": REPO}
    proc = subprocess.run([sys.executable, "-m", "t5like.scaling", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture(scope="module")
def results():
    """7 budgets × 7 sizes and one failed run: the table of test_scaling_fit's CLI test."""
    data = synthetic_isoflop(LAW, budgets=np.logspace(18, 21, 7), sizes_per_budget=7, seed=5)
    rows = [[int(n), int(d), c, l, "ok"] for n, d, c, l in zip(data.params, data.tokens, data.flops, data.loss)]
    rows.append([100000000, 1000000000, 6e17, "nan", "failed"])
    return table_bytes(["params", "tokens", "flops", "final_eval_loss", "status"], rows)


def test_fit_predict_plot_on_gcs(gcs_server, results, tmp_path, capsys):
    bucket = f"gs://{gcs_server.bucket}"
    upload(gcs_server, "scaling/results.csv", results)
    cwd = tmp_path / "cwd"  # the CLI runs here: nothing may land in it
    cwd.mkdir()

    run_cli(gcs_server, cwd, "fit", f"{bucket}/scaling/results.csv", "--grid", "coarse",
            "--out", f"{bucket}/scaling/fit.json")
    assert "scaling/fit.json" in gcs_server.list_objects("scaling/")
    d = json.loads(download(gcs_server, "scaling/fit.json"))
    assert d["approach"] == "all" and d["meta"]["source"] == f"{bucket}/scaling/results.csv"
    assert d["meta"]["n_points"] == 49 and d["meta"]["n_skipped_status"] == 1  # BOM'd header read right
    assert d["meta"]["loss_column"] == "final_eval_loss" and abs(d["isoflop"]["a"] - LAW.a) < 0.1

    # The table reads the same from the bucket as from a local file.
    (tmp_path / "results.csv").write_bytes(results)
    remote, local = load_csv(f"{bucket}/scaling/results.csv"), load_csv(str(tmp_path / "results.csv"))
    for col in ("params", "tokens", "flops", "loss", "rows"):
        np.testing.assert_array_equal(getattr(remote, col), getattr(local, col))

    # predict reads fit.json from the bucket: the isoflop law's N_opt = N_coef·C^a at C = 1e21.
    capsys.readouterr()
    assert scaling_main(["predict", f"{bucket}/scaling/fit.json", "--flops", "1e21", "--json"]) == 0
    by = {r["approach"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(by) == {"powerlaw", "envelope", "isoflop", "parametric"}
    assert np.isclose(by["isoflop"]["N_opt"], d["isoflop"]["N_coef"] * 1e21 ** d["isoflop"]["a"])
    fits, meta = load_fits(f"{bucket}/scaling/fit.json")
    assert set(fits) == {"powerlaw", "envelope", "isoflop", "parametric"} and meta["n_points"] == 49

    printed = run_cli(gcs_server, cwd, "plot", f"{bucket}/scaling/results.csv", "--fit", f"{bucket}/scaling/fit.json",
                      "--out", f"{bucket}/scaling/plots").stdout.split()
    assert sorted(printed) == sorted(f"{bucket}/scaling/plots/{n}" for n in PLOTS)
    assert set(gcs_server.list_objects("scaling/plots/")) == {f"scaling/plots/{n}" for n in PLOTS}
    for n in PLOTS:
        blob = download(gcs_server, f"scaling/plots/{n}")
        assert len(blob) > 5000 and blob[:4] in (b"\x89PNG", b"%PDF"), n
    assert os.listdir(cwd) == []


def test_gcs_bad_paths_are_clear_errors(gcs_server, capsys):
    bucket = f"gs://{gcs_server.bucket}"
    upload(gcs_server, "bad/r.csv", table_bytes(["params", "tokens", "loss"], [[100000000, 1000000000, 3.0]]))
    upload(gcs_server, "bad/latin1.csv", "params,tokens,loss,note\n1e8,1e9,3.0,caf\xe9\n".encode("latin-1"))
    cases = [(["fit", f"{bucket}/bad/missing.csv"], f"{bucket}/bad/missing.csv: no such file"),
             (["fit", "gs://t5like-no-such-bucket/r.csv"], "bucket gs://t5like-no-such-bucket does not exist"),
             (["fit", f"{bucket}/bad"], f"{bucket}/bad is a directory"),
             (["fit", f"{bucket}/bad/latin1.csv"], f"{bucket}/bad/latin1.csv: not UTF-8 text (byte 39)"),
             (["predict", f"{bucket}/bad/r.csv", "--flops", "1e20"], f"{bucket}/bad/r.csv: not JSON"),
             (["fit", f"{bucket}/bad/r.csv", "--out", "gs://t5like-no-such-bucket/fit.json"],
              "bucket gs://t5like-no-such-bucket does not exist"),
             (["plot", f"{bucket}/bad/r.csv", "--out", "gs://t5like-no-such-bucket/plots"],
              "bucket gs://t5like-no-such-bucket does not exist")]
    for argv, message in cases:
        capsys.readouterr()
        assert scaling_main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err, (argv, err)
    assert sorted(gcs_server.list_objects("bad/")) == ["bad/latin1.csv", "bad/r.csv"]  # the refused wrote nothing


def test_gcs_table_messages_name_lines(gcs_server):
    # A duplicated run is reported by its line in the file, on gs:// as locally.
    data = synthetic_isoflop(LAW, budgets=[1e18, 1e19, 1e20], sizes_per_budget=5, seed=2)
    rows = [[int(n), int(d), c, l] for n, d, c, l in zip(data.params, data.tokens, data.flops, data.loss)]
    rows.append(rows[6])
    upload(gcs_server, "dup/r.csv", table_bytes(["params", "tokens", "flops", "loss"], rows))
    warnings = load_csv(f"gs://{gcs_server.bucket}/dup/r.csv").meta()["warnings"]
    assert any("1 exactly duplicated row(s) (lines 8, 17)" in w for w in warnings), warnings


def test_design_plan_on_gcs(gcs_server):
    from t5like.scaling.design import main as design_main
    out = f"gs://{gcs_server.bucket}/design/plan.csv"
    assert design_main(["--experiment", "experiments.scaling_tiny", "--budgets", "1e12", "--out", out]) == 0
    rows = list(csv.DictReader(io.StringIO(download(gcs_server, "design/plan.csv").decode())))
    assert rows and {float(r["budget"]) for r in rows} == {1e12} and all(json.loads(r["overrides"]) for r in rows)


def test_train_tokenizer_on_gcs(gcs_server, capsys):
    from t5like.data.__main__ import main as data_main
    from t5like.data.tokenizer import Tokenizer
    out = f"gs://{gcs_server.bucket}/tok"
    assert data_main(["train-tokenizer", "--out", out, "--vocab-size", "600", "--max-files", "8"]) == 0
    assert set(gcs_server.list_objects("tok/")) == {"tok/spm.model", "tok/spm.vocab", "tok/meta.json"}
    assert json.loads(download(gcs_server, "tok/meta.json"))["vocab_size"] == 600
    tok = Tokenizer.from_file(f"{out}/spm.model", 600, 100)
    text = "def f(x):\n    return x + 1\n"
    assert tok.piece_size == 500 and tok.decode(tok.encode(text)) == text
    assert download(gcs_server, "tok/spm.vocab").decode().startswith("<pad>\t0.0\n</s>\t0.0\n<unk>\t0.0\n")
    capsys.readouterr()
    assert data_main(["train-tokenizer", "--out", "gs://t5like-no-such-bucket/tok", "--vocab-size", "600"]) == 2
    assert "bucket gs://t5like-no-such-bucket does not exist" in capsys.readouterr().err
