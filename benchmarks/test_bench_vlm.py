"""mm-bench vlm as a smoke test: mm-train's multimodal engine and a plain transformers loop train the same
tiny Qwen2.5-VL on the same batches to the same loss, the table and JSON come out, bad arguments exit
with an error."""

import json

import pytest

from mm_kernels.bench import cli


def test_both_paths_train_alike_and_report(tmp_path, capsys):
    out = tmp_path / "vlm.json"
    assert cli.main(["vlm", "--size", "tiny", "--steps", "2", "--warmup", "1", "--batch", "2", "--threads", "1",
                     "--json", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    ours, plain = results["mm-train"], results["transformers"]
    assert ours["loss"] == pytest.approx(plain["loss"], rel=1e-4)
    assert all(r["ms_per_step"] > 0 and r["tokens_per_s"] > 0 for r in (ours, plain))
    assert capsys.readouterr().out.splitlines()[-1].split()[0] == "mm-train/transformers"


@pytest.mark.parametrize("argv, message", [
    (["--size", "huge"], "invalid choice"),
    (["--steps", "0"], "argument --steps: must be >= 1, got 0"),
])
def test_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["vlm", *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
