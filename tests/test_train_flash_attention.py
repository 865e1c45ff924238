"""--use-flash-attn: MegatronFlashAttention against megatron-core's DotProductAttention (masks, GQA, values
and gradients), its dropout under megatron's RNG tracker (forks, recomputation, TP ranks), the layer spec
at every CP size, the model and the training curve against the unfused attention, and the refusals."""

from __future__ import annotations

import pytest
import torch

from mm_kernels.reference.attention import dropout_keep
from mm_train.cli import parse_args
from mm_train.config import build_config
from mm_train.launch import Launch
from tests.distributed import run_ranks
from tests.helpers import assert_close, relative_error
from tests.test_train_cp import CP2, _model_steps, single_process  # noqa: F401 (a fixture)
from tests.train_runner import TINY, losses, rel_close, run_train

SEQ, BATCH, HEADS, DIM = 13, 2, 4, 8
# Relative to the largest fp64 value, as the attention kernel tests measure.
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 3e-2}


def _config(groups: int, dtype: torch.dtype, dropout: float = 0.0, sequence_parallel: bool = False):
    from megatron.core.transformer import TransformerConfig

    return TransformerConfig(num_layers=1, hidden_size=HEADS * DIM, num_attention_heads=HEADS, num_query_groups=groups,
                             kv_channels=DIM, attention_dropout=dropout, bf16=dtype == torch.bfloat16,
                             params_dtype=dtype, masked_softmax_fusion=False, sequence_parallel=sequence_parallel,
                             tensor_model_parallel_size=2 if sequence_parallel else 1)


def _padding_mask() -> torch.Tensor:
    """[b, 1, sq, sk] bool: sample 1 hides its last 4 keys and a few more; every query sees a key."""
    gen = torch.Generator().manual_seed(2)
    mask = torch.rand(BATCH, 1, SEQ, SEQ, generator=gen) < 0.2
    mask[1, :, :, -4:] = True
    mask[..., 0] = False
    return mask


def _qkv(groups: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(SEQ, BATCH, HEADS, DIM, generator=gen)
    k, v = (torch.randn(SEQ, BATCH, groups, DIM, generator=gen) for _ in range(2))
    return q, k, v, torch.randn(SEQ, BATCH, HEADS * DIM, generator=gen)


def _run(module, q, k, v, dout, mask, dtype):
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    out = module(*leaves, mask)
    out.backward(dout.to(dtype))
    return [out.detach(), *(t.grad for t in leaves)]


def _against_megatron(rank: int, world: int) -> dict:
    """Relative errors of MegatronFlashAttention (fp32, bf16) against DotProductAttention in fp64, per case."""
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from mm_kernels.integrations.megatron import MegatronFlashAttention
    from mm_train.platform.cpu_adaptor import apply_cpu_adaptor

    apply_cpu_adaptor()
    parallel_state.initialize_model_parallel(1, 1)
    tensor_parallel.model_parallel_cuda_manual_seed(1)  # megatron's attention forks the tracker for its dropout
    errors = {}
    try:
        for mask_type in (AttnMaskType.causal, AttnMaskType.padding, AttnMaskType.padding_causal,
                          AttnMaskType.no_mask):
            for groups in (HEADS, 2):
                q, k, v, dout = _qkv(groups)
                mask = None if mask_type in (AttnMaskType.causal, AttnMaskType.no_mask) else _padding_mask()
                if mask_type == AttnMaskType.padding_causal:
                    mask = mask | torch.ones(SEQ, SEQ, dtype=torch.bool).triu(1)  # megatron's mask holds causality
                oracle = DotProductAttention(_config(groups, torch.float32), 1, mask_type, "self")
                expected = _run(oracle, q, k, v, dout, mask, torch.float64)
                for dtype in (torch.float32, torch.bfloat16):
                    flash = MegatronFlashAttention(_config(groups, dtype), 1, mask_type, "self")
                    actual = _run(flash, q, k, v, dout, mask, dtype)
                    errors[mask_type.name, groups, str(dtype)] = [
                        (a.dtype == dtype, relative_error(a, e)) for a, e in zip(actual, expected, strict=True)]
    finally:
        parallel_state.destroy_model_parallel()
    return errors


def test_matches_megatron_dot_product_attention():
    for case, results in run_ranks(_against_megatron, 1, timeout=180)[0].items():
        dtype = torch.bfloat16 if "bfloat16" in case[2] else torch.float32
        for name, (same_dtype, error) in zip(("context", "dq", "dk", "dv"), results, strict=True):
            assert same_dtype, f"{case} {name}: not in the input dtype"
            assert error <= TOLERANCE[dtype], f"{case} {name}: relative error {error:.2e} > {TOLERANCE[dtype]:.0e}"


def _dropout_semantics(rank: int, world: int) -> dict:
    """Dropout of MegatronFlashAttention as megatron's: seed drawn under the RNG tracker's fork (the default
    generator untouched), replayed by activation recomputation, different on each TP rank, drawn from
    the default generator under sequence parallelism; the kept probabilities are dropout_keep(seed)'s."""
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.transformer.enums import AttnMaskType

    from mm_kernels.integrations.megatron import MegatronFlashAttention
    from mm_train.platform.cpu_adaptor import apply_cpu_adaptor

    apply_cpu_adaptor()
    parallel_state.initialize_model_parallel(world, 1)
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    q, k, v, dout = _qkv(HEADS)
    attention = MegatronFlashAttention(_config(HEADS, torch.float32, dropout=0.4), 1, AttnMaskType.causal, "self")
    result = {}
    try:
        states, default = tracker.get_states(), torch.get_rng_state()
        with tracker.fork():
            seed = torch.randint(0, 2**62, (1,))
        tracker.set_states(dict(states))  # megatron keeps the dict it is given
        first = _run(attention, q, k, v, dout, None, torch.float32)
        result["default generator untouched"] = torch.equal(default, torch.get_rng_state())
        keep = dropout_keep(seed, 0.4, BATCH, HEADS, SEQ, SEQ)
        probs = torch.softmax((q.permute(1, 2, 0, 3) @ k.permute(1, 2, 3, 0) / DIM ** 0.5).masked_fill(
            torch.ones(SEQ, SEQ, dtype=torch.bool).triu(1), float("-inf")), -1)
        expected = (probs * keep / 0.6 @ v.permute(1, 2, 0, 3)).permute(2, 0, 1, 3).reshape(SEQ, BATCH, -1)
        result["keep mask error"] = relative_error(first[0], expected)
        tracker.set_states(dict(states))  # megatron keeps the dict it is given
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        recomputed = tensor_parallel.checkpoint(lambda *x: attention(*x, None), False, *leaves)
        recomputed.backward(dout)
        result["recomputation replays"] = torch.equal(recomputed, first[0]) and all(
            torch.equal(leaf.grad, grad) for leaf, grad in zip(leaves, first[1:], strict=True))
        second = _run(attention, q, k, v, dout, None, torch.float32)
        result["next call differs"] = not torch.equal(second[0], first[0])
        attention.eval()
        result["eval drops nothing"] = relative_error(_run(attention, q, k, v, dout, None, torch.float32)[0],
                                                      (probs @ v.permute(1, 2, 0, 3)).permute(2, 0, 1, 3).reshape(
                                                          SEQ, BATCH, -1))
        result["out"] = first[0]
        if world == 2:
            parallel_config = _config(HEADS, torch.float32, dropout=0.4, sequence_parallel=True)
            serial = MegatronFlashAttention(parallel_config, 1, AttnMaskType.causal, "self")
            before = torch.get_rng_state()
            _run(serial, q, k, v, dout, None, torch.float32)
            result["sequence parallel draws from the default generator"] = not torch.equal(before,
                                                                                           torch.get_rng_state())
    finally:
        parallel_state.destroy_model_parallel()
    return result


@pytest.mark.distributed
def test_dropout_follows_megatrons_rng_tracker():
    ranks = run_ranks(_dropout_semantics, 2, timeout=180)
    for rank, result in enumerate(ranks):
        assert result["default generator untouched"] and result["recomputation replays"], rank
        assert result["next call differs"] and result["sequence parallel draws from the default generator"], rank
        assert result["keep mask error"] < 1e-5 and result["eval drops nothing"] < 1e-5, rank
    assert not torch.equal(ranks[0]["out"], ranks[1]["out"]), "both TP ranks dropped the same probabilities"


def _layer_spec(flags: list[str], context_parallel=None):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from mm_train.features import fused_kernels
    from mm_train.features.context_parallel import context_parallel_layer_spec

    config = build_config(parse_args(TINY + flags), Launch(0, 2, 0, "cpu"))
    layer = fused_kernels.attention_layer_spec(get_gpt_layer_local_spec(normalization="RMSNorm"),
                                               config.fused_kernels)
    return context_parallel_layer_spec(layer, context_parallel).submodules.self_attention.submodules.core_attention


def test_layer_spec_takes_the_fused_attention_at_every_cp_size():
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from mm_kernels.integrations.megatron import MegatronFlashAttention
    from mm_train.features.context_parallel import ContextParallelAttention

    assert _layer_spec([]) is DotProductAttention
    assert _layer_spec(["--use-flash-attn"]).module is MegatronFlashAttention
    cp = _layer_spec(["--use-flash-attn", "--context-parallel-size", "2"], context_parallel=object())
    assert cp.module is ContextParallelAttention


@pytest.mark.distributed
def test_model_with_flash_attention_matches_the_unfused_one_at_cp_1_and_2(single_process):  # noqa: F811
    """Per-token losses and every parameter gradient, fp32: CP=1 with --use-flash-attn, and CP=2 (Ulysses)
    with it, against the single-process model on megatron's attention."""
    from mm_kernels.parallel import unshard_pieces

    flash = run_ranks(_model_steps, 1, 1, {"flash": ["--use-flash-attn"]}, timeout=120)[0]
    cp_cases = {"ulysses-flash": [*CP2["ulysses"], "--use-flash-attn"]}
    ranks = run_ranks(_model_steps, 2, 2, cp_cases, timeout=180)
    for mode, expected in ((mode, single_process["single", mode]) for _, mode in single_process):
        assert_close(flash["flash", mode]["token_loss"], expected["token_loss"], torch.float32)
        for name, grad in flash["flash", mode]["grads"].items():
            assert_close(grad, expected["grads"][name], torch.float32, scale=10.0, name=name)
        pieces = [rank["ulysses-flash", mode] for rank in ranks]
        token_loss = unshard_pieces([piece["token_loss"] for piece in pieces], "ulysses_cp_algo", None)
        assert_close(token_loss, expected["token_loss"], torch.float32)


CURVE = TINY + ["--train-iters", "6"]


@pytest.mark.parametrize("precision, rtol", [([], 1e-5), (["--bf16"], 2e-2)], ids=["fp32", "bf16"])
def test_loss_curve_matches_the_unfused_attention(precision, rtol):
    unfused = losses(run_train(CURVE + precision))
    flash = losses(run_train(CURVE + precision + ["--use-flash-attn"]))
    rel_close(flash, unfused, rtol)
    assert unfused[-1] < unfused[0] - 0.2  # it trains: the curves compared are not flat


@pytest.mark.parametrize("device_type", ["cpu", "cuda", "npu"])
def test_flash_attention_with_dropout_by_device(device_type):
    flags = TINY + ["--use-flash-attn", "--attention-dropout", "0.1"]
    config = build_config(parse_args(flags), Launch(0, 1, 0, device_type))
    notices = [line for line in config.notices if line.startswith("--use-flash-attn")]
    if device_type == "cuda":   # the Triton kernel's fused dropout
        assert config.fused_kernels.flash_attn and notices == []
    else:   # megatron-core's attention keeps the dropout, and a start-up line says so
        assert not config.fused_kernels.flash_attn
        assert len(notices) == 1 and notices[0].startswith(
            f"--use-flash-attn: megatron-core's attention runs, for --attention-dropout 0.1 on {device_type} (")
    assert build_config(parse_args(flags[:-1] + ["0"]), Launch(0, 1, 0, device_type)).fused_kernels.flash_attn


def test_softmax_precision_flag_reaches_megatron():
    from mm_train.model.build import transformer_config

    launch = Launch(0, 1, 0, "cpu")
    assert not transformer_config(build_config(parse_args(TINY + ["--bf16"]), launch)).attention_softmax_in_fp32
    assert transformer_config(build_config(parse_args(TINY + ["--bf16", "--attention-softmax-in-fp32"]),
                                           launch)).attention_softmax_in_fp32
