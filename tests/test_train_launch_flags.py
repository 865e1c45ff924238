"""Flags of real Megatron / MindSpeed launch scripts: what runs, what is named in a notice, what is refused
in one line; tokenizers; MoE layer patterns and shared experts; Megatron's FLOP count; the device and
backend a script gets; mm_kernels' SwiGLU reaching the MoE experts."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from mm_train import launch as launch_module
from mm_train.cli import main, parse_args
from mm_train.config import build_config
from mm_train.data import build_tokenizer
from mm_train.errors import ConfigError
from mm_train.features.data import TokenizerConfig
from mm_train.features.logging import num_floating_point_operations
from mm_train.launch import Launch, read_launch
from tests.distributed import run_ranks
from tests.train_runner import TINY

CPU = Launch(rank=0, world_size=1, local_rank=0, device_type="cpu")
MOE = ["--num-experts", "4", "--moe-router-topk", "2", "--moe-token-dispatcher-type", "alltoall"]
# DeepSeek-V2-Lite's multi-latent attention and YaRN arguments, as its launch script passes them.
MLA_ARGS = ("--spec mindspeed_llm.tasks.models.spec.deepseek_spec --multi-latent-attention --qk-pos-emb-head-dim 64 "
            "--qk-head-dim 128 --kv-lora-rank 512 --v-head-dim 128 --qk-layernorm --rope-scaling-type yarn "
            "--rope-scaling-factor 40").split()


def config_of(flags: list[str], launch: Launch = CPU):
    return build_config(parse_args(TINY + flags), launch)


def one_line_error(capsys, flags: list[str], status: int = 2) -> str:
    assert main(TINY + flags) == status
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("mm-train: error: "), err
    return err


def test_missing_features_are_refused_by_name_in_one_line(capsys):
    err = one_line_error(capsys, MLA_ARGS)
    for flag in ("--multi-latent-attention", "--kv-lora-rank", "--spec", "--rope-scaling-type", "--qk-layernorm"):
        assert flag in err
    assert "multi-latent attention (DeepSeek MLA) is not built" in err and "RoPE scaling" in err


def test_unknown_flag_and_bad_value_are_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(TINY + ["--no-such-flag"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == ("mm-train: error: unrecognized arguments: --no-such-flag (see mm-train "
                                       "--help)\n")
    with pytest.raises(SystemExit):
        parse_args(TINY + ["--moe-layer-freq", "every other"])
    assert capsys.readouterr().err.count("\n") == 1


def test_flags_without_effect_are_named_with_the_reason():
    notices = config_of(["--use-fused-rotary-pos-emb", "--swap-attention", "--shape-order", "BNSD",
                         "--no-shared-storage", "--moe-permutation-async-comm", "--use-flash-attn"]).notices
    assert len(notices) == 1   # --use-flash-attn has its effect: not named
    line = notices[0]
    assert line.startswith("no effect here: --use-fused-rotary-pos-emb --shape-order (fused operators of")
    assert "--swap-attention (memory savings only" in line and "--moe-permutation-async-comm (Ascend" in line
    assert "--no-shared-storage (one node" in line
    assert config_of([]).notices == ()


def test_backend_of_the_device():
    on_cpu = config_of(["--distributed-backend", "nccl"])
    assert on_cpu.parallel.distributed_backend == "gloo"
    assert on_cpu.notices == ("warning: --distributed-backend nccl needs an accelerator and this machine has none: "
                              "running on gloo",)
    ascend = Launch(0, 1, 0, "npu")
    assert config_of(["--distributed-backend", "nccl"], ascend).parallel.distributed_backend == "hccl"
    gpu = Launch(0, 1, 0, "cuda")
    assert config_of(["--distributed-backend", "nccl"], gpu).parallel.distributed_backend == "nccl"
    with pytest.raises(ConfigError, match="hccl needs Ascend NPUs"):
        config_of(["--distributed-backend", "hccl"], gpu)


def test_model_sizes_required_unless_mm_model(capsys):
    assert main(["--seq-length", "64"]) == 2
    assert capsys.readouterr().err == ("mm-train: error: the following arguments are required: --num-layers, "
                                       "--hidden-size, --num-attention-heads\n")
    assert main(["--seq-length", "64", "--mm-model", "model.json"]) == 2
    assert capsys.readouterr().err == "mm-train: error: --mm-model needs --mm-data\n"


@pytest.mark.parametrize("flags, message", [
    (["--optimizer-selection", "fused_ema_adamw"], "average of the weights is not built"),
    (["--no-initialization"], "--no-initialization needs --load"),
    (["--num-layers-per-virtual-pipeline-stage", "1"], "needs --pipeline-model-parallel-size >= 2"),
    (["--tokenizer-type", "GPT2BPETokenizer"], "GPT-2 BPE vocabulary files are not read"),
    (["--tokenizer-type", "NullTokenizer", "--vocab-size", "300"], "NullTokenizer reads token ids as stored"),
    (["--tokenizer-type", "Llama2Tokenizer"], "needs --tokenizer-model <SentencePiece model file>"),
    (MOE + ["--moe-layer-freq", "[1]*3"], "needs 2 entries of 0 (dense) or 1 (MoE)"),
    (MOE + ["--first-k-dense-replace", "2"], "must be greater than --first-k-dense-replace 2"),
    (MOE + ["--moe-router-num-groups", "3", "--moe-router-group-topk", "1"], "must divide --num-experts 4"),
    (["--n-shared-experts", "1"], "--n-shared-experts needs --num-experts"),
])
def test_bad_launch_flags_are_one_line(capsys, flags, message):
    assert message in one_line_error(capsys, flags)


def test_virtual_pipeline_needs_whole_pipeline_rounds(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    two = Launch(0, 2, 0, "cpu")
    flags = ["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1"]
    assert config_of(flags + ["--global-batch-size", "4"], two).parallel.virtual_pipeline_model_parallel_size == 1
    with pytest.raises(ConfigError, match="multiple of --pipeline-model-parallel-size 2"):
        config_of(flags + ["--global-batch-size", "6"], two)


def test_megatron_spellings_and_launcher_arguments(monkeypatch):
    config = config_of(["--use-rotary-position-embeddings", "--position-embedding-type", "learned_absolute",
                        "--optimizer-selection", "fused_torch_adamw", "--local-rank=1"])
    assert config.model.position_embedding_type == "rope"
    assert config.optimizer.optimizer_selection == "fused_torch_adamw"
    assert config.model.transformer_impl == "local"
    te = config_of(["--transformer-impl", "transformer_engine"])
    if te.model.transformer_impl == "local":  # Transformer Engine is not installed here
        assert te.notices == ("--transformer-impl transformer_engine: Transformer Engine is not installed, "
                              "megatron-core's local layers run",)
    else:
        assert te.model.transformer_impl == "transformer_engine" and te.notices == ()
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert read_launch(local_rank_flag=1).local_rank == 1
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert read_launch(local_rank_flag=1).local_rank == 0


def test_moe_layer_patterns_and_shared_experts():
    four = ["--num-layers", "4"]
    assert config_of(four + MOE + ["--moe-layer-freq", "-1", "--first-k-dense-replace", "-1"]
                     ).moe.moe_layer_pattern == (1, 1, 1, 1)
    deepseek = config_of(four + MOE + ["--first-k-dense-replace", "1", "--moe-layer-freq", "1", "--n-shared-experts",
                                       "2", "--moe-ffn-hidden-size", "32"]).moe
    assert deepseek.moe_layer_pattern == (0, 1, 1, 1) and deepseek.moe_shared_expert_intermediate_size == 64
    assert config_of(four + MOE + ["--moe-layer-freq", "([0]*1+[1]*3)"]).moe.moe_layer_pattern == (0, 1, 1, 1)
    assert config_of(four + MOE + ["--moe-layer-freq", "2"]).moe.moe_layer_pattern == (1, 0, 1, 0)
    sequence = config_of(MOE[:4] + ["--moe-token-dispatcher-type", "alltoall_seq", "--seq-aux"])
    assert sequence.moe.moe_token_dispatcher_type == "alltoall"
    assert sequence.moe.moe_router_load_balancing_type == "seq_aux_loss"
    assert any("alltoall_seq runs megatron-core's alltoall" in line for line in sequence.notices)


def test_pipeline_stage_without_moe_layer_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="leave no MoE layer in pipeline stage 0"):
        config_of(["--num-layers", "4", "--pipeline-model-parallel-size", "2", "--first-k-dense-replace", "2",
                   "--moe-layer-freq", "1"] + MOE, Launch(0, 2, 0, "cpu"))


def test_megatron_flop_count():
    dense = config_of(["--ffn-hidden-size", "176"])
    # per token: MLP 6*h*(3*ffn)*L, attention 6*(h*(q+k+v) + q*s/2*2 + q*h) per layer, logits 6*h*V
    per_token = 6 * 64 * 3 * 176 * 2 + 6 * (64 * 192 + 64 * 64 + 64 * 64) * 2 + 6 * 64 * 512
    assert num_floating_point_operations(dense.model, None, 512, 8) == 8 * 64 * per_token
    moe = config_of(["--ffn-hidden-size", "176", "--moe-ffn-hidden-size", "32", "--moe-shared-expert-intermediate-size",
                     "48", "--moe-layer-freq", "[0,1]"] + MOE)
    moe_per_token = (6 * 64 * (3 * 176 * 1 + 32 * 2 * 3 * 1 + 48 * 3 * 1) + 6 * (64 * 192 + 64 * 64 + 64 * 64) * 2
                     + 6 * 64 * 512)
    assert num_floating_point_operations(moe.model, moe.moe, 512, 8) == 8 * 64 * moe_per_token


@pytest.fixture(scope="module")
def sentencepiece_model(tmp_path_factory):
    sentencepiece = pytest.importorskip("sentencepiece")
    directory = tmp_path_factory.mktemp("spm")
    text = directory / "text.txt"
    text.write_text("\n".join(f"the {word} sat on the mat number {i}" for i, word in
                              enumerate(["cat", "dog", "bird", "fish"] * 50)))
    sentencepiece.SentencePieceTrainer.train(input=str(text), model_prefix=str(directory / "tiny"), vocab_size=60,
                                             model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                             minloglevel=2)
    return str(directory / "tiny.model")


def test_sentencepiece_tokenizers(sentencepiece_model):
    llama = build_tokenizer(TokenizerConfig("Llama2Tokenizer", tokenizer_model=sentencepiece_model))
    plain = build_tokenizer(TokenizerConfig("GPTSentencePieceTokenizer", tokenizer_model=sentencepiece_model))
    assert (llama.vocab_size, llama.eod, llama.pad) == (60, 2, 2)
    ids = plain.tokenize("the cat sat")
    assert llama.tokenize("the cat sat") == [1, *ids] and plain.detokenize(ids) == "the cat sat"
    with pytest.raises(ConfigError, match="not a SentencePiece model"):
        build_tokenizer(TokenizerConfig("Llama2Tokenizer", tokenizer_model=__file__))


def test_null_and_hugging_face_tokenizers(tmp_path):
    null = build_tokenizer(TokenizerConfig("NullTokenizer", vocab_size=300))
    assert (null.vocab_size, null.eod, null.tokenize("3 1 4"), null.detokenize([3, 1])) == (301, 300, [3, 1, 4], "3 1")
    pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"<eos>": 0, "<unk>": 1, "hello": 2, "world": 3}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>").save_pretrained(tmp_path)
    hf = build_tokenizer(TokenizerConfig("PretrainedFromHF", tokenizer_name_or_path=str(tmp_path)))
    assert (hf.vocab_size, hf.eod, hf.tokenize("hello world")) == (4, 0, [2, 3])


def test_ascend_is_detected_first_and_redirects_cuda(monkeypatch):
    """torch_npu is imported before the device is detected, then MindSpeed's torch.cuda redirection."""
    imported = []
    fake_npu = types.SimpleNamespace(is_available=lambda: True)
    modules = {"torch_npu": types.ModuleType("torch_npu"),
               "torch_npu.contrib.transfer_to_npu": types.ModuleType("torch_npu.contrib.transfer_to_npu")}

    def import_module(name):
        imported.append(name)
        if name == "torch_npu":
            monkeypatch.setattr(torch, "npu", fake_npu, raising=False)
        return modules[name]

    monkeypatch.setattr(launch_module.importlib.util, "find_spec", lambda name: object() if name == "torch_npu" else None)
    monkeypatch.setattr(launch_module.importlib, "import_module", import_module)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # what transfer_to_npu makes it say
    launch_module._ascend_npu.cache_clear()
    try:
        assert launch_module.device_type() == "npu"
    finally:
        launch_module._ascend_npu.cache_clear()
    assert imported == ["torch_npu", "torch_npu.contrib.transfer_to_npu"]
    assert "torch_npu" not in sys.modules or sys.modules["torch_npu"] is not modules["torch_npu"]


def _swiglu_calls_in_moe(rank: int, world_size: int, flags: list[str]) -> list[int]:
    """The input width (2 x FFN) of each call into mm_kernels.swiglu during one forward and backward of a
    model whose every layer is MoE."""
    from megatron.core import parallel_state, tensor_parallel

    import mm_kernels
    from mm_train.features import fused_kernels
    from mm_train.model.build import build_model, transformer_config
    from mm_train.platform.cpu_adaptor import apply_cpu_adaptor, apply_package_fallbacks

    config = build_config(parse_args(TINY + MOE + ["--use-fused-swiglu", *flags]), Launch(rank, world_size, 0, "cpu"))
    apply_cpu_adaptor()
    apply_package_fallbacks()
    patch = fused_kernels.apply(config.fused_kernels, config.moe)
    calls = []
    original = mm_kernels.swiglu
    mm_kernels.swiglu = lambda *args, **kwargs: calls.append(args[0].shape[-1]) or original(*args, **kwargs)
    parallel_state.initialize_model_parallel(1, 1)
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    try:
        model = build_model(config, transformer_config(config), 512)
        if config.precision.bf16:
            model = model.bfloat16()
        tokens = torch.randint(0, 258, (2, 64))
        positions = torch.arange(64).expand(2, 64)
        model(tokens, positions, None, labels=tokens).float().mean().backward()
    finally:
        parallel_state.destroy_model_parallel()
        patch.restore()
        mm_kernels.swiglu = original
    return calls


@pytest.mark.distributed
@pytest.mark.parametrize("flags", [[], ["--moe-grouped-gemm", "--bf16"], ["--moe-shared-expert-intermediate-size", "64"]],
                         ids=["sequential-experts", "grouped-experts", "shared-experts"])
def test_fused_swiglu_reaches_the_experts(flags):
    widths = run_ranks(_swiglu_calls_in_moe, 1, flags, timeout=180)[0]
    routed = 2 * 192   # TINY's SwiGLU FFN width of hidden 64
    assert widths.count(routed) >= 2, widths   # the routed experts of both layers
    shared = [width for width in widths if width != routed]
    assert shared == ([2 * 64] * 2 if "--moe-shared-expert-intermediate-size" in flags else []), widths
