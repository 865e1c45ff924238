"""FSDP2: YAML config parsing and errors, module patterns, flag checks, 2-rank gloo training that
reproduces the single-process loss curve, and meta-device init equal to eager init."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.distributed.tensor import DTensor

from mm_train.cli import parse_args
from mm_train.features.fsdp2 import (
    FSDP2Config,
    FSDP2ConfigError,
    apply_fsdp2,
    build_fsdp2_model_on_meta,
    load_fsdp2_config,
    select_modules,
)
from mm_train.features.fsdp2 import check as check_fsdp2_flags
from mm_train.model.init import init_parameters_, materialize_meta_model
from tests.distributed import run_ranks
from tests.toy_transformer import ToyTransformer, keyed_batch, keyed_full_value, lm_loss, train
from tests.train_runner import TINY

INIT = keyed_full_value(seed=1234)
STEPS = range(4)
EXAMPLE_CONFIG = str(Path(__file__).parents[1] / "examples" / "fsdp2_config.yaml")

FULL_YAML = """
sharding_size: 2
sub_modules_to_wrap:
  - layers.{*}
reshard_after_forward: false
param_dtype: bf16
reduce_dtype: fp32
cast_forward_inputs: true
offload_to_cpu: true
pin_memory: false
num_to_forward_prefetch: 1
num_to_backward_prefetch: 2
recompute_modules: [ToyBlock]
"""


def write(tmp_path, text: str):
    path = tmp_path / "fsdp2.yaml"
    path.write_text(text)
    return path


def test_load_config_reads_every_key(tmp_path):
    config = load_fsdp2_config(write(tmp_path, FULL_YAML))
    assert config == FSDP2Config(
        sharding_size=2, sub_modules_to_wrap=("layers.{*}",), reshard_after_forward=False,
        param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=True,
        offload_to_cpu=True, pin_memory=False, num_to_forward_prefetch=1, num_to_backward_prefetch=2,
        recompute_modules=("ToyBlock",))


def test_example_config_loads():
    config = load_fsdp2_config(EXAMPLE_CONFIG)
    assert config.sub_modules_to_wrap == ("decoder.layers.{*}",) and config.num_to_forward_prefetch == 1


def test_empty_config_gives_defaults(tmp_path):
    assert load_fsdp2_config(write(tmp_path, "")) == FSDP2Config()
    assert FSDP2Config().sharding_size == "auto"


@pytest.mark.parametrize("text, key", [
    ("shard_size: 2", "shard_size"),
    ("sharding_size: 0", "sharding_size"),
    ("sharding_size: half", "sharding_size"),
    ("sharding_size: true", "sharding_size"),
    ("sub_modules_to_wrap: layers.*", "sub_modules_to_wrap"),
    ("recompute_modules: [1]", "recompute_modules"),
    ("reshard_after_forward: 'yes'", "reshard_after_forward"),
    ("param_dtype: bf8", "param_dtype"),
    ("reduce_dtype: 16", "reduce_dtype"),
    ("cast_forward_inputs: 1", "cast_forward_inputs"),
    ("offload_to_cpu: null", "offload_to_cpu"),
    ("num_to_forward_prefetch: -1", "num_to_forward_prefetch"),
    ("num_to_backward_prefetch: 1.5", "num_to_backward_prefetch"),
])
def test_bad_config_names_the_key(tmp_path, text, key):
    path = write(tmp_path, text)
    with pytest.raises(FSDP2ConfigError, match=key) as error:
        load_fsdp2_config(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("text, match", [("- a\n- b", "mapping"), ("a: [", "YAML")])
def test_malformed_config_file(tmp_path, text, match):
    with pytest.raises(FSDP2ConfigError, match=match) as error:
        load_fsdp2_config(write(tmp_path, text))
    assert "\n" not in str(error.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="fsdp2-config-path"):
        load_fsdp2_config(tmp_path / "absent.yaml")


@pytest.mark.parametrize("pattern", ["layers.*", "layers.{*}", "ToyBlock", "Toy*", "tests.toy_transformer.ToyBlock"])
def test_patterns_select_by_name_class_or_class_path(pattern):
    model = ToyTransformer()
    assert select_modules(model, [pattern], "sub_modules_to_wrap") == list(model.layers)


def test_name_pattern_matches_whole_parts_only():
    model = ToyTransformer()
    assert select_modules(model, ["layers.*.qkv"], "k") == [layer.qkv for layer in model.layers]
    with pytest.raises(FSDP2ConfigError, match="recompute_modules.*'layer.*'"):
        select_modules(model, ["layers.*", "layer.*"], "recompute_modules")


def assert_same_parameters(actual: nn.Module, expected: nn.Module) -> None:
    """Same names, bitwise-equal values (sharded parameters compared as full tensors)."""
    expected_params = dict(expected.named_parameters())
    assert [name for name, _ in actual.named_parameters()] == list(expected_params)
    for name, param in actual.named_parameters():
        value = param.full_tensor() if isinstance(param, DTensor) else param
        assert torch.equal(value, expected_params[name]), name


def megatron_args(**overrides) -> argparse.Namespace:
    """The parsed flags of a tiny FSDP2 run, with ``overrides`` set by attribute name."""
    args = parse_args(TINY + ["--use-torch-fsdp2", "--fsdp2-config-path", EXAMPLE_CONFIG, "--use-cpu-initialization"])
    vars(args).update(overrides)
    return args


def test_valid_fsdp2_args_pass():
    check_fsdp2_flags(megatron_args(), world_size=2)
    check_fsdp2_flags(megatron_args(save="ckpt", ckpt_format="torch_dcp", init_model_with_meta_device=True), 2)
    check_fsdp2_flags(megatron_args(use_torch_fsdp2=False, fsdp2_config_path=None, tensor_model_parallel_size=2), 2)


@pytest.mark.parametrize("overrides, flag", [
    (dict(fsdp2_config_path=None), "--fsdp2-config-path"),
    (dict(use_cpu_initialization=False), "--use-cpu-initialization"),
    (dict(tensor_model_parallel_size=2), "--tensor-model-parallel-size"),
    (dict(pipeline_model_parallel_size=2), "--pipeline-model-parallel-size"),
    (dict(context_parallel_size=2), "--context-parallel-size"),
    (dict(expert_model_parallel_size=2), "--expert-model-parallel-size"),
    (dict(use_distributed_optimizer=True), "--use-distributed-optimizer"),
    (dict(sequence_parallel=True), "--sequence-parallel"),
    (dict(overlap_grad_reduce=True), "--overlap-grad-reduce"),
    (dict(recompute_granularity="full"), "--recompute-granularity"),
    (dict(recompute_method="uniform"), "--recompute-method"),
    (dict(recompute_num_layers=1), "--recompute-num-layers"),
    (dict(save="ckpt"), "--ckpt-format torch_dcp"),
    (dict(use_torch_fsdp2=False), "--fsdp2-config-path requires --use-torch-fsdp2"),
    (dict(use_torch_fsdp2=False, fsdp2_config_path=None, init_model_with_meta_device=True),
     "--init-model-with-meta-device requires --use-torch-fsdp2"),
])
def test_incompatible_flags_refused(overrides, flag):
    with pytest.raises(ValueError, match=flag) as error:
        check_fsdp2_flags(megatron_args(**overrides), world_size=2)
    assert "\n" not in str(error.value)


def test_init_parameters_sets_each_full_value_by_name():
    model = init_parameters_(ToyTransformer(), INIT)
    for name, param in model.named_parameters():
        assert torch.equal(param, INIT(name, param.shape)), name
    assert_same_parameters(model, init_parameters_(ToyTransformer(), INIT))
    other_seed = init_parameters_(ToyTransformer(), keyed_full_value(seed=5))
    assert not torch.equal(other_seed.layers[1].qkv.weight, model.layers[1].qkv.weight)


class WithBuffer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.register_buffer("scale", torch.full((4,), 2.0))


class WithMetaAttribute(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.inv_freq = torch.ones(2)


def test_materialize_plain_meta_model_equals_eager_init():
    with torch.device("meta"):
        model = ToyTransformer()
    materialize_meta_model(model, "cpu", INIT)
    eager = init_parameters_(ToyTransformer(), INIT)
    assert_same_parameters(model, eager)


def test_materialize_requires_buffer_init():
    with torch.device("meta"):
        model = WithBuffer()
    with pytest.raises(ValueError, match=r"init_buffers.*\['scale'\]"):
        materialize_meta_model(model, "cpu", INIT)
    materialize_meta_model(model, "cpu", INIT, init_buffers=lambda m: m.scale.fill_(2.0))
    assert torch.equal(model.scale, torch.full((4,), 2.0))


def test_materialize_reports_tensors_left_on_meta():
    with torch.device("meta"):
        model = WithMetaAttribute()
    with pytest.raises(ValueError, match="inv_freq"):
        materialize_meta_model(model, "cpu", INIT)


CONFIGS = {
    "wrap layers, prefetch, sgd": (FSDP2Config(sub_modules_to_wrap=("layers.*",), num_to_forward_prefetch=1,
                                              num_to_backward_prefetch=1), "sgd"),
    "wrap class, recompute, keep unsharded, adamw": (
        FSDP2Config(sub_modules_to_wrap=("ToyBlock",), recompute_modules=("layers.*",),
                    reshard_after_forward=False), "adamw"),
    "hsdp, cpu offload, adamw": (FSDP2Config(sharding_size=1, offload_to_cpu=True), "adamw"),
}


def make_optimizer(kind: str, model: nn.Module) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)


def single_process_curve(kind: str) -> list[float]:
    model = init_parameters_(ToyTransformer(), INIT)
    return train(model, make_optimizer(kind, model), STEPS, keyed_batch)


def check_fsdp2_on_two_ranks(rank: int, world_size: int) -> None:
    references = {kind: single_process_curve(kind) for kind in ("sgd", "adamw")}
    assert references["sgd"][-1] < references["sgd"][0]
    for name, (config, kind) in CONFIGS.items():
        model = apply_fsdp2(init_parameters_(ToyTransformer(), INIT), config)
        local, full = model.layers[0].linear_fc1.weight.to_local(), model.layers[0].linear_fc1.weight
        expected_rows = full.shape[0] // 2 if config.sharding_size == "auto" else full.shape[0]
        assert local.shape[0] == expected_rows, name
        losses = train(model, make_optimizer(kind, model), STEPS, keyed_batch, rank=rank, world_size=world_size)
        torch.testing.assert_close(losses, references[kind], rtol=2e-3, atol=0, msg=name)

    # Meta-device build: each rank allocates only its shards, and the full model equals eager init.
    meta_built = build_fsdp2_model_on_meta(ToyTransformer, FSDP2Config(sub_modules_to_wrap=("layers.*",)), INIT, "cpu")
    eager = init_parameters_(ToyTransformer(), INIT)
    for sharded, plain in zip(meta_built.parameters(), eager.parameters(), strict=True):
        assert sharded.to_local().numel() <= math.ceil(plain.shape[0] / 2) * plain[0].numel()
    assert_same_parameters(meta_built, eager)

    # Mixed precision: bf16 compute (logits come out bf16), fp32 master weights, same loss within bf16 steps.
    mixed = apply_fsdp2(init_parameters_(ToyTransformer(), INIT),
                        FSDP2Config(sub_modules_to_wrap=("layers.*",), param_dtype=torch.bfloat16,
                                    reduce_dtype=torch.float32))
    tokens = keyed_batch(0)
    assert mixed(tokens[:, :-1]).dtype == torch.bfloat16
    assert mixed.output_layer.weight.dtype == torch.float32
    mixed_loss = lm_loss(mixed, tokens.chunk(world_size)[rank]).float()
    torch.distributed.all_reduce(mixed_loss)
    assert mixed_loss.item() / world_size == pytest.approx(references["adamw"][0], rel=2e-2)


@pytest.mark.distributed
def test_fsdp2_two_ranks_reproduce_single_process():
    run_ranks(check_fsdp2_on_two_ranks, 2, timeout=180)
