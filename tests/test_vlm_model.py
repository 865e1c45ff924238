"""The Hugging Face vision-language model as the multimodal engine builds it: FSDP2 over 2 gloo ranks,
Ulysses context parallel on the text decoder (logits and gradients equal to the unsplit model, Qwen3-VL's
deepstack features cut to match), the vision tower run on a blank image on a rank whose micro-batch has
none (no hang, zero contribution), freezing by part, fused kernels, the meta-device build, and FSDP2's
ignored_modules (frozen ones only)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from mm_kernels.bench.hf_models import IMAGE, make_batch
from mm_kernels.bench.hf_models import build_model as tiny_model
from mm_kernels.parallel import ULYSSES, new_cp_groups, shard_for_rank
from mm_train.errors import ConfigError
from mm_train.features.context_parallel import gather_sequence
from mm_train.features.fsdp2 import FSDP2Config, apply_fsdp2
from mm_train.model.hf.build import build_model, part_of
from mm_train.model.hf.context_parallel import TextModelEntry, register_ulysses_attention
from mm_train.model.hf.spec import ARCHITECTURES, VisionLanguageModelSpec
from tests.distributed import run_ranks

RTOL = 1e-4


def _spec(model_type: str, **freeze) -> VisionLanguageModelSpec:
    config = tiny_model(model_type).config
    return VisionLanguageModelSpec(model_id=model_type, model_type=model_type,
                                   architecture=ARCHITECTURES[model_type][1], hf_config=config.to_dict(),
                                   freeze_vision_encoder=False, **freeze)


def _build(spec, text_attention="sdpa", meta=False, fused=None):
    model, report = build_model(spec, FSDP2Config(), torch.device("cpu"), meta=meta, seed=3,
                                text_attention=text_attention, fused=fused or {})
    return model, report


def _inputs(model_type: str, seq: int) -> dict:
    batch = make_batch(model_type, 2, seq, seed=5)
    batch.pop("mm_token_type_ids")
    return batch


def _loss(model, entry, batch: dict, cp_group=None):
    ids = batch["input_ids"]
    positions, _ = model.model.get_rope_index(ids, (ids == IMAGE).int(), image_grid_thw=batch.get("image_grid_thw"))
    entry.blank_vision = "pixel_values" not in batch
    logits = model(input_ids=ids, pixel_values=batch.get("pixel_values"), image_grid_thw=batch.get("image_grid_thw"),
                   position_ids=positions, use_cache=False).logits.float()
    labels = F.pad(ids[:, 1:], (0, 1), value=-100)
    if cp_group is not None:
        labels = shard_for_rank(labels, ULYSSES, 2, dist.get_rank(cp_group), 2, 1)
    token_loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100,
                                 reduction="none").view_as(labels)
    if cp_group is not None:
        token_loss = gather_sequence(token_loss, cp_group)
    return token_loss.sum(), logits


def _grads(model) -> dict[str, torch.Tensor]:
    return {name: param.grad.full_tensor() if hasattr(param.grad, "full_tensor") else param.grad
            for name, param in model.named_parameters() if param.grad is not None}


def _cp_versus_whole(rank: int, world: int, model_type: str) -> dict:
    spec = _spec(model_type)
    batch = _inputs(model_type, 12)
    whole, _ = _build(spec)
    entry = TextModelEntry(whole)
    loss, logits = _loss(whole, entry, batch)
    loss.backward()
    groups = new_cp_groups([[0, 1]], ULYSSES, 2)
    split, _ = _build(spec, text_attention=register_ulysses_attention(groups))
    split_entry = TextModelEntry(split, 2, rank)
    split_loss, local_logits = _loss(split, split_entry, batch, groups.cp)
    split_loss.backward()
    gathered = [torch.empty_like(local_logits) for _ in range(2)]
    dist.all_gather(gathered, local_logits.detach().contiguous())
    return {"loss": (loss.item(), split_loss.item()), "logits": (logits.detach(), torch.cat(gathered, dim=1)),
            "grads": (_grads(whole), _grads(split))}


@pytest.mark.distributed
@pytest.mark.parametrize("model_type", ["qwen2_5_vl", "qwen3_vl"])
def test_ulysses_text_decoder_equals_the_whole_sequence(model_type):
    for result in run_ranks(_cp_versus_whole, 2, model_type, timeout=240):
        whole, split = result["loss"]
        assert split == pytest.approx(whole, rel=RTOL)
        torch.testing.assert_close(result["logits"][1], result["logits"][0], rtol=RTOL, atol=1e-5)
        grads, split_grads = result["grads"]
        assert grads.keys() == split_grads.keys() and any(name.startswith("model.visual.") for name in grads)
        for name, grad in grads.items():
            torch.testing.assert_close(split_grads[name], grad, rtol=1e-3, atol=1e-6, msg=name)


def _meta_fused_and_blank_vision(rank: int, world: int) -> dict:
    spec = _spec("qwen2_5_vl", freeze_text_decoder=True)
    plain, _ = _build(spec)
    model, report = _build(spec, meta=True, fused={"rms_norm": True, "swiglu": True, "moe_permute": False})
    same = all(torch.equal(a.full_tensor(), b.full_tensor())
               for a, b in zip(plain.parameters(), model.parameters(), strict=True))
    entry = TextModelEntry(model)
    batch = _inputs("qwen2_5_vl", 12)
    if rank == 1:
        batch = {"input_ids": torch.randint(0, IMAGE - 1, (2, 12), generator=torch.Generator().manual_seed(9))}
    for _ in range(2):
        loss, _ = _loss(model, entry, batch)
        loss.backward()
    frozen = [name for name, param in model.named_parameters() if not param.requires_grad]
    ignoring = FSDP2Config(ignored_modules=("0",))
    refused = None
    try:
        apply_fsdp2(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)), ignoring)
    except ConfigError as error:
        refused = str(error)
    frozen_part = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    frozen_part[0].requires_grad_(False)
    apply_fsdp2(frozen_part, ignoring)
    whole = type(frozen_part[0].weight) is torch.nn.Parameter and type(frozen_part[1].weight) is not torch.nn.Parameter
    return {"grads": _grads(model), "frozen": frozen, "same": same, "counts": report.counts(), "refused": refused,
            "ignored_whole": whole}


@pytest.mark.distributed
def test_meta_build_fused_kernels_and_a_rank_without_images():
    first, second = run_ranks(_meta_fused_and_blank_vision, 2, timeout=240)
    assert first["same"], "the meta-device build holds other values than the plain one"
    assert first["counts"]["rms_norm"] > 0 and first["counts"]["swiglu_mlp"] > 0
    vision = [name for name in first["grads"] if name.startswith("model.visual.")]
    assert vision and first["grads"].keys() == second["grads"].keys()
    # Rank 1 ran the tower on a blank image with weight 0 (its collectives kept in step); the gradients
    # FSDP2 gathered are rank 0's images' and the same on both ranks by construction.
    assert all(torch.isfinite(first["grads"][name]).all() for name in vision)
    assert any(first["grads"][name].abs().sum() > 0 for name in vision)
    assert first["frozen"] and all(part_of(name) == "text_decoder" for name in first["frozen"])
    assert not any(name in first["grads"] for name in first["frozen"])
    assert "'ignored_modules' ['0'] holds trainable parameters" in first["refused"] and first["ignored_whole"]


def _moe_with_fused_permute(rank: int, world: int) -> dict:
    spec = _spec("qwen3_vl_moe")
    model, report = _build(spec, fused={"rms_norm": False, "swiglu": False, "moe_permute": True})
    batch = _inputs("qwen3_vl_moe", 12)
    ids = batch["input_ids"]
    positions, _ = model.model.get_rope_index(ids, (ids == IMAGE).int(), image_grid_thw=batch["image_grid_thw"])
    output = model(input_ids=ids, pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"],
                   position_ids=positions, use_cache=False, output_router_logits=True)
    (output.logits.float().square().mean() + output.aux_loss).backward()
    experts = [param.grad for name, param in model.named_parameters() if ".experts." in name]
    return {"counts": report.counts(), "aux": output.aux_loss.item(),
            "expert_grads": bool(experts) and all(g is not None and torch.isfinite(g).all() for g in experts)}


@pytest.mark.distributed
def test_qwen3_vl_moe_trains_with_fused_permute():
    result = run_ranks(_moe_with_fused_permute, 1, timeout=240)[0]
    assert result["counts"] == {"moe_experts": 2} and result["aux"] > 0 and result["expert_grads"]
