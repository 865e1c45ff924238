"""mm-train on the multimodal path, end to end on the tiny Qwen2.5-VL of ``python -m mm_train.tiny_vlm``:
the JSON form (--mm-model / --mm-data) on 2 FSDP2 processes (built on the meta device) reproduces one
process (per-token loss, accumulated micro-batches), the YAML form (pretrain_transformers) with Ulysses
CP=2 reproduces CP=1; bf16 trains; a torch_dcp checkpoint resumes the curve on another world size; the
trained model reads the pixels (held-out loss well below the same run on blank images); the saved
Hugging Face directory loads in transformers and gives the run's validation loss; bad data is refused
in one line. (That both forms build the same model: tests/test_vlm_config.py.)"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mm_train.cli import main, parse_args
from mm_train.config import build_config
from mm_train.data.mllm import MllmData
from mm_train.data.mllm.template import IGNORE_INDEX
from mm_train.launch import Launch
from mm_train.tiny_vlm import build
from tests.train_runner import ROOT, losses, rel_close, run_train

YAML = ["examples/finetune_tiny_qwen25vl.yaml"]
# The JSON pair with the YAML's gpt_args, as examples/finetune_tiny_qwen25vl.sh passes them.
JSON = ["--mm-model", "examples/finetune_tiny_qwen25vl_model.json", "--mm-data",
        "examples/finetune_tiny_qwen25vl_data.json", "--use-torch-fsdp2", "--fsdp2-config-path",
        "examples/fsdp2_config_vlm.yaml", "--use-cpu-initialization", "--seq-length", "64", "--micro-batch-size", "8",
        "--global-batch-size", "16", "--lr", "3e-3", "--min-lr", "3e-4", "--lr-decay-style", "cosine",
        "--lr-warmup-fraction", "0.1",
        "--weight-decay", "0", "--clip-grad", "1.0", "--use-fused-rmsnorm", "--use-fused-swiglu", "--seed", "42",
        "--num-workers", "0", "--eval-iters", "4"]
PER_TOKEN = ["--calculate-per-token-loss"]
ITERS, SAVE_AT = 6, 3
SHORT = ["--train-iters", str(ITERS), "--log-interval", "1", "--eval-interval", str(ITERS)]
LAYOUT_RTOL, RESUME_RTOL = 1e-5, 1e-6
VALID = re.compile(r"validation loss at iteration \d+ \| lm loss value: ([0-9.E+\-]+)")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A working directory as a user's: the demo under demo/tiny_qwen25vl and a copy of examples/."""
    work = tmp_path_factory.mktemp("vlm")
    build(work / "demo" / "tiny_qwen25vl")
    shutil.copytree(ROOT / "examples", work / "examples")
    return work


def _train(workdir: Path, args: list[str], nproc: int = 1):
    return run_train(args, nproc=nproc, cwd=workdir, timeout=600)


def _valid_loss(result) -> float:
    losses(result)
    return float(VALID.findall(result.stdout)[-1])


@pytest.fixture(scope="module")
def reference(workdir):
    """The YAML form on one process: the curve every layout must give."""
    return losses(_train(workdir, YAML + SHORT + ["--save", ""]))


@pytest.fixture(scope="module")
def json_fsdp2(workdir):
    """The JSON form on 2 FSDP2 processes with the per-token loss (one micro-batch each), built on the meta
    device, checkpoints at SAVE_AT and ITERS."""
    save = workdir / "ckpt_json"
    result = _train(workdir, JSON + PER_TOKEN + SHORT + ["--init-model-with-meta-device", "--save", str(save),
                                                         "--save-interval", str(SAVE_AT)], nproc=2)
    return losses(result), save


@pytest.mark.slow
@pytest.mark.distributed
def test_json_form_on_two_fsdp2_processes_reproduces_one_process(workdir, json_fsdp2):
    curve = losses(_train(workdir, JSON + PER_TOKEN + SHORT))   # two micro-batches accumulated
    assert len(curve) == ITERS and curve[-1] < curve[0]
    rel_close(json_fsdp2[0], curve, LAYOUT_RTOL)


@pytest.mark.slow
def test_bf16_with_the_per_sample_loss_trains(workdir):
    curve = losses(_train(workdir, YAML + SHORT + ["--save", "", "--bf16", "--calculate-per-sample-loss"]))
    assert len(curve) == ITERS and all(map(math.isfinite, curve)) and curve[-1] < curve[0]


@pytest.mark.slow
@pytest.mark.distributed
def test_ulysses_cp2_reproduces_the_cp1_curve(workdir, reference):
    result = _train(workdir, YAML + SHORT + ["--save", "", "--context-parallel-size", "2"], nproc=2)
    rel_close(losses(result), reference, LAYOUT_RTOL)


@pytest.mark.slow
@pytest.mark.distributed
def test_resume_on_one_process_continues_the_two_process_curve(workdir, json_fsdp2):
    curve, save = json_fsdp2
    resumed = workdir / "ckpt_resumed"
    shutil.copytree(save, resumed)
    (resumed / "latest_checkpointed_iteration.txt").write_text(str(SAVE_AT))
    result = _train(workdir, JSON + PER_TOKEN + SHORT + ["--load", str(resumed), "--no-load-rng"])
    rel_close(losses(result), curve[SAVE_AT:], RESUME_RTOL)
    assert sorted(p.name for p in (save / f"iter_{ITERS:07d}" / "hf").iterdir()) == [
        "config.json", "model.safetensors", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json"]


@pytest.fixture(scope="module")
def trained(workdir):
    """The YAML example as it is (100 iterations), on the shapes and, with the records about blank images,
    on blank ones: the two validation losses and the first run."""
    real = _train(workdir, YAML + ["--save", str(workdir / "ckpt_real")])
    text = (workdir / "examples" / "finetune_tiny_qwen25vl.yaml").read_text()
    text = text.replace("data/train.json", "data/train_blank.json").replace("data/valid.json", "data/valid_blank.json")
    (workdir / "examples" / "blank.yaml").write_text(text)
    blank = _train(workdir, ["examples/blank.yaml", "--save", ""])
    return _valid_loss(real), _valid_loss(blank), real


@pytest.mark.slow
def test_the_trained_model_reads_the_pixels(trained):
    real, blank, _ = trained
    assert real < 0.6 * blank, f"held-out loss {real:.4f} with the images, {blank:.4f} with blank ones"


@pytest.mark.slow
def test_the_saved_hf_directory_loads_and_gives_the_runs_validation_loss(workdir, trained, monkeypatch):
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

    valid_loss = trained[0]
    directory = workdir / "ckpt_real" / "iter_0000100" / "hf"
    model = AutoModelForImageTextToText.from_pretrained(directory).eval()
    tokenizer, processor = AutoTokenizer.from_pretrained(directory), AutoImageProcessor.from_pretrained(directory)
    monkeypatch.chdir(workdir)
    config = build_config(parse_args(YAML), Launch(0, 1, 0, "cpu"))
    data = MllmData(config.multimodal.data, tokenizer, processor, config.model.seq_length, config.training.seed)
    _, valid = data.iterators(config.data, 0, 0, 1)
    means = []
    with torch.no_grad():
        for _ in range(config.training.eval_iters * config.training.micro_batches):
            batch = next(valid)
            ids = batch["input_ids"]
            logits = model(input_ids=ids, attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"],
                           image_grid_thw=batch["image_grid_thw"],
                           mm_token_type_ids=(ids == model.config.image_token_id).int()).logits
            labels = batch["labels"]
            means.append(F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX).item())
    assert sum(means) / len(means) == pytest.approx(valid_loss, rel=1e-4)


@pytest.mark.parametrize("case, message", [
    ("missing", r"record 1 of .*train.json: image .*images/00001.png does not exist"),
    ("count", r"record 0 of .*train.json: 2 <image> placeholder\(s\) but 1 image\(s\)"),
], ids=["missing-image", "placeholder-count"])
def test_bad_data_is_refused_in_one_line(workdir, tmp_path, monkeypatch, capsys, case, message):
    data = tmp_path / "data"
    shutil.copytree(workdir / "demo" / "tiny_qwen25vl" / "data", data)
    records = json.loads((data / "train.json").read_text())
    if case == "missing":
        (data / records[1]["images"][0]).unlink()
    else:
        records[0]["messages"][0]["content"] = "<image><image>What?"
        (data / "train.json").write_text(json.dumps(records))
    config = json.loads((workdir / "examples" / "finetune_tiny_qwen25vl_data.json").read_text())
    config["dataset_param"]["basic_parameters"].update(dataset_dir=str(data), dataset=str(data / "train.json"),
                                                       val_dataset=str(data / "valid.json"))
    (tmp_path / "data.json").write_text(json.dumps(config))
    monkeypatch.chdir(workdir)
    assert main([*JSON, "--mm-data", str(tmp_path / "data.json"), "--train-iters", "1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("mm-train: error: ") and err.count("\n") == 1 and re.search(message, err)
