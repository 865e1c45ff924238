"""mm_train pieces that need no process group: loss modes, TP slicing, param groups, schedule, log line."""

from __future__ import annotations

import math
from datetime import datetime
from types import SimpleNamespace

import pytest
import torch

from mm_train.cli import parse_args
from mm_train.config import build_config
from mm_train.engines.base import StepResult
from mm_train.launch import Launch
from mm_train.loop import _Interval
from mm_train.loss import micro_batch_loss
from mm_train.model.init import tp_slice
from mm_train.optim import ScaledParamScheduler, name_matches, param_group_overrides, warmup_samples
from mm_train.reporting import IterationStats, iteration_line
from tests.train_runner import TINY

ONE_PROCESS = Launch(rank=0, world_size=1, local_rank=0, device_type="cpu")


def run_config(flags: list[str]):
    """The typed configuration of TINY + ``flags`` on one CPU process."""
    return build_config(parse_args(TINY + flags), ONE_PROCESS)


def test_token_mean_loss_is_mean_over_valid_tokens():
    token_loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    value, divisor, report = micro_batch_loss("token_mean", mask, token_loss)
    assert value.item() == 7.0 and divisor.item() == 3
    assert report["lm loss"].tolist() == pytest.approx([7.0 / 3, 1.0])


def test_per_sample_loss_averages_sample_means():
    token_loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    value, divisor, report = micro_batch_loss("per_sample", mask, token_loss)
    assert value.item() == pytest.approx(1.5 + 4.0) and divisor.item() == 2
    assert (report["lm loss"][0] / report["lm loss"][1]).item() == pytest.approx(2.75)


def test_per_token_loss_reports_sum_and_count():
    token_loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    value, divisor, report = micro_batch_loss("per_token", mask, token_loss)
    assert value.item() == 7.0 and divisor.item() == 3
    assert report["lm loss"].tolist() == [7.0, 3.0]


def _param(shape, dim=None, stride=1):
    param = torch.nn.Parameter(torch.empty(shape))
    if dim is not None:
        param.tensor_model_parallel, param.partition_dim, param.partition_stride = True, dim, stride
    return param


def test_tp_slice_contiguous_and_strided():
    full = torch.arange(8.0).reshape(8, 1)
    assert tp_slice(full, _param((4, 1), dim=0), 1, 2).flatten().tolist() == [4, 5, 6, 7]
    # SwiGLU fc1 [gate; up] with stride 2: rank r holds [gate_r; up_r]
    assert tp_slice(full, _param((4, 1), dim=0, stride=2), 1, 2).flatten().tolist() == [2, 3, 6, 7]
    assert tp_slice(full.T, _param((1, 4), dim=1), 0, 2).flatten().tolist() == [0, 1, 2, 3]
    assert tp_slice(full, _param((8, 1)), 1, 2) is full


def test_name_match_is_case_insensitive_substring():
    assert name_matches("module.decoder.layers.0.Self_Attention.linear_qkv.weight", ["self_attention"])
    assert not name_matches("module.embedding.word_embeddings.weight", ["layernorm", "output"])


def _groups(args_flags: list[str]) -> dict[str, tuple[float, float]]:
    overrides = param_group_overrides(run_config(args_flags).optimizer)
    named = {"module.embedding.word_embeddings.weight": torch.empty(4, 4),
             "module.decoder.layers.0.input_layernorm.weight": torch.empty(4),
             "module.decoder.layers.0.mlp.linear_fc1.weight": torch.empty(4, 4),
             "module.output_layer.weight": torch.empty(4, 4)}
    result = {}
    for name, param in named.items():
        merged = {}
        for key, override in overrides.items():
            if key.matches(param, name):
                merged.update(override)
        result[name.split(".")[-2]] = (merged.get("wd_mult", 1.0), merged.get("lr_mult", 1.0))
    return result


def test_param_groups_follow_exclude_and_scale_modules():
    groups = _groups(["--weight-decay-exclude-modules", "EMBEDDING", "--lr-scale-modules", "linear_fc1",
                      "output_layer", "--lr-mult", "0.1"])
    assert groups["word_embeddings"] == (0.0, 1.0)
    assert groups["input_layernorm"] == (0.0, 1.0)
    assert groups["linear_fc1"] == (1.0, 0.1)
    assert groups["output_layer"] == (1.0, 0.1)


def test_scheduler_warmup_fraction_cosine_and_lr_mult():
    config = run_config(["--train-iters", "100", "--lr-warmup-fraction", "0.1", "--lr", "1e-3", "--min-lr", "1e-4",
                         "--lr-decay-style", "cosine", "--global-batch-size", "8"])
    assert warmup_samples(config.optimizer, config.training) == 80
    optimizer = SimpleNamespace(param_groups=[{"lr_mult": 1.0, "wd_mult": 1.0}, {"lr_mult": 0.5, "wd_mult": 0.0}])
    scheduler = ScaledParamScheduler(optimizer, init_lr=0.0, max_lr=1e-3, min_lr=1e-4, lr_warmup_steps=80,
                                     lr_decay_steps=800, lr_decay_style="cosine", start_wd=0.1, end_wd=0.1,
                                     wd_incr_steps=800, wd_incr_style="constant")
    scheduler.step(40)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(5e-4)
    assert optimizer.param_groups[1]["lr"] == pytest.approx(2.5e-4)
    assert optimizer.param_groups[1]["weight_decay"] == 0.0
    scheduler.step(400)
    middle = 1e-4 + 0.5 * (1 + math.cos(math.pi * 360 / 720)) * 9e-4
    assert optimizer.param_groups[0]["lr"] == pytest.approx(middle)
    scheduler.step(1000)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-4)


def test_iteration_line_is_megatron_lm_training_log():
    stats = IterationStats(3, 40, 24, 12.5, 1e-3, 8, {"tokens per sample": 812.5, "lm loss": 5.25,
                                                       "load_balancing_loss": 0.0}, 1.0, 0.5, 0, 1,
                           throughput=1.234, timestamp=datetime(2026, 1, 2, 3, 4, 5, 123456))
    assert iteration_line(stats) == (
        " [2026-01-02 03:04:05.123456] iteration        3/      40 | consumed samples:           24 |"
        " elapsed time per iteration (ms): 12.5 | throughput per GPU (TFLOP/s/GPU): 1.2 |"
        " learning rate: 1.000000E-03 | global batch size:     8 | tokens per sample: 8.125000E+02 |"
        " lm loss: 5.250000E+00 | loss scale: 1.0 | grad norm: 0.500 | number of skipped iterations:   0 |"
        " number of nan iterations:   1 |")
    plain = IterationStats(3, 40, 24, 12.5, 1e-3, 8, {"lm loss": 5.25}, 65536.0, None, 2, 0,
                           timestamp=datetime(2026, 1, 2, 3, 4, 5))
    assert iteration_line(plain) == (
        " [2026-01-02 03:04:05.000000] iteration        3/      40 | consumed samples:           24 |"
        " elapsed time per iteration (ms): 12.5 | learning rate: 1.000000E-03 | global batch size:     8 |"
        " lm loss: 5.250000E+00 | loss scale: 65536.0 | number of skipped iterations:   2 |"
        " number of nan iterations:   0 |")


def test_skipped_iterations_leave_the_loss_mean_as_in_megatron_lm():
    interval = _Interval()
    for loss, updated in ((2.0, True), (float("inf"), False), (4.0, True), (3.5, False)):
        interval.add(StepResult(loss=loss, grad_norm=None, updated=updated, tokens=16))
    config = run_config(["--train-iters", "4"])
    stats = interval.stats(SimpleNamespace(iteration=4, consumed_train_samples=32), config,
                           StepResult(loss=3.5, grad_norm=None, updated=False, tokens=16), 1e-3, None)
    assert stats.losses["lm loss"] == 3.0
    assert (stats.skipped_iterations, stats.nan_iterations) == (2, 1)


def test_reference_argument_list_parses():
    flags = ("--use-mcore-models --no-gradient-accumulation-fusion --use-flash-attn --reuse-fp32-param "
             "--no-load-optim --no-load-rng --no-save-optim --no-save-rng --bf16 --num-workers 4 "
             "--variable-seq-lengths --use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather "
             "--use-fused-rmsnorm --use-fused-swiglu --weight-decay-exclude-modules a b --lr-scale-modules c "
             "--lr-mult 0.5 --clip-grad 0 --seed 42 --ckpt-format torch --recompute-granularity full "
             "--recompute-method block --recompute-num-layers 1 --calculate-per-sample-loss").split()
    args = parse_args(TINY + flags)
    assert args.weight_decay_exclude_modules == ["a", "b"] and args.lr_mult == 0.5 and args.bf16
