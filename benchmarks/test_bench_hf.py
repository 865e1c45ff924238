"""mm-bench hf as a smoke test: both variants of a tiny model train with the same losses, the table and
JSON come out, and bad arguments exit with an error."""

import json

import pytest
import torch

from mm_kernels.bench import cli
from mm_kernels.bench.hf import format_rows, peak_step_memory, time_variants


@pytest.mark.parametrize("model_type", ["qwen3_moe", "qwen2_5_vl"])
def test_variants_agree(model_type):
    timed = time_variants(model_type, "tiny", "fp32", "cpu", batch=2, seq=24, steps=2, warmup=1,
                          threads=torch.get_num_threads())
    original, fused = timed["original"], timed["fused"]
    assert original["fused"] == {} and sum(fused["fused"].values()) > 0
    assert fused["loss"] == pytest.approx(original["loss"], rel=1e-5)
    assert all(r["ms_per_step"] > 0 and r["tokens_per_s"] > 0 for r in timed.values())
    peak = peak_step_memory(model_type, "fused", "tiny", "fp32", "cpu", batch=2, seq=24, threads=1)
    rows = [{"model": model_type, "variant": variant, **timed[variant], "peak_mb": peak} for variant in timed]
    assert "fused/original" in format_rows(rows).splitlines()[-1]


def test_cli_writes_table_and_json(tmp_path, capsys):
    out = tmp_path / "hf.json"
    assert cli.main(["hf", "--model", "llama", "--size", "tiny", "--dtype", "fp32", "--steps", "1", "--warmup", "0",
                     "--seq", "16", "--batch", "1", "--json", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert [r["variant"] for r in results] == ["original", "fused"]
    assert results[1]["fused"] == {"rms_norm": 5, "swiglu_mlp": 2}
    assert "llama  fused/original" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--model", "gpt2"], "invalid choice"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--model", "qwen2_5_vl", "--seq", "8"], "too short"),
])
def test_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["hf", *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
