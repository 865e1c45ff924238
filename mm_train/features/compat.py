"""Flags of real Megatron / MindSpeed launch scripts that this trainer accepts without effect, or refuses.

- Accepted without effect (:data:`NO_EFFECT`): performance and memory options of Ascend, Transformer
  Engine or Apex, and defaults that already hold here. A run that uses any prints one notice line
  naming them and why (:func:`notices`).
- Refused (:data:`REFUSED`): flags of features mm-train does not have (multi-latent attention, RoPE
  scaling, LoRA, ...). A run that uses any ends with one line naming them and the reason, exit 2
  (:func:`check`).
"""

from __future__ import annotations

import argparse

from mm_train.errors import ConfigError
from mm_train.features import flag

# (why they have no effect here, flags). A name ending in "=" takes one value.
NO_EFFECT: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("fused operators of Transformer Engine, Apex or Ascend; megatron-core's local layers run here, mm_kernels' "
     "through the --use-fused-* flags", (
         "use_fused_rotary_pos_emb", "no_masked_softmax_fusion", "no_gradient_accumulation_fusion",
         "no_bias_dropout_fusion", "no_bias_swiglu_fusion", "no_bias_gelu_fusion", "no_rope_fusion",
         "gemm_gradient_accumulation_fusion", "use_fused_ring_attention_update",
         "use_fused_moe_token_permute_and_unpermute", "shape_order=", "sparse_mode=", "npu_deterministic")),
    ("Ascend communication/computation overlap, performance only", (
        "moe_permutation_async_comm", "moe_alltoall_overlap_comm", "moe_fb_overlap", "use_ascend_coc",
        "coc_fused_kernel", "coc_parallel_num=", "use_ascend_mc2", "cp_window_size=", "disable_gloo_group",
        "use_multiparameter_pipeline_model_parallel")),
    ("memory savings only, the results are the same", (
        "swap_attention", "swap_optimizer", "swap_optimizer_times=", "reuse_fp32_param", "recompute_activation_function",
        "recompute_activation_function_num_layers=", "enable_recompute_layers_per_pp_rank",
        "recompute_skip_core_attention", "recompute_num_layers_skip_core_attention=", "output_layer_slice_num=",
        "downcast_to_bf16", "moe_zero_memory=")),
    ("already so here: megatron-core models, norm weights in fp32, K/V heads repeated for Ulysses as needed, no "
     "attention mask in the data", (
        "use_mcore_models", "rmsnorm_weight_in_fp32", "init_norm_weight_in_fp32",
        "topk_softmax_in_fp32", "moe_revert_type_after_topk", "kv_head_repeat_before_uly_alltoall",
        "no_create_attention_mask_in_dataloader")),
    ("one node with one file system here; no Ascend profiler, telemetry or MindSpeed-MM tools", (
        "no_shared_storage", "profile_level=", "profile_record_shapes", "profile_save_path=", "profile_with_cpu",
        "enable_one_logger")),
)

# (why they are refused, flags): features mm-train does not have. Every one takes any number of values.
REFUSED: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("multi-latent attention (DeepSeek MLA) is not built in mm-train", (
        "multi_latent_attention", "q_lora_rank", "kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim",
        "mla_fa_without_pad", "mla_mm_split", "enable_mla_absorb", "enable_mla_scale_q_lora",
        "enable_mla_scale_kv_lora")),
    ("RoPE scaling (YaRN, llama3, LongRoPE) is not built in mm-train", (
        "rope_scaling_type", "rope_scaling_factor", "rope_scaling_original_max_position_embeddings",
        "rope_scaling_mscale", "rope_scaling_mscale_all_dim", "beta_fast", "beta_slow", "long_factor", "short_factor",
        "long_mscale", "short_mscale", "dynamic_factor", "longrope_freqs_type", "low_freq_factor", "high_freq_factor",
        "original_max_position_embeddings", "partial_rotary_factor")),
    ("LoRA / QLoRA fine-tuning is not built in mm-train", (
        "lora_r", "lora_alpha", "lora_target_modules", "lora_fusion", "lora_load", "lora_dropout",
        "lora_register_forward_hook", "lora_ckpt_filter", "qlora", "lu_lora_final_layer_index", "lu_lora_lr",
        "lu_lora_lr_ratio")),
    ("MindSpeed-LLM's instruction / preference fine-tuning pipeline is not built; mm-train trains on indexed "
     "datasets", (
         "stage", "is_instruction_dataset", "prompt_type", "prompt_type_path", "handler_name", "neat_pack",
         "padded_samples", "is_pairwise_dataset", "no_shuffle", "tokenizer_padding_side", "pack", "pad_to_multiple_of",
         "workers", "enable_thinking", "max_length", "max_new_tokens", "ref_model", "reward_model", "placeholder_token",
         "reward_tokens", "rollout_batch_size", "cut_max_seqlen", "gamma_beta_ratio", "simpo_beta", "simpo_loss_type",
         "dpo_loss_type", "no_pad_to_seq_lengths")),
    ("multi-token prediction is not built in mm-train", (
        "mtp_num_layers", "mtp_mem_efficient_logits", "mtp_loss_scaling_factor", "mtp_after_norm", "mtp_spec")),
    ("Mamba, gated-delta-net and linear-attention layers are not built in mm-train", (
        "mamba_d_conv", "mamba_expand", "mamba_chunk_size", "mamba_head_dim", "mamba_num_groups", "mamba_state_dim",
        "full_attention_interval", "linear_key_head_dim", "linear_num_key_heads", "linear_num_value_heads",
        "linear_value_head_dim", "no_enable_linear_qkv", "use_triton_gdn", "hybrid_attention_ratio",
        "hybrid_mlp_ratio")),
    ("DeepSeek sparse attention and DeepSeek-V4 layers are not built in mm-train", (
        "enable_dsa_indexer", "index_topk", "index_n_heads", "index_head_dim", "index_topk_freq",
        "index_skip_topk_offset", "index_share_for_mtp_iteration", "indexer_loss_coeff", "use_fused_lightning_indexer",
        "use_fused_lightning_indexer_loss", "use_sparse_flash_attn", "no_use_sparse_c8_indexer", "compress_ratios",
        "compress_rope_theta", "enable_mhc", "use_fused_mhc", "use_triton_mhc", "hc_mult", "kv_compress",
        "max_batch_size", "n_hash_layers", "o_groups", "o_lora_rank", "original_seq_len", "rope_factor",
        "sliding_window_size", "apply_rope_no_in_complex", "fc_type", "num_zero_experts", "swiglu_limit")),
    ("device- and communication-level MoE balance losses (DeepSeek-V2) and MindSpeed-LLM's own routers are not "
     "built in mm-train", (
         "moe_comm_aux_loss_coeff", "moe_device_level_aux_loss_coeff", "moe_tp_extend_ep")),
    ("this model-specific architecture option is not built in mm-train", (
        "use_glm_rope", "post_norm", "no_post_layer_norm", "scale_emb", "scale_depth", "dim_model_base",
        "input_embeds_norm", "output_logit_softcapping", "query_pre_attn_scalar", "interleave_sliding_window",
        "sliding_window", "cla_share_factor", "share_kvstates", "add_dense_bias", "add_output_layer_bias",
        "fill_neg_inf", "square_alibi_mask", "geglu", "gelu_tanh", "squared_relu", "add_rmsnorm_offset")),
    ("MindSpeed-LLM's layer specs are not available: mm-train builds megatron-core's spec from the model flags", (
        "spec",)),
    ("uneven or no-op pipeline layers and the DualPipeV schedule are not built in mm-train", (
        "num_layer_list", "noop_layers", "schedules_method")),
    ("2-D tensor parallelism is not built in mm-train", ("tp_2d", "tp_x", "tp_y")),
    ("bf16 gradients / optimizer states change the numerics and are not built in mm-train", (
        "o2_gradient", "o2_optimizer")),
    ("LayerZero is not built; use --use-torch-fsdp2", ("layerzero", "layerzero_config")),
    ("the chunked loss of MindSpeed-LLM is not built in mm-train", ("loss_chunk_size", "loss_compute_mode")),
    ("online Hugging Face <-> Megatron weight conversion is not built in mm-train", (
        "enable_hf2mg_convert", "enable_mg2hf_convert", "model_type_hf", "hf_cfg_dir")),
    ("video / VAE training options (pretrain_sora.py, pretrain_ae.py) do not apply to a GPT", (
        "ae_lr", "ae_wd", "data_config", "discriminator_lr", "discriminator_wd", "epochs", "mix_precision",
        "model_config", "tool_config")),
    ("GPT-2 BPE vocabulary files are not read by mm-train; use --tokenizer-type PretrainedFromHF with a local "
     "tokenizer directory", ("vocab_file", "merge_file")),
    ("not yet supported by mm-train", (
        "qk_layernorm", "norm_topk_prob", "moe_router_pre_softmax", "moe_router_enable_expert_bias",
        "moe_router_score_function", "moe_router_dtype", "router_gating_in_fp32", "moe_input_jitter_eps",
        "shared_expert_gate", "reset_position_ids", "reset_attention_mask", "manual_gc", "manual_gc_interval",
        "expert_tensor_parallel_size", "allow_tf32", "no_position_embedding", "load_checkpoint_loosely",
        "profile", "profile_ranks", "profile_step_start", "profile_step_end", "decoupled_lr")),
)

def _name(entry: str) -> str:
    return entry.rstrip("=")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the flags accepted without effect and the refused ones."""
    inactive = parser.add_argument_group("accepted without effect here (named in a notice at start-up)")
    for why, names in NO_EFFECT:
        for entry in names:
            if entry.endswith("="):
                inactive.add_argument(flag(_name(entry)), default=None, help=why)
            else:
                inactive.add_argument(flag(entry), action="store_true", help=why)
    refused = parser.add_argument_group("refused: features mm-train does not have")
    for why, names in REFUSED:
        for name in names:
            refused.add_argument(flag(name), nargs="*", default=None, help=why)


def _given(args: argparse.Namespace, name: str) -> bool:
    value = vars(args)[name]
    return value is not None and value is not False


def check(args: argparse.Namespace) -> None:
    """Refuses, in one line, every flag of :data:`REFUSED` on the command line."""
    parts = []
    for why, names in REFUSED:
        used = [flag(name) for name in names if _given(args, name)]
        if used:
            parts.append(f"{' '.join(used)} ({why})")
    if parts:
        raise ConfigError("not supported: " + "; ".join(parts))


def notices(args: argparse.Namespace) -> list[str]:
    """One line naming the flags of :data:`NO_EFFECT` on the command line and why; none when there are none."""
    parts = []
    for why, names in NO_EFFECT:
        used = [flag(_name(entry)) for entry in names if _given(args, _name(entry))]
        if used:
            parts.append(f"{' '.join(used)} ({why})")
    return [f"no effect here: {'; '.join(parts)}"] if parts else []
