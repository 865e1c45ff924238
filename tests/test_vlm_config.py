"""The multimodal path's configuration: a pretrain_transformers YAML expanded into flags, MindSpeed-MM's
model JSON mapped onto transformers configurations, the flags it fills, implies and refuses, and the
FSDP2 YAML keys of MindSpeed-MM's Hugging Face models."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from mm_train.cli import main, parse_args
from mm_train.config import build_config
from mm_train.errors import ConfigError
from mm_train.features.fsdp2 import FSDP2ConfigError, parse_fsdp2_config
from mm_train.features.multimodal import expand_config_file
from mm_train.launch import Launch
from mm_train.model.hf.spec import read_model_section
from mm_train.tiny_vlm import build
from tests.train_runner import ROOT


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A directory holding the demo (demo/tiny_qwen25vl) and copies of the examples, as a user's would."""
    work = tmp_path_factory.mktemp("work")
    build(work / "demo" / "tiny_qwen25vl", train=8, valid=4)
    shutil.copytree(ROOT / "examples", work / "examples")
    return work


def test_yaml_becomes_flags_as_mindspeed_mm_reads_it(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({
        "MM_TOOL_PATH": "tools.json",
        "gpt_args": {"use_torch_fsdp2": True, "no_load_optim": False, "load": None, "lr": "1e-5",
                     "nested": {"seq_length": 8}, "lr_scale_modules": ["visual", "merger"]}}, sort_keys=False))
    flags = expand_config_file([str(path), "--lr", "2e-5"])
    assert flags == ["--use-torch-fsdp2", "--lr", "1e-5", "--seq-length", "8", "--lr-scale-modules", "visual",
                     "merger", "--mm-model", str(path), "--mm-data", str(path), "--mm-tool", "tools.json", "--lr",
                     "2e-5"]
    assert expand_config_file(["--lr", "1"]) == ["--lr", "1"]


@pytest.mark.parametrize("content, message", [
    ("lr: 1\n", "a training configuration needs a 'gpt_args' mapping"),
    ("gpt_args: {lr: 1}\nlora_args: {lora_r: 8}\n", "LoRA is not supported"),
    ("gpt_args: [\n", "not valid YAML"),
], ids=["no-gpt-args", "lora", "bad-yaml"])
def test_bad_yaml_is_one_line(tmp_path, capsys, content, message):
    path = tmp_path / "run.yaml"
    path.write_text(content)
    assert main([str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mm-train: error: {path}: ") and err.count("\n") == 1 and message in err


def _sizes(model_id: str, **extra) -> dict:
    return {"model_id": model_id, "img_context_token_id": 7, "vision_start_token_id": 5,
            "image_encoder": {"vision_encoder": {"num_layers": 3, "hidden_size": 48, "ffn_hidden_size": 96,
                                                 "num_attention_heads": 4, "patch_size": 14, "llm_hidden_size": 64,
                                                 "activation_func": "silu", **extra},
                              "vision_projector": {"hidden_size": 64, "freeze": True}},
            "text_decoder": {"num_layers": 2, "hidden_size": 64, "ffn_hidden_size": 160, "num_attention_heads": 4,
                             "num_query_groups": 2, "vocab_size": 300, "rope_theta": 5000.0,
                             "mrope_section": [2, 3, 3], "untie_embeddings_and_output_weights": True}}


@pytest.mark.parametrize("model_id, vision", [
    ("qwen2vl", {"depth": 3, "embed_dim": 48, "mlp_ratio": 2, "num_heads": 4, "hidden_size": 64}),
    ("qwen2_5vl", {"depth": 3, "hidden_size": 48, "intermediate_size": 96, "out_hidden_size": 64, "window_size": 56,
                   "hidden_act": "silu"}),
    ("qwen3vl", {"depth": 3, "hidden_size": 48, "intermediate_size": 96, "out_hidden_size": 64, "patch_size": 14}),
])
def test_model_json_sizes_map_onto_the_transformers_config(model_id, vision):
    spec = read_model_section(_sizes(model_id, window_attn_size=56), "model.json", None)
    config = spec.hf_config
    assert config["image_token_id"] == 7 and config["vision_start_token_id"] == 5
    assert config["tie_word_embeddings"] is False
    text = config["text_config"]
    assert (text["num_hidden_layers"], text["hidden_size"], text["intermediate_size"], text["num_attention_heads"],
            text["num_key_value_heads"], text["vocab_size"]) == (2, 64, 160, 4, 2, 300)
    assert text["rope_parameters"]["rope_theta"] == 5000.0 and text["rope_parameters"]["mrope_section"] == [2, 3, 3]
    assert {key: config["vision_config"][key] for key in vision} == vision
    assert (spec.freeze_vision_encoder, spec.freeze_vision_projector, spec.freeze_text_decoder) == (True, True, False)
    spec.transformers_config()   # the dict builds the configuration again


@pytest.mark.parametrize("model, message", [
    ({"model_id": "llava"}, "model.model_id 'llava' is not supported"),
    ({"model_id": "qwen2vl", "video_encoder": {"num_layers": 1}}, "model.video_encoder is not supported"),
    ({"model_id": "qwen2vl", "text_decoder": {"num_layers": "two"}}, "text_decoder.num_layers must be a number"),
    ({"model_id": "qwen2vl", "image_encoder": {"vision_encoder": {"activation_func": "relu6"}}},
     "activation_func 'relu6' is not supported"),
    ({"model_id": "qwen2vl", "loss_cfg": {"loss_type": "square_loss"}}, "loss_type 'square_loss' is not supported"),
], ids=["model-id", "video", "size", "activation", "loss"])
def test_bad_model_section_is_one_line(model, message):
    with pytest.raises(ConfigError, match=message):
        read_model_section(model, "model.json", None)


def test_init_from_hf_path_gives_the_config_and_must_match_the_model_id(workdir):
    hf = str(workdir / "demo" / "tiny_qwen25vl" / "model")
    spec = read_model_section({"model_id": "qwen2_5_vl", "init_from_hf_path": hf,
                               "text_decoder": {"num_layers": 40}}, "run.yaml", None)
    assert spec.weights_path == hf and spec.text_config["num_hidden_layers"] == 2   # sizes there only validate
    with pytest.raises(ConfigError, match="model_id qwen3vl is qwen3_vl, but .*config.json holds a qwen2_5_vl model"):
        read_model_section({"model_id": "qwen3vl", "init_from_hf_path": hf}, "run.yaml", None)


def _config(workdir: Path, monkeypatch, *flags: str):
    monkeypatch.chdir(workdir)
    return build_config(parse_args(["examples/finetune_tiny_qwen25vl.yaml", *flags]), Launch(0, 2, 0, "cpu"))


def test_the_model_fills_the_size_flags_and_fsdp2_is_implied(workdir, monkeypatch):
    config = _config(workdir, monkeypatch, "--hidden-size", "4096", "--use-distributed-optimizer", "--bf16")
    model = config.model
    assert (model.num_layers, model.hidden_size, model.num_attention_heads, model.num_query_groups,
            model.ffn_hidden_size) == (2, 64, 4, 2, 128)
    assert config.notices == ("no effect with --mm-model (the model configuration decides): --hidden-size 4096 "
                              "--use-distributed-optimizer",)
    assert config.checkpoint.ckpt_format == "torch_dcp"
    assert config.fsdp2.sharding.param_dtype == torch.bfloat16
    assert config.multimodal.fused == {"rms_norm": True, "swiglu": True, "moe_permute": False}
    assert config.multimodal.data.template == "qwen2vl" and config.multimodal.model.weights_path is not None
    json.dumps(config.record())   # plain values for checkpoints


def test_json_form_maps_onto_the_same_model_as_the_hf_directory(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    args = parse_args(["--mm-model", "examples/finetune_tiny_qwen25vl_model.json", "--mm-data",
                       "examples/finetune_tiny_qwen25vl_data.json", "--seq-length", "64"])
    from_json = build_config(args, Launch(0, 1, 0, "cpu")).multimodal.model
    from_yaml = _config(workdir, monkeypatch).multimodal.model
    assert from_json.transformers_config().to_dict() == from_yaml.transformers_config().to_dict()
    assert from_json.weights_path == from_yaml.weights_path


@pytest.mark.parametrize("flags, message", [
    (["--tensor-model-parallel-size", "2"], "--tensor-model-parallel-size with --mm-model: tensor parallelism"),
    (["--context-parallel-size", "2", "--context-parallel-algo", "megatron_cp_algo"],
     "only ulysses_cp_algo splits the text decoder"),
    (["--fp16"], "--fp16 with --mm-model"),
    (["--moe-permute-fusion"], "--moe-permute-fusion: the qwen2_5_vl model has no experts"),
    (["--recompute-granularity", "full"], "Megatron recompute"),
], ids=["tp", "ring", "fp16", "moe", "recompute"])
def test_refused_in_one_line(workdir, monkeypatch, capsys, flags, message):
    monkeypatch.chdir(workdir)
    assert main(["examples/finetune_tiny_qwen25vl.yaml", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mm-train: error: ") and err.count("\n") == 1 and message in err


def test_ulysses_needs_the_text_decoders_heads_to_divide(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    args = parse_args(["examples/finetune_tiny_qwen25vl.yaml", "--context-parallel-size", "3"])
    with pytest.raises(ConfigError, match="--num-attention-heads 4 must be divisible by Ulysses degree x TP = 3 x 1"):
        build_config(args, Launch(0, 3, 0, "cpu"))


def test_json_model_without_data_and_sizes_without_model(workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    assert main(["--mm-model", "examples/finetune_tiny_qwen25vl_model.json", "--seq-length", "8"]) == 2
    assert "--mm-model needs --mm-data" in capsys.readouterr().err
    assert main(["--seq-length", "8", "--hidden-size", "8"]) == 2
    assert "the following arguments are required: --num-layers, --num-attention-heads" in capsys.readouterr().err


def test_mindspeed_mm_fsdp2_keys_of_hf_models_are_accepted():
    config = parse_fsdp2_config({"sharding_size": "auto", "param_dtype": "bf16", "output_dtype": "fp32",
                                 "ignored_modules": ["model.visual"], "align_fsdp_param_groups": True,
                                 "expert_parallel_size": 1, "reshard_local_experts": True, "use_reentrant": True,
                                 "moe_modules": ["model.language_model.layers.{*}.mlp.experts"]})
    assert config.output_dtype == torch.float32 and config.ignored_modules == ("model.visual",)
    with pytest.raises(FSDP2ConfigError, match="expert parallelism under FSDP2 is not supported"):
        parse_fsdp2_config({"expert_parallel_size": 2})
