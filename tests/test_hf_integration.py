"""mm_kernels.integrations.transformers on tiny random models of every supported type: same loss and
gradients as the unpatched model, the report, the equivalence probe (a wrong module stays unfused),
undo, the model-type patch, save/load, gradient checkpointing, torch.compile, meta-device models and
FSDP2 fully_shard before and after the patch."""

from __future__ import annotations

import copy
import warnings
from collections import Counter

import pytest
import torch
import transformers
from torch._dynamo.testing import CompileCounterWithBackend

from mm_kernels.bench.hf_models import MODEL_TYPES, build_model, make_batch
from mm_kernels.integrations.transformers import (
    SUPPORTED,
    FusedKernelMismatchError,
    apply_fused_kernels,
    fuse_model_type,
    fused_kind,
)
from mm_kernels.integrations.transformers.kinds import KINDS, grouped_linear
from tests.distributed import run_ranks
from tests.helpers import assert_close, relative_error

GELU = "activation GELUTanh is not SiLU (SwiGLU does not apply)"
LAYER_NORM = "LayerNorm (mean-centred): mm_kernels fuses RMSNorm only"
NOT_GATED = "not a gated MLP (no gate_proj / up_proj): SwiGLU does not apply"

# Per model type: {(class, kind): count} swapped, {(class, reason): count} left alone (tiny size: 2 layers,
# 2 vision blocks).
EXPECTED = {
    "llama": ({("LlamaRMSNorm", "rms_norm"): 5, ("LlamaMLP", "swiglu_mlp"): 2}, {}),
    "mistral": ({("MistralRMSNorm", "rms_norm"): 5, ("MistralMLP", "swiglu_mlp"): 2}, {}),
    "qwen2": ({("Qwen2RMSNorm", "rms_norm"): 5, ("Qwen2MLP", "swiglu_mlp"): 2}, {}),
    "qwen3": ({("Qwen3RMSNorm", "rms_norm"): 9, ("Qwen3MLP", "swiglu_mlp"): 2}, {}),
    "qwen3_moe": ({("Qwen3MoeRMSNorm", "rms_norm"): 9, ("Qwen3MoeExperts", "moe_experts"): 2}, {}),
    "mixtral": ({("MixtralRMSNorm", "rms_norm"): 5, ("MixtralExperts", "moe_experts"): 2}, {}),
    "gemma": ({("GemmaRMSNorm", "gemma_rms_norm"): 5}, {("GemmaMLP", GELU): 2}),
    "gemma3": ({("Gemma3RMSNorm", "gemma_rms_norm"): 14},
               {("Gemma3MLP", GELU): 2, ("LayerNorm", LAYER_NORM): 6, ("SiglipMLP", NOT_GATED): 3}),
    "qwen2_vl": ({("Qwen2VLRMSNorm", "rms_norm"): 5, ("Qwen2MLP", "swiglu_mlp"): 2},
                 {("LayerNorm", LAYER_NORM): 5, ("VisionMlp", NOT_GATED): 2}),
    "qwen2_5_vl": ({("Qwen2_5_VLRMSNorm", "rms_norm"): 10, ("Qwen2_5_VLMLP", "swiglu_mlp"): 2,
                    ("Qwen2MLP", "swiglu_mlp"): 2}, {}),
    "qwen3_vl": ({("Qwen3VLTextRMSNorm", "rms_norm"): 9, ("Qwen3VLTextMLP", "swiglu_mlp"): 2},
                 {("LayerNorm", LAYER_NORM): 6, ("Qwen3VLVisionMLP", NOT_GATED): 2}),
    "qwen3_vl_moe": ({("Qwen3VLMoeTextRMSNorm", "rms_norm"): 9, ("Qwen3VLMoeTextExperts", "moe_experts"): 2},
                     {("LayerNorm", LAYER_NORM): 6, ("Qwen3VLMoeVisionMLP", NOT_GATED): 2}),
}

# Whole-model comparisons (loss, and every parameter gradient relative to its largest value).
MODEL_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 5e-2}


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    grads = {name.removeprefix("_orig_mod."): p.grad.detach().clone()  # torch.compile's wrapper prefix
             for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def _assert_same_training_step(reference, patched, batch, dtype=torch.float32):
    loss, grads = _loss_and_grads(reference, batch)
    patched_loss, patched_grads = _loss_and_grads(patched, batch)
    tolerance = MODEL_TOLERANCE[dtype]
    assert relative_error(patched_loss, loss) <= tolerance
    assert patched_grads.keys() == grads.keys()
    worst = max(grads, key=lambda name: relative_error(patched_grads[name], grads[name]))
    assert relative_error(patched_grads[worst], grads[worst]) <= tolerance, worst


def _summary(report):
    return Counter((cls, kind) for _, cls, kind in report.swapped), Counter((cls, why) for _, cls, why in report.left_alone)


def test_every_listed_model_type_is_covered():
    assert set(EXPECTED) == set(MODEL_TYPES) == set(SUPPORTED)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_patched_model_trains_like_the_original(model_type):
    reference = build_model(model_type)
    patched = copy.deepcopy(reference)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = apply_fused_kernels(patched)
    swapped, left_alone = _summary(report)
    assert (dict(swapped), dict(left_alone)) == EXPECTED[model_type]
    assert f"{len(report.swapped)} modules of {type(reference).__name__} fused" in str(report)
    _assert_same_training_step(reference, patched, make_batch(model_type, batch=2, seq=24))


@pytest.mark.parametrize("model_type", ["llama", "qwen3_moe", "qwen2_5_vl"])
def test_patched_model_in_bf16(model_type):
    reference = build_model(model_type, dtype=torch.bfloat16)
    patched = copy.deepcopy(reference)
    assert sum(apply_fused_kernels(patched).counts().values()) == sum(EXPECTED[model_type][0].values())
    batch = make_batch(model_type, batch=2, seq=24, dtype=torch.bfloat16)
    _assert_same_training_step(reference, patched, batch, torch.bfloat16)


def test_vision_blocks_and_merger_norm_are_fused():
    report = apply_fused_kernels(build_model("qwen2_5_vl"))
    names = {name: kind for name, _, kind in report.swapped}
    assert names["model.visual.merger.ln_q"] == "rms_norm"
    assert names["model.visual.blocks.0.norm1"] == names["model.visual.blocks.1.norm2"] == "rms_norm"
    assert names["model.visual.blocks.0.mlp"] == names["model.language_model.layers.1.mlp"] == "swiglu_mlp"


class _OffsetRMSNorm(transformers.models.llama.modeling_llama.LlamaRMSNorm):
    """A subclass whose forward scales by 1 + weight: the Llama kind's fused forward would be wrong for it."""

    def forward(self, hidden_states):
        variance = hidden_states.float().pow(2).mean(-1, keepdim=True)
        normed = hidden_states.float() * torch.rsqrt(variance + self.variance_epsilon)
        return (1 + self.weight) * normed.to(hidden_states.dtype)


class _DoubledMLP(transformers.models.llama.modeling_llama.LlamaMLP):
    def forward(self, x):
        return 2 * super().forward(x)


def _model_with_wrong_modules():
    model = build_model("llama")
    model.model.layers[0].input_layernorm.__class__ = _OffsetRMSNorm
    model.model.layers[1].mlp.__class__ = _DoubledMLP
    return model


def test_probe_leaves_a_mismatching_kind_unfused_with_one_warning():
    reference = _model_with_wrong_modules()
    patched = copy.deepcopy(reference)
    with pytest.warns(RuntimeWarning) as caught:
        report = apply_fused_kernels(patched)
    messages = sorted(str(w.message) for w in caught)
    assert len(messages) == 2
    assert "_DoubledMLP (torch.float32) left unfused: fused swiglu_mlp does not match" in messages[0]
    assert "_OffsetRMSNorm (torch.float32) left unfused: fused rms_norm does not match" in messages[1]
    left = {name: why for name, _, why in report.left_alone}
    assert left["model.layers.0.input_layernorm"].startswith("probe mismatch: ")
    assert "differs by" in left["model.layers.0.input_layernorm"]
    assert left["model.layers.1.mlp"].startswith("probe mismatch")
    assert fused_kind(patched.model.layers[0].input_layernorm) is None
    assert fused_kind(patched.model.layers[0].post_attention_layernorm).name == "rms_norm"
    assert fused_kind(patched.model.layers[0].mlp).name == "swiglu_mlp"
    _assert_same_training_step(reference, patched, make_batch("llama", batch=2, seq=16))


def test_strict_probe_raises_and_swaps_nothing():
    model = _model_with_wrong_modules()
    with pytest.raises(FusedKernelMismatchError, match="does not match"):
        apply_fused_kernels(model, strict=True)
    assert not any(fused_kind(module) for module in model.modules())


def test_flags_undo_and_names():
    model = build_model("qwen3_moe")
    names = [name for name, _ in model.named_parameters()]
    keys = list(model.state_dict())
    batch = make_batch("qwen3_moe", batch=2, seq=16)
    with torch.no_grad():
        before = model(**batch).logits
    report = apply_fused_kernels(model, rms_norm=False)
    assert report.counts() == {"moe_experts": 2}
    assert Counter(why for _, _, why in report.left_alone) == {"rms_norm=False": 9}
    assert [name for name, _ in model.named_parameters()] == names and list(model.state_dict()) == keys
    second = apply_fused_kernels(model, swiglu=False, moe_permute=False, rms_norm=True)
    assert second.counts() == {"rms_norm": 9}
    assert Counter(why for _, _, why in second.left_alone) == {"already fused": 2}
    report.undo()
    second.undo()
    assert not any(fused_kind(module) for module in model.modules())
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, before)


def test_save_pretrained_and_model_type_patch(tmp_path):
    reference = build_model("qwen2_5_vl")
    patched = copy.deepcopy(reference)
    apply_fused_kernels(patched)
    patched.save_pretrained(tmp_path / "saved")
    model_class = type(reference)
    batch = make_batch("qwen2_5_vl", batch=2, seq=24)
    plain = model_class.from_pretrained(tmp_path / "saved", attn_implementation="eager")
    assert not any(fused_kind(module) for module in plain.modules())
    for (name, p), (_, q) in zip(reference.state_dict().items(), plain.state_dict().items(), strict=True):
        assert torch.equal(p, q), name
    with fuse_model_type("qwen2_5_vl") as patch:
        loaded = model_class.from_pretrained(tmp_path / "saved", attn_implementation="eager")
    assert len(patch.reports) == 1 and patch.reports[0].counts() == {"rms_norm": 10, "swiglu_mlp": 4}
    assert fused_kind(loaded.model.visual.merger.ln_q) is not None
    assert "from_pretrained" not in transformers.Qwen2_5_VLPreTrainedModel.__dict__
    again = model_class.from_pretrained(tmp_path / "saved", attn_implementation="eager")
    assert not any(fused_kind(module) for module in again.modules())
    loaded.train()
    _assert_same_training_step(reference, loaded, batch)


def test_model_type_patch_covers_from_config_and_refuses_misuse():
    config = build_model("llama").config
    with fuse_model_type("llama", "llama", swiglu=False) as patch:
        model = transformers.AutoModelForCausalLM.from_config(config)
        with pytest.raises(ValueError, match="already patched"):
            fuse_model_type("llama")
    assert [report.counts() for report in patch.reports] == [{"rms_norm": 5}]
    assert fused_kind(model.model.norm) is not None and fused_kind(model.model.layers[0].mlp) is None
    with pytest.raises(ValueError, match="model type 'phi3' is not supported"):
        fuse_model_type("phi3")


def test_gradient_checkpointing():
    reference = build_model("qwen3")
    patched = copy.deepcopy(reference)
    apply_fused_kernels(patched)
    patched.activation_checkpointing_enable()
    _assert_same_training_step(reference, patched, make_batch("qwen3", batch=2, seq=16))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile(backend):
    reference = build_model("llama")
    patched = copy.deepcopy(reference)
    apply_fused_kernels(patched)
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(patched, backend=counter)
    batch = make_batch("llama", batch=2, seq=16)
    _assert_same_training_step(reference, compiled, batch)
    ops = {str(node.target) for graph in counter.graphs for node in graph.graph.nodes}
    assert {"mm_kernels.rms_norm_fwd.default", "mm_kernels.swiglu_pair_fwd.default"} <= ops


def test_meta_device_model():
    reference = build_model("qwen3_moe")
    with torch.device("meta"):
        meta = build_model("qwen3_moe")
    report = apply_fused_kernels(meta)
    assert report.counts() == {"rms_norm": 9, "moe_experts": 2}
    assert all(p.is_meta for p in meta.parameters())
    meta.to_empty(device="cpu")
    meta.load_state_dict(reference.state_dict())
    for name, buffer in reference.named_buffers():  # rotary tables are not in the state dict
        meta.get_buffer(name).copy_(buffer)
    _assert_same_training_step(reference, meta, make_batch("qwen3_moe", batch=2, seq=16))


def _fsdp_losses(rank, world_size, patch_before_sharding):
    from torch.distributed.fsdp import fully_shard

    model = build_model("qwen3_moe")
    if patch_before_sharding:
        apply_fused_kernels(model)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    if not patch_before_sharding:
        report = apply_fused_kernels(model)
        assert report.counts() == {"rms_norm": 9, "moe_experts": 2}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    batch = make_batch("qwen3_moe", batch=4, seq=16, seed=7)
    losses = []
    for _ in range(3):
        shard = {key: value[rank::world_size] for key, value in batch.items()}
        loss = model(**shard).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.detach())
    return torch.stack(losses)


def test_fsdp2_before_and_after_patching():
    model = build_model("qwen3_moe")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    batch = make_batch("qwen3_moe", batch=4, seq=16, seed=7)
    expected = []
    for _ in range(3):
        rank_losses = [model(**{key: value[rank::2] for key, value in batch.items()}).loss for rank in range(2)]
        (sum(rank_losses) / 2).backward()
        optimizer.step()
        optimizer.zero_grad()
        expected.append(torch.stack([loss.detach() for loss in rank_losses]))
    expected = torch.stack(expected, dim=1)
    for patch_before in (True, False):
        losses = torch.stack(run_ranks(_fsdp_losses, 2, patch_before, timeout=300))
        torch.testing.assert_close(losses, expected, rtol=1e-5, atol=1e-6)


# bf16 with 12 columns (24-byte rows) takes the per-expert loop, the others F.grouped_mm.
@pytest.mark.parametrize("dtype, hidden", [(torch.bfloat16, 32), (torch.bfloat16, 12), (torch.float32, 12)])
def test_grouped_linear_matches_per_expert_matmuls(dtype, hidden):
    generator = torch.Generator().manual_seed(8)
    counts = torch.tensor([3, 0, 5, 1])
    x = torch.randn(int(counts.sum()), hidden, generator=generator).to(dtype).requires_grad_()
    weight = torch.randn(4, 16, hidden, generator=generator).to(dtype).requires_grad_()
    out = grouped_linear(x, weight, counts)
    rows = x.detach().split(counts.tolist())
    expected = torch.cat([r.double() @ w.double().T for r, w in zip(rows, weight.detach(), strict=True)])
    assert_close(out, expected, dtype, name="out")
    out.backward(torch.ones_like(out))
    expected_dx = torch.cat([torch.ones(len(r), 16, dtype=torch.float64) @ w.double()
                             for r, w in zip(rows, weight.detach(), strict=True)])
    assert_close(x.grad, expected_dx, dtype, name="dx")
    for e, rows_e in enumerate(rows):
        assert_close(weight.grad[e], torch.ones(len(rows_e), 16, dtype=torch.float64).T @ rows_e.double(), dtype,
                     scale=len(rows_e) ** 0.5 + 1, name=f"dweight[{e}]")


def test_experts_with_no_tokens_and_one_expert_hit():
    model = build_model("mixtral")
    experts = model.model.layers[0].mlp.experts
    fused = KINDS["moe_experts"].forward
    empty = fused(experts, torch.zeros(0, 64), torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2))
    assert empty.shape == (0, 64)
    hidden = torch.randn(5, 64)
    index = torch.tensor([[3, 1]] * 5)
    weights = torch.full((5, 2), 0.5)
    torch.testing.assert_close(fused(experts, hidden, index, weights), type(experts).forward(experts, hidden, index, weights))


def test_module_whose_forward_a_hook_replaced_is_left_alone():
    model = build_model("llama")
    norm = model.model.norm
    norm.forward = lambda hidden_states: type(norm).forward(norm, hidden_states)  # as accelerate's hooks do
    report = apply_fused_kernels(model)
    assert ("model.norm", "LlamaRMSNorm", "its forward is already replaced on the instance (e.g. by a hook)") \
        in report.left_alone
    assert report.counts() == {"rms_norm": 4, "swiglu_mlp": 2}


def test_patched_model_deep_copies_and_pickles(tmp_path):
    model = build_model("qwen3_moe")
    apply_fused_kernels(model)
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    for copied in (copy.deepcopy(model), loaded):
        for module in (copied.model.norm, copied.model.layers[1].mlp.experts):
            assert fused_kind(module) is not None and module.forward.module is module
        batch = make_batch("qwen3_moe", batch=2, seq=16)
        with torch.no_grad():
            assert torch.equal(copied(**batch).logits, model(**batch).logits)
