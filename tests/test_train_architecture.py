"""mm_train's shape: the command line keeps every flag it ever listed, nothing below the command line
reads the argparse Namespace, and the fused norm enters megatron-core through its layer spec with no
patched attribute."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from mm_train.cli import build_parser
from tests.distributed import run_ranks
from tests.train_runner import TINY

PACKAGE = Path(__file__).resolve().parents[1] / "mm_train"

# Every flag mm-train has accepted; a flag may be added, never dropped (launch scripts use them).
FLAGS = {
    '--adam-beta1', '--adam-beta2', '--adam-eps', '--add-qkv-bias', '--attention-dropout',
    '--attention-mask-type', '--attention-softmax-in-fp32', '--bf16', '--calculate-per-sample-loss',
    '--calculate-per-token-loss', '--ckpt-format', '--clip-grad', '--context-parallel-algo',
    '--context-parallel-size', '--cp-attention-mask-type', '--data-path', '--ddp-bucket-size',
    '--disable-bias-linear', '--distribute-saved-activations', '--distributed-backend',
    '--distributed-timeout-minutes', '--enable-one-logger', '--eval-interval', '--eval-iters',
    '--exit-interval', '--expert-model-parallel-size', '--ffn-hidden-size', '--finetune', '--fp16',
    '--fsdp2-config-path', '--global-batch-size', '--group-query-attention', '--help', '--hidden-dropout',
    '--hidden-size', '--init-method-std', '--init-model-with-meta-device', '--kv-channels', '--load',
    '--log-interval', '--log-throughput', '--lr', '--lr-decay-iters', '--lr-decay-style', '--lr-mult',
    '--lr-scale-modules', '--lr-warmup-fraction', '--lr-warmup-init', '--lr-warmup-iters',
    '--make-vocab-size-divisible-by', '--max-position-embeddings', '--micro-batch-size', '--min-lr',
    '--mm-data', '--mm-model', '--mm-tool', '--mock-data', '--moe-aux-loss-coeff',
    '--moe-expert-capacity-factor', '--moe-ffn-hidden-size', '--moe-grouped-gemm',
    '--moe-pad-expert-input-to-capacity', '--moe-permute-fusion', '--moe-router-load-balancing-type',
    '--moe-router-topk', '--moe-token-dispatcher-type', '--moe-token-drop-policy', '--no-bias-dropout-fusion',
    '--no-bias-swiglu-fusion', '--no-gradient-accumulation-fusion', '--no-load-optim', '--no-load-rng',
    '--no-masked-softmax-fusion', '--no-rope-fusion', '--no-save-optim', '--no-save-rng', '--norm-epsilon',
    '--normalization', '--num-attention-heads', '--num-experts', '--num-layers',
    '--num-layers-per-virtual-pipeline-stage', '--num-query-groups', '--num-workers', '--optimizer',
    '--overlap-grad-reduce', '--overlap-param-gather', '--pipeline-model-parallel-size',
    '--position-embedding-type', '--recompute-granularity', '--recompute-method', '--recompute-num-layers',
    '--reuse-fp32-param', '--rotary-base', '--rotary-percent', '--save', '--save-interval', '--seed',
    '--seq-length', '--sequence-parallel', '--sgd-momentum', '--split', '--swiglu',
    '--tensor-model-parallel-size', '--tensorboard-dir', '--tensorboard-log-interval', '--tokenizer-model',
    '--tokenizer-type', '--train-iters', '--ulysses-degree-in-cp', '--untie-embeddings-and-output-weights',
    '--use-cp-send-recv-overlap', '--use-cpu-initialization', '--use-distributed-optimizer',
    '--use-flash-attn', '--use-fused-rmsnorm', '--use-fused-rotary-pos-emb', '--use-fused-swiglu',
    '--use-mcore-models', '--use-torch-fsdp2', '--variable-seq-lengths', '--vocab-size', '--weight-decay',
    '--weight-decay-exclude-modules', '--local-rank', '--local_rank', '--tokenizer-name-or-path',
    '--tokenizer-not-use-fast', '--padded-vocab-size', '--transformer-impl', '--use-rotary-position-embeddings',
    '--no-initialization', '--optimizer-selection', '--log-tps', '--moe-layer-freq', '--first-k-dense-replace',
    '--n-shared-experts', '--moe-shared-expert-intermediate-size', '--virtual-pipeline-model-parallel-size',
    '--seq-aux', '--moe-router-topk-scaling-factor', '--moe-router-num-groups', '--moe-router-group-topk',
    '--swap-attention', '--no-shared-storage', '--moe-permutation-async-comm', '--multi-latent-attention',
    '--check-for-nan-in-loss-and-grad', '--no-check-for-nan-in-loss-and-grad', '--exit-signal-handler',
    '--exit-duration-in-mins', '--initial-loss-scale', '--min-loss-scale', '--loss-scale-window', '--hysteresis',
    '--override-opt_param-scheduler', '--override-opt-param-scheduler', '--use-checkpoint-opt_param-scheduler',
    '--use-checkpoint-opt-param-scheduler',
}


def test_every_flag_is_still_accepted():
    parser = build_parser()
    flags = {option for action in parser._actions for option in action.option_strings}
    assert not FLAGS - flags, f"flags no longer accepted: {sorted(FLAGS - flags)}"
    assert "--seq-length" in parser.format_help()


# The command-line layer: the parser, the typed config, the features' flag functions, and the
# stand-alone commands of the data package (mm-preprocess, the corpus generator).
COMMAND_LINE = {"cli.py", "config.py", "data/preprocess.py", "data/make_corpus.py", "tiny_vlm.py"}


def _command_line(path: Path) -> bool:
    relative = path.relative_to(PACKAGE).as_posix()
    return relative in COMMAND_LINE or relative.startswith("features/")


def _namespace_annotated(argument: ast.arg) -> bool:
    return argument.annotation is not None and ast.unparse(argument.annotation) == "argparse.Namespace"


def test_nothing_below_the_command_line_reads_the_namespace():
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        where = path.relative_to(PACKAGE).as_posix()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and not _command_line(path):
                names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module]
                if "argparse" in names:
                    problems.append(f"{where}:{node.lineno} imports argparse below the command line")
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "getattr" and node.args \
                    and ast.unparse(node.args[0]) == "args":
                problems.append(f"{where}:{node.lineno} guesses at the Namespace with getattr")
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for argument in node.args.args + node.args.kwonlyargs:
                    if _namespace_annotated(argument) and not _command_line(path):
                        problems.append(f"{where}:{node.lineno} {node.name} takes the Namespace")
                    dunder = node.name.startswith("__")  # protocol methods (e.g. __torch_function__) name their own args
                    if argument.arg == "args" and not dunder and not _namespace_annotated(argument):
                        problems.append(f"{where}:{node.lineno} {node.name} takes an unannotated 'args'")
    assert not problems, "\n".join(problems)


def _norm_types(rank: int, world_size: int, flags: list[str]) -> dict:
    """Norm module types of a one-process GPT model built with ``flags``, and whether megatron's torch
    norm wrapper was left unpatched by the CPU adaptor, the fused kernels and the model build."""
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.transformer import torch_norm

    from mm_train.cli import parse_args
    from mm_train.config import build_config
    from mm_train.features import fused_kernels
    from mm_train.launch import Launch
    from mm_train.model.build import build_model, transformer_config
    from mm_train.platform.cpu_adaptor import apply_cpu_adaptor

    original = torch_norm.WrappedTorchNorm.__dict__["__new__"]
    config = build_config(parse_args(TINY + flags), Launch(rank, world_size, 0, "cpu"))
    apply_cpu_adaptor()
    fused_kernels.apply(config.fused_kernels, config.moe)
    parallel_state.initialize_model_parallel(1, 1)
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    try:
        model = build_model(config, transformer_config(config), 256)
    finally:
        parallel_state.destroy_model_parallel()
    layer = model.decoder.layers[0]
    return {"input": type(layer.input_layernorm).__name__, "pre_mlp": type(layer.pre_mlp_layernorm).__name__,
            "final": type(model.decoder.final_layernorm).__name__,
            "wrapper_untouched": torch_norm.WrappedTorchNorm.__dict__["__new__"] is original}


@pytest.mark.distributed
@pytest.mark.parametrize("flags, norm", [(["--use-fused-rmsnorm"], "FusedRMSNorm"), ([], "RMSNorm")],
                         ids=["fused", "torch"])
def test_norms_come_from_the_layer_spec(flags, norm):
    types = run_ranks(_norm_types, 1, flags, timeout=120)[0]
    assert types == {"input": norm, "pre_mlp": norm, "final": norm, "wrapper_untouched": True}
