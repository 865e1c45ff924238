"""mm-bench train as a smoke test: every variant of a tiny model trains in its own process, the same model
(one loss), the table and JSON come out; bad arguments exit with one line."""

import json

import pytest

from mm_kernels.bench import cli
from mm_kernels.bench.train import FEATURES, variants


def test_rows_switch_the_features_on_one_after_another():
    rows = variants()
    assert [name for name, _ in rows] == ["baseline", *(f"+ {feature}" for feature, _, _ in FEATURES)]
    assert rows[0][1] == ["--no-malloc-tuning", "--attention-softmax-in-fp32"]
    assert rows[-1][1] == ["--use-flash-attn", "--use-fused-rmsnorm", "--use-fused-swiglu"]


def test_cli_writes_table_and_json(tmp_path, capsys):
    out = tmp_path / "train.json"
    assert cli.main(["train", "--quick", "--dtype", "fp32", "--rounds", "1", "--steps", "1", "--warmup", "0",
                     "--threads", "1", "--json", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert [r["variant"] for r in results] == [name for name, _ in variants()]
    first = results[0]["loss"]
    assert all(r["loss"] == pytest.approx(first, rel=1e-5) for r in results)  # one model, one first step
    assert all(r["ms_per_step"] > 0 and r["tokens_per_s"] > 0 and r["faults_per_step"] >= 0 for r in results)
    table = capsys.readouterr().out
    assert "minor faults/step" in table and "+ flash attention" in table


@pytest.mark.parametrize("argv, message", [
    (["--rounds", "0"], "argument --rounds: must be >= 1, got 0"),
    (["--quick", "--", "--normalization", "LayerNorm"],
     "mm-bench train: error: --use-fused-rmsnorm needs --normalization RMSNorm"),
])
def test_bad_arguments(argv, message, capsys):
    try:
        code = cli.main(["train", *argv])
    except SystemExit as exc:
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
