"""Context parallelism in mm-train: the GPT model's per-token losses, loss modes and gradients on CP ranks
against one process, the training curve of CP=2 (Ulysses, ring) and CP=4 (hybrid) against the
single-process curve, and the refused flag combinations."""

from __future__ import annotations

from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from mm_kernels.parallel import HYBRID, required_multiple
from mm_train.cli import main, parse_args
from mm_train.config import build_config
from mm_train.data import build_data_iterators, build_tokenizer
from mm_train.launch import Launch
from tests.distributed import run_ranks
from tests.helpers import assert_close
from tests.train_runner import TINY, losses, rel_close, run_train

pytestmark = pytest.mark.distributed

VOCAB = 256
SEQ = 32
# GQA (4 query heads, 2 KV groups) and a large init std so attention is peaked: a token at the wrong
# position (rope angle, zigzag chunk) changes its loss far beyond the fp32 tolerance.
MODEL = [flag for flag in TINY if flag != "--swiglu"] + [
    "--seq-length", str(SEQ), "--group-query-attention", "--num-query-groups", "2", "--init-method-std", "0.3"]
CP2 = {"ulysses": ["--context-parallel-algo", "ulysses_cp_algo"],
       "ring": ["--context-parallel-algo", "megatron_cp_algo", "--use-cp-send-recv-overlap"]}
CP4 = {"hybrid": ["--context-parallel-algo", "hybrid_cp_algo", "--ulysses-degree-in-cp", "2"]}
MODES = {"token_mean": [], "per_sample": ["--calculate-per-sample-loss"], "per_token": ["--calculate-per-token-loss"]}


def _micro_batch() -> dict:
    gen = torch.Generator().manual_seed(7)
    mask = (torch.rand(2, SEQ, generator=gen) > 0.3).float()
    mask[1, SEQ // 2:] = 0.0  # a sample whose second half is padding
    return {"tokens": torch.randint(0, VOCAB, (2, SEQ), generator=gen),
            "labels": torch.randint(0, VOCAB, (2, SEQ), generator=gen),
            "loss_mask": mask, "position_ids": torch.arange(SEQ).expand(2, SEQ).contiguous()}


def _model_steps(rank: int, world_size: int, cp: int, cases: dict[str, list[str]]) -> dict:
    """Per case and loss mode on this rank: per-token losses of its shard, the loss report, and the
    parameter gradients summed over the CP group divided by CP (what DDP's DP x CP average leaves)."""
    from megatron.core import parallel_state, tensor_parallel

    from mm_train.features.context_parallel import cp_loss_function, set_up_context_parallel, shard_batch
    from mm_train.loss import loss_function
    from mm_train.model.build import build_model, transformer_config
    from mm_train.platform.cpu_adaptor import apply_cpu_adaptor

    apply_cpu_adaptor()
    parallel_state.initialize_model_parallel(1, 1, context_parallel_size=cp)
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    results = {}
    try:
        for name, flags in cases.items():
            for mode_name, mode_flags in MODES.items():
                config = build_config(parse_args(MODEL + ["--context-parallel-size", str(cp), *flags, *mode_flags]),
                                      Launch(rank, world_size, 0, "cpu"))
                context_parallel = set_up_context_parallel(config.context_parallel, timedelta(seconds=60))
                model = build_model(config, transformer_config(config), VOCAB, context_parallel)
                batch = shard_batch(_micro_batch(), context_parallel)
                token_loss = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
                mode = config.training.loss_mode
                loss_func = (loss_function(mode, batch["loss_mask"]) if context_parallel is None
                             else cp_loss_function(mode, batch["loss_mask"], context_parallel))
                value, divisor, report = loss_func(token_loss)
                (value / divisor).backward()
                grads = {}
                for param_name, param in model.named_parameters():
                    grad = param.grad.clone()
                    if context_parallel is not None:
                        dist.all_reduce(grad, group=context_parallel.groups.cp)
                        grad /= cp
                    grads[param_name] = grad
                results[name, mode_name] = {"token_loss": token_loss.detach(), "report": report["lm loss"],
                                            "grads": grads}
    finally:
        parallel_state.destroy_model_parallel()
    return results


@pytest.fixture(scope="module")
def single_process():
    return run_ranks(_model_steps, 1, 1, {"single": []}, timeout=120)[0]


@pytest.mark.parametrize("cp,cases", [(2, CP2), (4, CP4)], ids=["cp2", "cp4"])
def test_cp_model_matches_single_process(single_process, cp, cases):
    from mm_kernels.parallel import unshard_pieces

    ranks = run_ranks(_model_steps, cp, cp, cases, timeout=180)
    for name, flags in cases.items():
        algo, degree = flags[1], int(flags[-1]) if "--ulysses-degree-in-cp" in flags else None
        for mode in MODES:
            expected = single_process["single", mode]
            pieces = [rank[name, mode] for rank in ranks]
            token_loss = unshard_pieces([piece["token_loss"] for piece in pieces], algo, degree)
            assert_close(token_loss, expected["token_loss"], torch.float32)
            for piece in pieces:
                assert_close(piece["report"], expected["report"], torch.float32)
                for param_name, grad in piece["grads"].items():
                    assert_close(grad, expected["grads"][param_name], torch.float32, scale=10.0)


CURVE_ITERS = 4
CURVE_RTOL = 2e-3
CURVES = {
    "cp2-ulysses": (2, ["--context-parallel-algo", "ulysses_cp_algo"]),
    "cp2-ring": (2, ["--context-parallel-algo", "megatron_cp_algo"]),
    "cp4-hybrid-ulysses2": (4, ["--context-parallel-algo", "hybrid_cp_algo", "--ulysses-degree-in-cp", "2",
                                "--use-cp-send-recv-overlap"]),
}




@pytest.fixture(scope="module")
def reference_curve():
    return losses(run_train(TINY + ["--train-iters", str(CURVE_ITERS)]))


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(CURVES))
def test_cp_reproduces_single_process_curve(reference_curve, layout):
    nproc, flags = CURVES[layout]
    curve = losses(run_train(TINY + ["--train-iters", str(CURVE_ITERS), "--context-parallel-size", str(nproc),
                                     *flags], nproc=nproc))
    rel_close(curve, reference_curve, CURVE_RTOL)


@pytest.mark.slow
def test_cp_distributed_optimizer_resume_continues_the_curve(reference_curve, tmp_path):
    """CP=2 shards the distributed optimizer over DP x CP: megatron gathers it into one file and scatters it back."""
    flags = TINY + ["--train-iters", str(CURVE_ITERS), "--context-parallel-size", "2", "--use-distributed-optimizer",
                    "--save", str(tmp_path), "--save-interval", "2"]
    first = losses(run_train(flags + ["--exit-interval", "2"], nproc=2))
    resumed = losses(run_train(flags + ["--load", str(tmp_path)], nproc=2))
    rel_close(first + resumed, reference_curve, CURVE_RTOL)
    assert sorted(p.name for p in (tmp_path / "iter_0000002" / "mp_rank_00").iterdir()) == [
        "distrib_optim.pt", "model_optim_rng.pt"]


BAD_COMBINATIONS = {
    "world not divisible by CP": (2, ["--context-parallel-size", "4"], "not divisible by TP x PP x CP = 1 x 1 x 4"),
    "hybrid without degree": (4, ["--context-parallel-size", "4", "--context-parallel-algo", "hybrid_cp_algo"],
                              "hybrid_cp_algo needs --ulysses-degree-in-cp"),
    "hybrid degree not dividing CP": (6, ["--context-parallel-size", "6", "--context-parallel-algo",
                                          "hybrid_cp_algo", "--ulysses-degree-in-cp", "4"],
                                      "--ulysses-degree-in-cp 4 must divide --context-parallel-size 6"),
    "heads not divisible by Ulysses": (8, ["--context-parallel-size", "8"],
                                       "--num-attention-heads 4 must be divisible by Ulysses degree x TP = 8 x 1"),
    "kv heads vs Ulysses": (4, ["--context-parallel-size", "4", "--hidden-size", "48", "--num-attention-heads",
                                "12", "--group-query-attention", "--num-query-groups", "3"],
                            "the key/value heads Hkv=3 must be divisible by the Ulysses degree 4"),
    "ring sequence length": (2, ["--context-parallel-size", "2", "--context-parallel-algo", "megatron_cp_algo",
                                 "--seq-length", "66"], "--seq-length 66 must be a multiple of 4"),
    "hybrid sequence length": (4, ["--context-parallel-size", "4", "--context-parallel-algo", "hybrid_cp_algo",
                                   "--ulysses-degree-in-cp", "2", "--seq-length", "66"],
                               "--seq-length 66 must be a multiple of 4"),
    "sequence parallel length": (4, ["--context-parallel-size", "2", "--tensor-model-parallel-size", "2",
                                     "--sequence-parallel", "--seq-length", "66"],
                                 "--seq-length 66 must be a multiple of 4 for ulysses_cp_algo on "
                                 "--context-parallel-size 2 with sequence parallel"),
    "attention dropout": (2, ["--context-parallel-size", "2", "--attention-dropout", "0.1"],
                          "--attention-dropout 0.1 must be 0"),
}


@pytest.mark.parametrize("case", list(BAD_COMBINATIONS))
def test_bad_combination_is_refused(case, capsys, monkeypatch):
    world_size, flags, message = BAD_COMBINATIONS[case]
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    assert main(TINY + flags) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1 and err.startswith("mm-train: error: ")


@pytest.mark.parametrize("degree", [1, 2, 4])
def test_hybrid_takes_any_ulysses_degree_dividing_cp(degree):
    # One rule with mm_kernels.parallel.layout: U = 1 is the ring alone, U = CP Ulysses alone.
    config = build_config(parse_args(TINY + ["--context-parallel-size", "4", "--context-parallel-algo",
                                             "hybrid_cp_algo", "--ulysses-degree-in-cp", str(degree)]),
                          Launch(0, 4, 0, "cpu"))
    assert config.context_parallel.ulysses_degree == degree
    assert config.data.pad_multiple == required_multiple(HYBRID, 4, degree)


def test_variable_lengths_pad_to_the_layout_multiple():
    # Ulysses on 4 ranks splits any multiple of 4: batches are padded to 4, not to 2 x CP = 8.
    config = build_config(parse_args(TINY + ["--context-parallel-size", "4", "--variable-seq-lengths", "--mock-data",
                                             "--micro-batch-size", "1", "--global-batch-size", "2"]),
                          Launch(0, 4, 0, "cpu"))
    assert config.data.pad_multiple == 4
    train, _ = build_data_iterators(config.data, build_tokenizer(), 0, 0, config.parallel.data_parallel_size)
    widths = {next(train)["tokens"].shape[1] for _ in range(16)}
    assert all(width % 4 == 0 for width in widths) and any(width % 8 for width in widths), widths


def test_flags_and_alias():
    args = parse_args(TINY)
    assert (args.context_parallel_size, args.context_parallel_algo, args.attention_mask_type) == (
        1, "ulysses_cp_algo", "causal")
    assert parse_args(TINY + ["--cp-attention-mask-type", "general"]).attention_mask_type == "general"
    general = build_config(parse_args(TINY + ["--attention-mask-type", "general"]), Launch(0, 1, 0, "cpu"))
    assert general.notices == ("--attention-mask-type general has no effect here: the GPT model's attention is "
                               "causal (the kernels never build a mask)",)
    with pytest.raises(SystemExit):
        parse_args(TINY + ["--attention-mask-type", "padding"])
